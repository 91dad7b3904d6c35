"""Capture the bundled attention traces of the reference model (``hopfield_aa/data/traces/``) and summarise a
``verify`` run on them as Markdown (``analysis/results/reference_traces_verify.md``).

The bundle holds two captures made from the same sampling runs (prompt ``i`` of
``hopfield_aa/data/prompts.txt`` with seed ``seed + i``, DDIM, classifier-free guidance, conditional row):

- ``cross/``: every cross-attention layer, every other denoising step, all heads, a seeded subset of query
  tokens;
- ``self/``: every self-attention layer at a few steps and the first heads (what fits the size budget).

Each manifest records the weights' identity (SHA-256 of ``model.safetensors`` and ``config.json``), where
they came from (the bundled weights, or ``runs/reference/ema`` while those do not exist) and the device.
The bundle is written to a temporary folder beside the bundled path, validated, then renamed into place.

Run::

    python analysis/capture_reference_traces.py                        # capture (bundled weights, else EMA)
    python analysis/capture_reference_traces.py --weights runs/reference/ema
    hopfield-aa verify --traces hopfield_aa/data/traces --out /tmp/verify_traces
    python analysis/capture_reference_traces.py --verify-wide /tmp/verify_traces_wide
    python analysis/capture_reference_traces.py --summarise /tmp/verify_traces_wide/results.json \\
        --default-results /tmp/verify_traces/results.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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

from hopfield_aa.reference import BUNDLED_WEIGHTS, load_pipeline, parse_caption, split_of
from hopfield_aa.traces import MANIFEST_NAME, Selection, TraceCapture, TraceSet

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_TRACES = ROOT / "hopfield_aa" / "data" / "traces"
PROMPTS = ROOT / "hopfield_aa" / "data" / "prompts.txt"
EMA_WEIGHTS = ROOT / "runs" / "reference" / "ema"
RESULTS_MD = ROOT / "analysis" / "results" / "reference_traces_verify.md"
WEIGHT_FILES = ("model.safetensors", "config.json")
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
        common = {
            "max_query_tokens": self.max_query_tokens,
            "query_seed": self.query_seed,
            "batch_indices": self.batch_indices,
        }
        return {
            "cross": Selection(kinds=["cross"], steps=range(0, self.steps, self.record_every), **common),
            "self": Selection(kinds=["self"], steps=self.self_steps, heads=self.self_heads, **common),
        }


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def resolve_weights(weights: str | None) -> tuple[Path, str]:
    """The weights folder and how it was chosen: ``given``, ``bundled``, or ``ema-fallback``."""
    if weights is not None:
        return Path(weights), "given"
    if all((BUNDLED_WEIGHTS / name).is_file() for name in WEIGHT_FILES):
        return BUNDLED_WEIGHTS, "bundled"
    if all((EMA_WEIGHTS / name).is_file() for name in WEIGHT_FILES):
        return EMA_WEIGHTS, "ema-fallback"
    raise FileNotFoundError(f"no reference weights: neither {BUNDLED_WEIGHTS} nor {EMA_WEIGHTS} holds {WEIGHT_FILES}")


def snapshot_weights(folder: Path, into: Path) -> dict[str, Any]:
    """Copy ``model.safetensors`` and ``config.json`` of ``folder`` into ``into`` and describe them.

    A training run may replace the files (or the whole folder) at any moment; the copy makes the weights
    loaded, the hashes recorded and the training step read all refer to one version: the copy is retried
    until both source files still hash to what was copied.
    """
    for attempt in range(10):
        try:
            for name in WEIGHT_FILES:
                shutil.copy2(folder / name, into / name)
            if all(sha256_file(folder / n) == sha256_file(into / n) for n in WEIGHT_FILES):
                break
        except FileNotFoundError:
            if attempt == 9:
                raise
        time.sleep(3.0)
    else:
        raise RuntimeError(f"{folder} kept changing while it was copied")
    config = json.loads((into / "config.json").read_text(encoding="utf-8"))
    training = config.get("training", {}) if isinstance(config, dict) else {}
    return {
        "weights_path": _relative(folder),
        "weights_sha256": sha256_file(into / "model.safetensors"),
        "weights_config_sha256": sha256_file(into / "config.json"),
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
                output_type="pt",
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


def check_bundle(folder: Path, expected_cross_layers: Sequence[str], settings: CaptureSettings) -> dict[str, Any]:
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
        f"Weights: `{meta['weights_path']}` ({meta['weights_source']}), model.safetensors SHA-256 "
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
        snapshot.mkdir()
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
            "capture_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
            "command": command,
        }
        counts = {}
        for part, selection in settings.selections().items():
            counts[part] = _capture_part(
                pipe, prompts, staging / part, selection, settings, {**meta, "bundle_part": part}
            )
        shutil.rmtree(snapshot)
        info = check_bundle(staging, expected_layers, settings)
        from hopfield_aa.traces.capture import run_metadata

        meta.update(
            {k: v for k, v in run_metadata(pipe.unet).items() if k in ("device", "device_name", "torch_version")}
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
BUCKETS = ("early", "middle", "late")


def _column(claim: str, setting: str) -> str | None:
    for name, want, label in CLAIM_COLUMNS:
        if name == claim and (not want or want == setting):
            return label
    return None


def short_layer(name: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` -> ``down_blocks.1.0.attn2``."""
    return name.replace(".transformer_blocks.0", "").replace("attentions.", "")


