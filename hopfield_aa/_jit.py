"""CPU kernels compiled by numba on first use: the one home of the compilation, its disk cache and the switch
that turns every such kernel off.

A kernel is a plain Python function over NumPy arrays (:class:`Kernel`); numba is imported, and the
function compiled, on its first call per argument types (measured: 3.2 s for the first entmax call on a
machine, numba's import included); numba caches the machine code on disk, so a later process pays about
0.6 s once, for importing numba and loading the code. Where numba cannot be imported, or the kernels are
switched off (:func:`disabled`, or ``HOPFIELD_AA_NATIVE=0`` in the environment), :meth:`Kernel.get`
returns None and the callers run their tensor code instead: every kernel has a tensor twin, which is also
what runs on other devices.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

ENV_SWITCH = "HOPFIELD_AA_NATIVE"  # "0": every native kernel off

_enabled = os.environ.get(ENV_SWITCH, "1").strip() != "0"
_numba: Any = None
_import_failed = False


def _numba_module() -> Any:
    """numba, imported on first use; None where it cannot be imported."""
    global _numba, _import_failed
    if _numba is None and not _import_failed:
        try:
            import numba
        except ImportError:
            _import_failed = True
        else:
            _numba = numba
    return _numba


class Kernel:
    """A function compiled by numba on first use (``njit``: no Python objects inside, the GIL released,
    NumPy's division semantics, no fast-math so that −inf keeps its IEEE meaning and sums run in order;
    ``reassociate`` lets the compiler reorder sums, and so vectorise them).

    ``helpers`` are the functions of the same module the kernel calls: they are compiled first and bound
    in the module under their own names (numba resolves a kernel's globals when it compiles it); the
    compiled helpers remain callable from Python with the same results. Helpers are inlined into their
    callers (numba's ``inline="always"``): a call between compiled functions passes its arrays with
    reference counting, which costs more than a short row's arithmetic (measured: 256 dot products of
    32 entries take 6.4 µs called, 2.8 µs inlined). Inlined code is compiled with the caller's flags,
    so kernels that must agree bit for bit through a shared helper share their ``reassociate``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        helpers: tuple[Callable[..., Any], ...] = (),
        reassociate: bool = False,
    ) -> None:
        self.fn = fn
        self.helpers = helpers
        # sums may be reordered (and so vectorised): for kernels whose results need not repeat another
        # kernel's bit for bit; the flags keep NaN and infinities meaningful
        self.fastmath = {"reassoc", "contract"} if reassociate else False
        self._compiled: Callable[..., Any] | None = None

    def get(self) -> Callable[..., Any] | None:
        """The compiled function, or None where native kernels are off or numba is missing."""
        if not _enabled:
            return None
        if self._compiled is None:
            numba = _numba_module()
            if numba is None:
                return None
            jit = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
            for helper in self.helpers:
                if not isinstance(self.fn.__globals__.get(helper.__name__), numba.core.dispatcher.Dispatcher):
                    self.fn.__globals__[helper.__name__] = jit(helper)
            kernel_jit = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=self.fastmath)
            self._compiled = kernel_jit(self.fn)
        return self._compiled


def enabled() -> bool:
    """Whether native kernels may run (switched on and numba importable)."""
    return _enabled and _numba_module() is not None


def accepts(*tensors: torch.Tensor, recording: bool = False, in_graph: bool = False) -> bool:
    """Whether a native kernel may take ``tensors``: CPU, one dtype, float32 or float64, at least 1-d and
    non-empty, no gradient to record (unless ``recording``: the caller detaches and records its own
    backward), not being traced by ``torch.compile`` (unless ``in_graph``: the kernel runs as a custom
    op; sizes are then not tested, as they may be symbolic), and native kernels on (:func:`enabled`)."""
    dtype = tensors[0].dtype
    if not _enabled or dtype not in (torch.float32, torch.float64):
        return False
    grad = not recording and torch.is_grad_enabled()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or t.ndim < 1:
            return False
        if (not in_graph and t.numel() == 0) or (grad and t.requires_grad):
            return False
    return (in_graph or not torch.compiler.is_compiling()) and _numba_module() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Turn every native kernel off inside the block (their tensor twins run instead): for comparisons
    and for tests of the tensor code."""
    global _enabled
    previous = _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = previous
