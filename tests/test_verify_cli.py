"""The ``verify`` and ``plot`` commands: files written, table printed, exit codes (0 whatever the claims'
outcome, non-zero on bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hopfield_aa.checks import REGISTRY, VERDICTS
from hopfield_aa.cli import main
from tests.test_checks_traces import write_capture

FIGURES = (
    "guided_contraction.png",
    "value_space.png",
    "energy.png",
    "residuals_dense.png",
    "residuals_sparse.png",
    "orthogonal_error.png",
    "contraction.png",
    "divergence.png",
    "lambda_star.png",
    "common_vs_beta.png",
    "ladder.png",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("verify")
    traces = write_capture(root / "traces" / "run0", steps=(0,), heads=1)
    out = root / "report"
    code = main(
        ["verify", "--quick", "--states", "6", "--out", str(out), "--traces", str(traces), "--no-progress"]
    )
    return out, code


def test_verify_quick_writes_the_report_with_one_verdict_vocabulary(report) -> None:
    out, code = report
    assert code == 0
    for name in ("report.md", "results.json", *FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    assert {row["claim"] for row in doc["summary"]} == set(REGISTRY)
    assert {row["status"] for row in doc["summary"]} <= set(VERDICTS)
    for row in doc["summary"]:
        kind = REGISTRY[row["claim"]].kind
        if row["status"] == "fail":  # a failure always had its premise met
            assert row["n_premise"] > row["n_passed"] >= 0
        if row["status"] == "premise not met":
            assert row["n_premise"] == 0 and row["premise"]
        assert (row["status"] == "identity") <= (kind == "identity")
        assert (row["kind"] == "measured") == (row["status"] == "measured")
        assert row["kind"] == kind or row["setting"].startswith("G ")  # G's contraction: measured
    groups = {row["data"] for row in doc["summary"]}
    assert {"gaussian", "beta_sweep", "trace:self", "trace:cross"} <= groups
    assert doc["value_space"]["rows"] and doc["settings"]["dtype"] == "float64"
    text = (out / "report.md").read_text()
    glance = text.index("## At a glance")
    assert glance < text.index("## Claims (evidence)") < text.index("## Identities")
    assert "CLAIMS" in text and "IDENTITIES" in text and "premise not met" in text
    assert "papers/theory.md" in text and "THEORY.md" not in text.replace("papers/theory.md", "")


def test_verify_keeps_at_most_five_counterexamples_per_claim_and_runs_in_half_precision(
    tmp_path: Path,
) -> None:
    out = tmp_path / "f16"
    code = main(
        [
            "verify",
            "--quick",
            "--states",
            "4",
            "--families",
            "gaussian,clustered",
            "--traces",
            "none",
            "--dtype",
            "float16",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["dtype"] == "float16"
    energy = [r for c in doc["cases"] for r in c["results"] if r["claim"] == "energy descent"]
    assert energy
    assert all(float(r["tolerance"]) > 1e-6 for r in energy)  # float16 eps, not float64's
    files = list((out / "counterexamples").glob("*.json")) if (out / "counterexamples").exists() else []
    per_claim: dict[str, int] = {}
    for path in files:
        claim = json.loads(path.read_text())["claim"]
        per_claim[claim] = per_claim.get(claim, 0) + 1
    assert all(n <= 5 for n in per_claim.values())


def test_plot_redraws_the_figures_from_results_json(report, tmp_path: Path) -> None:
    out, _ = report
    assert main(["plot", str(out / "results.json"), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(FIGURES)


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "--families", "uniform"],
        ["verify", "--claims", "nonsense"],
        ["verify", "--families", "none", "--traces", "none"],
        ["verify", "--traces", "/nonexistent/traces"],
        ["plot", "/nonexistent/results.json"],
    ],
)
def test_bad_input_exits_non_zero(argv: list[str], tmp_path: Path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path)] if argv[0] == "verify" else argv) == 2
    assert "error" in capsys.readouterr().err
