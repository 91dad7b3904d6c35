"""The ``hopfield-aa capture`` subcommand: run a diffusers pipeline on prompts from a file and record the
attention Q/K/V it computes into a trace directory (safetensors shards + JSON manifest).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hopfield_aa._errors import add_command

EXAMPLE = """\
examples:
  hopfield-aa capture --model path/to/sd15 --prompts prompts.txt --out traces/ \\
      --steps 20 --layers '*attn2' --max-query-tokens 256 --dtype float16
  hopfield-aa capture --model reference --prompts prompts.txt --out traces/ --step-range 0:20:5

split across processes (prompt i goes to rank i % W, with the seed it has in one process):
  hopfield-aa capture --model reference --prompts prompts.txt --out traces/ --rank 0 --world-size 2
  hopfield-aa capture --model reference --prompts prompts.txt --out traces/ --rank 1 --world-size 2
  hopfield-aa capture --merge traces/          # after every rank is done: traces/manifest.json
  accelerate launch --num_processes 2 -m hopfield_aa capture --model reference --prompts prompts.txt \\
      --out traces/                            # ranks from accelerate; rank 0 merges at the end

Layer patterns are shell globs over module names (down_blocks.1.attentions.0.transformer_blocks.0.attn2)
or regular expressions prefixed with 're:'. Records are read back with hopfield_aa.traces.TraceSet.
"""


def add_parsers(subparsers: Any) -> None:
    """Add ``capture`` to the ``hopfield-aa`` command."""
    p = add_command(
        subparsers,
        "capture",
        "record attention Q/K/V of a diffusers pipeline into a trace directory",
        "Run a diffusers pipeline on each prompt of a text file (one per line) and record, for every "
        "selected attention call, Q, K and V per head as they enter the softmax, with layer, kind, "
        "step, timestep and run metadata. Output: safetensors shards plus manifest.json, written "
        "atomically so an interrupted capture stays loadable. With --world-size W each rank writes "
        "OUT/rank-R/ and --merge OUT lists them all in OUT/manifest.json.",
        EXAMPLE,
    )
    p.add_argument(
        "--model",
        default=None,
        help="local diffusers pipeline directory, or 'reference' for the project's reference model "
        "(required unless --merge)",
    )
    p.add_argument(
        "--prompts",
        default=None,
        type=Path,
        help="text file, one prompt per line, blank lines skipped (required unless --merge)",
    )
    p.add_argument("--out", default=None, type=Path, help="output capture directory (required)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing capture in --out")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per prompt")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the pipeline's own, 7.5 for Stable Diffusion)",
    )
    p.add_argument(
        "--height", type=int, default=None, help="image height in pixels (default: the model's sample size)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="image width in pixels (default: the model's sample size)"
    )
    p.add_argument("--device", default="cpu", help="torch device ('cuda' under accelerate: this rank's GPU)")
    p.add_argument(
        "--model-dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="load the pipeline in this dtype (default: float32)",
    )
    sel = p.add_argument_group("selection")
    sel.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="layer-name globs or 're:' regexes (default: every attention layer)",
    )
    sel.add_argument(
        "--kinds",
        nargs="+",
        choices=("self", "cross", "joint"),
        default=None,
        help="attention kinds (default: all)",
    )
    sel.add_argument(
        "--step-range", default=None, help="steps to keep: '0:50:5', '3', or '0,1,10:20' (default: all)"
    )
    sel.add_argument("--heads", default=None, help="head indices to keep, e.g. '0,1,2' (default: all)")
    sel.add_argument(
        "--max-query-tokens",
        type=int,
        default=None,
        help="keep a random subset of at most N query tokens (default: every query token)",
    )
    sel.add_argument("--query-seed", type=int, default=0, help="seed of the query subsets")
    sel.add_argument(
        "--batch-index",
        default="-1",
        help="batch rows to keep: '-1' = the conditional half under CFG, 'all', or e.g. '0,1'",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="storage dtype (default: the model's dtype)",
    )
    p.add_argument("--shard-mb", type=float, default=64.0, help="shard size in MiB")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    ranks = p.add_argument_group("several processes")
    ranks.add_argument(
        "--rank",
        type=int,
        default=None,
        help="this process's rank: it captures prompts i with i %% W == rank into OUT/rank-RANK/ "
        "(default: 0, or accelerate's process index under 'accelerate launch')",
    )
    ranks.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="W",
        help="number of ranks (default: 1, or accelerate's process count under 'accelerate launch')",
    )
    ranks.add_argument(
        "--merge",
        action="store_true",
        help="capture nothing: merge OUT/rank-*/ into OUT/manifest.json (run once every rank is done)",
    )
    p.set_defaults(func=run_capture)


def load_pipeline(model: str, *, dtype: str | None = None) -> Any:
    """Load the pipeline named by ``--model``: ``"reference"`` (the bundled reference pipeline, a
    diffusers ``StableDiffusionPipeline`` folder) or a local diffusers pipeline directory, offline."""
    import torch
    from diffusers import DiffusionPipeline

    from hopfield_aa.reference.pipeline import BUNDLED_PIPELINE

    path = BUNDLED_PIPELINE if model == "reference" else Path(model)
    if not (path / "model_index.json").is_file():
        from hopfield_aa._errors import UsageError

        if model == "reference":
            raise UsageError(f"--model reference: no reference pipeline at {path} (no model_index.json)")
        raise UsageError(
            f"--model {model!r} is neither 'reference' nor a diffusers pipeline directory "
            f"(no model_index.json in {path})"
        )
    kwargs: dict[str, Any] = {"torch_dtype": torch.float32 if dtype is None else getattr(torch, dtype)}
    if (path / "reference_model.json").is_file():
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)


def _launcher_rank() -> tuple[int, int, Any]:
    """Rank and world size from the launcher: ``accelerate.PartialState`` when accelerate is installed
    and the process was started by ``accelerate launch`` (or torchrun), else ``RANK``/``WORLD_SIZE``."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0, 1, None
    try:
        from accelerate import PartialState
    except ImportError:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]), None
    state = PartialState()
    return int(state.process_index), int(state.num_processes), state


