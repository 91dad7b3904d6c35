"""The ``train-reference`` and ``sample`` subcommands of ``hopfield-aa``: train the reference pipeline from
a config file, and write an image grid for given captions, seeds and guidance scale.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hopfield_aa._errors import UsageError

DEFAULT_CONFIG = "analysis/training/reference_config.json"


def add_parsers(subparsers: Any) -> None:
    """Add ``train-reference`` and ``sample`` to the ``hopfield-aa`` command."""
    from hopfield_aa.reference.dataset import GRAMMAR
    from hopfield_aa.reference.pipeline import SCHEDULERS

    defaults = argparse.ArgumentDefaultsHelpFormatter
    train = subparsers.add_parser(
        "train-reference",
        help="train the reference text-to-image pipeline (autoencoder, then UNet + text encoder)",
        description=(
            "Train the reference Stable-Diffusion-shaped pipeline on the procedural shapes dataset: first "
            "the AutoencoderKL, then the UNet and the CLIP text encoder on its latents. Resumes from "
            "OUT_DIR/checkpoint when present; writes checkpoints, the EMA pipeline (OUT_DIR/ema, and "
            "OUT_DIR/final in float16 at the end) and the loss curves (OUT_DIR/loss.png). SIGTERM or Ctrl-C "
            "stops after the current step and still writes the checkpoint."
        ),
        epilog=f"Example: hopfield-aa train-reference --config {DEFAULT_CONFIG} --max-minutes 60",
        formatter_class=defaults,
    )
    train.add_argument("--config", default=DEFAULT_CONFIG, help="training config (.json or .toml)")
    train.add_argument("--out-dir", default=None, help="override the config's out_dir")
    train.add_argument("--steps", type=int, default=None, help="override the config's denoiser steps")
    train.add_argument("--max-minutes", type=float, default=None, help="override the config's time limit")
    train.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="do not train: write the latest checkpoint's EMA weights to DIR as a float16 pipeline",
    )
    train.set_defaults(func=_run_train)

    sample = subparsers.add_parser(
        "sample",
        help="sample an image grid from the reference pipeline",
        description=(
            "Sample one image per (caption, seed) from the reference pipeline and save them as a grid PNG "
            f"(rows: captions, columns: seeds). The model knows one small language: {GRAMMAR}."
        ),
        epilog=(
            'Example: hopfield-aa sample --prompt "a small red circle at the top" '
            '--prompt "a blue square left of a yellow triangle" --seeds 0 1 2 3 --guidance-scale 5 '
            "--out grid.png"
        ),
        formatter_class=defaults,
    )
    sample.add_argument("--prompt", action="append", required=True, help="a caption (repeatable)")
    sample.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one column per seed")
    sample.add_argument(
        "--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale s (1: none)"
    )
    sample.add_argument("--steps", type=int, default=25, help="denoising steps")
    sample.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="the sampler")
    sample.add_argument("--weights", default=None, help="pipeline folder (default: the bundled one)")
    sample.add_argument("--out", default="reference_samples.png", help="output PNG")
    sample.set_defaults(func=_run_sample)


def _run_train(args: argparse.Namespace) -> int:
    from hopfield_aa.reference.train import TrainConfig, load_config, train_reference

    if not Path(args.config).is_file():
        raise UsageError(f"--config: no such file: {args.config}")
    try:
        config = load_config(args.config)
        data = config.to_dict()
        for key in ("out_dir", "steps", "max_minutes"):
            if getattr(args, key) is not None:
                data[key] = getattr(args, key)
        config = TrainConfig.from_dict(data)
    except ValueError as err:
        raise UsageError(f"--config {args.config}: {err}") from err
    if args.export is not None:
        from hopfield_aa.reference.train import export_checkpoint

        try:
            out = export_checkpoint(config.out_dir, args.export)
        except FileNotFoundError as err:
            raise UsageError(f"--export: {err}") from None
        print(f"wrote {out}")
        return 0
    summary = train_reference(config, resume=not args.no_resume, progress=not args.quiet)
    print(
        f"trained {summary['steps']} steps ({summary['seconds_per_step']:.3f} s/step this run), "
        f"final loss {summary['final_loss']:.4f}; EMA pipeline in {summary['final']}"
    )
    return 0


def check_captions(prompts: Sequence[str]) -> None:
    """Raise :class:`UsageError` naming the first caption outside the grammar and the nearest valid one."""
    from hopfield_aa.reference.dataset import GRAMMAR, nearest_caption, parse_caption

    for prompt in prompts:
        if not prompt:
            continue
        try:
            parse_caption(prompt)
        except ValueError:
            raise UsageError(
                f"--prompt {prompt!r} is not a caption the model knows; nearest: "
                f"{nearest_caption(prompt)!r}\n({GRAMMAR})"
            ) from None


def sample_grid(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float = 1.0,
    num_inference_steps: int = 25,
) -> np.ndarray:
    """Images ``(len(prompts), len(seeds), H, W, 3)``; image ``(i, j)`` starts from the noise of
    ``seeds[j]`` (:func:`~hopfield_aa.reference.pipeline.initial_latents`), whatever the prompt."""
    from hopfield_aa.reference.pipeline import generate, image_size_of, initial_latents

    noise = initial_latents(pipe, seeds)
    latents = noise.repeat(len(prompts), 1, 1, 1)
    batch_prompts = [p for p in prompts for _ in seeds]
    images = generate(
        pipe, batch_prompts, latents, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale
    )
    size = image_size_of(pipe)
    return images.reshape(len(prompts), len(seeds), size, size, 3)


def save_grid(
    images: np.ndarray,
    path: str | os.PathLike[str],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
) -> Path:
    """Save an image grid ``(rows, cols, H, W, 3)`` with labelled rows and columns as a PNG."""
    from hopfield_aa._io import save_figure
    from hopfield_aa.reference.plots import grid_figure

    return save_figure(grid_figure(images, row_labels, col_labels, title), path, dpi=110)


def _run_sample(args: argparse.Namespace) -> int:
    from hopfield_aa.reference.pipeline import load_pipeline

    check_captions(args.prompt)
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.guidance_scale):
        raise UsageError(f"--guidance-scale must be finite, got {args.guidance_scale}")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    try:
        pipe = load_pipeline(args.weights, scheduler=args.scheduler)
    except FileNotFoundError as err:
        raise UsageError(f"--weights: {err}") from None
    images = sample_grid(pipe, args.prompt, args.seeds, args.guidance_scale, args.steps)
    out = save_grid(
        images,
        args.out,
        row_labels=args.prompt,
        col_labels=[f"seed {s}" for s in args.seeds],
        title=f"guidance scale {args.guidance_scale:g}, {args.steps} {args.scheduler} steps",
    )
    print(f"wrote {out.resolve()}")
    return 0
