"""What a capture keeps: layers (glob or regex), attention kinds, denoising steps, heads, batch rows, and
a seeded random cap on query tokens, so a run of a large model stays small.
"""

from __future__ import annotations

import fnmatch
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hopfield_aa.traces.format import KINDS


def _int_tuple(values: Iterable[int] | None, name: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must hold integers, got {value!r}")
        out.append(int(value))
    return tuple(out)


@dataclass(frozen=True)
class Selection:
    """Which attention calls, heads and query tokens a capture records.

    Parameters
    ----------
    layers : sequence of str, optional
        Layer-name patterns; a layer is kept if any pattern matches its full module name. A pattern is a
        shell glob (``fnmatch``: ``"*attn2"``, ``"up_blocks.*"``) unless it starts with ``"re:"``, then it is
        a regular expression that must match the whole name (``"re:.*blocks\\.[01]\\..*"``). Default: all.
    kinds : sequence of {"self", "cross", "joint"}, optional
        Attention kinds to keep. Default: all.
    steps : iterable of int, optional
        Denoising step indices to keep (``range(0, 50, 5)``). Default: all.
    heads : sequence of int, optional
        Head indices to keep; indices past a layer's head count are ignored. Default: all.
    max_query_tokens : int, optional
        Keep at most this many query tokens per record, a uniformly random subset without replacement
        (sorted), drawn from a generator seeded by ``(query_seed, step, batch_index, crc32(layer))`` so it
        is reproducible and independent of the model's own random state. Default: all queries.
    batch_indices : sequence of int, optional
        Batch rows to keep; negative indices count from the end (``(-1,)``: the conditional half under
        classifier-free guidance, or the only row without it). Default: all rows.
    query_seed : int, default 0
        Seed of the query subsets.

    Examples
    --------
    >>> s = Selection(layers=["*attn2"], steps=range(0, 10, 2), max_query_tokens=64)
    >>> s.matches_layer("down_blocks.0.attentions.0.transformer_blocks.0.attn2"), s.matches_step(3)
    (True, False)
    """

    layers: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None
    steps: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    max_query_tokens: int | None = None
    batch_indices: tuple[int, ...] | None = None
    query_seed: int = 0

    if TYPE_CHECKING:
        # What the constructor accepts (lists, ranges, a bare pattern string); ``__post_init__`` stores each
        # as the tuple its field says. At run time the dataclass's own ``__init__`` is used.
        def __init__(
            self,
            layers: str | Sequence[str] | None = None,
            kinds: str | Sequence[str] | None = None,
            steps: Iterable[int] | None = None,
            heads: Iterable[int] | None = None,
            max_query_tokens: int | None = None,
            batch_indices: Iterable[int] | None = None,
            query_seed: int = 0,
        ) -> None: ...

    def __post_init__(self) -> None:
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            for pattern in layers:
                if not isinstance(pattern, str):
                    raise TypeError(f"layers must hold strings, got {pattern!r}")
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as exc:
                        raise ValueError(f"layers: bad regular expression {pattern!r}: {exc}") from exc
            object.__setattr__(self, "layers", layers)
        if self.kinds is not None:
            kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise ValueError(f"kinds must be among {KINDS}, got {bad}")
            object.__setattr__(self, "kinds", kinds)
        steps = _int_tuple(self.steps, "steps")
        if steps is not None and any(s < 0 for s in steps):
            raise ValueError(f"steps must be >= 0, got {steps}")
        object.__setattr__(self, "steps", None if steps is None else tuple(sorted(set(steps))))
        heads = _int_tuple(self.heads, "heads")
        if heads is not None and (not heads or any(h < 0 for h in heads)):
            raise ValueError(f"heads must be a non-empty list of indices >= 0, got {heads}")
        object.__setattr__(self, "heads", None if heads is None else tuple(sorted(set(heads))))
        object.__setattr__(self, "batch_indices", _int_tuple(self.batch_indices, "batch_indices"))
        if self.max_query_tokens is not None and (
            isinstance(self.max_query_tokens, bool) or int(self.max_query_tokens) < 1
        ):
            raise ValueError(f"max_query_tokens must be a positive integer, got {self.max_query_tokens}")
        if isinstance(self.query_seed, bool) or not isinstance(self.query_seed, (int, np.integer)):
            raise TypeError(f"query_seed must be an integer, got {self.query_seed!r}")

    def matches_layer(self, name: str) -> bool:
        """Whether layer ``name`` is selected."""
        if self.layers is None:
            return True
        for pattern in self.layers:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], name):
                    return True
            elif fnmatch.fnmatchcase(name, pattern):
                return True
        return False

    def matches_kind(self, kind: str) -> bool:
        """Whether attention kind ``kind`` is selected."""
        return self.kinds is None or kind in self.kinds

    def matches_step(self, step: int) -> bool:
        """Whether denoising step ``step`` is selected."""
        return self.steps is None or step in self.steps

    def batch_rows(self, batch_size: int) -> list[int]:
        """The selected rows of a batch of ``batch_size`` (negatives resolved, out-of-range dropped)."""
        if self.batch_indices is None:
            return list(range(batch_size))
        rows = {i + batch_size if i < 0 else i for i in self.batch_indices}
        return sorted(r for r in rows if 0 <= r < batch_size)

    def head_indices(self, num_heads: int) -> list[int]:
        """The selected heads of a layer with ``num_heads`` heads."""
        if self.heads is None:
            return list(range(num_heads))
        return [h for h in self.heads if h < num_heads]

    def query_indices(self, n_tokens: int, *, layer: str, step: int, batch_index: int) -> torch.Tensor | None:
        """Sorted positions of the kept queries, or ``None`` when all ``n_tokens`` are kept.

        The subset is a function of ``(query_seed, step, batch_index, layer)`` only.
        """
        if self.max_query_tokens is None or n_tokens <= self.max_query_tokens:
            return None
        seed = [self.query_seed, step, batch_index, zlib.crc32(layer.encode("utf-8"))]
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(n_tokens, size=int(self.max_query_tokens), replace=False))
        return torch.from_numpy(chosen.astype(np.int64))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description (stored in the manifest)."""
        return {
            "layers": None if self.layers is None else list(self.layers),
            "kinds": None if self.kinds is None else list(self.kinds),
            "steps": None if self.steps is None else list(self.steps),
            "heads": None if self.heads is None else list(self.heads),
            "max_query_tokens": self.max_query_tokens,
            "batch_indices": None if self.batch_indices is None else list(self.batch_indices),
            "query_seed": int(self.query_seed),
        }


def parse_steps(text: str) -> tuple[int, ...]:
    """Parse a step selection: ``"0:50:5"`` (a Python range), ``"3"``, or ``"0,1,2,10:20"``."""
    steps: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            fields = [int(f) if f else None for f in part.split(":")]
            if len(fields) > 3 or fields[1] is None:
                raise ValueError(f"steps: range {part!r} must look like start:stop[:step]")
            start = fields[0] or 0
            stride = fields[2] if len(fields) == 3 and fields[2] is not None else 1
            steps.extend(range(start, fields[1], stride))
        else:
            steps.append(int(part))
    return tuple(steps)


def parse_ints(text: str) -> tuple[int, ...]:
    """Parse ``"0,1,5"`` into ``(0, 1, 5)``."""
    return tuple(int(p) for p in text.split(",") if p.strip())


def as_selection(selection: Selection | None = None, **kwargs: Any) -> Selection:
    """``selection`` itself, or a new :class:`Selection` from keyword arguments (not both)."""
    if selection is not None:
        if kwargs:
            raise ValueError("give either selection or selection keywords, not both")
        return selection
    return Selection(**kwargs)
