"""Guided attention from query, key and value tensors: the dense and sparse retrievals from one score
matrix, the rule applied per head and query token, and the text-key block of joint (MMDiT) attention.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hopfield_aa.guidance import fused
from hopfield_aa.guidance.rules import RowRule
from hopfield_aa.normalizers import entmax_tensor

Combine = Callable[[Sequence[torch.Tensor]], torch.Tensor]
"""The configured rule: retrievals (dense first) -> guided output, per head and query token."""

ALL_ROWS = slice(None)


def _mask_block(mask: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    """``mask[..., rows, cols]`` for a mask broadcastable to (batch, heads, queries, keys) as float32."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, -torch.inf)
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    row_index = rows if mask.shape[-2] > 1 else ALL_ROWS
    return mask[..., row_index, cols].float()


def retrievals(
    scores: torch.Tensor,
    value: torch.Tensor,
    alphas: Sequence[float | torch.Tensor],
    dense: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    r"""The retrievals :math:`\mathrm{entmax}_{\alpha_i}(Z)\,V` for an α ladder (α_0 = 1: softmax).

    The sparse rungs come first and each probability matrix is dropped once it has been applied to
    ``V``, so at most two score-sized buffers are alive at once: ``scores`` and one rung's probabilities.

    Parameters
    ----------
    scores : tensor, shape (batch, heads, queries, keys)
        ``β Q Kᵀ`` plus any additive mask (``-inf`` for masked keys).
    value : tensor, shape (batch, heads, keys, d)
    alphas : sequence of float or tensor
        The ladder, ``alphas[0] == 1``; an entry may be a tensor of shape (heads, 1, 1): one α per head.
    dense : tensor, shape (batch, heads, queries, d), optional
        The α = 1 retrieval when already computed.

    Returns
    -------
    list of tensors of shape (batch, heads, queries, d), one per α.
    """
    sparse = [entmax_tensor(scores, _on(alpha, scores), -1) @ value for alpha in alphas[1:]]
    if dense is None:
        dense = entmax_tensor(scores, 1.0, -1) @ value  # softmax (native on short CPU rows)
    return [dense, *sparse]


def _on(alpha: float | torch.Tensor, scores: torch.Tensor) -> float | torch.Tensor:
    """α as the scores' kernel takes it: a float, or a per-head tensor on their device and dtype."""
    if isinstance(alpha, torch.Tensor):
        return alpha.to(device=scores.device, dtype=scores.dtype)
    return alpha


def guided_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    combine: Combine,
    alphas: Sequence[float | torch.Tensor],
    *,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    rows: slice = ALL_ROWS,
    compiled: bool = False,
    row_rule: RowRule | None = None,
) -> torch.Tensor:
    r"""Attention whose output is a guidance rule of its dense and sparse retrievals.

    With scores :math:`Z = \beta Q K^\top + M`, computed once, the retrievals
    :math:`Y_i = \mathrm{entmax}_{\alpha_i}(Z) V` (α_0 = 1: softmax) are normalised from that one matrix
    and the output for the batch rows ``rows`` is ``combine([Y_0, Y_1, …])`` (per head and query token),
    computed in float32 and cast back to ``query``'s dtype. Other rows get the stock attention
    (``F.scaled_dot_product_attention`` in ``query``'s dtype, as the stock processor computes it).
    A call keeps at most two score-sized buffers alive: ``Z`` and one rung's probabilities (plus
    α-entmax's buffers of one row block and tensors of the output's size; ``tests/test_guidance.py``).

    Parameters
    ----------
    query : tensor, shape (batch, heads, queries, d)
    key, value : tensors, shape (batch, heads, keys, d)
    combine : callable
        The configured rule.
    alphas : sequence of float
        The α ladder the rule reads, dense first.
    scale : float
        β (``1/sqrt(d)`` in the stock processors).
    attention_mask : tensor, optional
        Additive (or boolean: True attends) mask broadcastable to (batch, heads, queries, keys).
    rows : slice
        The batch rows the rule acts on (all by default; the conditional half of a CFG batch).
    compiled : bool, default False
        Run the guided part as one ``torch.compile``'d function (see :class:`~.api.GuidanceConfig`'s
        ``compile``); the eager path if compilation fails (warned once).
    row_rule : RowRule, optional
        ``combine``'s row form, where it has one (:func:`.rules.row_rule`: GAG, extrapolation): the fused
        kernel then computes the rule itself, in the call that computes the retrievals
        (:func:`.fused.guided`), and ``combine`` is not called. It must be the same rule.

    Returns
    -------
    tensor, shape (batch, heads, queries, d), dtype of ``query``.
    """
    mask = _mask_block(attention_mask, ALL_ROWS, ALL_ROWS)
    guided = _compiled_guided if compiled else _guided
    if rows == ALL_ROWS or rows == slice(0, query.shape[0]):
        return guided(query, key, value, combine, alphas, scale, mask, row_rule).to(query.dtype)
    # the other rows: the stock kernel, as the stock processor computes them
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale
    )
    if mask is not None and mask.shape[0] > 1:
        mask = mask[rows]
    output[rows] = guided(query[rows], key[rows], value[rows], combine, alphas, scale, mask, row_rule).to(
        output.dtype
    )
    return output


_compiled: dict[str, Any] = {}  # the torch.compile'd _guided, built on first use


