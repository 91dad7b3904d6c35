"""Capture the bundled attention traces of the reference model (``hopfield_aa/data/traces/``) and summarise a
``verify`` run on them as Markdown (``analysis/results/reference_traces_verify.md``).

The bundle holds two captures made from the same sampling runs (prompt ``i`` of
``hopfield_aa/data/prompts.txt`` with seed ``seed + i``, DDIM, classifier-free guidance, conditional row):

- ``cross/``: every cross-attention layer, every other denoising step, all heads, a seeded subset of query
  tokens;
- ``self/``: every self-attention layer at a few steps and the first heads (what fits the size budget).

Each manifest records the pipeline's identity (:func:`hopfield_aa.reference.pipeline_sha256` of the
pipeline folder), where it came from (the bundled pipeline or a given folder) and the device.
The bundle is written to a temporary folder beside the bundled path, validated, then renamed into place.

Run::

    python analysis/capture_reference_traces.py                        # capture from the bundled pipeline
    python analysis/capture_reference_traces.py --weights analysis/training/reference/ema
    hopfield-aa verify --traces hopfield_aa/data/traces --out /tmp/verify_traces
    python analysis/capture_reference_traces.py --verify-wide /tmp/verify_traces_wide
    python analysis/capture_reference_traces.py --summarise /tmp/verify_traces_wide/results.json \\
        --default-results /tmp/verify_traces/results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hopfield_aa._errors import options
from hopfield_aa._io import atomic_folder, write_text
from hopfield_aa.checks import report as verify_report
from hopfield_aa.checks.claims import LADDER
from hopfield_aa.checks.registry import REGISTRY, VALUE_SPACE, claim_order
from hopfield_aa.checks.report import TABLE_COLUMNS, table_rows
from hopfield_aa.checks.results import (
    KIND_CLAIM,
    KIND_IDENTITY,
    KIND_MEASURED,
    STATUS_FAIL,
    STATUS_MEASURED,
    STATUS_PREMISE,
    CheckResult,
    case_results,
    from_jsonable,
)
from hopfield_aa.reference import BUNDLED_PIPELINE, load_pipeline, parse_caption, pipeline_sha256, split_of
from hopfield_aa.traces import MANIFEST_NAME, Selection, TraceCapture, TraceSet, run_metadata

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_TRACES = ROOT / "hopfield_aa" / "data" / "traces"
PROMPTS = ROOT / "hopfield_aa" / "data" / "prompts.txt"
RESULTS_MD = ROOT / "analysis" / "results" / "reference_traces_verify.md"
GPU_NOTE = "captured on CPU: no GPU was available; a capture on a GPU is still to be made"


# --------------------------------------------------------------------------------------------- capture
@dataclass(frozen=True)
class CaptureSettings:
    """What the bundled capture records (every field is stored in the manifests).

    ``steps`` DDIM steps per prompt with CFG scale ``guidance_scale``; cross-attention at every
    ``record_every``-th step, self-attention at ``self_steps`` and heads ``self_heads`` only; at most
    ``max_query_tokens`` query tokens per record (drawn with ``query_seed``); tensors stored as ``dtype``.
    """

    steps: int = 20
    record_every: int = 2
    guidance_scale: float = 3.0
    seed: int = 0
    max_query_tokens: int = 64
    query_seed: int = 0
    dtype: str = "float16"
    self_steps: tuple[int, ...] = (0, 6, 12, 18)
    self_heads: tuple[int, ...] = (0, 1)
    scheduler: str = "ddim"
    max_mb: float = 20.0
    batch_indices: tuple[int, ...] = (-1,)

    def selections(self) -> dict[str, Selection]:
        """The two captures of the bundle: ``cross`` and ``self``."""
        return {
            "cross": Selection(
                kinds=("cross",),
                steps=tuple(range(0, self.steps, self.record_every)),
                max_query_tokens=self.max_query_tokens,
                query_seed=self.query_seed,
                batch_indices=self.batch_indices,
            ),
            "self": Selection(
                kinds=("self",),
                steps=self.self_steps,
                heads=self.self_heads,
                max_query_tokens=self.max_query_tokens,
                query_seed=self.query_seed,
                batch_indices=self.batch_indices,
            ),
        }


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def resolve_weights(weights: str | None) -> tuple[Path, str]:
    """The pipeline folder and how it was chosen: ``bundled`` or ``given``."""
    folder = BUNDLED_PIPELINE if weights is None else Path(weights)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no reference pipeline in {folder} (no model_index.json)")
    return folder, "bundled" if folder.resolve() == BUNDLED_PIPELINE.resolve() else "given"


def snapshot_weights(folder: Path, into: Path) -> dict[str, Any]:
    """Copy the pipeline folder into ``into`` and describe it.

    A training run may replace the folder at any moment; the copy makes the weights loaded, the hash
    recorded and the training step read all refer to one version: the copy is retried until the source
    still hashes to what was copied.
    """
    for attempt in range(10):
        try:
            shutil.rmtree(into, ignore_errors=True)
            shutil.copytree(folder, into)
            if pipeline_sha256(folder) == pipeline_sha256(into):
                break
        except (FileNotFoundError, shutil.Error):
            if attempt == 9:
                raise
        time.sleep(3.0)
    else:
        raise RuntimeError(f"{folder} kept changing while it was copied")
    meta = json.loads((into / "reference_model.json").read_text(encoding="utf-8"))
    training = meta.get("training", {})
    return {
        "weights_path": _relative(folder),
        "weights_sha256": pipeline_sha256(into),
        "weights_training_step": training.get("step"),
        "weights_final_loss": training.get("final_loss_mean_last_200"),
    }


def read_prompts(path: Path) -> list[str]:
    """Non-blank lines of ``path``; each must be a caption of the dataset grammar."""
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for prompt in prompts:
        parse_caption(prompt)  # raises ValueError naming the caption
    return prompts


def _capture_part(
    pipe: Any,
    prompts: Sequence[str],
    directory: Path,
    selection: Selection,
    settings: CaptureSettings,
    metadata: dict[str, Any],
) -> int:
    """Run every prompt through ``pipe`` under one :class:`TraceCapture` into ``directory``.

    Prompt ``i`` runs with seed ``settings.seed + i``, so every part of the bundle sees the same sampling
    trajectories. Returns the number of records.
    """
    from tqdm.auto import tqdm

    cap = TraceCapture(pipe, directory, selection=selection, dtype=settings.dtype, metadata=metadata)
    with cap:
        for prompt_id, prompt in enumerate(tqdm(prompts, desc=f"capture {directory.name}", unit="prompt")):
            run_seed = settings.seed + prompt_id
            attributes = parse_caption(prompt)
            cap.begin_run(
                prompt_id=prompt_id,
                seed=run_seed,
                prompt=prompt,
                steps=settings.steps,
                objects=int(attributes["count"]),  # type: ignore[call-overload]
                split=split_of(attributes),
            )
            pipe(
                prompt,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(run_seed),
                output_type="latent",
            )
    return cap.n_records


def folder_bytes(path: Path) -> int:
    """Total size of the regular files below ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the UNet's cross-attention modules (``Attention`` with ``is_cross_attention``)."""
    return [
        name
        for name, module in unet.named_modules()
        if getattr(module, "is_cross_attention", False) and hasattr(module, "processor")
    ]


