"""Evaluate every guidance rule on the reference model and write the tables and figures.

Writes analysis/results/guidance_eval.{md,json}, analysis/figures/guidance_*.png and papers/reproduction.md.
Single-threaded; about 15-20 minutes on one CPU core with the defaults (32 prompts × 2 seeds, 20 steps).

    python analysis/eval_guidance.py                 # bundled weights
    python analysis/eval_guidance.py --weights runs/reference/ema
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hopfield_aa.evaluation.report import evaluate_and_report
from hopfield_aa.reference.model import BUNDLED_WEIGHTS, WEIGHTS_NAME

ROOT = Path(__file__).resolve().parent.parent


def default_weights() -> Path:
    """The bundled weights, else the reference training run's final or latest EMA export."""
    for folder in (BUNDLED_WEIGHTS, ROOT / "runs/reference/final", ROOT / "runs/reference/ema"):
        if (folder / WEIGHTS_NAME).is_file():
            return folder
    raise SystemExit("no reference weights found (bundled, runs/reference/final or runs/reference/ema)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights", default=None, help="model folder (default: bundled, else the training run)"
    )
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise seeds per prompt")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--quick", action="store_true", help="one setting per rule (smoke run)")
    parser.add_argument("--no-paper", action="store_true", help="do not rewrite papers/reproduction.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    weights = Path(args.weights) if args.weights else default_weights()
    command = "python analysis/eval_guidance.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    evaluate_and_report(
        weights,
        n_prompts=args.prompts,
        seeds=args.seeds,
        steps=args.steps,
        quick=args.quick,
        results_dir=ROOT / "analysis/results",
        figures_dir=ROOT / "analysis/figures",
        extra_markdown=() if args.no_paper else (ROOT / "papers/reproduction.md",),
        command=command,
    )
    print((ROOT / "analysis/results/guidance_eval.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
