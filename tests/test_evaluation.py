"""The guidance evaluation on a tiny randomly initialised reference pipeline: same prompts and noise for
every method, the η calibration, the verdict logic, and a complete report written to disk."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hopfield_aa.evaluation.evaluate import (
    FAMILIES,
    Method,
    calibrate_eta,
    default_methods,
    evaluate,
    evaluation_prompts,
    guidance_magnitude,
    initial_noise,
    matched_cfg_scale,
    sample,
)
from hopfield_aa.evaluation.report import Comparison, markdown_report, write_figures
from hopfield_aa.guidance import RULES, GuidanceConfig, guidance_handle
from hopfield_aa.reference.dataset import parse_caption
from hopfield_aa.reference.metrics import Estimate
from hopfield_aa.reference.pipeline import load_pipeline


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tiny_reference_folder):
    return load_pipeline(tiny_reference_folder)


def test_evaluation_prompts_are_seeded_half_single_half_pair():
    prompts = evaluation_prompts(10, seed=3)
    assert prompts == evaluation_prompts(10, seed=3)
    assert prompts != evaluation_prompts(10, seed=4)
    counts = [parse_caption(p)["count"] for p in prompts]
    assert counts.count(1) == 5 and counts.count(2) == 5
    assert len(set(prompts)) == 10
    with pytest.raises(ValueError, match="n_prompts"):
        evaluation_prompts(1)


def test_heldout_prompts_are_all_unseen_combinations_covering_each_one_evenly():
    """Every held-out prompt contains a colour-shape combination never seen in training; the 16 held-out
    single-object combinations are used in turn (each once per round) when more prompts are asked for."""
    from collections import Counter

    from hopfield_aa.reference.dataset import caption_combinations, split_of

    prompts = evaluation_prompts(64, split="heldout")
    assert len(prompts) == 64 and all(split_of(parse_caption(p)) == "heldout" for p in prompts)
    assert all(split_of(parse_caption(p)) == "train" for p in evaluation_prompts(64))
    single = Counter(p for p in prompts if parse_caption(p)["count"] == 1)
    assert len(single) == len(caption_combinations("heldout", "single")) == 16
    assert set(single.values()) == {2}  # 32 single-object prompts: every combination twice
    pair = [p for p in prompts if parse_caption(p)["count"] == 2]
    assert len(pair) == 32 and len(set(pair)) == 32  # 68 pair combinations: drawn without replacement
    with pytest.raises(ValueError, match="split"):
        evaluation_prompts(8, split="test")


def test_initial_noise_is_seed_major_and_reproducible(pipe):
    noise = initial_noise(pipe, 3, [5, 7])
    assert noise.shape == (6, 4, 8, 8)
    torch.testing.assert_close(noise[:3], torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(noise[3:], torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7)))


def test_sampling_uses_the_given_noise_and_restores_the_pipeline(pipe):
    captions = evaluation_prompts(4)
    latents = initial_noise(pipe, 4, [0])
    none = Method("none", "none", 0.0)
    gag = Method("gag", "gag", 2.0, guidance=GuidanceConfig(scale=2.0))
    first = sample(pipe, none, captions, latents, steps=2, batch_size=3)
    guided = sample(pipe, gag, captions, latents, steps=2)
    again = sample(pipe, none, captions, latents, steps=2, batch_size=3)
    assert first.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(first, again)  # guidance left nothing behind
    assert np.abs(guided - first).max() > 1e-4
    assert guidance_handle(pipe) is None


def test_calibrated_eta_is_a_positive_norm_and_the_probe_rule_is_removed(pipe):
    eta = calibrate_eta(pipe, evaluation_prompts(2), initial_noise(pipe, 2, [0]), steps=2)
    assert math.isfinite(eta) and eta > 0
    assert "_calibrate_eta" not in RULES


def test_default_methods_cover_every_family_with_unique_names():
    methods = default_methods(0.1, cfg_scale=2.5)
    assert {m.family for m in methods} == set(FAMILIES) - {"cfg_matched"}
    assert len({m.name for m in methods}) == len(methods)
    assert {m.cfg_scale for m in methods if m.family == "cfg"} == {1.5, 2.0, 2.5, 3.0, 5.0, 7.5}
    capped = [m for m in methods if m.family.startswith("gag_capped")]
    assert all(m.guidance is not None and m.guidance.options["eta"] == 0.1 for m in capped)
    orthogonal = [m for m in methods if m.family == "orthogonal"]
    assert all(m.guidance.options == {"zeta": 1.0, "eta": 0.0, "reference": "sparse"} for m in orthogonal)
    on_cfg = [m for m in methods if m.family.endswith("_cfg") or m.guider]
    assert on_cfg and all(m.cfg_scale == 2.5 for m in on_cfg)
    assert {m.guider for m in methods if m.guider} == {"PAG", "SEG", "APG"}
    # every rule is swept both without CFG and on top of it, over the same λ values
    for family in ("extrapolate", "gag", "gag_capped", "orthogonal", "ladder"):
        plain = sorted(m.value for m in methods if m.family == family)
        assert plain and plain == sorted(m.value for m in methods if m.family == f"{family}_cfg")
    quick = default_methods(0.1, quick=True)
    assert len(quick) < len(methods) and {"none", "cfg", "gag", "pag"} <= {m.family for m in quick}


def test_a_peer_guider_method_samples_through_the_guider_loop(pipe):
    captions = evaluation_prompts(2)
    latents = initial_noise(pipe, 2, [0])
    cfg = sample(pipe, Method("CFG s=3", "cfg", 3.0, cfg_scale=3.0), captions, latents, steps=2)
    pag = sample(
        pipe, Method("PAG + CFG s=3", "pag", 3.0, cfg_scale=3.0, guider="PAG"), captions, latents, steps=2
    )
    assert pag.shape == cfg.shape and np.abs(pag - cfg).max() > 1e-5


def test_guidance_magnitude_of_cfg_grows_linearly_with_the_scale(pipe):
    captions = evaluation_prompts(2)
    latents = initial_noise(pipe, 2, [0])
    none = guidance_magnitude(pipe, Method("none", "none", 0.0), captions, latents, steps=1)
    m2 = guidance_magnitude(pipe, Method("CFG s=2", "cfg", 2.0, cfg_scale=2.0), captions, latents, steps=1)
    m3 = guidance_magnitude(pipe, Method("CFG s=3", "cfg", 3.0, cfg_scale=3.0), captions, latents, steps=1)
    assert none < 1e-5  # no guidance hands the scheduler the stock conditional prediction
    assert m3 == pytest.approx(2 * m2, rel=1e-3)  # one step: same state, (s - 1) times the CFG direction
    assert pipe.scheduler.step.__func__ is type(pipe.scheduler).step  # the wrapper is gone


def test_matched_cfg_scale_interpolates_and_extrapolates():
    cfg = {2.0: 0.1, 3.0: 0.2, 5.0: 0.4}
    assert matched_cfg_scale(0.0, cfg) == 1.0
    assert matched_cfg_scale(0.15, cfg) == 2.5
    assert matched_cfg_scale(0.6, cfg) == 7.0
    assert matched_cfg_scale(0.05, cfg) == 1.5


def test_a_calibrated_evaluation_pairs_every_rule_with_cfg_of_equal_magnitude(pipe):
    n_prompts, seeds = 2, [0]
    captions = evaluation_prompts(n_prompts)
    methods = [
        Method("none", "none", 0.0),
        Method("CFG s=2", "cfg", 2.0, cfg_scale=2.0),
        Method("CFG s=3", "cfg", 3.0, cfg_scale=3.0),
        Method("GAG ζ=0 λ=1", "gag", 1.0, guidance=GuidanceConfig(scale=1.0)),
    ]
    ev = evaluate(
        pipe,
        methods,
        captions,
        n_prompts=n_prompts,
        seeds=seeds,
        steps=2,
        progress=False,
        real_per_caption=2,
        calibration_samples=2,
    )
    matched = ev.matched["GAG ζ=0 λ=1"]
    assert set(ev.magnitudes) == {"CFG s=2", "CFG s=3", "GAG ζ=0 λ=1", matched}
    assert matched in {r.method.name for r in ev.results}
    # the matched CFG scale reproduces the rule's magnitude up to the 0.05 rounding of the scale
    assert ev.magnitudes[matched] == pytest.approx(ev.magnitudes["GAG ζ=0 λ=1"], rel=0.25)
    ev.n_resamples = 20
    assert "calibrated" in markdown_report(ev)


@pytest.mark.parametrize(
    ("accuracy", "fd", "verdict"),
    [
        ((0.1, 0.02, 0.2), (0.0, -1.0, 1.0), "better"),
        ((0.0, -0.1, 0.1), (-2.0, -3.0, -1.0), "better"),
        ((-0.1, -0.2, -0.01), (0.0, -1.0, 1.0), "worse"),
        ((0.1, 0.02, 0.2), (2.0, 1.0, 3.0), "mixed"),
        ((0.0, -0.1, 0.1), (0.0, -1.0, 1.0), "no resolved difference"),
    ],
)
def test_a_comparison_is_resolved_only_when_an_interval_excludes_zero(accuracy, fd, verdict):
    assert Comparison("a", "b", Estimate(*accuracy), Estimate(*fd)).verdict == verdict


def test_a_quick_evaluation_writes_tables_claims_and_figures(pipe, tmp_path):
    n_prompts, seeds = 4, [0, 1]
    prompts = evaluation_prompts(n_prompts)
    captions = [c for _ in seeds for c in prompts]
    methods = default_methods(0.05, quick=True)
    ev = evaluate(
        pipe,
        methods,
        captions,
        n_prompts=n_prompts,
        seeds=seeds,
        steps=2,
        eta=0.05,
        progress=False,
        real_per_caption=2,
    )
    ev.n_resamples = 40
    data = ev.to_json()
    assert [m["name"] for m in data["methods"]] == [m.name for m in methods]
    for entry in data["methods"]:
        low, value, high = entry["whole"][1], entry["whole"][0], entry["whole"][2]
        assert 0.0 <= low <= value <= high <= 1.0
        assert entry["fd"][0] >= 0.0
    json.dumps(data)
    figures = write_figures(ev, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in figures)
    text = markdown_report(ev, figures={p.stem: p.name for p in figures})
    for heading in (
        "Alignment and quality per method",
        "Ordering of ζ = 0",
        "The λ curve",
        "On top of CFG",
        "Against CFG of the same strength",
    ):
        assert heading in text
    assert all(m.name in text for m in methods)
    # the report says under what load its time column was taken
    assert len(data["load_average"]) == 2 and "load average" in text


def test_a_baseline_at_the_accuracy_ceiling_is_named_as_one_that_only_harm_can_be_measured_against():
    from types import SimpleNamespace

    from hopfield_aa.evaluation.report import _ceiling_note

    def result(whole: list[float]) -> SimpleNamespace:
        return SimpleNamespace(alignment=SimpleNamespace(whole=np.array(whole)))

    table = {"CFG s=3": result([1.0] * 100), "CFG s=1.5": result([1.0] * 90 + [0.0] * 10)}
    ev = SimpleNamespace(result=table.__getitem__)
    note = _ceiling_note(ev, {"CFG s=3", "CFG s=1.5"})
    assert "CFG s=3 (1.000)" in note and "CFG s=1.5" not in note and "harm, not benefit" in note
    assert _ceiling_note(ev, {"CFG s=1.5"}) == ""
