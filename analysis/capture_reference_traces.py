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
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

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
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-tmp-"))
    try:
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
        os.chmod(staging, 0o755)  # mkdtemp creates 0700; shipped folders must be readable
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        **identity,
        "weights_source": source,
        "records": counts,
        "cross_layers": expected_layers,
        "bytes": size,
        "seconds": time.perf_counter() - start,
        "out": str(out),
    }


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out``; an older bundle is renamed away first, then removed.

    Each rename is atomic, so ``out`` is always either the old complete bundle, absent for an instant, or
    the new complete bundle: never a partial capture.
    """
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-old-"))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old)


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
CLAIM_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("energy descent", "", "energy"),
    ("extrapolation is AA(1)", "", "AA(1)"),
    ("fixed-point preservation", "", "preserv."),
    ("divergence at non-common fixed points", "", "diverg."),
    ("weak contraction", "α=1", "contr. α=1"),
    ("weak contraction", "α=1.5", "contr. α=1.5"),
    ("orthogonal-error convergence", "ζ=0", "orth. ζ=0"),
    ("orthogonal-error convergence", "ζ=0.5", "orth. ζ=½"),
    ("orthogonal-error convergence", "ζ=1", "orth. ζ=1"),
    ("bounded update", "", "bounded"),
    ("directional consistency", "", "direction"),
    ("ladder AA (deeper)", "", "ladder†"),
)
"""(claim, setting or "" for any, column label) of the pass-rate tables, in THEORY.md §5 order."""
BUCKETS = ("early", "middle", "late")
COUNTEREXAMPLES = ROOT / "analysis" / "results" / "reference_traces_counterexamples"


def _column(claim: str, setting: str) -> tuple[str, str] | None:
    """(label, title) of a result's column, or None for a claim the tables leave out."""
    for name, want, label in CLAIM_COLUMNS:
        if name == claim and (not want or want == setting):
            return label, name + (f" ({want})" if want else "")
    return None


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
    return "—" if not math.isfinite(number) else format(number, spec)


def _pct(passed: int, n: int) -> str:
    """``passed / n`` as a percentage that never rounds a failure up to 100 % (or a success down to 0 %)."""
    if n == 0:
        return "n/a"
    text = f"{100 * passed / n:.0f}%"
    if (text == "100%" and passed < n) or (text == "0%" and passed > 0):
        return f"{passed}/{n}"
    return text


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _finite(values: Iterable[Any]) -> list[float]:
    return [v for v in (_number(x) for x in values) if math.isfinite(v)]


def _median(values: Iterable[Any]) -> float:
    finite = sorted(_finite(values))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])


def _spread3(values: Iterable[Any]) -> str:
    """``min / median / max`` of the finite values."""
    finite = _finite(values)
    if not finite:
        return "—"
    return f"{min(finite):.3g} / {_median(finite):.3g} / {max(finite):.3g}"


