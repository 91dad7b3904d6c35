"""The diffusers adapter layer: the denoiser of a pipeline, and the two halves of diffusers' stock
``AttnProcessor2_0`` around its attention kernel, shared by the processors that replace the kernel (trace
recording, guidance) so they stay line-for-line the stock maths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def resolve_model(model_or_pipeline: Any) -> torch.nn.Module:
    """The denoiser of a pipeline (``unet`` or ``transformer``), or the model itself."""
    for attr in ("unet", "transformer"):
        inner = getattr(model_or_pipeline, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    if isinstance(model_or_pipeline, torch.nn.Module):
        return model_or_pipeline
    raise TypeError(
        f"model must be a torch.nn.Module or a pipeline with a unet/transformer, got "
        f"{type(model_or_pipeline).__name__}"
    )


@dataclass(frozen=True)
class AttentionInputs:
    """What enters the attention kernel of one ``Attention`` call, and what its output needs afterwards.

    ``query``/``key``/``value`` have shape (batch, heads, tokens, head_dim), after the q/k norms;
    ``attention_mask`` is (batch, heads, queries or 1, keys) or None; ``spatial`` holds
    (channel, height, width) when the input was a 4-D feature map.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    residual: torch.Tensor
    batch_size: int
    head_dim: int
    spatial: tuple[int, int, int] | None


def project(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> AttentionInputs:
    """The stock processor up to the kernel: norms, reshapes, mask preparation, Q/K/V projections."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)

    spatial = None
    if hidden_states.ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        spatial = (channel, height, width)
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )

    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        # scaled_dot_product_attention expects (batch, heads, source_length, target_length)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)

    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return AttentionInputs(query, key, value, attention_mask, residual, batch_size, head_dim, spatial)


def finish(attn: Any, inputs: AttentionInputs, attended: torch.Tensor) -> torch.Tensor:
    """The stock processor after the kernel: merge heads, output projection, reshape, residual, rescale."""
    hidden_states = attended.transpose(1, 2).reshape(inputs.batch_size, -1, attn.heads * inputs.head_dim)
    hidden_states = hidden_states.to(inputs.query.dtype)

    hidden_states = attn.to_out[0](hidden_states)  # linear projection
    hidden_states = attn.to_out[1](hidden_states)  # dropout

    if inputs.spatial is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(inputs.batch_size, *inputs.spatial)

    if attn.residual_connection:
        hidden_states = hidden_states + inputs.residual

    return hidden_states / attn.rescale_output_factor
