"""Input handling shared by every public function: validation with errors that name the argument,
and the "NumPy in, NumPy out; torch in, torch out" contract with half precision computed in float32.

Where a function takes several arrays, its result has the first one's container and the dtype all of
them promote to (torch's rule, :func:`result_kind`): a float16 state with float64 patterns gives float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Kind:
    """What a caller passed in, so a result can be handed back in the same form."""

    numpy: bool
    dtype: torch.dtype
    device: torch.device
    name: str = "the input"  # the argument it describes, for error messages


def as_tensor(
    value: object,
    name: str,
    *,
    allow_neg_inf: bool = False,
    min_ndim: int = 0,
) -> tuple[torch.Tensor, Kind]:
    """Convert ``value`` to a floating tensor in its compute dtype and remember its original kind.

    Half-precision inputs (float16, bfloat16) are computed in float32; float32/float64 stay as they are.
    Raises ``TypeError`` for anything that is not a floating tensor or array and ``ValueError`` for
    NaN or infinite entries (``-inf`` is accepted where ``allow_neg_inf``: masked scores).
    """
    if isinstance(value, torch.Tensor):
        tensor, is_numpy = value, False
    elif isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {value.dtype}")
        tensor, is_numpy = torch.from_numpy(np.ascontiguousarray(value)), True
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(tensor.shape)}"
        )
    kind = Kind(numpy=is_numpy, dtype=tensor.dtype, device=tensor.device, name=name)
    if tensor.dtype in _HALF:
        tensor = tensor.float()
    check_finite(tensor, name, allow_neg_inf=allow_neg_inf)
    return tensor, kind


def result_kind(first: Kind, *others: Kind) -> Kind:
    """The kind of a result computed from several array arguments.

    The container (NumPy or torch) and device are the first argument's; the dtype is what the
    arguments' dtypes promote to under torch's type promotion, so no argument loses precision:
    float16 with float64 gives float64, float16 with bfloat16 gives float32, float32 with float32
    stays float32.
    """
    dtype = first.dtype
    for other in others:
        dtype = torch.promote_types(dtype, other.dtype)
    return Kind(numpy=first.numpy, dtype=dtype, device=first.device, name=first.name)


def check_finite(tensor: torch.Tensor, name: str, *, allow_neg_inf: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` holds NaN or (unless allowed) infinities."""
    if tensor.numel() == 0:
        return
    if allow_neg_inf:
        bad = torch.isnan(tensor) | (tensor == math.inf)
        if bool(bad.any()):
            raise ValueError(
                f"{name} contains NaN or +inf entries (only -inf, for masked entries, is allowed)"
            )
    elif not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite entries")


def restore(tensor: torch.Tensor, kind: Kind) -> ArrayLike:
    """Return ``tensor`` in the form described by ``kind`` (dtype, and NumPy if the input was NumPy).

    Raises ``ValueError`` naming the argument when a finite result does not fit in a half-precision
    dtype (float16 holds at most 65504): the answer exists, the caller's dtype cannot hold it.
    """
    out = tensor.to(kind.dtype)
    if kind.dtype in _HALF and out.numel() > 0 and tensor.is_floating_point():
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"the result overflows {kind.dtype} (largest finite {torch.finfo(kind.dtype).max:g}); "
                f"pass {kind.name} in float32 or float64"
            )
    if kind.numpy:
        return out.detach().cpu().numpy()
    return out


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The promoted floating dtype of several compute tensors."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def promote(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors cast to their common floating dtype."""
    dtype = common_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def check_scalar(value: object, name: str, *, positive: bool = False, minimum: float | None = None) -> float:
    """Validate a real scalar parameter and return it as a float.

    ``positive`` demands value > 0; ``minimum`` demands value >= minimum. ``math.inf`` passes unless
    a bound rules it out; NaN never passes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value.item())
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"{name} must be a number, got NaN")
    if positive and not out > 0:
        raise ValueError(f"{name} must be > 0, got {out}")
    if minimum is not None and not out >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def check_dim(tensor: torch.Tensor, dim: object, name: str) -> int:
    """Validate an axis argument ``dim`` of the array called ``name``; returns it as an int."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if tensor.ndim == 0 or not -tensor.ndim <= dim < tensor.ndim:
        raise ValueError(f"dim={dim} is out of range for {name} of shape {tuple(tensor.shape)}")
    return int(dim)


def check_alpha(alpha: object) -> float:
    """Validate the entmax parameter α ≥ 1 (finite)."""
    out = check_scalar(alpha, "alpha", minimum=1.0)
    if math.isinf(out):
        raise ValueError("alpha must be finite, got inf")
    return out


def tolerance(dtype: torch.dtype, factor: float = 100.0) -> float:
    """A tolerance scaled to ``dtype``: ``factor`` times its machine epsilon (float32 for half types)."""
    if dtype in _HALF:
        dtype = torch.float32
    return factor * torch.finfo(dtype).eps
