"""Atomic file writes: every file the toolkit writes goes through a temporary file in the target's folder
and ``os.replace``, so an interrupted write leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it onto ``path``.

    The folder is created when missing; the file gets mode 0644 (``mkstemp`` creates 0600, and shipped
    files must be readable). With ``fsync=True`` the data reach the disk before the rename.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


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


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save a matplotlib figure to ``path`` atomically (format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    target = Path(path)
    try:
        return atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=dpi, format=target.suffix.lstrip(".")))
    finally:
        plt.close(fig)


__all__ = ["atomic_write", "save_figure", "write_bytes", "write_json", "write_safetensors", "write_text"]
