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


# --- GAGGuidance ----------------------------------------------------------------------------------------


def _stock_types(unet: torch.nn.Module) -> set[str]:
    return {type(p).__name__ for p in unet.attn_processors.values()}


def test_gag_guider_without_cfg_gives_the_images_of_enable_gag_bit_for_bit(pipe) -> None:
    from hopfield_aa.guidance import gag_guidance
    from hopfield_aa.guidance.guiders import GAGGuidance

    latents = initial_latents(pipe, [0, 1])
    with gag_guidance(pipe, scale=2.0, zeta=0.5):
        classic = generate(pipe, PROMPTS, latents, num_inference_steps=4, guidance_scale=1.0)
    guider = GAGGuidance(guidance_scale=1.0, gag_scale=2.0, zeta=0.5)
    looped = denoise_with_guider(pipe, guider, PROMPTS, latents, num_inference_steps=4)
    assert np.array_equal(looped, classic)
    assert _stock_types(pipe.unet) == {"AttnProcessor2_0"}


def test_gag_guider_on_top_of_cfg_matches_enable_gag_and_installs_per_call(pipe) -> None:
    from diffusers.guiders import ClassifierFreeGuidance

    from hopfield_aa.guidance import gag_guidance
    from hopfield_aa.guidance.guiders import GAGGuidance

    latents = initial_latents(pipe, [0, 1])
    with gag_guidance(pipe, scale=1.0):
        classic = generate(pipe, PROMPTS, latents, num_inference_steps=4, guidance_scale=3.0)
        whole_run = denoise_with_guider(
            pipe, ClassifierFreeGuidance(guidance_scale=3.0), PROMPTS, latents, num_inference_steps=4
        )
    seen: list[set[str]] = []
    step = pipe.scheduler.step

    def checking_step(*args, **kwargs):
        seen.append(_stock_types(pipe.unet))
        return step(*args, **kwargs)

    pipe.scheduler.step = checking_step
    try:
        per_call = denoise_with_guider(
            pipe, GAGGuidance(guidance_scale=3.0, gag_scale=1.0), PROMPTS, latents, num_inference_steps=4
        )
    finally:
        del pipe.scheduler.step
    # installing around each UNet call is the same computation as installing for the whole run ...
    assert np.array_equal(per_call, whole_run)
    # ... and the pipeline's stacked [uncond, cond] batch differs from separate calls only by float rounding
    np.testing.assert_allclose(per_call, classic, atol=1e-5)
    assert seen == [{"AttnProcessor2_0"}] * 4  # stock processors between the guided calls


def test_gag_guider_applied_to_the_conditional_branch_only_differs_from_both(pipe) -> None:
    from hopfield_aa.guidance.guiders import GAGGuidance

    latents = initial_latents(pipe, [0, 1])
    both = denoise_with_guider(
        pipe, GAGGuidance(guidance_scale=3.0, gag_scale=2.0), PROMPTS, latents, num_inference_steps=3
    )
    cond = denoise_with_guider(
        pipe,
        GAGGuidance(guidance_scale=3.0, gag_scale=2.0, apply_to="cond"),
        PROMPTS,
        latents,
        num_inference_steps=3,
    )
    assert np.abs(both - cond).max() > 1e-5


def test_gag_guider_restores_the_processors_when_the_unet_raises(pipe, monkeypatch) -> None:
    from hopfield_aa.guidance.guiders import GAGGuidance

    forward = pipe.unet.forward
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        denoise_with_guider(
            pipe,
            GAGGuidance(guidance_scale=3.0),
            PROMPTS,
            initial_latents(pipe, [0, 1]),
            num_inference_steps=2,
        )
    assert _stock_types(pipe.unet) == {"AttnProcessor2_0"}


def test_gag_guider_config_round_trips_through_guider_config_json(pipe, tmp_path) -> None:
    from hopfield_aa.guidance.guiders import GAGGuidance

    guider = GAGGuidance(guidance_scale=4.0, gag_scale=1.5, zeta=0.25, eta=0.5, alpha=2.0, apply_to="cond")
    guider.save_pretrained(tmp_path)
    assert (tmp_path / "guider_config.json").is_file()
    loaded = GAGGuidance.from_pretrained(tmp_path)
    assert loaded.attention == guider.attention and loaded.guidance_scale == 4.0 and loaded.apply_to == "cond"
    latents = initial_latents(pipe, [3])
    a = denoise_with_guider(pipe, guider, PROMPTS[:1], latents, num_inference_steps=2)
    b = denoise_with_guider(pipe, loaded, PROMPTS[:1], latents, num_inference_steps=2)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gag_scale": -1.0}, "scale"),
        ({"zeta": 2.0}, "zeta"),
        ({"eta": -0.1}, "eta"),
        ({"apply_to": "x"}, "apply_to"),
        ({"rule": "nope"}, "rule"),
    ],
)
def test_gag_guider_names_invalid_settings(kwargs, message) -> None:
    from hopfield_aa.guidance.guiders import GAGGuidance

    with pytest.raises(ValueError, match=message):
        GAGGuidance(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [({"scale": -1.0}, "scale"), ({"zeta": 2.0}, "zeta")])
def test_enable_gag_refuses_settings_outside_the_documented_domain(pipe, kwargs, message) -> None:
    from hopfield_aa.guidance import enable_gag, guidance_handle

    with pytest.raises(ValueError, match=message):
        enable_gag(pipe, **kwargs)
    assert guidance_handle(pipe) is None and _stock_types(pipe.unet) == {"AttnProcessor2_0"}


def test_enable_gag_twice_raises_runtime_error_as_documented(pipe) -> None:
    from hopfield_aa.guidance import disable_gag, enable_gag

    enable_gag(pipe)
    try:
        with pytest.raises(RuntimeError, match="already enabled"):
            enable_gag(pipe)
    finally:
        disable_gag(pipe)


def test_gag_guider_on_the_bundled_reference_pipeline_matches_enable_gag_and_restores_it() -> None:
    from hopfield_aa.guidance import gag_guidance
    from hopfield_aa.guidance.guiders import GAGGuidance
    from hopfield_aa.reference.pipeline import BUNDLED_PIPELINE

    if not (BUNDLED_PIPELINE / "model_index.json").is_file():
        pytest.fail(f"the bundled reference pipeline is missing ({BUNDLED_PIPELINE})")
    bundled = load_pipeline()
    latents = initial_latents(bundled, [0, 1])
    with gag_guidance(bundled, scale=1.0):
        classic = generate(bundled, PROMPTS, latents, num_inference_steps=3, guidance_scale=1.0)
    looped = denoise_with_guider(
        bundled, GAGGuidance(guidance_scale=1.0, gag_scale=1.0), PROMPTS, latents, num_inference_steps=3
    )
    assert np.array_equal(looped, classic)
    assert _stock_types(bundled.unet) == {"AttnProcessor2_0"}
