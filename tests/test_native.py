"""The CPU native kernels of 1.5-entmax and sparsemax (hopfield_aa.normalizers.native): exact against
the sort-based references on adversarial rows, in either dtype, with the sort fallback, across threads,
and out of the way wherever they do not apply."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hopfield_aa import _jit
from hopfield_aa.normalizers import _entmax_tensor, blocked, native
from tests._oracles import entmax15_sort, sparsemax_sort

pytestmark = pytest.mark.skipif(not _jit.enabled(), reason="numba is not installed")

ORACLES = {1.5: entmax15_sort, 2.0: sparsemax_sort}


@st.composite
def rows(draw: st.DrawFn) -> np.ndarray:
    """Rows (B, n) in float64: ties, near-ties, huge and tiny scales, masked entries, all −inf rows."""
    n = draw(st.integers(1, 40))
    b = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-6, 1.0, 10.0, 1e4, 1e8]))
    z = draw(hnp.arrays(np.float64, (b, n), elements=st.floats(-3.0, 3.0))) * scale
    mode = draw(st.sampled_from(["plain", "tie", "constant", "masked", "dead_row"]))
    if mode == "tie" and n > 1:
        z[:, -1] = z[:, 0]
    elif mode == "constant":
        z[:] = z[0, 0]
    elif mode == "masked" and n > 1:
        z[:, draw(st.integers(0, n - 1))] = -np.inf
        z[:, 0] = 0.0
    elif mode == "dead_row":
        z[0] = -np.inf
    return z


def _tensor_kernel(z: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    with _jit.disabled():
        return blocked.forward(z, alpha, -1)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@given(z=rows())
def test_native_kernel_is_exact_entmax_and_its_threshold_in_float64(alpha: float, z: np.ndarray) -> None:
    """p agrees with the sort algorithm to 1e-12 (float64) on every row with a finite entry, λ with the
    tensor kernel's; a row of only −inf gets p = 0 and λ = −inf."""
    zt = torch.from_numpy(z)
    assert native.applies(zt, alpha)
    p, lam = native.forward(zt, alpha)
    _, lam_ref = _tensor_kernel(zt, alpha)
    live = torch.isfinite(zt.amax(-1))
    if bool(live.any()):
        torch.testing.assert_close(p[live], ORACLES[alpha](zt[live]), atol=1e-12, rtol=0)
        torch.testing.assert_close(lam[live], lam_ref[live], atol=1e-9, rtol=1e-12)
    assert bool((p[~live] == 0).all()) and bool((lam[~live] == -math.inf).all())


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("n", [1, 7, 16, 77, 300, 1030])
def test_native_float32_rows_are_within_1e_6_of_float64_and_have_the_tensor_kernels_support(
    alpha: float, n: int
) -> None:
    """float32: within 1e-6 of the float64 reference, the same support as the tensor kernel in float32,
    and the same output whether a row is solved by the support passes or by sorting (max_passes = 0)."""
    gen = torch.Generator().manual_seed(n)
    z = 2 * torch.randn(400, n, generator=gen)
    z[1:40] *= 1e4
    z[40:60] *= 1e-3
    if n > 2:
        z[60:80, n // 2 :] = -math.inf
    z[80] = -math.inf
    p, lam = native.forward(z, alpha)
    p_sorted, lam_sorted = native.forward(z, alpha, max_passes=0)
    p_ref, _ = _tensor_kernel(z, alpha)
    live = torch.isfinite(z.amax(-1))
    torch.testing.assert_close(p[live], ORACLES[alpha](z[live].double()).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(p_sorted, p, atol=1e-6, rtol=0)
    torch.testing.assert_close(lam_sorted[live], lam[live], atol=1e-5, rtol=1e-6)
    assert torch.equal(p > 0, p_ref > 0)
    assert p.dtype == lam.dtype == torch.float32 and lam.shape == (400, 1)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25, 1.3])
