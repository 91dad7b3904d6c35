"""Sixteen-lane float32 vectors inside numba kernels (:class:`.._jit.Kernel` ``intrinsics``).

numba's loop vectoriser cannot vectorise the tiny matrix products of attention on short rows (a text-key
axis of 12 to 77, a head dimension of 16 to 64): LLVM unrolls a loop of a known 16 iterations fully, and
numba runs no SLP vectoriser to put the unrolled scalars back into vectors; with a trip count known only
at run time, the vector body (8 lanes, interleaved 4×) never runs for 16 entries. A kernel that calls
these functions instead holds 16 float32 entries in one value (``float32x16``, an LLVM ``<16 x float>``:
one AVX-512 register, two AVX2 ones) and states its vector arithmetic itself.

Each function here is a stub outside a compiled kernel (it raises); inside one it is the numba intrinsic
that :func:`build` makes (numba imported). Loads and stores take a C-contiguous float32 array of any
rank and a flat index; they read or write 16 entries from there (no bounds check: the caller pads).

numba's disk cache of a kernel is keyed on the kernel's own source file, not on this one: after changing
the code generated here, delete the cached kernels (``*.nbi``, ``*.nbc`` in ``__pycache__`` beside the
kernels' modules) or they keep the old code.
"""

from __future__ import annotations

from typing import Any

LANES = 16

# e^r on |r| ≤ ln 2 / 2 (8 terms, normalizers.native._exp's single-precision polynomial, Horner from the
# highest power), and ln 2 split so that k · _LN2_HI is exact in float32 for the |k| ≤ 150 used here
_EXP_TERMS = (
    0.00019915869191389535,
    0.0013948580818093912,
    0.008333266093189582,
    0.04166621827440191,
    0.16666666891074364,
    0.5000000107749384,
    0.9999999999797808,
    0.9999999999595482,
)
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_INV_LN2 = 1.4426950408889634


def _stub(name: str) -> Any:
    def stub(*args: Any) -> Any:
        raise RuntimeError(f"{name} runs inside a compiled kernel only")

    stub.__name__ = stub.__qualname__ = name
    return stub


vload = _stub("vload")
"""``vload(a, i)``: the 16 entries ``a.flat[i : i + 16]`` of a C-contiguous float32 array."""
vstore = _stub("vstore")
"""``vstore(a, i, v)``: writes ``v`` to ``a.flat[i : i + 16]``."""
vsplat = _stub("vsplat")
"""``vsplat(x)``: the scalar ``x`` (cast to float32) in every lane."""
vadd = _stub("vadd")
"""``vadd(a, b)``: a + b, lane by lane."""
vsub = _stub("vsub")
"""``vsub(a, b)``: a − b, lane by lane."""
vmul = _stub("vmul")
"""``vmul(a, b)``: a · b, lane by lane."""
vfma = _stub("vfma")
"""``vfma(a, b, c)``: a · b + c, lane by lane, rounded once."""
vpos = _stub("vpos")
"""``vpos(a)``: max(a, 0) lane by lane (a NaN lane gives 0)."""
vmax = _stub("vmax")
"""``vmax(a, b)``: the larger of a and b lane by lane (b where they are unordered)."""
vsum = _stub("vsum")
"""``vsum(a)``: the sum of the lanes (in any order), a float32."""
vtop = _stub("vtop")
"""``vtop(a)``: the largest lane, a float32 (the lanes must not be NaN)."""
vcount = _stub("vcount")
"""``vcount(a)``: how many lanes are > 0, an int64."""
vexp = _stub("vexp")
"""``vexp(a)``: e^a lane by lane for a ≤ 0 (relative error about 1e-7; 0 below float32's normal range
and for −inf); a lane that is NaN or > 88 gives an unspecified value, so callers keep them out."""

NAMES = tuple(
    stub.__name__
    for stub in (vload, vstore, vsplat, vadd, vsub, vmul, vfma, vpos, vmax, vsum, vtop, vcount, vexp)
)
_built: dict[str, Any] = {}


