"""The guidance evaluation written out: Markdown tables with bootstrap intervals, plain verdicts on the
paper's claims computed from those numbers, image grids and the alignment-vs-Fréchet-distance curves.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hopfield_aa.evaluation.evaluate import FAMILIES, Evaluation, MethodResult
from hopfield_aa.reference.metrics import Estimate

CURVE_FAMILIES = (
    "cfg",
    "extrapolate",
    "gag",
    "gag_capped",
    "orthogonal",
    "ladder",
    "extrapolate_cfg",
    "gag_cfg",
    "gag_capped_cfg",
    "orthogonal_cfg",
    "ladder_cfg",
    "pag",
    "seg",
    "apg",
)
LAMBDA_FAMILIES = ("extrapolate", "gag", "gag_capped", "orthogonal", "ladder")
CFG_RULE_FAMILIES = tuple(f"{f}_cfg" for f in LAMBDA_FAMILIES)
_COLOURS = {
    "none": "black",
    "cfg": "tab:blue",
    "cfg_matched": "tab:blue",
    "extrapolate": "tab:orange",
    "full": "tab:orange",
    "gag": "tab:green",
    "gag_capped": "tab:olive",
    "orthogonal": "tab:red",
    "ladder": "tab:purple",
    "extrapolate_cfg": "tab:orange",
    "gag_cfg": "tab:green",
    "gag_capped_cfg": "tab:olive",
    "orthogonal_cfg": "tab:red",
    "ladder_cfg": "tab:purple",
    "pag": "tab:brown",
    "seg": "tab:pink",
    "apg": "tab:gray",
}
_DASHED = frozenset(CFG_RULE_FAMILIES)


def _fmt(e: Estimate, digits: int = 3) -> str:
    return f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


def _signed(e: Estimate, digits: int = 3) -> str:
    return f"{e.value:+.{digits}f} [{e.low:+.{digits}f}, {e.high:+.{digits}f}]"


# --------------------------------------------------------------------------------------------- tables


def main_table(ev: Evaluation) -> str:
    """One row per method: whole-caption accuracy, attribute score, FD, paired changes against no
    guidance, time."""
    lines = [
        "| method | CFG s | whole-caption accuracy [95% CI] | attribute score [95% CI] "
        "| FD to real renders [95% CI] | Δ whole vs none | Δ attribute score vs none | Δ FD vs none "
        "| time (s) |",
        "|---|---:|---|---|---|---|---|---|---:|",
    ]
    for r in ev.results:
        m = r.method
        if m.name == "none":
            gain = gain_attr = dfd = "—"
        else:
            gain = _signed(ev.paired_accuracy_gain(m.name, "none"))
            gain_attr = _signed(ev.paired_accuracy_gain(m.name, "none", "attributes"))
            dfd = _signed(ev.paired_fd_change(m.name, "none"), 2)
        lines.append(
            f"| {m.name} | {m.cfg_scale:g} | {_fmt(ev.accuracy(m.name))} "
            f"| {_fmt(ev.accuracy(m.name, 'attributes'))} | {_fmt(ev.fd(m.name), 2)} | {gain} | {gain_attr} "
            f"| {dfd} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def attribute_table(ev: Evaluation) -> str:
    """Per-attribute accuracy (mean over the images whose caption states the attribute)."""
    attrs = ev.attributes()
    lines = ["| method | " + " | ".join(attrs) + " |", "|---|" + "---:|" * len(attrs)]
    for r in ev.results:
        cells = [f"{ev.accuracy(r.method.name, a).value:.2f}" for a in attrs]
        lines.append(f"| {r.method.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attribute_ci_table(ev: Evaluation, names: Sequence[str]) -> str:
    """Per-attribute accuracy with bootstrap 95% intervals for a few methods."""
    attrs = ev.attributes()
    lines = ["| attribute | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in attrs:
        lines.append(f"| {a} | " + " | ".join(_fmt(ev.accuracy(n, a), 2) for n in names) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Comparison:
    """``name`` against ``baseline`` on the same prompts and noise: paired changes in accuracy and FD."""

    name: str
    baseline: str
    accuracy: Estimate
    fd: Estimate
    attributes: Estimate | None = None

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` when intervals exclude 0 in one direction only (higher whole-caption
        accuracy or attribute score, lower FD), ``mixed`` when metrics disagree significantly,
        ``no resolved difference`` otherwise."""
        gains = [self.accuracy] + ([self.attributes] if self.attributes is not None else [])
        better = any(g.low > 0 for g in gains) or self.fd.high < 0
        worse = any(g.high < 0 for g in gains) or self.fd.low > 0
        if better and worse:
            return "mixed"
        if better:
            return "better"
        if worse:
            return "worse"
        return "no resolved difference"

    def row(self) -> str:
        return (
            f"| {self.name} | {self.baseline} | {_signed(self.accuracy)} "
            f"| {'—' if self.attributes is None else _signed(self.attributes)} | {_signed(self.fd, 2)} "
            f"| {self.verdict} |"
        )


