"""What a check of a claim (papers/theory.md) returns (:class:`CheckResult`) with its verdict, the data it
ran on (:class:`Case`), tolerances scaled to the dtype, and the counter-example files with their replay.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hopfield_aa._io import write_safetensors, write_text

# The form of the dynamics a check tests. Synthetic memories: the auto-associative map itself. Traces:
# the keys of a head as memory, its queries as starting states, its recorded scale as β (papers/theory.md
# §13); the hetero-associative attention output (through the values) is one step, not iterated.
FORM_SYNTHETIC = "auto-associative retrieval T(ξ) = Xᵀ entmax_α(β X ξ) on the stored patterns"
FORM_TRACE = (
    "auto-associative dynamics on the keys: memory X = K of the head, states ξ₀ = its queries, "
    "β = the recorded scale (the hetero-associative output through V is one step and is not iterated)"
)

# The verdict vocabulary of every row, in results.json and in report.md:
#   pass             the premise held for the states counted and the statement held at every one of them
#   fail             the premise held for the states counted and the statement failed at some of them
#   premise not met  no state tried met the claim's premise (the row says which premise, and how many met it)
#   identity         an algebraic identity of the library's own rule (holds by construction): a regression
#                    test of the code, reported in its own section and never counted as evidence
#   measured         a quantity without a verdict
STATUS_PASS = "pass"
STATUS_FAIL = "fail"
STATUS_PREMISE = "premise not met"
STATUS_IDENTITY = "identity"
STATUS_MEASURED = "measured"
VERDICTS = (STATUS_PASS, STATUS_FAIL, STATUS_PREMISE, STATUS_IDENTITY, STATUS_MEASURED)

# What kind of statement a claim is (the registry gives each claim one).
KIND_CLAIM, KIND_IDENTITY, KIND_MEASURED = "claim", "identity", "measured"
KINDS = (KIND_CLAIM, KIND_IDENTITY, KIND_MEASURED)


@dataclass(frozen=True, eq=False)
class Case:
    """One memory and the starting states the checks run from.

    Attributes
    ----------
    patterns : Tensor, shape (N, d)
        The memory ``X`` (rows are patterns), in the compute dtype (float64 by default).
    states : Tensor, shape (M, d)
        Starting states ξ₀.
    beta : float
        Inverse temperature β > 0.
    data : Mapping
        The data's identity: ``{"family": ..., parameters, "seed": ...}`` for a synthetic memory, or
        ``{"trace": dir, "file": shard, "layer": ..., "kind": ..., "step": ..., "head": ...}`` for a trace.
    form : str
        Which dynamics the checks test (:data:`FORM_SYNTHETIC` or :data:`FORM_TRACE`).
    """

    patterns: torch.Tensor
    states: torch.Tensor
    beta: float
    data: Mapping[str, Any]
    form: str = FORM_SYNTHETIC

    @property
    def label(self) -> str:
        """A short, file-name-safe name of the data (``gaussian-N1024-d64-b0.125``)."""
        return data_label(self.data)

    @property
    def pattern_scale(self) -> float:
        """``M``, the largest pattern norm (at least the smallest positive float)."""
        return max(float(torch.linalg.vector_norm(self.patterns, dim=-1).max()), 1e-300)


def data_label(data: Mapping[str, Any]) -> str:
    """A file-name-safe label of a data identity, e.g. ``gaussian-N16-d8-b0.35`` or ``trace-attn2-s3-h0``."""
    if "family" in data:
        parts = [str(data["family"])]
        for key in ("N", "d", "beta"):
            if key in data:
                value = data[key]
                parts.append(
                    f"{key if key != 'beta' else 'b'}{value:.4g}"
                    if isinstance(value, float)
                    else f"{key}{value}"
                )
    else:
        layer = str(data.get("layer", "layer")).replace(".", "_")
        parts = ["trace", layer, str(data.get("kind", "")), f"s{data.get('step')}", f"h{data.get('head')}"]
        if data.get("batch_index") is not None:
            parts.append(f"b{data['batch_index']}")
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", "-".join(p for p in parts if p))


def tolerance(dtype: torch.dtype, factor: float) -> float:
    """``factor`` times the machine epsilon of the compute dtype (float16: 9.8e-4, bfloat16: 7.8e-3)."""
    return float(factor) * torch.finfo(dtype).eps


@dataclass
class CheckResult:
    """The outcome of checking one claim on one data set.

    Attributes
    ----------
    claim : str
        The claim's name (the registry's, e.g. ``"energy descent"``).
    data : dict
        The data identity (:attr:`Case.data`).
    form : str
        Which dynamics were tested.
    status : str
        One of :data:`VERDICTS`: ``pass`` (every state that met the premise satisfies the statement within
        ``tolerance``), ``fail`` (the premise held for the ``n_premise`` states counted and the statement
        failed at ``n_premise − n_passed`` of them; counter-examples saved), ``premise not met`` (no state
        tried met the premise: ``premise`` says which, ``premise_note`` why), ``identity`` (an identity of
        the library's own rule held: a regression test, not evidence), ``measured`` (no verdict).
    kind : {"claim", "identity", "measured"}
        What kind of statement the claim is (from the registry).
    premise : str
        The premise a state must meet to be counted (empty: every state).
    n_states : int
        Number of states (or state × setting pairs, see ``unit``) tried.
    n_premise : int
        How many of them met the premise (the states the verdict counts).
    n_passed : int
        How many of those satisfy the statement.
    premise_note : str
        Why states did not meet the premise (counts per reason), shown beside the verdict.
    worst_margin : float
        ``min`` over the states counted of (allowed − observed), in the units of ``unit``; negative means a
        violation. NaN when nothing was counted.
    tolerance : float
        The absolute slack used, ``tolerance_factor · eps(dtype) · scale``.
    tolerance_factor : float
        The factor of the dtype's epsilon.
    tolerance_note : str
        What ``scale`` is and why the factor suffices.
    rate : float or None
        For claims about a rate: the measured rate (meaning in ``rate_note``).
    rate_note : str
    unit : str
        What one "state" is for this claim.
    setting : str
        A short label of the settings (``α=1``, ``ζ=0``), shown in the claims table.
    measured : dict
        Further measurements (shares, quantiles).
    counterexamples : list of str
        Paths of the saved worst counter-examples (``.json``; tensors beside it in ``.safetensors``).
    settings : dict
        The settings the check ran with.
    series : dict
        Data for the report's figures (not printed in the table).
    """

    claim: str
    data: dict[str, Any]
    form: str
    status: str
    n_states: int
    n_passed: int
    worst_margin: float
    tolerance: float
    tolerance_factor: float
    tolerance_note: str
    kind: str = KIND_CLAIM
    premise: str = ""
    n_premise: int = -1
    premise_note: str = ""
    unit: str = "state"
    setting: str = ""
    rate: float | None = None
    rate_note: str = ""
    measured: dict[str, Any] = field(default_factory=dict)
    counterexamples: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_premise < 0:
            self.n_premise = self.n_states
        if self.status not in VERDICTS:
            raise ValueError(f"status must be one of {VERDICTS}, got {self.status!r}")

    @property
    def pass_rate(self) -> float:
        """``n_passed / n_premise`` (NaN when no state met the premise)."""
        return self.n_passed / self.n_premise if self.n_premise else math.nan

    def to_dict(self, *, with_series: bool = True) -> dict[str, Any]:
        """JSON-ready dictionary (NaN and infinities become strings so the JSON stays standard)."""
        # _jsonable copies every container, so the fields need no deep copy of their own first
        out = {f.name: getattr(self, f.name) for f in fields(self) if with_series or f.name != "series"}
        out["pass_rate"] = self.pass_rate
        return _jsonable(out)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> CheckResult:
        """Inverse of :meth:`to_dict`: a result read back from results.json (NaN/inf decoded, ``pass_rate``
        and other derived keys ignored; ``series`` empty when the file left it out)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in from_jsonable(dict(record)).items() if k in names})


