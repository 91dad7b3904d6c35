"""The procedural captioned dataset: coloured shapes on black, their captions, and the exact scene records.

Seeded and unlimited; a held-out split of colour-shape combinations tests compositional generalisation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 32
"""Side of every rendered image in pixels."""

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.12, 0.78, 0.16),
    "blue": (0.16, 0.28, 0.96),
    "yellow": (0.96, 0.86, 0.12),
}
"""Palette in RGB, values in [0, 1]; the background is black."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 4.0, "large": 6.5}
"""Size word -> equal-area radius ``r`` in pixels (every shape of radius ``r`` covers ``π r²`` pixels)."""

PAIR_RADIUS = 4.5
"""Equal-area radius of both objects in a two-object scene (pair captions carry no size word)."""

POSITIONS: dict[str, tuple[float, float]] = {
    "left": (9.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
}
"""Position word -> nominal object centre ``(x, y)`` in pixel coordinates (y grows downwards)."""

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
RELATIONS: tuple[str, ...] = ("left of", "above")
"""Pair relations; the subject of a pair caption is always the left (or upper) object."""

HELD_OUT: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("blue", "circle")})
"""Colour-shape combinations that never appear in the training split."""

SPLITS: tuple[str, ...] = ("train", "heldout")
KINDS: tuple[str, ...] = ("single", "pair")

SINGLE_ATTRIBUTES: tuple[str, ...] = ("count", "colour", "shape", "size", "position")
PAIR_ATTRIBUTES: tuple[str, ...] = ("count", "colour_1", "shape_1", "relation", "colour_2", "shape_2")

_POSITION_JITTER = 2.0
_RADIUS_JITTER = 0.05


@dataclass(frozen=True)
class ObjectSpec:
    """One rendered object: its words and its exact geometry (centre ``(x, y)`` and equal-area radius)."""

    colour: str
    shape: str
    size: str | None
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: its objects and, for a pair, the relation subject -> object.

    For a single object ``position`` names where it is; for a pair ``objects[0]`` is the subject
    (left of / above ``objects[1]``).
    """

    kind: str
    objects: tuple[ObjectSpec, ...]
    position: str | None = None
    relation: str | None = None
    caption: str = field(default="", compare=False)

    @property
    def attributes(self) -> dict[str, object]:
        """The structured record compared by the alignment metric (see :func:`parse_caption`)."""
        if self.kind == "single":
            obj = self.objects[0]
            return {
                "count": 1,
                "colour": obj.colour,
                "shape": obj.shape,
                "size": obj.size,
                "position": self.position,
            }
        subject, other = self.objects
        return {
            "count": 2,
            "colour_1": subject.colour,
            "shape_1": subject.shape,
            "relation": self.relation,
            "colour_2": other.colour,
            "shape_2": other.shape,
        }


def caption_of(attributes: dict[str, object]) -> str:
    """Write the caption of an attribute record in the dataset grammar.

    Grammar: ``"a {size} {colour} {shape} {position phrase}"`` for one object and
    ``"a {colour} {shape} {left of|above} a {colour} {shape}"`` for two.

    Examples
    --------
    >>> caption_of({"count": 1, "colour": "red", "shape": "circle", "size": "small", "position": "top"})
    'a small red circle at the top'
    """
    if attributes["count"] == 1:
        phrase = POSITION_PHRASES[str(attributes["position"])]
        return f"a {attributes['size']} {attributes['colour']} {attributes['shape']} {phrase}"
    return (
        f"a {attributes['colour_1']} {attributes['shape_1']} {attributes['relation']} "
        f"a {attributes['colour_2']} {attributes['shape_2']}"
    )


_WORD = {
    "colour": "|".join(COLOURS),
    "shape": "|".join(SHAPES),
    "size": "|".join(SIZES),
}
_SINGLE_RE = re.compile(
    rf"^a (?P<size>{_WORD['size']}) (?P<colour>{_WORD['colour']}) (?P<shape>{_WORD['shape']}) "
    rf"(?P<phrase>{'|'.join(POSITION_PHRASES.values())})$"
)
_PAIR_RE = re.compile(
    rf"^a (?P<colour_1>{_WORD['colour']}) (?P<shape_1>{_WORD['shape']}) (?P<relation>{'|'.join(RELATIONS)}) "
    rf"a (?P<colour_2>{_WORD['colour']}) (?P<shape_2>{_WORD['shape']})$"
)


def parse_caption(caption: str) -> dict[str, object]:
    """Read the attribute record back from a caption of the grammar (inverse of :func:`caption_of`).

    Parameters
    ----------
    caption : str
        A caption such as ``"a large blue square on the left"`` or ``"a red circle above a green square"``.

    Returns
    -------
    dict
        ``count`` (1 or 2) and the attributes of :data:`SINGLE_ATTRIBUTES` or :data:`PAIR_ATTRIBUTES`.

    Raises
    ------
    ValueError
        If ``caption`` is not a sentence of the grammar.

    Examples
    --------
    >>> parse_caption("a red circle left of a blue square")["relation"]
    'left of'
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.lower().split())
    match = _SINGLE_RE.match(text)
    if match:
        position = {v: k for k, v in POSITION_PHRASES.items()}[match["phrase"]]
        return {
            "count": 1,
            "colour": match["colour"],
            "shape": match["shape"],
            "size": match["size"],
            "position": position,
        }
    match = _PAIR_RE.match(text)
    if match and match["colour_1"] != match["colour_2"]:
        return {"count": 2, **{k: match[k] for k in PAIR_ATTRIBUTES[1:]}}
    raise ValueError(f"caption is not in the dataset grammar: {caption!r}")


