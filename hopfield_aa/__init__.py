"""hopfield_aa: attention-space diffusion guidance as modern Hopfield dynamics and Anderson acceleration.

The public API (see docs/ and THEORY in papers/):

- normalizers: :func:`entmax` (α ≥ 1: softmax, sparsemax, exact 1.5, Newton/bisection otherwise),
  its Jacobian and convex conjugate;
- hopfield: :func:`energy`, :func:`retrieve`, :func:`attention`, :func:`iterate`;
- anderson: :func:`anderson` (AA(m), batched), :func:`anderson_step`;
- geometry: :func:`decompose`, :func:`norm_cap`, :func:`gag`, :func:`extrapolate`, :func:`ladder_extrapolate`;
- traces: :class:`TraceSet`, :class:`TraceRecord`, :func:`capture`.

Names are imported lazily so that ``import hopfield_aa`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "entmax": "normalizers",
    "softmax": "normalizers",
    "sparsemax": "normalizers",
    "entmax15": "normalizers",
    "entmax_jacobian": "normalizers",
    "entmax_jvp": "normalizers",
    "entmax_conjugate": "normalizers",
    "energy": "hopfield",
    "retrieve": "hopfield",
    "attention": "hopfield",
    "iterate": "hopfield",
    "IterateResult": "hopfield",
    "retrieval_jacobian": "hopfield",
    "local_lipschitz": "hopfield",
    "anderson": "anderson",
    "anderson_step": "anderson",
    "AndersonConfig": "anderson",
    "AndersonResult": "anderson",
    "decompose": "geometry",
    "norm_cap": "geometry",
    "gag": "geometry",
    "extrapolate": "geometry",
    "aa1_gamma": "geometry",
    "anderson_optimal_scale": "geometry",
    "ladder_extrapolate": "geometry",
    "spectral_radius": "anderson",
    "lipschitz_bound": "hopfield",
    "TraceSet": "traces",
    "TraceRecord": "traces",
    "capture": "traces",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from hopfield_aa.anderson import AndersonConfig, AndersonResult, anderson, anderson_step, spectral_radius
    from hopfield_aa.geometry import (
        aa1_gamma,
        anderson_optimal_scale,
        decompose,
        extrapolate,
        gag,
        ladder_extrapolate,
        norm_cap,
    )
    from hopfield_aa.hopfield import (
        IterateResult,
        attention,
        energy,
        iterate,
        lipschitz_bound,
        local_lipschitz,
        retrieval_jacobian,
        retrieve,
    )
    from hopfield_aa.normalizers import (
        entmax,
        entmax15,
        entmax_conjugate,
        entmax_jacobian,
        entmax_jvp,
        softmax,
        sparsemax,
    )
    from hopfield_aa.traces import TraceRecord, TraceSet, capture


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hopfield_aa' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hopfield_aa.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
