"""Turning attention-space guidance on and off in a diffusers pipeline or model with one call: which rule,
which layers, which steps, which half of a CFG batch; the original processors are restored exactly.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from hopfield_aa._arrays import check_alpha, check_scalar
from hopfield_aa.adapters import resolve_model
from hopfield_aa.guidance.attention import ALL_ROWS
from hopfield_aa.guidance.processors import GAGAttnProcessor, GAGFluxAttnProcessor, GAGJointAttnProcessor
from hopfield_aa.guidance.rules import Rule, check_ladder, get_rule, row_rule

# Stock processor class -> guidance class. Matching is by exact type: a subclass may compute differently.
GUIDANCE_PROCESSORS: dict[type, type] = {
    AttnProcessor2_0: GAGAttnProcessor,
    JointAttnProcessor2_0: GAGJointAttnProcessor,
    FluxAttnProcessor: GAGFluxAttnProcessor,
}

DEFAULT_KINDS = ("cross", "joint")
"""Layer kinds guided when ``layers`` is not given: every cross-attention and joint-attention layer."""

APPLY_TO = ("both", "cond")

_GUIDED = (GAGAttnProcessor, GAGJointAttnProcessor, GAGFluxAttnProcessor)

_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, GuidanceHandle] = weakref.WeakKeyDictionary()


def attention_layers(pipe_or_model: Any) -> dict[str, str]:
    """The attention layers of a model (or a pipeline's denoiser) and their kind.

    Returns
    -------
    dict
        Layer name (as in ``model.attn_processors`` without ``.processor``) -> ``"cross"`` (UNet
        cross-attention), ``"self"`` (UNet self-attention), ``"joint"`` (SD3/FLUX joint attention with text
        tokens) or ``"unsupported"`` (a processor guidance cannot replace).

    Examples
    --------
    >>> from diffusers import UNet2DConditionModel
    >>> unet = UNet2DConditionModel(block_out_channels=(8,), down_block_types=("CrossAttnDownBlock2D",),
    ...     up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, cross_attention_dim=8,
    ...     attention_head_dim=2, norm_num_groups=4, sample_size=8)
    >>> sorted(set(attention_layers(unet).values()))
    ['cross', 'self']
    """
    model = resolve_model(pipe_or_model)
    layers = {}
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        if isinstance(processor, _GUIDED):
            processor = processor.original
        layers[name] = _layer_kind(module, processor)
    return layers


def _layer_kind(module: torch.nn.Module, processor: Any) -> str:
    kind = type(processor)
    if kind is AttnProcessor2_0:
        return "cross" if getattr(module, "is_cross_attention", False) else "self"
    if kind is JointAttnProcessor2_0:
        return "joint" if getattr(module, "added_kv_proj_dim", None) is not None else "unsupported"
    if kind is FluxAttnProcessor:
        return "joint"  # double-stream blocks take the text as encoder states, single-stream ones in front
    return "unsupported"


_GuidedMarker = (GAGAttnProcessor, GAGJointAttnProcessor, GAGFluxAttnProcessor)


def _window(value: Sequence[float] | None, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (start, end) of numbers or None, got {value!r}")
    start, end = (check_scalar(v, name) for v in value)
    if not start <= end:
        raise ValueError(f"{name} must have start <= end, got {value!r}")
    return start, end


@dataclass(frozen=True)
class GuidanceConfig:
    """What guidance does and where: a rule with its options, and the layer/step/batch selection.

    Parameters
    ----------
    rule : str, default "gag"
        A name in :data:`~hopfield_aa.guidance.rules.RULES` (``"gag"``, ``"extrapolate"``, ``"ladder"``).
    scale : float, optional
        λ ≥ 0; the rule's default when omitted (gag: 1.0; extrapolate and ladder: 2.0, PLADIS' default).
    alphas : tuple of float, optional
        The α ladder, dense first: ``(1, α)`` for two-retrieval rules (default α = 1.5), and
        ``(1, 1.25, 1.5, 2)`` for ``"ladder"``.
    options : mapping
        The rule's keyword options (gag: ``zeta=0``, ``eta=inf``, ``reference="sparse"``; ladder:
        ``regularization=0``); the rule's defaults fill in the rest.
    layers : tuple of str, optional
        Layer names or fnmatch patterns (names as in :func:`attention_layers`); default: every
        cross-attention and joint-attention layer. A pattern may also select UNet self-attention layers.
    timesteps : (float, float), optional
        Guide only while ``start <= t <= end``, ``t`` the timestep the denoiser receives.
    steps : (float, float), optional
        Guide only while ``start <= i / N < end``: ``i`` the denoising step, ``N`` the scheduler's number
        of steps (needs a scheduler: a pipeline, or ``scheduler=`` in :func:`enable_gag`).
    apply_to : {"both", "cond"}, default "both"
        Both halves of a CFG batch, or only the conditional half (the diffusers convention: the batch is
        ``[uncond, cond]``). A batch that is not a CFG batch is all conditional.
    cfg_batch : bool, optional
        Whether the denoiser's batch is a ``[uncond, cond]`` CFG batch; None (default) detects it at each
        call: the batch is a CFG batch when its two halves of ``sample`` are identical, as diffusers
        pipelines build it (``torch.cat([latents] * 2)``).
    layer_alphas : mapping, optional
        The sparse retrieval's α per layer: layer name or fnmatch pattern → a float α ≥ 1, or one α per
        head (a sequence, NumPy array or 1-d tensor of the layer's head count). The first matching
        pattern wins; other layers use ``alphas[1]``. Rules with one sparse retrieval only (gag,
        extrapolate); each pattern must match a guided layer (checked when guidance is enabled).
    compile : bool, default False
        Opt-in: UNet guided attention (scores, both normalisations, both retrievals and the rule) runs as
        one ``torch.compile``'d function of its tensor path. Its first call at a new shape compiles (tens
        of seconds on CPU; inductor's on-disk cache makes later processes fast); it agrees with the eager
        path to float32 rounding. If compilation fails, a warning is issued once and the eager path runs.
        On CPU in float32 the default eager call, one fused native kernel (:mod:`.fused`), is faster
        (``analysis/results/guidance_overhead.md``). Joint (SD3, FLUX) attention always runs eagerly.
    """

    rule: str = "gag"
    scale: float | None = None
    alphas: tuple[float, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    layers: tuple[str, ...] | None = None
    timesteps: tuple[float, float] | None = None
    steps: tuple[float, float] | None = None
    apply_to: str = "both"
    cfg_batch: bool | None = None
    layer_alphas: Mapping[str, Any] | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        rule = get_rule(self.rule)
        unknown = sorted(set(self.options) - set(rule.options))
        if unknown:
            raise ValueError(
                f"rule {self.rule!r} has no option(s) {unknown}; its options are {sorted(rule.options)}"
            )
        options = {**rule.options, **dict(self.options)}
        if rule.check is not None:
            rule.check(options)
        set_ = object.__setattr__  # the dataclass is frozen: resolve the defaults once, here
        set_(self, "options", options)
        set_(
            self,
            "scale",
            rule.scale if self.scale is None else check_scalar(self.scale, "scale", minimum=0.0),
        )
        if math.isinf(self.scale):  # type: ignore[arg-type]
            raise ValueError("scale must be finite")
        set_(self, "alphas", rule.alphas if self.alphas is None else check_ladder(self.alphas, rule.rungs))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if not layers or not all(isinstance(p, str) for p in layers):
                raise TypeError(
                    f"layers must be a non-empty sequence of names or patterns, got {self.layers!r}"
                )
            set_(self, "layers", layers)
        set_(self, "timesteps", _window(self.timesteps, "timesteps"))
        set_(self, "steps", _window(self.steps, "steps"))
        if self.apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}, got {self.apply_to!r}")
        if self.cfg_batch is not None and not isinstance(self.cfg_batch, bool):
            raise TypeError(f"cfg_batch must be True, False or None, got {self.cfg_batch!r}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be True or False, got {self.compile!r}")
        if self.layer_alphas is not None:
            if len(self.alphas) != 2:  # type: ignore[arg-type]
                raise ValueError(
                    f"layer_alphas sets the one sparse retrieval's α; rule {self.rule!r} has the ladder "
                    f"{self.alphas} (use alphas=)"
                )
            set_(self, "layer_alphas", _check_layer_alphas(self.layer_alphas))

    @property
    def rule_spec(self) -> Rule:
        """The registered :class:`~hopfield_aa.guidance.rules.Rule`."""
        return get_rule(self.rule)

    def label(self) -> str:
        """A short readable description, e.g. ``gag(λ=1, α=1.5, zeta=0, eta=inf)``."""
        alphas = ",".join(f"{a:g}" for a in self.alphas[1:])  # type: ignore[index]
        opts = "".join(
            f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}" for k, v in self.options.items()
        )
        if self.layer_alphas:
            alphas += " (per layer: " + ", ".join(self.layer_alphas) + ")"
        return f"{self.rule}(λ={self.scale:g}, α={alphas}{opts})"


def _check_layer_alphas(value: object) -> dict[str, float | tuple[float, ...]]:
    """``layer_alphas`` validated: pattern → float α, or a tuple of α per head (all ≥ 1, finite)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"layer_alphas must be a mapping layer pattern -> alpha, got {type(value).__name__}")
    out: dict[str, float | tuple[float, ...]] = {}
    for pattern, alpha in value.items():
        if not isinstance(pattern, str):
            raise TypeError(f"layer_alphas keys must be layer names or patterns, got {pattern!r}")
        name = f"layer_alphas[{pattern!r}]"
        if isinstance(alpha, (torch.Tensor, np.ndarray)) and alpha.ndim == 0:
            alpha = float(alpha)
        if isinstance(alpha, (torch.Tensor, np.ndarray, Sequence)) and not isinstance(alpha, (str, bytes)):
            raw = alpha.detach().cpu() if isinstance(alpha, torch.Tensor) else alpha
            heads = torch.as_tensor(np.asarray(raw))
            if heads.ndim != 1 or heads.numel() == 0 or heads.dtype == torch.bool:
                raise ValueError(f"{name} must be a float or a non-empty 1-d sequence of α per head")
            try:
                out[pattern] = tuple(check_alpha(float(a)) for a in heads.tolist())
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name}: {exc}") from None
        else:
            try:
                out[pattern] = check_alpha(alpha)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name}: {exc}") from None
    return out


