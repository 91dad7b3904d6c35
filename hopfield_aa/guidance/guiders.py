"""diffusers guider classes (``diffusers.guiders``, diffusers ≥ 0.35) on classic Stable Diffusion pipelines.

Modular pipelines run a guider inside their denoising loop; diffusers ships no modular pipeline for
SD 1.x-shaped UNets, so :func:`denoise_with_guider` is that loop for a ``StableDiffusionPipeline``: per step
the guider splits the text conditions into batches (conditional, unconditional, perturbed, ...), installs
its hooks around the UNet call of each batch (``prepare_models`` / ``cleanup_models``), and combines the
predictions. Any guider works: ``ClassifierFreeGuidance``, ``PerturbedAttentionGuidance``,
``SmoothedEnergyGuidance``, ``AdaptiveProjectedGuidance``, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def unet_layer_config(layers: str = "mid", **overrides: Any) -> dict[str, Any]:
    """A ``LayerSkipConfig``-style dict naming self-attention blocks of a ``UNet2DConditionModel``, as PAG
    and SEG guiders need (their ``"auto"`` layer lookup only works on transformer models).

    ``layers="mid"`` is the mid block's first transformer block, the layer PAG's authors use for SD 1.5.
    """
    if layers != "mid":
        raise ValueError(f"layers must be 'mid', got {layers!r}")
    return {"indices": [0], "fqn": "mid_block.attentions.0.transformer_blocks", **overrides}


def smoothed_energy_guidance(**kwargs: Any) -> Any:
    """``diffusers.guiders.SmoothedEnergyGuidance`` whose blur hook is actually installed.

    In diffusers 0.42 ``SmoothedEnergyGuidance.prepare_models`` never advances the prepared-batch counter
    that decides which batch is the perturbed one, so the hook is never installed and the guider equals
    CFG (``tests/test_guiders.py`` checks this and will say when a release fixes it). This subclass
    advances the counter first, as the PAG and skip-layer guiders do; everything else is the stock class.
    """
    from diffusers.guiders import SmoothedEnergyGuidance

    class _SmoothedEnergyGuidance(SmoothedEnergyGuidance):  # type: ignore[misc]
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
    from diffusers.guiders.guider_utils import BaseGuidance

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
        batches = guider.prepare_inputs({"encoder_hidden_states": (cond, uncond)})
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


__all__ = ["denoise_with_guider", "peer_guiders", "smoothed_energy_guidance", "unet_layer_config"]