def _bucket(step: int, n_steps: int) -> str:
    return BUCKETS[min(len(BUCKETS) - 1, step * len(BUCKETS) // max(1, n_steps))]


def _layer_order(name: str) -> tuple[int, int, str]:
    for rank, prefix in enumerate(("down_blocks", "mid_block", "up_blocks")):
        if name.startswith(prefix):
            parts = name.split(".")
            block = int(parts[1]) if prefix != "mid_block" else 0
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
    return "n/a" if n == 0 else f"{100 * passed / n:.0f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _median(values: Sequence[float]) -> float:
    finite = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])


def _manifest_metadata(trace_dirs: Iterable[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for d in sorted(set(trace_dirs)):
        path = Path(d) / MANIFEST_NAME
        if not path.is_file():
            path = ROOT / d / MANIFEST_NAME
        if path.is_file():
            out[d] = json.loads(path.read_text(encoding="utf-8"))["metadata"]
    return out


def _stat(values: Sequence[float]) -> str:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return "—"
    return f"{min(finite):.3g} / {_median(finite):.3g} / {max(finite):.3g}"


def summarise(results: Path, default_results: Path | None = None, wall_seconds: float | None = None) -> str:
    """The Markdown report of a ``verify`` run on traces: per kind, layer, step bucket and claim.

    Parameters
    ----------
    results : Path
        ``results.json`` of a verify run on the bundled traces (e.g. ``--verify-wide``).
    default_results : Path, optional
        ``results.json`` of ``hopfield-aa verify --traces ...`` (its claims table is quoted).
    wall_seconds : float, optional
        Wall time of that command, if measured outside it.
    """
    doc = json.loads(results.read_text(encoding="utf-8"))
    cases = [c for c in doc["cases"] if "trace" in c["data"]]
    if not cases:
        raise ValueError(f"{results}: no trace cases")
    meta = _manifest_metadata(c["data"]["trace"] for c in cases)
    n_steps = next((int(m["num_inference_steps"]) for m in meta.values() if "num_inference_steps" in m), 20)
    kinds = sorted({c["data"]["kind"] for c in cases})
    lines = [
        "# The claims of THEORY.md §5 on attention traces of the reference model",
        "",
        "Generated by `python analysis/capture_reference_traces.py --summarise "
        f"{_relative(results)}` from a verify run's results.json; do not edit by hand.",
        "",
        "## Data",
        "",
    ]
    for d, m in meta.items():
        lines.append(
            f"- `{_relative(Path(d))}`: {m.get('model_class')} from `{m.get('weights_path')}` "
            f"({m.get('weights_source')}, training step {m.get('weights_training_step')}, model.safetensors "
            f"SHA-256 `{str(m.get('weights_sha256'))[:16]}…`); {len(m.get('prompts', []))} prompts, "
            f"{m.get('num_inference_steps')} DDIM steps, CFG {m.get('pipeline_kwargs', {}).get('guidance_scale')}; "
            f"device {m.get('device_name')} ({m.get('device_note')})."
        )
    lines += [
        "",
        f"Verify run: {doc['settings']['traces']}; {len(cases)} head cases "
        f"(each: one head of one record, keys as memory, up to 32 queries as starting states, β = the "
        f"recorded scale), checks' wall time {doc['seconds']:.0f} s on {doc['environment']['threads']} "
        f"thread(s). Form tested: {cases[0]['form']}.",
        "",
        f"Step buckets of the {n_steps}-step run: "
        + ", ".join(
            f"{b} = steps {min(s for s in range(n_steps) if _bucket(s, n_steps) == b)}–"
            f"{max(s for s in range(n_steps) if _bucket(s, n_steps) == b)}"
            for b in BUCKETS
        )
        + " (step 0 is the noisiest, t = 999).",
        "",
    ]

    # default CLI run, quoted
    if default_results is not None:
        ddoc = json.loads(default_results.read_text(encoding="utf-8"))
        rows = [r for r in ddoc["summary"] if str(r["data"]).startswith("trace:")]
        timing = f"checks' wall time {ddoc['seconds']:.0f} s"
        if wall_seconds is not None:
            timing += f", command wall time {wall_seconds:.0f} s"
        lines += [
            "## `hopfield-aa verify --traces hopfield_aa/data/traces` (default settings)",
            "",
            f"{ddoc['settings']['traces']}; {timing}.",
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

    # per kind: layer × bucket × claim matrix
    cells: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])  # passed, n, fails
    by_claim: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # passed, n, cases, failing
    where_fails: dict[tuple[str, str], set[str]] = defaultdict(set)
    for c in cases:
        d = c["data"]
        bucket = _bucket(int(d["step"]), n_steps)
        for r in c["results"]:
            label = _column(r["claim"], r["setting"])
            if label is None:
                continue
            cell = cells[(d["kind"], d["layer"], bucket, label)]
            cell[0] += r["n_passed"]
            cell[1] += r["n_states"]
            cell[2] += r["status"] == "fail"
            agg = by_claim[(d["kind"], label)]
            agg[0] += r["n_passed"]
            agg[1] += r["n_states"]
            agg[2] += 1
            agg[3] += r["status"] == "fail"
            if r["status"] == "fail":
                where_fails[(d["kind"], label)].add(f"{short_layer(d['layer'])} ({bucket})")
    labels = [label for *_, label in CLAIM_COLUMNS]
    lines += [
        "## Pass rates per attention kind, layer and step bucket",
        "",
        "Each cell: share of tried states (or starts, or perturbed fixed points: the unit of the claim) that",
        "satisfy the claim, pooled over the head cases of that layer and bucket; **bold** where a case",
        "fails; `n/a` where the claim applies to no state (no fixed point common to the dense and sparse",
        "maps). † the ladder row measures whether a deeper Anderson mix beats extrapolation: no verdict.",
        "",
    ]
    for kind in kinds:
        layers = sorted({c["data"]["layer"] for c in cases if c["data"]["kind"] == kind}, key=_layer_order)
        rows = []
        for layer in layers:
            for bucket in BUCKETS:
                n_cases = sum(
                    1
                    for c in cases
                    if c["data"]["kind"] == kind
                    and c["data"]["layer"] == layer
                    and _bucket(int(c["data"]["step"]), n_steps) == bucket
                )
                if not n_cases:
                    continue
                row = [short_layer(layer), bucket, str(n_cases)]
                for label in labels:
                    passed, n, fails = cells.get((kind, layer, bucket, label), [0, 0, 0])
                    text = _pct(passed, n)
                    row.append(f"**{text}**" if fails else text)
                rows.append(row)
        lines += [f"### {kind}-attention", "", *_table(("layer", "steps", "cases", *labels), rows), ""]

    # measured quantities per kind and layer
    lines += [
        "## Measured quantities per layer",
        "",
        "β is the recorded softmax scale 1/√d; `M` the largest key norm. Common share: fixed points of the",
        "dense map D (reached from the queries) that the sparse map S (α = 1.5) also fixes. Lipschitz:",
        "‖DT(ξ)‖₂ along the trajectories of T from the queries (min / median / max), share below 1, and the",
        "global certificate β L_α ‖X‖₂² (below 1 would prove T a contraction everywhere). λ*: the",
        "Anderson-optimal extrapolation scale 1 − γ* (median over queries). Directional: share of starts",
        "where r = S − D points toward the sparse fixed point, and share where ⟨r, S(ξ)⟩ > 0.",
        "",
    ]
    per_layer: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cases:
        d = c["data"]
        acc = per_layer[(d["kind"], d["layer"])]
        acc["beta"].append(float(d["beta"]))
        acc["d"].append(float(d["d"]))
        acc["N"].append(float(d["N"]))
        fp = c["fixed_points"]
        acc["dense_converged"].append(float(fp.get("dense_converged", 0)))
        acc["dense_common"].append(float(fp.get("dense_common", 0)))
        for r in c["results"]:
            m = r.get("measured", {}) or {}
            if r["claim"] == "weak contraction":
                tag = "1" if r["setting"] == "α=1" else "s"
                lip = m.get("lipschitz_trajectory", {}) or {}
                acc[f"lip_med_{tag}"].append(lip.get("median", math.nan))
                acc[f"lip_max_{tag}"].append(lip.get("max", math.nan))
                acc[f"lip_share_{tag}"].append(m.get("lipschitz_share_below_1", math.nan))
                acc[f"cert_{tag}"].append(m.get("global_certificate", math.nan))
            elif r["claim"] == "extrapolation is AA(1)":
                acc["lambda_star"].append((m.get("lambda_star", {}) or {}).get("median", math.nan))
            elif r["claim"] == "directional consistency":
                acc["toward"].append(m.get("share_toward_sparse_fixed_point", math.nan))
                acc["aligned"].append(m.get("share_aligned_with_retrieval", math.nan))
            elif r["claim"] == "orthogonal-error convergence" and r["setting"] == "ζ=0":
                lim = m.get("limit_orthogonal_error_over_M", {}) or {}
                acc["orth_limit"].append(lim.get("median", math.nan))
    for kind in kinds:
        rows = []
        for (k, layer), acc in sorted(per_layer.items(), key=lambda kv: _layer_order(kv[0][1])):
            if k != kind:
                continue
            converged = sum(acc["dense_converged"])
            rows.append(
                [
                    short_layer(layer),
                    f"{int(acc['N'][0])}×{int(acc['d'][0])}",
                    f"{acc['beta'][0]:.3f}",
                    f"{sum(acc['dense_common']):.0f}/{converged:.0f}",
                    _stat(acc["lip_med_1"]) + f"; {_median(acc['lip_share_1']):.0%}",
                    _stat(acc["lip_med_s"]) + f"; {_median(acc['lip_share_s']):.0%}",
                    _stat(acc["cert_1"]),
                    _stat(acc["cert_s"]),
                    _fmt(_median(acc["lambda_star"])),
                    f"{_median(acc['toward']):.0%} / {_median(acc['aligned']):.0%}",
                    _fmt(_median(acc["orth_limit"])),
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
                    "common / dense fixed points",
                    "Lip. D median (min/med/max); share < 1",
                    "Lip. S median; share < 1",
                    "global cert. D",
                    "global cert. S",
                    "λ* median",
                    "directional toward / aligned",
                    "‖e⊥‖/M at the limit (ζ=0)",
                ),
                rows,
            ),
            "",
        ]

    lines += ["## What it says", "", *_plain_language(cases, by_claim, where_fails, per_layer, kinds), ""]
    return "\n".join(lines)


