"""The ``evaluate`` subcommand of ``hopfield-aa``: every guidance rule on the reference model, with exact
alignment, Fréchet distance, bootstrap intervals, grids and the alignment-vs-quality curve.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hopfield_aa._errors import UsageError, add_command, options


def add_parsers(subparsers: Any) -> None:
    """Add ``evaluate`` to the ``hopfield-aa`` command."""
    parser = add_command(
        subparsers,
        "evaluate",
        "evaluate attention-space guidance rules on the reference model",
        "Sample the reference pipeline under no guidance, CFG (swept), extrapolation, GAG (with and "
        "without the norm cap), the full residual, orthogonal only and the α-ladder, each without CFG "
        "and on top of CFG at --cfg-scale, and PAG/SEG/APG (diffusers guiders), on the same prompts and "
        "noise; compare each with CFG of the same guidance magnitude; score exact text alignment and the "
        "Fréchet distance to real renders with bootstrap intervals; write OUT/guidance_eval.md, "
        "OUT/guidance_eval.json and OUT/figures/guidance_*.png.",
        "Example: hopfield-aa evaluate --prompts 64 --seeds 0 1 --cfg-scale 3 --out eval/",
    )
    parser.add_argument(
        "--weights", default=None, help="reference model folder (default: the bundled weights)"
    )
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise seeds")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="CFG scale the rules are added to")
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=32,
        help="samples per guidance magnitude (0: no calibration)",
    )
    parser.add_argument(
        "--split",
        choices=("train", "heldout"),  # reference.dataset.SPLITS, not imported here: CLI start-up
        default="train",
        help="colour-shape combinations of the prompts: seen in training, or held out",
    )
    parser.add_argument("--quick", action="store_true", help="one setting per rule (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="guidance_eval", help="output folder")
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from hopfield_aa.evaluation.report import evaluate_and_report

    if args.prompts < 2 or args.steps < 1 or not args.seeds:
        raise UsageError("--prompts must be >= 2, --steps >= 1 and --seeds non-empty")
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    evaluate_and_report(
        args.weights,
        **options(
            args, "seeds", "steps", "quick", "cfg_scale", "calibration_samples", "split", n_prompts="prompts"
        ),
        results_dir=out,
        figures_dir=out / "figures",
        command=(
            f"hopfield-aa evaluate --prompts {args.prompts} --seeds {' '.join(map(str, args.seeds))} "
            f"--steps {args.steps} --cfg-scale {args.cfg_scale:g} --split {args.split}"
            f"{' --quick' if args.quick else ''}"
        ),
    )
    print(f"wrote {out / 'guidance_eval.md'}")
    return 0
