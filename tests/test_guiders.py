"""diffusers guider classes driving the reference pipeline: the guider loop reproduces the pipeline's own
CFG, peer guiders act and leave no hook behind, and the SEG workaround is still needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hopfield_aa.guidance.guiders import (
    denoise_with_guider,
    peer_guiders,
    smoothed_energy_guidance,
    unet_layer_config,
)
from hopfield_aa.reference.pipeline import generate, initial_latents, load_pipeline

PROMPTS = ["a small red circle at the top", "a red circle above a blue square"]


@pytest.fixture(scope="module")
def pipe(tiny_reference_folder):
    return load_pipeline(tiny_reference_folder)


def _hooks_left(unet: torch.nn.Module) -> int:
    return sum(len(getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) or {}) for m in unet.modules())


def test_cfg_guider_loop_reproduces_the_pipelines_cfg(pipe) -> None:
    from diffusers.guiders import ClassifierFreeGuidance

    latents = initial_latents(pipe, [0, 1])
    stock = generate(pipe, PROMPTS, latents, num_inference_steps=4, guidance_scale=3.0)
    looped = denoise_with_guider(
        pipe, ClassifierFreeGuidance(guidance_scale=3.0), PROMPTS, latents, num_inference_steps=4
    )
    np.testing.assert_allclose(looped, stock, atol=1e-5)  # batches of one branch vs the stacked batch


@pytest.mark.parametrize("name", ["PAG", "SEG", "APG"])
def test_peer_guiders_change_the_images_and_leave_no_hook(pipe, name) -> None:
    from diffusers.guiders import ClassifierFreeGuidance

    latents = initial_latents(pipe, [0, 1])
    cfg = denoise_with_guider(
        pipe, ClassifierFreeGuidance(guidance_scale=3.0), PROMPTS, latents, num_inference_steps=4
    )
    guider = peer_guiders(3.0)[name]
    if name == "APG":  # its update differs from CFG's only where the threshold or η acts
        guider.adaptive_projected_guidance_rescale = 1e-3
    peer = denoise_with_guider(pipe, guider, PROMPTS, latents, num_inference_steps=4)
    assert np.isfinite(peer).all() and np.abs(peer - cfg).max() > 1e-4
    assert _hooks_left(pipe.unet) == 0


def test_stock_seg_guider_still_equals_cfg_which_is_why_the_workaround_exists(pipe) -> None:
    from diffusers.guiders import ClassifierFreeGuidance, SmoothedEnergyGuidance

    latents = initial_latents(pipe, [0, 1])
    kwargs = {"guidance_scale": 3.0, "seg_guidance_scale": 3.0, "seg_guidance_config": unet_layer_config()}
    cfg = denoise_with_guider(
        pipe, ClassifierFreeGuidance(guidance_scale=3.0), PROMPTS, latents, num_inference_steps=4
    )
    stock = denoise_with_guider(
        pipe, SmoothedEnergyGuidance(**kwargs), PROMPTS, latents, num_inference_steps=4
    )
    fixed = denoise_with_guider(
        pipe, smoothed_energy_guidance(**kwargs), PROMPTS, latents, num_inference_steps=4
    )
    np.testing.assert_allclose(stock, cfg, atol=1e-5)  # fails once diffusers installs the SEG hook itself
    assert np.abs(fixed - cfg).max() > 1e-4


def test_guider_hooks_are_removed_when_the_unet_raises(pipe, monkeypatch) -> None:
    guider = peer_guiders(3.0)["PAG"]
    calls = {"n": 0}
    forward = pipe.unet.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the perturbed branch of the first step
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        denoise_with_guider(pipe, guider, PROMPTS, initial_latents(pipe, [0, 1]), num_inference_steps=2)
    assert _hooks_left(pipe.unet) == 0


def test_denoise_with_guider_names_bad_arguments(pipe) -> None:
    latents = initial_latents(pipe, [0])
    with pytest.raises(TypeError, match="guider"):
        denoise_with_guider(pipe, object(), PROMPTS[:1], latents)
    with pytest.raises(ValueError, match="latents"):
        denoise_with_guider(pipe, peer_guiders(3.0)["APG"], PROMPTS, latents)
    with pytest.raises(ValueError, match="layers"):
        unet_layer_config("down")