def _plain_language(
    cases: Sequence[dict[str, Any]],
    by_claim: dict[tuple[str, str], list[int]],
    where_fails: dict[tuple[str, str], set[str]],
    per_layer: dict[tuple[str, str], dict[str, list[float]]],
    kinds: Sequence[str],
) -> list[str]:
    """Sentences computed from the results (nothing here is typed in by hand)."""
    names = {label: name for name, _, label in CLAIM_COLUMNS}
    out = []
    for kind in kinds:
        held, failed, empty = [], [], []
        for _, setting, label in CLAIM_COLUMNS:
            if label.endswith("†"):
                continue
            passed, n, n_cases, failing = by_claim.get((kind, label), [0, 0, 0, 0])
            title = names[label] + (f" ({setting})" if setting else "")
            if n == 0:
                empty.append(title)
            elif failing == 0:
                held.append(f"{title} ({passed}/{n})")
            else:
                spots = sorted(where_fails[(kind, label)])
                failed.append(
                    f"{title}: {passed}/{n} pass ({100 * passed / n:.0f}%), failing in {failing} of {n_cases} "
                    f"head cases, at {len(spots)} layer/bucket cells"
                    + (f" (e.g. {', '.join(spots[:3])})" if spots else "")
                )
        layers = [acc for (k, _), acc in per_layer.items() if k == kind]
        betas = sorted({round(b, 4) for acc in layers for b in acc["beta"]})
        dims = sorted({int(x) for acc in layers for x in acc["d"]})
        common = sum(sum(acc["dense_common"]) for acc in layers)
        converged = sum(sum(acc["dense_converged"]) for acc in layers)
        certs = [v for acc in layers for key in ("cert_1", "cert_s") for v in acc[key] if math.isfinite(v)]
        lip_d = [v for acc in layers for v in acc["lip_max_1"] if math.isfinite(v)]
        lip_s = [v for acc in layers for v in acc["lip_max_s"] if math.isfinite(v)]
        lam = [v for acc in layers for v in acc["lambda_star"] if math.isfinite(v)]
        toward = [v for acc in layers for v in acc["toward"] if math.isfinite(v)]
        aligned = [v for acc in layers for v in acc["aligned"] if math.isfinite(v)]
        n_cases = sum(1 for c in cases if c["data"]["kind"] == kind)
        text = (
            f"**{kind}-attention** ({n_cases} head cases over {len(layers)} layers). "
            f"Holding on every case: {'; '.join(held) if held else 'none'}. "
        )
        text += ("Failing: " + "; ".join(failed) + ". ") if failed else "No claim fails. "
        if empty:
            text += f"Not applicable anywhere: {', '.join(empty)}. "
        text += (
            f"β ∈ {{{', '.join(f'{b:.3f}' for b in betas)}}} (1/√d for d ∈ {{{', '.join(map(str, dims))}}}). "
            f"Of {converged:.0f} fixed points the dense map reaches from the queries, {common:.0f} "
            f"({(common / converged if converged else math.nan):.1%}) are also fixed by the sparse map"
        )
        text += (
            ", so the preservation lemma has nothing to act on and every dense fixed point is one where "
            "guidance moves the state linearly in λ (Remark 3.4). "
            if converged and common == 0
            else ". "
        )
        if certs:
            below = sum(v < 1 for v in certs)
            text += (
                f"The global weak-contraction certificate β L_α ‖K‖₂² ranges {min(certs):.3g}–{max(certs):.3g} "
                f"and is below 1 in {below} of {len(certs)} (case, map) pairs"
            )
            if lip_d and lip_s:
                text += (
                    f", while the local Lipschitz constant along the trajectories stays at most "
                    f"{max(lip_d):.3g} for the dense map and {max(lip_s):.3g} for the sparse map"
                )
            text += ". "
        if lam:
            text += (
                f"The Anderson-optimal scale λ* has median {_median(lam):.3g} (range of per-case medians "
                f"{min(lam):.3g}–{max(lam):.3g}). "
            )
        if toward and aligned:
            text += (
                f"The sparse-minus-dense residual points toward the sparse fixed point in a median "
                f"{_median(toward):.0%} of starts per case and aligns with the retrieval direction in "
                f"{_median(aligned):.0%}."
            )
        out += [text, ""]
    return out


