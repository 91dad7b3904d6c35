"""The fused retrievals of guided attention (hopfield_aa.guidance.fused) and the vector functions they are
written in (hopfield_aa._simd): the softmax and α-entmax retrievals of one score matrix against float64,
on the processors' strided views, with the sort fallback, across threads, and out of the way wherever
their premise does not hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hopfield_aa import _jit
from hopfield_aa._simd import vexp, vload, vstore
from hopfield_aa.guidance import fused
from hopfield_aa.guidance.attention import guided_attention
from hopfield_aa.guidance.rules import RowRule, extrapolate_rule, gag_rule, get_rule, ladder_rule, row_rule
from hopfield_aa.normalizers import MAX_SUPPORT_ITER, entmax_tensor

pytestmark = pytest.mark.skipif(not _jit.enabled(), reason="numba is not installed")


def _attention_views(
    batch: int, heads: int, queries: int, keys: int, dim: int, seed: int, spread: float = 2.0
):
    """Q, K, V as a diffusers processor hands them over: (batch, heads, tokens, d) views of
    (batch, tokens, heads, d) projections."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=gen).transpose(1, 2) * spread
    k, v = (torch.randn(batch, keys, heads, dim, generator=gen).transpose(1, 2) for _ in range(2))
    return q, k, v


def _float64_retrievals(q, k, v, scale: float, alpha: float) -> list[torch.Tensor]:
    z = q.double() @ (k.double() * scale).transpose(-1, -2)
    return [torch.softmax(z, -1) @ v.double(), entmax_tensor(z, alpha, -1) @ v.double()]