def build(name: str) -> Any:
    """The numba intrinsic ``name`` of :data:`NAMES` (all of them built on the first call, numba imported)."""
    if not _built:
        _built.update(_build_all())
    return _built[name]


def _build_all() -> dict[str, Any]:
    vectors = _Codegen()
    return vectors.memory() | vectors.lanewise_ops() | vectors.reductions()


class _Codegen:
    """The ``float32x16`` numba type (registered on construction) and the codegen of each intrinsic."""

    def __init__(self) -> None:
        from llvmlite import ir
        from numba import types
        from numba.extending import models, register_model

        self.ir, self.types = ir, types
        self.vector = vector = ir.VectorType(ir.FloatType(), LANES)
        self.i32 = ir.IntType(32)
        self.ints = ir.VectorType(self.i32, LANES)

        class Float32x16(types.Type):
            def __init__(self) -> None:
                super().__init__(name="float32x16")

        @register_model(Float32x16)
        class _Model(models.PrimitiveModel):
            def __init__(self, dmm: Any, fe_type: Any) -> None:
                super().__init__(dmm, fe_type, vector)

        self.float32x16 = Float32x16()

    def const(self, value: float) -> Any:
        return self.ir.Constant(self.vector, [self.ir.Constant(self.ir.FloatType(), float(value))] * LANES)

    def call(self, builder: Any, name: str, result: Any, *args: Any, fastmath: tuple[str, ...] = ()) -> Any:
        from numba.core import cgutils

        fn_type = self.ir.FunctionType(result, [a.type for a in args])
        return builder.call(
            cgutils.get_or_insert_function(builder.module, fn_type, name), args, fastmath=fastmath
        )

    def fma(self, builder: Any, a: Any, b: Any, c: Any) -> Any:
        return self.call(builder, "llvm.fma.v16f32", self.vector, a, b, c)

    def memory(self) -> dict[str, Any]:
        """vload, vstore and vsplat."""
        from numba.extending import intrinsic

        ir, types, vector, float32x16 = self.ir, self.types, self.vector, self.float32x16

        def is_buffer(a: Any) -> bool:
            return isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"

        def pointer(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            flat = context.cast(builder, args[1], signature.args[1], types.intp)
            return builder.bitcast(builder.gep(data, [flat]), vector.as_pointer())

        def vload(typingctx: Any, a: Any, i: Any) -> Any:
            if not (is_buffer(a) and isinstance(i, types.Integer)):
                return None

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                return builder.load(pointer(context, builder, signature, args), align=4)

            return float32x16(a, i), codegen

        def vstore(typingctx: Any, a: Any, i: Any, v: Any) -> Any:
            if not (is_buffer(a) and isinstance(i, types.Integer) and v == float32x16):
                return None

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                builder.store(args[2], pointer(context, builder, signature, args), align=4)
                return context.get_dummy_value()

            return types.none(a, i, v), codegen

        def vsplat(typingctx: Any, x: Any) -> Any:
            if not isinstance(x, (types.Float, types.Integer)):
                return None

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                value = context.cast(builder, args[0], signature.args[0], types.float32)
                single = builder.insert_element(
                    ir.Constant(vector, ir.Undefined), value, ir.Constant(self.i32, 0)
                )
                return builder.shuffle_vector(single, single, ir.Constant(self.ints, [0] * LANES))

            return float32x16(x), codegen

        return {"vload": intrinsic(vload), "vstore": intrinsic(vstore), "vsplat": intrinsic(vsplat)}

    def lanewise(self, name: str, arity: int, emit: Any) -> Any:
        """An intrinsic of ``arity`` vector arguments whose codegen is ``emit(builder, *values)``."""
        from numba.extending import intrinsic

        def typer(typingctx: Any, *args: Any) -> Any:
            if len(args) != arity or any(a != self.float32x16 for a in args):
                return None

            def codegen(context: Any, builder: Any, signature: Any, values: Any) -> Any:
                return emit(builder, *values)

            return self.float32x16(*args), codegen

        # numba reads an intrinsic's arguments from its typer's parameters
        def unary(typingctx: Any, a: Any) -> Any:
            return typer(typingctx, a)

        def binary(typingctx: Any, a: Any, b: Any) -> Any:
            return typer(typingctx, a, b)

        def ternary(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
            return typer(typingctx, a, b, c)

        chosen = (unary, binary, ternary)[arity - 1]
        chosen.__name__ = chosen.__qualname__ = name
        return intrinsic(chosen)

    def lanewise_ops(self) -> dict[str, Any]:
        """vadd, vsub, vmul, vfma, vpos, vmax and vexp."""
        zero = self.const(0.0)
        return {
            "vadd": self.lanewise("vadd", 2, lambda builder, a, b: builder.fadd(a, b)),
            "vsub": self.lanewise("vsub", 2, lambda builder, a, b: builder.fsub(a, b)),
            "vmul": self.lanewise("vmul", 2, lambda builder, a, b: builder.fmul(a, b)),
            "vfma": self.lanewise("vfma", 3, self.fma),
            "vpos": self.lanewise(
                "vpos", 1, lambda builder, a: builder.select(builder.fcmp_ordered(">", a, zero), a, zero)
            ),
            "vmax": self.lanewise(
                "vmax", 2, lambda builder, a, b: builder.select(builder.fcmp_ordered(">", a, b), a, b)
            ),
            "vexp": self.lanewise("vexp", 1, self.exp),
        }

    def exp(self, builder: Any, a: Any) -> Any:
        """e^a: a = k ln 2 + r, |r| ≤ ln 2 / 2; e^r by the polynomial, 2^k from its bits (k ≥ −126: normal,
        below: 0)."""
        const, fma = self.const, self.fma
        k = self.call(builder, "llvm.floor.v16f32", self.vector, fma(builder, a, const(_INV_LN2), const(0.5)))
        normal = builder.fcmp_ordered(">", k, const(-127.0))
        k = builder.select(normal, k, const(-127.0))
        r = fma(builder, k, const(-_LN2_LO), fma(builder, k, const(-_LN2_HI), a))
        q = const(_EXP_TERMS[0])
        for term in _EXP_TERMS[1:]:
            q = fma(builder, q, r, const(term))
        biased = builder.add(builder.fptosi(k, self.ints), self.ir.Constant(self.ints, [127] * LANES))
        power = builder.bitcast(builder.shl(biased, self.ir.Constant(self.ints, [23] * LANES)), self.vector)
        return builder.select(normal, builder.fmul(q, power), const(0.0))

    def reductions(self) -> dict[str, Any]:
        """vsum, vtop and vcount."""
        from numba.extending import intrinsic

        ir, types = self.ir, self.types

        def reduction(name: str, result: Any, emit: Any) -> Any:
            def typer(typingctx: Any, a: Any) -> Any:
                if a != self.float32x16:
                    return None

                def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                    return emit(builder, args[0])

                return result(a), codegen

            typer.__name__ = typer.__qualname__ = name
            return intrinsic(typer)

        def total(builder: Any, a: Any) -> Any:
            zero = ir.Constant(ir.FloatType(), 0.0)
            name = "llvm.vector.reduce.fadd.v16f32"
            return self.call(builder, name, ir.FloatType(), zero, a, fastmath=("reassoc",))

        def top(builder: Any, a: Any) -> Any:
            return self.call(builder, "llvm.vector.reduce.fmax.v16f32", ir.FloatType(), a, fastmath=("nnan",))

        def count(builder: Any, a: Any) -> Any:
            bits = builder.bitcast(builder.fcmp_ordered(">", a, self.const(0.0)), ir.IntType(LANES))
            ones = self.call(builder, f"llvm.ctpop.i{LANES}", ir.IntType(LANES), bits)
            return builder.zext(ones, ir.IntType(64))

        return {
            "vsum": reduction("vsum", types.float32, total),
            "vtop": reduction("vtop", types.float32, top),
            "vcount": reduction("vcount", types.int64, count),
        }