def check_bundle(
    folder: Path, expected_cross_layers: Sequence[str], settings: CaptureSettings
) -> dict[str, Any]:
    """Validate every capture in ``folder`` (hashes, shapes, completeness) and the coverage; return counts."""
    info: dict[str, Any] = {}
    for part in ("cross", "self"):
        traces = TraceSet(folder / part)
        counts = traces.validate()
        if not traces.complete:
            raise RuntimeError(f"{folder / part}: capture did not complete")
        info[part] = {**counts, "layers": len(traces.layers), "steps": traces.steps}
    cross = TraceSet(folder / "cross")
    missing = sorted(set(expected_cross_layers) - set(cross.layers))
    if missing:
        raise RuntimeError(f"cross capture misses cross-attention layers {missing}")
    expected_steps = list(range(0, settings.steps, settings.record_every))
    if cross.steps != expected_steps:
        raise RuntimeError(f"cross capture has steps {cross.steps}, expected {expected_steps}")
    return info


def _readme(meta: dict[str, Any], settings: CaptureSettings, info: dict[str, Any], size: int) -> str:
    lines = [
        "# Bundled attention traces of the reference model",
        "",
        "Written by `analysis/capture_reference_traces.py`; do not edit by hand. Two captures in the",
        "`hopfield_aa.traces` format (read each with `hopfield_aa.traces.TraceSet`; `hopfield-aa verify`",
        "reads both by default):",
        "",
        f"- `cross/`: every cross-attention layer, steps {info['cross']['steps']}, all heads "
        f"({info['cross']['records']} records);",
        f"- `self/`: every self-attention layer, steps {info['self']['steps']}, heads "
        f"{list(settings.self_heads)} ({info['self']['records']} records).",
        "",
        f"Prompts: `hopfield_aa/data/prompts.txt` (prompt i with seed {settings.seed}+i), "
        f"{settings.steps} {settings.scheduler.upper()} steps, CFG scale {settings.guidance_scale:g}, "
        f"conditional batch row only, at most {settings.max_query_tokens} query tokens per record "
        f"(query seed {settings.query_seed}), stored as {settings.dtype}; {size / 2**20:.2f} MiB in all.",
        "",
        f"Pipeline: `{meta['weights_path']}` ({meta['weights_source']}), pipeline SHA-256 "
        f"`{meta['weights_sha256']}`, training step {meta['weights_training_step']}.",
        f"Device: {meta['device_name']} ({meta['device_note']}).",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    return "\n".join(lines)


def capture_bundle(
    out: Path, weights: str | None, prompts_file: Path, settings: CaptureSettings, command: str
) -> dict[str, Any]:
    """Capture the bundle into a temporary folder beside ``out``, validate it, then rename it to ``out``.

    Returns the run description (weights identity, record counts, size, wall time).
    """
    start = time.perf_counter()
    folder, source = resolve_weights(weights)
    prompts = read_prompts(prompts_file)
    out = out.resolve()
    with atomic_folder(out) as staging:  # the bundle appears whole, or the old one stays
        snapshot = staging / ".weights"
        identity = snapshot_weights(folder, snapshot)
        pipe = load_pipeline(snapshot, scheduler=settings.scheduler)
        expected_layers = cross_attention_layers(pipe.unet)
        meta: dict[str, Any] = {
            **identity,
            "weights_source": source,
            "device_note": GPU_NOTE if not torch.cuda.is_available() else "captured on a GPU",
            "prompts": prompts,
            "prompts_file": _relative(prompts_file),
            "seed": settings.seed,
            "num_inference_steps": settings.steps,
            "pipeline_kwargs": {"guidance_scale": settings.guidance_scale, "scheduler": settings.scheduler},
            "capture_settings": {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()
            },
            "command": command,
        }
        counts = {}
        for part, selection in settings.selections().items():
            counts[part] = _capture_part(
                pipe, prompts, staging / part, selection, settings, {**meta, "bundle_part": part}
            )
        shutil.rmtree(snapshot)
        info = check_bundle(staging, expected_layers, settings)
        meta.update(
            {
                k: v
                for k, v in run_metadata(pipe.unet).items()
                if k in ("device", "device_name", "torch_version")
            }
        )
        size = folder_bytes(staging)
        (staging / "README.md").write_text(_readme(meta, settings, info, size), encoding="utf-8")
        size = folder_bytes(staging)
        if size > settings.max_mb * 2**20:
            raise RuntimeError(f"capture is {size / 2**20:.2f} MiB, over the {settings.max_mb} MiB budget")
    return {
        **identity,
        "weights_source": source,
        "records": counts,
        "cross_layers": expected_layers,
        "bytes": size,
        "seconds": time.perf_counter() - start,
        "out": str(out),
    }


# ------------------------------------------------------------------------------------------ verify wide
def verify_wide(traces: Path, out: Path, max_records: int) -> float:
    """Run every check on ``max_records`` records per capture (spread over layer and step), no synthetic data.

    ``hopfield-aa verify`` reads 8 records per capture; this reads more so that every layer and step bucket
    is represented. Writes the usual report folder; returns the checks' wall time in seconds.
    """
    from hopfield_aa.checks.report import VerifyConfig, format_table, run_verification, write_report

    config = VerifyConfig(families=[], traces=str(traces), max_records=max_records)
    doc = run_verification(config, out)
    write_report(doc, out)
    print(format_table(doc["summary"]))
    return float(doc["seconds"])


# ------------------------------------------------------------------------------------------- summarise
BUCKETS = ("early", "middle", "late")
COUNTEREXAMPLES = ROOT / "analysis" / "results" / "reference_traces_counterexamples"
COUNTEREXAMPLES_KEPT = 3
"""Counter-examples kept beside the Markdown per claim: those with the most negative margins."""

Cell = tuple[str, str, str]
"""(attention kind, layer, step bucket)."""

SECTIONS = (
    (KIND_CLAIM, "Claims (evidence)"),
    (KIND_MEASURED, "Measured (no verdict)"),
    (KIND_IDENTITY, "Identities (regression tests of the library's rule, never evidence)"),
)


def short_layer(name: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` -> ``down_blocks.1.0.attn2``."""
    return name.replace(".transformer_blocks.0", "").replace("attentions.", "")


def _bucket(step: int, n_steps: int) -> str:
    return BUCKETS[min(len(BUCKETS) - 1, step * len(BUCKETS) // max(1, n_steps))]


def _layer_order(name: str) -> tuple[int, int, str]:
    for rank, prefix in enumerate(("down_blocks", "mid_block", "up_blocks")):
        if name.startswith(prefix):
            block = int(name.split(".")[1]) if prefix != "mid_block" else 0
            return rank, block, name
    return 9, 0, name


def _cell_order(cell: Cell) -> tuple[str, tuple[int, int, str], int]:
    return cell[0], _layer_order(cell[1]), BUCKETS.index(cell[2])


def _number(value: Any) -> float:
    """A JSON number (results.json writes NaN and infinities as strings) as a float; NaN if none."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any, spec: str = ".3g") -> str:
    number = _number(value)
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    return "—" if math.isnan(number) else format(number, spec)


def _share(part: int, whole: int) -> str:
    """``part / whole`` as a percentage that never rounds a partial share to 0 % or 100 %."""
    if whole == 0:
        return "—"
    text = f"{100 * part / whole:.0f}%"
    return f"{part}/{whole}" if text in ("0%", "100%") and 0 < part < whole else text


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _median(values: Iterable[Any]) -> float:
    finite = sorted(v for v in (_number(x) for x in values) if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])


def _manifest_metadata(trace_dirs: Iterable[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for d in sorted(set(trace_dirs)):
        for path in (Path(d) / MANIFEST_NAME, ROOT / d / MANIFEST_NAME):
            if path.is_file():
                out[d] = json.loads(path.read_text(encoding="utf-8"))["metadata"]
                break
    return out


@dataclass
class _Digest:
    """The trace results of one results.json pooled by the verify summary
    (:func:`hopfield_aa.checks.report.summarise`): per attention kind, and per kind, layer and
    step bucket (a *cell*)."""

    n_steps: int
    kinds: list[str]
    cells: list[Cell]  # every cell with head cases or value-space rows, in report order
    cases_in: dict[Cell, int]  # head cases per cell
    states: list[int]  # starting states per head case
    by_kind: list[dict[str, Any]]  # summary rows, one per (claim, setting, kind)
    by_cell: dict[tuple[str, str, Cell], dict[str, Any]]  # (claim, setting, cell) -> summary row
    value: dict[Cell, list[dict[str, Any]]]  # value-space rows (one per captured step) of each cell
    value_kinds: dict[str, dict[str, Any]]  # value-space quantities pooled per kind

    def columns(self, kind: str) -> list[tuple[str, str]]:
        """(claim, setting) of the summary rows of one kind of statement, in registry order."""
        return list(dict.fromkeys((r["claim"], r["setting"]) for r in self.by_kind if r["kind"] == kind))

    def kind_rows(self, kind: str, attention: str) -> list[dict[str, Any]]:
        """The per-kind summary rows of one kind of statement on one attention kind."""
        return [r for r in self.by_kind if r["kind"] == kind and r["data"] == attention]

    def cells_of(self, row: dict[str, Any]) -> list[tuple[Cell, dict[str, Any]]]:
        """The cells, with their rows, that make up a per-kind row."""
        keys = [(row["claim"], row["setting"], c) for c in self.cells if c[0] == row["data"]]
        return [(key[2], self.by_cell[key]) for key in keys if key in self.by_cell]


def _pool(
    pairs: Sequence[tuple[dict[str, Any], CheckResult]], group: Callable[[dict[str, Any]], str]
) -> list[dict[str, Any]]:
    """The verify summary rows of ``(case, result)`` pairs pooled by ``group(case data)``, with the verdict
    rules of the verify report (its summary takes results that carry their group in ``data["group"]``)."""
    return verify_report.summarise(
        [], [replace(r, data={**r.data, "group": group(case["data"])}) for case, r in pairs]
    )


def _digest(doc: dict[str, Any], n_steps: int) -> _Digest:
    pairs = [(case, r) for case, r in case_results(doc) if "trace" in case["data"]]

    def cell(data: dict[str, Any]) -> Cell:
        return str(data["kind"]), str(data["layer"]), _bucket(int(data["step"]), n_steps)

    cells = {"\t".join(cell(case["data"])): cell(case["data"]) for case, _ in pairs}
    per_cell = _pool(pairs, lambda data: "\t".join(cell(data)))
    trace_cases = [c for c in doc["cases"] if "trace" in c["data"]]
    value: dict[Cell, list[dict[str, Any]]] = defaultdict(list)
    value_space = from_jsonable(doc.get("value_space") or {})
    for row in value_space.get("rows", []):
        value[(str(row["kind"]), str(row["layer"]), _bucket(int(row["step"]), n_steps))].append(row)
    cases_in = Counter(cell(c["data"]) for c in trace_cases)
    return _Digest(
        n_steps=n_steps,
        kinds=sorted({c[0] for c in cases_in} | set(value_space.get("kinds", {}))),
        cells=sorted(set(cases_in) | set(value), key=_cell_order),
        cases_in=cases_in,
        states=[int(_number((c.get("fixed_points") or {}).get("states"))) for c in trace_cases],
        by_kind=_pool(pairs, lambda data: str(data["kind"])),
        by_cell={(r["claim"], r["setting"], cells[r["data"]]): r for r in per_cell},
        value=value,
        value_kinds=value_space.get("kinds", {}),
    )


# --------------------------------------------------------------------------------------- cell contents
def _title(claim: str, setting: str) -> str:
    return f"{claim} ({setting})" if setting else claim


def _label(claim: str, setting: str, columns: Sequence[tuple[str, str]]) -> str:
    """A column header: the claim's ``verify --claims`` key, with the setting where the claim has several."""
    key = REGISTRY[claim].key if claim in REGISTRY else claim
    return f"{key} {setting}" if sum(c == claim for c, _ in columns) > 1 else key


def _verdict_cell(row: dict[str, Any] | None) -> str:
    """``verdict held/counted``, with ``(premise met/tried)`` where some states did not meet the premise."""
    if row is None:
        return "—"
    met, tried = int(row["n_premise"]), int(row["n_states"])
    if row["status"] == STATUS_PREMISE:
        return f"premise not met (0/{tried})"
    verdict = "**fail**" if row["status"] == STATUS_FAIL else row["status"]
    text = f"{verdict} {row['n_passed']}/{met}"
    return text + (f" (premise {met}/{tried})" if met < tried else "")


def _measured_cell(row: dict[str, Any] | None) -> str:
    """The quantity a measured row reports, for one cell or one attention kind."""
    if row is None:
        return "—"
    m = row["measured"]
    if row["claim"] == "weak contraction":
        return f"λ_c {_fmt(m.get('lambda_c_median'))} (P_λ {_fmt(m.get('lambda_c_extrapolation_median'))})"
    share = _share(int(row["n_passed"]), int(row["n_premise"]))
    if row["claim"] == "directional consistency":
        return f"toward {share}, aligned {_fmt(m.get('share_aligned_median'), '.0%')}"
    if row["claim"] == LADDER:
        return f"closer {share}"
    return f"{row['n_passed']}/{row['n_premise']}"


def _value_cell(rows: Sequence[dict[str, Any]]) -> list[str]:
    """‖r⊥‖/‖r‖, discarded share and r∥ along the output's change: medians over a cell's captured steps."""
    if not rows:
        return ["—", "—", "—"]
    return [
        _fmt(_median(r["orthogonal_ratio_median"] for r in rows), ".2f"),
        _fmt(_median(r["discarded_share"] for r in rows), ".0%"),
        _fmt(_median(r["parallel_aligned_share"] for r in rows), ".0%"),
    ]


# ------------------------------------------------------------------------------------ plain language
def _where(digest: _Digest, row: dict[str, Any], status: str) -> str:
    """Which cells of a per-kind row have ``status``: "in every layer and step bucket" or a short list."""
    cells = digest.cells_of(row)
    hit = [f"{short_layer(layer)} ({bucket})" for (_, layer, bucket), r in cells if r["status"] == status]
    if len(hit) == len(cells):
        return "in every layer and step bucket"
    more = f" and {len(hit) - 4} more" if len(hit) > 4 else ""
    return f"in {len(hit)} of {len(cells)} layer × bucket cells ({', '.join(hit[:4])}{more})"


def _stand_in(row: dict[str, Any]) -> str:
    """What was measured where the premise was not met (the orthogonal offset, the β of the premise)."""
    m = row["measured"]
    if row["claim"] == "orthogonal-error convergence" and math.isfinite(
        _number(m.get("offset_over_M_median"))
    ):
        return (
            "; there G's limit keeps an orthogonal offset from ξ*_S of median "
            f"{_fmt(m['offset_over_M_median'])} M "
            f"(max {_fmt(m.get('offset_over_M_max'))} M), at most "
            f"{_fmt(m.get('closed_form_error_over_M'), '.1e')} M from its closed form λζ r⊥(ξ∞) − P⊥ ξ*_S"
        )
    if row["claim"] == "fixed-point preservation" and "distinct_fixed_points" in m:
        text = (
            f"; {_fmt(m['distinct_common'], '.0f')} of {_fmt(m['distinct_fixed_points'], '.0f')} distinct "
            "fixed points are fixed by both D and S"
        )
        if math.isfinite(_number(m.get("premise_beta_min"))):
            text += (
                f", and a common one becomes attainable from β ≈ {_fmt(m['premise_beta_min'])} while these "
                f"memories have β ≤ {_fmt(m.get('beta_max'))}"
            )
        return text
    if row["claim"] == "weak contraction" and _number(m.get("repelling_starts")) > 0:
        return (
            f"; {_fmt(m['repelling_starts'], '.0f')} starts ended at repelling fixed points (counted apart)"
        )
    return ""


def _clause(digest: _Digest, row: dict[str, Any]) -> str:
    """One claim and setting on one attention kind, in words."""
    title, met, tried = _title(row["claim"], row["setting"]), int(row["n_premise"]), int(row["n_states"])
    if row["status"] == STATUS_PREMISE:
        return (
            f"{title}: premise not met, so not tested: 0 of {tried} tried (unit: {row['unit']}) met "
            f"“{row['premise']}” "
            f"({row['premise_note'] or 'no reason recorded'}){_stand_in(row)}"
        )
    if row["status"] == STATUS_FAIL:
        text = (
            f"{title}: **fail**, {met - int(row['n_passed'])} of {met} counted ({row['unit']}) violate it "
            f"with the premise met, {_where(digest, row, STATUS_FAIL)}; worst margin "
            f"{_fmt(row['worst_margin'], '.2e')}"
        )
        if row["kind"] == KIND_IDENTITY:
            text += " (an identity of the library's rule failing is a bug of the code, not a finding)"
    else:
        text = f"{title}: {row['status']} ({row['n_passed']}/{met} counted)"
    if met < tried:
        outside = [c for c, r in digest.cells_of(row) if r["status"] == STATUS_PREMISE]
        text += f"; premise met by {met} of {tried} only" + (
            f", by none {_where(digest, row, STATUS_PREMISE)}" if outside else ""
        )
        text += f" ({row['premise_note']})" if row["premise_note"] else ""
        text += _stand_in(row)
    return text


def _measured_clause(row: dict[str, Any]) -> str:
    """A measured row in words: its name, the verdict ``measured``, and what was measured."""
    m = row["measured"]
    share = _share(int(row["n_passed"]), int(row["n_premise"]))
    if row["claim"] == "directional consistency":
        what = (
            f"r = S − D points toward the sparse fixed point in {share} of {row['n_premise']} starts whose "
            "sparse iteration converged, and ⟨r, S(ξ)⟩ > 0 in a median "
            f"{_fmt(m.get('share_aligned_median'), '.0%')} per case"
        )
    elif row["claim"] == "weak contraction":
        what = (
            f"G stops contracting from some start above λ_c = {_fmt(m.get('lambda_c_median'))} (median "
            f"over cases; extrapolation P_λ: {_fmt(m.get('lambda_c_extrapolation_median'))})"
        )
    elif row["claim"] == LADDER:
        what = f"the α-ladder lands closer to ξ*_S than P_λ in {share} of {row['n_premise']} (start, λ)"
    else:
        what = f"{row['n_passed']}/{row['n_premise']} ({row['unit']})"
    return f"{_title(row['claim'], row['setting'])}: {STATUS_MEASURED}, {what}"


def _plain_language(digest: _Digest) -> list[str]:
    """Per attention kind, a list of findings: every number and every verdict taken from the results."""
    out = []
    for kind in digest.kinds:
        cells = [c for c in digest.cells if c[0] == kind and digest.cases_in.get(c)]
        out += [
            f"**{kind}-attention** ({sum(digest.cases_in[c] for c in cells)} head cases, "
            f"{len({c[1] for c in cells})} layers, {len(cells)} layer × bucket cells with cases)",
            "",
        ]
        claims = [_clause(digest, r) for r in digest.kind_rows(KIND_CLAIM, kind)]
        measured = [_measured_clause(r) for r in digest.kind_rows(KIND_MEASURED, kind)]
        vs = digest.value_kinds.get(kind)
        if vs:
            measured.append(
                f"{VALUE_SPACE}: {STATUS_MEASURED}, ‖r⊥‖/‖r‖ has median "
                f"{_fmt(vs['orthogonal_ratio_median'], '.2f')}, GAG (ζ = 0) discards "
                f"{_fmt(vs['discarded_share'], '.0%')} of ‖λr‖², and r∥ points along the change of the "
                f"attention output to the next captured step in {_fmt(vs['parallel_aligned_share'], '.0%')} "
                f"of {vs['pairs']} pairs"
            )
        identities = [_clause(digest, r) for r in digest.kind_rows(KIND_IDENTITY, kind)]
        found = {KIND_CLAIM: claims, KIND_MEASURED: measured, KIND_IDENTITY: identities}
        for statement, title in SECTIONS:
            items = found[statement]
            if items:
                out += [f"- {title}:", *(f"  - {item}." for item in items)]
        out.append("")
    return out


# -------------------------------------------------------------------------------------------- sections
def _header(
    doc: dict[str, Any], results: Path, meta: dict[str, dict[str, Any]], digest: _Digest
) -> list[str]:
    n_steps = digest.n_steps
    ranges = {b: [s for s in range(n_steps) if _bucket(s, n_steps) == b] for b in BUCKETS}
    lines = [
        "# The claims of THEORY.md §5 on attention traces of the reference model",
        "",
        "Generated from the results.json of a verify run by `python analysis/capture_reference_traces.py "
        f"--summarise {_relative(results)}`; do not edit by hand. To regenerate:",
        "",
        "```",
        "python analysis/capture_reference_traces.py                   # the bundled traces",
        "hopfield-aa verify --traces hopfield_aa/data/traces --out /tmp/verify_traces",
        "python analysis/capture_reference_traces.py --verify-wide /tmp/verify_traces_wide",
        "python analysis/capture_reference_traces.py --summarise /tmp/verify_traces_wide/results.json \\",
        "    --default-results /tmp/verify_traces/results.json",
        "```",
        "",
        "## Data",
        "",
    ]
    for d, m in meta.items():
        lines.append(
            f"- `{_relative(Path(d))}`: {m.get('model_class')} from `{m.get('weights_path')}` "
            f"({m.get('weights_source')}; training step {m.get('weights_training_step')}; model.safetensors "
            f"SHA-256 `{str(m.get('weights_sha256'))[:16]}…`), {len(m.get('prompts', []))} prompts, "
            f"{m.get('num_inference_steps')} DDIM steps, CFG scale "
            f"{(m.get('pipeline_kwargs') or {}).get('guidance_scale')}, conditional row; device "
            f"{m.get('device_name')} ({m.get('device_note')})."
        )
    trace_cases = [c for c in doc["cases"] if "trace" in c["data"]]
    states = sorted(set(digest.states))
    lines += [
        "",
        f"This report: {len(trace_cases)} head cases, each one head of one record read as Hopfield retrieval "
        "(memory = the head's keys, starting states = its queries, β = the recorded scale), "
        f"{'–'.join(map(str, states[:: max(1, len(states) - 1)]))} states per case; compute dtype "
        f"{doc['settings'].get('dtype')}; checks' wall time {_number(doc['seconds']):.0f} s on "
        f"{doc['environment']['threads']} thread(s){_load_text(doc)}. Form tested: {trace_cases[0]['form']}.",
        "",
        f"Step buckets of the {n_steps}-step run: "
        + ", ".join(f"{b} = steps {r[0]}–{r[-1]}" for b, r in ranges.items() if r)
        + " (step 0 is the noisiest).",
        "",
        "Verdicts (THEORY.md §5): `pass` and `fail` count only the states that met the claim's premise (a",
        "`fail` always had it met); `premise not met` means no state tried met it: the claim was not tested",
        "there, which is neither a pass nor a failure; `identity` rows hold by construction of the library's",
        "rule, are regression tests of the code and never evidence about attention; `measured` rows have no",
        "verdict. Each layer × bucket cell pools the head cases of that layer and bucket with the rules of",
        "the verify report (a cell fails when any of its cases fails).",
        "",
    ]
    return lines


def _none_met(digest: _Digest, row: dict[str, Any]) -> str:
    cells = digest.cells_of(row)
    return f"{sum(c['status'] == STATUS_PREMISE for _, c in cells)} of {len(cells)}"


def _outside_premise(digest: _Digest) -> list[str]:
    """Every claim and identity whose premise some states tried did not meet: how many met it, and why."""
    rows = [r for r in digest.by_kind if r["kind"] != KIND_MEASURED and r["n_premise"] < r["n_states"]]
    lines = [
        "## Where a claim was tested outside its premise",
        "",
        "States that did not meet a claim's premise are not counted: there the claim is neither confirmed",
        "nor refuted. *Cells none met* counts the layer × bucket cells where no state met it.",
        "",
    ]
    if not rows:
        return [*lines, "Every state tried met its claim's premise.", ""]
    body = [
        [
            r["claim"],
            r["setting"],
            r["data"],
            r["kind"],
            r["premise"],
            f"{r['n_premise']}/{r['n_states']}",
            r["status"],
            _none_met(digest, r),
            (r["premise_note"] or "—") + _stand_in(r),
        ]
        for r in rows
    ]
    header = (
        "claim",
        "setting",
        "attention",
        "kind",
        "premise",
        "premise met",
        "verdict",
        "cells none met",
        "why",
    )
    return [*lines, *_table(header, body), ""]


def _cell_tables(digest: _Digest) -> list[str]:
    """Per kind of statement and attention kind: one row per layer and step bucket, one column per claim."""
    lines = [
        "## Per attention kind, layer and step bucket",
        "",
        "Claims and identities: `verdict held/counted`, with `(premise met/tried)` where some states did not",
        "meet the premise. Measured: directional consistency as the share of starts where r points toward",
        "ξ*_S and the median share with ⟨r, S(ξ)⟩ > 0; λ_c the median λ above which G (and P_λ) stop",
        "contracting from some start; ladder the share of (start, λ) where the α-ladder is closer to ξ*_S;",
        "value space: ‖r⊥‖/‖r‖ (median), the share of ‖λr‖² GAG discards, and the share of pairs where r∥",
        "points along the output's change, each the median over the bucket's captured steps.",
        "",
    ]
    for kind, title in SECTIONS:
        columns = digest.columns(kind)
        with_value = kind == KIND_MEASURED and any(digest.value.values())
        if not columns and not with_value:
            continue
        header = ["layer", "steps", "cases", *(_label(c, s, columns) for c, s in columns)]
        header += ["value ‖r⊥‖/‖r‖", "value discarded", "value r∥ along Δ"] if with_value else []
        fill = _measured_cell if kind == KIND_MEASURED else _verdict_cell
        lines += [f"### {title}", ""]
        for attention in digest.kinds:
            body = []
            for cell in (c for c in digest.cells if c[0] == attention and (with_value or digest.cases_in[c])):
                row = [short_layer(cell[1]), cell[2], str(digest.cases_in.get(cell, 0))]
                row += [fill(digest.by_cell.get((c, s, cell))) for c, s in columns]
                body.append(row + (_value_cell(digest.value.get(cell, [])) if with_value else []))
            lines += [f"#### {attention}-attention", "", *_table(header, body), ""]
    return lines


def _load_text(doc: dict) -> str:
    """The load average a verify run recorded at its end, as the verify report states it ("" if none)."""
    load = doc.get("environment", {}).get("load_average")
    return f" (load average {load[0]:.2f} at the end)" if load else ""


def _default_run(default_results: Path, wall_seconds: float | None) -> list[str]:
    ddoc = json.loads(default_results.read_text(encoding="utf-8"))
    rows = from_jsonable([r for r in ddoc["summary"] if str(r["data"]).startswith("trace:")])
    timing = f"checks' wall time {_number(ddoc['seconds']):.0f} s (synthetic families and traces)"
    timing += _load_text(ddoc)
    if wall_seconds is not None:
        timing += f", command wall time {wall_seconds:.0f} s"
    return [
        "## `hopfield-aa verify --traces hopfield_aa/data/traces` (default settings)",
        "",
        f"Traces: {ddoc['settings']['traces'].replace(str(ROOT) + os.sep, '')}; {timing}. Trace rows:",
        "",
        *_table(TABLE_COLUMNS, table_rows(rows)),
        "",
    ]


def keep_counterexamples(
    doc: dict[str, Any], report: Path, dest: Path, per_claim: int = COUNTEREXAMPLES_KEPT
) -> list[list[str]]:
    """Copy the ``per_claim`` counter-examples with the most negative margins of each claim into ``dest``.

    The verify report keeps at most a few per claim in its ``counterexamples`` folder (named, relative to
    it, by the results that saved them); this keeps the trace ones beside the Markdown, replayable with
    ``hopfield_aa.checks.replay_counterexample``. The ``.json``/``.safetensors`` files already in ``dest``
    are removed first. Returns the Markdown rows (claim, setting, kind, where, verdict, margin, file).
    """
    found: dict[str, dict[str, tuple[float, dict[str, Any], CheckResult]]] = defaultdict(dict)
    for case, r in case_results(doc):
        for relpath in r.counterexamples:
            source = report / relpath
            if "trace" in case["data"] and source.is_file():
                margin = _number(json.loads(source.read_text(encoding="utf-8"))["margin"])
                found[r.claim][relpath] = (margin, case["data"], r)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():
        if old.suffix in (".json", ".safetensors"):
            old.unlink()
    rows = []
    for claim in sorted(found, key=claim_order):
        worst = sorted(found[claim].items(), key=lambda item: item[1][0])[:per_claim]
        for relpath, (margin, data, r) in worst:
            source = report / relpath
            record = json.loads(source.read_text(encoding="utf-8"))
            shutil.copy2(source, dest / source.name)
            shutil.copy2(source.parent / record["tensors"], dest / record["tensors"])
            where = f"{short_layer(str(data['layer']))} step {data['step']} head {data['head']}"
            rows.append(
                [
                    claim,
                    r.setting,
                    str(data["kind"]),
                    where,
                    r.status,
                    f"{margin:.3g}",
                    f"`{_relative(dest / source.name)}`",
                ]
            )
    return rows


def summarise(
    results: Path,
    default_results: Path | None = None,
    wall_seconds: float | None = None,
    counterexamples: Path | None = COUNTEREXAMPLES,
) -> str:
    """The Markdown report of a ``verify`` run on traces: per claim, attention kind, layer and step bucket.

    Parameters
    ----------
    results : Path
        ``results.json`` of a verify run on the bundled traces (``--verify-wide``); the counter-examples
        it names are read from its folder.
    default_results : Path, optional
        ``results.json`` of ``hopfield-aa verify --traces ...``, whose trace rows are quoted.
    wall_seconds : float, optional
        Wall time of that command, measured outside it.
    counterexamples : Path or None
        Where to keep the worst few counter-examples per claim; None keeps none.

    Returns
    -------
    str
        The Markdown text.
    """
    doc = json.loads(results.read_text(encoding="utf-8"))
    traces = [c["data"]["trace"] for c in doc["cases"] if "trace" in c["data"]]
    if not traces:
        raise ValueError(f"{results}: no trace cases")
    meta = _manifest_metadata(traces)
    n_steps = next((int(m["num_inference_steps"]) for m in meta.values() if "num_inference_steps" in m), 20)
    digest = _digest(doc, n_steps)
    lines = _header(doc, results, meta, digest)
    lines += ["## What it says", "", *_plain_language(digest)]
    lines += _outside_premise(digest)
    lines += _cell_tables(digest)
    if default_results is not None:
        lines += _default_run(default_results, wall_seconds)
    if counterexamples is not None:
        rows = keep_counterexamples(doc, results.parent, counterexamples)
        lines += [
            "## Counter-examples kept",
            "",
            f"At most {COUNTEREXAMPLES_KEPT} per claim, the most negative margins among those the verify run",
            "kept (it saves states that met the premise and violate the statement); the verdict is that of",
            "the result that saved it. Replay one with `hopfield_aa.checks.replay_counterexample(path)`.",
            "",
            *(
                _table(("claim", "setting", "kind", "where", "verdict", "margin", "file"), rows)
                if rows
                else ["None: no claim failed on the traces where its premise held."]
            ),
            "",
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: python analysis/capture_reference_traces.py --weights runs/reference/ema",
    )
    parser.add_argument(
        "--weights", default=None, help="weights folder (default: bundled, else runs/reference/ema)"
    )
    parser.add_argument(
        "--prompts", type=Path, default=PROMPTS, help="prompts file (default: the bundled one)"
    )
    parser.add_argument(
        "--out", type=Path, default=BUNDLED_TRACES, help="bundle folder (default: the bundled one)"
    )
    defaults = CaptureSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps per prompt")
    parser.add_argument(
        "--record-every", type=int, default=defaults.record_every, help="cross-attention step stride"
    )
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale, help="CFG scale")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="base seed (prompt i: seed + i)")
    parser.add_argument("--max-query-tokens", type=int, default=defaults.max_query_tokens)
    parser.add_argument("--query-seed", type=int, default=defaults.query_seed)
    parser.add_argument(
        "--dtype", choices=("float16", "float32"), default=defaults.dtype, help="storage dtype"
    )
    parser.add_argument("--self-steps", default=",".join(map(str, defaults.self_steps)))
    parser.add_argument("--self-heads", default=",".join(map(str, defaults.self_heads)))
    parser.add_argument("--max-mb", type=float, default=defaults.max_mb, help="size budget in MiB")
    parser.add_argument(
        "--verify-wide", type=Path, default=None, metavar="OUT", help="run the wide verify only"
    )
    parser.add_argument("--max-records", type=int, default=56, help="records per capture for --verify-wide")
    parser.add_argument(
        "--summarise", type=Path, default=None, metavar="RESULTS", help="write the Markdown only"
    )
    parser.add_argument(
        "--default-results", type=Path, default=None, help="results.json of the default verify"
    )
    parser.add_argument(
        "--default-wall", type=float, default=None, help="wall time of the default verify (s)"
    )
    parser.add_argument("--md", type=Path, default=RESULTS_MD, help="Markdown output of --summarise")
    parser.add_argument(
        "--counterexamples",
        type=Path,
        default=COUNTEREXAMPLES,
        help="folder where --summarise keeps the worst counter-examples per claim (its .json and "
        ".safetensors files are replaced)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.summarise is not None:
        text = summarise(args.summarise, args.default_results, args.default_wall, args.counterexamples)
        write_text(args.md, text)
        print(f"wrote {args.md}")
        return 0
    if args.verify_wide is not None:
        seconds = verify_wide(args.out, args.verify_wide, args.max_records)
        print(f"checks' wall time {seconds:.1f} s; report in {args.verify_wide}")
        return 0

    settings = CaptureSettings(
        **options(
            args, "steps", "record_every", "guidance_scale", "seed", "max_query_tokens", "query_seed", "dtype"
        ),
        max_mb=args.max_mb,
        self_steps=_ints(args.self_steps),
        self_heads=_ints(args.self_heads),
    )
    command = "python analysis/capture_reference_traces.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    run = capture_bundle(args.out, args.weights, args.prompts, settings, command.strip())
    print(
        f"captured {run['records']} records from {run['weights_path']} ({run['weights_source']}, "
        f"training step {run['weights_training_step']}, sha256 {run['weights_sha256'][:16]}…) "
        f"into {run['out']}: "
        f"{run['bytes'] / 2**20:.2f} MiB, {len(run['cross_layers'])} cross-attention layers, "
        f"{run['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
