"""Exact text-image alignment for the shapes dataset: an analytic reader of objects from pixels, per-attribute
and whole-caption accuracy, a Fréchet distance in the reader's feature space, and bootstrap intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import linalg, ndimage

from hopfield_aa.reference.dataset import (
    COLOURS,
    IMAGE_SIZE,
    PAIR_ATTRIBUTES,
    POSITIONS,
    SHAPES,
    SINGLE_ATTRIBUTES,
    SIZES,
    parse_caption,
    shape_masks,
)

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([(0.0, 0.0, 0.0), *COLOURS.values()], dtype=np.float32)  # index 0: background
_SIZE_THRESHOLD = math.pi * SIZES["small"] * SIZES["large"]
"""Area (px) between small and large: ``π r_small r_large``, the geometric mean of the two areas."""

MIN_AREA = 12
"""Smallest connected region (pixels) counted as an object; the smallest rendered object covers ~45."""

FEATURE_NAMES: tuple[str, ...] = (
    *(f"fraction_{c}" for c in ("background", *_COLOUR_NAMES)),
    "off_palette_mean",
    "off_palette_std",
    "gradient_energy",
    "n_objects",
    *(
        f"object{slot}_{f}"
        for slot in (1, 2)
        for f in ("present", "area", "x", "y", *(f"iou_{s}" for s in SHAPES), *_COLOUR_NAMES)
    ),
)
"""Names of the per-image feature vector of :func:`image_features` (the Fréchet distance's space)."""


@dataclass(frozen=True)
class DetectedObject:
    """One object read from an image: colour, shape, size word, centroid ``(x, y)``, area and shape IoUs."""

    colour: str
    shape: str
    size: str
    x: float
    y: float
    area: int
    shape_iou: tuple[float, ...]


def _as_images(images: object, name: str = "images") -> np.ndarray:
    """Float32 ``(n, H, W, 3)`` in [0, 1] from numpy/torch, HWC or CHW, one image or a batch."""
    try:
        import torch

        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().float().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(images).__name__}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{name} must be floating point with values in [0, 1], got dtype {images.dtype}")
    arr = images.astype(np.float32, copy=False)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"{name} must have shape (n, H, W, 3) or (n, 3, H, W), got {images.shape}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] != 3:
        raise ValueError(f"{name} must have 3 colour channels, got shape {images.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return arr


def classify_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette entry of every pixel: labels ``(H, W)`` (0 background, 1.. the colours of
    :data:`~hopfield_aa.reference.dataset.COLOURS`) and the distance to it ``(H, W)``."""
    dist = np.linalg.norm(image[:, :, None, :] - _PALETTE[None, None], axis=-1)
    return dist.argmin(-1), dist.min(-1)


def read_objects(image: np.ndarray, min_area: int = MIN_AREA) -> list[DetectedObject]:
    """Every object in one image ``(H, W, 3)`` (values in [0, 1]), largest first.

    Pixels take the nearest palette colour; an object is a 4-connected region of one colour with at least
    ``min_area`` pixels. Its shape is the template (circle, square, triangle of the same area, centred at
    the region's centroid, as rendered by :func:`~hopfield_aa.reference.dataset.shape_masks`) with the
    highest intersection over union; its size word compares the area with ``π r_small r_large``.
    """
    labels, _ = classify_pixels(image)
    size = image.shape[0]
    grid = np.indices(labels.shape)
    rows, cols = grid[0], grid[1]
    found = []
    for index, colour in enumerate(_COLOUR_NAMES, start=1):
        regions, n = ndimage.label(labels == index)
        for region in range(1, n + 1):
            mask = regions == region
            area = int(mask.sum())
            if area < min_area:
                continue
            x = float(cols[mask].mean() + 0.5)
            y = float(rows[mask].mean() + 0.5)
            radius = math.sqrt(area / math.pi)
            ious = []
            for shape in SHAPES:
                template = shape_masks(shape, np.array([x]), np.array([y]), np.array([radius]), size)[0]
                ious.append(float((template & mask).sum() / max((template | mask).sum(), 1)))
            found.append(
                DetectedObject(
                    colour=colour,
                    shape=SHAPES[int(np.argmax(ious))],
                    size="small" if area < _SIZE_THRESHOLD else "large",
                    x=x,
                    y=y,
                    area=area,
                    shape_iou=tuple(ious),
                )
            )
    return sorted(found, key=lambda o: -o.area)


def read_attributes(image: np.ndarray, kind: str, min_area: int = MIN_AREA) -> dict[str, object]:
    """The attribute record of one image as a caption of ``kind`` would state it.

    ``"single"``: the largest object's colour, shape, size and nearest named position, and the object count.
    ``"pair"``: the two largest objects ordered as the grammar orders them (the relation is ``"left of"``
    when ``|Δx| ≥ |Δy|``, subject the left one; else ``"above"``, subject the upper one), and the count.
    Attributes that cannot be read (no object) are None.
    """
    objects = read_objects(image, min_area)
    if kind == "single":
        if not objects:
            return {"count": 0, "colour": None, "shape": None, "size": None, "position": None}
        obj = objects[0]
        position = min(
            POSITIONS, key=lambda p: (POSITIONS[p][0] - obj.x) ** 2 + (POSITIONS[p][1] - obj.y) ** 2
        )
        return {
            "count": len(objects),
            "colour": obj.colour,
            "shape": obj.shape,
            "size": obj.size,
            "position": position,
        }
    if kind == "pair":
        out: dict[str, object] = {name: None for name in PAIR_ATTRIBUTES}
        out["count"] = len(objects)
        if len(objects) < 2:
            return out
        a, b = objects[0], objects[1]
        if abs(a.x - b.x) >= abs(a.y - b.y):
            relation, (subject, other) = "left of", sorted((a, b), key=lambda o: o.x)
        else:
            relation, (subject, other) = "above", sorted((a, b), key=lambda o: o.y)
        out.update(
            colour_1=subject.colour,
            shape_1=subject.shape,
            relation=relation,
            colour_2=other.colour,
            shape_2=other.shape,
        )
        return out
    raise ValueError(f"kind must be 'single' or 'pair', got {kind!r}")


@dataclass(frozen=True)
class Alignment:
    """Per-image correctness: ``attributes[name]`` is 1.0 / 0.0 where the caption states ``name`` and NaN
    where it does not; ``whole`` is 1.0 when every stated attribute (count included) is right."""

    attributes: dict[str, np.ndarray]
    whole: np.ndarray
    kinds: tuple[str, ...]

    def accuracy(self) -> dict[str, float]:
        """Mean correctness of each attribute over the images whose caption states it, and ``whole``."""
        out = {k: float(np.nanmean(v)) for k, v in self.attributes.items() if np.isfinite(v).any()}
        out["whole"] = float(self.whole.mean())
        return out


def alignment(images: object, captions: Sequence[str], min_area: int = MIN_AREA) -> Alignment:
    """Score images against their captions with the analytic reader.

    For image ``i`` with caption attributes ``a_i`` and read attributes ``â_i``:
    ``attributes[k][i] = 1[â_i[k] = a_i[k]]`` and ``whole[i] = Π_k 1[â_i[k] = a_i[k]]``.

    Parameters
    ----------
    images : array ``(n, H, W, 3)`` or ``(n, 3, H, W)``, values in [0, 1] (numpy or torch)
    captions : sequence of n captions of the dataset grammar

    Examples
    --------
    >>> from hopfield_aa.reference.dataset import ShapesDataset
    >>> images, captions, _ = ShapesDataset(seed=1).batch(0, 8)
    >>> alignment(images, captions).accuracy()["whole"]
    1.0
    """
    arr = _as_images(images)
    if len(captions) != arr.shape[0]:
        raise ValueError(
            f"captions must have one entry per image: {len(captions)} captions, {arr.shape[0]} images"
        )
    names = list(dict.fromkeys([*SINGLE_ATTRIBUTES, *PAIR_ATTRIBUTES]))
    table = {name: np.full(arr.shape[0], np.nan) for name in names}
    whole = np.zeros(arr.shape[0])
    kinds = []
    for i, (image, caption) in enumerate(zip(arr, captions, strict=True)):
        target = parse_caption(caption)
        kind = "single" if target["count"] == 1 else "pair"
        kinds.append(kind)
        read = read_attributes(image, kind, min_area)
        ok = [read[k] == v for k, v in target.items()]
        for (k, _), hit in zip(target.items(), ok, strict=True):
            table[k][i] = float(hit)
        whole[i] = float(all(ok))
    return Alignment(attributes=table, whole=whole, kinds=tuple(kinds))


def image_features(images: object, min_area: int = MIN_AREA) -> np.ndarray:
    """Reader features ``(n, len(FEATURE_NAMES))`` per image, the space of :func:`frechet_distance`.

    Palette fractions, the mean and spread of each pixel's distance to its nearest palette colour (how
    far off the dataset's flat colours an image is), mean squared finite-difference gradient, object
    count, and for the two largest objects: presence, area / 100, centroid / image size, the three shape
    IoUs and the colour one-hot.
    """
    arr = _as_images(images)
    feats = np.zeros((arr.shape[0], len(FEATURE_NAMES)), dtype=np.float64)
    for i, image in enumerate(arr):
        labels, dist = classify_pixels(image)
        fractions = np.bincount(labels.ravel(), minlength=len(_PALETTE)) / labels.size
        gx = np.diff(image, axis=1)
        gy = np.diff(image, axis=0)
        grad = 0.5 * (float((gx**2).sum(-1).mean()) + float((gy**2).sum(-1).mean()))
        objects = read_objects(image, min_area)
        row = [*fractions, float(dist.mean()), float(dist.std()), grad, float(min(len(objects), 4))]
        size = image.shape[0]
        for slot in range(2):
            if slot < len(objects):
                o = objects[slot]
                onehot = [float(o.colour == c) for c in _COLOUR_NAMES]
                row += [1.0, o.area / 100.0, o.x / size, o.y / size, *o.shape_iou, *onehot]
            else:
                row += [0.0] * (4 + len(SHAPES) + len(_COLOUR_NAMES))
        feats[i] = row
    return feats


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n_a, d)`` and ``(n_b, d)``:

        d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}),

    with ``eps · I`` added to both covariances (features constant on the dataset make them singular).
    Returns ``d²`` (the FID convention).
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, d) arrays with the same d, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each feature set needs 2 rows at least")
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = eps * np.eye(a.shape[1])
    cov_a = np.cov(a, rowvar=False) + eye
    cov_b = np.cov(b, rowvar=False) + eye
    root = linalg.sqrtm(cov_a @ cov_b)
    root = np.real(root)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * root))
    if not math.isfinite(value):
        raise FloatingPointError("Fréchet distance is not finite")
    return max(value, 0.0)


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap confidence interval ``[low, high]``."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(
    *samples: np.ndarray,
    statistic: Callable[..., float] = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    paired: bool = False,
    seed: int = 0,
    method: str = "percentile",
    minimum: float | None = None,
) -> Estimate:
    """Bootstrap interval of ``statistic(*samples)``: percentile (default) or basic.

    Each sample (rows along axis 0) is resampled with replacement, independently, or with shared row
    indices when ``paired`` (same prompts and seeds under two rules). With q_lo, q_hi the
    ``(1 ± confidence) / 2`` quantiles of the statistic over ``n_resamples`` resamples and θ̂ its value
    on the samples, the *percentile* interval is [q_lo, q_hi] and the *basic* (reverse percentile) one
    [2θ̂ − q_hi, 2θ̂ − q_lo]: it corrects for a bias of the statistic that resampling reproduces, such as
    the upward bias of a Fréchet distance from finite samples (a resample's duplicated rows add more of
    it, so the percentile interval can lie wholly above θ̂, and the basic one, an interval for the
    population value, below it). ``minimum`` clips the interval from below (0 for a distance). NaN rows
    of a 1-D sample (attributes a caption does not state) are dropped first.

    Examples
    --------
    >>> est = bootstrap_ci(np.array([1.0, 0.0, 1.0, 1.0]))
    >>> est.value
    0.75
    """
    if not samples:
        raise ValueError("samples must hold one array at least")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if method not in ("percentile", "basic"):
        raise ValueError(f"method must be 'percentile' or 'basic', got {method!r}")
    arrays = []
    for k, s in enumerate(samples):
        arr = np.asarray(s, dtype=np.float64)
        if arr.ndim == 1 and not paired:
            arr = arr[np.isfinite(arr)]
        if arr.shape[0] == 0:
            raise ValueError(f"samples[{k}] is empty")
        arrays.append(arr)
    if paired and len({a.shape[0] for a in arrays}) != 1:
        raise ValueError("paired samples must have the same number of rows")
    rng = np.random.default_rng(seed)
    value = float(statistic(*arrays))
    stats = np.empty(n_resamples)
    for r in range(n_resamples):
        if paired:
            idx = rng.integers(0, arrays[0].shape[0], arrays[0].shape[0])
            stats[r] = statistic(*(a[idx] for a in arrays))
        else:
            stats[r] = statistic(*(a[rng.integers(0, a.shape[0], a.shape[0])] for a in arrays))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    if method == "basic":
        low, high = 2.0 * value - high, 2.0 * value - low
    if minimum is not None:
        low, high = max(low, minimum), max(high, minimum)
    return Estimate(value, float(low), float(high))


def degrade(images: object, blur_sigma: float = 0.0, noise_std: float = 0.0, seed: int = 0) -> np.ndarray:
    """Gaussian-blurred (``blur_sigma`` px) and/or noisy (``N(0, noise_std²)``, clipped to [0, 1]) copies,
    used to report how the reader behaves away from clean renders."""
    arr = _as_images(images).copy()
    if blur_sigma > 0:
        arr = ndimage.gaussian_filter(arr, sigma=(0, blur_sigma, blur_sigma, 0))
    if noise_std > 0:
        arr = arr + np.random.default_rng(seed).normal(0.0, noise_std, arr.shape).astype(np.float32)
    return np.clip(arr, 0.0, 1.0)


__all__ = [
    "FEATURE_NAMES",
    "IMAGE_SIZE",
    "Alignment",
    "DetectedObject",
    "Estimate",
    "alignment",
    "bootstrap_ci",
    "classify_pixels",
    "degrade",
    "frechet_distance",
    "image_features",
    "read_attributes",
    "read_objects",
]
