"""Attention traces: capture is exact and invisible, selection does what it says, the format round-trips,
and every kind of damage to a capture directory gives an error naming the file."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import hopfield_aa.adapters as adapters_module
from hopfield_aa.traces import (
    Selection,
    TraceCapture,
    TraceFormatError,
    TraceSet,
    attention_call_shapes,
    capture,
    estimate_capture,
)
from hopfield_aa.traces.format import MANIFEST_NAME
from hopfield_aa.traces.selection import parse_steps
from hopfield_aa.traces.testing import (
    flux_inputs,
    sd3_inputs,
    tiny_flux,
    tiny_sd3,
    tiny_unet,
    unet_inputs,
)

MODELS = {
    "unet": (tiny_unet, unet_inputs),
    "sd3": (tiny_sd3, sd3_inputs),
    "flux": (tiny_flux, flux_inputs),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny models are far faster on one thread than on two contended ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


class KernelSpy:
    """Replaces the kernels the adapted processors call, keeping copies of their inputs and outputs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, torch.Tensor | None]] = []
        real_sdpa = torch.nn.functional.scaled_dot_product_attention
        real_dispatch = adapters_module.dispatch_attention_fn

        def sdpa(query, key, value, attn_mask=None, **kw):
            out = real_sdpa(query, key, value, attn_mask=attn_mask, **kw)
            self.calls.append({"q": query.clone(), "k": key.clone(), "v": value.clone(), "out": out.clone()})
            return out

        def dispatch(query, key, value, attn_mask=None, **kw):
            out = real_dispatch(query, key, value, attn_mask=attn_mask, **kw)
            # FLUX layout (batch, tokens, heads, head_dim): store as (batch, heads, tokens, head_dim)
            t = [x.transpose(1, 2).clone() for x in (query, key, value, out)]
            self.calls.append({"q": t[0], "k": t[1], "v": t[2], "out": t[3]})
            return out

        namespace = types.SimpleNamespace(scaled_dot_product_attention=sdpa)
        monkeypatch.setattr(adapters_module, "F", namespace)
        monkeypatch.setattr(adapters_module, "dispatch_attention_fn", dispatch)


# ------------------------------------------------------------------------------------- invisibility
@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_with_and_without_capture_are_bit_identical(name, tmp_path):
    make, inputs_of = MODELS[name]
    model = make()
    inputs = inputs_of(model)
    stock = {n: type(p) for n, p in model.attn_processors.items()}
    before = _forward(model, inputs)
    with capture(model, tmp_path / "t") as cap:
        during = _forward(model, inputs)
    after = _forward(model, inputs)
    assert cap.n_records > 0
    assert torch.equal(before, during)
    assert torch.equal(before, after)
    assert {n: type(p) for n, p in model.attn_processors.items()} == stock  # processors restored


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", sorted(MODELS))
def test_loaded_qkv_equal_what_entered_the_kernel_and_reproduce_its_output(name, tmp_path, monkeypatch):
    make, inputs_of = MODELS[name]
    model = make()
    inputs = inputs_of(model)
    spy = KernelSpy(monkeypatch)
    with TraceCapture(model, tmp_path / "t", selection=Selection(batch_indices=None)) as cap:
        cap.begin_run(prompt_id=3, seed=7)
        _forward(model, inputs)
    records = list(TraceSet(tmp_path / "t"))
    batch = next(iter(inputs.values())).shape[0]
    assert len(spy.calls) > 0
    assert len(records) == len(spy.calls) * batch
    for i, record in enumerate(records):
        call = spy.calls[i // batch]
        row = record.batch_index
        assert row == i % batch
        assert torch.equal(record.q, call["q"][row])
        assert torch.equal(record.k, call["k"][row])
        assert torch.equal(record.v, call["v"][row])
        assert torch.equal(record.query_indices, torch.arange(record.query_tokens))
        assert record.scale == pytest.approx(record.head_dim**-0.5, rel=1e-15)
        torch.testing.assert_close(record.attention_output(torch.float64).float(), call["out"][row])
        assert (record.prompt_id, record.seed) == (3, 7)


def test_recomputed_output_through_the_projection_matches_the_layer(tmp_path):
    """softmax(scale Q Kᵀ) V from the loaded record, then the layer's to_out, equals the layer's output."""
    model = tiny_unet()
    inputs = unet_inputs(model, batch=1)
    layer_name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    layer = model.get_submodule(layer_name)
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, out: seen.setdefault("out", out.detach().clone()))
    with capture(model, tmp_path / "t", layers=[layer_name]):
        _forward(model, inputs)
    handle.remove()
    (record,) = list(TraceSet(tmp_path / "t"))
    heads, tokens, dim = record.q.shape
    attn = record.attention_output(torch.float64).float()  # (heads, tokens, dim)
    out = layer.to_out[0](attn.transpose(0, 1).reshape(1, tokens, heads * dim))
    torch.testing.assert_close(out, seen["out"])
    assert record.kind == "cross" and record.text_range == (0, 5) and record.image_range is None


