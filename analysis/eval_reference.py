"""Evaluate the reference model: alignment (per attribute and whole caption, seen and held-out combinations)
and Fréchet distance across classifier-free guidance scales, with 95 % bootstrap intervals; validate the
reader on clean, blurred and noisy renders; write analysis/results/reference_eval.md and figures.

Usage::

    python analysis/eval_reference.py                       # bundled weights
    python analysis/eval_reference.py --weights runs/reference/ema --per-cell 32 --scales 1 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hopfield_aa.reference import (
    ShapesDataset,
    alignment,
    bootstrap_ci,
    caption_combinations,
    caption_of,
    count_parameters,
    degrade,
    frechet_distance,
    image_features,
    load_pipeline,
    parse_caption,
    render,
    scene_from_attributes,
)
from hopfield_aa.reference.cli import sample_grid, save_grid

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "analysis" / "results"
FIGURES = ROOT / "analysis" / "figures"
CELLS = [("train", "single"), ("train", "pair"), ("heldout", "single"), ("heldout", "pair")]
SPLIT_NAME = {"train": "seen", "heldout": "held-out"}
ATTRIBUTES = {
    "single": ["count", "colour", "shape", "size", "position"],
    "pair": ["count", "colour_1", "shape_1", "relation", "colour_2", "shape_2"],
}


def eval_prompts(per_cell: int, seed: int) -> dict[tuple[str, str], list[str]]:
    """``per_cell`` captions per (split, kind), drawn with replacement from the grammar's combinations."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, kind in CELLS:
        pool = caption_combinations(split, kind)
        out[(split, kind)] = [caption_of(pool[int(i)]) for i in rng.integers(0, len(pool), per_cell)]
    return out


def generate(pipe, prompts: list[str], scale: float, steps: int, batch: int, seed0: int) -> np.ndarray:
    """Images for ``prompts``; prompt ``i`` starts from the noise of seed ``seed0 + i`` at every scale."""
    size = pipe.config.image_size
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        latents = torch.stack(
            [
                torch.randn((3, size, size), generator=torch.Generator().manual_seed(seed0 + start + k))
                for k in range(len(chunk))
            ]
        )
        images.append(pipe(chunk, num_inference_steps=steps, guidance_scale=scale, latents=latents))
    return np.concatenate(images)


def reader_validation(n: int, seed: int) -> list[tuple[str, dict[str, float]]]:
    """Reader accuracy on ``n`` renders of each split, clean and degraded."""
    rows = []
    images, captions = [], []
    for k, split in enumerate(("train", "heldout")):
        im, cap, _ = ShapesDataset(seed + k, split).batch(0, n)
        images.append(im)
        captions += cap
    clean = np.concatenate(images)
    for name, blur, noise in [
        ("clean", 0.0, 0.0),
        ("blur σ=0.5 px", 0.5, 0.0),
        ("blur σ=0.75 px", 0.75, 0.0),
        ("blur σ=1 px", 1.0, 0.0),
        ("noise σ=0.1", 0.0, 0.1),
        ("noise σ=0.2", 0.0, 0.2),
        ("blur 0.5 + noise 0.1", 0.5, 0.1),
    ]:
        rows.append((name, alignment(degrade(clean, blur, noise, seed=seed), captions).accuracy()))
    return rows


