"""The adapted stock processors (hopfield_aa.adapters) against diffusers' own, bit for bit, at the installed
diffusers version (written against 0.42.1): UNet ``AttnProcessor2_0``, SD3 ``JointAttnProcessor2_0`` and FLUX
``FluxAttnProcessor``, on tiny models built from config. Each processor built on the adapter — the adapter
with the stock kernel, trace recording, guidance outside its active steps, and UNet guidance at scale 0 —
gives the stock model output exactly, so capture and guidance share the stock halves unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffusers
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from hopfield_aa.adapters import (
    AdaptedAttnProcessor,
    AdaptedFluxAttnProcessor,
    AdaptedJointAttnProcessor,
    AttentionCall,
)
from hopfield_aa.guidance import gag_guidance
from hopfield_aa.guidance.api import GUIDANCE_PROCESSORS
from hopfield_aa.traces.processors import RECORDING_PROCESSORS
from hopfield_aa.traces.testing import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3, tiny_unet, unet_inputs

ADAPTED = {
    AttnProcessor2_0: AdaptedAttnProcessor,
    JointAttnProcessor2_0: AdaptedJointAttnProcessor,
    FluxAttnProcessor: AdaptedFluxAttnProcessor,
}


def _masked_unet_inputs(model: Any) -> dict[str, Any]:
    """UNet inputs with a text mask (the last two tokens of the first prompt masked out)."""
    inputs = unet_inputs(model)
    mask = torch.ones(inputs["encoder_hidden_states"].shape[:2])
    mask[0, -2:] = 0
    return {**inputs, "encoder_attention_mask": mask}


MODELS: dict[str, tuple[Callable[..., Any], Callable[[Any], dict[str, Any]]]] = {
    "unet": (tiny_unet, unet_inputs),
    "unet-masked": (tiny_unet, _masked_unet_inputs),
    "sd3": (tiny_sd3, sd3_inputs),
    "flux": (tiny_flux, flux_inputs),
}


class _NullRecorder:
    def __init__(self) -> None:
        self.calls = 0
        self.text_tokens: int | None = None

    def record(self, layer: str, call: AttentionCall, *, scale: float) -> None:
        self.calls += 1


class _GuidanceOff:
    """A guidance session outside its active steps: the rule must never be asked for."""

    alphas = (1.0, 1.5)
    active = False
    text_tokens = 5

    def alphas_for(self, layer: str) -> tuple[float, ...]:
        raise AssertionError("inactive guidance read its alphas")

    def combine(self, retrievals: Any) -> torch.Tensor:
        raise AssertionError("inactive guidance applied its rule")

    def rows(self, batch_size: int) -> slice:
        raise AssertionError("inactive guidance chose its rows")


RECORDER = _NullRecorder()
PROCESSORS: dict[str, Callable[[str, Any], Any]] = {
    "adapter": lambda layer, stock: ADAPTED[type(stock)](),
    "recording": lambda layer, stock: RECORDING_PROCESSORS[type(stock)](layer, RECORDER),
    "guidance-off": lambda layer, stock: GUIDANCE_PROCESSORS[type(stock)](layer, _GuidanceOff(), stock),
}


def _forward(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _replace_processors(model: Any, make: Callable[[str, Any], Any]) -> int:
    """Every stock processor of ``model`` replaced by ``make(layer, stock)``; the number replaced."""
    replaced = 0
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if type(processor) in ADAPTED and hasattr(module, "set_processor"):
            module.set_processor(make(name, processor))
            replaced += 1
    return replaced


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_adapted_processor_is_the_stock_processor_bit_for_bit(name: str, kind: str) -> None:
    make, inputs_of = MODELS[name]
    model = make()
    inputs = inputs_of(model)
    stock = _forward(model, inputs)
    assert _replace_processors(model, PROCESSORS[kind]) > 0
    adapted = _forward(model, inputs)
    assert torch.equal(adapted, stock), (
        f"{kind} on {name} differs from the stock processors of diffusers {diffusers.__version__} "
        f"by {(adapted - stock).abs().max().item():.3g}"
    )


@pytest.mark.parametrize("name", ["unet", "unet-masked"])
def test_unet_guidance_at_scale_zero_is_the_stock_processor_to_rounding(name: str) -> None:
    """Extrapolation at λ = 0 is the dense retrieval D. Guided attention computes D from the score matrix
    it shares with the sparse retrievals (one Q Kᵀ, no separate SDPA pass), so D equals SDPA's output to
    float32 rounding, not bit for bit; the projection and output halves around the kernel are the stock
    ones bit for bit (the adapted-processor tests above)."""
    make, inputs_of = MODELS[name]
    model = make()
    inputs = inputs_of(model)
    stock = _forward(model, inputs)
    with gag_guidance(model, "extrapolate", scale=0.0, layers=["*attn1", "*attn2"]) as handle:
        assert {layer.rsplit(".", 1)[-1] for layer in handle.layers} == {"attn1", "attn2"}
        guided = _forward(model, inputs)
    torch.testing.assert_close(guided, stock, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_joint_guidance_at_scale_zero_is_the_stock_processor_to_rounding(name: str) -> None:
    """The joint kernel takes the text block's mass from one attention call on [V, 1_txt], whose extra
    column may change the last bit of the stock output; the halves around it are the stock ones (above)."""
    make, inputs_of = MODELS[name]
    model = make()
    inputs = inputs_of(model)
    stock = _forward(model, inputs)
    with gag_guidance(model, "extrapolate", scale=0.0) as handle:
        assert handle.layers
        guided = _forward(model, inputs)
    torch.testing.assert_close(guided, stock, rtol=1e-6, atol=1e-6)


def test_the_recorder_sees_each_stock_kernel_call() -> None:
    model = tiny_flux()
    RECORDER.calls, RECORDER.text_tokens = 0, 5
    _replace_processors(model, PROCESSORS["recording"])
    _forward(model, flux_inputs(model))
    assert RECORDER.calls == 2  # one double-stream and one single-stream block
