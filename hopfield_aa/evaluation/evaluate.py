"""Evaluating guidance rules on the reference model: the same prompts and initial noise under every rule,
exact text alignment and Fréchet distance to real renders with bootstrap intervals, grids and curves.
"""

from __future__ import annotations

import math
import os
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
    "extrapolate_cfg": "extrapolation on top of CFG (best s)",
    "gag_cfg": "GAG ζ = 0 on top of CFG (best s)",
    "gag_capped_cfg": "GAG ζ = 0, η capped, on top of CFG (best s)",
    "orthogonal_cfg": "orthogonal only on top of CFG (best s)",
    "ladder_cfg": "α-ladder on top of CFG (best s)",
    "pag": "PAG on top of CFG (best s), diffusers guider",
    "seg": "SEG on top of CFG (best s), diffusers guider",
    "apg": "APG (η = 0) at the best s, diffusers guider",
    "cfg_matched": "CFG at the scale matching a rule's guidance magnitude",
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
    guider: str | None = None


RULE_GRID: dict[str, tuple[tuple[float, ...], str, dict[str, Any]]] = {
    "extrapolate": ((1.5, 2.0, 3.0), "extrapolate", {}),
    "gag": ((0.5, 1.0, 2.0, 3.0), "gag", {}),
    "gag_capped": ((1.0, 3.0), "gag", {"eta": None}),
    "orthogonal": ((0.5, 1.0, 2.0), "gag", {"zeta": 1.0, "eta": 0.0}),
    "ladder": ((1.5, 2.0, 3.0), "ladder", {}),
}
"""Attention rules swept over λ: family -> (λ values, registered rule, options; ``eta: None`` = the
calibrated η)."""

RULE_NAMES = {
    "extrapolate": "extrapolate",
    "gag": "GAG ζ=0",
    "gag_capped": "GAG ζ=0 η-cap",
    "orthogonal": "orthogonal",
    "ladder": "ladder",
}