def _compiled_guided(*args: Any) -> torch.Tensor:
    """:func:`_guided` through ``torch.compile``; :func:`_guided` itself once compiling has failed.

    Under compilation α = 1.5 and 2 take certified support passes, with the sort kernel as a
    ``torch.cond`` branch run only when some row is not certified (:func:`.normalizers.blocked._in_graph`);
    shapes become symbolic once a second shape is seen (torch.compile's automatic dynamic shapes)."""
    if _compiled.get("failed"):
        return _guided(*args)
    if "guided" not in _compiled:
        _compiled["guided"] = torch.compile(_guided, dynamic=None)
    try:
        out: torch.Tensor = _compiled["guided"](*args)
        return out
    except Exception as error:  # the compiler's failures are not one exception type
        _compiled["failed"] = True
        warnings.warn(
            f"torch.compile of guided attention failed ({type(error).__name__}: {error}); "
            "using the eager path",
            RuntimeWarning,
            stacklevel=2,
        )
        return _guided(*args)


def _guided(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    combine: Combine,
    alphas: Sequence[float | torch.Tensor],
    scale: float,
    mask: torch.Tensor | None,
    row_rule: RowRule | None = None,
) -> torch.Tensor:
    """The rule of the retrievals from one float32 score matrix, ``mask`` additive float32 (4-d) or None.

    Where it applies (float32 on CPU, the ladder (1, 1.5) or (1, 2), no mask) one native call computes
    both retrievals without storing the scores, and with ``row_rule`` the rule too
    (:mod:`.fused`). Otherwise ``.float()`` returns a float32 tensor itself (no copy), and β scales the
    keys (keys × d entries) rather than the scores (queries × keys).
    """
    # each declines exactly where the other would (same premise, same scores): one kernel call at most
    if row_rule is not None:
        output = fused.guided(query, key, value, alphas, scale, mask, row_rule)
        if output is not None:
            return output
    else:
        outputs = fused.retrievals(query, key, value, alphas, scale, mask)
        if outputs is not None:
            return combine(outputs)
    scores = query.float() @ (key.float() * scale).transpose(-1, -2)
    if mask is not None:
        scores = scores.add_(mask)
    outputs = retrievals(scores, value.float(), alphas)
    del scores  # not alive while the rule runs: its temporaries are the call's peak
    return combine(outputs)


def guided_joint_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    combine: Combine,
    alphas: Sequence[float | torch.Tensor],
    *,
    image: slice,
    text: slice,
    attention_mask: torch.Tensor | None = None,
    rows: slice = ALL_ROWS,
) -> torch.Tensor:
    r"""Joint (MMDiT) attention with the rule on the image-query → text-key retrieval only.

    For an image query with joint scores ``z = [z_img, z_txt]`` (``β = 1/sqrt(d)``), the stock softmax
    splits into two blocks,

    .. math:: O = \underbrace{\textstyle\sum_{j\in\text{img}} p_j v_j}_{\text{image block}}
              + m\, D_{\text{txt}}, \qquad m = \textstyle\sum_{j\in\text{txt}} p_j,\quad
              D_{\text{txt}} = \mathrm{softmax}(z_{\text{txt}}) V_{\text{txt}},

    where ``m`` is the text block's share of the joint mass and ``D_txt`` its normalised (dense) retrieval.
    The rule replaces ``D_txt`` by ``G_txt = combine([D_txt, entmax_α(z_txt) V_txt, …])`` and keeps the
    block's original mass:

    .. math:: O' = O + m\,(G_{\text{txt}} - D_{\text{txt}}).

    So image→image attention weights, the text block's total weight and the text-query rows (the text
    stream) are exactly the stock ones; only the direction of the text retrieval changes, renormalised
    within the text block (entmax acts on the text scores alone, so the sparse retrieval is a convex
    combination of text values, like ``D_txt``). ``O`` and ``m`` come from one stock attention call on
    ``[V, 1_txt]`` (values with an indicator column of the text keys appended); the rule is computed in
    float32.

    Parameters
    ----------
    query, key, value : tensors, shape (batch, heads, tokens, d)
        The joint sequence (image and text tokens in the model's order).
    combine, alphas
        The configured rule and its α ladder.
    image, text : slice
        Positions of the image and text tokens in the joint sequence.
    attention_mask : tensor, optional
        As for ``F.scaled_dot_product_attention`` (broadcastable to (batch, heads, tokens, tokens)).
    rows : slice
        Batch rows the rule acts on.

    Returns
    -------
    tensor, shape (batch, heads, tokens, d), dtype of ``query``.
    """
    indicator = torch.zeros((*value.shape[:-1], 1), dtype=value.dtype, device=value.device)
    indicator[..., text, :] = 1
    joint = F.scaled_dot_product_attention(
        query,
        key,
        torch.cat([value, indicator], dim=-1),
        attn_mask=attention_mask,
        dropout_p=0.0,
        is_causal=False,
    )
    output, text_mass = joint[..., :-1], joint[..., -1:]
    q_img = query[rows, :, image].float()
    k_txt, v_txt = key[rows, :, text].float(), value[rows, :, text].float()
    scores = q_img @ (k_txt * query.shape[-1] ** -0.5).transpose(-1, -2)
    mask = _mask_block(attention_mask, image, text)
    if mask is not None:
        scores = scores + (mask[rows] if mask.shape[0] > 1 else mask)
    text_retrievals = retrievals(scores, v_txt, alphas)
    correction = text_mass[rows, :, image].float() * (combine(text_retrievals) - text_retrievals[0])
    output = output.clone()
    output[rows, :, image] = (output[rows, :, image].float() + correction).to(output.dtype)
    return output
