"""``hopfield-aa capture`` end to end on a tiny Stable Diffusion pipeline saved to disk."""

from __future__ import annotations

import pytest
import torch

from hopfield_aa.cli import build_parser, main
from hopfield_aa.traces import TraceSet
from hopfield_aa.traces.testing import tiny_sd_pipeline


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\nblue square\n")
    return path


def test_capture_command_records_the_selected_calls(model_dir, prompts, tmp_path):
    out = tmp_path / "traces"
    argv = ["capture", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--quiet"]
    argv += ["--steps", "3", "--height", "8", "--width", "8", "--seed", "5", "--kinds", "cross"]
    argv += ["--step-range", "0:3:2", "--heads", "0,3", "--max-query-tokens", "9", "--dtype", "float16"]
    assert main(argv) == 0
    traces = TraceSet(out)
    assert traces.complete and traces.validate()["records"] == len(traces)
    assert traces.metadata["pipeline_class"] == "StableDiffusionPipeline"
    assert traces.metadata["prompts"] == ["a red circle", "blue square"]
    assert [(r["prompt_id"], r["seed"]) for r in traces.manifest["runs"]] == [(0, 5), (1, 6)]
    # 2 prompts x steps {0, 2} x 4 cross-attention layers, conditional row only (CFG batch of 2)
    assert len(traces) == 2 * 2 * 4
    for record in traces:
        assert record.kind == "cross" and record.step in (0, 2) and record.heads == (0, 3)
        assert record.batch_index == 1 and record.q.dtype == torch.float16
        assert record.q.shape[1] == min(9, record.query_tokens) and record.k.shape[1] == 16  # text tokens
    assert len({r.timestep for r in traces}) == 2
    # an existing capture is refused without --overwrite
    assert main(argv) == 2


def test_capture_reference_model_loads_the_bundled_pipeline_folder(
    prompts, tmp_path, monkeypatch, tiny_reference_folder
):
    import hopfield_aa.reference.pipeline as reference_pipeline

    monkeypatch.setattr(reference_pipeline, "BUNDLED_PIPELINE", tiny_reference_folder)
    out = tmp_path / "ref"
    argv = ["capture", "--model", "reference", "--prompts", str(prompts), "--out", str(out), "--quiet"]
    assert main([*argv, "--steps", "1", "--layers", "mid_block.*"]) == 0
    assert set(TraceSet(out).layers) == {
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
    }


def test_capture_into_an_existing_capture_names_the_flag(
    prompts, tmp_path, monkeypatch, tiny_reference_folder, capsys
):
    import hopfield_aa.reference.pipeline as reference_pipeline

    monkeypatch.setattr(reference_pipeline, "BUNDLED_PIPELINE", tiny_reference_folder)
    argv = [
        "capture",
        "--model",
        "reference",
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o"),
        "--quiet",
        "--steps",
        "1",
        "--layers",
        "mid_block.*",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_capture_reference_model_missing_says_so(prompts, tmp_path, monkeypatch, capsys):
    import hopfield_aa.reference.pipeline as reference_pipeline

    monkeypatch.setattr(reference_pipeline, "BUNDLED_PIPELINE", tmp_path / "nowhere")
    argv = ["capture", "--model", "reference", "--prompts", str(prompts), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hopfield-aa capture: error: --model reference: no reference pipeline at ")
    assert "model_index.json" in err and len(err.strip().splitlines()) == 1
    assert main([*argv[:2], str(tmp_path), *argv[3:]]) == 2
    assert "is neither 'reference' nor a diffusers pipeline directory" in capsys.readouterr().err


def test_capture_help_has_an_example(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["capture", "--help"])
    text = capsys.readouterr().out
    assert "hopfield-aa capture --model" in text and "--max-query-tokens" in text


def test_capture_bad_arguments_exit_2(prompts, tmp_path, capsys):
    base = ["capture", "--model", str(tmp_path), "--out", str(tmp_path / "o")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for extra, message in (
        (["--prompts", str(tmp_path / "none.txt")], "none.txt: no such file"),
        (["--prompts", str(empty)], "holds no prompts"),
        (["--prompts", str(prompts), "--max-query-tokens", "0"], "max_query_tokens"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hopfield-aa capture: error: ") and message in err, err
        assert len(err.strip().splitlines()) <= 2