# ------------------------------------------------------------------------------------------------ main
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: python analysis/capture_reference_traces.py --weights runs/reference/ema",
    )
    parser.add_argument("--weights", default=None, help="weights folder (default: bundled, else runs/reference/ema)")
    parser.add_argument("--prompts", type=Path, default=PROMPTS, help="prompts file (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=BUNDLED_TRACES, help="bundle folder (default: the bundled one)")
    defaults = CaptureSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps per prompt")
    parser.add_argument("--record-every", type=int, default=defaults.record_every, help="cross-attention step stride")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale, help="CFG scale")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="base seed (prompt i: seed + i)")
    parser.add_argument("--max-query-tokens", type=int, default=defaults.max_query_tokens)
    parser.add_argument("--query-seed", type=int, default=defaults.query_seed)
    parser.add_argument("--dtype", choices=("float16", "float32"), default=defaults.dtype, help="storage dtype")
    parser.add_argument("--self-steps", default=",".join(map(str, defaults.self_steps)))
    parser.add_argument("--self-heads", default=",".join(map(str, defaults.self_heads)))
    parser.add_argument("--max-mb", type=float, default=defaults.max_mb, help="size budget in MiB")
    parser.add_argument("--verify-wide", type=Path, default=None, metavar="OUT", help="run the wide verify only")
    parser.add_argument("--max-records", type=int, default=56, help="records per capture for --verify-wide")
    parser.add_argument("--summarise", type=Path, default=None, metavar="RESULTS", help="write the Markdown only")
    parser.add_argument("--default-results", type=Path, default=None, help="results.json of the default verify")
    parser.add_argument("--default-wall", type=float, default=None, help="wall time of the default verify (s)")
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
        f"captured {run['records']} records from {run['weights_path']} ({run['weights_source']}, training step "
        f"{run['weights_training_step']}, sha256 {run['weights_sha256'][:16]}…) into {run['out']}: "
        f"{run['bytes'] / 2**20:.2f} MiB, {len(run['cross_layers'])} cross-attention layers, "
        f"{run['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
