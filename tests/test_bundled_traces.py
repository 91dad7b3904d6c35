"""The bundled traces (hopfield_aa/data/traces) load and validate, cover every attention layer of the
reference UNet, name the device and the weights they came from, and were captured from exactly the
bundled weights: replaying a record's sampling run through the bundled model gives back its Q, K, V and
its layer output.

Regenerate with ``python analysis/capture_reference_traces.py`` after the bundled weights change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hopfield_aa._io import is_temporary
from hopfield_aa.checks.traces import BUNDLED_TRACES, bundled_traces, capture_dirs
from hopfield_aa.reference import BUNDLED_PIPELINE, load_pipeline, parse_caption, pipeline_sha256, split_of
from hopfield_aa.traces import TraceRecord, TraceSet, config_hash

PARTS = ("cross", "self")
PROMPTS = BUNDLED_TRACES.parent / "prompts.txt"
MAX_BYTES = 20 * 2**20
MIN_STEPS, MIN_PROMPTS = 10, 8


@pytest.fixture(scope="module")
def traces() -> dict[str, TraceSet]:
    missing = [p for p in PARTS if not (BUNDLED_TRACES / p / "manifest.json").is_file()]
    if missing:
        pytest.fail(f"bundled traces missing under {BUNDLED_TRACES}: {missing}")
    return {part: TraceSet(BUNDLED_TRACES / part) for part in PARTS}


@pytest.fixture(scope="module")
def pipe() -> Any:
    if not (BUNDLED_PIPELINE / "model_index.json").is_file():
        pytest.fail(f"bundled traces ship without the bundled pipeline they belong to ({BUNDLED_PIPELINE})")
    return load_pipeline(BUNDLED_PIPELINE)


def _attention_layers(unet: torch.nn.Module, *, cross: bool) -> set[str]:
    return {
        name
        for name, module in unet.named_modules()
        if hasattr(module, "processor") and bool(getattr(module, "is_cross_attention", False)) == cross
    }


def test_verify_reads_the_bundle_by_default() -> None:
    assert bundled_traces() == BUNDLED_TRACES
    assert capture_dirs(BUNDLED_TRACES) == [BUNDLED_TRACES / p for p in PARTS]


def test_captures_are_complete_valid_and_small(traces: dict[str, TraceSet]) -> None:
    total = sum(p.stat().st_size for p in BUNDLED_TRACES.rglob("*") if p.is_file())
    assert 0 < total <= MAX_BYTES, f"bundle is {total / 2**20:.2f} MiB"
    for part, ts in traces.items():
        counts = ts.validate()  # every shard's SHA-256, tensor names, shapes, dtypes and query indices
        assert ts.complete, f"{part}: capture did not finish"
        assert counts["records"] == len(ts) > 0
        assert ts.unlisted_files == []
        assert not [p.name for p in (BUNDLED_TRACES / part).iterdir() if is_temporary(p.name)]
    leftovers = [p.name for p in BUNDLED_TRACES.parent.iterdir() if is_temporary(p.name)]
    assert not leftovers, f"staging folders of an interrupted capture left behind: {leftovers}"


def test_cross_capture_covers_every_cross_attention_layer_step_and_prompt(
    traces: dict[str, TraceSet], pipe: Any
) -> None:
    ts = traces["cross"]
    entries = ts.entries
    assert {e["kind"] for e in entries} == {"cross"}
    assert set(ts.layers) == _attention_layers(pipe.unet, cross=True)
    steps, prompt_ids = set(ts.steps), {e["prompt_id"] for e in entries}
    assert len(steps) >= MIN_STEPS and len(prompt_ids) >= MIN_PROMPTS
    seen = [(e["layer"], e["step"], e["prompt_id"]) for e in entries]
    assert len(seen) == len(set(seen)) == len(ts.layers) * len(steps) * len(prompt_ids), (
        "a gap or a duplicate"
    )
    for e in entries:
        assert e["heads"] == list(range(e["num_heads"])), f"{e['key']}: not every head captured"
        assert len(e["tensors"]["q"]) == 3 and 0 < e["tensors"]["q"][1] <= e["query_tokens"]


def test_self_capture_covers_every_self_attention_layer(traces: dict[str, TraceSet], pipe: Any) -> None:
    ts = traces["self"]
    assert {e["kind"] for e in ts.entries} == {"self"}
    assert set(ts.layers) == _attention_layers(pipe.unet, cross=False)
    assert {e["prompt_id"] for e in ts.entries} == {e["prompt_id"] for e in traces["cross"].entries}


def test_prompts_are_the_bundled_prompt_file_mixing_kinds_and_held_out_combinations(
    traces: dict[str, TraceSet],
) -> None:
    prompts = [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    attributes = [parse_caption(p) for p in prompts]
    assert len(prompts) >= MIN_PROMPTS
    assert {a["count"] for a in attributes} == {1, 2}
    assert "heldout" in {split_of(a) for a in attributes}
    for ts in traces.values():
        assert list(ts.metadata["prompts"]) == prompts
        runs = ts.manifest["runs"]
        assert [r["prompt"] for r in runs] == prompts
        assert [r["seed"] for r in runs] == [ts.metadata["seed"] + i for i in range(len(prompts))]


def test_manifests_name_the_device_and_the_bundled_weights(traces: dict[str, TraceSet], pipe: Any) -> None:
    weights_sha = pipeline_sha256(BUNDLED_PIPELINE)
    for part, ts in traces.items():
        meta = ts.metadata
        assert meta["device"] and meta["device_name"], f"{part}: no device recorded"
        if meta["device"] == "cpu":
            assert "no GPU" in meta["device_note"], f"{part}: a CPU capture must say so"
        assert meta["weights_sha256"] == weights_sha, (
            f"{part}: traces were captured from other weights ({meta['weights_path']}, sha256 "
            f"{meta['weights_sha256'][:12]}…) than the bundled ones ({weights_sha[:12]}…): recapture with "
            "python analysis/capture_reference_traces.py"
        )
        assert meta["config_hash"] == config_hash(pipe.unet)


class _Stop(Exception):
    """Ends a replayed sampling run once the wanted attention call has been seen."""


def _replay(pipe: Any, record: TraceRecord, prompt: str, guidance_scale: float, steps: int) -> dict[str, Any]:
    """Run the record's sampling run up to its step; return the layer's inputs and output at that call."""
    module = pipe.unet.get_submodule(record.layer)
    seen: dict[str, Any] = {"calls": 0}

    def before(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["context"] = kwargs.get("encoder_hidden_states")

    def after(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if seen["calls"] == record.step:
            seen["output"] = output
            raise _Stop
        seen["calls"] += 1

    handles = [
        module.register_forward_pre_hook(before, with_kwargs=True),
        module.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        with pytest.raises(_Stop):
            pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(int(record.seed or 0)),
            )
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(tokens, heads · d) -> (heads, tokens, d)."""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


