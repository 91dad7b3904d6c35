"""One captured attention call (:class:`TraceRecord`) and its reading as Hopfield retrieval
(:class:`HopfieldHead`): memory = keys, states = queries, beta = scale, per head.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from hopfield_aa.adapters import Segments


@dataclass(frozen=True, eq=False)
class HopfieldHead:
    """One attention head read as modern Hopfield retrieval (papers/theory.md §2, §13).

    Attention ``softmax(β Q Kᵀ) V`` is one hetero-associative retrieval step with the keys as the stored
    patterns: memory ``X = K`` (rows are patterns), states ``ξ₀ = Q`` (one per row), inverse temperature
    ``β = scale``. The dense retrieval of state ξ is ``T(ξ) = Xᵀ softmax(β X ξ)``; the attention output
    of the head is ``valuesᵀ softmax(β X ξ)``.

    Attributes
    ----------
    memory : Tensor, shape (N, d)
        The keys of the head, as they entered the softmax (after q/k norm and rotary embedding).
    states : Tensor, shape (M, d)
        The queries of the head (the captured subset; see ``query_indices``).
    beta : float
        The inverse temperature, the scale applied to ``Q Kᵀ`` inside the softmax (usually 1/√d).
    values : Tensor, shape (N, d)
        The values of the head (the hetero-associative read-out).
    query_indices : Tensor, shape (M,), int64
        Positions of ``states`` in the layer's full query sequence.
    key_indices : Tensor, shape (N,), int64
        Positions of ``memory`` in the layer's full key sequence.
    head : int
        The head's index in the layer.
    mask : Tensor or None, shape broadcastable to (M, N)
        Additive score bias the layer applied (``None`` where there was none).
    """

    memory: torch.Tensor
    states: torch.Tensor
    beta: float
    values: torch.Tensor
    query_indices: torch.Tensor
    key_indices: torch.Tensor
    head: int
    mask: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class TraceRecord:
    """What one attention call saw, for one batch element: Q, K, V per head and where it happened.

    Q, K and V are exactly the tensors that entered ``softmax(scale · Q Kᵀ + mask) V`` in the layer
    (after any q/k normalisation and rotary embedding), restricted to the captured heads and queries.

    Attributes
    ----------
    q : Tensor, shape (heads, queries, head_dim)
        Queries of the captured heads; row ``i`` is query token ``query_indices[i]``.
    k, v : Tensor, shape (heads, keys, head_dim)
        Keys and values of the captured heads (all key tokens).
    scale : float
        The factor applied to ``Q Kᵀ`` before the softmax (β of the Hopfield reading).
    kind : str
        ``"self"``, ``"cross"`` (image queries, text keys) or ``"joint"`` (text and image tokens in one
        sequence, as in SD3 and FLUX).
    layer : str
        The attention module's name in the model (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``).
    step : int
        Denoising step index: the number of model forward calls before this one in the run.
    timestep : float or None
        The ``timestep`` the model's forward received at this step.
    heads : tuple of int
        Indices (in the layer) of the captured heads, one per row of ``q``/``k``/``v``.
    num_heads : int
        Number of heads of the layer.
    query_indices : Tensor, shape (queries,), int64
        Positions of the captured queries in the layer's full query sequence (all of them, in order,
        when no query cap was set).
    query_tokens, key_tokens : int
        Lengths of the layer's full query and key sequences.
    query_segments, key_segments : Mapping[str, tuple[int, int]]
        Half-open token ranges of ``"image"`` and ``"text"`` tokens on the query and key axes. For joint
        attention they give the text/image split (SD3: image first; FLUX: text first); for cross attention
        queries are all image and keys all text.
    batch_index : int
        Index of the batch element (with classifier-free guidance the unconditional half comes first).
    prompt_id, seed : int or None
        The run this record belongs to.
    query_seed : int or None
        Seed of the random query subset (``None`` when every query was kept).
    mask : Tensor or None, shape (heads or 1, queries or 1, keys)
        Additive attention bias of the call (boolean masks are stored as 0 / -inf).
    metadata : Mapping
        Run metadata of the capture (model class, config hash, dtype, device, versions, ...).
    source : str
        The shard file the record was read from.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    kind: str
    layer: str
    step: int
    timestep: float | None
    heads: tuple[int, ...]
    num_heads: int
    query_indices: torch.Tensor
    query_tokens: int
    key_tokens: int
    query_segments: Segments = field(default_factory=dict)
    key_segments: Segments = field(default_factory=dict)
    batch_index: int = 0
    prompt_id: int | None = None
    seed: int | None = None
    query_seed: int | None = None
    mask: torch.Tensor | None = None
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    source: str = ""

    @property
    def head_dim(self) -> int:
        """Dimension of each head's query/key vectors."""
        return int(self.q.shape[-1])

    @property
    def text_range(self) -> tuple[int, int] | None:
        """Half-open range of text tokens on the key axis (``None`` for image-only self-attention)."""
        return self.key_segments.get("text")

    @property
    def image_range(self) -> tuple[int, int] | None:
        """Half-open range of image tokens on the key axis (``None`` for cross-attention keys)."""
        return self.key_segments.get("image")

    def attention_output(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Recompute the attention output ``softmax(scale · Q Kᵀ + mask) V`` from the record.

        Parameters
        ----------
        dtype : torch.dtype, default float32
            Compute dtype.

        Returns
        -------
        Tensor, shape (heads, queries, head_dim)
            Before the layer's output projection.

        Examples
        --------
        >>> import torch
        >>> r = TraceRecord(q=torch.zeros(1, 2, 4), k=torch.randn(1, 3, 4), v=torch.eye(3, 4)[None],
        ...                 scale=0.5, kind="self", layer="l", step=0, timestep=1.0, heads=(0,),
        ...                 num_heads=1, query_indices=torch.arange(2), query_tokens=2, key_tokens=3)
        >>> r.attention_output()[0, 0, :3]  # zero queries attend uniformly
        tensor([0.3333, 0.3333, 0.3333])
        """
        scores = self.scale * (self.q.to(dtype) @ self.k.to(dtype).transpose(-1, -2))
        if self.mask is not None:
            scores = scores + self.mask.to(dtype)
        return torch.softmax(scores, dim=-1) @ self.v.to(dtype)

    def _query_rows(self, segment: str | None) -> torch.Tensor:
        if segment is None:
            return torch.arange(self.q.shape[1])
        if segment not in self.query_segments:
            have = sorted(self.query_segments)
            raise ValueError(f"query segment {segment!r} not in this {self.kind} record (has {have})")
        start, stop = self.query_segments[segment]
        inside = (self.query_indices >= start) & (self.query_indices < stop)
        return torch.nonzero(inside).flatten()

    def _key_range(self, segment: str | None) -> tuple[int, int]:
        if segment is None:
            return 0, self.key_tokens
        if segment not in self.key_segments:
            raise ValueError(
                f"key segment {segment!r} not in this {self.kind} record (has {sorted(self.key_segments)})"
            )
        return self.key_segments[segment]

    def hopfield(self, head: int, *, query: str | None = None, key: str | None = None) -> HopfieldHead:
        """One head as Hopfield retrieval: memory = keys, states = queries, β = scale (papers/theory.md §2,
        §13).

        Parameters
        ----------
        head : int
            Position of the head among the captured ``heads`` (0 ≤ head < len(heads)); the layer's head
            index is ``heads[head]``.
        query : {"image", "text"} or None
            Keep only queries of this segment (``None``: all captured queries).
        key : {"image", "text"} or None
            Keep only keys/values of this segment, e.g. ``query="image", key="text"`` selects the
            image-query -> text-key block of joint attention (``None``: all keys).

        Returns
        -------
        HopfieldHead
            ``memory`` (N, d), ``states`` (M, d), ``beta``, ``values`` (N, d), and the token positions.

        Examples
        --------
        >>> import torch
        >>> r = TraceRecord(q=torch.randn(2, 5, 4), k=torch.randn(2, 7, 4), v=torch.randn(2, 7, 4),
        ...                 scale=0.5, kind="joint", layer="l", step=0, timestep=1.0, heads=(0, 1),
        ...                 num_heads=2, query_indices=torch.arange(5), query_tokens=7, key_tokens=7,
        ...                 query_segments={"image": (0, 4), "text": (4, 7)},
        ...                 key_segments={"image": (0, 4), "text": (4, 7)})
        >>> h = r.hopfield(1, query="image", key="text")
        >>> tuple(h.memory.shape), tuple(h.states.shape), h.beta
        ((3, 4), (4, 4), 0.5)
        """
        if not 0 <= head < len(self.heads):
            raise ValueError(f"head must be in [0, {len(self.heads)}), got {head}")
        rows = self._query_rows(query)
        start, stop = self._key_range(key)
        mask = None
        if self.mask is not None:  # stored as (heads or 1, queries or 1, keys)
            m = self.mask[head] if self.mask.shape[0] > 1 else self.mask[0]
            m = m[rows] if m.shape[0] > 1 else m
            mask = m[:, start:stop]
        return HopfieldHead(
            memory=self.k[head, start:stop],
            states=self.q[head, rows],
            beta=self.scale,
            values=self.v[head, start:stop],
            query_indices=self.query_indices[rows],
            key_indices=torch.arange(start, stop),
            head=self.heads[head],
            mask=mask,
        )

    def iter_heads(self, *, query: str | None = None, key: str | None = None) -> Iterator[HopfieldHead]:
        """:meth:`hopfield` for every captured head, in order."""
        for head in range(len(self.heads)):
            yield self.hopfield(head, query=query, key=key)

    def __repr__(self) -> str:
        return (
            f"TraceRecord(layer={self.layer!r}, kind={self.kind!r}, step={self.step}, "
            f"timestep={self.timestep}, q={tuple(self.q.shape)}, k={tuple(self.k.shape)}, "
            f"scale={self.scale:.4g}, dtype={self.q.dtype}, batch_index={self.batch_index}, "
            f"prompt_id={self.prompt_id})"
        )


def default_scale(head_dim: int) -> float:
    """The softmax scale ``1/√head_dim`` that ``scaled_dot_product_attention`` uses when none is given."""
    return 1.0 / math.sqrt(head_dim)
