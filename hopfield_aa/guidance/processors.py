"""Diffusers attention processors that replace dense cross-attention by a guidance rule: UNet
cross-attention (``AttnProcessor2_0``), SD3 joint attention (``JointAttnProcessor2_0``) and FLUX.

Each is the adapted stock processor (:mod:`hopfield_aa.adapters`: the stock projections and output, shared
with trace capture) whose kernel is the one call to :func:`~hopfield_aa.guidance.attention.guided_attention`
(or its joint form); outside the configured steps the kernel is the stock one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from hopfield_aa.adapters import (
    AdaptedAttnProcessor,
    AdaptedFluxAttnProcessor,
    AdaptedJointAttnProcessor,
    AdaptedProcessor,
    AttentionCall,
    UNetAttentionCall,
)
from hopfield_aa.guidance.attention import guided_attention, guided_joint_attention
from hopfield_aa.guidance.rules import RowRule


class GuidanceSession(Protocol):
    """What a guidance processor reads from the session that installed it (see ``api.GuidanceHandle``)."""

    alphas: tuple[float, ...]
    active: bool
    text_tokens: int | None
    compile: bool
    row_rule: RowRule | None  # the rule's row form for the fused kernel (rules.row_rule)

    def alphas_for(self, layer: str) -> tuple[float | torch.Tensor, ...]:
        """The α ladder of one layer (dense first); a per-head α is a tensor of shape (heads, 1, 1)."""

    def combine(self, retrievals: Sequence[torch.Tensor]) -> torch.Tensor:
        """The configured rule applied to the retrievals (dense first)."""

    def rows(self, batch_size: int) -> slice:
        """The batch rows the rule acts on (all, or the conditional half of a CFG batch)."""


class _GuidanceProcessor(AdaptedProcessor):
    """Holds the layer name, the session and the stock processor it stands in for.

    Outside the session's active steps, :meth:`attend` is the stock kernel, so the processor computes what
    the stock one does, bit for bit (``tests/test_adapters.py``).
    """

    def __init__(self, layer: str, session: GuidanceSession, original: Any) -> None:
        self.layer = layer
        self.session = session
        self.original = original

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, original={type(self.original).__name__})"

    def _guide(self, kernel: Callable[..., torch.Tensor], call: AttentionCall, **where: Any) -> torch.Tensor:
        """The guidance step: ``kernel`` (a guided attention of :mod:`~hopfield_aa.guidance.attention`) on the
        call's Q, K, V with the session's rule, this layer's α ladder and the batch rows it acts on."""
        return kernel(
            call.query,
            call.key,
            call.value,
            self.session.combine,
            self.session.alphas_for(self.layer),
            attention_mask=call.attention_mask,
            rows=self.session.rows(call.batch_size),
            **where,
        )


class GAGAttnProcessor(_GuidanceProcessor, AdaptedAttnProcessor):
    r"""``AttnProcessor2_0`` with ``softmax(β QKᵀ) V`` replaced by the guidance rule of its retrievals.

    Used on UNet cross-attention (image queries, text keys: SD1.5/SDXL ``attn2``) and, when selected,
    self-attention. The rule acts per head and query token on ``[softmax(Z) V, entmax_α(Z) V, …]`` with one
    score matrix ``Z = β QKᵀ + mask`` (β = 1/sqrt(head_dim), as in the stock processor), computed in
    float32 and cast back.
    """

    def attend(self, attn: Any, call: UNetAttentionCall) -> torch.Tensor:
        if not self.session.active:
            return super().attend(attn, call)
        # the guidance step: the rule of the dense and sparse retrievals, (batch, heads, queries, head_dim)
        # β = 1/sqrt(head_dim), as F.scaled_dot_product_attention in AttnProcessor2_0
        return self._guide(
            guided_attention,
            call,
            scale=call.head_dim**-0.5,
            compiled=self.session.compile,
            row_rule=self.session.row_rule,
        )


class _GuidedJointAttention(_GuidanceProcessor):
    """The guidance step of joint attention (SD3, FLUX): the rule on the image-query → text-key block."""

    def attend(self, attn: Any, call: AttentionCall) -> torch.Tensor:
        text = call.key_segments.get("text")
        if not self.session.active or text is None:
            return super().attend(attn, call)
        # the joint sequence in the model's order: SD3 [image, text], FLUX [text, image]
        image = call.query_segments["image"]
        return self._guide(guided_joint_attention, call, image=slice(*image), text=slice(*text))


class GAGJointAttnProcessor(_GuidedJointAttention, AdaptedJointAttnProcessor):
    r"""``JointAttnProcessor2_0`` (SD3 MMDiT) with the rule on the image-query → text-key retrieval only.

    The joint softmax over ``[image keys, text keys]`` is split into its two blocks; the text block's
    normalised retrieval ``softmax(z_txt) V_txt`` is replaced by the rule of ``[softmax(z_txt) V_txt,
    entmax_α(z_txt) V_txt, …]`` and recombined with the block's original mass ``m`` (the joint softmax
    weight on text keys), so image→image attention and the text stream are exactly the stock ones:
    ``O' = O + m (G_txt − D_txt)``. See :func:`~hopfield_aa.guidance.attention.guided_joint_attention`.
    Without ``encoder_hidden_states`` (SD3.5's image-only ``attn2``) the stock kernel runs.
    """


class GAGFluxAttnProcessor(_GuidedJointAttention, AdaptedFluxAttnProcessor):
    r"""``FluxAttnProcessor`` with the rule on the image-query → text-key retrieval only.

    FLUX orders the joint sequence ``[text, image]``. Double-stream blocks get the text from
    ``encoder_hidden_states``; single-stream blocks receive the concatenated sequence, and the text length
    comes from the session (read from the transformer's ``encoder_hidden_states`` at each call). The text
    block is renormalised as in :class:`GAGJointAttnProcessor` (``O' = O + m (G_txt − D_txt)``), after the
    rotary embedding, so image→image attention and the text stream are the stock ones. Outside the active
    steps the kernel is the stock one, with the original processor's attention backend.
    """

    def __init__(self, layer: str, session: GuidanceSession, original: Any) -> None:
        super().__init__(layer, session, original)
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def text_tokens(self) -> int | None:
        return self.session.text_tokens
