"""The diffusers adapter layer: the denoiser of a pipeline, and each stock attention processor (UNet
``AttnProcessor2_0``, SD3 ``JointAttnProcessor2_0``, FLUX ``FluxAttnProcessor``) cut at its attention kernel.

The halves before the kernel (norms, projections, rotary embedding) and after it (heads merged, output
projections, residual) exist once, here. A processor that records the kernel's inputs (``traces``) or
replaces the kernel by a guidance rule (``guidance``) subclasses an adapted processor and overrides only
:meth:`AdaptedProcessor.attend`; with the stock ``attend`` each adapted processor is the stock one bit for bit
(``tests/test_adapters.py``, at the installed diffusers version).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from diffusers.utils import deprecate

Segments = Mapping[str, tuple[int, int]]
"""Token ranges of a sequence by role (``"image"``, ``"text"``): role -> (start, stop)."""


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


# ------------------------------------------------------------------------------------ one kernel call
@dataclass(frozen=True)
class AttentionCall:
    """What enters the attention kernel of one call, whichever the model.

    ``query`` has shape (batch, heads, queries, head_dim), ``key``/``value`` (batch, heads, keys, head_dim),
    after the q/k norms (and FLUX's rotary embedding); ``attention_mask`` is what the stock kernel receives,
    or None. ``kind`` is ``"self"``, ``"cross"`` (UNet, text keys) or ``"joint"`` (image and text tokens in
    one sequence); the segments say where the image and text tokens are among the queries and the keys.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    kind: str
    query_segments: Segments
    key_segments: Segments

    @property
    def batch_size(self) -> int:
        return int(self.query.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.query.shape[-1])


@dataclass(frozen=True)
class UNetAttentionCall(AttentionCall):
    """An ``AttnProcessor2_0`` call: also the residual and, for a 4-D input, its (channel, height, width)."""

    residual: torch.Tensor
    spatial: tuple[int, int, int] | None


@dataclass(frozen=True)
class FluxAttentionCall(AttentionCall):
    """A ``FluxAttnProcessor`` call: also the number of ``encoder_hidden_states`` tokens (None in a
    single-stream block, whose text tokens arrive already in front of the image tokens)."""

    encoder_tokens: int | None


def _split_heads(
    attn: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    norm_q: torch.nn.Module | None,
    norm_k: torch.nn.Module | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projections (batch, tokens, heads · head_dim) -> (batch, heads, tokens, head_dim), then the q/k norms,
    as ``AttnProcessor2_0`` and ``JointAttnProcessor2_0`` do."""
    batch_size, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


class AdaptedProcessor:
    """A stock processor cut at its kernel: ``__call__`` projects, calls :meth:`attend`, and finishes.

    Subclasses change :meth:`attend` only; :meth:`text_tokens` tells FLUX's single-stream blocks how many
    of their tokens are text.
    """

    def attend(self, attn: Any, call: Any) -> torch.Tensor:
        """The attention output for ``call``, shape (batch, heads, queries, head_dim): the stock kernel."""
        raise NotImplementedError

    def text_tokens(self) -> int | None:
        """Text tokens in front of the image tokens of a single-stream FLUX block (None: unknown)."""
        return None


# -------------------------------------------------------------------------- UNet: AttnProcessor2_0
def project_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> UNetAttentionCall:
    """``AttnProcessor2_0`` up to the kernel: norms, reshapes, mask preparation, Q/K/V projections."""
    kind = "self" if encoder_hidden_states is None else "cross"
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

    query, key, value = _split_heads(attn, query, key, value, attn.norm_q, attn.norm_k)
    n_query, n_key = query.shape[2], key.shape[2]
    return UNetAttentionCall(
        query,
        key,
        value,
        attention_mask,
        kind,
        query_segments={"image": (0, n_query)},
        key_segments={"image" if kind == "self" else "text": (0, n_key)},
        residual=residual,
        spatial=spatial,
    )


def finish_attention(attn: Any, call: UNetAttentionCall, attended: torch.Tensor) -> torch.Tensor:
    """``AttnProcessor2_0`` after the kernel: merge heads, output projection, reshape, residual, rescale."""
    hidden_states = attended.transpose(1, 2).reshape(call.batch_size, -1, attn.heads * call.head_dim)
    hidden_states = hidden_states.to(call.query.dtype)

    hidden_states = attn.to_out[0](hidden_states)  # linear projection
    hidden_states = attn.to_out[1](hidden_states)  # dropout

    if call.spatial is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(call.batch_size, *call.spatial)

    if attn.residual_connection:
        hidden_states = hidden_states + call.residual

    return hidden_states / attn.rescale_output_factor


class AdaptedAttnProcessor(AdaptedProcessor):
    """``AttnProcessor2_0`` (UNet self- and cross-attention) as its two halves around :meth:`attend`."""

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
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecation_message = "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise an error in the future. `scale` should directly be passed while calling the underlying pipeline component i.e., via `cross_attention_kwargs`."  # noqa: E501
            deprecate("scale", "1.0.0", deprecation_message)
        call = project_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return finish_attention(attn, call, self.attend(attn, call))

    def attend(self, attn: Any, call: UNetAttentionCall) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            call.query, call.key, call.value, attn_mask=call.attention_mask, dropout_p=0.0, is_causal=False
        )


# ------------------------------------------------------------------- SD3: JointAttnProcessor2_0
def project_joint_attention(
    attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> AttentionCall:
    """``JointAttnProcessor2_0`` up to the kernel: the [image, text] sequence (image only without text)."""
    # `sample` projections.
    query, key, value = _split_heads(
        attn,
        attn.to_q(hidden_states),
        attn.to_k(hidden_states),
        attn.to_v(hidden_states),
        attn.norm_q,
        attn.norm_k,
    )

    n_image = query.shape[2]
    segments: dict[str, tuple[int, int]] = {"image": (0, n_image)}

    # `context` projections.
    if encoder_hidden_states is not None:
        encoder_query, encoder_key, encoder_value = _split_heads(
            attn,
            attn.add_q_proj(encoder_hidden_states),
            attn.add_k_proj(encoder_hidden_states),
            attn.add_v_proj(encoder_hidden_states),
            attn.norm_added_q,
            attn.norm_added_k,
        )

        query = torch.cat([query, encoder_query], dim=2)
        key = torch.cat([key, encoder_key], dim=2)
        value = torch.cat([value, encoder_value], dim=2)
        segments["text"] = (n_image, query.shape[2])

    kind = "joint" if "text" in segments else "self"
    return AttentionCall(query, key, value, None, kind, segments, segments)


def finish_joint_attention(
    attn: Any, call: AttentionCall, attended: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``JointAttnProcessor2_0`` after the kernel: merge heads, split the streams, output projections."""
    hidden_states = attended.transpose(1, 2).reshape(call.batch_size, -1, attn.heads * call.head_dim)
    hidden_states = hidden_states.to(call.query.dtype)

    encoder_hidden_states = None
    if "text" in call.query_segments:
        # Split the attention outputs.
        n_image = call.query_segments["image"][1]
        hidden_states, encoder_hidden_states = hidden_states[:, :n_image], hidden_states[:, n_image:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

    # linear proj
    hidden_states = attn.to_out[0](hidden_states)
    # dropout
    hidden_states = attn.to_out[1](hidden_states)

    if encoder_hidden_states is not None:
        return hidden_states, encoder_hidden_states
    return hidden_states


class AdaptedJointAttnProcessor(AdaptedProcessor):
    """``JointAttnProcessor2_0`` (SD3 MMDiT) as its two halves around :meth:`attend`."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        call = project_joint_attention(attn, hidden_states, encoder_hidden_states)  # no mask, as stock
        return finish_joint_attention(attn, call, self.attend(attn, call))

    def attend(self, attn: Any, call: AttentionCall) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            call.query, call.key, call.value, dropout_p=0.0, is_causal=False
        )


# --------------------------------------------------------------------------- FLUX: FluxAttnProcessor
def project_flux_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    image_rotary_emb: torch.Tensor | None,
    text_tokens: int | None,
) -> FluxAttentionCall:
    """``FluxAttnProcessor`` up to the kernel: the [text, image] sequence after the rotary embedding.

    ``text_tokens`` is the text length of a single-stream block (its tokens arrive concatenated); a
    double-stream block reads it from ``encoder_hidden_states``.
    """
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

    n_tokens = query.shape[1]
    encoder_tokens = None if encoder_hidden_states is None else int(encoder_hidden_states.shape[1])
    n_text = text_tokens if encoder_tokens is None else encoder_tokens
    segments = (
        {"text": (0, n_text), "image": (n_text, n_tokens)}
        if n_text is not None and 0 < n_text < n_tokens
        else {"image": (0, n_tokens)}
    )
    # FLUX lays tensors out as (batch, tokens, heads, head_dim); the call holds transposed views.
    return FluxAttentionCall(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attention_mask,
        "joint" if "text" in segments else "self",
        segments,
        segments,
        encoder_tokens=encoder_tokens,
    )


def finish_flux_attention(
    attn: Any, call: FluxAttentionCall, attended: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``FluxAttnProcessor`` after the kernel: merge heads, split the streams, output projections."""
    hidden_states = attended.transpose(1, 2).flatten(2, 3)
    hidden_states = hidden_states.to(call.query.dtype)

    if call.encoder_tokens is None:
        return hidden_states
    encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
        [call.encoder_tokens, hidden_states.shape[1] - call.encoder_tokens], dim=1
    )
    hidden_states = attn.to_out[0](hidden_states.contiguous())
    hidden_states = attn.to_out[1](hidden_states)
    encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
    return hidden_states, encoder_hidden_states


class AdaptedFluxAttnProcessor(AdaptedProcessor):
    """``FluxAttnProcessor`` (FLUX double- and single-stream blocks) as its two halves around :meth:`attend`.

    The kernel is diffusers' ``dispatch_attention_fn`` with the processor's attention backend, as stock.
    """

    _attention_backend: Any = None
    _parallel_config: Any = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        call = project_flux_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, self.text_tokens()
        )
        return finish_flux_attention(attn, call, self.attend(attn, call))

    def attend(self, attn: Any, call: FluxAttentionCall) -> torch.Tensor:
        return dispatch_attention_fn(
            call.query.transpose(1, 2),
            call.key.transpose(1, 2),
            call.value.transpose(1, 2),
            attn_mask=call.attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        ).transpose(1, 2)


__all__ = [
    "AdaptedAttnProcessor",
    "AdaptedFluxAttnProcessor",
    "AdaptedJointAttnProcessor",
    "AdaptedProcessor",
    "AttentionCall",
    "FluxAttentionCall",
    "Segments",
    "UNetAttentionCall",
    "finish_attention",
    "finish_flux_attention",
    "finish_joint_attention",
    "project_attention",
    "project_flux_attention",
    "project_joint_attention",
    "resolve_model",
]