def fmt(est) -> str:
    return f"{est.value:.3f} [{est.low:.3f}, {est.high:.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default=None, help="model folder (default: bundled weights)")
    parser.add_argument("--per-cell", type=int, default=64, help="prompts per (split, caption type)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--n-real", type=int, default=1000, help="real renders for the Fréchet reference")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--training-note", default="", help="a sentence on how the weights were trained")
    parser.add_argument(
        "--loss-curve", default=str(ROOT / "runs" / "reference" / "loss.png"), help="copied to the figures"
    )
    parser.add_argument("--out", default=str(RESULTS / "reference_eval.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    pipe = load_pipeline(args.weights)
    meta_file = Path(args.weights or ROOT / "hopfield_aa" / "data" / "reference") / "config.json"
    meta = json.loads(meta_file.read_text())
    prompts = eval_prompts(args.per_cell, args.seed)
    all_prompts = [p for cell in CELLS for p in prompts[cell]]
    cell_of = np.array([i for i, cell in enumerate(CELLS) for _ in prompts[cell]])

    # Real renders of the same prompt distribution: the Fréchet reference.
    rng = np.random.default_rng(args.seed + 1)
    real_prompts = [all_prompts[int(i)] for i in rng.integers(0, len(all_prompts), args.n_real)]
    real_scenes = [scene_from_attributes(parse_caption(p), rng) for p in real_prompts]
    real_features = image_features(render(real_scenes))
    real_half = image_features(render([scene_from_attributes(parse_caption(p), rng) for p in real_prompts]))

    results: dict[float, dict] = {}
    generated: dict[float, np.ndarray] = {}
    for scale in tqdm(args.scales, desc="guidance scales"):
        images = generate(pipe, all_prompts, scale, args.steps, args.batch, args.seed)
        generated[scale] = images
        score = alignment(images, all_prompts)
        feats = image_features(images)
        fd = bootstrap_ci(
            feats, statistic=lambda f: frechet_distance(real_features, f), n_resamples=200, seed=args.seed
        )
        cells = {}
        for c, (split, kind) in enumerate(CELLS):
            mask = cell_of == c
            row = {
                a: bootstrap_ci(score.attributes[a][mask], n_resamples=args.n_boot) for a in ATTRIBUTES[kind]
            }
            row["whole"] = bootstrap_ci(score.whole[mask], n_resamples=args.n_boot)
            cells[(split, kind)] = row
        overall = {
            split: bootstrap_ci(
                score.whole[np.isin(cell_of, [i for i, c in enumerate(CELLS) if c[0] == split])]
            )
            for split in ("train", "heldout")
        }
        results[scale] = {"cells": cells, "fd": fd, "overall": overall}

    # Chance level of whole-caption accuracy for a model that ignores the caption but draws valid scenes.
    chance = {"single": 1 / (4 * 3 * 2 * 4), "pair": 1 / (2 * 4 * 3 * 3 * 3)}

    validation = reader_validation(500, args.seed)
    fd_real = frechet_distance(real_features, real_half)

    # --- figures ----------------------------------------------------------------------------------
    FIGURES.mkdir(parents=True, exist_ok=True)
    grid_seeds = [0, 1, 2, 3, 4, 5]
    grid_scales = [s for s in (1.0, 3.0) if s in args.scales] or args.scales[:1]
    for split, kind in CELLS:
        grid_prompts = prompts[(split, kind)][:5]
        for scale in grid_scales:
            imgs = sample_grid(pipe, grid_prompts, grid_seeds, scale, args.steps)
            save_grid(
                imgs,
                FIGURES / f"reference_grid_{SPLIT_NAME[split].replace('-', '')}_{kind}_cfg{scale:g}.png",
                grid_prompts,
                [f"seed {s}" for s in grid_seeds],
                title=f"{SPLIT_NAME[split]} {kind} captions, CFG scale {scale:g}, {args.steps} DDIM steps",
            )
    _plot_alignment_vs_fd(results, FIGURES / "reference_alignment_vs_fd.png", fd_real)
    if args.loss_curve and Path(args.loss_curve).is_file():
        shutil.copyfile(args.loss_curve, FIGURES / "reference_loss.png")

    # --- report -----------------------------------------------------------------------------------
    training = meta.get("training", {})
    n_params = count_parameters(pipe.unet) + count_parameters(pipe.text_encoder)
    lines = [
        "# Reference model evaluation",
        "",
        f"Weights: `{args.weights or 'hopfield_aa/data/reference (bundled)'}`; "
        f"{n_params:,} parameters (UNet {count_parameters(pipe.unet):,}, "
        f"text encoder {count_parameters(pipe.text_encoder):,}); "
        f"trained {training.get('step', '?')} steps, final loss (mean of last 200 steps) "
        f"{training.get('final_loss_mean_last_200', float('nan')):.4f}.",
        f"Sampling: DDIM, {args.steps} steps; {args.per_cell} prompts per (split, caption type), prompt i "
        f"starts from the noise of seed {args.seed}+i at every guidance scale; 95 % percentile bootstrap "
        f"intervals ({args.n_boot} resamples; 200 for the Fréchet distance).",
        f"Chance whole-caption accuracy for a caption-blind model drawing valid scenes: single "
        f"{chance['single']:.4f}, pair {chance['pair']:.4f}.",
        *([args.training_note, ""] if args.training_note else []),
        "",
        "Command: `python analysis/eval_reference.py "
        + (f"--weights {args.weights} " if args.weights else "")
        + f"--per-cell {args.per_cell} --scales {' '.join(f'{s:g}' for s in args.scales)}`",
        "",
        "## Whole-caption accuracy and Fréchet distance by guidance scale",
        "",
        "| CFG scale | seen: whole | held-out: whole | Fréchet distance (reader features) |",
        "|---|---|---|---|",
    ]
    for scale, res in results.items():
        lines.append(
            f"| {scale:g} | {fmt(res['overall']['train'])} | {fmt(res['overall']['heldout'])} "
            f"| {fmt(res['fd'])} |"
        )
    lines += [
        "",
        f"Fréchet distance between two independent sets of {args.n_real} real renders (the floor): "
        f"{fd_real:.4f}.",
        "",
    ]
    for split, kind in CELLS:
        attrs = [*ATTRIBUTES[kind], "whole"]
        lines += [
            f"## {SPLIT_NAME[split]} combinations, {kind}-object captions",
            "",
            "| CFG scale | " + " | ".join(attrs) + " |",
            "|---|" + "---|" * len(attrs),
        ]
        for scale, res in results.items():
            row = res["cells"][(split, kind)]
            lines.append(f"| {scale:g} | " + " | ".join(fmt(row[a]) for a in attrs) + " |")
        lines.append("")
    lines += [
        "## Reader validation (500 renders per split, both caption types)",
        "",
        "| images | " + " | ".join([*ATTRIBUTES["single"][1:], *ATTRIBUTES["pair"][1:], "whole"]) + " |",
        "|---|" + "---|" * (len(ATTRIBUTES["single"]) + len(ATTRIBUTES["pair"]) - 1),
    ]
    for name, acc in validation:
        cols = [*ATTRIBUTES["single"][1:], *ATTRIBUTES["pair"][1:], "whole"]
        lines.append(f"| {name} | " + " | ".join(f"{acc[c]:.3f}" for c in cols) + " |")
    lines += [
        "",
        "Figures: `analysis/figures/reference_grid_*.png` (rows: prompts, columns: seeds), "
        "`analysis/figures/reference_alignment_vs_fd.png`, `analysis/figures/reference_loss.png`.",
        f"Wall time of this evaluation: {time.time() - t_start:.0f} s on {args.threads} CPU thread(s).",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    summary = {
        f"{scale:g}": {
            "fd": vars(res["fd"]),
            "overall": {k: vars(v) for k, v in res["overall"].items()},
            "cells": {
                f"{s}/{k}": {a: vars(e) for a, e in row.items()} for (s, k), row in res["cells"].items()
            },
        }
        for scale, res in results.items()
    }
    json_out = out.with_suffix(".json")
    tmp = json_out.with_name(f".{json_out.name}.tmp")
    tmp.write_text(json.dumps({"fd_real_floor": fd_real, "scales": summary}, indent=2), encoding="utf-8")
    os.replace(tmp, json_out)
    print("\n".join(lines))
    return 0


def _plot_alignment_vs_fd(results: dict, path: Path, fd_floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    scales = list(results)
    fd = np.array([[results[s]["fd"].value, results[s]["fd"].low, results[s]["fd"].high] for s in scales])
    for split, marker in (("train", "o"), ("heldout", "s")):
        acc = np.array(
            [[vars(results[s]["overall"][split])[k] for k in ("value", "low", "high")] for s in scales]
        )
        ax.errorbar(
            fd[:, 0],
            acc[:, 0],
            xerr=[fd[:, 0] - fd[:, 1], fd[:, 2] - fd[:, 0]],
            yerr=[acc[:, 0] - acc[:, 1], acc[:, 2] - acc[:, 0]],
            marker=marker,
            capsize=3,
            label=f"{SPLIT_NAME[split]} combinations",
        )
        for s, x, y in zip(scales, fd[:, 0], acc[:, 0], strict=True):
            ax.annotate(f"s={s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(fd_floor, color="grey", ls=":", label="real vs real")
    ax.set_xscale("log")
    ax.set_xlabel("Fréchet distance to real renders (reader features, log scale)")
    ax.set_ylabel("whole-caption accuracy")
    ax.set_title("reference model: CFG scale sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
