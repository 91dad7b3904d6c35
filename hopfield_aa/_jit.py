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
import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from hopfield_aa import _simd

ENV_SWITCH = "HOPFIELD_AA_NATIVE"  # "0": every native kernel off

_enabled = os.environ.get(ENV_SWITCH, "1").strip() != "0"
_numba: Any = None
_import_failed = False
_pool: ThreadPoolExecutor | None = None
T = TypeVar("T")


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
    ``reassociate`` lets the compiler reorder sums, and so vectorise them; ``intrinsics`` are the vector
    operations it calls, of this module (:func:`compress_above`) or of :mod:`._simd`, imported by its
    module under their own names and bound there, like the helpers, to their compiled forms).

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
        intrinsics: tuple[Callable[..., Any], ...] = (),
    ) -> None:
        self.fn = fn
        self.helpers = helpers
        self.intrinsics = intrinsics
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
            for stub in self.intrinsics:
                self.fn.__globals__[stub.__name__] = _intrinsic(stub.__name__)
            jit = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
            for helper in self.helpers:
                if not isinstance(self.fn.__globals__.get(helper.__name__), numba.core.dispatcher.Dispatcher):
                    self.fn.__globals__[helper.__name__] = jit(helper)
            kernel_jit = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=self.fastmath)
            self._compiled = kernel_jit(self.fn)
        return self._compiled


# rows per thread below which a call runs on one thread (measured: splitting smaller inputs costs more
# in hand-offs than it saves)
MIN_ROWS_PER_THREAD = 2048


