"""A capture split across processes (ranks) and the merge of their manifests.

Layout of a capture of ``W`` ranks into ``OUT``::

    OUT/rank-0/manifest.json, OUT/rank-0/shard-*.safetensors     prompts 0, W, 2W, ...   (keys rank0_r*)
    OUT/rank-1/...                                                prompts 1, W+1, ...     (keys rank1_r*)
    OUT/manifest.json                                             written by merge_ranks: every rank's
                                                                  shards, listed in place, by prompt id

Each rank directory is a complete capture on its own (the loader reads it alone); prompt ``i`` keeps
the id ``i`` and the seed ``seed + i`` of a single-process run, so the merged capture holds the same records,
in the same order, as one process capturing every prompt. Record keys carry the rank (``rank1_r000004``)
so the merged manifest needs no renaming; shards stay where their rank wrote them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hopfield_aa._io import write_text
from hopfield_aa.traces.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, TraceFormatError

RANK_DIR = "rank-{rank}"
# Metadata that differ between the ranks of one capture (kept per rank in the merged manifest).
PER_RANK_FIELDS = ("rank", "prompt_ids", "device", "device_name", "created_unix")


def rank_directory(directory: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` of a split capture into ``directory`` writes: ``directory/rank-<rank>``."""
    return Path(directory) / RANK_DIR.format(rank=rank)


def prompt_ids(n_prompts: int, rank: int, world_size: int) -> list[int]:
    """The prompts of ``rank``: ``i`` with ``i % world_size == rank``."""
    return list(range(rank, n_prompts, world_size))


def prepare_rank(
    directory: str | os.PathLike[str], n_prompts: int, rank: int, world_size: int, overwrite: bool
) -> tuple[Path, list[int], dict[str, Any]]:
    """Validate ``rank``/``world_size``; return the rank's directory, its prompt ids and its metadata.

    With ``world_size > 1`` and ``overwrite``, a merged manifest left in ``directory`` by an earlier run
    is removed (it would list this rank's old shards).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if world_size == 1:
        return Path(directory), list(range(n_prompts)), {}
    ids = prompt_ids(n_prompts, rank, world_size)
    merged = Path(directory) / MANIFEST_NAME
    if overwrite and merged.is_file() and _is_merged(merged):
        merged.unlink(missing_ok=True)
    info = {"rank": rank, "world_size": world_size, "prompt_ids": ids}
    return rank_directory(directory, rank), ids, info


def _is_merged(path: Path) -> bool:
    try:
        return "ranks" in json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return False


def _rank_manifests(root: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    from hopfield_aa.traces.loader import TraceSet

    found = []
    for child in sorted(root.glob("rank-*")):
        if not (child / MANIFEST_NAME).is_file() or not child.name[5:].isdigit():
            continue
        manifest = dict(TraceSet(child).manifest)  # structure, sizes and listed files checked
        found.append((int(child.name[5:]), child, manifest))
    return sorted(found, key=lambda item: item[0])


def merge_ranks(directory: str | os.PathLike[str]) -> Path:
    """Write ``directory/manifest.json`` over the rank captures ``directory/rank-*/``.

    Checks that ranks ``0 .. W-1`` are all there, that they were started with the same ``world_size``,
    model, selection, prompts and settings (everything but :data:`PER_RANK_FIELDS`), then lists every
    rank's shards in place, ordered by prompt id (the order of a single-process capture). The merged
    manifest is ``complete`` when every rank's is; its metadata hold the common fields, ``world_size``
    and, under ``ranks``, each rank's own. Written atomically; merging again replaces it.

    Returns
    -------
    Path
        The merged manifest.

    Raises
    ------
    FileNotFoundError
        ``directory`` holds no rank capture.
    FileExistsError
        ``directory`` holds a single-process capture.
    ValueError
        A rank is missing or the ranks disagree (the message names the rank and field).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    target = root / MANIFEST_NAME
    if target.is_file() and not _is_merged(target):
        raise FileExistsError(f"{target} is a single-process capture, not a merge of rank-*/ captures")
    ranks = _rank_manifests(root)
    if not ranks:
        raise FileNotFoundError(f"{root}: no rank-*/{MANIFEST_NAME} to merge")
    first = ranks[0][2]
    world_size = first["metadata"].get("world_size")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{ranks[0][1] / MANIFEST_NAME}: metadata has no world_size (not a rank capture)")
    present = [rank for rank, _, _ in ranks]
    missing = sorted(set(range(world_size)) - set(present))
    if missing or present != list(range(world_size)):
        raise ValueError(
            f"{root}: world size {world_size} but ranks {present} are present"
            + (f" (missing {', '.join(f'rank-{r}' for r in missing)})" if missing else "")
        )
    common = _common(first)
    for _, child, manifest in ranks[1:]:
        for name in sorted(set(common) | set(_common(manifest))):
            if _common(manifest).get(name) != common.get(name):
                raise ValueError(
                    f"{child / MANIFEST_NAME} [metadata.{name}]: differs from rank-0's "
                    "(the ranks were not started with the same settings)"
                )
        if manifest.get("selection") != first.get("selection"):
            raise ValueError(f"{child / MANIFEST_NAME} [selection]: differs from rank-0's")
    shards: list[tuple[int, int, int, dict[str, Any]]] = []
    for rank, child, manifest in ranks:
        for position, shard in enumerate(manifest["shards"]):
            ids = [r["prompt_id"] for r in shard["records"]]
            first_id = min((i for i in ids if isinstance(i, int)), default=-1)
            shard = {**shard, "file": f"{child.name}/{shard['file']}"}
            shards.append((first_id, rank, position, shard))
    shards.sort(key=lambda item: item[:3])
    runs = sorted(
        (run for _, _, manifest in ranks for run in manifest["runs"]),
        key=lambda run: (run.get("prompt_id") is None, run.get("prompt_id") or 0),
    )
    metadata = {
        **common,
        "world_size": world_size,
        "ranks": [
            {
                "directory": child.name,
                "complete": bool(manifest.get("complete")),
                **{k: manifest["metadata"].get(k) for k in PER_RANK_FIELDS},
            }
            for _, child, manifest in ranks
        ],
    }
    merged = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": all(bool(m.get("complete")) for _, _, m in ranks),
        "metadata": metadata,
        "selection": first.get("selection", {}),
        "runs": runs,
        "shards": [shard for *_, shard in shards],
    }
    write_text(target, json.dumps(merged) + "\n", fsync=True)
    try:
        from hopfield_aa.traces.loader import TraceSet

        TraceSet(root)
    except TraceFormatError:
        target.unlink(missing_ok=True)
        raise
    return target


def _common(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest["metadata"].items() if k not in PER_RANK_FIELDS}


__all__ = ["PER_RANK_FIELDS", "merge_ranks", "prepare_rank", "prompt_ids", "rank_directory"]
