"""Capture split across ranks: each rank writes OUT/rank-R/, the merge lists every shard in OUT/manifest.json,
and the merged capture loads to the records of a single-process capture of the same prompts."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from hopfield_aa.cli import build_parser, main
from hopfield_aa.traces import TraceSet, capture_pipeline, merge_ranks, rank_directory
from hopfield_aa.traces.format import RECORD_FIELDS
from hopfield_aa.traces.selection import Selection
from hopfield_aa.traces.testing import tiny_sd_pipeline

PROMPTS = ["a red circle", "blue square", "green", "a tiny star", "dot"]
# every record field that a split capture must reproduce (keys differ: each rank prefixes its own)
FIELDS = tuple(name for name in RECORD_FIELDS if name not in ("key", "dtype", "tensors"))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe() -> Any:
    p = tiny_sd_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _capture(pipe: Any, out: Path, steps: int = 2, **kwargs: Any) -> None:
    capture_pipeline(
        pipe,
        PROMPTS,
        out,
        seed=7,
        num_inference_steps=steps,
        selection=Selection(kinds=["cross"], max_query_tokens=5, heads=[0, 2]),
        pipeline_kwargs={"output_type": "latent", "height": 16, "width": 16},
        progress=False,
        **kwargs,
    )


def _same_records(a: TraceSet, b: TraceSet) -> None:
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b, strict=True):
        for name in FIELDS:
            assert getattr(ra, name) == getattr(rb, name), name
        for name in ("q", "k", "v", "query_indices"):
            assert torch.equal(getattr(ra, name), getattr(rb, name)), name


def test_two_ranks_merge_to_the_single_process_capture(pipe: Any, tmp_path: Path) -> None:
    single, split = tmp_path / "single", tmp_path / "split"
    _capture(pipe, single)
    for rank in (1, 0):  # order of completion does not matter
        _capture(pipe, split, rank=rank, world_size=2)
    # each rank is a capture on its own: prompts i % 2 == rank, with the single run's ids and seeds
    for rank in (0, 1):
        part = TraceSet(rank_directory(split, rank))
        assert part.complete and part.metadata["prompt_ids"] == list(range(rank, len(PROMPTS), 2))
        assert [(r["prompt_id"], r["seed"]) for r in part.manifest["runs"]] == [
            (i, 7 + i) for i in range(rank, len(PROMPTS), 2)
        ]
        assert all(e["key"].startswith(f"rank{rank}_") for e in part.entries)
    assert not (split / "manifest.json").exists()
    merged_path = merge_ranks(split)
    assert merged_path == split / "manifest.json"
    merged, reference = TraceSet(split), TraceSet(single)
    assert merged.complete and merged.validate()["records"] == len(reference)
    assert merged.metadata["world_size"] == 2
    assert [r["directory"] for r in merged.metadata["ranks"]] == ["rank-0", "rank-1"]
    assert merged.metadata["prompts"] == PROMPTS and merged.metadata["config_hash"]
    assert [r["prompt_id"] for r in merged.manifest["runs"]] == list(range(len(PROMPTS)))
    assert all(f.startswith(("rank-0/", "rank-1/")) for f in merged.shards)
    _same_records(merged, reference)
    # merging again gives the same manifest; a rank's verify input is unchanged by the merge
    before = merged_path.read_text()
    merge_ranks(split)
    assert json.loads(merged_path.read_text()) == json.loads(before)


def test_merge_refuses_missing_or_disagreeing_ranks(pipe: Any, tmp_path: Path) -> None:
    split = tmp_path / "split"
    _capture(pipe, split, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"missing rank-1"):
        merge_ranks(split)
    _capture(pipe, split, steps=1, rank=1, world_size=2)  # another step count: not the same capture
    with pytest.raises(ValueError, match=r"rank-1/manifest.json \[metadata.num_inference_steps\]"):
        merge_ranks(split)
    assert not (split / "manifest.json").exists()
    single = tmp_path / "single"
    _capture(pipe, single)
    with pytest.raises(FileExistsError, match="single-process capture"):
        merge_ranks(single)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        _capture(pipe, tmp_path / "bad", rank=2, world_size=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, pipe: Any) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    pipe.save_pretrained(path)
    return path


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n")
    return path


def _argv(model_dir: Path, prompts_file: Path, out: Path) -> list[str]:
    argv = ["capture", "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out)]
    return [*argv, "--quiet", "--steps", "1", "--height", "8", "--width", "8", "--kinds", "cross"]


def test_capture_command_with_rank_and_world_size_then_merge(
    model_dir: Path, prompts_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "traces"
    argv = _argv(model_dir, prompts_file, out)
    assert main([*argv, "--rank", "0", "--world-size", "2"]) == 0
    assert "hopfield-aa capture --merge" in capsys.readouterr().out
    assert main([*argv, "--rank", "1", "--world-size", "2"]) == 0
    assert main(["capture", "--merge", "--out", str(out)]) == 0
    assert "merged 2 ranks" in capsys.readouterr().out
    traces = TraceSet(out)
    assert sorted({r.prompt_id for r in traces}) == [0, 1, 2]
    assert [r.prompt_id for r in traces] == sorted(r.prompt_id for r in traces)
    # a rank captured again with --overwrite drops the now stale merged manifest
    assert main([*argv, "--rank", "1", "--world-size", "2", "--overwrite"]) == 0
    assert not (out / "manifest.json").exists()


class _FakeState:
    """Stands in for accelerate.PartialState under `accelerate launch --num_processes 2`."""

    waited: ClassVar[list[int]] = []

    def __init__(self) -> None:
        self.process_index = int(_FakeState.rank)
        self.num_processes = 2
        self.device = torch.device("cpu")

    rank = 0

    def wait_for_everyone(self) -> None:
        _FakeState.waited.append(self.process_index)


def test_accelerate_launch_gives_rank_and_world_size_and_rank_zero_merges(
    model_dir: Path, prompts_file: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", types.SimpleNamespace(PartialState=_FakeState))
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "traces"
    _FakeState.waited = []
    for rank in (1, 0):
        _FakeState.rank = rank
        assert main(_argv(model_dir, prompts_file, out)) == 0
        assert (rank_directory(out, rank) / "manifest.json").is_file()
        assert (out / "manifest.json").is_file() == (rank == 0)  # rank 0 merges after the barrier
    assert _FakeState.waited == [1, 0]
    assert TraceSet(out).metadata["world_size"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rank", "1"], "--rank and --world-size go together"),
        (["--rank", "2", "--world-size", "2"], "--rank must be in [0, 2)"),
        (["--world-size", "0", "--rank", "0"], "--world-size must be >= 1"),
    ],
)
def test_rank_errors_are_one_line(
    extra: list[str], message: str, model_dir: Path, prompts_file: Path, tmp_path: Path, capsys
) -> None:
    assert main([*_argv(model_dir, prompts_file, tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hopfield-aa capture: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_merge_and_missing_flags_errors_are_one_line(tmp_path: Path, capsys) -> None:
    cases = [
        (["capture", "--merge", "--out", str(tmp_path)], "no rank-*/manifest.json to merge"),
        (["capture", "--merge"], "--out is required"),
        (["capture", "--out", str(tmp_path)], "--model is required (unless --merge)"),
        (
            [
                "capture",
                "--model",
                str(tmp_path),
                "--prompts",
                str(tmp_path / "p.txt"),
                "--out",
                str(tmp_path),
            ],
            "--prompts",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("hopfield-aa capture: error: ") and message in err, err
        assert len(err.strip().splitlines()) <= 2


def test_capture_help_shows_every_default_and_describes_every_flag() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    capture = sub.choices["capture"]
    formatter = capture._get_formatter()
    for action in capture._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings
        if isinstance(action, argparse._StoreTrueAction):
            continue
        text = formatter._get_help_string(action) or ""
        assert "default" in text.lower() or "required" in text, action.option_strings
    assert "(default: 20)" in capture.format_help() and "--world-size" in capture.format_help()