def test_storage_dtype_float16_is_the_rounded_copy(tmp_path, monkeypatch):
    model = tiny_unet()
    spy = KernelSpy(monkeypatch)
    with capture(model, tmp_path / "t", dtype="float16", batch_indices=[0], layers=["*attn1"]):
        _forward(model, unet_inputs(model))
    traces = TraceSet(tmp_path / "t")
    assert len(traces) == 4  # the four self-attention layers
    for record, call in zip(traces, [c for c in spy.calls if c["k"].shape[2] > 5], strict=True):
        assert record.q.dtype == torch.float16
        assert torch.equal(record.q, call["q"][0].half())
        assert torch.equal(record.v, call["v"][0].half())
    assert traces.metadata["storage_dtype"] == "float16"


def test_metadata_steps_and_timesteps(tmp_path):
    model = tiny_unet()
    inputs = unet_inputs(model)
    with capture(model, tmp_path / "t", kinds=["cross"], metadata={"note": "x"}) as cap:
        for prompt_id in range(2):
            cap.begin_run(prompt_id=prompt_id, seed=10 + prompt_id, prompt=f"p{prompt_id}")
            for t in (900, 500, 100):
                _forward(model, {**inputs, "timestep": torch.tensor(t)})
    traces = TraceSet(tmp_path / "t")
    assert traces.complete
    meta = traces.metadata
    assert meta["model_class"] == "UNet2DConditionModel"
    assert len(meta["config_hash"]) == 64
    assert meta["torch_version"] == torch.__version__
    assert meta["model_dtype"] == "float32" and meta["device"] == "cpu" and meta["device_name"]
    assert meta["note"] == "x" and "diffusers_version" in meta
    assert [r["prompt"] for r in traces.manifest["runs"]] == ["p0", "p1"]
    seen = {(r.prompt_id, r.seed, r.step, r.timestep) for r in traces}
    assert seen == {(p, 10 + p, s, t) for p in range(2) for s, t in enumerate((900.0, 500.0, 100.0))}
    assert {r.batch_index for r in traces} == {0, 1}  # every batch row by default
    # one shard per step at most: an interruption loses only the step in progress
    assert len(traces.shards) == 6


def test_config_hash_tells_architectures_apart(tmp_path):
    for cross_dim, out in ((12, "a"), (12, "b"), (16, "c")):
        model = tiny_unet(cross_attention_dim=cross_dim)
        with capture(model, tmp_path / out, kinds=["self"]):
            _forward(model, unet_inputs(model))
    a, b, c = (TraceSet(tmp_path / n).metadata["config_hash"] for n in "abc")
    assert a == b != c


# ------------------------------------------------------------------------------------------ selection
def test_selection_layers_kinds_steps_heads(tmp_path):
    model = tiny_unet()
    inputs = unet_inputs(model)
    all_layers = [n for n, m in model.named_modules() if hasattr(m, "set_processor")]
    selection = Selection(
        layers=["up_blocks.*attn1", "re:mid_block\\..*attn[12]"],
        steps=[1, 3],
        heads=[0, 2],
        batch_indices=[0],
    )
    with TraceCapture(model, tmp_path / "t", selection=selection) as cap:
        for _ in range(5):
            _forward(model, inputs)
    traces = TraceSet(tmp_path / "t")
    expected_layers = [n for n in all_layers if selection.matches_layer(n)]
    assert sorted(expected_layers) == sorted(
        [
            "mid_block.attentions.0.transformer_blocks.0.attn1",
            "mid_block.attentions.0.transformer_blocks.0.attn2",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
            "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
        ]
    )
    assert sorted(cap.layers) == sorted(expected_layers)
    assert sorted(set(traces.layers)) == sorted(expected_layers)
    assert traces.steps == [1, 3]
    assert len(traces) == len(expected_layers) * 2
    for record in traces:
        assert record.heads == (0, 2) and record.q.shape[0] == 2 and record.num_heads == 4
    # kinds, and loader-side filters agree with capture-side ones
    assert {r.kind for r in traces.filter(kinds=["cross"])} == {"cross"}
    assert len(traces.filter(kinds=["cross"])) == 2
    assert len(traces.filter(layers=["up_blocks.*"], steps=[3])) == 2
    with capture(model, tmp_path / "k", kinds=["cross"]):
        _forward(model, inputs)
    assert {r.kind for r in TraceSet(tmp_path / "k")} == {"cross"}
    with capture(model, tmp_path / "b", kinds=["cross"], batch_indices=[-1]):
        _forward(model, inputs)  # -1: the last row, the conditional half under classifier-free guidance
    assert {r.batch_index for r in TraceSet(tmp_path / "b")} == {1}