def case_results(doc: Mapping[str, Any]) -> list[tuple[dict[str, Any], CheckResult]]:
    """Every result of a results.json document with the case it ran on, ``(case entry, result)``, in order.

    The case entry is the document's own (``data``, ``label``, ``group``, ``form``, ``fixed_points``);
    the result's ``counterexamples`` stay relative to the report folder.
    """
    return [(case, CheckResult.from_dict(r)) for case in doc.get("cases", []) for r in case["results"]]


def status_of(n_premise: int, n_passed: int, kind: str = KIND_CLAIM) -> str:
    """The verdict of ``n_passed`` successes among ``n_premise`` states that met the premise.

    ``premise not met`` when none met it; a violation is ``fail`` whatever the kind (an identity that fails
    is a bug of the rule under test); otherwise ``pass``, ``identity`` or ``measured`` by ``kind``.
    """
    if kind == KIND_MEASURED:
        return STATUS_MEASURED
    if n_premise == 0:
        return STATUS_PREMISE
    if n_passed < n_premise:
        return STATUS_FAIL
    return STATUS_IDENTITY if kind == KIND_IDENTITY else STATUS_PASS


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def from_jsonable(value: Any) -> Any:
    """Inverse of the NaN/inf encoding used in results.json."""
    if isinstance(value, Mapping):
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Standard JSON (NaN/inf written as strings), written atomically by :mod:`hopfield_aa._io`."""
    write_text(path, json.dumps(_jsonable(obj), indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# counter-examples


@dataclass(frozen=True)
class Replay:
    """The result of :func:`replay_counterexample`.

    Attributes
    ----------
    claim : str
    margin : float
        (allowed − observed) recomputed now; negative: the statement still fails on this instance.
    recorded_margin : float
        The margin stored when the counter-example was saved.
    tolerance : float
        The slack used (the stored one).
    holds : bool
        ``margin >= 0``.
    premise_met : bool
        Whether the instance meets the claim's premise, re-evaluated now (counter-examples saved before
        the premises were checked may not).
    verdict : str
        ``fail`` (premise met, statement fails), ``premise not met``, or ``pass``.
    details : dict
        The instance's settings and the recomputed quantities.
    """

    claim: str
    margin: float
    recorded_margin: float
    tolerance: float
    holds: bool
    details: dict[str, Any]
    premise_met: bool = True
    verdict: str = STATUS_FAIL


ReplayFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], tuple[float, dict[str, Any]]]


def slug(text: str) -> str:
    """File-name-safe form of a claim name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


