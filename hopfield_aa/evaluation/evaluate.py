"""Evaluating guidance rules on the reference model: the same prompts and initial noise under every rule,
exact text alignment and Fréchet distance to real renders with bootstrap intervals, grids and curves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hopfield_aa.geometry import _decompose
from hopfield_aa.guidance.api import GuidanceConfig, enable_config
from hopfield_aa.guidance.rules import RULES, register_rule
from hopfield_aa.reference.dataset import caption_combinations, caption_of, render, scene_from_attributes
from hopfield_aa.reference.metrics import (
    Alignment,
    Estimate,
    alignment,
    bootstrap_ci,
    frechet_distance,
    image_features,
)
from hopfield_aa.reference.pipeline import generate, initial_latents

FAMILIES: dict[str, str] = {
    "none": "no guidance",
    "cfg": "CFG (scale s)",
    "extrapolate": "extrapolation D + λ(S − D) = full residual ζ = 1 at λ − 1",
    "gag": "GAG ζ = 0, η = ∞ (parallel only)",
    "gag_capped": "GAG ζ = 0, η capped",
    "full": "full residual ζ = 1 (check: equals extrapolation at λ + 1)",
    "orthogonal": "orthogonal only (ζ = 1, η = 0)",
    "ladder": "α-ladder AA (1, 1.25, 1.5, 2)",
    "gag_cfg": "GAG ζ = 0, λ = 1 on top of CFG (scale s)",
}
"""Method families: each is one curve (a sweep over λ or the CFG scale s)."""


@dataclass(frozen=True)
class Method:
    """One sampling configuration: CFG scale and an optional attention-guidance rule.

    Attributes
    ----------
    name : str
        Unique label, e.g. ``"gag λ=1"``.
    family : str
        A key of :data:`FAMILIES`; methods of one family form a curve.
    value : float
        The swept parameter: λ for attention rules, the CFG scale ``s`` for ``cfg`` and ``gag_cfg``.
    cfg_scale : float
        Classifier-free guidance scale (1: none, one UNet call per step).
    guidance : GuidanceConfig or None
        Attention guidance, or None.
    """

    name: str
    family: str
    value: float
    cfg_scale: float = 1.0
    guidance: GuidanceConfig | None = None


def default_methods(eta: float, *, quick: bool = False) -> list[Method]:
    """The evaluation grid: no guidance, CFG swept, extrapolation, GAG with and without the η cap, full
    residual, orthogonal only, the α-ladder, and GAG on top of CFG; a λ sweep for the main rules.

    Parameters
    ----------
    eta : float
        The cap η of the capped GAG variant (e.g. from :func:`calibrate_eta`).
    quick : bool
        One point per family (for smoke runs).
    """

    def rule(family: str, lam: float, name: str, **kwargs: Any) -> Method:
        return Method(f"{name} λ={lam:g}", family, lam, guidance=GuidanceConfig(scale=lam, **kwargs))

    cfg_values = (3.0,) if quick else (1.5, 2.0, 3.0, 5.0)
    methods = [Method("none", "none", 0.0)]
    methods += [Method(f"CFG s={s:g}", "cfg", s, cfg_scale=s) for s in cfg_values]
    for lam in (2.0,) if quick else (1.5, 2.0, 3.0):
        methods.append(rule("extrapolate", lam, "extrapolate", rule="extrapolate"))
    if not quick:
        methods.append(rule("full", 1.0, "full ζ=1", rule="gag", options={"zeta": 1.0}))
    for lam in (1.0,) if quick else (0.5, 1.0, 2.0, 3.0):
        methods.append(rule("gag", lam, "GAG ζ=0", rule="gag"))
    for lam in (1.0,) if quick else (1.0, 3.0):
        methods.append(rule("gag_capped", lam, "GAG ζ=0 η-cap", rule="gag", options={"eta": eta}))
    for lam in (1.0,) if quick else (0.5, 1.0, 2.0):
        methods.append(rule("orthogonal", lam, "orthogonal", rule="gag", options={"zeta": 1.0, "eta": 0.0}))
    for lam in (2.0,) if quick else (1.5, 2.0, 3.0):
        methods.append(rule("ladder", lam, "ladder", rule="ladder"))
    for s in (3.0,) if quick else (2.0, 3.0):
        methods.append(
            Method(f"GAG λ=1 + CFG s={s:g}", "gag_cfg", s, cfg_scale=s, guidance=GuidanceConfig(scale=1.0))
        )
    return methods


def evaluation_prompts(n_prompts: int, seed: int = 0) -> list[str]:
    """``n_prompts`` captions of the training grammar, half single-object and half two-object, drawn
    without replacement by a seeded generator (the same list for every rule)."""
    if n_prompts < 2:
        raise ValueError(f"n_prompts must be >= 2, got {n_prompts}")
    rng = np.random.default_rng(seed)
    out = []
    for kind, count in (("single", n_prompts // 2), ("pair", n_prompts - n_prompts // 2)):
        records = caption_combinations("train", kind)
        for index in rng.choice(len(records), size=count, replace=False):
            out.append(caption_of(records[int(index)]))
    return out


def initial_noise(pipe: Any, n_prompts: int, seeds: Sequence[int]) -> torch.Tensor:
    """Initial latents ``(len(seeds) * n_prompts, C, h, w)``: seed ``s`` draws the block for all prompts
    from ``torch.Generator().manual_seed(s)``; rows are seed-major."""
    return initial_latents(pipe, seeds, per_seed=n_prompts)


def real_renders(captions: Sequence[str], per_caption: int, seed: int = 0) -> np.ndarray:
    """``per_caption`` renders of every caption (random jitter of position and size), ``(n, H, W, 3)``."""
    from hopfield_aa.reference.dataset import parse_caption

    rng = np.random.default_rng(seed)
    scenes = [scene_from_attributes(parse_caption(c), rng) for c in captions for _ in range(per_caption)]
    return render(scenes)


def sample(
    pipe: Any,
    method: Method,
    captions: Sequence[str],
    latents: torch.Tensor,
    steps: int,
    batch_size: int = 64,
) -> np.ndarray:
    """Images ``(n, H, W, 3)`` in [0, 1] for ``captions`` from ``latents`` under ``method``."""
    handle = None if method.guidance is None else enable_config(pipe, method.guidance)
    try:
        return generate(
            pipe,
            captions,
            latents,
            num_inference_steps=steps,
            guidance_scale=method.cfg_scale,
            batch_size=batch_size,
        )
    finally:
        if handle is not None:
            handle.disable()


def calibrate_eta(
    pipe: Any, captions: Sequence[str], latents: torch.Tensor, steps: int, quantile: float = 0.5
) -> float:
    r"""A data-driven norm cap: the ``quantile`` of :math:`\lVert r_\parallel\rVert` (r = S − D along S).

    Samples ``captions`` with stock attention while a probe rule records the norm of the parallel part of
    the residual at every cross-attention layer, head, query token and step.
    """
    norms: list[torch.Tensor] = []

    def probe(retrievals: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
        """Record ‖r_∥‖ and return the dense retrieval (stock attention)."""
        dense, sparse = retrievals
        parallel, _ = _decompose(sparse - dense, sparse)
        norms.append(torch.linalg.vector_norm(parallel, dim=-1).flatten()[::7].cpu())
        return dense

    name = "_calibrate_eta"
    register_rule(name, probe, alphas=(1.0, 1.5), scale=0.0, overwrite=True)
    try:
        sample(
            pipe,
            Method("calibration", "none", 0.0, guidance=GuidanceConfig(rule=name)),
            captions,
            latents,
            steps,
        )
    finally:
        RULES.pop(name, None)
    return float(torch.quantile(torch.cat(norms).float(), quantile))


@dataclass
class MethodResult:
    """What one method produced: images, per-image alignment, reader features, and wall time."""

    method: Method
    images: np.ndarray
    alignment: Alignment
    features: np.ndarray
    seconds: float


@dataclass
class Evaluation:
    """Results of :func:`evaluate` plus the set-up (prompts, seeds, steps, real-render features)."""

    results: list[MethodResult]
    captions: list[str]
    n_prompts: int
    seeds: list[int]
    steps: int
    real_features: np.ndarray
    eta: float
    model: str
    n_resamples: int = 500
    _cache: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def result(self, name: str) -> MethodResult:
        """The result of the method called ``name``."""
        for r in self.results:
            if r.method.name == name:
                return r
        raise KeyError(name)

    def family(self, family: str) -> list[MethodResult]:
        """Results of one family, in sweep order."""
        return sorted((r for r in self.results if r.method.family == family), key=lambda r: r.method.value)

    def scores(self, name: str, attribute: str = "whole") -> np.ndarray:
        """Per-image correctness of ``name``: ``"whole"`` (1 when every stated attribute is right),
        ``"attributes"`` (the fraction of the caption's stated attributes read correctly, a finer score
        than the whole caption), or one attribute (NaN where the caption does not state it)."""
        a = self.result(name).alignment
        if attribute == "whole":
            return a.whole
        if attribute == "attributes":
            return np.nanmean(np.stack(list(a.attributes.values())), axis=0)
        return a.attributes[attribute]

    def accuracy(self, name: str, attribute: str = "whole") -> Estimate:
        """Mean of :meth:`scores` with its bootstrap 95% interval."""
        key = ("acc", name, attribute)
        if key not in self._cache:
            self._cache[key] = bootstrap_ci(self.scores(name, attribute), n_resamples=self.n_resamples)
        return self._cache[key]

    def fd(self, name: str) -> Estimate:
        """Fréchet distance to the real renders, with a bootstrap 95% interval (both sets resampled)."""
        key = ("fd", name)
        if key not in self._cache:
            self._cache[key] = bootstrap_ci(
                self.result(name).features,
                self.real_features,
                statistic=frechet_distance,
                n_resamples=self.n_resamples // 2,
            )
        return self._cache[key]

    def paired_accuracy_gain(self, name: str, baseline: str, attribute: str = "whole") -> Estimate:
        """Mean score of ``name`` minus ``baseline`` on the same prompts and noise (paired CI)."""
        key = ("gain", name, baseline, attribute)
        if key not in self._cache:
            self._cache[key] = bootstrap_ci(
                self.scores(name, attribute),
                self.scores(baseline, attribute),
                statistic=lambda a, b: float(np.nanmean(a) - np.nanmean(b)),
                paired=True,
                n_resamples=self.n_resamples,
            )
        return self._cache[key]

    def paired_fd_change(self, name: str, baseline: str) -> Estimate:
        """FD of ``name`` minus FD of ``baseline`` (paired resampling of the generated rows)."""
        key = ("dfd", name, baseline)
        if key not in self._cache:
            real = self.real_features
            self._cache[key] = bootstrap_ci(
                self.result(name).features,
                self.result(baseline).features,
                statistic=lambda a, b: frechet_distance(a, real) - frechet_distance(b, real),
                paired=True,
                n_resamples=self.n_resamples // 2,
            )
        return self._cache[key]

    def attributes(self) -> list[str]:
        """Attribute names stated by at least one caption."""
        first = self.results[0].alignment
        return [k for k, v in first.attributes.items() if np.isfinite(v).any()]

    def to_json(self) -> dict[str, Any]:
        """Every number of the report (estimates as ``[value, low, high]``)."""

        def est(e: Estimate) -> list[float]:
            return [e.value, e.low, e.high]

        methods = []
        for r in self.results:
            m = r.method
            methods.append(
                {
                    "name": m.name,
                    "family": m.family,
                    "value": m.value,
                    "cfg_scale": m.cfg_scale,
                    "guidance": None if m.guidance is None else m.guidance.label(),
                    "seconds": r.seconds,
                    "whole": est(self.accuracy(m.name)),
                    "attribute_score": est(self.accuracy(m.name, "attributes")),
                    "attributes": {a: est(self.accuracy(m.name, a)) for a in self.attributes()},
                    "fd": est(self.fd(m.name)),
                }
            )
        return {
            "model": self.model,
            "n_prompts": self.n_prompts,
            "seeds": self.seeds,
            "samples_per_method": len(self.captions),
            "steps": self.steps,
            "eta": self.eta,
            "real_renders": int(self.real_features.shape[0]),
            "methods": methods,
        }


def evaluate(
    pipe: Any,
    methods: Sequence[Method],
    captions: Sequence[str],
    *,
    n_prompts: int,
    seeds: Sequence[int],
    steps: int = 20,
    eta: float = math.nan,
    real_per_caption: int = 8,
    batch_size: int = 64,
    model: str = "",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Evaluation:
    """Sample every method on the same captions and initial noise and score the images.

    Parameters
    ----------
    pipe : the reference ``StableDiffusionPipeline`` (or any pipeline with its call)
    methods : sequence of Method
    captions : list of ``len(seeds) * n_prompts`` captions (seed-major, see :func:`initial_noise`)
    n_prompts, seeds : the prompt count and the noise seeds
    steps : int, default 20
    eta : float
        The η used by capped methods (recorded in the report).
    real_per_caption : int, default 8
        Real renders per distinct caption for the Fréchet distance.
    """
    from tqdm.auto import tqdm

    latents = initial_noise(pipe, n_prompts, seeds)
    if latents.shape[0] != len(captions):
        raise ValueError(f"captions must hold len(seeds) * n_prompts = {latents.shape[0]} entries")
    real = image_features(real_renders(captions[:n_prompts], real_per_caption))
    results = []
    for method in tqdm(methods, desc="evaluate", disable=not progress):
        start = time.perf_counter()
        images = sample(pipe, method, captions, latents, steps, batch_size)
        seconds = time.perf_counter() - start
        result = MethodResult(method, images, alignment(images, captions), image_features(images), seconds)
        results.append(result)
        if log is not None:
            log(f"{method.name}: whole {result.alignment.whole.mean():.3f}, {seconds:.0f} s")
    return Evaluation(
        results=results,
        captions=list(captions),
        n_prompts=n_prompts,
        seeds=list(seeds),
        steps=steps,
        real_features=real,
        eta=eta,
        model=model,
    )