def _ranks(args: argparse.Namespace) -> tuple[int, int, Any]:
    from hopfield_aa._errors import UsageError

    if args.rank is None and args.world_size is None:
        return _launcher_rank()
    if args.rank is None or args.world_size is None:
        raise UsageError("--rank and --world-size go together (e.g. --rank 0 --world-size 2)")
    if args.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {args.world_size}")
    if not 0 <= args.rank < args.world_size:
        raise UsageError(
            f"--rank must be in [0, {args.world_size}) for --world-size {args.world_size}, got {args.rank}"
        )
    return args.rank, args.world_size, None


def _merge(out: Path) -> int:
    from hopfield_aa._errors import UsageError
    from hopfield_aa.traces.format import TraceFormatError
    from hopfield_aa.traces.loader import TraceSet
    from hopfield_aa.traces.ranks import merge_ranks

    try:
        merge_ranks(out)
    except (FileNotFoundError, FileExistsError, TraceFormatError, ValueError) as exc:
        raise UsageError(f"--merge {out}: {exc}") from exc
    traces = TraceSet(out)
    n_ranks = len(traces.metadata["ranks"])
    state = "complete" if traces.complete else "INCOMPLETE (a rank did not finish)"
    print(f"merged {n_ranks} ranks: {len(traces)} records in {len(traces.shards)} shards, {state}: {out}")
    return 0


def run_capture(args: argparse.Namespace) -> int:
    """Entry point of ``hopfield-aa capture``."""
    from hopfield_aa._errors import UsageError
    from hopfield_aa.traces.capture import capture_pipeline
    from hopfield_aa.traces.ranks import rank_directory
    from hopfield_aa.traces.selection import Selection, parse_ints, parse_steps

    if args.out is None:
        raise UsageError("--out is required (the capture directory)")
    if args.merge:
        return _merge(args.out)
    for flag, value in (("--model", args.model), ("--prompts", args.prompts)):
        if value is None:
            raise UsageError(f"{flag} is required (unless --merge)")
    rank, world_size, state = _ranks(args)
    where = args.out if world_size == 1 else rank_directory(args.out, rank)
    if not args.prompts.is_file():
        raise UsageError(f"--prompts {args.prompts}: no such file")
    prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {args.prompts} holds no prompts (one per line)")
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
        raise UsageError(str(exc)) from exc
    pipe = load_pipeline(args.model, dtype=args.model_dtype)
    device = str(state.device) if state is not None and args.device == "cuda" else args.device
    pipe = pipe.to(device)
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
            rank=rank,
            world_size=world_size,
        )
    except FileExistsError as exc:
        raise UsageError(f"{where} already holds a capture; pass --overwrite to replace it") from exc
    print(f"captured {cap.n_records} records in {cap.n_shards} shards to {where}")
    if world_size > 1 and state is not None:  # accelerate launch: wait for every rank, rank 0 merges
        state.wait_for_everyone()
        if rank == 0:
            return _merge(args.out)
    elif world_size > 1:
        print(f"when every rank is done: hopfield-aa capture --merge {args.out}")
    return 0