def in_parts(count: int, rows: int, run: Callable[[int, int], T]) -> list[T]:
    """``run(start, stop)`` over consecutive parts of ``range(count)``, side by side on the kernels' thread
    pool (they release the GIL): as many parts as ``torch.get_num_threads()``, ``count`` and
    :data:`MIN_ROWS_PER_THREAD` rows a part (``rows`` in all) allow; one part runs in the caller's thread."""
    parts = min(torch.get_num_threads(), count, rows // MIN_ROWS_PER_THREAD)
    if parts <= 1:
        return [run(0, count)]
    bounds = [int(b) for b in np.linspace(0, count, parts + 1).astype(int)]
    return list(_thread_pool().map(lambda part: run(*part), itertools.pairwise(bounds)))


def _thread_pool() -> ThreadPoolExecutor:
    """The threads of :func:`in_parts`, made on first use."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(thread_name_prefix="hopfield_aa-kernel")
    return _pool


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
        if not t.is_cpu or t.dtype != dtype or t.ndim < 1:
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


def compress_above(src: Any, start: int, skip: int, m: float, limit: float, dst: Any, at: int) -> int:
    """Inside a kernel only (an intrinsic, :data:`INTRINSICS`): the ``W`` = 64 bytes of entries of the
    C-contiguous array ``src`` from flat index ``start`` on (W = 16 float32 or 8 float64), d = entry − m
    in ``src``'s dtype, and those past the first ``skip`` with d > ``limit`` (NaN never; a row's last
    entries as the window ending there, its first lanes skipped as already seen) written in order to the
    flat ``dst[at:]`` (same dtype; all W lanes are stored, those past the kept ones scratch, so ``dst``
    needs W entries of room); returns how many were kept. On a CPU with AVX-512 this is one compress
    instruction (vcompressps/pd) per W entries, where a branch-free scalar loop stores every entry
    (measured, float32, one thread: the maximum and collection of 16384 rows of 256 take 2.6 ms by the
    scalar loop, 0.9 ms compressed); elsewhere LLVM expands it to scalar code."""
    raise RuntimeError("compress_above runs inside a compiled kernel only")


def compress_above_at(
    src: Any, start: int, skip: int, m: float, limit: float, dst: Any, at: int, cols: Any, first: int
) -> int:
    """:func:`compress_above`, and the kept entries' column numbers (``first`` + lane) written alike to the
    flat int32 ``cols[at:]``."""
    raise RuntimeError("compress_above_at runs inside a compiled kernel only")


INTRINSICS = ("compress_above", "compress_above_at")
_intrinsics: dict[str, Any] = {}


def _intrinsic(name: str) -> Any:
    """The numba intrinsic ``name`` of :data:`INTRINSICS` or of the vector functions of :mod:`._simd`,
    built on first use (numba imported)."""
    if name in _simd.NAMES:
        return _simd.build(name)
    if name not in INTRINSICS:
        raise ValueError(f"intrinsic: expected one of {INTRINSICS + _simd.NAMES}, got {name!r}")
    if name not in _intrinsics:
        _intrinsics[name] = _build_compress(with_columns=name == "compress_above_at")
    return _intrinsics[name]


def _build_compress(with_columns: bool, register_form: bool | None = None) -> Any:
    """:func:`compress_above` (or ``_at``) as LLVM IR: a vector load, a subtraction and a compare, then
    ``llvm.experimental.vector.compress`` and a whole-vector store (``register_form``; by default where
    LLVM ≥ 19 has it), else ``llvm.masked.compressstore`` (measured slower than the scalar loop on an
    AMD Zen 4, whose memory form of the instruction is microcoded), and the mask's population count."""
    from llvmlite import binding, ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    if register_form is None:
        register_form = binding.llvm_version_info >= (19,)
    i32 = ir.IntType(32)

    def splat(builder: Any, value: Any, vector: Any) -> Any:
        out = ir.Constant(vector, ir.Undefined)
        for i in range(vector.count):
            out = builder.insert_element(out, value, ir.Constant(i32, i))
        return out

    def store(builder: Any, values: Any, mask: Any, pointer: Any, align: int) -> None:
        vector = values.type
        if register_form:
            name = f"llvm.experimental.vector.compress.{_mangle(vector)}"
            fn_type = ir.FunctionType(vector, [vector, mask.type, vector])
            packed = builder.call(
                cgutils.get_or_insert_function(builder.module, fn_type, name),
                [values, mask, ir.Constant(vector, ir.Undefined)],
            )
            builder.store(packed, builder.bitcast(pointer, vector.as_pointer()), align=align)
        else:
            name = f"llvm.masked.compressstore.{_mangle(vector)}"
            fn_type = ir.FunctionType(ir.VoidType(), [vector, vector.element.as_pointer(), mask.type])
            builder.call(
                cgutils.get_or_insert_function(builder.module, fn_type, name), [values, pointer, mask]
            )

    def typer(
        typingctx: Any, src: Any, start: Any, skip: Any, m: Any, limit: Any, dst: Any, at: Any, *rest: Any
    ) -> Any:
        arrays = (src, dst) + ((rest[0],) if with_columns else ())
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays) or src.dtype != dst.dtype:
            return None
        if src.dtype not in (types.float32, types.float64) or (with_columns and rest[0].dtype != types.int32):
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            dtype = signature.args[0].dtype
            element = context.get_value_type(dtype)
            width = 64 // (dtype.bitwidth // 8)
            vector = ir.VectorType(element, width)
            align = dtype.bitwidth // 8

            def scalar(i: int, to: Any) -> Any:
                return context.cast(builder, args[i], signature.args[i], to)

            src_data = context.make_array(signature.args[0])(context, builder, args[0]).data
            dst_data = context.make_array(signature.args[5])(context, builder, args[5]).data
            pointer = builder.gep(src_data, [scalar(1, types.int64)])
            values = builder.load(builder.bitcast(pointer, vector.as_pointer()), align=align)
            d = builder.fsub(values, splat(builder, scalar(3, dtype), vector))
            lane_type = ir.VectorType(i32, width)
            lanes = ir.Constant(lane_type, list(range(width)))
            unseen = builder.icmp_unsigned(
                ">=", lanes, splat(builder, builder.trunc(scalar(2, types.int64), i32), lane_type)
            )
            mask = builder.and_(
                builder.fcmp_ordered(">", d, splat(builder, scalar(4, dtype), vector)), unseen
            )
            at_value = scalar(6, types.int64)
            store(builder, d, mask, builder.gep(dst_data, [at_value]), align)
            if with_columns:
                cols_data = context.make_array(signature.args[7])(context, builder, args[7]).data
                first = builder.trunc(scalar(8, types.int64), i32)
                columns = builder.add(splat(builder, first, lane_type), lanes)
                store(builder, columns, mask, builder.gep(cols_data, [at_value]), 4)
            bits = builder.bitcast(mask, ir.IntType(width))
            count_type = ir.FunctionType(ir.IntType(width), [ir.IntType(width)])
            count = builder.call(
                cgutils.get_or_insert_function(builder.module, count_type, f"llvm.ctpop.i{width}"), [bits]
            )
            return builder.zext(count, ir.IntType(64))

        return types.int64(src, start, skip, m, limit, dst, at, *rest), codegen

    if with_columns:

        def typer_at(typingctx, src, start, skip, m, limit, dst, at, cols, first):
            return typer(typingctx, src, start, skip, m, limit, dst, at, cols, first)

        return intrinsic(typer_at)

    def typer_plain(typingctx, src, start, skip, m, limit, dst, at):
        return typer(typingctx, src, start, skip, m, limit, dst, at)

    return intrinsic(typer_plain)


def _mangle(vector: Any) -> str:
    """LLVM's overload suffix of a vector type: v16f32, v8f64, v16i32."""
    element = vector.element
    kind = f"i{element.width}" if hasattr(element, "width") else ("f32" if str(element) == "float" else "f64")
    return f"v{vector.count}{kind}"