class GuidanceHandle:
    """Guidance installed on one denoiser: the session the processors read, and how to undo it.

    Created by :func:`enable_gag`; :meth:`disable` (or leaving the ``with`` block) restores the exact
    original processor objects and removes the step hook.

    Attributes
    ----------
    config : GuidanceConfig
    model : torch.nn.Module
        The denoiser.
    layers : list of str
        The guided layers.
    alphas : tuple of float
        The α ladder the processors compute.
    active : bool
        Whether the current denoiser call is inside the step/timestep window.
    text_tokens : int or None
        The current call's text length (FLUX single-stream blocks read it).
    row_rule : RowRule or None
        The rule's row form where the fused kernel computes it (:func:`.rules.row_rule`).
    """

    def __init__(self, model: torch.nn.Module, config: GuidanceConfig, scheduler: Any = None) -> None:
        self.model = model
        self.config = config
        self.scheduler = scheduler
        self.alphas: tuple[float, ...] = tuple(config.alphas or ())
        self._layer_alphas: dict[str, tuple[float | torch.Tensor, ...]] = {}
        self._function = config.rule_spec.function
        self._scale = float(config.scale)  # type: ignore[arg-type]
        self._options = dict(config.options)
        self.row_rule = row_rule(self._function, self._scale, self._options)
        self.active = True
        self.text_tokens: int | None = None
        self.compile = config.compile
        self._cfg = bool(config.cfg_batch)
        self._step = -1
        self._last_timestep: float | None = None
        self._originals: dict[str, tuple[torch.nn.Module, Any]] = {}
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._signature = inspect.signature(model.forward)
        self.layers: list[str] = []

    # ------------------------------------------------------------------------ read by the processors
    def alphas_for(self, layer: str) -> tuple[float | torch.Tensor, ...]:
        """The α ladder of ``layer``: its ``layer_alphas`` α (per head: (heads, 1, 1)) or ``alphas``."""
        return self._layer_alphas.get(layer, self.alphas)

    def combine(self, retrievals: Sequence[torch.Tensor]) -> torch.Tensor:
        """The configured rule: ``rule(retrievals, scale, **options)``."""
        return self._function(retrievals, self._scale, **self._options)

    def rows(self, batch_size: int) -> slice:
        """All rows, or the conditional half ``[B/2, B)`` of a CFG batch when ``apply_to="cond"``."""
        if self.config.apply_to == "both" or not self._cfg or batch_size % 2:
            return ALL_ROWS
        return slice(batch_size // 2, batch_size)

    # ------------------------------------------------------------------------------ install / undo
    def install(self) -> GuidanceHandle:
        """Replace the selected layers' processors and register the step hook (called by enable_gag)."""
        if self.model in _ACTIVE:
            raise RuntimeError(
                f"guidance is already enabled on this {type(self.model).__name__}; call disable_gag first"
            )
        if self.config.steps is not None and self.scheduler is None:
            raise ValueError("steps= needs a scheduler: pass a pipeline, or scheduler= with a bare model")
        targets = _select(self.model, self.config.layers)
        for name, module in targets:
            original = module.processor
            guided = GUIDANCE_PROCESSORS[type(original)](name, self, original)
            for attr in ("_attention_backend", "_parallel_config"):
                if attr in vars(original):
                    setattr(guided, attr, getattr(original, attr))
            self._originals[name] = (module, original)
            cast(Any, module).set_processor(guided)
        self.layers = [name for name, _ in targets]
        try:
            self._layer_alphas = _resolve_layer_alphas(self.config, targets)
        except ValueError:
            self.disable()
            raise
        self._hook = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        _ACTIVE[self.model] = self
        return self

    def disable(self) -> None:
        """Restore the original processor objects and remove the hook (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for module, original in self._originals.values():
            cast(Any, module).set_processor(original)
        self._originals.clear()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    @property
    def enabled(self) -> bool:
        """Whether the guidance processors are installed."""
        return self._hook is not None

    def __enter__(self) -> GuidanceHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disable()

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"GuidanceHandle({self.config.label()}, {len(self.layers)} layers, {state})"

    # ------------------------------------------------------------------------------------- the hook
    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        text = bound.get("encoder_hidden_states")
        self.text_tokens = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else None
        if self.config.apply_to == "cond" and self.config.cfg_batch is None:
            sample = next(iter(bound.values()))
            half = sample.shape[0] // 2
            self._cfg = sample.shape[0] % 2 == 0 and half > 0 and torch.equal(sample[:half], sample[half:])
        if self.config.timesteps is None and self.config.steps is None:
            return
        value = bound.get("timestep")
        if value is None:
            raise ValueError("a timestep or steps window needs the denoiser's timestep argument")
        t = float(value.flatten()[0]) if isinstance(value, torch.Tensor) else float(value)
        # a new sampling run starts when the timestep goes up; a repeated timestep is the same step
        if self._last_timestep is None or t > self._last_timestep:
            self._step = 0
        elif t < self._last_timestep:
            self._step += 1
        self._last_timestep = t
        active = True
        if self.config.timesteps is not None:
            start, end = self.config.timesteps
            active = start <= t <= end
        if self.config.steps is not None:
            start, end = self.config.steps
            n_steps = max(len(self.scheduler.timesteps), 1)
            fraction = self._step / n_steps
            active = active and start <= fraction < end
        self.active = active


def _select(model: torch.nn.Module, patterns: tuple[str, ...] | None) -> list[tuple[str, torch.nn.Module]]:
    kinds = attention_layers(model)
    modules = dict(model.named_modules())
    if patterns is None:
        chosen = [name for name, kind in kinds.items() if kind in DEFAULT_KINDS]
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no cross-attention or joint-attention layer to guide"
            )
        return [(name, modules[name]) for name in chosen]
    chosen = []
    for pattern in patterns:
        matched = [
            name
            for name in kinds
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(f"{name}.processor", pattern)
        ]
        if not matched:
            raise ValueError(
                f"layers pattern {pattern!r} matches no attention layer of {type(model).__name__}"
            )
        unsupported = [name for name in matched if kinds[name] == "unsupported"]
        if unsupported:
            raise ValueError(
                f"layers pattern {pattern!r} selects layers whose processor guidance cannot replace: "
                f"{unsupported[:3]} (supported: {', '.join(t.__name__ for t in GUIDANCE_PROCESSORS)})"
            )
        chosen.extend(name for name in matched if name not in chosen)
    return [(name, modules[name]) for name in chosen]


def _resolve_layer_alphas(
    config: GuidanceConfig, targets: list[tuple[str, torch.nn.Module]]
) -> dict[str, tuple[float | torch.Tensor, ...]]:
    """The α ladder of each guided layer that ``config.layer_alphas`` sets (first matching pattern)."""
    if not config.layer_alphas:
        return {}
    resolved: dict[str, tuple[float | torch.Tensor, ...]] = {}
    used: set[str] = set()
    for name, module in targets:
        for pattern, alpha in config.layer_alphas.items():
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(f"{name}.processor", pattern):
                used.add(pattern)
                if isinstance(alpha, tuple):
                    heads = getattr(module, "heads", None)
                    if heads is not None and len(alpha) != heads:
                        raise ValueError(
                            f"layer_alphas[{pattern!r}] has {len(alpha)} α values but layer {name!r} has "
                            f"{heads} heads"
                        )
                    resolved[name] = (1.0, torch.tensor(alpha, dtype=torch.float32).view(-1, 1, 1))
                else:
                    resolved[name] = (1.0, alpha)
                break
    unused = [p for p in config.layer_alphas if p not in used]
    if unused:
        guided = [n for n, _ in targets]
        raise ValueError(f"layer_alphas pattern(s) {unused} match no guided layer (guided: {guided[:4]}...)")
    return resolved


def enable_gag(
    pipe_or_model: Any,
    rule: str = "gag",
    *,
    scale: float | None = None,
    alpha: float | Mapping[str, Any] | Sequence[float] | torch.Tensor | None = None,
    alphas: Sequence[float] | None = None,
    layers: str | Sequence[str] | None = None,
    timesteps: Sequence[float] | None = None,
    steps: Sequence[float] | None = None,
    apply_to: str = "both",
    cfg_batch: bool | None = None,
    compile: bool = False,
    scheduler: Any = None,
    **options: Any,
) -> GuidanceHandle:
    r"""Turn attention-space guidance on in a diffusers pipeline (or a bare UNet / MMDiT model).

    Every selected attention layer computes its dense and sparse retrievals from one score matrix,
    ``D = softmax(βQKᵀ) V`` and ``S = entmax_α(βQKᵀ) V``, and outputs the rule of them per head and query
    token; with the defaults (the paper's) that is GAG,

    .. math:: G = S + \lambda\,\mathrm{clip}_\eta(r_\parallel) + \lambda\zeta\, r_\perp,
              \qquad r = S - D,\ \zeta = 0,\ \eta = \infty,\ \alpha = 1.5,

    with ``r_∥`` the part of ``r`` along the sparse retrieval, on every cross-attention layer (image
    queries → text keys in joint attention; image self-attention and the text stream are untouched), on
    both halves of a CFG batch. Half-precision models compute the rule in float32.

    Parameters
    ----------
    pipe_or_model : diffusers pipeline or model
        A pipeline with ``unet`` or ``transformer`` (its ``scheduler`` is used for ``steps``), or the
        denoiser itself.
    rule : str, default "gag"
        ``"gag"``, ``"extrapolate"`` (PLADIS-style ``D + λ(S − D)``), ``"ladder"`` (Anderson-mixed α-ladder),
        or any registered rule.
    scale : float, optional
        λ ≥ 0, finite (default: the rule's, 1.0 for gag, 2.0 for extrapolate and ladder). λ = 0 leaves
        the stock attention; a negative λ would push away from the sparse retrieval and is rejected.
    alpha : float, mapping, sequence or tensor, optional
        The sparse retrieval's α (two-retrieval rules), default 1.5. A float is shorthand for
        ``alphas=(1, alpha)``; a mapping layer pattern → α (a float, or one α per head) is
        :class:`GuidanceConfig`'s ``layer_alphas`` (e.g. a fitted α per layer); a sequence or 1-d tensor
        is one α per head on every guided layer.
    alphas : sequence of float, optional
        The α ladder, dense first (the ladder rule's default is ``(1, 1.25, 1.5, 2)``).
    layers, timesteps, steps, apply_to, cfg_batch, compile
        See :class:`GuidanceConfig` (``compile=True``: the opt-in ``torch.compile``'d guided attention).
    scheduler : diffusers scheduler, optional
        For ``steps`` with a bare model (a pipeline's own scheduler is used otherwise).
    **options
        The rule's options, e.g. ``zeta=1.0, eta=0.5, reference="dense"`` for gag (ζ in [0, 1], η ≥ 0,
        ``inf`` for no cap).

    Returns
    -------
    GuidanceHandle
        ``handle.disable()`` (or :func:`disable_gag`) restores the original processors.

    Raises
    ------
    ValueError
        On an unknown rule or option, an invalid value (λ < 0, ζ outside [0, 1], η < 0, ...), or a layer
        pattern that matches nothing.
    RuntimeError
        If guidance is already enabled on the model (call :func:`disable_gag` first).

    Examples
    --------
    >>> handle = enable_gag(pipe, scale=1.0)  # doctest: +SKIP
    >>> images = pipe(prompts, num_inference_steps=20, guidance_scale=1.0)  # doctest: +SKIP
    >>> disable_gag(pipe)  # doctest: +SKIP
    """
    layer_alphas: Mapping[str, Any] | None = None
    if alpha is not None:
        if alphas is not None:
            raise ValueError("pass alpha or alphas, not both")
        if isinstance(alpha, Mapping):
            layer_alphas = alpha
        elif isinstance(alpha, (torch.Tensor, np.ndarray, Sequence)) and not isinstance(alpha, (str, bytes)):
            layer_alphas = {"*": alpha}
        else:
            alphas = (1.0, check_scalar(alpha, "alpha"))
    config = GuidanceConfig(
        rule=rule,
        scale=scale,
        alphas=None if alphas is None else tuple(alphas),
        options=options,
        layers=None if layers is None else ((layers,) if isinstance(layers, str) else tuple(layers)),
        timesteps=None if timesteps is None else tuple(timesteps),  # type: ignore[arg-type]
        steps=None if steps is None else tuple(steps),  # type: ignore[arg-type]
        apply_to=apply_to,
        cfg_batch=cfg_batch,
        layer_alphas=layer_alphas,
        compile=compile,
    )
    return enable_config(pipe_or_model, config, scheduler=scheduler)


def enable_config(pipe_or_model: Any, config: GuidanceConfig, *, scheduler: Any = None) -> GuidanceHandle:
    """:func:`enable_gag` from a ready :class:`GuidanceConfig`."""
    model = resolve_model(pipe_or_model)
    if scheduler is None:
        scheduler = getattr(pipe_or_model, "scheduler", None)
    return GuidanceHandle(model, config, scheduler).install()


def disable_gag(pipe_or_model: Any) -> bool:
    """Turn guidance off: restore the exact original processor objects. Returns whether it was on.

    Examples
    --------
    >>> disable_gag(pipe)  # doctest: +SKIP
    True
    """
    handle = _ACTIVE.get(resolve_model(pipe_or_model))
    if handle is None:
        return False
    handle.disable()
    return True


def guidance_handle(pipe_or_model: Any) -> GuidanceHandle | None:
    """The handle of the guidance enabled on a pipeline or model, or None."""
    return _ACTIVE.get(resolve_model(pipe_or_model))


@contextmanager
def gag_guidance(pipe_or_model: Any, rule: str = "gag", **kwargs: Any) -> Iterator[GuidanceHandle]:
    """Guidance for the duration of a ``with`` block; takes :func:`enable_gag`'s arguments.

    Examples
    --------
    >>> with gag_guidance(pipe, scale=1.0, zeta=0.0):  # doctest: +SKIP
    ...     images = pipe(prompts, num_inference_steps=20)
    """
    handle = enable_gag(pipe_or_model, rule, **kwargs)
    try:
        yield handle
    finally:
        handle.disable()
