"""The on-disk trace format: safetensors shards plus one JSON manifest, written atomically.

Owns the format constants, the error type that names the bad file and field, and the shard writer.

Layout of a capture directory::

    manifest.json                 format, version, run metadata, selection, runs, and the list of shards
    shard-000000.safetensors      tensors "<key>/q", "<key>/k", "<key>/v", "<key>/query_indices"
    shard-000001.safetensors      (and "<key>/mask" where the attention call had a mask)

Each shard is written to a temporary file in the same directory, synced and renamed into place
(:func:`hopfield_aa._io.write_bytes`; a killed write leaves a ``.tmp-*`` file, never read), then the
manifest is rewritten the same way, so at every instant ``manifest.json`` lists exactly the shards that
were completely written (with their size and SHA-256), and an interrupted capture leaves a loadable set.
A shard not (yet) listed in the manifest is ignored by the loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as _safetensors_save

from hopfield_aa._io import is_temporary, write_bytes

FORMAT_NAME = "hopfield_aa.traces"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{6})\.safetensors$")
# A merged capture (:func:`hopfield_aa.traces.ranks.merge_ranks`) lists the shards of its ranks in place.
RANK_SHARD_PATTERN = re.compile(r"^rank-(\d+)/shard-(\d{6})\.safetensors$")

KINDS = ("self", "cross", "joint")
TENSOR_NAMES = ("q", "k", "v", "query_indices")
OPTIONAL_TENSOR_NAMES = ("mask",)

# Every record entry of the manifest carries these fields (the loader checks each one).
RECORD_FIELDS = (
    "key",
    "layer",
    "kind",
    "step",
    "timestep",
    "scale",
    "num_heads",
    "heads",
    "head_dim",
    "query_tokens",
    "key_tokens",
    "query_segments",
    "key_segments",
    "batch_index",
    "prompt_id",
    "seed",
    "query_seed",
    "dtype",
    "tensors",
)

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class TraceFormatError(ValueError):
    """A trace directory, manifest or shard that does not match the format.

    The message names the file and the field that are wrong; both are also kept as attributes.

    Parameters
    ----------
    path : str or Path
        The file that is wrong (manifest or shard).
    field : str
        The manifest field, record field or tensor name that is wrong (``""`` for the whole file).
    message : str
        What is wrong.
    """

    def __init__(self, path: str | os.PathLike[str], field: str, message: str) -> None:
        self.path = str(path)
        self.field = field
        where = f"{self.path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {message}")


def dtype_name(dtype: torch.dtype) -> str:
    """The format's name for a floating dtype (``torch.float16`` -> ``"float16"``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Accept ``None``, a ``torch.dtype`` or one of the names in :data:`DTYPES`."""
    if name is None or isinstance(name, torch.dtype):
        if isinstance(name, torch.dtype):
            dtype_name(name)  # validates
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def shard_name(index: int) -> str:
    """File name of shard ``index`` (``shard-000003.safetensors``)."""
    return f"shard-{index:06d}.safetensors"