def test_selected_heads_are_those_heads(tmp_path):
    model = tiny_sd3()
    inputs = sd3_inputs(model)
    with capture(model, tmp_path / "all", batch_indices=[0]):
        _forward(model, inputs)
    with capture(model, tmp_path / "one", batch_indices=[0], heads=[1]):
        _forward(model, inputs)
    for full, part in zip(TraceSet(tmp_path / "all"), TraceSet(tmp_path / "one"), strict=True):
        assert part.heads == (1,)
        assert torch.equal(part.q[0], full.q[1]) and torch.equal(part.k[0], full.k[1])


def test_query_cap_keeps_a_recorded_seeded_subset(tmp_path):
    model = tiny_unet()
    inputs = unet_inputs(model)
    runs = {
        "full": {},
        "a": {"max_query_tokens": 7},
        "b": {"max_query_tokens": 7},
        "c": {"max_query_tokens": 7},
    }
    runs["c"]["query_seed"] = 1
    for name, kw in runs.items():
        with capture(model, tmp_path / name, layers=["*attn1"], **kw):
            _forward(model, inputs)
    full, a, b, c = (list(TraceSet(tmp_path / n)) for n in runs)
    for rf, ra, rb, rc in zip(full, a, b, c, strict=True):
        idx = ra.query_indices
        assert idx.shape == (7,) and bool((idx[1:] > idx[:-1]).all()) and int(idx.max()) < rf.query_tokens
        assert torch.equal(ra.q, rf.q[:, idx])  # the rows kept are exactly those queries
        assert torch.equal(ra.k, rf.k)  # keys are never subsampled
        assert torch.equal(ra.query_indices, rb.query_indices)  # same seed, same subset
        assert ra.query_seed == 0 and rc.query_seed == 1 and rf.query_seed is None
    assert any(not torch.equal(ra.query_indices, rc.query_indices) for ra, rc in zip(a, c, strict=True))
    # different rows of the batch and different layers get different subsets
    assert not torch.equal(a[0].query_indices, a[1].query_indices)


@given(n=st.integers(1, 500), cap=st.integers(1, 600), seed=st.integers(0, 2**31), step=st.integers(0, 100))
@example(n=1, cap=1, seed=0, step=0)
@example(n=500, cap=499, seed=0, step=0)
def test_query_subset_is_sorted_distinct_in_range_and_of_size_min_n_cap(n, cap, seed, step):
    sel = Selection(max_query_tokens=cap, query_seed=seed)
    idx = sel.query_indices(n, layer="a.b", step=step, batch_index=0)
    if n <= cap:
        assert idx is None
    else:
        assert idx.shape == (cap,) and idx.dtype == torch.int64
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < n
        assert torch.equal(idx, sel.query_indices(n, layer="a.b", step=step, batch_index=0))


@given(start=st.integers(0, 30), stop=st.integers(0, 60), stride=st.integers(1, 7))
def test_parse_steps_equals_python_range(start, stop, stride):
    assert parse_steps(f"{start}:{stop}:{stride}") == tuple(range(start, stop, stride))
    assert parse_steps(f"{start},{stop}") == (start, stop)


def test_selection_rejects_bad_input():
    with pytest.raises(ValueError, match="kinds"):
        Selection(kinds=["diagonal"])
    with pytest.raises(ValueError, match="max_query_tokens"):
        Selection(max_query_tokens=0)
    with pytest.raises(ValueError, match="layers"):
        Selection(layers=["re:("])
    with pytest.raises(ValueError, match="heads"):
        Selection(heads=[-1])
    with pytest.raises(ValueError, match="no attention layer"):
        TraceCapture(tiny_unet(), "unused", selection=Selection(layers=["nothing*"])).start()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(
    "selection",
    [
        Selection(),
        Selection(kinds=["cross", "joint"], heads=[1], max_query_tokens=6, steps=[1], batch_indices=[-1]),
    ],
)
def test_size_estimate_from_a_meta_forward_equals_the_captured_bytes(name, selection, tmp_path):
    make, inputs_of = MODELS[name]
    model = make()
    inputs = inputs_of(model)
    with torch.device("meta"):
        meta_model = make()
    meta_inputs = {k: v.to("meta") for k, v in inputs.items()}
    estimate = estimate_capture(attention_call_shapes(meta_model, meta_inputs), steps=3, selection=selection)
    with TraceCapture(model, tmp_path / "t", selection=selection, dtype="float16"):
        for _ in range(3):
            _forward(model, inputs)
    records = list(TraceSet(tmp_path / "t"))
    stored = sum(t.numel() * t.element_size() for r in records for t in (r.q, r.k, r.v, r.query_indices))
    assert estimate.records == len(records) > 0
    assert estimate.bytes == stored


