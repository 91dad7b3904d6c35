"""How big a capture will be before running it: a shape-only forward pass (on the ``meta`` device, so even
SDXL costs no memory or compute) lists every attention call, and the selection is applied to the shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hopfield_aa.adapters import AttentionCall
from hopfield_aa.traces.format import parse_dtype
from hopfield_aa.traces.processors import RECORDING_PROCESSORS
from hopfield_aa.traces.selection import Selection


@dataclass(frozen=True)
class CallShape:
    """The shape of one attention call: ``query`` (batch, heads, query_tokens, head_dim), keys likewise."""

    layer: str
    kind: str
    batch: int
    heads: int
    query_tokens: int
    key_tokens: int
    head_dim: int
    has_mask: bool


@dataclass(frozen=True)
class CaptureEstimate:
    """Predicted size of a capture.

    Attributes
    ----------
    records : int
        Number of records.
    bytes : int
        Tensor bytes: per record ``size(dtype) · h (m + 2N) d + 8 m`` (q, k, v and the int64 query
        indices, h heads, m kept queries, N keys, d head dim), plus float32 masks where present. Shard
        headers and the manifest add well under 1 % for records of realistic size.
    steps : int
        Denoising steps selected.
    bytes_by_kind : Mapping[str, int]
        ``bytes`` split by attention kind.
    """

    records: int
    bytes: int
    steps: int
    bytes_by_kind: Mapping[str, int] = field(default_factory=dict)


class _ShapeRecorder:
    def __init__(self) -> None:
        self.calls: list[CallShape] = []
        self.text_tokens: int | None = None

    def record(self, layer: str, call: AttentionCall, *, scale: float) -> None:
        b, h, m, d = call.query.shape
        n_key = call.key.shape[2]
        self.calls.append(CallShape(layer, call.kind, b, h, m, n_key, d, call.attention_mask is not None))


def attention_call_shapes(model: torch.nn.Module, inputs: Mapping[str, Any]) -> list[CallShape]:
    """Run ``model(**inputs)`` once and list the shape of every attention call of a supported processor.

    Build the model and the inputs on ``torch.device("meta")`` to get the shapes of a large model for
    free; layers with processors capture does not support are left out.

    Examples
    --------
    >>> import torch
    >>> from hopfield_aa.traces.testing import tiny_unet, unet_inputs
    >>> with torch.device("meta"):
    ...     unet = tiny_unet()
    >>> inputs = {k: v.to("meta") for k, v in unet_inputs(unet).items()}
    >>> len(attention_call_shapes(unet, inputs))
    8
    """
    recorder = _ShapeRecorder()
    text = inputs.get("encoder_hidden_states")
    if isinstance(text, torch.Tensor) and text.ndim == 3:  # what the capture's step hook reads
        recorder.text_tokens = int(text.shape[1])
    originals = {}
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        recording = RECORDING_PROCESSORS.get(type(processor))
        if processor is None or recording is None or not hasattr(module, "set_processor"):
            continue
        originals[module] = processor
        module.set_processor(recording(name, recorder))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for module, processor in originals.items():
            module.set_processor(processor)
    return recorder.calls


def estimate_capture(
    calls: list[CallShape],
    *,
    steps: int,
    selection: Selection | None = None,
    dtype: torch.dtype | str = "float16",
) -> CaptureEstimate:
    """Apply ``selection`` to the attention calls of one forward pass, repeated for ``steps`` steps.

    Parameters
    ----------
    calls : list of CallShape
        From :func:`attention_call_shapes` (one model forward = one denoising step).
    steps : int
        Denoising steps of the run (one model call per step, CFG batched).
    selection : Selection, optional
        As for the capture (default: everything).
    dtype : torch.dtype or str, default "float16"
        Storage dtype.

    Returns
    -------
    CaptureEstimate
    """
    selection = selection or Selection()
    storage = parse_dtype(dtype) or torch.float16
    size = torch.empty((), dtype=storage).element_size()
    n_steps = sum(1 for s in range(steps) if selection.matches_step(s))
    records = 0
    by_kind: dict[str, int] = {}
    for call in calls:
        if not (selection.matches_layer(call.layer) and selection.matches_kind(call.kind)):
            continue
        h = len(selection.head_indices(call.heads))
        rows = len(selection.batch_rows(call.batch))
        m = call.query_tokens
        if selection.max_query_tokens is not None:
            m = min(m, selection.max_query_tokens)
        per = size * h * (m + 2 * call.key_tokens) * call.head_dim + 8 * m
        if call.has_mask:
            per += 4 * h * m * call.key_tokens
        records += rows
        by_kind[call.kind] = by_kind.get(call.kind, 0) + rows * per * n_steps
    return CaptureEstimate(
        records=records * n_steps, bytes=sum(by_kind.values()), steps=n_steps, bytes_by_kind=by_kind
    )
