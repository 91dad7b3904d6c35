"""Recording attention processors: the stock diffusers processors, line for line, plus one call that hands
copies of Q, K, V (as they enter the softmax) to a recorder. Outputs are bit-identical to the stock ones.

Supported: ``AttnProcessor2_0`` (UNet self/cross attention), ``JointAttnProcessor2_0`` (SD3 joint
attention) and ``FluxAttnProcessor`` (FLUX double and single blocks, with rotary embedding).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from diffusers.utils import deprecate

from hopfield_aa.adapters import finish as finish_unet_attention
from hopfield_aa.adapters import project as project_unet_attention
from hopfield_aa.traces.record import Segments, default_scale


class Recorder(Protocol):
    """Receives each attention call of a recording processor."""

    def record(
        self,
        layer: str,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        kind: str,
        scale: float,
        attention_mask: torch.Tensor | None,
        query_segments: Segments,
        key_segments: Segments,
    ) -> None:
        """``query``/``key``/``value`` have shape (batch, heads, tokens, head_dim); the recorder copies."""


class _Recording:
    """Holds the layer name and the recorder; subclasses call :meth:`_record` just before the kernel."""

    def __init__(self, layer: str, recorder: Recorder) -> None:
        super().__init__()
        self.layer = layer
        self.recorder = recorder

    def _record(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        kind: str,
        attention_mask: torch.Tensor | None,
        query_segments: Segments,
        key_segments: Segments,
    ) -> None:
        # No scale is passed to the kernels below, so they use 1/sqrt(head_dim).
        self.recorder.record(
            self.layer,
            query,
            key,
            value,
            kind=kind,
            scale=default_scale(query.shape[-1]),
            attention_mask=attention_mask,
            query_segments=query_segments,
            key_segments=key_segments,
        )


class RecordingAttnProcessor2_0(_Recording, AttnProcessor2_0):
    """``AttnProcessor2_0`` that records Q, K, V (self-attention, or cross-attention with text keys)."""

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

        kind = "self" if encoder_hidden_states is None else "cross"
        inputs = project_unet_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        n_query, n_key = inputs.query.shape[2], inputs.key.shape[2]
        self._record(
            inputs.query,
            inputs.key,
            inputs.value,
            kind=kind,
            attention_mask=inputs.attention_mask,
            query_segments={"image": (0, n_query)},
            key_segments={"image": (0, n_key)} if kind == "self" else {"text": (0, n_key)},
        )
        # the output of sdp = (batch, num_heads, seq_len, head_dim)
        attended = F.scaled_dot_product_attention(
            inputs.query,
            inputs.key,
            inputs.value,
            attn_mask=inputs.attention_mask,
            dropout_p=0.0,
            is_causal=False,
        )
        return finish_unet_attention(attn, inputs, attended)


class RecordingJointAttnProcessor2_0(_Recording, JointAttnProcessor2_0):
    """``JointAttnProcessor2_0`` (SD3) that records Q, K, V of the joint [image, text] sequence."""

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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

        n_image = query.shape[2]
        segments: dict[str, tuple[int, int]] = {"image": (0, n_image)}

        # `context` projections.
        if encoder_hidden_states is not None:
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

            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)
            segments["text"] = (n_image, query.shape[2])

        self._record(
            query,
            key,
            value,
            kind="joint" if encoder_hidden_states is not None else "self",
            attention_mask=None,
            query_segments=segments,
            key_segments=segments,
        )

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs.
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


class RecordingFluxAttnProcessor(_Recording, FluxAttnProcessor):
    """``FluxAttnProcessor`` that records Q, K, V of the [text, image] sequence after rotary embedding.

    In FLUX's single-stream blocks the text tokens are already concatenated in front of the image tokens;
    their count comes from the recorder (``text_tokens``, set from the model's ``encoder_hidden_states``).
    """

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        if encoder_hidden_states is not None:
            n_text: int | None = encoder_hidden_states.shape[1]
        else:
            n_text = getattr(self.recorder, "text_tokens", None)
        segments = (
            {"text": (0, n_text), "image": (n_text, n_tokens)}
            if n_text is not None and 0 < n_text < n_tokens
            else {"image": (0, n_tokens)}
        )
        # FLUX lays tensors out as (batch, tokens, heads, head_dim); the recorder takes transposed views.
        self._record(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            kind="joint" if "text" in segments else "self",
            attention_mask=attention_mask,
            query_segments=segments,
            key_segments=segments,
        )

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
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


# Stock processor class -> recording class. Matching is by exact type: a subclass may compute differently.
RECORDING_PROCESSORS: dict[type, type[_Recording]] = {
    AttnProcessor2_0: RecordingAttnProcessor2_0,
    JointAttnProcessor2_0: RecordingJointAttnProcessor2_0,
    FluxAttnProcessor: RecordingFluxAttnProcessor,
}