GRAMMAR = (
    "captions follow one of two forms: 'a {small|large} {colour} {shape} {on the left|on the right|at the "
    "top|at the bottom}' or 'a {colour} {shape} {left of|above} a {other colour} {shape}', with colours "
    "red, green, blue, yellow and shapes circle, square, triangle; the empty caption '' is unconditional"
)
"""The caption grammar in one sentence (what command-line errors and help print)."""


def nearest_caption(text: str) -> str:
    """The caption of the grammar closest to ``text`` (case, punctuation and spacing ignored; then the
    most similar caption by :func:`difflib.SequenceMatcher` ratio over words)."""
    import difflib

    words = re.sub(r"[^a-z ]+", " ", str(text).lower()).split()
    pool = [caption_of(r) for split in SPLITS for r in caption_combinations(split)]
    return max(pool, key=lambda c: difflib.SequenceMatcher(None, words, c.split()).ratio())


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (the tokenizer's word list)."""
    words: set[str] = set()
    for phrase in [*POSITION_PHRASES.values(), *RELATIONS, "a"]:
        words.update(phrase.split())
    words.update(COLOURS, SHAPES, SIZES)
    return sorted(words)


def _objects_of(attributes: dict[str, object]) -> list[tuple[str, str]]:
    if attributes["count"] == 1:
        return [(str(attributes["colour"]), str(attributes["shape"]))]
    return [
        (str(attributes["colour_1"]), str(attributes["shape_1"])),
        (str(attributes["colour_2"]), str(attributes["shape_2"])),
    ]


def split_of(attributes: dict[str, object]) -> str:
    """``"heldout"`` if any object is a :data:`HELD_OUT` colour-shape combination, else ``"train"``."""
    return "heldout" if any(pair in HELD_OUT for pair in _objects_of(attributes)) else "train"


def caption_combinations(split: str = "train", kind: str | None = None) -> list[dict[str, object]]:
    """Every attribute record of the grammar in ``split`` (``"train"`` or ``"heldout"``), in a fixed order.

    Parameters
    ----------
    split : {"train", "heldout"}
    kind : {"single", "pair"} or None
        Restrict to one caption type; None gives both.
    """
    _check_choice(split, SPLITS, "split")
    if kind is not None:
        _check_choice(kind, KINDS, "kind")
    records: list[dict[str, object]] = []
    if kind in (None, "single"):
        for size in SIZES:
            for colour in COLOURS:
                for shape in SHAPES:
                    for position in POSITIONS:
                        rec = {
                            "count": 1,
                            "colour": colour,
                            "shape": shape,
                            "size": size,
                            "position": position,
                        }
                        records.append(rec)
    if kind in (None, "pair"):
        for relation in RELATIONS:
            for c1 in COLOURS:
                for s1 in SHAPES:
                    for c2 in COLOURS:
                        if c2 == c1:
                            continue
                        for s2 in SHAPES:
                            records.append(
                                {
                                    "count": 2,
                                    "colour_1": c1,
                                    "shape_1": s1,
                                    "relation": relation,
                                    "colour_2": c2,
                                    "shape_2": s2,
                                }
                            )
    return [r for r in records if split_of(r) == split]


def _check_choice(value: object, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def scene_from_attributes(attributes: dict[str, object], rng: np.random.Generator) -> Scene:
    """Place the objects of an attribute record with random jitter (positions ±2 px, radius ±5 %)."""

    def jitter(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    if attributes["count"] == 1:
        size = str(attributes["size"])
        cx, cy = POSITIONS[str(attributes["position"])]
        obj = ObjectSpec(
            colour=str(attributes["colour"]),
            shape=str(attributes["shape"]),
            size=size,
            x=cx + jitter(_POSITION_JITTER),
            y=cy + jitter(_POSITION_JITTER),
            radius=SIZES[size] * (1.0 + jitter(_RADIUS_JITTER)),
        )
        return Scene("single", (obj,), position=str(attributes["position"]), caption=caption_of(attributes))
    relation = str(attributes["relation"])
    half_gap = float(rng.uniform(7.0, 9.5))
    centre = 16.0 + jitter(2.0)
    offset = 16.0 + jitter(5.0)
    objs = []
    for index, sign in ((1, -1.0), (2, 1.0)):
        along = centre + sign * half_gap
        across = offset + jitter(1.0)
        x, y = (along, across) if relation == "left of" else (across, along)
        objs.append(
            ObjectSpec(
                colour=str(attributes[f"colour_{index}"]),
                shape=str(attributes[f"shape_{index}"]),
                size=None,
                x=x,
                y=y,
                radius=PAIR_RADIUS * (1.0 + jitter(_RADIUS_JITTER)),
            )
        )
    return Scene("pair", tuple(objs), relation=relation, caption=caption_of(attributes))


def shape_masks(
    shape: str, x: np.ndarray, y: np.ndarray, radius: np.ndarray, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Boolean masks ``(n, size, size)`` of ``n`` shapes with centroids ``(x, y)`` and equal-area radius.

    A pixel belongs to the shape when its centre ``(j + 0.5, i + 0.5)`` lies inside: circle
    ``|p - c| ≤ r``; square of half-side ``(√π / 2) r``; upward equilateral triangle of side
    ``a = r √(4π / √3)`` whose centroid is ``c``. All three cover ``π r²`` pixels.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1, 1)
    y = np.asarray(y, dtype=np.float64).reshape(-1, 1, 1)
    r = np.asarray(radius, dtype=np.float64).reshape(-1, 1, 1)
    grid = np.arange(size, dtype=np.float64) + 0.5
    dx = grid.reshape(1, 1, -1) - x
    dy = grid.reshape(1, -1, 1) - y
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = 0.5 * math.sqrt(math.pi) * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        side = r * math.sqrt(4.0 * math.pi / math.sqrt(3.0))
        height = side * math.sqrt(3.0) / 2.0
        # centroid sits one third of the height above the base; the apex points up (smaller y)
        below_apex = dy + 2.0 * height / 3.0  # distance down from the apex
        inside_base = dy <= height / 3.0
        inside_sides = np.abs(dx) <= below_apex / math.sqrt(3.0)
        return inside_base & inside_sides & (below_apex >= 0)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render(scenes: Sequence[Scene], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render scenes to float32 RGB images ``(n, size, size, 3)`` with values in [0, 1] (black background).

    Vectorised over the batch: one mask computation per (object slot, shape) for all scenes at once.
    """
    n = len(scenes)
    images = np.zeros((n, size, size, 3), dtype=np.float32)
    max_objects = max((len(s.objects) for s in scenes), default=0)
    for slot in range(max_objects):
        for shape in SHAPES:
            idx = [
                i for i, s in enumerate(scenes) if len(s.objects) > slot and s.objects[slot].shape == shape
            ]
            if not idx:
                continue
            objs = [scenes[i].objects[slot] for i in idx]
            masks = shape_masks(
                shape,
                np.array([o.x for o in objs]),
                np.array([o.y for o in objs]),
                np.array([o.radius for o in objs]),
                size,
            )
            colours = np.array([COLOURS[o.colour] for o in objs], dtype=np.float32)
            sub = images[idx]
            sub = np.where(masks[..., None], colours[:, None, None, :], sub)
            images[idx] = sub
    return images


class ShapesDataset:
    """Unlimited, seeded stream of captioned scenes from one split.

    Batch ``index`` is a pure function of ``(seed, split, index)``, so training resumes exactly.
    Half the scenes hold one object, half two (``pair_fraction``).

    Parameters
    ----------
    seed : int
    split : {"train", "heldout"}
        ``"train"`` never contains a :data:`HELD_OUT` colour-shape combination; ``"heldout"`` always does.
    pair_fraction : float, default 0.5

    Examples
    --------
    >>> images, captions, scenes = ShapesDataset(seed=0).batch(0, 4)
    >>> images.shape
    (4, 32, 32, 3)
    """

    def __init__(self, seed: int = 0, split: str = "train", pair_fraction: float = 0.5) -> None:
        _check_choice(split, SPLITS, "split")
        if not 0.0 <= pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must lie in [0, 1], got {pair_fraction}")
        self.seed = int(seed)
        self.split = split
        self.pair_fraction = float(pair_fraction)
        self._single = caption_combinations(split, "single")
        self._pair = caption_combinations(split, "pair")

    def scenes(self, index: int, batch_size: int) -> list[Scene]:
        """The scenes of batch ``index`` (deterministic in ``seed``, ``split`` and ``index``)."""
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
        is_pair = rng.random(batch_size) < self.pair_fraction
        out = []
        for pair in is_pair:
            pool = self._pair if pair else self._single
            out.append(scene_from_attributes(pool[int(rng.integers(len(pool)))], rng))
        return out

    def batch(self, index: int, batch_size: int) -> tuple[np.ndarray, list[str], list[Scene]]:
        """Images ``(batch_size, 32, 32, 3)`` in [0, 1], their captions, and their scene records."""
        scenes = self.scenes(index, batch_size)
        return render(scenes), [s.caption for s in scenes], scenes
