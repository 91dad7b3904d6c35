"""The ``verify`` and ``plot`` commands: files written, table printed, exit codes (0 whatever the claims'
outcome, non-zero on bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hopfield_aa.checks import replay_counterexample
from hopfield_aa.cli import main
from tests.test_checks_traces import write_capture

FIGURES = (
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


def test_verify_quick_writes_the_report_and_exits_zero_despite_failing_claims(report, capsys) -> None:
    out, code = report
    assert code == 0
    for name in ("report.md", "results.json", *FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    claims = {row["claim"] for row in doc["summary"]}
    assert len(claims) == 9  # the eight claims of THEORY.md §5 and the ladder measurement
    assert all(row["n_states"] >= 0 and "pass_rate" in row for row in doc["summary"])
    groups = {row["data"] for row in doc["summary"]}
    assert {"gaussian", "beta_sweep", "trace:self", "trace:cross"} <= groups
    failing = [row for row in doc["summary"] if row["status"] == "fail"]
    assert failing, "the quick run includes claims that fail (e.g. orthogonal error with ζ = 1)"
    path = out / failing[0]["counterexamples"][0]
    assert path.is_file() and not replay_counterexample(path).holds
    text = (out / "report.md").read_text()
    assert (
        "## Claims table" in text
        and "## What fails where" in text
        and "auto-associative dynamics on the keys" in text
    )


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