class ShardWriter:
    """Buffers records and writes them as safetensors shards, keeping the manifest in step.

    Parameters
    ----------
    directory : str or Path
        The capture directory; created if missing. It must not already hold a capture unless
        ``overwrite`` (then the old manifest, shards and temporary files are removed first).
    metadata : Mapping
        Run metadata stored under ``"metadata"`` in the manifest (JSON-serialisable).
    selection : Mapping
        The selection used, stored under ``"selection"``.
    shard_bytes : int, default 64 MiB
        A shard is written as soon as the buffered tensors reach this many bytes.
    overwrite : bool, default False
        Replace an existing capture in ``directory``.
    on_shard : callable, optional
        Called as ``on_shard(n_shards, file_name)`` after each shard and the manifest listing it are
        both on disk.
    key_prefix : str, default ""
        Prepended to every record key (``rank1_r000000``): the ranks of a split capture use distinct
        prefixes so that their manifests merge without renaming a tensor.

    Examples
    --------
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> w = ShardWriter(d, metadata={}, selection={})
    >>> w.n_shards
    0
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        metadata: Mapping[str, Any],
        selection: Mapping[str, Any],
        shard_bytes: int = 64 * 2**20,
        overwrite: bool = False,
        on_shard: Callable[[int, str], None] | None = None,
        key_prefix: str = "",
    ) -> None:
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be > 0, got {shard_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clear_existing(overwrite)
        self.shard_bytes = int(shard_bytes)
        self.on_shard = on_shard
        if key_prefix and not key_prefix.isidentifier():
            raise ValueError(f"key_prefix must be empty or an identifier, got {key_prefix!r}")
        self.key_prefix = key_prefix
        self._manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": False,
            "metadata": dict(metadata),
            "selection": dict(selection),
            "runs": [],
            "shards": [],
        }
        self._shard_json: list[str] = []
        self._entries: list[dict[str, Any]] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._n_records = 0
        self._write_manifest()

    def _clear_existing(self, overwrite: bool) -> None:
        names = os.listdir(self.directory)
        ours = [n for n in names if n == MANIFEST_NAME or SHARD_PATTERN.match(n) or is_temporary(n)]
        if not ours:
            return
        if not overwrite:
            raise FileExistsError(
                f"{self.directory} already holds a trace capture ({MANIFEST_NAME} or shards); "
                "choose an empty directory or pass overwrite=True"
            )
        # The manifest goes first so that the folder is never a manifest listing missing shards.
        for name in sorted(ours, key=lambda n: n != MANIFEST_NAME):
            os.unlink(self.directory / name)

    @property
    def n_shards(self) -> int:
        """Number of shards written and listed in the manifest."""
        return len(self._manifest["shards"])

    @property
    def n_records(self) -> int:
        """Number of records handed to :meth:`add` (written or buffered)."""
        return self._n_records

    @property
    def pending_bytes(self) -> int:
        """Bytes of tensor data buffered and not yet written."""
        return self._pending_bytes

    def next_key(self) -> str:
        """The key the next record will get (``r000000``, ``r000001``, ... after the ``key_prefix``)."""
        return f"{self.key_prefix}r{self._n_records:06d}"

    def add_run(self, run: Mapping[str, Any]) -> None:
        """Append a run description (prompt id, seed, ...) to the manifest's ``runs``."""
        self._manifest["runs"].append(dict(run))

    def add(self, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Buffer one record: its manifest ``entry`` and its tensors by short name (``"q"``, ...).

        The entry's ``key`` must be :meth:`next_key`; its ``tensors`` field is filled here with the
        shapes of the given tensors. Writes a shard once the buffer reaches ``shard_bytes``.
        """
        key = entry["key"]
        if key != self.next_key():
            raise ValueError(f"record key must be {self.next_key()!r}, got {key!r}")
        entry = dict(entry)
        entry["tensors"] = {name: list(t.shape) for name, t in tensors.items()}
        for name, tensor in tensors.items():
            self._tensors[f"{key}/{name}"] = tensor.contiguous()
            self._pending_bytes += tensor.numel() * tensor.element_size()
        self._entries.append(entry)
        self._n_records += 1
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as one shard, then the manifest that lists it (no-op if empty)."""
        if not self._entries:
            return
        name = shard_name(self.n_shards)
        header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
        header["records"] = json.dumps([e["key"] for e in self._entries])
        data = _safetensors_save(self._tensors, metadata=header)
        write_bytes(self.directory / name, data, fsync=True)
        self._manifest["shards"].append(
            {
                "file": name,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "records": self._entries,
            }
        )
        self._entries, self._tensors, self._pending_bytes = [], {}, 0
        self._write_manifest()
        if self.on_shard is not None:
            self.on_shard(self.n_shards, name)

    def close(self, *, complete: bool = True) -> None:
        """Write what is buffered and mark the manifest ``complete`` (False after an error)."""
        self.flush()
        self._manifest["complete"] = bool(complete)
        self._write_manifest()

    def _write_manifest(self) -> None:
        # Shard entries never change once written: encode each once and splice the cached text in, so
        # rewriting the manifest after every shard costs I/O, not re-encoding every record again.
        shards = self._manifest["shards"]
        while len(self._shard_json) < len(shards):
            self._shard_json.append(json.dumps(shards[len(self._shard_json)]))
        head = json.dumps({k: v for k, v in self._manifest.items() if k != "shards"})
        text = head[:-1] + ', "shards": [\n' + ",\n".join(self._shard_json) + "\n]}\n"
        write_bytes(self.directory / MANIFEST_NAME, text.encode("utf-8"), fsync=True)