def default_methods(eta: float, *, cfg_scale: float = 3.0, quick: bool = False) -> list[Method]:
    """The evaluation grid: no guidance; CFG swept over s ∈ {1.5, 2, 3, 5, 7.5} (and ``cfg_scale``);
    every attention rule of :data:`RULE_GRID` over its λ values without CFG and on top of CFG at
    ``cfg_scale`` (the model's best scale); the full residual ζ = 1 (the identity check against
    extrapolation); and the peers diffusers ships as guiders (PAG, SEG, APG) at ``cfg_scale``.

    Parameters
    ----------
    eta : float
        The cap η of the capped GAG variant (e.g. from :func:`calibrate_eta`).
    cfg_scale : float, default 3
        The CFG scale the rules are added to and the peers run at.
    quick : bool
        One point per family (for smoke runs).
    """

    def rule(family: str, lam: float, scale: float) -> Method:
        _, registered, options = RULE_GRID[family]
        options = {k: (eta if v is None else v) for k, v in options.items()}
        suffix = "" if scale == 1.0 else f" + CFG s={scale:g}"
        return Method(
            f"{RULE_NAMES[family]} λ={lam:g}{suffix}",
            family if scale == 1.0 else f"{family}_cfg",
            lam,
            cfg_scale=scale,
            guidance=GuidanceConfig(rule=registered, scale=lam, options=options),
        )

    cfg_values = (cfg_scale,) if quick else tuple(sorted({1.5, 2.0, 3.0, 5.0, 7.5, cfg_scale}))
    methods = [Method("none", "none", 0.0)]
    methods += [Method(f"CFG s={s:g}", "cfg", s, cfg_scale=s) for s in cfg_values]
    for family, (values, _, _) in RULE_GRID.items():
        lams = values[len(values) // 2 : len(values) // 2 + 1] if quick else values
        methods += [rule(family, lam, 1.0) for lam in lams]
        if not quick:
            methods += [rule(family, lam, cfg_scale) for lam in lams]
    if not quick:
        methods.append(
            Method("full ζ=1 λ=1", "full", 1.0, guidance=GuidanceConfig(scale=1.0, options={"zeta": 1.0}))
        )
    else:
        methods.append(rule("gag", 1.0, cfg_scale))
    for guider in ("PAG", "SEG", "APG"):
        methods.append(
            Method(f"{guider} + CFG s={cfg_scale:g}", guider.lower(), cfg_scale, cfg_scale, guider=guider)
        )
    return methods


def evaluation_prompts(n_prompts: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n_prompts`` captions of the training grammar, half single-object and half two-object, from the
    colour–shape combinations of ``split`` (``"train"``, seen in training, or ``"heldout"``, never seen),
    drawn by a seeded generator (the same list for every rule): without replacement, or, where a kind has
    fewer combinations than asked for (16 held-out single-object ones), every combination in turn in a
    fresh random order each round."""
    if n_prompts < 2:
        raise ValueError(f"n_prompts must be >= 2, got {n_prompts}")
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for kind, count in (("single", n_prompts // 2), ("pair", n_prompts - n_prompts // 2)):
        records = caption_combinations(split, kind)
        if count <= len(records):
            order = rng.choice(len(records), size=count, replace=False)
        else:
            rounds = -(-count // len(records))
            order = np.concatenate([rng.permutation(len(records)) for _ in range(rounds)])[:count]
        out.extend(caption_of(records[int(index)]) for index in order)
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
    if method.guider is not None:
        from hopfield_aa.guidance.guiders import denoise_with_guider, peer_guiders

        chunks = [
            denoise_with_guider(
                pipe,
                peer_guiders(method.cfg_scale)[method.guider],
                captions[start : start + batch_size],
                latents[start : start + batch_size],
                num_inference_steps=steps,
            )
            for start in range(0, len(captions), batch_size)
        ]
        return np.concatenate(chunks)
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


@torch.no_grad()
def guidance_magnitude(
    pipe: Any, method: Method, captions: Sequence[str], latents: torch.Tensor, steps: int
) -> float:
    r"""How far ``method`` moves the noise prediction: the mean over steps and samples of

    .. math:: \lVert \hat\varepsilon_t - \varepsilon_c \rVert / \lVert \varepsilon_c \rVert,
              \quad \varepsilon_c = \varepsilon_\theta(x_t, t, c),

    where :math:`\hat\varepsilon_t` is the prediction the method hands the scheduler and
    :math:`\varepsilon_\theta(x_t, t, c)` the stock conditional prediction at the same state (stock attention
    processors, no guider hook). For CFG at scale s this is (s − 1)‖ε_c − ε_∅‖/‖ε_c‖; matching it is the
    calibrated comparison of "Guidance Matters" (arXiv 2602.22570). ``captions`` must fit in one batch.
    """
    from hopfield_aa.reference.pipeline import encode_captions

    unet, scheduler = pipe.unet, pipe.scheduler
    stock = dict(unet.attn_processors)
    cond = encode_captions(pipe.tokenizer, pipe.text_encoder, captions).to(unet.dtype)
    ratios: list[torch.Tensor] = []
    original_step = scheduler.step

    def step(model_output: torch.Tensor, t: Any, sample_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        current = dict(unet.attn_processors)
        unet.set_attn_processor(dict(stock))  # (set_attn_processor consumes the dict it is given)
        try:
            eps = unet(scheduler.scale_model_input(sample_, t), t, encoder_hidden_states=cond).sample
        finally:
            unet.set_attn_processor(current)
        diff = (model_output - eps).flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1).clamp_min(1e-12)
        ratios.append(diff.float().cpu())
        return original_step(model_output, t, sample_, *args, **kwargs)

    scheduler.step = step
    try:
        sample(pipe, method, captions, latents, steps, batch_size=len(captions))
    finally:
        del scheduler.step  # the instance attribute; the class method is back
    return float(torch.cat(ratios).mean())


def matched_cfg_scale(magnitude: float, cfg_magnitudes: dict[float, float]) -> float:
    """The CFG scale whose guidance magnitude equals ``magnitude``, by linear interpolation over the
    measured scales (magnitude 0 at s = 1; extrapolated linearly beyond the largest), rounded to 0.05."""
    points = sorted({1.0: 0.0, **cfg_magnitudes}.items())
    scales = np.array([p[0] for p in points])
    values = np.array([p[1] for p in points])
    if magnitude > values[-1]:
        slope = (values[-1] - values[-2]) / (scales[-1] - scales[-2])
        scale = scales[-1] + (magnitude - values[-1]) / max(slope, 1e-12)
    else:
        scale = float(np.interp(magnitude, values, scales))
    return round(float(scale) * 20) / 20


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
    magnitudes: dict[str, float] = field(default_factory=dict)
    matched: dict[str, str] = field(default_factory=dict)
    n_resamples: int = 500
    split: str = "train"  # the colour-shape combinations the prompts come from
    load_average: tuple[float, float] | None = None  # 1-min load before and after sampling (its times)
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
        """Fréchet distance to the real renders, with a basic bootstrap 95% interval (both sets resampled;
        an interval for the population FD, corrected for the finite-sample bias that resampling shows)."""
        key = ("fd", name)
        if key not in self._cache:
            self._cache[key] = bootstrap_ci(
                self.result(name).features,
                self.real_features,
                statistic=frechet_distance,
                n_resamples=self.n_resamples // 2,
                method="basic",
                minimum=0.0,
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
                    "guidance_magnitude": self.magnitudes.get(m.name),
                    "matched_cfg": self.matched.get(m.name),
                }
            )
        return {
            "model": self.model,
            "n_prompts": self.n_prompts,
            "split": self.split,
            "load_average": self.load_average,
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
    calibration_samples: int = 0,
    split: str = "train",
) -> Evaluation:
    """Sample every method on the same captions and initial noise and score the images.

    With ``calibration_samples > 0``, the guidance magnitude of every method (:func:`guidance_magnitude`
    on the first ``calibration_samples`` captions) is measured, each non-CFG method gets the CFG scale of
    equal magnitude (:func:`matched_cfg_scale`), and CFG is also sampled at every such scale (methods
    ``"CFG s=… (matched)"``), so each rule can be compared with the CFG of the same strength.

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
    calibration_samples : int, default 0
        Samples used to measure guidance magnitudes (0: no calibrated comparison).
    split : {"train", "heldout"}
        Which colour–shape combinations the captions come from (recorded in the report).
    """
    from tqdm.auto import tqdm

    load_before = os.getloadavg()[0]
    latents = initial_noise(pipe, n_prompts, seeds)
    if latents.shape[0] != len(captions):
        raise ValueError(f"captions must hold len(seeds) * n_prompts = {latents.shape[0]} entries")
    real = image_features(real_renders(captions[:n_prompts], real_per_caption))
    methods = list(methods)
    magnitudes: dict[str, float] = {}
    matched: dict[str, str] = {}
    if calibration_samples > 0:
        n = min(calibration_samples, len(captions))
        for method in tqdm(methods, desc="guidance magnitude", disable=not progress):
            if method.family != "none":
                magnitudes[method.name] = guidance_magnitude(pipe, method, captions[:n], latents[:n], steps)
        cfg = {m.cfg_scale: magnitudes[m.name] for m in methods if m.family == "cfg"}
        known = {m.name for m in methods}
        for method in list(methods):
            if method.family in ("none", "cfg") or len(cfg) < 2:
                continue
            scale = matched_cfg_scale(magnitudes[method.name], cfg)
            name = f"CFG s={scale:g}" if f"CFG s={scale:g}" in known else f"CFG s={scale:g} (matched)"
            matched[method.name] = name
            if name not in known:
                extra = Method(name, "cfg_matched", scale, cfg_scale=scale)
                magnitudes[name] = guidance_magnitude(pipe, extra, captions[:n], latents[:n], steps)
                methods.append(extra)
                known.add(name)
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
        magnitudes=magnitudes,
        split=split,
        matched=matched,
        load_average=(load_before, os.getloadavg()[0]),
    )
