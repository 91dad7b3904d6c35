"""Hypothesis strategies for memories, states and scales that reach the hard cases of THEORY.md:
one pattern, near-duplicate and tied patterns, β from 1e-3 to 1e3, large logits, zero vectors."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

finite = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False, allow_infinity=False, width=64)

# β spans six decades, drawn log-uniformly, with the extremes included explicitly
betas = st.one_of(
    st.sampled_from([1e-3, 1e3]),
    st.floats(min_value=-3.0, max_value=3.0).map(lambda e: float(10.0**e)),
)
alphas = st.one_of(st.sampled_from([1.0, 1.5, 2.0]), st.floats(min_value=1.0, max_value=3.0))
scales = st.floats(min_value=-4.0, max_value=8.0, allow_nan=False)


@st.composite
def memories(draw: st.DrawFn, max_patterns: int = 8, max_dim: int = 6) -> np.ndarray:
    """A memory (N, d) in float64: random, with near-duplicates or exact ties mixed in, N possibly 1."""
    n = draw(st.integers(1, max_patterns))
    d = draw(st.integers(1, max_dim))
    base = draw(hnp.arrays(np.float64, (n, d), elements=finite))
    mode = draw(st.sampled_from(["plain", "near_duplicate", "tie", "normalised"]))
    if mode == "near_duplicate" and n > 1:
        eps = draw(st.sampled_from([1e-9, 1e-6, 1e-3]))
        base[1] = base[0] + eps
    elif mode == "tie" and n > 1:
        base[-1] = base[0]
    elif mode == "normalised":
        norms = np.linalg.norm(base, axis=1, keepdims=True)
        base = np.where(norms > 1e-12, base / np.maximum(norms, 1e-12), base)
    return base


@st.composite
def memory_and_state(
    draw: st.DrawFn, max_patterns: int = 8, max_dim: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    memory = draw(memories(max_patterns, max_dim))
    d = memory.shape[1]
    start = draw(st.sampled_from(["random", "pattern", "zero"]))
    if start == "pattern":
        state = memory[draw(st.integers(0, memory.shape[0] - 1))].copy()
    elif start == "zero":
        state = np.zeros(d)
    else:
        state = draw(hnp.arrays(np.float64, (d,), elements=finite))
    return memory, state


@st.composite
def vector_pairs(
    draw: st.DrawFn, max_dim: int = 8, allow_zero_reference: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Two vectors of one length, the second possibly exactly zero or tiny (a degenerate reference)."""
    d = draw(st.integers(1, max_dim))
    a = draw(hnp.arrays(np.float64, (d,), elements=finite))
    b = draw(hnp.arrays(np.float64, (d,), elements=finite))
    if allow_zero_reference:
        b = b * draw(st.sampled_from([1.0, 1.0, 1e-300, 0.0]))
    return a, b
