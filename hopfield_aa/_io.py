"""Atomic file writes: every file (and folder) the toolkit writes goes through a temporary one in the
target's folder and ``os.replace``, so an interrupted write leaves either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"
"""Temporary files are named ``.tmp-<random>-<target name>`` beside their target; readers of a folder (the
trace loader, a capture that clears its folder) recognise a write left behind by a killed process so."""


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporary files."""
    return name.startswith(TEMP_PREFIX)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it onto ``path``.

    The folder is created when missing; the file gets mode 0644 (``mkstemp`` creates 0600, and shipped
    files must be readable). With ``fsync=True`` the data reach the disk before the rename, so the renamed
    file is complete even after a power cut (the trace format's shards and manifests). A write that fails
    or is interrupted removes its temporary file; a killed process leaves one named ``.tmp-*``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=f"-{target.name}")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return target


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A staging folder beside ``path`` to fill inside the ``with`` block; leaving the block without an
    error renames it onto ``path``, an older folder there renamed away first and then removed.

    Each rename is atomic, so ``path`` is always the old complete folder, absent for an instant, or the new
    complete one: never a partial write. The folder gets mode 0755 (``mkdtemp`` creates 0700). On an error
    the staging folder is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=f"-{target.name}"))
    try:
        yield staging
        os.chmod(staging, 0o755)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=f"-{target.name}.old"))
            os.rmdir(old)
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write, fsync=fsync)


def write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (sorted keys, trailing newline) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=True) + "\n")


def write_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> Path:
    """Write torch ``tensors`` (made contiguous, moved to the CPU) to a safetensors file atomically."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120, **options: Any) -> Path:
    """Save a matplotlib figure to ``path`` atomically (format from the suffix) and close it; ``options``
    go to ``fig.savefig`` (e.g. ``bbox_inches="tight"``)."""
    import matplotlib.pyplot as plt

    target = Path(path)
    try:
        return atomic_write(
            target, lambda tmp: fig.savefig(tmp, dpi=dpi, format=target.suffix.lstrip("."), **options)
        )
    finally:
        plt.close(fig)


__all__ = [
    "TEMP_PREFIX",
    "atomic_folder",
    "atomic_write",
    "is_temporary",
    "save_figure",
    "write_bytes",
    "write_json",
    "write_safetensors",
    "write_text",
]
