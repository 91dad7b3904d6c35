"""The one atomic writer (hopfield_aa._io): complete files or none, temporary names readers recognise, and
folders replaced whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hopfield_aa._io import atomic_folder, atomic_write, is_temporary, write_bytes, write_json


def test_a_write_replaces_the_file_with_mode_0644_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.bin"
    write_bytes(target, b"old")
    write_bytes(target, b"new", fsync=True)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    target = write_json(tmp_path / "a.json", {"v": 1})
    seen = []

    def fail(tmp: str) -> None:
        seen.append(Path(tmp).name)
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    # the temporary file was named so that readers of the folder recognise it
    assert is_temporary(seen[0]) and seen[0].endswith("-a.json")
    assert not is_temporary("a.json") and not is_temporary("shard-000000.safetensors")


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    with atomic_folder(target) as staging:
        (staging / "x.txt").write_text("1")
        assert not target.exists()
    assert (target / "x.txt").read_text() == "1"
    assert target.stat().st_mode & 0o777 == 0o755
    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "x.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert (target / "x.txt").read_text() == "1"
    with atomic_folder(target) as staging:
        (staging / "y.txt").write_text("3")
    assert sorted(os.listdir(target)) == ["y.txt"]
    assert os.listdir(tmp_path) == ["bundle"]
