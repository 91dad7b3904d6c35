"""The ``train-reference`` and ``sample`` subcommands of ``hopfield-aa``: train the reference model from a
config file, and write an image grid for given prompts, seeds and guidance scale.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def add_parsers(subparsers: Any) -> None:
    """Add ``train-reference`` and ``sample`` to the ``hopfield-aa`` command."""
    train = subparsers.add_parser(
        "train-reference",
        help="train the reference text-to-image diffusion model",
        description=(
            "Train the reference diffusion model on the procedural shapes dataset. Resumes from "
            "OUT_DIR/checkpoint when present; writes checkpoints, the EMA weights (OUT_DIR/ema, "
            "OUT_DIR/final) and the loss curve (OUT_DIR/loss.png)."
        ),
        epilog="Example: hopfield-aa train-reference --config hopfield_aa/data/reference/train_config.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", required=True, help="training config (.json or .toml)")
    train.add_argument("--out-dir", default=None, help="override the config's out_dir")
    train.add_argument("--steps", type=int, default=None, help="override the config's steps")
    train.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_run_train)

    sample = subparsers.add_parser(
        "sample",
        help="sample an image grid from the reference model",
        description=(
            "Sample one image per (prompt, seed) from the reference model and save them as a grid PNG "
            "(rows: prompts, columns: seeds)."
        ),
        epilog=(
            'Example: hopfield-aa sample --prompt "a small red circle at the top" '
            '--prompt "a blue square left of a yellow triangle" --seeds 0 1 2 3 --guidance-scale 3 '
            "--out grid.png"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sample.add_argument("--prompt", action="append", required=True, help="a caption (repeatable)")
    sample.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one column per seed")
    sample.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale")
    sample.add_argument("--steps", type=int, default=25, help="denoising steps")
    sample.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim")
    sample.add_argument("--weights", default=None, help="model folder (default: the bundled weights)")
    sample.add_argument("--out", default="reference_samples.png", help="output PNG")
    sample.set_defaults(func=_run_sample)


def _run_train(args: argparse.Namespace) -> int:
    from hopfield_aa.reference.train import TrainConfig, load_config, train_reference

    config = load_config(args.config)
    data = config.to_dict()
    if args.out_dir is not None:
        data["out_dir"] = args.out_dir
    if args.steps is not None:
        data["steps"] = args.steps
    config = TrainConfig.from_dict(data)
    summary = train_reference(config, resume=not args.no_resume, progress=not args.quiet)
    print(
        f"trained {summary['steps']} steps ({summary['seconds_per_step']:.3f} s/step this run), "
        f"final loss {summary['final_loss']:.4f}; EMA weights in {summary['final']}"
    )
    return 0


def sample_grid(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float = 1.0,
    num_inference_steps: int = 25,
) -> np.ndarray:
    """Images ``(len(prompts), len(seeds), H, W, 3)``; image ``(i, j)`` uses the noise of ``seeds[j]``.

    The initial noise of each seed is drawn from ``torch.Generator().manual_seed(seed)``, so a seed gives
    the same starting point whatever the prompt or guidance scale.
    """
    import torch

    size = pipe.config.image_size
    noise = torch.stack(
        [torch.randn((3, size, size), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )
    latents = noise.repeat(len(prompts), 1, 1, 1)
    batch_prompts = [p for p in prompts for _ in seeds]
    images = pipe(
        batch_prompts,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        latents=latents,
    )
    return np.asarray(images).reshape(len(prompts), len(seeds), size, size, 3)


def save_grid(
    images: np.ndarray,
    path: str | os.PathLike[str],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
) -> Path:
    """Save an image grid ``(rows, cols, H, W, 3)`` with labelled rows and columns as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols + 2.8, 1.2 * rows + 0.6), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(np.clip(images[i, j], 0.0, 1.0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_labels[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, target)
    return target


def _run_sample(args: argparse.Namespace) -> int:
    from hopfield_aa.reference.dataset import parse_caption
    from hopfield_aa.reference.model import load_pipeline

    for prompt in args.prompt:
        if prompt:
            parse_caption(prompt)  # fail early on captions outside the grammar
    pipe = load_pipeline(args.weights, scheduler=args.scheduler)
    images = sample_grid(pipe, args.prompt, args.seeds, args.guidance_scale, args.steps)
    out = save_grid(
        images,
        args.out,
        row_labels=args.prompt,
        col_labels=[f"seed {s}" for s in args.seeds],
        title=f"guidance scale {args.guidance_scale:g}, {args.steps} {args.scheduler} steps",
    )
    print(f"wrote {out}")
    return 0
