"""Loading and validating a capture directory: :class:`TraceSet` reads the manifest, checks it against the
shards (presence, size, SHA-256, tensor names, shapes, dtypes) and yields :class:`TraceRecord` lazily.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load as _safetensors_load

from hopfield_aa.traces.format import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    KINDS,
    MANIFEST_NAME,
    OPTIONAL_TENSOR_NAMES,
    RANK_SHARD_PATTERN,
    RECORD_FIELDS,
    SHARD_PATTERN,
    TENSOR_NAMES,
    TraceFormatError,
)
from hopfield_aa.traces.record import TraceRecord
from hopfield_aa.traces.selection import Selection


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(s) and s >= 0 for s in value)


class _ManifestChecker:
    """Structural checks of a manifest; every failure names the manifest and the field path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, message: str) -> TraceFormatError:
        return TraceFormatError(self.path, field, message)

    def check(self, manifest: Any) -> None:
        if not isinstance(manifest, dict):
            raise self.fail("", f"must hold a JSON object, got {type(manifest).__name__}")
        for name in ("format", "format_version", "metadata", "shards"):
            if name not in manifest:
                raise self.fail(name, "missing")
        if manifest["format"] != FORMAT_NAME:
            raise self.fail("format", f"expected {FORMAT_NAME!r}, got {manifest['format']!r}")
        version = manifest["format_version"]
        if not _is_int(version):
            raise self.fail("format_version", f"must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise self.fail(
                "format_version",
                f"is {version}, newer than this reader's {FORMAT_VERSION}; upgrade hopfield_aa",
            )
        if version != FORMAT_VERSION:
            raise self.fail(
                "format_version", f"unsupported version {version} (this reader: {FORMAT_VERSION})"
            )
        if not isinstance(manifest["metadata"], dict):
            raise self.fail("metadata", "must be a JSON object")
        if not isinstance(manifest["shards"], list):
            raise self.fail("shards", "must be a list")
        keys: set[str] = set()
        files: set[str] = set()
        for i, shard in enumerate(manifest["shards"]):
            self.check_shard(f"shards[{i}]", shard, files)
            for j, record in enumerate(shard["records"]):
                self.check_record(f"shards[{i}].records[{j}]", record)
                if record["key"] in keys:
                    raise self.fail(f"shards[{i}].records[{j}].key", f"duplicate key {record['key']!r}")
                keys.add(record["key"])

    def check_shard(self, where: str, shard: Any, files: set[str]) -> None:
        if not isinstance(shard, dict):
            raise self.fail(where, "must be a JSON object")
        for name in ("file", "bytes", "sha256", "records"):
            if name not in shard:
                raise self.fail(f"{where}.{name}", "missing")
        file = shard["file"]
        if not isinstance(file, str) or not (SHARD_PATTERN.match(file) or RANK_SHARD_PATTERN.match(file)):
            raise self.fail(
                f"{where}.file",
                "must be a shard name like shard-000000.safetensors (rank-0/shard-000000.safetensors in a "
                f"merged capture), got {file!r}",
            )
        if file in files:
            raise self.fail(f"{where}.file", f"{file} listed twice")
        files.add(file)
        if not _is_int(shard["bytes"]) or shard["bytes"] < 0:
            raise self.fail(f"{where}.bytes", f"must be a byte count, got {shard['bytes']!r}")
        digest = shard["sha256"]
        if (
            not isinstance(digest, str)
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
        ):
            raise self.fail(f"{where}.sha256", f"must be a hex SHA-256 digest, got {digest!r}")
        if not isinstance(shard["records"], list):
            raise self.fail(f"{where}.records", "must be a list")

    def check_record(self, where: str, r: Any) -> None:
        if not isinstance(r, dict):
            raise self.fail(where, "must be a JSON object")
        for name in RECORD_FIELDS:
            if name not in r:
                raise self.fail(f"{where}.{name}", "missing")

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise self.fail(f"{where}.{name}", f"must be {what}, got {r[name]!r}")

        need(isinstance(r["key"], str) and r["key"].isidentifier(), "key", "an identifier string")
        need(isinstance(r["layer"], str), "layer", "a string")
        need(r["kind"] in KINDS, "kind", f"one of {KINDS}")
        need(_is_int(r["step"]) and r["step"] >= 0, "step", "an integer >= 0")
        need(r["timestep"] is None or _is_number(r["timestep"]), "timestep", "a finite number or null")
        need(_is_number(r["scale"]) and r["scale"] > 0, "scale", "a finite number > 0")
        need(_is_int(r["num_heads"]) and r["num_heads"] > 0, "num_heads", "an integer > 0")
        need(_is_int(r["head_dim"]) and r["head_dim"] > 0, "head_dim", "an integer > 0")
        need(_is_int(r["query_tokens"]) and r["query_tokens"] > 0, "query_tokens", "an integer > 0")
        need(_is_int(r["key_tokens"]) and r["key_tokens"] > 0, "key_tokens", "an integer > 0")
        heads = r["heads"]
        need(
            isinstance(heads, list)
            and len(heads) > 0
            and all(_is_int(h) and 0 <= h < r["num_heads"] for h in heads)
            and len(set(heads)) == len(heads),
            "heads",
            f"a non-empty list of distinct head indices in [0, {r['num_heads']})",
        )
        for name, length in (("query_segments", r["query_tokens"]), ("key_segments", r["key_tokens"])):
            seg = r[name]
            need(
                isinstance(seg, dict)
                and all(
                    k in ("image", "text")
                    and isinstance(v, list)
                    and len(v) == 2
                    and all(_is_int(x) for x in v)
                    and 0 <= v[0] <= v[1] <= length
                    for k, v in seg.items()
                ),
                name,
                f'a mapping "image"/"text" -> [start, stop] within [0, {length}]',
            )
        need(_is_int(r["batch_index"]) and r["batch_index"] >= 0, "batch_index", "an integer >= 0")
        for name in ("prompt_id", "seed", "query_seed"):
            need(r[name] is None or _is_int(r[name]), name, "an integer or null")
        need(r["dtype"] in DTYPES, "dtype", f"one of {sorted(DTYPES)}")
        tensors = r["tensors"]
        need(isinstance(tensors, dict), "tensors", "a mapping of tensor name -> shape")
        for name in TENSOR_NAMES:
            if name not in tensors:
                raise self.fail(f"{where}.tensors.{name}", "missing")
        for name, shape in tensors.items():
            if name not in TENSOR_NAMES + OPTIONAL_TENSOR_NAMES:
                raise self.fail(f"{where}.tensors.{name}", "unknown tensor name")
            if not _shape(shape):
                raise self.fail(f"{where}.tensors.{name}", f"must be a shape (list of sizes), got {shape!r}")
        n_heads, d = len(heads), r["head_dim"]
        q_shape = tensors["q"]
        m = q_shape[1] if len(q_shape) == 3 else -1
        expected = {
            "q": [n_heads, m, d],
            "k": [n_heads, r["key_tokens"], d],
            "v": [n_heads, r["key_tokens"], d],
            "query_indices": [m],
        }
        for name, shape in expected.items():
            if tensors[name] != shape or not 0 < m <= r["query_tokens"]:
                raise self.fail(
                    f"{where}.tensors.{name}",
                    f"shape {tensors[name]} does not fit heads={n_heads}, head_dim={d}, "
                    f"query_tokens={r['query_tokens']}, key_tokens={r['key_tokens']} (expected {shape})",
                )
        if "mask" in tensors:
            shape = tensors["mask"]
            if not (
                len(shape) == 3
                and shape[0] in (1, n_heads)
                and shape[1] in (1, m)
                and shape[2] == r["key_tokens"]
            ):
                raise self.fail(
                    f"{where}.tensors.mask",
                    f"shape {shape} must be (1 or {n_heads}, 1 or {m}, {r['key_tokens']})",
                )


