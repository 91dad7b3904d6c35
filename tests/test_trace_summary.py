"""The trace summary of ``analysis/capture_reference_traces.py --summarise``: it reads results.json in the
verify schema, names every claim with a verdict from the one vocabulary, keeps identities apart, says where
a premise was not met, and keeps at most a few counter-examples per claim; and what it reads results.json
with: :func:`case_results`, and the verify summary pooling results under any grouping."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from hopfield_aa.checks import REGISTRY, VERDICTS, CheckResult, case_results, save_counterexample
from hopfield_aa.checks.report import VerifyConfig, run_verification, summarise
from hopfield_aa.checks.results import write_json
from tests.test_checks_traces import write_capture

ROOT = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    path = ROOT / "analysis" / "capture_reference_traces.py"
    spec = importlib.util.spec_from_file_location("capture_reference_traces", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _script()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results.json of a tiny verify run on a synthetic capture: steps in every bucket, no families."""
    root = tmp_path_factory.mktemp("trace_summary")
    traces = write_capture(root / "traces" / "run0", steps=(0, 8, 16), heads=1)
    config = VerifyConfig(families=[], traces=str(traces), n_states=4, max_records=6, progress=False)
    out = root / "report"
    write_json(out / "results.json", run_verification(config, out))
    return out / "results.json"


def _findings(text: str) -> dict[str, list[str]]:
    """``"claim (setting)" -> [verdict, ...]`` from the bullets of "What it says" (one per attention kind)."""
    section = text[text.index("## What it says") : text.index("## Where a claim was tested outside")]
    found: dict[str, list[str]] = {}
    for line in section.splitlines():
        match = re.match(r"  - (.+?): (\*\*fail\*\*|pass|premise not met|identity|measured)[ ,(]", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2).strip("*"))
    return found


def test_summary_names_every_claim_with_a_verdict_of_the_vocabulary(
    script: ModuleType, results: Path, tmp_path: Path
) -> None:
    kept = tmp_path / "kept"
    text = script.summarise(results, counterexamples=kept)
    doc = json.loads(results.read_text())
    findings = _findings(text)
    for claim in REGISTRY:  # every claim of the registry, value space included
        assert any(title == claim or title.startswith(f"{claim} (") for title in findings), claim
    for title, verdicts in findings.items():
        assert set(verdicts) <= set(VERDICTS), (title, verdicts)
        assert len(verdicts) == 2, title  # once per attention kind (self, cross)
    # the verdict of each claim and kind is the verify summary's own
    for row in doc["summary"]:
        if row["claim"] in REGISTRY and REGISTRY[row["claim"]].run is not None:
            assert row["status"] in findings[f"{row['claim']} ({row['setting']})"]
    # identities apart from the evidence; premises not met said, with how many states met them
    assert text.index("### Claims (evidence)") < text.index("### Identities")
    assert "n/a" not in text and "pass rate" not in text.lower()
    outside = text[text.index("## Where a claim was tested outside") : text.index("## Per attention kind")]
    for row in doc["summary"]:
        if row["kind"] != "measured" and row["n_premise"] < row["n_states"]:
            assert f"| {row['n_premise']}/{row['n_states']} |" in outside
    assert "#### self-attention" in text and "#### cross-attention" in text
    for bucket in ("early", "middle", "late"):
        assert f"| {bucket} |" in text
    assert "## Counter-examples kept" in text


def test_a_failure_is_reported_where_and_its_worst_counterexamples_kept(
    script: ModuleType, results: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    report.mkdir()
    doc = json.loads(results.read_text())
    case = next(c for c in doc["cases"] if c["data"]["kind"] == "self")
    row = next(r for r in case["results"] if r["claim"] == "energy descent")
    row["status"], row["n_passed"], row["worst_margin"] = "fail", row["n_premise"] - 1, -0.5
    row["counterexamples"] = []
    for rank, margin in enumerate((-0.1, -0.5, -0.3, -0.2)):
        path = save_counterexample(
            report / "counterexamples",
            claim="energy descent",
            data=case["data"],
            form=case["form"],
            tensors={"patterns": torch.zeros(2, 3, dtype=torch.float64)},
            params={"beta": 1.0},
            margin=margin,
            tolerance=1e-12,
            rank=rank,
        )
        row["counterexamples"].append(str(Path(path).relative_to(report)))
    write_json(report / "results.json", doc)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "stale.json").write_text("{}")
    (kept / "NOTES.md").write_text("kept")

    text = script.summarise(report / "results.json", counterexamples=kept)
    assert "fail" in _findings(text)[f"energy descent ({row['setting']})"]
    assert re.search(r"energy descent \(.*\): \*\*fail\*\*, 1 of \d+ counted .* with the premise met", text)
    assert "**fail** " in text  # the failing cell of the self-attention table
    files = sorted(p.name for p in kept.glob("*.json"))
    assert len(files) == script.COUNTEREXAMPLES_KEPT and "stale.json" not in files
    assert (kept / "NOTES.md").is_file()
    margins = sorted(json.loads((kept / name).read_text())["margin"] for name in files)
    assert margins == [-0.5, -0.3, -0.2]
    assert all((kept / json.loads((kept / n).read_text())["tensors"]).is_file() for n in files)
    table = text[text.index("## Counter-examples kept") :]
    assert table.count("| energy descent |") == script.COUNTEREXAMPLES_KEPT


def test_case_results_read_back_what_verify_wrote(results: Path) -> None:
    doc = json.loads(results.read_text())
    pairs = case_results(doc)
    assert len(pairs) == sum(len(c["results"]) for c in doc["cases"])
    for case, result in pairs:
        assert isinstance(result, CheckResult) and result.status in VERDICTS
        assert result.data == case["data"]
        assert isinstance(result.worst_margin, float)  # "nan" in the file is a float again
    again = CheckResult.from_dict(pairs[0][1].to_dict())
    assert again.to_dict() == pairs[0][1].to_dict()


def _result(status: str, n_premise: int, n_passed: int, kind: str = "claim") -> CheckResult:
    return CheckResult(
        claim="energy descent",
        data={"group": "any group"},
        form="",
        status=status,
        n_states=4,
        n_passed=n_passed,
        worst_margin=math.nan if not n_premise else 0.0,
        tolerance=1e-12,
        tolerance_factor=1.0,
        tolerance_note="",
        kind=kind,
        n_premise=n_premise,
        premise_note="" if n_premise else "4 not met",
    )


@pytest.mark.parametrize(
    ("statuses", "kind", "verdict"),
    [
        (("pass", "premise not met"), "claim", "pass"),
        (("pass", "fail", "premise not met"), "claim", "fail"),
        (("premise not met", "premise not met"), "claim", "premise not met"),
        (("identity", "premise not met"), "identity", "identity"),
    ],
)
def test_the_verify_summary_pools_verdicts_under_any_grouping(
    statuses: tuple[str, ...], kind: str, verdict: str
) -> None:
    counts = {"pass": (4, 4), "identity": (4, 4), "fail": (4, 3), "premise not met": (0, 0)}
    (row,) = summarise([], [_result(s, *counts[s], kind=kind) for s in statuses])
    assert row["status"] == verdict and row["data"] == "any group"
    assert row["n_premise"] == sum(counts[s][0] for s in statuses)
    assert row["cases_premise_not_met"] == statuses.count("premise not met")
