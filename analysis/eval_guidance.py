"""Evaluate every guidance rule on the reference pipeline and write the tables and figures.

The protocol: the same prompts and initial noise for every method; CFG swept over its scale; every
attention rule over λ without CFG and on top of CFG at the model's best scale (read from
``analysis/results/reference_eval.json`` unless ``--cfg-scale`` is given); PAG, SEG and APG as diffusers
guiders at that scale; each method compared with CFG of the same guidance magnitude; paired bootstrap
intervals throughout. Writes analysis/results/guidance_eval.{md,json}, analysis/figures/guidance_*.png and
papers/reproduction.md.

    python analysis/eval_guidance.py                          # bundled pipeline, 64 prompts x 2 seeds
    python analysis/eval_guidance.py --weights analysis/training/reference/ema --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from hopfield_aa.evaluation.report import evaluate_and_report
from hopfield_aa.reference.dataset import SPLITS
from hopfield_aa.reference.pipeline import BUNDLED_PIPELINE

ROOT = Path(__file__).resolve().parent.parent


def best_cfg_scale(default: float = 3.0) -> float:
    """The best CFG scale of the last reference evaluation (``reference_eval.json``), else ``default``."""
    path = ROOT / "analysis/results/reference_eval.json"
    if path.is_file():
        return float(json.loads(path.read_text(encoding="utf-8")).get("best_scale", default))
    return default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default=None, help="pipeline folder (default: the bundled one)")
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts (half single, half pair)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise seeds per prompt")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--cfg-scale", type=float, default=None, help="CFG scale of the rules on top of CFG")
    parser.add_argument("--calibration-samples", type=int, default=32, help="samples per guidance magnitude")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one setting per rule (smoke run)")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="train",
        help="prompts from seen colour-shape combinations (guidance_eval.*) or held-out ones "
        "(guidance_eval_heldout.*, figures guidance_heldout_*)",
    )
    parser.add_argument("--no-paper", action="store_true", help="do not rewrite papers/reproduction.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = Path(args.weights) if args.weights else BUNDLED_PIPELINE
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else best_cfg_scale()
    command = "python analysis/eval_guidance.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    name = "guidance_eval" if args.split == "train" else f"guidance_eval_{args.split}"
    load = os.getloadavg()[0]
    evaluate_and_report(
        weights,
        n_prompts=args.prompts,
        seeds=args.seeds,
        steps=args.steps,
        quick=args.quick,
        cfg_scale=cfg_scale,
        calibration_samples=args.calibration_samples,
        split=args.split,
        name=name,
        results_dir=ROOT / "analysis/results",
        figures_dir=ROOT / "analysis/figures",
        extra_markdown=()
        if args.no_paper
        else (
            ROOT
            / ("papers/reproduction.md" if args.split == "train" else f"papers/reproduction_{args.split}.md"),
        ),
        command=command,
    )
    print((ROOT / f"analysis/results/{name}.md").read_text(encoding="utf-8"))
    print(f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
