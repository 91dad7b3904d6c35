"""Diffusers attention processors that replace dense cross-attention by a guidance rule: UNet
cross-attention (``AttnProcessor2_0``), SD3 joint attention (``JointAttnProcessor2_0``) and FLUX.

Each reads like the stock processor it replaces; the guidance step is the one call to
:func:`~hopfield_aa.guidance.attention.guided_attention` (or its joint form), and outside the configured
steps the stock processor runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from diffusers.utils import deprecate

from hopfield_aa.adapters import finish as finish_unet_attention
from hopfield_aa.adapters import project as project_unet_attention
from hopfield_aa.guidance.attention import guided_attention, guided_joint_attention


class GuidanceSession(Protocol):
    """What a guidance processor reads from the session that installed it (see ``api.GuidanceHandle``)."""

    alphas: tuple[float, ...]
    active: bool
    text_tokens: int | None

    def alphas_for(self, layer: str) -> tuple[float | torch.Tensor, ...]:
        """The α ladder of one layer (dense first); a per-head α is a tensor of shape (heads, 1, 1)."""

    def combine(self, retrievals: Sequence[torch.Tensor]) -> torch.Tensor:
        """The configured rule applied to the retrievals (dense first)."""

    def rows(self, batch_size: int) -> slice:
        """The batch rows the rule acts on (all, or the conditional half of a CFG batch)."""


class _GuidanceProcessor:
    """Holds the layer name, the session and the stock processor it stands in for."""

    def __init__(self, layer: str, session: GuidanceSession, original: Any) -> None:
        self.layer = layer
        self.session = session
        self.original = original

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, original={type(self.original).__name__})"


class GAGAttnProcessor(_GuidanceProcessor):
    r"""``AttnProcessor2_0`` with ``softmax(β QKᵀ) V`` replaced by the guidance rule of its retrievals.

    Used on UNet cross-attention (image queries, text keys: SD1.5/SDXL ``attn2``) and, when selected,
    self-attention. The rule acts per head and query token on ``[softmax(Z) V, entmax_α(Z) V, …]`` with one
    score matrix ``Z = β QKᵀ + mask`` (β = 1/sqrt(head_dim), as in the stock processor), computed in
    float32 and cast back.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.session.active:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored.")

        inputs = project_unet_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        # the guidance step: the rule of the dense and sparse retrievals, (batch, heads, queries, head_dim)
        attended = guided_attention(
            inputs.query,
            inputs.key,
            inputs.value,
            self.session.combine,
            self.session.alphas_for(self.layer),
            scale=inputs.head_dim**-0.5,  # as F.scaled_dot_product_attention in AttnProcessor2_0
            attention_mask=inputs.attention_mask,
            rows=self.session.rows(inputs.batch_size),
        )
        return finish_unet_attention(attn, inputs, attended)


class GAGJointAttnProcessor(_GuidanceProcessor):
    r"""``JointAttnProcessor2_0`` (SD3 MMDiT) with the rule on the image-query → text-key retrieval only.

    The joint softmax over ``[image keys, text keys]`` is split into its two blocks; the text block's
    normalised retrieval ``softmax(z_txt) V_txt`` is replaced by the rule of ``[softmax(z_txt) V_txt,
    entmax_α(z_txt) V_txt, …]`` and recombined with the block's original mass ``m`` (the joint softmax
    weight on text keys), so image→image attention and the text stream are exactly the stock ones:
    ``O' = O + m (G_txt − D_txt)``. See :func:`~hopfield_aa.guidance.attention.guided_joint_attention`.
    Without ``encoder_hidden_states`` (SD3.5's image-only ``attn2``) the stock processor runs.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.session.active or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        # `sample` projections.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # `context` projections.
        encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
        encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
        encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)

        encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
            batch_size, -1, attn.heads, head_dim
        ).transpose(1, 2)
        encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
            batch_size, -1, attn.heads, head_dim
        ).transpose(1, 2)
        encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
            batch_size, -1, attn.heads, head_dim
        ).transpose(1, 2)

        if attn.norm_added_q is not None:
            encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
        if attn.norm_added_k is not None:
            encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

        n_image = residual.shape[1]
        query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
        key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
        value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

        # the guidance step: SD3 orders the joint sequence [image, text]
        hidden_states = guided_joint_attention(
            query,
            key,
            value,
            self.session.combine,
            self.session.alphas_for(self.layer),
            image=slice(0, n_image),
            text=slice(n_image, query.shape[2]),
            rows=self.session.rows(batch_size),
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # Split the attention outputs.
        hidden_states, encoder_hidden_states = (
            hidden_states[:, :n_image],
            hidden_states[:, n_image:],
        )
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        return hidden_states, encoder_hidden_states


class GAGFluxAttnProcessor(_GuidanceProcessor):
    r"""``FluxAttnProcessor`` with the rule on the image-query → text-key retrieval only.

    FLUX orders the joint sequence ``[text, image]``. Double-stream blocks get the text from
    ``encoder_hidden_states``; single-stream blocks receive the concatenated sequence, and the text length
    comes from the session (read from the transformer's ``encoder_hidden_states`` at each call). The text
    block is renormalised as in :class:`GAGJointAttnProcessor` (``O' = O + m (G_txt − D_txt)``), after the
    rotary embedding, so image→image attention and the text stream are the stock ones.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n_text = (
            encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.session.text_tokens
        )
        if not self.session.active or n_text is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # the guidance step, in the (batch, heads, tokens, head_dim) layout; FLUX orders [text, image]
        n_tokens = query.shape[1]
        hidden_states = guided_joint_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            self.session.combine,
            self.session.alphas_for(self.layer),
            image=slice(n_text, n_tokens),
            text=slice(0, n_text),
            attention_mask=attention_mask,
            rows=self.session.rows(query.shape[0]),
        ).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states
