"""Recording attention processors: the adapted stock processors (:mod:`hopfield_aa.adapters`) whose kernel
first hands Q, K, V (as they enter the softmax) to a recorder. Outputs are bit-identical to the stock ones.

Supported: ``AttnProcessor2_0`` (UNet self/cross attention), ``JointAttnProcessor2_0`` (SD3 joint
attention) and ``FluxAttnProcessor`` (FLUX double and single blocks, with rotary embedding).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from hopfield_aa.adapters import (
    AdaptedAttnProcessor,
    AdaptedFluxAttnProcessor,
    AdaptedJointAttnProcessor,
    AdaptedProcessor,
    AttentionCall,
)
from hopfield_aa.traces.record import default_scale


class Recorder(Protocol):
    """Receives each attention call of a recording processor."""

    def record(self, layer: str, call: AttentionCall, *, scale: float) -> None:
        """``call`` holds Q, K, V of shape (batch, heads, tokens, head_dim); the recorder copies what it
        keeps. ``scale`` is the kernel's softmax scale (none is passed to it, so ``1/√head_dim``).
        """


class _Recording(AdaptedProcessor):
    """Holds the layer name and the recorder, and records each call just before the stock kernel."""

    def __init__(self, layer: str, recorder: Recorder) -> None:
        super().__init__()
        self.layer = layer
        self.recorder = recorder

    def attend(self, attn: Any, call: Any) -> torch.Tensor:
        self.recorder.record(self.layer, call, scale=default_scale(call.head_dim))
        return super().attend(attn, call)

    def text_tokens(self) -> int | None:
        # FLUX's single-stream blocks: the count comes from the model's ``encoder_hidden_states`` (the capture
        # reads it at each denoiser call)
        return getattr(self.recorder, "text_tokens", None)


class RecordingAttnProcessor2_0(_Recording, AdaptedAttnProcessor):
    """``AttnProcessor2_0`` that records Q, K, V (self-attention, or cross-attention with text keys)."""


class RecordingJointAttnProcessor2_0(_Recording, AdaptedJointAttnProcessor):
    """``JointAttnProcessor2_0`` (SD3) that records Q, K, V of the joint [image, text] sequence."""


class RecordingFluxAttnProcessor(_Recording, AdaptedFluxAttnProcessor):
    """``FluxAttnProcessor`` that records Q, K, V of the [text, image] sequence after rotary embedding.

    In FLUX's single-stream blocks the text tokens are already concatenated in front of the image tokens;
    their count comes from the recorder (``text_tokens``, set from the model's ``encoder_hidden_states``).
    """


# Stock processor class -> recording class. Matching is by exact type: a subclass may compute differently.
RECORDING_PROCESSORS: dict[type, type[_Recording]] = {
    AttnProcessor2_0: RecordingAttnProcessor2_0,
    JointAttnProcessor2_0: RecordingJointAttnProcessor2_0,
    FluxAttnProcessor: RecordingFluxAttnProcessor,
}