def _safetensors_metadata(path: Path, data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (parsed without loading tensors)."""
    if len(data) < 8:
        raise TraceFormatError(path, "header", "file too short to be a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise TraceFormatError(path, "header", f"header length {length} runs past the end of the file")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceFormatError(path, "header", f"unreadable safetensors header: {exc}") from exc
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if isinstance(meta, dict) else {}


class TraceSet:
    """A capture directory: the records its manifest lists, loaded lazily one shard at a time.

    Opening checks the manifest's structure (format name and version, every record field, shapes that fit
    heads/tokens/head_dim) and that each listed shard exists with the listed size. Reading a shard checks
    its SHA-256, that it parses as safetensors, that it holds exactly the tensors the manifest lists for it,
    with the listed shapes and dtypes, and that query indices are sorted, distinct and in range. Every
    failure raises :class:`TraceFormatError` naming the file and the field. Nothing is unpickled.

    Shards present in the directory but not listed (the last one of an interrupted capture, written but
    not yet committed to the manifest) are ignored and reported in :attr:`unlisted_files`.

    Parameters
    ----------
    path : str or Path
        The capture directory (or its ``manifest.json``).
    layers : sequence of str, optional
        Keep records whose layer matches any of these patterns (glob, or ``"re:"`` + regex).
    steps : iterable of int, optional
        Keep records of these denoising steps.
    kinds : sequence of {"self", "cross", "joint"}, optional
        Keep records of these attention kinds.
    prompt_ids : iterable of int, optional
        Keep records of these prompts.
    batch_indices : iterable of int, optional
        Keep records of these batch rows.
    verify : bool, default True
        Check each shard's SHA-256 when it is read (sizes are always checked).

    Examples
    --------
    >>> traces = TraceSet("traces/", kinds=["cross"], steps=range(10))  # doctest: +SKIP
    >>> for record in traces:  # doctest: +SKIP
    ...     head = record.hopfield(0)
    ...     memory, states, beta = head.memory, head.states, head.beta
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layers: Iterable[str] | None = None,
        steps: Iterable[int] | None = None,
        kinds: Iterable[str] | None = None,
        prompt_ids: Iterable[int] | None = None,
        batch_indices: Iterable[int] | None = None,
        verify: bool = True,
    ) -> None:
        path = Path(path)
        if path.name == MANIFEST_NAME and path.is_file():
            path = path.parent
        self.path = path
        self.manifest_path = path / MANIFEST_NAME
        self.verify = verify
        self.manifest = self._read_manifest()
        self.metadata: Mapping[str, Any] = MappingProxyType(self.manifest["metadata"])
        self._check_files()
        self._filter: dict[str, Any] = {
            "layers": None if layers is None else tuple(layers),
            "steps": None if steps is None else frozenset(int(s) for s in steps),
            "kinds": None if kinds is None else frozenset(kinds),
            "prompt_ids": None if prompt_ids is None else frozenset(prompt_ids),
            "batch_indices": None if batch_indices is None else frozenset(batch_indices),
        }
        layer_match = Selection(layers=self._filter["layers"]).matches_layer
        self._selected: list[tuple[int, dict[str, Any]]] = [
            (i, r)
            for i, shard in enumerate(self.manifest["shards"])
            for r in shard["records"]
            if layer_match(r["layer"]) and self._keep(r)
        ]
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None

    def _keep(self, r: Mapping[str, Any]) -> bool:
        f = self._filter
        return (
            (f["steps"] is None or r["step"] in f["steps"])
            and (f["kinds"] is None or r["kind"] in f["kinds"])
            and (f["prompt_ids"] is None or r["prompt_id"] in f["prompt_ids"])
            and (f["batch_indices"] is None or r["batch_index"] in f["batch_indices"])
        )

    # ---------------------------------------------------------------------------------- validation
    def _read_manifest(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise TraceFormatError(self.path, "", "not a directory")
        if not self.manifest_path.is_file():
            raise TraceFormatError(self.manifest_path, "", "missing: not a trace capture directory")
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceFormatError(self.manifest_path, "", f"not valid JSON: {exc}") from exc
        _ManifestChecker(self.manifest_path).check(manifest)
        return manifest

    def _check_files(self) -> None:
        listed = set()
        for i, shard in enumerate(self.manifest["shards"]):
            file = self.path / shard["file"]
            listed.add(shard["file"])
            if not file.is_file():
                raise TraceFormatError(file, "file", f"listed in {MANIFEST_NAME} (shards[{i}]) but missing")
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise TraceFormatError(
                    file,
                    "bytes",
                    f"size is {size} bytes but {MANIFEST_NAME} says {shard['bytes']} (truncated or modified)",
                )
        self.unlisted_files = sorted(
            n for n in os.listdir(self.path) if SHARD_PATTERN.match(n) and n not in listed
        )

    def _load_shard(self, index: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1]
        shard = self.manifest["shards"][index]
        file = self.path / shard["file"]
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise TraceFormatError(file, "file", f"cannot be read: {exc}") from exc
        if len(data) != shard["bytes"]:
            raise TraceFormatError(
                file, "bytes", f"size is {len(data)} bytes but {MANIFEST_NAME} says {shard['bytes']}"
            )
        if self.verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise TraceFormatError(
                file, "sha256", f"checksum differs from {MANIFEST_NAME}: the shard's bytes are corrupted"
            )
        header = _safetensors_metadata(file, data)
        try:
            tensors = _safetensors_load(data)
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise TraceFormatError(file, "", f"not a valid safetensors file: {exc}") from exc
        keys = [r["key"] for r in shard["records"]]
        if "records" in header and header["records"] != json.dumps(keys):
            raise TraceFormatError(file, "records", f"the shard's record list disagrees with {MANIFEST_NAME}")
        expected: set[str] = set()
        for r in shard["records"]:
            self._check_tensors(file, r, tensors)
            expected.update(f"{r['key']}/{name}" for name in r["tensors"])
        extra = sorted(set(tensors) - expected)
        if extra:
            raise TraceFormatError(file, extra[0], f"tensor not listed in {MANIFEST_NAME}")
        self._cache = (index, tensors)
        return tensors

    @staticmethod
    def _check_tensors(file: Path, r: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        for name, shape in r["tensors"].items():
            full = f"{r['key']}/{name}"
            if full not in tensors:
                raise TraceFormatError(file, full, f"listed in {MANIFEST_NAME} but not in the shard")
            t = tensors[full]
            if list(t.shape) != shape:
                raise TraceFormatError(file, full, f"shape {list(t.shape)} but {MANIFEST_NAME} says {shape}")
            want = (
                torch.int64
                if name == "query_indices"
                else torch.float32
                if name == "mask"
                else DTYPES[r["dtype"]]
            )
            if t.dtype != want:
                raise TraceFormatError(file, full, f"dtype {t.dtype} but {MANIFEST_NAME} says {want}")
        idx = tensors[f"{r['key']}/query_indices"]
        if idx.numel() and (
            int(idx.min()) < 0 or int(idx.max()) >= r["query_tokens"] or bool((idx[1:] <= idx[:-1]).any())
        ):
            raise TraceFormatError(
                file,
                f"{r['key']}/query_indices",
                f"must be sorted distinct positions in [0, {r['query_tokens']})",
            )

    def validate(self) -> dict[str, int]:
        """Read every listed shard (of the whole capture, not only the filtered records) and check it.

        Returns
        -------
        dict
            ``{"shards": ..., "records": ..., "bytes": ...}`` of the capture.

        Raises
        ------
        TraceFormatError
            Naming the first bad file and field.
        """
        n_records = n_bytes = 0
        for i, shard in enumerate(self.manifest["shards"]):
            self._load_shard(i)
            n_records += len(shard["records"])
            n_bytes += shard["bytes"]
        self._cache = None
        return {"shards": len(self.manifest["shards"]), "records": n_records, "bytes": n_bytes}

    # -------------------------------------------------------------------------------------- access
    @property
    def complete(self) -> bool:
        """Whether the capture finished normally (False if it was interrupted or raised)."""
        return bool(self.manifest.get("complete", False))

    @property
    def shards(self) -> list[str]:
        """File names of the listed shards, in order."""
        return [s["file"] for s in self.manifest["shards"]]

    @property
    def entries(self) -> list[Mapping[str, Any]]:
        """Manifest entries of the selected records (no tensors are read)."""
        return [MappingProxyType(r) for _, r in self._selected]

    @property
    def layers(self) -> list[str]:
        """Distinct layer names of the selected records, in capture order."""
        return list(dict.fromkeys(r["layer"] for _, r in self._selected))

    @property
    def steps(self) -> list[int]:
        """Distinct steps of the selected records, sorted."""
        return sorted({r["step"] for _, r in self._selected})

    def filter(self, **kwargs: Any) -> TraceSet:
        """A new view with other filters (same keywords as the constructor; unspecified ones kept)."""
        merged = {k: v for k, v in self._filter.items() if v is not None}
        merged.update(kwargs)
        return TraceSet(self.path, verify=self.verify, **merged)

    def __len__(self) -> int:
        return len(self._selected)

    def __getitem__(self, index: int) -> TraceRecord:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        shard_index, entry = self._selected[index]
        return self._make(entry, self._load_shard(shard_index), shard_index)

    def __iter__(self) -> Iterator[TraceRecord]:
        for shard_index, entry in self._selected:
            yield self._make(entry, self._load_shard(shard_index), shard_index)

    def _make(
        self, r: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], shard_index: int
    ) -> TraceRecord:
        key = r["key"]
        return TraceRecord(
            q=tensors[f"{key}/q"],
            k=tensors[f"{key}/k"],
            v=tensors[f"{key}/v"],
            scale=float(r["scale"]),
            kind=r["kind"],
            layer=r["layer"],
            step=r["step"],
            timestep=r["timestep"],
            heads=tuple(r["heads"]),
            num_heads=r["num_heads"],
            query_indices=tensors[f"{key}/query_indices"],
            query_tokens=r["query_tokens"],
            key_tokens=r["key_tokens"],
            query_segments=MappingProxyType({k: (v[0], v[1]) for k, v in r["query_segments"].items()}),
            key_segments=MappingProxyType({k: (v[0], v[1]) for k, v in r["key_segments"].items()}),
            batch_index=r["batch_index"],
            prompt_id=r["prompt_id"],
            seed=r["seed"],
            query_seed=r["query_seed"],
            mask=tensors.get(f"{key}/mask"),
            metadata=self.metadata,
            source=str(self.path / self.manifest["shards"][shard_index]["file"]),
        )

    def __repr__(self) -> str:
        return (
            f"TraceSet({str(self.path)!r}, records={len(self)}, shards={len(self.shards)}, "
            f"model={self.metadata.get('model_class')!r}, complete={self.complete})"
        )