@pytest.mark.parametrize(
    ("part", "layer", "step"),
    [
        ("cross", "up_blocks.1.attentions.1.transformer_blocks.0.attn2", 4),
        ("self", "down_blocks.1.attentions.0.transformer_blocks.0.attn1", 6),
    ],
)
def test_recorded_qkv_and_output_match_a_fresh_forward_of_the_bundled_model(
    traces: dict[str, TraceSet], pipe: Any, part: str, layer: str, step: int
) -> None:
    """Q, K, V of a record equal those of a replayed run up to float16 storage: two float16 ulps relative
    (rounding is half an ulp; the rest covers float32 drift of a replay on another BLAS or thread count)
    plus a quarter ulp of the tensor's largest entry. For a record of every head,
    ``to_out(softmax(β Q Kᵀ) V)`` from the stored tensors matches the layer's output to 0.1 % of its scale
    (float16 storage of Q, K, V moves it by about 0.01 %)."""
    ts = traces[part].filter(layers=[layer], steps=[step])
    prompt_id = max(e["prompt_id"] for e in ts.entries)  # a held-out two-object caption
    record = ts.filter(prompt_ids=[prompt_id])[0]
    meta = ts.metadata
    seen = _replay(
        pipe,
        record,
        meta["prompts"][prompt_id],
        meta["pipeline_kwargs"]["guidance_scale"],
        meta["num_inference_steps"],
    )
    attn = pipe.unet.get_submodule(record.layer)
    row = record.batch_index
    with torch.no_grad():
        hidden = seen["hidden"][row]
        context = hidden if seen["context"] is None else seen["context"][row]
        fresh = {
            "q": _heads(attn.to_q(hidden), attn.heads)[list(record.heads)][:, record.query_indices],
            "k": _heads(attn.to_k(context), attn.heads)[list(record.heads)],
            "v": _heads(attn.to_v(context), attn.heads)[list(record.heads)],
        }
    for name, value in fresh.items():
        stored = getattr(record, name).float()
        atol = 2.0**-12 * float(value.abs().max())
        torch.testing.assert_close(stored, value, rtol=2.0**-9, atol=atol, msg=f"{name} of {record}")
    if len(record.heads) == record.num_heads:
        with torch.no_grad():
            mixed = (
                record.attention_output(torch.float32).transpose(0, 1).reshape(len(record.query_indices), -1)
            )
            output = attn.to_out[0](mixed)
        expected = seen["output"][row][record.query_indices]
        scale = float(expected.abs().max())
        torch.testing.assert_close(output, expected, rtol=0.0, atol=1e-3 * scale, msg=f"output of {record}")


def test_bundle_readme_names_the_weights(traces: dict[str, TraceSet]) -> None:
    readme = (BUNDLED_TRACES / "README.md").read_text(encoding="utf-8")
    assert traces["cross"].metadata["weights_sha256"] in readme
    assert Path("analysis/capture_reference_traces.py").name in readme
