"""The diffusers side of robustness: guidance with half-precision weights, attention masks, a batch of one and
CFG batches, and a forward interrupted by an exception, after which the stock processors are back in place."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from hopfield_aa.guidance import disable_gag, enable_gag, gag_guidance, guidance_handle
from hopfield_aa.reference.pipeline import generate, initial_latents, load_pipeline
from tests import test_guidance as base
from tests.test_guidance import RULE_CASES, RULE_IDS, run, unet_inputs

# the tiny UNet and the one-thread setting of the guidance tests, as fixtures of this module too
unet, one_thread = base.unet, base.one_thread

PROMPTS = ["a small red circle at the top", "a red circle above a blue square"]


def _interrupt_inside(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Make the model's mid block raise ``error``: after the down blocks' guided attention has run."""

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(model.mid_block, "forward", boom)


@pytest.mark.parametrize(("rule", "kwargs"), RULE_CASES, ids=RULE_IDS)
def test_masked_text_tokens_guide_exactly_as_if_they_were_removed(unet, rule, kwargs):
    """A key the mask hides gets weight 0 from softmax and from entmax alike, so masking the last text tokens
    and deleting them give the same guided output (the rule only sees the two retrievals)."""
    if rule == "ladder":  # unregularised, the ladder amplifies input rounding: see the test below
        kwargs = {**kwargs, "regularization": 1e-2}
    inputs = unet_inputs()
    keep = 3
    mask = torch.zeros(2, 5)
    mask[:, :keep] = 1.0
    with gag_guidance(unet, rule, **kwargs):
        masked = run(unet, {**inputs, "encoder_attention_mask": mask})
        removed = run(unet, {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][:, :keep]})
        unmasked = run(unet, inputs)
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked, removed, rtol=1e-5, atol=1e-5)
    assert (masked - unmasked).abs().max() > 1e-4  # the mask did act


@pytest.mark.parametrize("native", [True, False])
def test_the_unregularised_ladder_amplifies_one_ulp_of_softmax_rounding_ten_thousandfold(
    unet, native, monkeypatch
):
    """Masking instead of deleting text tokens changes the dense retrieval by one float32 ulp (6e-8
    relative). The ladder's Anderson least squares over nearly collinear rungs (γ ≈ 10 here) turns that
    into a change of more than 0.1 % of the guidance effect (0.3 % with the native CPU kernels, whose least
    squares run in float64; 4 % with the tensor forms in float32); Tikhonov regularisation (the rule's
    ``regularization``) bounds it below 0.01 % either way. This is the rule's conditioning, documented in
    its docstring, not a masking error."""
    from hopfield_aa import _jit

    monkeypatch.setattr(_jit, "_enabled", native)
    inputs = unet_inputs()
    mask = torch.zeros(2, 5)
    mask[:, :3] = 1.0
    stock = run(unet, inputs)
    gaps, effects = {}, {}
    for reg in (0.0, 1e-2):
        with gag_guidance(unet, "ladder", scale=2.0, regularization=reg):
            masked = run(unet, {**inputs, "encoder_attention_mask": mask})
            removed = run(unet, {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][:, :3]})
            effects[reg] = float((run(unet, inputs) - stock).abs().max())
        gaps[reg] = float((masked - removed).abs().max())
    assert gaps[0.0] > 1e-3 * effects[0.0]  # more than 0.1 % of the guidance effect: > 1e4 ulp
    assert gaps[1e-2] < 1e-4 * effects[1e-2]
    assert gaps[1e-2] * 30 < gaps[0.0]


