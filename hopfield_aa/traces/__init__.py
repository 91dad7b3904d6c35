"""Attention traces: capture Q/K/V from diffusers models, store them as safetensors shards with a JSON
manifest, load and validate them, and read each head as Hopfield retrieval (memory = K, states = Q,
β = scale).

From a record to the Hopfield quantities the checks use (papers/theory.md §2)::

    from hopfield_aa.traces import TraceSet
    for record in TraceSet("traces/", kinds=["cross"]):
        for head in record.iter_heads():          # or record.hopfield(i, query="image", key="text")
            memory, states, beta = head.memory, head.states, head.beta   # (N, d), (M, d), float
"""

from hopfield_aa.traces.capture import TraceCapture, capture, capture_pipeline, config_hash, run_metadata
from hopfield_aa.traces.estimate import CallShape, CaptureEstimate, attention_call_shapes, estimate_capture
from hopfield_aa.traces.format import FORMAT_VERSION, MANIFEST_NAME, TraceFormatError
from hopfield_aa.traces.loader import TraceSet
from hopfield_aa.traces.ranks import merge_ranks, rank_directory
from hopfield_aa.traces.record import HopfieldHead, TraceRecord
from hopfield_aa.traces.selection import Selection

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CallShape",
    "CaptureEstimate",
    "HopfieldHead",
    "Selection",
    "TraceCapture",
    "TraceFormatError",
    "TraceRecord",
    "TraceSet",
    "attention_call_shapes",
    "capture",
    "capture_pipeline",
    "config_hash",
    "estimate_capture",
    "merge_ranks",
    "rank_directory",
    "run_metadata",
]