@given(
    shape=st.tuples(
        st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 40), st.integers(1, 40)
    ),
    alpha=st.sampled_from(fused.ALPHAS),
    spread=st.sampled_from([0.1, 1.0, 4.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_the_fused_retrievals_are_the_softmax_and_entmax_retrievals_of_one_score_matrix(
    shape, alpha, spread, seed
):
    """For any batch, heads, queries, keys (1 to 40: shorter and longer than one vector of 16) and head
    dimension, the fused call's [softmax(βQKᵀ)V, entmax_α(βQKᵀ)V] equal the float64 retrievals up to
    float32 rounding (the scores summed in another order, the polynomial exponential, the support passes
    summed in float32): within (1e-5 + 8 eps |Z|_max) max |V|, the second term the rounding of scores of
    that size, which moves the probabilities by as much in any float32 computation."""
    q, k, v = _attention_views(*shape, seed=seed, spread=spread)
    scale = shape[-1] ** -0.5
    out = fused.retrievals(q, k, v, (1.0, alpha), scale)
    assert out is not None
    scores = float((q.double() @ k.double().transpose(-1, -2)).abs().max()) * scale
    bound = (1e-5 + 8 * torch.finfo(torch.float32).eps * scores) * float(v.abs().max())
    for got, want in zip(out, _float64_retrievals(q, k, v, scale, alpha), strict=True):
        assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
        assert float((got.double() - want).abs().max()) <= bound


@pytest.mark.parametrize("alpha", fused.ALPHAS)
def test_both_fused_retrievals_are_convex_combinations_of_the_values(alpha):
    """softmax and α-entmax are probability vectors, so with every value 1 both retrievals are 1 (to
    float32 rounding), at a length of keys that fills no whole vector (37) and one that fills two (32)."""
    for keys in (37, 32):
        q, k, _ = _attention_views(2, 3, 11, keys, 24, seed=keys)
        ones = torch.ones(2, keys, 3, 24).transpose(1, 2)
        dense, sparse = fused.retrievals(q, k, ones, (1.0, alpha), 24**-0.5)
        torch.testing.assert_close(dense, torch.ones_like(dense), atol=2e-6, rtol=0)
        torch.testing.assert_close(sparse, torch.ones_like(sparse), atol=2e-6, rtol=0)


@pytest.mark.parametrize("alpha", fused.ALPHAS)
def test_equal_scores_give_both_retrievals_the_mean_value(alpha):
    """A query orthogonal to every key (here zero) scores them all alike: softmax and α-entmax are then
    uniform and both retrievals are the mean of the values (a score row of 40 keys: three vectors, the
    last one partly padding)."""
    q, k, v = _attention_views(2, 3, 5, 40, 16, seed=9)
    dense, sparse = fused.retrievals(torch.zeros_like(q), k, v, (1.0, alpha), 0.25)
    mean = v.mean(-2, keepdim=True).expand_as(dense)
    torch.testing.assert_close(dense, mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse, mean, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("alpha", fused.ALPHAS)
def test_rows_solved_by_sorting_equal_those_the_support_passes_settle(alpha):
    """With no support pass allowed every row takes the sort fallback; its retrievals equal those of the
    support passes to float32 rounding (the two find the same threshold)."""
    q, k, v = _attention_views(2, 2, 13, 21, 16, seed=5)
    kernel = fused._KERNEL.get()
    results = []
    for passes in (MAX_SUPPORT_ITER, 0):
        dense, sparse = (torch.empty(2, 2, 13, 16) for _ in range(2))
        arrays = (q.numpy(), k.numpy(), v.numpy(), dense.numpy(), sparse.numpy(), fused._NO_OUTPUT)
        assert kernel(*arrays, 0.25, alpha == 1.5, passes, *fused._NO_RULE, 0, 4) == 0
        results.append((dense, sparse))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=0)


def test_threads_split_the_blocks_without_changing_a_bit():
    """Above 2048 query rows per thread the (batch, head) blocks are split across threads; every block is
    computed by the same code, so the result is bitwise the one-thread result."""
    q, k, v = _attention_views(2, 4, 1024, 16, 16, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.retrievals(q, k, v, (1.0, 1.5), 0.25)
        torch.set_num_threads(2)
        two = fused.retrievals(q, k, v, (1.0, 1.5), 0.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("keys", [12, 40])
@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_a_score_that_is_not_finite_hands_the_call_back_to_the_tensor_path(poison, keys, monkeypatch):
    """A NaN or infinite score (from one query entry, or from one key in the last vector of rows of 40)
    is outside the kernel's arithmetic: the fused call returns None and guided attention computes
    the call as it does without the fused kernel (the native entmax and softmax on stored scores), bit for
    bit, NaN where that path puts it."""
    q, k, v = _attention_views(1, 2, 6, keys, 8, seed=1)
    q, k = q.clone(), k.clone()
    if keys > 32:
        k[0, 1, 35, 4] = poison
    else:
        q[0, 1, 3, 2] = poison
    assert fused.retrievals(q, k, v, (1.0, 1.5), 8**-0.5) is None
    spec = get_rule("gag")

    def combine(retrievals):
        return spec.function(retrievals, spec.scale)

    out = guided_attention(q, k, v, combine, spec.alphas, scale=8**-0.5)
    monkeypatch.setattr(fused, "retrievals", lambda *args: None)
    unfused = guided_attention(q, k, v, combine, spec.alphas, scale=8**-0.5)
    assert out.isnan().any() and out[0, 0].isfinite().all()
    assert torch.equal(out.nan_to_num(7.0), unfused.nan_to_num(7.0))
    with _jit.disabled():  # the tensor kernels too: NaN in the same place, not an error
        tensor_path = guided_attention(q, k, v, combine, spec.alphas, scale=8**-0.5)
    assert torch.equal(out.isnan(), tensor_path.isnan())


def test_the_fused_call_declines_what_it_does_not_compute():
    """A mask, float64, a per-head α tensor, a ladder of more than two rungs, α other than 1.5 and 2, a
    gradient to record, and native kernels switched off: each sends the call to the tensor path."""
    q, k, v = _attention_views(1, 2, 4, 5, 8, seed=0)
    assert fused.retrievals(q, k, v, (1.0, 1.5), 0.3) is not None
    mask = torch.zeros(1, 1, 4, 5)
    assert fused.retrievals(q, k, v, (1.0, 1.5), 0.3, mask) is None
    assert fused.retrievals(q.double(), k.double(), v.double(), (1.0, 1.5), 0.3) is None
    assert fused.retrievals(q, k, v, (1.0, torch.full((2, 1, 1), 1.5)), 0.3) is None
    assert fused.retrievals(q, k, v, (1.0, 1.25, 1.5, 2.0), 0.3) is None
    assert fused.retrievals(q, k, v, (1.0, 1.25), 0.3) is None
    assert fused.retrievals(q.requires_grad_(), k, v, (1.0, 1.5), 0.3) is None
    with _jit.disabled():
        assert fused.retrievals(q.detach(), k, v, (1.0, 1.5), 0.3) is None


@pytest.mark.parametrize("rule", ["gag", "extrapolate"])
@pytest.mark.parametrize("in_kernel", [False, True])
def test_guided_attention_on_the_fused_path_agrees_with_the_tensor_path(rule, in_kernel):
    """The default rules through guided attention, called on the fused retrievals or computed inside the
    kernel (``row_rule``), give the tensor path's output to float32 rounding, also on the conditional half
    of a batch (``rows``)."""
    q, k, v = _attention_views(4, 4, 64, 16, 16, seed=2)
    spec = get_rule(rule)
    form = row_rule(spec.function, spec.scale, spec.options) if in_kernel else None

    def combine(retrievals):
        return spec.function(retrievals, spec.scale)

    for rows in (slice(None), slice(2, 4)):
        out = guided_attention(q, k, v, combine, spec.alphas, scale=0.25, rows=rows, row_rule=form)
        with _jit.disabled():
            tensor_path = guided_attention(q, k, v, combine, spec.alphas, scale=0.25, rows=rows)
        torch.testing.assert_close(out, tensor_path, atol=2e-5, rtol=2e-5)


GAG_OPTIONS = [
    {},
    {"zeta": 0.5},
    {"zeta": 1.0},
    {"eta": 0.01},
    {"eta": 0.0, "zeta": 1.0},
    {"reference": "dense"},
    {"reference": "dense", "zeta": 0.3, "eta": 0.05},
]


@pytest.mark.parametrize("options", [*GAG_OPTIONS, None], ids=[*map(str, GAG_OPTIONS), "extrapolate"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 3.5])
def test_the_rule_inside_the_kernel_is_the_rule_of_the_fused_retrievals(options, lam):
    """fused.guided computes the rule on the retrievals it has just computed: its output is the rule's
    tensor form (GAG with each option: ζ, the η cap, reference S or D; or extrapolation) of
    fused.retrievals' output to float32 rounding, at a head dimension that fills no whole vector (24),
    laid out in memory as the stock attention's output (batch, queries, heads, d)."""
    q, k, v = _attention_views(3, 4, 10, 19, 24, seed=11)
    dense, sparse = fused.retrievals(q, k, v, (1.0, 1.5), 24**-0.5)
    if options is None:
        form, want = row_rule(extrapolate_rule, lam, {}), extrapolate_rule([dense, sparse], lam)
    else:
        defaults = {"zeta": 0.0, "eta": math.inf, "reference": "sparse"}
        form = row_rule(gag_rule, lam, {**defaults, **options})
        want = gag_rule([dense, sparse], lam, **options)
    out = fused.guided(q, k, v, (1.0, 1.5), 24**-0.5, None, form)
    stock = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == stock.shape and out.stride() == stock.stride()
    torch.testing.assert_close(out, want, atol=3e-6, rtol=3e-6)


def test_gag_with_any_options_and_extrapolation_have_a_row_form():
    """row_rule gives GAG (every option) and extrapolation a row form; the α-ladder has none."""
    defaults = {"zeta": 0.0, "eta": math.inf, "reference": "sparse"}
    assert row_rule(gag_rule, 1.5, defaults) == RowRule("gag", 1.5)
    assert row_rule(gag_rule, 1.0, {**defaults, "zeta": 0.5, "eta": 0.01}) == RowRule("gag", 1.0, 0.5, 0.01)
    assert row_rule(gag_rule, 1.0, {**defaults, "reference": "dense"}).dense_reference
    assert row_rule(extrapolate_rule, 2.0, {}) == RowRule("extrapolate", 2.0)
    assert row_rule(ladder_rule, 2.0, {"regularization": 0.0}) is None


def _exp_rows(x, out):  # pragma: no cover - compiled by numba
    for i in range(0, x.shape[0], 16):
        vstore(out, i, vexp(vload(x, i)))


_EXP = _jit.Kernel(_exp_rows, intrinsics=(vload, vstore, vexp))


def test_the_vector_exponential_is_exp_to_float32_rounding():
    """vexp(a) for a ≤ 0 is e^a within 2 float32 ulps of the float64 value down to float32's normal
    range (−87.3), 0 below it and at −inf (a denormal e^a is flushed), 1 at 0."""
    x = np.concatenate(
        [np.linspace(-87.3, 0.0, 100_000), [0.0, -1e-30, -0.5 * math.log(2), -100.0, -1e4, -np.inf]]
    ).astype(np.float32)
    x = np.concatenate([x, np.zeros((-x.size) % 16, np.float32)])
    out = np.empty_like(x)
    _EXP.get()(x, out)
    want = np.exp(x.astype(np.float64))
    normal = want >= np.finfo(np.float32).tiny
    ulp = np.spacing(want[normal].astype(np.float32)).astype(np.float64)
    assert np.abs(out[normal] - want[normal]).max() <= 2 * ulp.max() and np.all(
        np.abs(out[normal] - want[normal]) <= 2 * ulp
    )
    assert np.all(out[~normal] == 0.0)
    assert out[x == 0.0].tolist() == [1.0] * int((x == 0.0).sum())