def compare(ev: Evaluation, name: str, baseline: str) -> Comparison:
    """The paired comparison of two methods."""
    return Comparison(
        name,
        baseline,
        ev.paired_accuracy_gain(name, baseline),
        ev.paired_fd_change(name, baseline),
        ev.paired_accuracy_gain(name, baseline, "attributes"),
    )


def _names(ev: Evaluation) -> set[str]:
    return {r.method.name for r in ev.results}


def _comparison_table(rows: Sequence[Comparison]) -> str:
    head = [
        "| method | against | Δ whole-caption accuracy [95% CI] | Δ attribute score [95% CI] "
        "| Δ FD [95% CI] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [c.row() for c in rows])


def geometry_claim(ev: Evaluation) -> tuple[str, str]:
    """Ordering of parallel only (ζ = 0), full residual and orthogonal only at matched λ."""
    names = _names(ev)
    rows: list[Comparison] = []
    statements: list[str] = []
    for lam in (0.5, 1.0, 2.0, 3.0):
        parallel = f"GAG ζ=0 λ={lam:g}"
        full = f"extrapolate λ={lam + 1:g}"  # S + λ r = D + (λ + 1) r
        orth = f"orthogonal λ={lam:g}"
        if parallel not in names:
            continue
        for other in (full, orth):
            if other in names:
                rows.append(compare(ev, parallel, other))
    if not rows:
        return "", "The ζ ordering was not evaluated."
    vs_orth = [c for c in rows if c.baseline.startswith("orthogonal")]
    vs_full = [c for c in rows if c.baseline.startswith("extrapolate")]
    statements.append(
        f"Parallel only (ζ = 0) against the full residual (ζ = 1, η = ∞, which is extrapolation at λ + 1): "
        f"{_tally(vs_full)}."
    )
    statements.append(f"Parallel only against orthogonal only at the same λ: {_tally(vs_orth)}.")
    n_better = sum(c.verdict == "better" for c in rows)
    n_against = sum(c.verdict in ("worse", "mixed") for c in rows)
    n_open = len(rows) - n_better - n_against
    statements.append(
        f"Of {len(rows)} paired comparisons, {n_better} resolve in the direction the paper reports "
        f"(ζ = 0 better), {n_against} against it (worse or mixed) and {n_open} are unresolved at this "
        "sample size."
    )
    if n_against == 0 and n_better > n_open:
        statements.append("The data support the paper's ordering.")
    elif n_against == 0 and n_better > 0:
        statements.append("The data lean toward the paper's ordering but mostly do not resolve it.")
    elif n_against == 0:
        statements.append("The data neither support nor contradict the paper's ordering.")
    elif n_better == 0:
        statements.append("The data do not support the paper's ordering.")
    else:
        statements.append("The data support the paper's ordering only in part.")
    if "full ζ=1 λ=1" in names and "extrapolate λ=2" in names:
        gap = float(np.abs(ev.result("full ζ=1 λ=1").images - ev.result("extrapolate λ=2").images).max())
        statements.append(
            "Check of the identity ζ = 1, η = ∞ ≡ extrapolation at λ + 1: GAG ζ = 1, λ = 1 and "
            f"extrapolation λ = 2 give images within {gap:.1e} (max abs pixel difference after all steps)."
        )
    return _comparison_table(rows), " ".join(statements)


def _tally(rows: Sequence[Comparison]) -> str:
    if not rows:
        return "not evaluated"
    counts: dict[str, int] = {}
    for c in rows:
        counts[c.verdict] = counts.get(c.verdict, 0) + 1
    return ", ".join(f"{v} at {n} of {len(rows)} λ" for v, n in counts.items())


def lambda_claim(ev: Evaluation) -> tuple[str, str]:
    """The λ curve of each attention rule: best λ for alignment and for FD, and the change against none."""
    lines = [
        "| rule | λ with best attribute score | its score | its Δ vs none (paired) | λ with lowest FD "
        "| its FD | score non-decreasing in λ? | FD non-decreasing in λ? |",
        "|---|---:|---|---|---:|---|---|---|",
    ]
    statements = []
    for family in LAMBDA_FAMILIES:
        members = ev.family(family)
        if not members:
            continue
        accs = [ev.accuracy(r.method.name, "attributes") for r in members]
        fds = [ev.fd(r.method.name) for r in members]
        best = members[int(np.argmax([a.value for a in accs]))]
        lowest = members[int(np.argmin([f.value for f in fds]))]
        gain = ev.paired_accuracy_gain(best.method.name, "none", "attributes")
        monotone = _non_decreasing([a.value for a in accs])
        fd_monotone = _non_decreasing([f.value for f in fds])
        lines.append(
            f"| {FAMILIES[family]} | {best.method.value:g} "
            f"| {_fmt(ev.accuracy(best.method.name, 'attributes'))} "
            f"| {_signed(gain)} | {lowest.method.value:g} | {_fmt(ev.fd(lowest.method.name), 2)} "
            f"| {monotone} | {fd_monotone} |"
        )
        if gain.low > 0:
            statements.append(
                f"{FAMILIES[family]}: raises the attribute score over no guidance at its best λ."
            )
        elif gain.high < 0:
            statements.append(f"{FAMILIES[family]}: lowers the attribute score even at its best λ.")
        else:
            statements.append(f"{FAMILIES[family]}: no resolved change in the attribute score at its best λ.")
    return "\n".join(lines), " ".join(statements)


def _non_decreasing(values: Sequence[float]) -> str:
    if len(values) < 2:
        return "one point"
    return "yes" if all(b >= a for a, b in itertools.pairwise(values)) else "no"


def cfg_claim(ev: Evaluation) -> tuple[str, str]:
    """Every rule on top of CFG, and the peer guiders, against CFG alone at the same scale."""
    names = _names(ev)
    rows = []
    for family in (*CFG_RULE_FAMILIES, "pag", "seg", "apg"):
        for r in ev.family(family):
            baseline = f"CFG s={r.method.cfg_scale:g}"
            if baseline in names:
                rows.append(compare(ev, r.method.name, baseline))
    if not rows:
        return "", "No rule was evaluated on top of CFG."
    counts: dict[str, int] = {}
    for c in rows:
        counts[c.verdict] = counts.get(c.verdict, 0) + 1
    tally = ", ".join(f"{v}: {n}" for v, n in counts.items())
    text = f"Rules and peers on top of CFG, against CFG alone at the same scale ({tally})."
    return _comparison_table(rows), text + _ceiling_note(ev, {c.baseline for c in rows})


CEILING = 0.99
"""Whole-caption accuracy from which a baseline leaves no room to improve on (the metric's ceiling)."""


def _ceiling_note(ev: Evaluation, baselines: set[str]) -> str:
    """A sentence naming the baselines already at the metric's ceiling, where "worse or equal" is all a
    comparison against them can show: those rows measure harm, not benefit."""
    full = sorted(
        (name, float(ev.result(name).alignment.whole.mean()))
        for name in baselines
        if float(ev.result(name).alignment.whole.mean()) >= CEILING
    )
    if not full:
        return ""
    named = ", ".join(f"{name} ({value:.3f})" for name, value in full)
    return (
        f" Ceiling: {named} already read{'s' if len(full) == 1 else ''} at least {CEILING:g} of the "
        "captions whole on this test set, so a method on top of it can only match or lose accuracy: "
        "these rows measure harm, not benefit; a benefit needs captions the baseline gets wrong."
    )


def calibrated_claim(ev: Evaluation) -> tuple[str, str]:
    """Each method against CFG at the scale of equal guidance magnitude (the calibrated comparison)."""
    if not ev.matched:
        return "", "Guidance magnitudes were not measured (no calibrated comparison)."
    lines = [
        "| method | guidance magnitude | matched CFG | Δ whole (paired) | Δ attribute score | Δ FD "
        "| verdict |",
        "|---|---:|---|---|---|---|---|",
    ]
    counts: dict[str, int] = {}
    for name, cfg in ev.matched.items():
        c = compare(ev, name, cfg)
        counts[c.verdict] = counts.get(c.verdict, 0) + 1
        attr = _signed(c.attributes) if c.attributes is not None else "—"
        lines.append(
            f"| {name} | {ev.magnitudes[name]:.3f} | {cfg} ({ev.magnitudes.get(cfg, float('nan')):.3f}) "
            f"| {_signed(c.accuracy)} | {attr} | {_signed(c.fd, 2)} | {c.verdict} |"
        )
    tally = ", ".join(f"{v}: {n} of {len(ev.matched)}" for v, n in counts.items())
    text = (
        "Guidance magnitude = mean ‖ε̂ − ε_c‖ / ‖ε_c‖ over steps and calibration samples (ε_c: the stock "
        "conditional prediction at the same state); each method is compared with CFG at the scale of equal "
        f"magnitude, on the same prompts and noise. Against magnitude-matched CFG: {tally}."
    )
    return "\n".join(lines), text


def _tally_s(rows: Sequence[Comparison]) -> str:
    return "; ".join(f"s = {c.baseline.split('=')[-1]}: {c.verdict}" for c in rows)


def frontier_claim(ev: Evaluation) -> tuple[str, str]:
    """Which attention-rule points CFG (swept) dominates: some CFG scale with accuracy at least as high and
    FD at least as low (point estimates). A rule point that no CFG scale dominates reaches something CFG
    alone does not.
    """
    cfg = [
        (ev.accuracy(r.method.name, "attributes").value, ev.fd(r.method.name).value, r.method.name)
        for r in ev.family("cfg")
    ]
    if not cfg:
        return "", "CFG was not swept."
    lines = [
        "| method | attribute score | FD | dominated by (CFG scales with ≥ score and ≤ FD; point estimates) "
        "|",
        "|---|---:|---:|---|",
    ]
    free = []
    for r in ev.results:
        if r.method.family in ("none", "cfg"):
            continue
        acc, fd = ev.accuracy(r.method.name, "attributes").value, ev.fd(r.method.name).value
        dominators = [name for a, f, name in cfg if a >= acc and f <= fd]
        lines.append(f"| {r.method.name} | {acc:.3f} | {fd:.2f} | {', '.join(dominators) or '—'} |")
        if not dominators:
            free.append(r.method.name)
    best_cfg = max(cfg, key=lambda t: (t[0], -t[1]))
    text = f"Best CFG point: {best_cfg[2]} (attribute score {best_cfg[0]:.3f}, FD {best_cfg[1]:.2f}). " + (
        f"Not dominated by any CFG scale: {', '.join(free)}."
        if free
        else "Every attention-space rule point is dominated by some CFG scale (point estimates)."
    )
    return "\n".join(lines), text


# --------------------------------------------------------------------------------------------- figures


def plot_alignment_vs_fd(ev: Evaluation, path: str | os.PathLike[str]) -> None:
    """Attribute score and whole-caption accuracy against FD, one curve per family, 95% score intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 7.2))
    for ax, score in zip(axes, ("attributes", "whole"), strict=True):
        _alignment_panel(ev, ax, score)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, frameon=False)
    fig.subplots_adjust(bottom=0.25)
    fig.suptitle(
        f"Alignment vs quality: {len(ev.captions)} samples per method, {ev.steps} steps (bars: 95% bootstrap "
        "CIs of the score; FD intervals and paired differences are in the tables)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _alignment_panel(ev: Evaluation, ax: Any, score: str) -> None:
    none = ev.results[0] if ev.results[0].method.family == "none" else None
    groups: list[tuple[str, list[MethodResult]]] = [(f, ev.family(f)) for f in CURVE_FAMILIES]
    if none is not None:
        groups.insert(0, ("none", [none]))
    for family, members in groups:
        if not members:
            continue
        acc = [ev.accuracy(r.method.name, score) for r in members]
        fd = [ev.fd(r.method.name) for r in members]
        x = np.array([f.value for f in fd])
        y = np.array([a.value for a in acc])
        yerr = np.array([[a.value - a.low for a in acc], [a.high - a.value for a in acc]]).clip(min=0)
        ax.errorbar(
            x,
            y,
            yerr=yerr,
            marker="s" if family in ("pag", "seg", "apg") else "o",
            ms=4,
            lw=1.2,
            ls="--" if family in _DASHED else "-",
            capsize=2,
            elinewidth=0.6,
            color=_COLOURS[family],
            label=FAMILIES[family],
        )
        for r, xi, yi in zip(members, x, y, strict=True):
            if family in ("cfg",):
                ax.annotate(
                    f"s={r.method.value:g}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6
                )
    ax.set_xlabel("Fréchet distance to real renders (reader features; lower is better)")
    label = (
        "attribute score: share of stated attributes read correctly"
        if score == "attributes"
        else ("whole-caption accuracy")
    )
    ax.set_ylabel(f"{label} (higher is better)")
    ax.grid(alpha=0.3, which="both")


def plot_lambda_curves(ev: Evaluation, path: str | os.PathLike[str]) -> None:
    """Paired change against no guidance of the attribute score and of FD, against λ, per attention rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(11, 4.2))
    getters = (
        (ax_acc, lambda name: ev.paired_accuracy_gain(name, "none", "attributes")),
        (ax_fd, lambda name: ev.paired_fd_change(name, "none")),
    )
    for family in LAMBDA_FAMILIES:
        members = ev.family(family)
        if not members or "none" not in _names(ev):
            continue
        lam = np.array([r.method.value for r in members])
        for ax, getter in getters:
            est = [getter(r.method.name) for r in members]
            ax.plot(
                lam, [e.value for e in est], marker="o", ms=4, color=_COLOURS[family], label=FAMILIES[family]
            )
            ax.fill_between(
                lam, [e.low for e in est], [e.high for e in est], color=_COLOURS[family], alpha=0.12, lw=0
            )
    for ax in (ax_acc, ax_fd):
        ax.axhline(0.0, color="black", lw=1, ls="--", label="no guidance")
        ax.grid(alpha=0.3)
        ax.set_xlabel("guidance scale λ")
    ax_acc.set_ylabel("Δ attribute score vs no guidance (higher is better)")
    ax_fd.set_ylabel("Δ Fréchet distance vs no guidance (lower is better)")
    ax_acc.legend(fontsize=6.5)
    fig.suptitle(
        "The λ curve of each attention rule: paired change against no guidance "
        "(shaded: paired 95% bootstrap CI)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_grid(
    ev: Evaluation, results: Sequence[MethodResult], path: str | os.PathLike[str], n_samples: int = 8
) -> None:
    """Rows: methods; columns: ``n_samples`` prompts (first seed, half two-object), captions on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # half one-object and half two-object prompts (evaluation_prompts lists the one-object ones first)
    half = ev.n_prompts // 2
    columns = [*range(min(n_samples // 2, half)), *range(half, half + n_samples - min(n_samples // 2, half))]
    columns = [c for c in columns if c < len(ev.captions)]
    n_samples = len(columns)
    fig, axes = plt.subplots(
        len(results), n_samples, figsize=(1.25 * n_samples + 1.6, 1.3 * len(results) + 0.6), squeeze=False
    )
    for i, r in enumerate(results):
        for j, index in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(np.clip(r.images[index], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ok = r.alignment.whole[index] > 0.5
            for spine in ax.spines.values():
                spine.set_color("tab:green" if ok else "tab:red")
                spine.set_linewidth(1.5)
            if i == 0:
                words = ev.captions[index].split()
                half = (len(words) + 1) // 2
                ax.set_title(" ".join(words[:half]) + "\n" + " ".join(words[half:]), fontsize=5)
            if j == 0:
                ax.set_ylabel(r.method.name, fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle("frame: green = whole caption read correctly, red = not", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_figures(ev: Evaluation, folder: str | os.PathLike[str], prefix: str = "guidance_") -> list[Path]:
    """The curve figures and one grid per family (with no guidance as the first row). Returns the paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{prefix}alignment_vs_fd.png", out / f"{prefix}lambda_curve.png"]
    plot_alignment_vs_fd(ev, paths[0])
    plot_lambda_curves(ev, paths[1])
    none = [r for r in ev.results if r.method.family == "none"]
    for family in FAMILIES:
        members = ev.family(family)
        if not members or family == "none":
            continue
        path = out / f"{prefix}grid_{family}.png"
        plot_grid(ev, none + members, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- report


_SPLIT_WORDS = {
    "train": "colour–shape combinations seen in training",
    "heldout": "held-out colour–shape combinations, never seen in training",
}


def markdown_report(ev: Evaluation, *, figures: dict[str, str] | None = None, command: str = "") -> str:
    """The full evaluation in Markdown: set-up, tables, the claims with their verdicts, figure links."""
    figures = figures or {}
    geometry_table, geometry_text = geometry_claim(ev)
    lambda_table, lambda_text = lambda_claim(ev)
    cfg_table, cfg_text = cfg_claim(ev)
    calibrated_table, calibrated_text = calibrated_claim(ev)
    frontier_table, frontier_text = frontier_claim(ev)
    main_names = [
        n for n in ("none", "CFG s=3", "extrapolate λ=2", "GAG ζ=0 λ=1", "ladder λ=2") if n in _names(ev)
    ]
    parts = [
        "## Set-up",
        "",
        f"- model: {ev.model}",
        f"- {ev.n_prompts} prompts (half one object, half two objects; {_SPLIT_WORDS[ev.split]}) × "
        f"{len(ev.seeds)} noise seeds "
        f"{ev.seeds} = {len(ev.captions)} samples per method; the same prompts and initial noise for every "
        f"method; DDIM, {ev.steps} steps"
        + (
            f"; time (s) is wall time, 1-min load average {ev.load_average[0]:.2f} before sampling and "
            f"{ev.load_average[1]:.2f} after, on {os.cpu_count()} cores"
            if ev.load_average is not None
            else ""
        ),
        f"- Fréchet distance: reader features of the samples against {ev.real_features.shape[0]} real "
        "renders of the same captions (random jitter); alignment read exactly from the pixels "
        "(no learned judge); *attribute score* = per image, the share of the caption's stated attributes "
        "(count, colours, shapes, size, position or relation) read correctly, a finer score than the "
        "whole caption",
        f"- intervals: percentile bootstrap, 95%, {ev.n_resamples} resamples (FD: basic bootstrap, "
        f"{ev.n_resamples // 2} resamples: an interval for the population FD, corrected for the upward "
        "finite-sample bias that resampling shows, so it may lie below the point estimate); "
        "Δ columns resample prompts and seeds jointly (paired)",
        f"- η of the capped GAG: {ev.eta:.4g} (the median ‖r_∥‖ of the reference model's cross-attention "
        "under stock sampling)",
        "- defaults: α = 1.5 (ladder: 1, 1.25, 1.5, 2), reference direction = the sparse retrieval, every "
        "cross-attention layer, both halves of a CFG batch",
    ]
    if command:
        parts += ["", f"Re-run: `{command}`"]
    parts += [
        "",
        "## Alignment and quality per method",
        "",
        main_table(ev),
        "",
        "## Per-attribute accuracy",
        "",
        attribute_table(ev),
        "",
        "With 95% intervals for the main settings:",
        "",
        attribute_ci_table(ev, main_names),
        "",
        "## The paper's claims against the data",
        "",
        "Verdicts come from paired 95% bootstrap intervals: *better* / *worse* when an interval of Δ "
        "whole-caption accuracy, Δ attribute score or Δ FD excludes 0 in one direction only, *mixed* when "
        "the metrics disagree, *no resolved difference* otherwise.",
        "",
        "### Ordering of ζ = 0, full residual and orthogonal only",
        "",
        geometry_table,
        "",
        geometry_text,
        "",
        "### The λ curve",
        "",
        lambda_table,
        "",
        lambda_text,
        "",
        "### On top of CFG",
        "",
        cfg_table,
        "",
        cfg_text,
        "",
        "### Against CFG of the same strength (calibrated)",
        "",
        calibrated_table,
        "",
        calibrated_text,
        "",
        "### Against CFG swept over its scale",
        "",
        frontier_table,
        "",
        frontier_text,
    ]
    if figures:
        parts += ["", "## Figures", ""]
        parts += [f"![{label}]({path})" + "\n" for label, path in figures.items()]
    return "\n".join(parts) + "\n"


def describe_weights(path: str | os.PathLike[str]) -> str:
    """A one-line description of a reference-model folder: its path and training step when recorded."""
    import json

    folder = Path(path)
    try:  # a path inside the working tree is shown relative to it
        text = str(folder.resolve().relative_to(Path.cwd()))
    except ValueError:
        text = str(folder)
    config = folder / "reference_model.json"
    if config.is_file():
        meta = json.loads(config.read_text(encoding="utf-8"))
        training = meta.get("training", {})
        if "step" in training:
            text += f" (training step {training['step']})"
    return text


def evaluate_and_report(
    weights: str | os.PathLike[str] | None,
    *,
    n_prompts: int = 32,
    seeds: Sequence[int] = (0, 1),
    steps: int = 20,
    quick: bool = False,
    cfg_scale: float = 3.0,
    calibration_samples: int = 32,
    split: str = "train",
    results_dir: str | os.PathLike[str],
    figures_dir: str | os.PathLike[str],
    name: str = "guidance_eval",
    extra_markdown: Sequence[str | os.PathLike[str]] = (),
    command: str = "",
    progress: bool = True,
) -> Evaluation:
    """Load the reference model, calibrate η, evaluate :func:`default_methods` (rules on top of CFG at
    ``cfg_scale``; guidance magnitudes on ``calibration_samples`` samples for the calibrated comparison),
    and write the report. ``split`` chooses the prompts' colour–shape combinations
    (:func:`evaluation_prompts`): ``"heldout"`` ones leave a model that is at the accuracy ceiling on
    seen ones room to improve.

    Writes ``results_dir/<name>.md`` and ``<name>.json`` and the figures under ``figures_dir``; each path
    in ``extra_markdown`` gets the same Markdown (e.g. ``papers/reproduction.md``) under its own title.
    """
    import torch

    from hopfield_aa._io import write_json, write_text
    from hopfield_aa.evaluation.evaluate import (
        calibrate_eta,
        default_methods,
        evaluate,
        evaluation_prompts,
        initial_noise,
    )
    from hopfield_aa.reference.pipeline import BUNDLED_PIPELINE, load_pipeline

    folder = Path(weights) if weights is not None else BUNDLED_PIPELINE
    pipe = load_pipeline(folder)
    prompts = evaluation_prompts(n_prompts, split=split)
    captions = [c for _ in seeds for c in prompts]
    with torch.no_grad():
        n_calibration = min(8, n_prompts)
        eta = calibrate_eta(
            pipe, prompts[:n_calibration], initial_noise(pipe, n_calibration, [seeds[0]]), steps
        )
    methods = default_methods(eta, cfg_scale=cfg_scale, quick=quick)
    ev = evaluate(
        pipe,
        methods,
        captions,
        n_prompts=n_prompts,
        seeds=seeds,
        steps=steps,
        eta=eta,
        model=describe_weights(folder),
        progress=progress,
        calibration_samples=calibration_samples,
        split=split,
    )
    figures = write_figures(ev, figures_dir, prefix="guidance_" if split == "train" else f"guidance_{split}_")
    results = Path(results_dir)

    def body_for(markdown_path: Path) -> str:
        # figure links relative to the Markdown file that shows them
        links = {p.stem: os.path.relpath(p.resolve(), markdown_path.resolve().parent) for p in figures}
        return markdown_report(ev, figures=links, command=command)

    write_json(results / f"{name}.json", ev.to_json())
    report = results / f"{name}.md"
    write_text(report, "# Guidance evaluation on the reference model\n\n" + body_for(report))
    for path in map(Path, extra_markdown):
        write_text(
            path,
            "# Reproduction: attention-space guidance on the reference model\n\n"
            "Generated by `analysis/eval_guidance.py` from the run it describes; do not edit by hand.\n\n"
            + body_for(path),
        )
    return ev