def _manifest_metadata(trace_dirs: Iterable[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for d in sorted(set(trace_dirs)):
        for path in (Path(d) / MANIFEST_NAME, ROOT / d / MANIFEST_NAME):
            if path.is_file():
                out[d] = json.loads(path.read_text(encoding="utf-8"))["metadata"]
                break
    return out


@dataclass
class _Tally:
    """Pooled results of one claim column over some head cases."""

    passed: int = 0
    tried: int = 0
    cases: int = 0
    failing: int = 0

    def add(self, result: dict[str, Any]) -> None:
        self.passed += int(result["n_passed"])
        self.tried += int(result["n_states"])
        self.cases += 1
        self.failing += result["status"] == "fail"


@dataclass
class _Digest:
    """Everything the Markdown reports, gathered from the trace cases of one results.json."""

    n_steps: int
    kinds: list[str]
    cells: dict[tuple[str, str, str, str], _Tally]  # (kind, layer, bucket, label)
    claims: dict[tuple[str, str], _Tally]  # (kind, label)
    titles: dict[str, str]  # label -> claim (setting)
    cases_in: dict[tuple[str, str, str], int]  # (kind, layer, bucket) -> head cases
    measured: dict[tuple[str, str], dict[str, list[Any]]]  # (kind, layer) -> quantity -> values per case


def _digest(cases: Sequence[dict[str, Any]], n_steps: int) -> _Digest:
    digest = _Digest(
        n_steps=n_steps,
        kinds=sorted({c["data"]["kind"] for c in cases}),
        cells=defaultdict(_Tally),
        claims=defaultdict(_Tally),
        titles={},
        cases_in=defaultdict(int),
        measured=defaultdict(lambda: defaultdict(list)),
    )
    for c in cases:
        d = c["data"]
        kind, layer, bucket = d["kind"], d["layer"], _bucket(int(d["step"]), n_steps)
        digest.cases_in[(kind, layer, bucket)] += 1
        acc = digest.measured[(kind, layer)]
        for key in ("beta", "d", "N"):
            acc[key].append(d[key])
        acc["dense_converged"].append(c["fixed_points"].get("dense_converged", 0))
        acc["dense_common"].append(c["fixed_points"].get("dense_common", 0))
        for r in c["results"]:
            column = _column(r["claim"], r["setting"])
            if column is None:
                continue
            label, title = column
            digest.titles[label] = title
            digest.cells[(kind, layer, bucket, label)].add(r)
            digest.claims[(kind, label)].add(r)
            m = r.get("measured") or {}
            if r["claim"] == "weak contraction":
                tag = "D" if r["setting"] == "α=1" else "S"
                lip = m.get("lipschitz_trajectory") or {}
                acc[f"lip_median_{tag}"].append(lip.get("median"))
                acc[f"lip_max_{tag}"].append(lip.get("max"))
                acc[f"lip_share_{tag}"].append(m.get("lipschitz_share_below_1"))
                acc[f"cert_{tag}"].append(m.get("global_certificate"))
                acc[f"max_ratio_{tag}"].append(m.get("max_ratio"))
            elif r["claim"] == "extrapolation is AA(1)":
                acc["lambda_star"].append((m.get("lambda_star") or {}).get("median"))
            elif r["claim"] == "directional consistency":
                acc["toward"].append(m.get("share_toward_sparse_fixed_point"))
                acc["aligned"].append(m.get("share_aligned_with_retrieval"))
            elif r["claim"] == "orthogonal-error convergence":
                tag = label.split()[-1]
                acc[f"orth_limit_{tag}"].append((m.get("limit_orthogonal_error_over_M") or {}).get("median"))
                acc[f"orth_rate_{tag}"].append(r.get("rate"))
                acc[f"orth_converged_{tag}"].append(m.get("limit_converged_share"))
            elif r["claim"] == "divergence at non-common fixed points":
                acc["slope"].append(r.get("rate"))
    return digest


def keep_counterexamples(doc: dict[str, Any], report: Path, dest: Path) -> list[list[str]]:
    """Copy one counter-example (the worst case's) per failing (claim, setting, kind) into ``dest``.

    The verify report holds every counter-example in a temporary folder; this keeps one per failure
    beside the Markdown so that it can be replayed with ``hopfield_aa.checks.replay_counterexample``.
    Returns the Markdown rows (claim, setting, kind, case, margin, file).
    """
    worst: dict[tuple[str, str, str], tuple[float, str, str]] = {}
    for c in doc["cases"]:
        if "trace" not in c["data"]:
            continue
        for r in c["results"]:
            if r["status"] != "fail" or not r["counterexamples"]:
                continue
            key = (r["claim"], r["setting"], c["data"]["kind"])
            margin = _number(r["worst_margin"])
            if key not in worst or margin < worst[key][0]:
                worst[key] = (margin, c["label"], r["counterexamples"][0])
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():
        if old.suffix in (".json", ".safetensors"):
            old.unlink()
    rows = []
    for (claim, setting, kind), (margin, label, relpath) in sorted(worst.items()):
        source = report / relpath
        record = json.loads(source.read_text(encoding="utf-8"))
        shutil.copy2(source, dest / source.name)
        shutil.copy2(source.parent / record["tensors"], dest / record["tensors"])
        rows.append([claim, setting, kind, label, f"{margin:.3g}", f"`{_relative(dest / source.name)}`"])
    return rows


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
    n_cases = sum(digest.cases_in.values())
    lines += [
        "",
        f"This report: {n_cases} head cases, each one head of one record read as Hopfield retrieval (memory "
        "= the head's keys, starting states = up to 32 of its queries, β = the recorded scale), "
        f"{doc['settings'].get('n_states') or 32} states per case; checks' wall time {doc['seconds']:.0f} s "
        f"on {doc['environment']['threads']} thread(s). Form tested: {doc['cases'][-1]['form']}.",
        "",
        f"Step buckets of the {n_steps}-step run: "
        + ", ".join(f"{b} = steps {r[0]}–{r[-1]}" for b, r in ranges.items() if r)
        + " (step 0 is the noisiest).",
        "",
    ]
    return lines


def _default_run(default_results: Path, wall_seconds: float | None) -> list[str]:
    ddoc = json.loads(default_results.read_text(encoding="utf-8"))
    rows = [r for r in ddoc["summary"] if str(r["data"]).startswith("trace:")]
    timing = f"checks' wall time {ddoc['seconds']:.0f} s (synthetic families and traces)"
    if wall_seconds is not None:
        timing += f", command wall time {wall_seconds:.0f} s"
    return [
        "## `hopfield-aa verify --traces hopfield_aa/data/traces` (default settings: 8 records per capture)",
        "",
        f"Traces: {ddoc['settings']['traces'].replace(str(ROOT) + os.sep, '')}; {timing}. Trace rows:",
        "",
        *_table(
            ("claim", "setting", "data", "cases", "passed", "worst margin", "rate", "status"),
            (
                [
                    r["claim"],
                    r["setting"],
                    r["data"],
                    str(r["cases"]),
                    "—" if not r["n_states"] else f"{r['n_passed']}/{r['n_states']}",
                    _fmt(r["worst_margin"], ".2e"),
                    _fmt(r["rate"]),
                    r["status"],
                ]
                for r in rows
            ),
        ),
        "",
    ]


def _pass_rate_tables(digest: _Digest) -> list[str]:
    labels = [label for *_, label in CLAIM_COLUMNS]
    lines = [
        "## Pass rates per attention kind, layer and step bucket",
        "",
        "Each cell: share of tried states (or starts, or perturbed fixed points: each claim's unit)",
        "that satisfy the claim, pooled over the head cases of that layer and bucket; **bold** where a",
        "case fails; `n/a` where the claim applies to no state (no fixed point common to the dense and",
        "sparse maps).",
        "† The ladder column measures whether a deeper Anderson mix lands closer to the sparse fixed point",
        "than extrapolation: a measurement, not a verdict.",
        "",
    ]
    for kind in digest.kinds:
        layers = sorted({layer for k, layer in digest.measured if k == kind}, key=_layer_order)
        rows = []
        for layer in layers:
            for bucket in BUCKETS:
                n_cases = digest.cases_in.get((kind, layer, bucket), 0)
                if not n_cases:
                    continue
                row = [short_layer(layer), bucket, str(n_cases)]
                for label in labels:
                    tally = digest.cells.get((kind, layer, bucket, label), _Tally())
                    text = _pct(tally.passed, tally.tried)
                    row.append(f"**{text}**" if tally.failing else text)
                rows.append(row)
        lines += [f"### {kind}-attention", "", *_table(("layer", "steps", "cases", *labels), rows), ""]
    return lines


def _measured_tables(digest: _Digest) -> list[str]:
    lines = [
        "## Measured quantities per layer",
        "",
        "N×d: keys × head dimension; β: the recorded scale 1/√d. Common: fixed points of the dense map D",
        "(reached from the queries) that the sparse map S (α = 1.5) fixes too. Lipschitz ‖DT(ξ)‖₂ along the",
        "trajectories of T from the queries: per-case medians (min / median / max over cases), the largest",
        "value seen, and the median share below 1. Certificate: the global bound β L_α ‖K‖₂² (below 1 would",
        "prove T a contraction everywhere; min / median / max). λ*: the Anderson-optimal extrapolation scale",
        "1 − γ*, median of per-case medians. Direction: median share of starts where r = S − D points toward",
        "the sparse fixed point / where ⟨r, S(ξ)⟩ > 0. Orth.: ‖e⊥‖/M at the limit of G (ζ = 0), median.",
        "",
    ]
    for kind in digest.kinds:
        rows = []
        for (k, layer), acc in sorted(digest.measured.items(), key=lambda kv: _layer_order(kv[0][1])):
            if k != kind:
                continue
            converged = sum(_finite(acc["dense_converged"]))
            rows.append(
                [
                    short_layer(layer),
                    f"{int(_number(acc['N'][0]))}×{int(_number(acc['d'][0]))}",
                    f"{_number(acc['beta'][0]):.3f}",
                    f"{sum(_finite(acc['dense_common'])):.0f}/{converged:.0f}",
                    _lipschitz(acc, "D"),
                    _lipschitz(acc, "S"),
                    _spread3(acc["cert_D"]),
                    _spread3(acc["cert_S"]),
                    _fmt(_median(acc["lambda_star"])),
                    f"{_median(acc['toward']):.0%} / {_median(acc['aligned']):.0%}",
                    _fmt(_median(acc["orth_limit_ζ=0"])),
                ]
            )
        lines += [
            f"### {kind}-attention",
            "",
            *_table(
                (
                    "layer",
                    "N×d",
                    "β",
                    "common",
                    "Lipschitz D",
                    "Lipschitz S",
                    "certificate D",
                    "certificate S",
                    "λ*",
                    "direction",
                    "orth.",
                ),
                rows,
            ),
            "",
        ]
    return lines


def _lipschitz(acc: dict[str, list[Any]], tag: str) -> str:
    largest = max(_finite(acc[f"lip_max_{tag}"]), default=math.nan)
    return (
        f"{_spread3(acc[f'lip_median_{tag}'])}; max {_fmt(largest)}; {_median(acc[f'lip_share_{tag}']):.0%}"
    )


def _pooled(digest: _Digest, kind: str, key: str) -> list[float]:
    return [v for (k, _), acc in digest.measured.items() if k == kind for v in _finite(acc[key])]


def _plain_language(digest: _Digest) -> list[str]:
    """One paragraph per attention kind, every number computed from the results."""
    out = []
    for kind in digest.kinds:
        held, failed, empty = [], [], []
        all_cells = {(layer, b) for (k, layer, b) in digest.cases_in if k == kind}
        for *_, label in CLAIM_COLUMNS:
            if label.endswith("†") or (kind, label) not in digest.claims:
                continue
            tally, title = digest.claims[(kind, label)], digest.titles[label]
            if tally.tried == 0:
                empty.append(title)
            elif tally.failing == 0:
                held.append(f"{title} ({tally.passed}/{tally.tried})")
            else:
                cells = sorted(
                    (layer, b)
                    for (k, layer, b, lab), t in digest.cells.items()
                    if k == kind and lab == label and t.failing
                )
                where = (
                    "in every layer and step bucket"
                    if set(cells) == all_cells
                    else "at "
                    + ", ".join(f"{short_layer(layer)} ({b})" for layer, b in cells[:4])
                    + (f" and {len(cells) - 4} more cells" if len(cells) > 4 else "")
                )
                failed.append(
                    f"{title}, {_pct(tally.passed, tally.tried)} of tries passing, {tally.failing} of "
                    f"{tally.cases} head cases failing, {where}"
                )
        n_cases = sum(n for (k, *_), n in digest.cases_in.items() if k == kind)
        layers = {layer for k, layer in digest.measured if k == kind}
        text = f"**{kind}-attention** ({n_cases} head cases, {len(layers)} layers). "
        text += f"Holds on every case: {'; '.join(held) if held else 'nothing'}. "
        text += ("Fails: " + "; ".join(failed) + ". ") if failed else "No claim fails. "
        if empty:
            text += f"Applies to no state: {', '.join(empty)}. "
        betas = sorted(set(_pooled(digest, kind, "beta")))
        dims = sorted({int(x) for x in _pooled(digest, kind, "d")})
        common, converged = (
            sum(_pooled(digest, kind, "dense_common")),
            sum(_pooled(digest, kind, "dense_converged")),
        )
        beta_text, dim_text = ", ".join(f"{b:.3f}" for b in betas), ", ".join(map(str, dims))
        text += (
            f"β takes the values {beta_text} (1/√d, d ∈ {{{dim_text}}}). "
            f"Of {converged:.0f} fixed points the dense map reaches from the queries, {common:.0f} "
            f"({common / converged if converged else math.nan:.1%}) are also fixed by the sparse map"
        )
        if converged and common == 0:
            slopes = _pooled(digest, kind, "slope")
            text += (
                ": fixed-point preservation never applies, and at every dense fixed point guidance moves the "
                "state linearly in λ (Remark 3.4"
                + (f"; median distance per unit λ {_median(slopes):.3g} M" if slopes else "")
                + "). "
            )
        else:
            text += ". "
        certs = _pooled(digest, kind, "cert_D") + _pooled(digest, kind, "cert_S")
        if certs:
            below = sum(c < 1 for c in certs)
            lip_d = max(_pooled(digest, kind, "lip_max_D"), default=math.nan)
            lip_s = max(_pooled(digest, kind, "lip_max_S"), default=math.nan)
            ratio_d = max(_pooled(digest, kind, "max_ratio_D"), default=math.nan)
            ratio_s = max(_pooled(digest, kind, "max_ratio_S"), default=math.nan)
            text += (
                f"The global contraction certificate β L_α ‖K‖₂² lies between {min(certs):.3g} and "
                f"{max(certs):.3g} (below 1 in {below} of {len(certs)} case-map pairs)"
                + (", so it never proves contraction here" if below == 0 else "")
                + f"; the local Lipschitz constant along trajectories is at most {lip_d:.3g} for the dense "
                f"map and {lip_s:.3g} for the sparse one (median share below 1: "
                f"{_median(_pooled(digest, kind, 'lip_share_D')):.0%} and "
                f"{_median(_pooled(digest, kind, 'lip_share_S')):.0%}); the largest ratio "
                f"‖T(ξ) − ξ*‖ / ‖ξ − ξ*‖ at perturbed fixed points is {ratio_d:.3g} for the dense map and "
                f"{ratio_s:.3g} for the sparse one (above 1: the weak-contraction counter-examples). "
            )
        limits = _pooled(digest, kind, "orth_limit_ζ=0")
        if limits:
            reached = _pooled(digest, kind, "orth_converged_ζ=0")
            factor = _median(_pooled(digest, kind, "orth_rate_ζ=0"))
            orth = digest.claims.get((kind, "orth. ζ=0"), _Tally())
            if orth.failing == 0:
                text += (
                    f"The guided iteration ξ ↦ G(ξ) (ζ = 0, λ = 1) removes the orthogonal error (median "
                    f"per-step factor {factor:.3g}). "
                )
            else:
                text += (
                    f"The guided iteration ξ ↦ G(ξ) (ζ = 0, λ = 1) reaches a limit from a median "
                    f"{_median(reached):.0%} of starts per case (median per-step factor of ‖e⊥‖ "
                    f"{factor:.3g}), but that limit is not the sparse fixed point plus a multiple of the "
                    "reference direction: the error's part orthogonal to S(ξ_∞) stays at a median "
                    f"{_median(limits):.3g} M (ζ = ½: "
                    f"{_median(_pooled(digest, kind, 'orth_limit_ζ=½')):.3g} M, ζ = 1: "
                    f"{_median(_pooled(digest, kind, 'orth_limit_ζ=1')):.3g} M), far above the tolerance. "
                )
        lam = _pooled(digest, kind, "lambda_star")
        if lam:
            text += (
                f"The Anderson-optimal scale λ* has median {_median(lam):.3g} (per-case medians "
                f"{min(lam):.3g} to {max(lam):.3g}). "
            )
        toward, aligned = _pooled(digest, kind, "toward"), _pooled(digest, kind, "aligned")
        if toward and aligned:
            text += (
                "The residual r = S − D points toward the sparse fixed point in a median "
                f"{_median(toward):.0%} of starts per case, and has ⟨r, S(ξ)⟩ > 0 in {_median(aligned):.0%}."
            )
        out += [text, ""]
    return out


def summarise(
    results: Path,
    default_results: Path | None = None,
    wall_seconds: float | None = None,
    counterexamples: Path | None = COUNTEREXAMPLES,
) -> str:
    """The Markdown report of a ``verify`` run on traces: per attention kind, layer, step bucket and claim.

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
        Where to keep one counter-example per failing (claim, setting, kind); None keeps none.

    Returns
    -------
    str
        The Markdown text.
    """
    doc = json.loads(results.read_text(encoding="utf-8"))
    cases = [c for c in doc["cases"] if "trace" in c["data"]]
    if not cases:
        raise ValueError(f"{results}: no trace cases")
    meta = _manifest_metadata(c["data"]["trace"] for c in cases)
    n_steps = next((int(m["num_inference_steps"]) for m in meta.values() if "num_inference_steps" in m), 20)
    digest = _digest(cases, n_steps)
    lines = _header(doc, results, meta, digest)
    lines += ["## What it says", "", *_plain_language(digest)]
    if default_results is not None:
        lines += _default_run(default_results, wall_seconds)
    lines += _pass_rate_tables(digest)
    lines += _measured_tables(digest)
    if counterexamples is not None:
        rows = keep_counterexamples(doc, results.parent, counterexamples)
        lines += [
            "## Counter-examples kept",
            "",
            "One per failing claim, setting and kind (the case with the worst margin); replay one with",
            "`hopfield_aa.checks.replay_counterexample(path)`.",
            "",
            *(_table(("claim", "setting", "kind", "case", "margin", "file"), rows) if rows else ["None."]),
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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.summarise is not None:
        text = summarise(args.summarise, args.default_results, args.default_wall)
        args.md.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.md.with_name(f".{args.md.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, args.md)
        print(f"wrote {args.md}")
        return 0
    if args.verify_wide is not None:
        seconds = verify_wide(args.out, args.verify_wide, args.max_records)
        print(f"checks' wall time {seconds:.1f} s; report in {args.verify_wide}")
        return 0

    settings = CaptureSettings(
        steps=args.steps,
        record_every=args.record_every,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        max_query_tokens=args.max_query_tokens,
        query_seed=args.query_seed,
        dtype=args.dtype,
        self_steps=_ints(args.self_steps),
        self_heads=_ints(args.self_heads),
        max_mb=args.max_mb,
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