# ------------------------------------------------------------------------------- joint attention view
def test_joint_split_selects_image_query_to_text_key_blocks(tmp_path):
    for make, inputs_of, text_first in ((tiny_sd3, sd3_inputs, False), (tiny_flux, flux_inputs, True)):
        model = make()
        inputs = inputs_of(model)
        out = tmp_path / type(model).__name__
        with capture(model, out, max_query_tokens=12):
            _forward(model, inputs)
        n_text = inputs["encoder_hidden_states"].shape[1]
        for record in TraceSet(out):
            assert record.kind == "joint"
            n = record.key_tokens
            text = (0, n_text) if text_first else (n - n_text, n)
            image = (n_text, n) if text_first else (0, n - n_text)
            assert record.text_range == text and record.image_range == image
            for head in record.iter_heads(query="image", key="text"):
                assert torch.equal(head.memory, record.k[head.head, text[0] : text[1]])
                assert head.beta == record.scale
                in_image = (record.query_indices >= image[0]) & (record.query_indices < image[1])
                assert torch.equal(head.states, record.q[head.head][in_image])
                assert torch.equal(head.query_indices, record.query_indices[in_image])


def test_hopfield_view_of_the_full_head_is_the_attention_output(tmp_path):
    model = tiny_unet()
    with capture(model, tmp_path / "t", layers=["*attn2"], heads=[1, 3]):
        _forward(model, unet_inputs(model))
    for record in TraceSet(tmp_path / "t"):
        attn = record.attention_output(torch.float64)
        for i, head in enumerate(record.iter_heads()):
            assert head.head == record.heads[i]
            m, s, v = head.memory.double(), head.states.double(), head.values.double()
            torch.testing.assert_close(torch.softmax(head.beta * s @ m.T, dim=-1) @ v, attn[i])
        with pytest.raises(ValueError, match="head"):
            record.hopfield(2)
        with pytest.raises(ValueError, match="segment"):
            record.hopfield(0, key="image")


# ----------------------------------------------------------------------------------- format damage
@pytest.fixture(scope="module")
def good_capture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "t"
    torch.set_num_threads(1)  # restored by the autouse fixture of the first test
    model = tiny_unet()
    inputs = unet_inputs(model)
    with capture(model, path, kinds=["cross"], dtype="float16", batch_indices=[-1]) as cap:
        for t in (900, 500, 100):
            _forward(model, {**inputs, "timestep": torch.tensor(t)})
    assert cap.n_shards == 3
    return path


@pytest.fixture
def damaged(good_capture, tmp_path) -> Path:
    path = tmp_path / "t"
    shutil.copytree(good_capture, path)
    return path


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_good_capture_validates(good_capture):
    traces = TraceSet(good_capture)
    assert traces.validate() == {
        "shards": 3,
        "records": 12,
        "bytes": sum(s["bytes"] for s in traces.manifest["shards"]),
    }
    assert traces.unlisted_files == []


def test_flipped_bytes_name_the_shard_and_checksum(damaged):
    shard = damaged / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: only the checksum can tell
    shard.write_bytes(bytes(data))
    traces = TraceSet(damaged)  # sizes still agree: opening works
    with pytest.raises(TraceFormatError, match=r"shard-000001\.safetensors.*sha256.*corrupted") as info:
        traces.validate()
    assert info.value.path == str(shard) and info.value.field == "sha256"
    assert len(list(traces.filter(steps=[0]))) == 4  # the undamaged shards still load


def test_flipped_header_bytes_without_checksum_name_the_shard(damaged):
    shard = damaged / "shard-000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[12] = ord("}")  # breaks the safetensors JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match=r"shard-000000\.safetensors") as info:
        TraceSet(damaged, verify=False).validate()
    assert info.value.path == str(shard)


