"""The ``hopfield-aa capture`` subcommand: run a diffusers pipeline on prompts from a file and record the
attention Q/K/V it computes into a trace directory (safetensors shards + JSON manifest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXAMPLE = """\
examples:
  hopfield-aa capture --model path/to/sd15 --prompts prompts.txt --out traces/ \\
      --steps 20 --layers '*attn2' --max-query-tokens 256 --dtype float16
  hopfield-aa capture --model reference --prompts prompts.txt --out traces/ --step-range 0:20:5

Layer patterns are shell globs over module names (down_blocks.1.attentions.0.transformer_blocks.0.attn2)
or regular expressions prefixed with 're:'. Records are read back with hopfield_aa.traces.TraceSet.
"""


def add_parsers(subparsers: Any) -> None:
    """Add ``capture`` to the ``hopfield-aa`` command."""
    p = subparsers.add_parser(
        "capture",
        help="record attention Q/K/V of a diffusers pipeline into a trace directory",
        description=(
            "Run a diffusers pipeline on each prompt of a text file (one per line) and record, for every "
            "selected attention call, Q, K and V per head as they enter the softmax, with layer, kind, "
            "step, timestep and run metadata. Output: safetensors shards plus manifest.json, written "
            "atomically so an interrupted capture stays loadable."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="local diffusers pipeline directory, or 'reference' for the project's reference model",
    )
    p.add_argument(
        "--prompts", required=True, type=Path, help="text file, one prompt per line (blank lines skipped)"
    )
    p.add_argument("--out", required=True, type=Path, help="output capture directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing capture in --out")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed+i (default 0)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per prompt (default 20)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None, help="image height in pixels")
    p.add_argument("--width", type=int, default=None, help="image width in pixels")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--model-dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="load the pipeline in this dtype",
    )
    sel = p.add_argument_group("selection")
    sel.add_argument(
        "--layers", nargs="+", default=None, metavar="PATTERN", help="layer-name globs or 're:' regexes"
    )
    sel.add_argument(
        "--kinds", nargs="+", choices=("self", "cross", "joint"), default=None, help="attention kinds"
    )
    sel.add_argument(
        "--step-range", default=None, help="steps to keep: '0:50:5', '3', or '0,1,10:20' (default all)"
    )
    sel.add_argument("--heads", default=None, help="head indices to keep, e.g. '0,1,2' (default all)")
    sel.add_argument(
        "--max-query-tokens", type=int, default=None, help="random subset of at most N query tokens"
    )
    sel.add_argument("--query-seed", type=int, default=0, help="seed of the query subsets (default 0)")
    sel.add_argument(
        "--batch-index",
        default="-1",
        help="batch rows to keep: '-1' = conditional half under CFG (default), 'all', or e.g. '0,1'",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="storage dtype (default: the model's dtype)",
    )
    p.add_argument("--shard-mb", type=float, default=64.0, help="shard size in MiB (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_capture)


def load_pipeline(model: str, *, dtype: str | None = None) -> Any:
    """Load the pipeline named by ``--model``: ``"reference"`` (the bundled reference pipeline, a
    diffusers ``StableDiffusionPipeline`` folder) or a local diffusers pipeline directory, offline."""
    import torch
    from diffusers import DiffusionPipeline

    from hopfield_aa.reference.pipeline import BUNDLED_PIPELINE

    path = BUNDLED_PIPELINE if model == "reference" else Path(model)
    if not (path / "model_index.json").is_file():
        raise SystemExit(
            f"hopfield-aa capture: --model {model!r} is neither 'reference' nor a diffusers pipeline "
            "directory (no model_index.json)"
        )
    kwargs: dict[str, Any] = {"torch_dtype": torch.float32 if dtype is None else getattr(torch, dtype)}
    if (path / "reference_model.json").is_file():
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)


def run_capture(args: argparse.Namespace) -> int:
    """Entry point of ``hopfield-aa capture``."""
    from hopfield_aa.traces.capture import capture_pipeline
    from hopfield_aa.traces.selection import Selection, parse_ints, parse_steps

    if not args.prompts.is_file():
        print(f"hopfield-aa capture: prompts file {args.prompts} not found", file=sys.stderr)
        return 2
    prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        print(f"hopfield-aa capture: {args.prompts} holds no prompts", file=sys.stderr)
        return 2
    try:
        selection = Selection(
            layers=args.layers,
            kinds=args.kinds,
            steps=None if args.step_range is None else parse_steps(args.step_range),
            heads=None if args.heads is None else parse_ints(args.heads),
            max_query_tokens=args.max_query_tokens,
            batch_indices=None if args.batch_index == "all" else parse_ints(args.batch_index),
            query_seed=args.query_seed,
        )
    except (TypeError, ValueError) as exc:
        print(f"hopfield-aa capture: {exc}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.model, dtype=args.model_dtype)
    pipe = pipe.to(args.device)
    if args.quiet and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    # Skip the VAE decode: only the denoiser's attention is captured.
    pipeline_kwargs: dict[str, Any] = {"output_type": "latent"}
    for name in ("guidance_scale", "height", "width"):
        if getattr(args, name) is not None:
            pipeline_kwargs[name] = getattr(args, name)
    try:
        cap = capture_pipeline(
            pipe,
            prompts,
            args.out,
            seed=args.seed,
            num_inference_steps=args.steps,
            selection=selection,
            dtype=args.dtype,
            shard_bytes=max(1, int(args.shard_mb * 2**20)),
            overwrite=args.overwrite,
            pipeline_kwargs=pipeline_kwargs,
            progress=not args.quiet,
        )
    except FileExistsError:
        print(
            f"hopfield-aa capture: {args.out} already holds a capture; pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 2
    print(f"captured {cap.n_records} records in {cap.n_shards} shards to {args.out}")
    return 0
