"""The opt-in compiled forward of α-entmax and the backend switch: for α = 1.5 and 2, a fixed number of
certified support passes (:func:`.exact.certified_passes`) fused by ``torch.compile``, then a test per row.

On CPU, where the native row kernel applies (:mod:`.native`, machine code compiled by numba), the
compiled backend runs that kernel: the code inductor generates for the fused passes was slower on CPU
(``analysis/results/bench_entmax.md``: 1.8–3.0× softmax against 1.5–2.1× for the native kernel), so the
passes compile for the other devices. ``_CPU_KERNEL = "inductor"`` compiles them on CPU too (for
comparisons and for the tests of the compiled passes).

The caller (:func:`.blocked.forward`) solves again with the eager kernel every row that fails the test
(and every all −inf row): a row passes when its threshold is exact (its support reproduced itself) or
when its p is within ``MASS_TOL_EPS`` eps of the exact one (the mass certificate). Other α run eagerly:
their fixed Newton passes, compiled, were slower than the eager kernel, which compacts the candidates
(``analysis/results/bench_entmax.md`` before this change: 27× softmax against 22× at 32768×77, 33×
against 14× at 8192×1024).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from hopfield_aa.normalizers import exact, native

_BACKENDS = ("eager", "compiled")
_ENV_BACKEND = "HOPFIELD_AA_ENTMAX_BACKEND"
_backend = os.environ.get(_ENV_BACKEND, "eager").strip().lower() or "eager"
if _backend not in _BACKENDS:
    warnings.warn(
        f"{_ENV_BACKEND}={_backend!r} is not one of {_BACKENDS}; using 'eager'", RuntimeWarning, stacklevel=1
    )
    _backend = "eager"
ALPHAS = (1.5, 2.0)  # the α the compiled backend covers (other α run eagerly)
_compiled_kernels: dict[str, Any] = {}
_compile_failed = False
_FUSED_SUPPORT_PASSES = 4  # α = 1.5 and 2: support passes inside the compiled function (measured: 4 leave
# ≲ 0.1 % of attention-like rows to the eager repair, each further pass costs a read of every entry)
MASS_TOL_EPS = 8  # α = 1.5 and 2: |Σp − 1| that settles a row (bounds the error of p)
_FUSED_BLOCK_ELEMENTS = 1 << 20  # rows per compiled call: about this many entries (measured)
_CPU_KERNEL = "native"  # what the compiled backend runs on CPU: "native" (the numba kernel) or "inductor"


def set_backend(name: str) -> None:
    """Select the forward kernel of α-entmax: ``"eager"`` (default) or ``"compiled"``.

    ``"eager"`` runs α = 1.5 and 2 on CPU float32/float64 by the native row kernels
    (:mod:`.native`, numba) and elsewhere by the tensor kernels of :mod:`.exact` and :mod:`.blocked`.

    ``"compiled"`` runs the forward of α = 1.5 and α = 2 on float32 (and half precision, computed in
    float32) on CPU by the native row kernel (machine code compiled by numba, faster there than what
    ``torch.compile`` generates), and on other devices through one ``torch.compile``'d function: a
    fixed number of the eager solver's own support passes, then a test per row (the support reproduced
    itself, or |Σp − 1| ≤ 8 eps, which bounds the error of every p_i by 8 eps); rows that fail it are
    solved again by the eager kernel. Other α run eagerly (compiled, their Newton passes were slower
    than the eager kernel). The first call compiles (seconds); if compilation fails a warning is issued
    once and the eager kernel is used. The backward is the closed-form Jacobian product in both cases.
    The environment variable ``HOPFIELD_AA_ENTMAX_BACKEND`` sets the initial value.

    Parameters
    ----------
    name : {"eager", "compiled"}
        The backend.

    Examples
    --------
    >>> set_backend("eager")
    >>> get_backend()
    'eager'
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"name must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The current α-entmax forward backend, ``"eager"`` or ``"compiled"`` (see :func:`set_backend`).

    Returns
    -------
    str
        The backend name.

    Examples
    --------
    >>> get_backend() in ("eager", "compiled")
    True
    """
    return _backend


@contextlib.contextmanager
def entmax_backend(name: str) -> Iterator[None]:
    """Context manager that selects the α-entmax backend (:func:`set_backend`) and restores the previous one.

    Parameters
    ----------
    name : {"eager", "compiled"}
        The backend inside the block.

    Examples
    --------
    >>> import torch
    >>> from hopfield_aa.normalizers import entmax
    >>> with entmax_backend("eager"):
    ...     p = entmax(torch.tensor([1.0, 0.0, -1.0]), alpha=2.0)
    >>> p
    tensor([1., 0., 0.])
    """
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _fused_support(z: torch.Tensor, out: torch.Tensor, quadratic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_FUSED_SUPPORT_PASSES`` support passes of α = 1.5 (``quadratic``) or α = 2 on rows ``z``
    (:func:`.exact.certified_passes`).

    Writes p into ``out``; returns (λ in score units, settled), settled marking the rows whose threshold
    is certified (exact, or p within ``MASS_TOL_EPS`` eps of the exact p).
    """
    p, lam, settled = exact.certified_passes(z, quadratic, _FUSED_SUPPORT_PASSES, MASS_TOL_EPS)
    out.copy_(p)
    return lam, settled.squeeze(-1)  # unsettled rows (all −inf ones among them) go to the eager kernel


def _fused_kernel() -> Any:
    """The compiled :func:`_fused_support`, compiled once (dynamic shapes)."""
    if "support" not in _compiled_kernels:
        _compiled_kernels["support"] = torch.compile(_fused_support, dynamic=True)
    return _compiled_kernels["support"]


def applies(rows: torch.Tensor, alpha: float) -> bool:
    """Whether the compiled backend is selected, available and covers these rows (float32, α = 1.5 or 2)
    with ``torch.compile``'d passes: not on CPU where the native kernel takes them (``_CPU_KERNEL``)."""
    return (
        _backend == "compiled"
        and not _compile_failed
        and rows.dtype == torch.float32
        and rows.numel() > 0
        and alpha in ALPHAS
        and not (_CPU_KERNEL == "native" and native.applies(rows, alpha))
    )


def forward(rows: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(p, λ, settled) of α-entmax (α = 1.5 or 2) of the contiguous float32 rows (R, N); None if
    compilation failed.

    Rows not settled (and all −inf rows) must be solved again by the eager kernel.
    """
    global _compile_failed
    n_rows, n = rows.shape
    try:
        kernel, quadratic = _fused_kernel(), alpha == 1.5
        probs = torch.empty_like(rows)
        block = max(1, _FUSED_BLOCK_ELEMENTS // n)
        starts = range(0, n_rows, block)
        parts = [kernel(rows[i : i + block], probs[i : i + block], quadratic) for i in starts]
    except Exception as exc:  # any compiler failure falls back to the eager kernel
        _compile_failed = True
        warnings.warn(
            f"the compiled entmax backend is unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
            "using the eager kernel",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if len(parts) == 1:
        lam, settled = parts[0]
    else:
        lam, settled = (torch.cat(t) for t in zip(*parts, strict=True))
    return probs, lam, settled