def test_truncated_shard_names_the_file_and_size(damaged):
    shard = damaged / "shard-000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TraceFormatError, match=r"shard-000002\.safetensors.*bytes.*truncated") as info:
        TraceSet(damaged)
    assert info.value.field == "bytes"


def test_missing_shard_names_the_file(damaged):
    (damaged / "shard-000001.safetensors").unlink()
    with pytest.raises(TraceFormatError, match=r"shard-000001\.safetensors.*missing"):
        TraceSet(damaged)


def test_missing_or_unreadable_manifest_names_it(damaged, tmp_path):
    with pytest.raises(TraceFormatError, match=r"manifest\.json.*missing"):
        TraceSet(tmp_path)
    (damaged / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(TraceFormatError, match=r"manifest\.json.*not valid JSON"):
        TraceSet(damaged)


@pytest.mark.parametrize(
    ("edit", "file", "field"),
    [
        (lambda m: m.update(format_version=99), MANIFEST_NAME, "format_version"),
        (lambda m: m.update(format="other"), MANIFEST_NAME, "format"),
        (lambda m: m["shards"][1]["records"][0].pop("scale"), MANIFEST_NAME, "shards[1].records[0].scale"),
        (
            lambda m: m["shards"][0]["records"][2].update(kind="diag"),
            MANIFEST_NAME,
            "shards[0].records[2].kind",
        ),
        (
            lambda m: m["shards"][0]["records"][0].update(heads=[0, 9]),
            MANIFEST_NAME,
            "shards[0].records[0].heads",
        ),
        (lambda m: m["shards"][0]["records"][0]["tensors"].update(k=[4, 6, 4]), MANIFEST_NAME, "tensors.k"),
        (lambda m: m["shards"][0].update(file="../x.safetensors"), MANIFEST_NAME, "shards[0].file"),
        (
            lambda m: m["shards"][2].update(bytes=m["shards"][2]["bytes"] + 1),
            "shard-000002.safetensors",
            "bytes",
        ),
        (lambda m: m["shards"][1].update(sha256="0" * 64), "shard-000001.safetensors", "sha256"),
        (
            lambda m: m["shards"][0]["records"][1].update(dtype="float32"),
            "shard-000000.safetensors",
            "r000001/q",
        ),
        (lambda m: m["shards"][0]["records"][1].update(key="r999999"), "shard-000000.safetensors", "records"),
        (lambda m: m["shards"][2]["records"].pop(), "shard-000002.safetensors", "records"),
        (lambda m: m["shards"][1].update(file="shard-000000.safetensors"), MANIFEST_NAME, "shards[1].file"),
    ],
)
def test_manifest_that_disagrees_names_the_file_and_field(damaged, edit, file, field):
    manifest = _manifest(damaged)
    edit(manifest)
    _write_manifest(damaged, manifest)
    with pytest.raises(TraceFormatError) as info:
        TraceSet(damaged).validate()
    assert Path(info.value.path).name == file
    assert field in info.value.field
    assert file in str(info.value) and field in str(info.value)


def test_unlisted_shard_is_ignored_and_reported(damaged):
    shutil.copy(damaged / "shard-000000.safetensors", damaged / "shard-000003.safetensors")
    (damaged / ".tmp-123-shard-000004.safetensors").write_bytes(b"partial")
    traces = TraceSet(damaged)
    assert traces.unlisted_files == ["shard-000003.safetensors"]
    assert traces.validate()["records"] == 12


def test_existing_capture_is_not_overwritten_by_accident(good_capture, tmp_path):
    path = tmp_path / "t"
    shutil.copytree(good_capture, path)
    model = tiny_unet()
    with pytest.raises(FileExistsError, match="already holds"):
        capture(model, path).start()
    assert len(TraceSet(path)) == 12
    with capture(model, path, overwrite=True, kinds=["self"]):
        _forward(model, unet_inputs(model))
    assert {r.kind for r in TraceSet(path)} == {"self"} and len(TraceSet(path).shards) == 1


def test_error_inside_capture_leaves_a_loadable_incomplete_set(tmp_path):
    model = tiny_unet()
    inputs = unet_inputs(model)
    with pytest.raises(RuntimeError, match="boom"), capture(model, tmp_path / "t", kinds=["cross"]):
        _forward(model, inputs)
        _forward(model, inputs)
        raise RuntimeError("boom")
    traces = TraceSet(tmp_path / "t")
    assert not traces.complete and traces.steps == [0, 1] and traces.validate()["records"] == 16
    assert type(
        model.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2").processor
    ).__name__ == ("AttnProcessor2_0")
