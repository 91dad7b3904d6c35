"""Measuring guidance on the reference model: every rule and peer method on the same prompts and noise,
exact text alignment and Fréchet distance with bootstrap intervals, the report and its figures.

This layer sits above :mod:`hopfield_aa.guidance` (the rules as diffusers processors) and
:mod:`hopfield_aa.reference` (the model and its metrics); neither of those imports it.
"""

from __future__ import annotations

from hopfield_aa.evaluation.evaluate import (
    FAMILIES,
    Evaluation,
    Method,
    MethodResult,
    calibrate_eta,
    default_methods,
    evaluate,
    evaluation_prompts,
    initial_noise,
    real_renders,
    sample,
)
from hopfield_aa.evaluation.report import evaluate_and_report, markdown_report, write_figures

__all__ = [
    "FAMILIES",
    "Evaluation",
    "Method",
    "MethodResult",
    "calibrate_eta",
    "default_methods",
    "evaluate",
    "evaluate_and_report",
    "evaluation_prompts",
    "initial_noise",
    "markdown_report",
    "real_renders",
    "sample",
    "write_figures",
]
