"""Seeded synthetic memories for the checks: Gaussian, normalised, clustered and near-duplicate patterns,
and a β sweep through the change from averaging to single-pattern retrieval; sizes from N = 2 to N = 1024.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import torch

from hopfield_aa.checks.results import Case

FAMILIES = ("gaussian", "normalised", "clustered", "near_duplicates", "beta_sweep")


def _generator(seed: int, family: str, index: int) -> torch.Generator:
    # one independent, reproducible stream per (seed, family, case): adding a family never shifts another
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + zlib.crc32(family.encode()) * 101 + index) % 2**63
    )


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-300)


def starting_states(
    patterns: torch.Tensor, n_states: int, gen: torch.Generator, noise: float = 0.3
) -> torch.Tensor:
    r"""Starting states: half are stored patterns plus noise, half are random.

    Noisy patterns ``ξ₀ = x_i + noise · (M/√d) g`` (``g`` standard normal, ``M`` the largest pattern norm)
    probe retrieval; random states ``ξ₀ = (M/√d) g`` probe the averaging regime and metastable states.

    Parameters
    ----------
    patterns : Tensor, shape (N, d)
    n_states : int
        Number of states M ≥ 1.
    gen : torch.Generator
    noise : float
        Relative noise level of the noisy patterns.

    Returns
    -------
    Tensor, shape (n_states, d), dtype of ``patterns``.
    """
    n, d = patterns.shape
    scale = float(torch.linalg.vector_norm(patterns, dim=-1).max()) / math.sqrt(d)
    n_noisy = (n_states + 1) // 2
    picks = torch.randint(0, n, (n_noisy,), generator=gen)
    noisy = patterns[picks] + noise * scale * torch.randn(n_noisy, d, generator=gen, dtype=patterns.dtype)
    rand = scale * torch.randn(n_states - n_noisy, d, generator=gen, dtype=patterns.dtype)
    return torch.cat([noisy, rand])


def _case(
    family: str,
    patterns: torch.Tensor,
    beta: float,
    gen: torch.Generator,
    n_states: int,
    seed: int,
    **params: object,
) -> Case:
    n, d = patterns.shape
    data = {"family": family, "N": n, "d": d, "beta": float(beta), "seed": seed, **params}
    return Case(
        patterns=patterns, states=starting_states(patterns, n_states, gen), beta=float(beta), data=data
    )


def gaussian(
    seed: int = 0, *, quick: bool = False, n_states: int = 32, dtype: torch.dtype = torch.float64
) -> list[Case]:
    r"""Patterns with i.i.d. standard normal entries at the attention scale ``β = 1/√d``.

    ``β ‖x‖² ≈ √d``: averaging at toy sizes (N = 2, d = 2), sharper retrieval at attention size
    (N = 1024, d = 64), the regime of a real attention head.
    """
    sizes = [(2, 2), (16, 8), (1024, 64)] if quick else [(2, 2), (16, 8), (128, 32), (1024, 64)]
    out = []
    for i, (n, d) in enumerate(sizes):
        gen = _generator(seed, "gaussian", i)
        patterns = torch.randn(n, d, generator=gen, dtype=dtype)
        out.append(_case("gaussian", patterns, 1.0 / math.sqrt(d), gen, n_states, seed))
    return out


def normalised(
    seed: int = 0, *, quick: bool = False, n_states: int = 32, dtype: torch.dtype = torch.float64
) -> list[Case]:
    r"""Unit-norm patterns (uniform on the sphere) at ``β = 4 log N``: single-pattern retrieval dominates."""
    sizes = [(16, 8)] if quick else [(16, 8), (256, 32)]
    out = []
    for i, (n, d) in enumerate(sizes):
        gen = _generator(seed, "normalised", i)
        patterns = _unit_rows(torch.randn(n, d, generator=gen, dtype=dtype))
        out.append(_case("normalised", patterns, 4.0 * math.log(n), gen, n_states, seed))
    return out


def clustered(
    seed: int = 0, *, quick: bool = False, n_states: int = 32, dtype: torch.dtype = torch.float64
) -> list[Case]:
    r"""Correlated patterns: ``K`` unit cluster centres, each pattern a centre plus noise of norm ``spread``.

    Patterns of one cluster are strongly correlated (cosine ≈ 1 − spread²/2), so at moderate β the dense map
    settles on a metastable state (a cluster average) while the sparse map can still separate them.
    """
    configs = [(32, 16, 4, 0.3)] if quick else [(32, 16, 4, 0.3), (256, 64, 8, 0.2)]
    out = []
    for i, (n, d, k, spread) in enumerate(configs):
        gen = _generator(seed, "clustered", i)
        centres = _unit_rows(torch.randn(k, d, generator=gen, dtype=dtype))
        labels = torch.arange(n) % k
        patterns = centres[labels] + spread / math.sqrt(d) * torch.randn(n, d, generator=gen, dtype=dtype)
        out.append(_case("clustered", patterns, 16.0, gen, n_states, seed, clusters=k, spread=spread))
    return out


def near_duplicates(
    seed: int = 0, *, quick: bool = False, n_states: int = 32, dtype: torch.dtype = torch.float64
) -> list[Case]:
    r"""Unit patterns in pairs at distance ``gap`` (1e-3): the hard case where no β separates a pair.

    Fixed points sit between the two members of a pair; the sparse map keeps both in its support.
    """
    configs = [(16, 8, 1e-3)]
    out = []
    for i, (n, d, gap) in enumerate(configs):
        gen = _generator(seed, "near_duplicates", i)
        base = _unit_rows(torch.randn(n // 2, d, generator=gen, dtype=dtype))
        twins = base + gap * _unit_rows(torch.randn(n // 2, d, generator=gen, dtype=dtype))
        patterns = torch.stack([base, twins], dim=1).reshape(n, d)
        out.append(_case("near_duplicates", patterns, 20.0, gen, n_states, seed, gap=gap))
    return out


BETA_SWEEP_QUICK = (0.1, 1.0, 10.0, 100.0, 1000.0)
BETA_SWEEP = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def beta_sweep(
    seed: int = 0,
    *,
    quick: bool = False,
    n_states: int = 32,
    dtype: torch.dtype = torch.float64,
    betas: Sequence[float] | None = None,
) -> list[Case]:
    r"""One memory of 16 unit patterns in d = 8, at β from 0.1 to 1000 (log-spaced).

    At small β the dense map averages (one fixed point near the mean); as β grows past ≈ log N / Δ (Δ the
    gap between a pattern's self-similarity and its largest cross-similarity) it retrieves single
    patterns, and once ``exp(−βΔ)`` falls below the dtype's epsilon its fixed points coincide with the
    sparse map's to rounding: common fixed points appear.
    """
    values = tuple(betas) if betas is not None else (BETA_SWEEP_QUICK if quick else BETA_SWEEP)
    gen = _generator(seed, "beta_sweep", 0)
    patterns = _unit_rows(torch.randn(16, 8, generator=gen, dtype=dtype))
    states = starting_states(patterns, n_states, gen)
    return [
        Case(
            patterns=patterns,
            states=states,
            beta=float(b),
            data={"family": "beta_sweep", "N": 16, "d": 8, "beta": float(b), "seed": seed},
        )
        for b in values
    ]


_BUILDERS: dict[str, Callable[..., list[Case]]] = {
    "gaussian": gaussian,
    "normalised": normalised,
    "clustered": clustered,
    "near_duplicates": near_duplicates,
    "beta_sweep": beta_sweep,
}


def make_family(
    name: str,
    seed: int = 0,
    *,
    quick: bool = False,
    n_states: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> list[Case]:
    """The cases of one synthetic family (see :data:`FAMILIES`), reproducible from ``seed``.

    Parameters
    ----------
    name : str
        One of :data:`FAMILIES`.
    seed : int
        Seed of every random draw.
    quick : bool
        Fewer sizes, fewer β values and fewer states (for ``verify --quick`` and tests).
    n_states : int, optional
        Starting states per case (default 32, or 12 with ``quick``).
    dtype : torch.dtype
        Compute dtype (float64 by default: the checks then measure the mathematics, not float32 rounding).

    Examples
    --------
    >>> cases = make_family("gaussian", seed=0, quick=True)
    >>> [(c.data["N"], c.data["d"]) for c in cases]
    [(2, 2), (16, 8), (1024, 64)]
    """
    if name not in _BUILDERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {name!r}")
    states = n_states if n_states is not None else (12 if quick else 32)
    if states < 1:
        raise ValueError(f"n_states must be >= 1, got {states}")
    return _BUILDERS[name](seed, quick=quick, n_states=states, dtype=dtype)