def test_rows_split_across_threads_give_the_single_thread_result_bit_for_bit(alpha: float) -> None:
    z = 2 * torch.randn(3 * _jit.MIN_ROWS_PER_THREAD, 33, generator=torch.Generator().manual_seed(0))
    forward = native.forward if alpha in native.ALPHAS else native.newton_forward
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forward(z, alpha)
        torch.set_num_threads(3)
        split = forward(z, alpha)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], split[0]) and torch.equal(one[1], split[1])


def test_the_default_cpu_path_is_native_and_the_others_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """entmax_tensor at α = 1.5 and 2 on CPU float32/float64 (and half, computed in float32) calls the
    native kernel of α = 1.5 and 2, for tensors of any size, and so do rows sharing α = 1.5 in an α per
    row; other α (their own kernel) and the kernels switched off do not."""
    calls: list[tuple[int, ...]] = []
    solve = native._solve
    monkeypatch.setattr(native, "_solve", lambda z, *rest: calls.append(z.shape) or solve(z, *rest))
    z = torch.randn(5, 9)
    for alpha, x in [(1.5, z), (2.0, z.double()), (1.5, z.half()), (2.0, torch.randn(3000, 77))]:
        p = _entmax_tensor(x, alpha)
        assert calls and p.dtype == x.dtype
        calls.clear()
    torch.testing.assert_close(
        _entmax_tensor(z.half(), 1.5).float(), _entmax_tensor(z, 1.5), atol=1e-3, rtol=0
    )
    calls.clear()
    _entmax_tensor(z, torch.tensor([[1.5], [1.5], [1.3], [1.5], [1.3]]))
    assert calls == [(3, 9)]
    calls.clear()
    _entmax_tensor(z, 1.3)
    with _jit.disabled():
        assert not native.applies(z, 1.5)
        _entmax_tensor(z, 1.5)
    assert not calls and native.applies(z, 1.5)


def test_without_numba_the_tensor_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    z = 2 * torch.randn(64, 20, generator=torch.Generator().manual_seed(1))
    expected = _entmax_tensor(z, 1.5)
    monkeypatch.setattr(_jit, "_numba", None)
    monkeypatch.setattr(_jit, "_import_failed", True)
    monkeypatch.setattr(native._KERNEL, "_compiled", None)
    assert not native.applies(z, 1.5)
    torch.testing.assert_close(_entmax_tensor(z, 1.5), expected, atol=1e-6, rtol=0)


def test_gradients_through_the_native_forward_are_the_closed_form_jacobian_product() -> None:
    z = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _entmax_tensor(x, 1.5), (z,))


