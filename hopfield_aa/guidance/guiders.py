"""diffusers guider classes (``diffusers.guiders``, diffusers ≥ 0.35) on classic Stable Diffusion pipelines.

Modular pipelines run a guider inside their denoising loop; diffusers ships no modular pipeline for
SD 1.x-shaped UNets, so :func:`denoise_with_guider` is that loop for a ``StableDiffusionPipeline``: per step
the guider splits the text conditions into batches (conditional, unconditional, perturbed, ...), installs
its hooks around the UNet call of each batch (``prepare_models`` / ``cleanup_models``), and combines the
predictions. Any guider works: ``ClassifierFreeGuidance``, ``PerturbedAttentionGuidance``,
``SmoothedEnergyGuidance``, ``AdaptiveProjectedGuidance``, ..., and :class:`GAGGuidance`, which brings the
attention rules of this package into the same protocol (config saved as ``guider_config.json``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance

from hopfield_aa._arrays import check_scalar
from hopfield_aa.guidance.api import GuidanceConfig, GuidanceHandle


def unet_layer_config(layers: str = "mid", **overrides: Any) -> dict[str, Any]:
    """A ``LayerSkipConfig``-style dict naming self-attention blocks of a ``UNet2DConditionModel``, as PAG
    and SEG guiders need (their ``"auto"`` layer lookup only works on transformer models).

    ``layers="mid"`` is the mid block's first transformer block, the layer PAG's authors use for SD 1.5.
    """
    if layers != "mid":
        raise ValueError(f"layers must be 'mid', got {layers!r}")
    return {"indices": [0], "fqn": "mid_block.attentions.0.transformer_blocks", **overrides}


class GAGGuidance(BaseGuidance):
    r"""Geometry-Aware Attention Guidance (and its sibling rules) as a diffusers guider, composable with CFG.

    Per denoising step the guider asks for the conditional prediction and, when CFG is on
    (``guidance_scale > 1``), the unconditional one. Around the UNet call of each batch it applies to
    (``apply_to="both"``: both; ``"cond"``: the conditional only) it installs the attention-guidance
    processors of :func:`~hopfield_aa.guidance.enable_gag` and removes them right after, so the stock
    processors are in place between calls (and after a call that raises, when the loop calls
    ``cleanup_models`` in a ``finally``, as :func:`denoise_with_guider` does). The predictions are combined
    by CFG, ``ε̂ = ε_∅ + s (ε_c − ε_∅)``; with ``guidance_scale = 1`` only the guided conditional branch runs.

    Parameters
    ----------
    guidance_scale : float, default 7.5
        CFG scale s (1: no CFG).
    gag_scale : float, default 1.0
        λ of the attention rule (≥ 0).
    rule : {"gag", "extrapolate", "ladder"} or a registered rule, default "gag"
    zeta, eta : float
        GAG's damping of r⊥ (in [0, 1]) and cap of ‖r∥‖ (≥ 0, ``inf``: none); ignored by other rules.
    alpha : float, default 1.5
        α of the sparse retrieval (two-retrieval rules).
    layers : list of str, optional
        Layer names or patterns (default: every cross-attention layer).
    apply_to : {"both", "cond"}, default "both"
    guidance_rescale, use_original_formulation, start, stop, enabled
        As in ``diffusers.guiders.ClassifierFreeGuidance``.

    Examples
    --------
    >>> guider = GAGGuidance(guidance_scale=5.0, gag_scale=1.0)
    >>> guider.num_conditions  # conditional and unconditional batches
    2
    """

    _input_predictions = ["pred_cond", "pred_uncond"]  # type: ignore[assignment]  # noqa: RUF012

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        gag_scale: float = 1.0,
        rule: str = "gag",
        zeta: float = 0.0,
        eta: float = math.inf,
        alpha: float = 1.5,
        layers: list[str] | None = None,
        apply_to: str = "both",
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ) -> None:
        super().__init__(start, stop, enabled)
        if apply_to not in ("both", "cond"):
            raise ValueError(f"apply_to must be 'both' or 'cond', got {apply_to!r}")
        self.guidance_scale = check_scalar(guidance_scale, "guidance_scale")
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self.apply_to = apply_to
        options = {"zeta": zeta, "eta": eta} if rule == "gag" else {}
        self.attention = GuidanceConfig(
            rule=rule,
            scale=gag_scale,
            alphas=None if rule == "ladder" else (1.0, alpha),
            options=options,
            layers=None if layers is None else tuple(layers),
            cfg_batch=False,
        )
        self._handle: GuidanceHandle | None = None

    # --- the guider protocol -------------------------------------------------------------------------
    def prepare_inputs(self, data: Any) -> list[Any]:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch(data, i, name)
            for i, name in zip(indices, self._input_predictions, strict=False)
        ]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._handle is not None:  # a previous call did not clean up: never stack two installs
            self._handle.disable()
        if self.is_conditional or self.apply_to == "both":
            self._handle = GuidanceHandle(denoiser, self.attention).install()

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._handle is not None:
            self._handle.disable()
            self._handle = None

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> Any:
        from diffusers.guiders.guider_utils import GuiderOutput, rescale_noise_cfg

        if not self._is_cfg_enabled() or pred_uncond is None:
            pred = pred_cond
        else:
            base = pred_cond if self.use_original_formulation else pred_uncond
            pred = base + self.guidance_scale * (pred_cond - pred_uncond)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_cfg_enabled() else 1

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is not None:
            first = int(self._start * self._num_inference_steps)
            last = int(self._stop * self._num_inference_steps)
            if not first <= self._step < last:
                return False
        neutral = 0.0 if self.use_original_formulation else 1.0
        return not math.isclose(self.guidance_scale, neutral)


def smoothed_energy_guidance(**kwargs: Any) -> Any:
    """``diffusers.guiders.SmoothedEnergyGuidance`` whose blur hook is actually installed.

    In diffusers 0.42 ``SmoothedEnergyGuidance.prepare_models`` never advances the prepared-batch counter
    that decides which batch is the perturbed one, so the hook is never installed and the guider equals
    CFG (``tests/test_guiders.py`` checks this and will say when a release fixes it). This subclass
    advances the counter first, as the PAG and skip-layer guiders do; everything else is the stock class.
    """
    from diffusers.guiders import SmoothedEnergyGuidance

    class _SmoothedEnergyGuidance(SmoothedEnergyGuidance):
        def prepare_models(self, denoiser: torch.nn.Module) -> None:
            self._count_prepared += 1
            super().prepare_models(denoiser)

    return _SmoothedEnergyGuidance(**kwargs)


def peer_guiders(guidance_scale: float) -> dict[str, Any]:
    """The attention-space and projection peers diffusers ships, at their authors' usual settings, on top
    of CFG at ``guidance_scale``: PAG (scale 3 on the mid block's self-attention, every step), SEG (scale 3,
    infinite blur of the mid block's queries) and APG (η = 0: the CFG update's part parallel to the
    conditional prediction dropped, norm threshold 15)."""
    from diffusers.guiders import AdaptiveProjectedGuidance, PerturbedAttentionGuidance

    return {
        "PAG": PerturbedAttentionGuidance(
            guidance_scale=guidance_scale,
            perturbed_guidance_scale=3.0,
            perturbed_guidance_start=0.0,
            perturbed_guidance_stop=1.0,
            perturbed_guidance_config=unet_layer_config(
                skip_attention=False, skip_attention_scores=True, skip_ff=False
            ),
        ),
        "SEG": smoothed_energy_guidance(
            guidance_scale=guidance_scale, seg_guidance_scale=3.0, seg_guidance_config=unet_layer_config()
        ),
        "APG": AdaptiveProjectedGuidance(
            guidance_scale=guidance_scale, eta=0.0, adaptive_projected_guidance_rescale=15.0
        ),
    }


@torch.no_grad()
def denoise_with_guider(
    pipe: Any,
    guider: Any,
    prompts: Sequence[str],
    latents: torch.Tensor,
    *,
    num_inference_steps: int = 25,
) -> np.ndarray:
    """Sample ``pipe`` (a ``StableDiffusionPipeline``) with ``guider`` driving every denoising step.

    Parameters
    ----------
    pipe : diffusers.StableDiffusionPipeline
    guider : diffusers.guiders.BaseGuidance
    prompts : sequence of str, one per row of ``latents``
    latents : torch.Tensor ``(B, C, h, w)``
        Initial noise (scaled by the scheduler's ``init_noise_sigma`` here, as the pipeline does).
    num_inference_steps : int, default 25

    Returns
    -------
    np.ndarray ``(B, H, W, 3)`` in [0, 1]

    Notes
    -----
    Each step: ``guider.set_state``; ``guider.prepare_inputs({"encoder_hidden_states": (cond, uncond)})``
    gives one batch per prediction the guider needs; around each batch's UNet call the guider installs and
    removes its hooks; ``guider(batches).pred`` is the combined noise prediction the scheduler steps with.
    Hooks are removed even when the UNet raises.
    """
    if not isinstance(guider, BaseGuidance):
        raise TypeError(f"guider must be a diffusers.guiders.BaseGuidance, got {type(guider).__name__}")
    if len(prompts) != latents.shape[0]:
        raise ValueError(f"latents must have one row per prompt ({len(prompts)}), got {latents.shape[0]}")
    if int(num_inference_steps) < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    device, dtype = pipe.device, pipe.unet.dtype
    cond, uncond = pipe.encode_prompt(
        list(prompts), device, 1, do_classifier_free_guidance=True, negative_prompt=[""] * len(prompts)
    )
    scheduler = pipe.scheduler
    scheduler.set_timesteps(int(num_inference_steps), device=device)
    sample = latents.to(device, dtype) * scheduler.init_noise_sigma
    for step, t in enumerate(scheduler.timesteps):
        guider.set_state(step=step, num_inference_steps=int(num_inference_steps), timestep=t)
        batches: list[Any] = guider.prepare_inputs({"encoder_hidden_states": (cond, uncond)})  # type: ignore[arg-type]
        model_input = scheduler.scale_model_input(sample, t)
        for batch in batches:
            guider.prepare_models(pipe.unet)
            try:
                batch.noise_pred = pipe.unet(
                    model_input, t, encoder_hidden_states=batch.encoder_hidden_states, return_dict=False
                )[0]
            finally:
                guider.cleanup_models(pipe.unet)
        noise_pred = guider(batches).pred
        sample = scheduler.step(noise_pred, t, sample, return_dict=False)[0]
    images = pipe.vae.decode(sample / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


__all__ = [
    "GAGGuidance",
    "denoise_with_guider",
    "peer_guiders",
    "smoothed_energy_guidance",
    "unet_layer_config",
]
