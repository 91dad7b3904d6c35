"""hopfield_aa: attention-space diffusion guidance as modern Hopfield dynamics and Anderson acceleration.

The public API (see docs/ and papers/theory.md):

- normalizers: :func:`entmax` (α ≥ 1: softmax, sparsemax, exact 1.5, Newton root-finding otherwise),
  its threshold, Jacobian and convex conjugate, and the forward backend switch (every name in
  ``hopfield_aa.normalizers.__all__``);
- hopfield: :func:`energy`, :func:`retrieve`, :func:`attention`, :func:`iterate`, Jacobians and
  Lipschitz estimates;
- anderson: :func:`anderson` (AA(m), batched and safeguarded), :func:`anderson_step`, :func:`spectral_radius`;
- geometry: :func:`decompose`, :func:`norm_cap`, :func:`gag`, :func:`extrapolate`, :func:`ladder_extrapolate`;
- traces: :class:`TraceSet`, :class:`TraceRecord`, :func:`capture`;
- guidance: :func:`enable_gag`, :func:`disable_gag`, :func:`gag_guidance`, :func:`register_rule`
  (traces, guidance and :func:`load_pipeline` of the reference model are imported on first use, since
  they pull in diffusers).

The function :func:`anderson` shares its name with the module :mod:`hopfield_aa.anderson`; the package
attribute is the function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hopfield_aa import normalizers
from hopfield_aa.anderson import AndersonConfig, AndersonResult, anderson_step, spectral_radius
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
from hopfield_aa.normalizers import *  # noqa: F403 - republished: the normalizers' __all__

# Imported last: binding the submodule ``hopfield_aa.anderson`` (above) set the package attribute to the
# module; this rebinds it to the function.
from hopfield_aa.anderson import anderson  # isort: skip

__version__ = "0.1.0"

_LAZY = {
    "TraceSet": "traces",
    "TraceRecord": "traces",
    "capture": "traces",
    "enable_gag": "guidance",
    "disable_gag": "guidance",
    "gag_guidance": "guidance",
    "register_rule": "guidance",
    "load_pipeline": "reference",
}

__all__ = [
    "AndersonConfig",
    "AndersonResult",
    "IterateResult",
    "TraceRecord",
    "TraceSet",
    "__version__",
    "aa1_gamma",
    "anderson",
    "anderson_optimal_scale",
    "anderson_step",
    "attention",
    "capture",
    "decompose",
    "disable_gag",
    "enable_gag",
    "energy",
    "extrapolate",
    "gag",
    "gag_guidance",
    "iterate",
    "ladder_extrapolate",
    "lipschitz_bound",
    "load_pipeline",
    "local_lipschitz",
    "norm_cap",
    "register_rule",
    "retrieval_jacobian",
    "retrieve",
    "spectral_radius",
]
__all__ += normalizers.__all__

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from hopfield_aa.guidance import disable_gag, enable_gag, gag_guidance, register_rule
    from hopfield_aa.reference import load_pipeline
    from hopfield_aa.traces import TraceRecord, TraceSet, capture


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hopfield_aa' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hopfield_aa.{module}"), name)
    globals()[name] = value
    return value