@pytest.mark.parametrize("alpha", [1.1, 1.25, 1.3, 1.75, 2.5, 3.0, 4.0])
@pytest.mark.parametrize(
    ("n_rows", "dtype"), [(50, torch.float32), (9000, torch.float32), (300, torch.float64)]
)
def test_the_newton_kernel_of_any_alpha_equals_the_tensor_kernel_and_bisection(
    alpha: float, n_rows: int, dtype: torch.dtype
) -> None:
    """Any α: one native Newton kernel (:func:`native.newton_forward`; α = 1.25 by squarings, α > 2 with
    its bisection steps and the support-edge repair); equal to the tensor kernel within rounding, within
    1e-6 of 200-halving bisection in float64, zeros and λ = −inf on a row of only −inf."""
    from tests._oracles import entmax_bisect

    gen = torch.Generator().manual_seed(int(alpha * 10) + n_rows)
    z = (2 * torch.randn(n_rows, 77, generator=gen)).to(dtype)
    z[0] = 0.0  # every entry a candidate
    z[1, 5:] = -math.inf
    z[2] = -math.inf
    z[3:20] *= 0.01  # wide rows: the widest group
    assert native.applies(z, alpha, any_alpha=True) and not native.applies(z, alpha)
    p, lam = blocked.forward(z, alpha, -1)
    p_ref, lam_ref = _tensor_kernel(z, alpha)
    live = torch.isfinite(z.amax(-1))
    torch.testing.assert_close(p, p_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(lam[live], lam_ref[live], atol=1e-5, rtol=1e-6)
    sample = live.nonzero().squeeze(-1)[:200]
    torch.testing.assert_close(
        p[sample], entmax_bisect(z[sample].double(), alpha).to(dtype), atol=1e-6, rtol=0
    )
    assert bool((p[2] == 0).all()) and float(lam[2]) == -math.inf


@pytest.mark.parametrize("alpha", [1.000001, 1.1, 1.25, 1.3, 1.45, 1.75, 1.99])
@given(z=rows())
def test_the_newton_kernel_is_the_tensor_kernel_to_rounding_in_float64(alpha: float, z: np.ndarray) -> None:
    """1 < α < 2 in float64 (ties, near-ties, huge and tiny scales, masked entries, rows of one candidate,
    α near 1 where 1 + x would round x off): p within 1e-12 of the tensor kernel's (Newton's method with
    torch's log1p and exp), λ within 1e-9; a row of only −inf gets p = 0 and λ = −inf."""
    zt = torch.from_numpy(z)
    p, lam = native.newton_forward(zt, alpha)
    p_ref, lam_ref = _tensor_kernel(zt, alpha)
    live = torch.isfinite(zt.amax(-1))
    torch.testing.assert_close(p[live], p_ref[live], atol=1e-12, rtol=0)
    torch.testing.assert_close(lam[live], lam_ref[live], atol=1e-9, rtol=1e-12)
    assert bool((p[~live] == 0).all()) and bool((lam[~live] == -math.inf).all())


@pytest.mark.parametrize("alpha", [2.2, 3.0, 4.0, 6.0])
@given(
    z=hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(2, 24)), elements=st.floats(-3.0, 3.0)),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
)
def test_alpha_above_2_is_the_40_digit_entmax_within_the_rounding_of_its_threshold(
    alpha: float, z: np.ndarray, scale: float
) -> None:
    """α > 2, float64: both the native kernel and the tensor kernel (:func:`.newton.newton_threshold`)
    give every p_i within 1e-13 + 64 eps · max_j |dp_j/dλ| of the 40-digit solution, i.e. within what a
    threshold rounded to float64 can resolve (|dp/dλ| = p/y is unbounded for entries at the edge of the
    support, where λ's rounding alone moves p)."""
    from tests._oracles import entmax_digits

    z = z * scale
    zt = torch.from_numpy(z)
    kernels = {"native": native.newton_forward(zt, alpha)[0], "tensor": _tensor_kernel(zt, alpha)[0]}
    for r in range(z.shape[0]):
        exact, sensitivity = entmax_digits(z[r], alpha)
        allowed = 1e-13 + 64 * np.finfo(np.float64).eps * sensitivity.max()
        for name, p in kernels.items():
            error = float(np.abs(p[r].numpy() - exact).max())
            assert error <= allowed, (name, r, error, allowed)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_inside_a_compiled_graph_the_native_kernel_is_one_custom_op_without_graph_breaks(
    alpha: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fullgraph=True compiles (no graph break), the native kernel runs at call time as the op
    hopfield_aa::entmax_rows, and the result is the eager one bit for bit."""
    calls: list[int] = []
    kernel = native.forward
    monkeypatch.setattr(native, "forward", lambda z, a: calls.append(1) or kernel(z, a))
    torch._dynamo.reset()
    compiled = torch.compile(lambda z: _entmax_tensor(z, alpha), fullgraph=True)
    z = 2 * torch.randn(300, 77, generator=torch.Generator().manual_seed(5))
    z[7] = -math.inf
    out = compiled(z)
    assert calls
    assert torch.equal(out, _entmax_tensor(z, alpha))
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("alpha", "native_on"), [(1.5, True), (2.0, True), (1.3, True), (3.0, True), (1.5, False), (2.0, False)]
)
def test_a_nan_or_plus_inf_score_never_gives_a_finite_looking_row(alpha: float, native_on: bool) -> None:
    """Outside entmax_tensor's contract (scores free of NaN and +inf), but visible: a row with a NaN or a
    +inf score has NaN in its output (any α: the whole row for the native Newton kernel of α ≠ 1.5, 2),
    never a finite distribution and never an error (the tensor kernels' sort fallback of α = 1.5 and 2
    once indexed position −1 for such a row); the other rows are unaffected. The tensor Newton kernel
    (α ≠ 1.5, 2, native kernels off) does not keep this yet: a NaN row comes out finite, a +inf row raises."""
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(6, 40, generator=gen)
    z[0, 5] = math.nan
    z[1, 0] = math.nan
    z[2, 3] = math.inf
    z[4] = -math.inf
    with contextlib.nullcontext() if native_on else _jit.disabled():
        p = _entmax_tensor(z, alpha)
    assert bool(p[:3].isnan().any(-1).all())
    assert not bool(p[3:].isnan().any())
    torch.testing.assert_close(p[3].sum(), torch.tensor(1.0))
    assert bool((p[4] == 0).all())
    if native_on and alpha not in (1.5, 2.0):
        assert bool(p[:3].isnan().all())


def _collection_reference(row: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The entries d = z − max (in the row's dtype) with d > ``limit``, in order, and their columns."""
    d = row - row[np.isfinite(row) | (row == np.inf)].max(initial=-np.inf)
    keep = d > limit
    return d[keep], np.flatnonzero(keep).astype(np.int32)


@st.composite
def collection_rows(draw: st.DrawFn) -> tuple[np.ndarray, float]:
    """(a row of 1–70 entries in float32 or float64 with ties and −inf, a limit such as −1/(α−1))."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.integers(1, 70))
    row = draw(hnp.arrays(dtype, n, elements=st.floats(-4.0, 4.0, width=32)))
    if draw(st.booleans()) and n > 2:
        row[draw(st.integers(0, n - 1))] = -np.inf
        row[-1] = row[0]
    limit = draw(st.sampled_from([-2.0, -1.0, -1 / 0.3, -1 / 1.7, -0.0]))
    return row, limit


@given(case=collection_rows())
def test_the_vector_compress_keeps_the_entries_above_the_limit_in_order_with_their_columns(
    case: tuple[np.ndarray, float],
) -> None:
    """The candidates of the Newton kernel (:func:`native._collect_candidates`: vector compresses of 16
    float32 or 8 float64 entries, the last window ending at the row's end, a scalar loop for rows shorter
    than a vector) are exactly the entries z − max > limit of the row, in column order, with their
    columns, for any row length; the limit is rounded down to the row's dtype as the kernel does."""
    row, limit = case
    native._NEWTON_ROWS.get()  # binds the compiled helpers and intrinsics in the module
    z = np.stack([row, row[::-1].copy()])
    bound = np.asarray(limit, row.dtype)
    if float(bound) > limit:
        bound = np.nextafter(bound, row.dtype.type(-np.inf))
    for r in range(2):
        u = np.full(z.shape[1] + 24, np.nan, row.dtype)
        cols = np.full(z.shape[1] + 16, -1, np.int32)
        m, k, state = native._collect_candidates(z, r, u, cols, bound[()])
        kept, columns = _collection_reference(z[r], limit)
        assert state == 1 and m == z[r].max()
        assert k == kept.size
        np.testing.assert_array_equal(u[:k], kept)
        np.testing.assert_array_equal(cols[:k], columns)
        assert bool(np.all(u[k : (k + 7) // 8 * 8] == -np.inf))


@pytest.mark.parametrize("register_form", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_forms_of_the_compress_intrinsic_give_the_scalar_collection(
    register_form: bool, dtype: type
) -> None:
    """The compress intrinsic built either way (LLVM's vector.compress and a whole-vector store, or the
    masked compress-store older LLVM has), on full windows and on a last window whose first lanes are
    skipped: the kept entries z − m > limit and their columns, in order, and their count, as a scalar
    loop gives them."""
    numba = pytest.importorskip("numba")
    compress = _jit._build_compress(with_columns=True, register_form=register_form)
    lanes = 64 // np.dtype(dtype).itemsize

    @numba.njit
    def collect(z, m, limit, u, cols):  # type: ignore[no-untyped-def]
        n = z.shape[0]
        k = 0
        j = 0
        while j + lanes <= n:
            k += compress(z, j, 0, m, limit, u, k, cols, j)
            j += lanes
        if 0 < j < n:
            k += compress(z, n - lanes, lanes - n + j, m, limit, u, k, cols, n - lanes)
        return k

    gen = np.random.default_rng(3)
    for n in (lanes, lanes + 1, 2 * lanes - 1, 77, 256):
        z = (2 * gen.standard_normal(n)).astype(dtype)
        z[n // 3] = np.nan
        z[n // 2] = -np.inf
        m = dtype(np.nanmax(z))
        u = np.zeros(n + lanes, dtype)
        cols = np.zeros(n + lanes, np.int32)
        k = collect(z, m, dtype(-2.0), u, cols)
        keep = (z - m) > -2.0
        assert k == int(keep.sum())
        np.testing.assert_array_equal(u[:k], (z - m)[keep])
        np.testing.assert_array_equal(cols[:k], np.flatnonzero(keep))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(n=st.integers(1, 15), data=st.data())
def test_the_native_softmax_of_short_rows_is_torchs_softmax_with_its_nan_rows(
    dtype: torch.dtype, n: int, data: st.DataObject
) -> None:
    """Rows shorter than ``native.SHORT_SOFTMAX`` (where torch's CPU softmax is slow): the native kernel's
    softmax is torch's within 1e-6 relative in float32 (1e-13 in float64) on every finite entry, along the
    last axis or another; masked entries (−inf) get 0; a row with a NaN, or of only −inf, is NaN exactly
    where torch's is; and the log-sum-exp it returns as λ is torch's."""
    z = torch.from_numpy(data.draw(hnp.arrays(np.float64, (3, 5, n), elements=st.floats(-30.0, 30.0)))).to(
        dtype
    )
    if n > 1:
        z[0, 0, 0] = -math.inf
    z[1, 1] = -math.inf
    z[2, 2, n - 1] = math.nan
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for dim in (-1, 1):
        assert native.softmax_applies(z, dim) == (z.shape[dim] < native.SHORT_SOFTMAX)
        if not native.softmax_applies(z, dim):
            continue
        p, ref = native.softmax(z, dim), torch.softmax(z, dim)
        assert torch.equal(p.isnan(), ref.isnan())
        live = ~ref.isnan()
        error = (p[live].double() - ref[live].double()).abs() / ref[live].double().clamp_min(1e-30)
        assert float(error.max()) <= tol or bool((p[live] == ref[live]).all())
        assert bool((p[(z == -math.inf) & live] == 0).all())
    rows = z.reshape(-1, n)
    lam = np.empty(rows.shape[0], rows.numpy().dtype)
    native._softmax_solve(rows.numpy(), torch.empty_like(rows).numpy(), lam, dtype == torch.float64)
    ref_lam = torch.logsumexp(rows.double(), -1)
    live = torch.isfinite(ref_lam)
    np.testing.assert_allclose(lam[live.numpy()], ref_lam[live].numpy(), rtol=1e-6, atol=1e-6)


def test_softmax_through_entmax_tensor_takes_the_native_kernel_on_short_rows_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``entmax_tensor(·, 1)`` (the dense rung of guided attention) runs the native softmax on CPU rows
    shorter than 16 and torch's elsewhere (long rows, a gradient to record), with torch's result."""
    calls: list[int] = []
    kernel = native.softmax
    monkeypatch.setattr(native, "softmax", lambda z, d: calls.append(z.shape[d]) or kernel(z, d))
    gen = torch.Generator().manual_seed(4)
    for n in (12, 16, 77):
        z = torch.randn(4, 3, n, generator=gen)
        torch.testing.assert_close(_entmax_tensor(z, 1.0), torch.softmax(z, -1), rtol=1e-6, atol=1e-7)
    z = torch.randn(4, 12, generator=gen, requires_grad=True)
    _entmax_tensor(z, 1.0).sum().backward()
    assert calls == [12]