class CounterexampleStore:
    """A folder of counter-examples that keeps at most ``limit`` per claim: the most negative margins.

    Checks offer every instance they would save; the store writes it when it is among the ``limit``
    worst of its claim so far and deletes the one it displaces, so a run writes a bounded number of files
    (``limit=None`` keeps every instance offered).
    """

    def __init__(self, directory: str | os.PathLike[str], limit: int | None = 5) -> None:
        self.directory = Path(directory)
        self.limit = limit
        self.kept: dict[str, list[tuple[float, str]]] = {}

    def offer(self, claim: str, margin: float, write: Callable[[Path], str]) -> str | None:
        """Save the instance by ``write(directory)`` when it is among the worst kept; return its path."""
        kept = self.kept.setdefault(claim, [])
        if self.limit is not None and len(kept) >= self.limit:
            if self.limit <= 0:
                return None
            least = max(range(len(kept)), key=lambda i: kept[i][0])
            if margin >= kept[least][0]:
                return None
            _remove_counterexample(kept.pop(least)[1])
        path = write(self.directory)
        kept.append((margin, path))
        return path

    def paths(self) -> set[str]:
        """The JSON paths currently kept."""
        return {p for entries in self.kept.values() for _, p in entries}


def _remove_counterexample(json_path: str) -> None:
    path = Path(json_path)
    for victim in (path, path.with_suffix(".safetensors")):
        if victim.exists():
            victim.unlink()


def save_counterexample(
    directory: str | os.PathLike[str],
    *,
    claim: str,
    data: Mapping[str, Any],
    form: str,
    tensors: Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    margin: float,
    tolerance: float,
    rank: int,
    setting: str = "",
) -> str:
    """Save one counter-example as ``<claim>__<data>[__<setting>]__<rank>`` ``.safetensors`` + ``.json``.

    Returns the path of the JSON file.

    ``tensors`` hold what the claim is evaluated on (memory ``patterns``, the ``state`` or fixed ``point``,
    ...); ``params`` the settings (β, α, λ, ζ, η, reference, rule) that make the instance replayable with
    :func:`replay_counterexample`.
    """
    directory = Path(directory)
    tag = f"__{slug(setting)}" if setting else ""
    stem = f"{slug(claim)}__{data_label(data)}{tag}__{rank}"
    tensor_path = directory / f"{stem}.safetensors"
    json_path = directory / f"{stem}.json"
    write_safetensors(tensor_path, dict(tensors), {"claim": claim})
    write_json(
        json_path,
        {
            "claim": claim,
            "data": dict(data),
            "form": form,
            "params": dict(params),
            "margin": margin,
            "tolerance": tolerance,
            "tensors": tensor_path.name,
            "setting": setting,
            "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        },
    )
    return str(json_path)


def replay_counterexample(path: str | os.PathLike[str], **overrides: Any) -> Replay:
    """Re-evaluate a saved counter-example: does the statement still fail, and does it meet the premise?

    Parameters
    ----------
    path : str or Path
        The counter-example's ``.json`` (or its ``.safetensors``; the other file must sit beside it).
    **overrides
        Settings replacing the stored ones (e.g. ``scale=0.5``), to probe the instance.

    Returns
    -------
    Replay
        ``verdict`` is ``premise not met`` for an instance outside the claim's premise (such instances
        were saved as counter-examples before the premises were checked), ``fail`` when the premise holds
        and the statement fails, ``pass`` otherwise.

    Examples
    --------
    >>> replay = replay_counterexample("report/counterexamples/weak-contraction__x__0.json")  # doctest: +SKIP
    >>> replay.verdict, replay.margin  # doctest: +SKIP
    ('fail', -0.73)
    """
    from hopfield_aa.checks.registry import REGISTRY

    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    record = from_jsonable(json.loads(path.read_text(encoding="utf-8")))
    claim = record["claim"]
    entry = REGISTRY.get(claim)
    if entry is None or entry.replay is None:
        raise ValueError(f"{path}: no replay is defined for claim {claim!r}")
    tensors = load_file(str(path.parent / record["tensors"]))
    params = {**record["params"], **overrides}
    margin, details = entry.replay(tensors, params)
    premise_met = bool(details.pop("premise_met", True))
    holds = bool(margin >= 0)
    verdict = STATUS_PREMISE if not premise_met else (STATUS_PASS if holds else STATUS_FAIL)
    verdict = str(details.pop("verdict", verdict))  # a measured quantity has no verdict
    return Replay(
        claim=claim,
        margin=float(margin),
        recorded_margin=float(record["margin"]),
        tolerance=float(record["tolerance"]),
        holds=holds,
        details=details,
        premise_met=premise_met,
        verdict=verdict,
    )
