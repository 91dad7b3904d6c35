"""Separation maps of papers/theory.md §1: softmax, sparsemax, 1.5-entmax and α-entmax for any α ≥ 1,
their thresholds, Jacobians, Jacobian-vector products and conjugates, and the forward backends.

One idea per module, each importing only those above it in this list:

- :mod:`.exact`: the exact thresholds of α = 2 and α = 1.5 (support passes; the sort algorithms they
  fall back on);
- :mod:`.newton`: any α > 1, by Newton's method on the threshold (bisection-safeguarded for α > 2);
- :mod:`.native`: the CPU row kernels of α = 1.5 and 2 and of Newton's method for every other α,
  compiled by numba (the default on CPU float32 and float64: one call per tensor; the tensor kernels of
  :mod:`.exact` and :mod:`.newton` run on other devices);
- :mod:`.compiled`: the opt-in backend (:func:`set_backend`, :func:`entmax_backend`, the environment
  variable ``HOPFIELD_AA_ENTMAX_BACKEND``) that runs a fixed number of the passes of :mod:`.exact` and
  :mod:`.newton` in one ``torch.compile``'d function;
- :mod:`.blocked`: the forward on blocks of rows (candidate compaction, α per row, the dispatch);
- :mod:`.api`: the public functions and the autograd functions (closed-form backward).

The submodules are internal; the names below are the package's interface.
"""

from hopfield_aa.normalizers.api import (
    entmax,
    entmax15,
    entmax_conjugate,
    entmax_jacobian,
    entmax_jvp,
    entmax_threshold,
    softmax,
    sparsemax,
)
from hopfield_aa.normalizers.compiled import entmax_backend, get_backend, set_backend

# Internal API of the other layers (docs/layout.md: "entmax on a tensor"): unvalidated tensor kernels.
# - entmax_tensor: α-entmax of a tensor, differentiable (the attention hot path of hopfield, geometry,
#   guidance and checks); alpha_argument: α validated and broadcast as entmax_tensor takes it;
#   jacobian_weights: s of J = diag(s) − s sᵀ/Σs (hopfield's retrieval Jacobian).
# - entmax15_sort: 1.5-entmax by sorting, kept in the package (not with the test oracles) because
#   analysis/bench_guidance_overhead.py times it as the sort-based baseline.
# - MAX_SUPPORT_ITER: the support passes after which the exact kernels sort, and sorted_threshold, the
#   numba helper that sorts (guidance's fused kernel).
# The underscore aliases are the names those modules import today.
from hopfield_aa.normalizers.api import alpha_argument as alpha_argument  # isort: skip
from hopfield_aa.normalizers.api import entmax_tensor as entmax_tensor  # isort: skip
from hopfield_aa.normalizers.api import jacobian_weights as jacobian_weights  # isort: skip
from hopfield_aa.normalizers.exact import MAX_SUPPORT_ITER as MAX_SUPPORT_ITER  # isort: skip
from hopfield_aa.normalizers.exact import entmax15_sort as entmax15_sort  # isort: skip
from hopfield_aa.normalizers.native import sorted_threshold as sorted_threshold  # isort: skip

_entmax_tensor = entmax_tensor
_alpha_argument = alpha_argument
_entmax15_sort = entmax15_sort

__all__ = [
    "entmax",
    "entmax15",
    "entmax_backend",
    "entmax_conjugate",
    "entmax_jacobian",
    "entmax_jvp",
    "entmax_threshold",
    "get_backend",
    "set_backend",
    "softmax",
    "sparsemax",
]
