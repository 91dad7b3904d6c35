"""Benchmark of attention-trace capture: time per model forward with and without recording (interleaved,
tiny models), bytes per record, and the size of a full SDXL capture at common selections.

Run: python analysis/bench_capture.py [--repeats 40] [--out analysis/results/bench_capture.md]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _bench as bench
import diffusers
import torch

from hopfield_aa.traces import Selection, TraceCapture, TraceSet, attention_call_shapes, estimate_capture
from hopfield_aa.traces.testing import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3, tiny_unet, unet_inputs

# name: (tiny model factory, its keyword inputs)
MODELS: dict[str, tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]] = {
    "UNet2DConditionModel": (tiny_unet, unet_inputs),
    "SD3Transformer2DModel": (tiny_sd3, sd3_inputs),
    "FluxTransformer2DModel": (tiny_flux, flux_inputs),
}

SETTINGS = {
    "everything, float32": (Selection(), "float32"),
    "everything, float16": (Selection(), "float16"),
    "cross/joint, 1 row, 16 queries, f16": (
        Selection(kinds=["cross", "joint"], batch_indices=[-1], max_query_tokens=16),
        "float16",
    ),
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (architecture fields)
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SDXL_SELECTIONS = {
    "CLI default: all layers, heads, queries, steps; conditional row": Selection(batch_indices=[-1]),
    "as above, both CFG rows": Selection(),
    "--kinds cross": Selection(batch_indices=[-1], kinds=["cross"]),
    "--max-query-tokens 256": Selection(batch_indices=[-1], max_query_tokens=256),
    "--kinds cross --max-query-tokens 256": Selection(
        batch_indices=[-1], kinds=["cross"], max_query_tokens=256
    ),
    "--max-query-tokens 256 --step-range 0:50:5": Selection(
        batch_indices=[-1], max_query_tokens=256, steps=range(0, 50, 5)
    ),
    "--kinds cross --heads 0 --max-query-tokens 256 --step-range 0:50:10": Selection(
        batch_indices=[-1], kinds=["cross"], heads=[0], max_query_tokens=256, steps=range(0, 50, 10)
    ),
}


def time_overhead(repeats: int) -> list[dict[str, object]]:
    rows = []
    for model_name, (make, inputs_of) in MODELS.items():
        plain = make()
        inputs = inputs_of(plain)
        for setting, (selection, dtype) in SETTINGS.items():
            recorded = copy.deepcopy(plain)
            with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
                with TraceCapture(recorded, Path(tmp) / "t", selection=selection, dtype=dtype) as cap:
                    recorded(**inputs)
                    plain(**inputs)  # warm-up of both
                    t_plain, t_capture = [], []
                    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
                        start = time.perf_counter()
                        plain(**inputs)
                        t_plain.append(time.perf_counter() - start)
                        start = time.perf_counter()
                        recorded(**inputs)  # includes writing the previous step's shard
                        t_capture.append(time.perf_counter() - start)
                traces = TraceSet(Path(tmp) / "t")
                n_records = len(traces)
                shard_bytes = sum(s["bytes"] for s in traces.manifest["shards"])
                per_step = cap.n_records // (repeats + 1)
            mp, mc = statistics.median(t_plain), statistics.median(t_capture)
            rows.append(
                {
                    "model": model_name,
                    "selection": setting,
                    "plain ms": 1e3 * mp,
                    "capture ms": 1e3 * mc,
                    "overhead": mc / mp,
                    "records/step": per_step,
                    "bytes/record": shard_bytes / n_records,
                }
            )
            print(rows[-1], flush=True)
    return rows


def sdxl_estimates() -> tuple[list[dict[str, object]], dict[str, object]]:
    # the same class as diffusers.UNet2DConditionModel; type checkers read that name as the placeholder
    # diffusers defines for installs without torch (not a torch.nn.Module)
    from diffusers.models import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        inputs = {
            "sample": torch.empty(2, 4, 128, 128),  # 1024x1024 image, CFG batch of 2
            "timestep": torch.tensor(999),
            "encoder_hidden_states": torch.empty(2, 77, 2048),
            "added_cond_kwargs": {"text_embeds": torch.empty(2, 1280), "time_ids": torch.empty(2, 6)},
        }
    calls = attention_call_shapes(unet, inputs)
    layout = {
        "attention layers": len(calls),
        "self / cross": f"{sum(c.kind == 'self' for c in calls)} / {sum(c.kind == 'cross' for c in calls)}",
        "heads x head_dim": sorted({f"{c.heads}x{c.head_dim}" for c in calls}),
        "query tokens": sorted({c.query_tokens for c in calls}),
        "text tokens": sorted({c.key_tokens for c in calls if c.kind == "cross"}),
    }
    rows = []
    for name, selection in SDXL_SELECTIONS.items():
        est = estimate_capture(calls, steps=50, selection=selection, dtype="float16")
        rows.append(
            {
                "selection": name,
                "records": est.records,
                "GB": est.bytes / 1e9,
                "MB/step": est.bytes / max(est.steps, 1) / 1e6,
                "MB/record": est.bytes / max(est.records, 1) / 1e6,
            }
        )
        print(rows[-1], flush=True)
    return rows, layout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="5 repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_capture.md")
    bench.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 5)
    torch.set_num_threads(1)
    with bench.quiet_machine(args, own_threads=1) as load:
        overhead = time_overhead(args.repeats)
    sdxl, layout = sdxl_estimates()

    lines = [
        "# Attention-trace capture: overhead and size",
        "",
        f"Command: `python analysis/bench_capture.py --repeats {args.repeats}`  ",
        f"Machine: {platform.processor() or platform.machine()}, 1 torch thread, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, CPU; plain and capture forwards are interleaved so any "
        "drift in load hits both alike.",
        "",
        "## Overhead per model forward (one denoising step) on the tiny models",
        "",
        "Tiny randomly initialised models from `hopfield_aa.traces.testing`, batch 2 (batch 1 for FLUX). "
        "`capture ms` includes copying Q/K/V to CPU and writing the previous step's shard and manifest "
        "(fsync'd, atomic). Medians over the repeats; `bytes/record` is shard file bytes per record, headers "
        "included (tiny records make the safetensors/JSON headers a large share).",
        "",
        "On these tiny models the overhead is a fixed cost per step (two fsync'd atomic writes, shard and "
        "manifest, plus per-call bookkeeping), not copying; on a large model the copy to CPU and the write "
        "of the selected bytes (table below) dominate, so choose the selection by its size.",
        "",
        "| model | selection | plain ms | capture ms | overhead | records/step | bytes/record |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in overhead:
        lines.append(
            f"| {r['model']} | {r['selection']} | {r['plain ms']:.2f} | {r['capture ms']:.2f} | "
            f"{r['overhead']:.2f}x | {r['records/step']} | {r['bytes/record']:.0f} |"
        )
    lines += [
        "",
        "## What a full SDXL capture costs (1024x1024, 50 steps, float16 storage)",
        "",
        "Shapes come from a forward pass of the SDXL base UNet built from its config on the `meta` device "
        "(no weights, no compute): " + ", ".join(f"{k}: {v}" for k, v in layout.items()) + ". "
        "Sizes are tensor bytes (`hopfield_aa.traces.estimate_capture`, which the tests check equals the "
        "stored bytes exactly on the tiny models). The query cap trims Q only: K and V are the memory of "
        "the Hopfield reading and are always kept whole, so self-attention at 4096 tokens stays large.",
        "",
        "| selection | records | total GB | MB/step | MB/record |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sdxl:
        gb, per_step, per_record = r["GB"], r["MB/step"], r["MB/record"]
        lines.append(f"| {r['selection']} | {r['records']} | {gb:.2f} | {per_step:.1f} | {per_record:.3f} |")
    lines.append("")
    bench.write_table(args.out, "\n".join(lines), load, args)


if __name__ == "__main__":
    main()
