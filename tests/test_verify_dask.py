"""``verify`` on Dask: a 2-worker cluster writes the serial run's results.json (timings apart), including
the counter-examples kept under the per-claim cap; errors naming ``--dask`` when Dask cannot be used."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from hopfield_aa.checks.cluster import DaskError, parse_dask
from hopfield_aa.checks.report import VerifyConfig, run_verification
from hopfield_aa.checks.results import write_json
from hopfield_aa.cli import main
from tests.test_checks_traces import write_capture

distributed = pytest.importorskip("distributed")

TIMINGS = ("seconds", "environment")


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_capture(tmp_path_factory.mktemp("dask") / "traces" / "run0", steps=(0,), heads=1)


def _config(traces: Path, **kwargs: Any) -> VerifyConfig:
    # beta_sweep at 24 states yields two weak-contraction counter-examples on two cases; a cap of one
    # per claim makes the second displace or lose to the first, as in the serial run
    return VerifyConfig(
        families=["beta_sweep"],
        claims=["contraction"],
        traces=str(traces),
        n_states=24,
        max_records=None,
        progress=False,
        max_counterexamples=1,
        **kwargs,
    )


def test_two_worker_cluster_writes_the_serial_results(traces: Path, tmp_path: Path) -> None:
    serial, parallel = tmp_path / "serial", tmp_path / "dask"
    write_json(serial / "results.json", run_verification(_config(traces), serial))
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as client:
        doc = run_verification(_config(traces), parallel, client=client)
    write_json(parallel / "results.json", doc)
    a, b = _results(serial), _results(parallel)
    assert _without_timings(a) == _without_timings(b)
    assert a["environment"]["executor"] == "serial" and b["environment"]["executor"].startswith("dask")
    groups = {c["group"] for c in a["cases"]}
    assert groups == {"beta_sweep", "trace:self", "trace:cross"}
    assert len(a["cases"]) == 9 + 2  # nine β values; a self and a cross record, one head each
    # the cap held and the same counter-example files are on disk, with the same bytes
    kept = sorted(p.name for p in (serial / "counterexamples").iterdir())
    assert kept and kept == sorted(p.name for p in (parallel / "counterexamples").iterdir())
    assert len([k for k in kept if k.endswith(".json")]) == 1
    for name in kept:
        assert (serial / "counterexamples" / name).read_bytes() == (
            parallel / "counterexamples" / name
        ).read_bytes()
    paths = [p for c in b["cases"] for r in c["results"] for p in r["counterexamples"]]
    assert paths and all((parallel / p).is_file() for p in paths)


@pytest.mark.slow
def test_verify_command_on_a_local_cluster_of_two_processes(traces: Path, tmp_path: Path) -> None:
    base = ["verify", "--quick", "--states", "6", "--traces", str(traces), "--no-progress"]
    base += ["--families", "gaussian,beta_sweep"]
    assert main([*base, "--out", str(tmp_path / "serial")]) == 0
    assert main([*base, "--out", str(tmp_path / "dask"), "--dask", "local:2"]) == 0
    a, b = _results(tmp_path / "serial"), _results(tmp_path / "dask")
    assert _without_timings(a) == _without_timings(b)
    assert b["environment"]["executor"] == "dask LocalCluster, 2 worker(s) x 1 thread"


def test_dask_specs_parse() -> None:
    assert parse_dask("local") == ("local", None)
    assert parse_dask("local:3") == ("local", 3)
    assert parse_dask("tcp://10.0.0.1:8786") == ("tcp://10.0.0.1:8786", None)
    for bad in ("local:0", "", "two words"):
        with pytest.raises(DaskError):
            parse_dask(bad)


def _verify(tmp_path: Path, dask: str) -> list[str]:
    argv = ["verify", "--quick", "--families", "clustered", "--traces", "none", "--no-progress"]
    return [*argv, "--out", str(tmp_path / "r"), "--dask", dask]


def test_unreachable_scheduler_is_a_two_line_error_naming_the_flag(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import hopfield_aa.checks.cluster as cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1)
    assert main(_verify(tmp_path, "tcp://127.0.0.1:9")) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "hopfield-aa verify: error: --dask tcp://127.0.0.1:9: cannot reach a Dask scheduler"
    )
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_missing_distributed_names_the_flag_and_the_extra(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    assert main(_verify(tmp_path, "local:2")) == 2
    err = capsys.readouterr().err
    assert "error: --dask local:2: " in err and "hopfield-aa[dask]" in err and "Traceback" not in err


def test_malformed_dask_spec_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    assert main(_verify(tmp_path, "local:0")) == 2
    assert "--dask local:0: local:N needs N >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
