"""Checks on captured traces: keys as memory, queries as starting states, the recorded scale as β; the data
identity names file, layer, kind, step and head, and the form tested is stated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hopfield_aa.checks import FORM_TRACE, cases_from_traces, check_energy_descent, check_weak_contraction
from hopfield_aa.checks.traces import capture_dirs
from hopfield_aa.traces.format import ShardWriter


def write_capture(directory: Path, *, steps: tuple[int, ...] = (0, 3), heads: int = 2, seed: int = 0) -> Path:
    """A small capture in the on-disk trace format: one self- and one cross-attention record per step."""
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(directory, metadata={"model_class": "synthetic"}, selection={})
    for step in steps:
        for kind, layer, n_keys in (("self", "mid.attn1", 16), ("cross", "mid.attn2", 5)):
            d, n_q = 8, 16
            tensors = {
                "q": torch.randn(heads, n_q, d, generator=gen),
                "k": 2.0 * torch.randn(heads, n_keys, d, generator=gen),
                "v": torch.randn(heads, n_keys, d, generator=gen),
                "query_indices": torch.arange(n_q),
            }
            entry = {
                "key": writer.next_key(),
                "layer": layer,
                "kind": kind,
                "step": step,
                "timestep": 1000.0 - 100 * step,
                "scale": d**-0.5,
                "num_heads": heads,
                "heads": list(range(heads)),
                "head_dim": d,
                "query_tokens": n_q,
                "key_tokens": n_keys,
                "query_segments": {"image": [0, n_q]},
                "key_segments": {"image": [0, n_keys]} if kind == "self" else {"text": [0, n_keys]},
                "batch_index": 0,
                "prompt_id": 0,
                "seed": seed,
                "query_seed": None,
                "dtype": "float32",
            }
            writer.add(entry, tensors)
    writer.close()
    return directory


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_capture(tmp_path_factory.mktemp("traces") / "run0")


def test_trace_heads_become_cases_with_keys_as_memory(capture_dir: Path) -> None:
    cases = cases_from_traces(capture_dir.parent, max_records=None, max_heads=2, max_states=6)
    assert len(cases) == 2 * 2 * 2  # steps × kinds × heads
    kinds = {(c.data["kind"], c.data["step"], c.data["layer"]) for c in cases}
    assert kinds == {
        (k, s, layer) for s in (0, 3) for k, layer in (("self", "mid.attn1"), ("cross", "mid.attn2"))
    }
    case = next(c for c in cases if c.data["kind"] == "cross")
    assert case.form == FORM_TRACE and "keys" in case.form
    assert (
        case.patterns.shape == (5, 8) and case.states.shape == (6, 8) and case.patterns.dtype == torch.float64
    )
    assert case.beta == pytest.approx(8**-0.5)
    assert case.data["file"].endswith(".safetensors") and case.data["head"] in (0, 1)
    assert case.label.startswith("trace-mid_attn2-cross-s")


def test_checks_run_on_trace_cases_and_name_the_trace(capture_dir: Path) -> None:
    case = cases_from_traces(capture_dir, max_records=1, max_heads=1, max_states=4)[0]
    result = check_energy_descent(case, steps=3)
    assert result.status == "pass" and result.n_states == 4 * 4 * 3
    assert result.data["trace"] == str(capture_dir) and result.form == FORM_TRACE
    assert check_weak_contraction(case).n_states > 0


def test_missing_traces_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        capture_dirs(tmp_path / "absent")
    assert capture_dirs(tmp_path) == []
