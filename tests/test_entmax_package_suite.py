"""The `entmax` package's own tests (``test_root_finding.py``, ``test_mask.py``, ``test_topk.py``, shipped
in its wheel) run against ``hopfield_aa.entmax`` through a thin shim.

The package's test functions are collected here unchanged, with their parametrisations; an autouse
fixture points the names they call at the shim below for the duration of each test:

- ``sparsemax``, ``entmax15``, ``Sparsemax``, ``Entmax15`` (the exact maps; ``k``, the package's top-k
  speed-up of its sort, is accepted and has no effect: our solvers do not sort) → ``entmax(X, 2 | 1.5)``;
- ``sparsemax_bisect``, ``entmax_bisect`` (float or tensor α, with its gradient) → ``entmax(X, α)``;
- ``_sparsemax_threshold_and_support``, ``_entmax_threshold_and_support`` → ``entmax_threshold`` and the
  support size it induces (the package's 1.5 threshold acts on X/2 already: ours of 2X).

Where a test compares an exact map with the bisection (``test_sparsemax``, ``test_entmax15``) only the
exact map is pointed at ours and the package's bisection stays the reference, so the comparison
is not of ours with itself. Out of the documented domain (α ≥ 1): a shim call with α < 1 skips
the test with that reason (``test_entmax_grad`` at α = 0.2, 0.5, 0.75), and the four tests that draw α
as ``0.05 + 2.5 U`` (``test_entmax_correct_multiple_alphas``, ``test_entmax_grad_multiple_alphas``,
``test_arbitrary_dimension[_grad]``) draw U on [0.38, 1) instead, i.e. α on [1.0, 2.55). normmax and
budget have no counterpart in hopfield_aa: their tests run the package alone and are skipped, except
``test_budget``, which checks the package's budget map against our sparsemax.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import pytest
import torch

from hopfield_aa import entmax
from hopfield_aa.normalizers import entmax_threshold

_MODULES = ("entmax.test_root_finding", "entmax.test_mask", "entmax.test_topk")
_suite = {name: importlib.import_module(name) for name in _MODULES}
_root_finding = _suite["entmax.test_root_finding"]

OUT_OF_DOMAIN = "alpha < 1 is outside hopfield_aa's documented domain (alpha >= 1)"
NOT_OURS = "normmax/budget have no counterpart in hopfield_aa: the test exercises the entmax package alone"


def _check_domain(alpha: Any) -> None:
    low = float(alpha.detach().min()) if isinstance(alpha, torch.Tensor) else float(alpha)
    if low < 1.0:
        pytest.skip(OUT_OF_DOMAIN)


def sparsemax(X: torch.Tensor, dim: int = -1, k: int | None = None) -> torch.Tensor:
    return entmax(X, 2.0, dim)


def entmax15(X: torch.Tensor, dim: int = -1, k: int | None = None) -> torch.Tensor:
    return entmax(X, 1.5, dim)


def sparsemax_bisect(X: torch.Tensor, dim: int = -1, n_iter: int = 50, ensure_sum_one: bool = True) -> Any:
    return entmax(X, 2.0, dim)


def entmax_bisect(
    X: torch.Tensor, alpha: Any = 1.5, dim: int = -1, n_iter: int = 50, ensure_sum_one: bool = True
) -> Any:
    _check_domain(alpha)
    return entmax(X, alpha, dim)


class Sparsemax(torch.nn.Module):
    def __init__(self, dim: int = -1, k: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, X: torch.Tensor) -> Any:
        return entmax(X, 2.0, self.dim)


class Entmax15(torch.nn.Module):
    def __init__(self, dim: int = -1, k: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, X: torch.Tensor) -> Any:
        return entmax(X, 1.5, self.dim)


def _support(X: torch.Tensor, tau: torch.Tensor, dim: int) -> torch.Tensor:
    return (X > tau).sum(dim, keepdim=True)


def _sparsemax_threshold_and_support(X: torch.Tensor, dim: int = -1, k: int | None = None) -> Any:
    tau = entmax_threshold(X, 2.0, dim)
    return tau, _support(X, tau, dim)


def _entmax_threshold_and_support(X: torch.Tensor, dim: int = -1, k: int | None = None) -> Any:
    # the package's threshold is on X with p = [X − τ]_+², ours on z with p = [z/2 − τ]_+²: z = 2X
    tau = entmax_threshold(2 * X, 1.5, dim)
    return tau, _support(X, tau, dim)


class _DomainTorch:
    """``torch`` for the test modules, with ``rand`` on [0.38, 1) (α = 0.05 + 2.5 U lands on [1, 2.55))."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def rand(*args: Any, **kwargs: Any) -> torch.Tensor:
        requires_grad = kwargs.pop("requires_grad", False)
        u = 0.38 + 0.62 * torch.rand(*args, **kwargs)
        return u.requires_grad_(requires_grad)


_SHIM = {
    "sparsemax": sparsemax,
    "entmax15": entmax15,
    "Sparsemax": Sparsemax,
    "Entmax15": Entmax15,
    "sparsemax_bisect": sparsemax_bisect,
    "entmax_bisect": entmax_bisect,
    "_sparsemax_threshold_and_support": _sparsemax_threshold_and_support,
    "_entmax_threshold_and_support": _entmax_threshold_and_support,
}
# tests comparing an exact map with the package's bisection: the bisection stays the package's
_REFERENCE_BISECT = {"test_sparsemax", "test_entmax15"}
_RANDOM_ALPHA = {
    "test_entmax_correct_multiple_alphas",
    "test_entmax_grad_multiple_alphas",
    "test_arbitrary_dimension",
    "test_arbitrary_dimension_grad",
}
_NOT_OURS = {
    "test_normmax",
    "test_normmax_grad",
    "test_budget_grad",
    "test_normmax_grad_multiple_alphas",
    "test_budget_grad_multiple_k",
}


@pytest.fixture(autouse=True)
def _point_package_tests_at_hopfield_aa(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = request.node.originalname
    if name in _NOT_OURS:
        pytest.skip(NOT_OURS)
    for module in _suite.values():
        for attr, shim in _SHIM.items():
            if name in _REFERENCE_BISECT and attr.endswith("_bisect"):
                continue
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, shim)
        if name in _RANDOM_ALPHA:
            monkeypatch.setattr(module, "torch", _DomainTorch())


# the package's test functions, collected here with their parametrisations
for _module in _suite.values():
    for _name in dir(_module):
        if _name.startswith("test_"):
            globals()[_name] = getattr(_module, _name)


def test_the_shim_reaches_hopfield_aa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The package's functions, as the collected tests see them, are the shim (calls reach our entmax)."""
    assert _root_finding.entmax_bisect is entmax_bisect
    calls: list[Any] = []
    ours = entmax
    monkeypatch.setattr(sys.modules[__name__], "entmax", lambda *a: calls.append(a) or ours(*a))
    _root_finding.entmax_bisect(torch.tensor([0.0, 1.0]), 1.25)
    assert len(calls) == 1


def test_out_of_domain_alpha_is_rejected_by_hopfield_aa() -> None:
    """What the skipped α < 1 cases would meet: a named ValueError, not a result."""
    with pytest.raises(ValueError, match="alpha"):
        entmax(torch.zeros(2, 3), torch.tensor([[0.5], [1.5]]))
