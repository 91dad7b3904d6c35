"""What a check of a THEORY.md §5 claim returns (:class:`CheckResult`), the data it ran on (:class:`Case`),
tolerances scaled to the dtype, and the counter-example files (safetensors + JSON) with their replay.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# The form of the dynamics a check tests. Synthetic memories: the auto-associative map itself. Traces:
# the keys of a head as memory, its queries as starting states, its recorded scale as β (THEORY.md §2,
# last bullet); the hetero-associative attention output (through the values) is one step, not iterated.
FORM_SYNTHETIC = "auto-associative retrieval T(ξ) = Xᵀ entmax_α(β X ξ) on the stored patterns"
FORM_TRACE = (
    "auto-associative dynamics on the keys: memory X = K of the head, states ξ₀ = its queries, "
    "β = the recorded scale (the hetero-associative output through V is one step and is not iterated)"
)

STATUS_PASS, STATUS_FAIL, STATUS_NA, STATUS_MEASURED = "pass", "fail", "n/a", "measured"


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
    """``factor`` times the machine epsilon of the compute dtype (float32 for half types)."""
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return float(factor) * torch.finfo(dtype).eps


@dataclass
class CheckResult:
    """The outcome of checking one claim on one data set.

    Attributes
    ----------
    claim : str
        The claim's name (THEORY.md §5), e.g. ``"energy descent"``.
    data : dict
        The data identity (:attr:`Case.data`).
    form : str
        Which dynamics were tested.
    status : {"pass", "fail", "n/a", "measured"}
        ``pass``: every state tried satisfies the claim within ``tolerance``; ``fail``: at least one does
        not (counter-examples saved); ``n/a``: no state the claim applies to (e.g. no common fixed point);
        ``measured``: a quantity the theory leaves open, reported without a verdict.
    n_states : int
        Number of states (or state × setting pairs, see ``unit``) tried.
    n_passed : int
        How many of them satisfy the claim.
    worst_margin : float
        ``min`` over everything tried of (allowed − observed), in the units of ``unit``; negative means a
        violation. NaN when nothing was tried.
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
    unit: str = "state"
    setting: str = ""
    rate: float | None = None
    rate_note: str = ""
    measured: dict[str, Any] = field(default_factory=dict)
    counterexamples: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)

    @property
    def pass_rate(self) -> float:
        """``n_passed / n_states`` (NaN when nothing was tried)."""
        return self.n_passed / self.n_states if self.n_states else math.nan

    def to_dict(self, *, with_series: bool = True) -> dict[str, Any]:
        """JSON-ready dictionary (NaN and infinities become strings so the JSON stays standard)."""
        out = asdict(self)
        out["pass_rate"] = self.pass_rate
        if not with_series:
            out.pop("series")
        return _jsonable(out)


def status_of(n_states: int, n_passed: int) -> str:
    """``n/a`` when nothing was tried, else ``pass`` only when every state passed."""
    if n_states == 0:
        return STATUS_NA
    return STATUS_PASS if n_passed == n_states else STATUS_FAIL


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


# --------------------------------------------------------------------------------------------------
# atomic files


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="-" + path.name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Standard JSON (NaN/inf written as strings), written atomically."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=1) + "\n")


def _atomic_save_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="-" + path.name)
    os.close(fd)
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata)
        )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# counter-examples


@dataclass(frozen=True)
class Replay:
    """The result of :func:`replay_counterexample`.

    Attributes
    ----------
    claim : str
    margin : float
        (allowed − observed) recomputed now; negative: the claim still fails on this instance.
    recorded_margin : float
        The margin stored when the counter-example was saved.
    tolerance : float
        The slack used (the stored one).
    holds : bool
        ``margin >= 0``.
    details : dict
        The instance's settings and the recomputed quantities.
    """

    claim: str
    margin: float
    recorded_margin: float
    tolerance: float
    holds: bool
    details: dict[str, Any]


# claim name -> function(tensors, params) -> (margin, details); filled by hopfield_aa.checks.claims
_REPLAYERS: dict[
    str, Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], tuple[float, dict[str, Any]]]
] = {}


def register_replayer(
    claim: str,
) -> Callable[[Callable[..., tuple[float, dict[str, Any]]]], Callable[..., tuple[float, dict[str, Any]]]]:
    """Decorator: the function that re-evaluates one saved instance of ``claim``."""

    def wrap(fn: Callable[..., tuple[float, dict[str, Any]]]) -> Callable[..., tuple[float, dict[str, Any]]]:
        _REPLAYERS[claim] = fn
        return fn

    return wrap


def slug(text: str) -> str:
    """File-name-safe form of a claim name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


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
    directory.mkdir(parents=True, exist_ok=True)
    tag = f"__{slug(setting)}" if setting else ""
    stem = f"{slug(claim)}__{data_label(data)}{tag}__{rank}"
    tensor_path = directory / f"{stem}.safetensors"
    json_path = directory / f"{stem}.json"
    _atomic_save_tensors(tensor_path, tensors, {"claim": claim})
    atomic_write_json(
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
    """Re-evaluate a saved counter-example and say whether the claim still fails on it.

    Parameters
    ----------
    path : str or Path
        The counter-example's ``.json`` (or its ``.safetensors``; the other file must sit beside it).
    **overrides
        Settings replacing the stored ones (e.g. ``scale=0.5``), to probe the instance.

    Returns
    -------
    Replay

    Examples
    --------
    >>> replay = replay_counterexample("report/counterexamples/weak-contraction__x__0.json")  # doctest: +SKIP
    >>> replay.holds, replay.margin  # doctest: +SKIP
    (False, -0.73)
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    record = from_jsonable(json.loads(path.read_text(encoding="utf-8")))
    claim = record["claim"]
    # importing the claims registers the replayers
    import hopfield_aa.checks.claims  # noqa: F401

    if claim not in _REPLAYERS:
        raise ValueError(f"{path}: no replay is defined for claim {claim!r}")
    tensors = load_file(str(path.parent / record["tensors"]))
    params = {**record["params"], **overrides}
    margin, details = _REPLAYERS[claim](tensors, params)
    return Replay(
        claim=claim,
        margin=float(margin),
        recorded_margin=float(record["margin"]),
        tolerance=float(record["tolerance"]),
        holds=bool(margin >= 0),
        details=details,
    )