def test_a_boolean_style_mask_that_hides_every_token_but_one_stays_finite(unet):
    """One visible key: softmax and entmax both put all their mass on it, so r = S − D = 0 and the guided
    output equals the stock one (GAG adds nothing when the two retrievals agree)."""
    inputs = unet_inputs()
    mask = torch.zeros(2, 5)
    mask[:, 0] = 1.0
    stock = run(unet, {**inputs, "encoder_attention_mask": mask})
    with gag_guidance(unet, "gag", scale=3.0):
        guided = run(unet, {**inputs, "encoder_attention_mask": mask})
    assert torch.isfinite(guided).all()
    torch.testing.assert_close(guided, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("apply_to", ["both", "cond"])
def test_a_batch_of_one_is_guided_like_the_same_row_inside_a_batch(unet, apply_to):
    """Guidance acts per sample: a sample's output does not depend on the batch it is computed in (an odd
    batch, or a batch whose halves differ, is never taken for a CFG batch)."""
    inputs = unet_inputs(batch=2)
    one = {k: (v[:1] if k != "timestep" else v) for k, v in inputs.items()}
    with gag_guidance(unet, "gag", scale=2.0, apply_to=apply_to):
        single = run(unet, one)
        batched = run(unet, inputs)
    torch.testing.assert_close(single, batched[:1], rtol=1e-5, atol=1e-5)


def test_an_exception_inside_the_forward_leaves_the_stock_processors_after_the_with_block(unet, monkeypatch):
    before = dict(unet.attn_processors)
    inputs = unet_inputs()
    stock = run(unet, inputs)
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with monkeypatch.context() as patch:
            _interrupt_inside(unet, patch, error)
            with pytest.raises(type(error)), gag_guidance(unet, "gag", scale=2.0):
                run(unet, inputs)
        after = dict(unet.attn_processors)
        assert all(after[name] is before[name] for name in before)
        assert guidance_handle(unet) is None
    assert torch.equal(run(unet, inputs), stock)


def test_an_enabled_handle_survives_an_interrupted_forward_with_no_stale_state(unet, monkeypatch):
    """``enable_gag`` stays on across an exception (the user disables it); the next call must guide exactly
    like a fresh handle, with the step window counting from the start of the new run."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)
    inputs = unet_inputs()

    def sample_run() -> list[torch.Tensor]:
        return [run(unet, {**inputs, "timestep": t}) for t in scheduler.timesteps]

    with gag_guidance(unet, "gag", scale=2.0, steps=(0.0, 0.5), scheduler=scheduler):
        fresh = sample_run()
    handle = enable_gag(unet, "gag", scale=2.0, steps=(0.0, 0.5), scheduler=scheduler)
    try:
        run(unet, {**inputs, "timestep": scheduler.timesteps[0]})
        run(unet, {**inputs, "timestep": scheduler.timesteps[1]})
        with monkeypatch.context() as patch:
            _interrupt_inside(unet, patch, RuntimeError("boom"))
            with pytest.raises(RuntimeError, match="boom"):
                run(unet, {**inputs, "timestep": scheduler.timesteps[2]})
        assert guidance_handle(unet) is handle and handle.enabled
        again = sample_run()
    finally:
        assert disable_gag(unet) is True
    for a, b in zip(again, fresh, strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def half_pipe(tiny_reference_folder):
    """The reference pipeline with its UNet and VAE in float16, as shipped (the CPU runs them in float16)."""
    pipe = load_pipeline(tiny_reference_folder, dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    return pipe


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0], ids=["batch-of-one", "cfg"])
def test_float16_pipeline_with_gag_gives_finite_images_and_restores_its_processors(half_pipe, guidance_scale):
    """End to end on a float16 pipeline: one prompt with no CFG (a UNet batch of one), and two prompts with
    CFG (the [uncond, cond] batch); GAG is computed in float32 inside and the images are finite."""
    prompts = PROMPTS[:1] if guidance_scale == 1.0 else PROMPTS
    latents = initial_latents(half_pipe, range(len(prompts)))
    before = dict(half_pipe.unet.attn_processors)
    stock = generate(half_pipe, prompts, latents, num_inference_steps=3, guidance_scale=guidance_scale)
    for apply_to in ("both", "cond"):
        with gag_guidance(half_pipe, "gag", scale=2.0, apply_to=apply_to):
            guided = generate(
                half_pipe, prompts, latents, num_inference_steps=3, guidance_scale=guidance_scale
            )
        assert guided.shape == stock.shape and np.isfinite(guided).all()
        assert np.abs(guided - stock).max() > 1e-3
    after = dict(half_pipe.unet.attn_processors)
    assert all(after[name] is before[name] for name in before)
    np.testing.assert_array_equal(
        generate(half_pipe, prompts, latents, num_inference_steps=3, guidance_scale=guidance_scale), stock
    )


@pytest.mark.slow
@pytest.mark.parametrize(("rule", "kwargs"), [("gag", {}), ("extrapolate", {}), ("gag", {"eta": 0.3})])
def test_compiled_guided_attention_computes_the_eager_output(unet, rule, kwargs):
    """``compile=True`` runs the same guided attention through torch.compile: with masks or without, the
    UNet's guided output equals the eager one to float32 rounding (compiles at first use: slow)."""
    inputs = unet_inputs()
    mask = torch.zeros(2, 5)
    mask[:, :3] = 1.0
    for extra in ({}, {"encoder_attention_mask": mask}):
        with gag_guidance(unet, rule, **kwargs):
            eager = run(unet, {**inputs, **extra})
        with gag_guidance(unet, rule, compile=True, **kwargs):
            compiled = run(unet, {**inputs, **extra})
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
        assert not torch.equal(eager, run(unet, {**inputs, **extra}))  # guidance did act
    from hopfield_aa.guidance import attention

    assert not attention._compiled.get("failed")  # a silent fallback to eager would make this vacuous


def test_a_failing_compiler_warns_once_and_the_eager_path_guides(unet, monkeypatch):
    """If torch.compile fails, compile=True warns once and guides exactly as the eager path does."""
    from hopfield_aa.guidance import attention

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no compiler here")

        return call

    monkeypatch.setattr(attention, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    inputs = unet_inputs()
    with gag_guidance(unet, "gag"):
        eager = run(unet, inputs)
    warned = pytest.warns(RuntimeWarning, match="no compiler here")
    with gag_guidance(unet, "gag", compile=True), warned as seen:
        first = run(unet, inputs)
        second = run(unet, inputs)
    assert len([w for w in seen if "torch.compile" in str(w.message)]) == 1
    assert torch.equal(first, eager) and torch.equal(second, eager)
    with pytest.raises(TypeError, match="compile"):
        enable_gag(unet, "gag", compile="yes")


def _analysis_script(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """analysis/<name>.py imported as a module, with its sibling _bench importable as when run as a
    script."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "analysis" / f"{name}.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_prepared_gpu_benchmark_runs_end_to_end_on_a_cpu(tmp_path, monkeypatch) -> None:
    """analysis/bench_gpu.py (the one-shot run for a lent GPU) on a CPU with --quick: every section is
    written (entmax against softmax and the package, guided attention against SDPA, Anderson), so a GPU
    session only has to run it."""
    module = _analysis_script("bench_gpu", monkeypatch)
    out = tmp_path / "bench_gpu.md"
    # a loaded test machine would have the table refused: write it (marked) without waiting for quiet
    args = ["--device", "cpu", "--quick", "--out", str(out), "--wait-quiet", "0", "--allow-load"]
    assert module.main(args) == 0
    text = out.read_text(encoding="utf-8")
    for heading in ("### α-entmax forward, float32", "### Guided attention", "### Anderson acceleration"):
        assert heading in text
    assert "load average (1/5/15 min) before" in text
    assert "Rows converged at β = 7.5, m = 5: 32/32." in text


@pytest.mark.slow
def test_the_overhead_benchmark_repeats_its_sampling_table_in_other_processes(tmp_path, monkeypatch) -> None:
    """analysis/bench_guidance_overhead.py --processes 2 (quick, sampling table only): the second process's
    ratios come back and the table lists every configuration's ratio of best times per process and their
    median."""
    module = _analysis_script("bench_guidance_overhead", monkeypatch)
    out = tmp_path / "overhead.md"
    args = ["--quick", "--sampling-only", "--processes", "2", "--out", str(out), "--wait-quiet", "0"]
    assert module.main([*args, "--allow-load"]) == 0
    text = out.read_text(encoding="utf-8")
    assert "### Across 2 processes" in text and "| process 1 | process 2 | median |" in text
    row = next(line for line in text.splitlines() if line.startswith("| GAG ζ=0 (default) @ batch 1 |"))
    values = [float(v) for v in row.strip("|").split("|")[1:]]
    assert len(values) == 3 and all(v > 0 for v in values)
    assert values[2] == pytest.approx((values[0] + values[1]) / 2, abs=1e-3)  # the median of two


def test_an_overhead_target_is_met_only_where_every_process_meets_it(monkeypatch) -> None:
    """bench_guidance_overhead.verdicts: met where every process's ratio is within the target at every
    batch, not met where at some batch every process is over it, undecided where the processes fall on
    both sides; each line gives the median and the range."""
    module = _analysis_script("bench_guidance_overhead", monkeypatch)
    ratios = {  # per target: (batch 1, batch 16) ratios of three processes
        "GAG ζ=0 (default)": ((1.07, 1.09, 1.06), (1.035, 1.064, 1.064)),  # straddles 1.05 at batch 16
        "extrapolate λ=2": ((1.07, 1.08, 1.06), (1.03, 1.045, 1.05)),  # within both (1.05 counts)
        "ladder (1, 1.25, 1.5, 2)": ((1.35, 1.36, 1.40), (1.2, 1.2, 1.2)),  # all over 1.3 at batch 1
    }
    processes = [
        {f"{name} @ batch {b}": (r[k][i],) for name, r in ratios.items() for k, b in enumerate((1, 16))}
        for i in range(3)
    ]
    lines = module.verdicts(processes, [1, 16])
    states = {name: next(line for line in lines if line.startswith(f"- {name}:")) for name in ratios}
    assert (
        "**undecided**" in states["GAG ζ=0 (default)"]
        and "1.0640, 1.0350–1.0640 at batch 16" in states["GAG ζ=0 (default)"]
    )
    assert "**met**" in states["extrapolate λ=2"]
    assert "**not met**" in states["ladder (1, 1.25, 1.5, 2)"]
    one = module.verdicts(processes[:1], [1, 16])  # one process: its ratio decides
    assert "**met**" in next(line for line in one if line.startswith("- GAG"))
