"""Tests of the reference pipeline: dataset, captions and splits, the alignment reader and Fréchet distance,
the tokenizer files, the two training stages and their checkpoints, saving and loading as a stock
diffusers folder, sampling, the command line, and the shipped pipeline."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_REFERENCE

from hopfield_aa.reference import (
    BUNDLED_PIPELINE,
    HELD_OUT,
    ModelConfig,
    ShapesDataset,
    TrainConfig,
    Trainer,
    alignment,
    bootstrap_ci,
    caption_combinations,
    caption_of,
    degrade,
    encode_captions,
    frechet_distance,
    generate,
    image_features,
    initial_latents,
    load_pipeline,
    parse_caption,
    split_of,
)
from hopfield_aa.reference.cli import sample_grid
from hopfield_aa.reference.dataset import nearest_caption, vocabulary
from hopfield_aa.reference.pipeline import tokenizer_files

TINY_TRAIN = {"vae_steps": 2, "vae_batch_size": 4, "batch_size": 4, "model": TINY_REFERENCE}


# --- dataset ----------------------------------------------------------------------------------------


def test_dataset_is_deterministic_per_seed() -> None:
    a_images, a_captions, a_scenes = ShapesDataset(seed=3).batch(5, 16)
    b_images, b_captions, b_scenes = ShapesDataset(seed=3).batch(5, 16)
    c_images, _, _ = ShapesDataset(seed=4).batch(5, 16)
    assert np.array_equal(a_images, b_images)
    assert a_captions == b_captions
    assert a_scenes == b_scenes
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (16, 32, 32, 3) and a_images.dtype == np.float32
    assert 0.0 <= a_images.min() and a_images.max() <= 1.0


def test_every_caption_of_the_grammar_parses_back_to_its_attributes() -> None:
    records = caption_combinations("train") + caption_combinations("heldout")
    assert len({caption_of(r) for r in records}) == len(records)
    for record in records:
        assert parse_caption(caption_of(record)) == record


def test_rendered_scenes_carry_their_caption_attributes() -> None:
    for split in ("train", "heldout"):
        _, captions, scenes = ShapesDataset(seed=1, split=split).batch(0, 64)
        for caption, scene in zip(captions, scenes, strict=True):
            assert parse_caption(caption) == scene.attributes


@pytest.mark.parametrize(
    "caption",
    ["a red circle", "a small purple circle at the top", "a red circle left of a red square", "", "a a a"],
)
def test_parse_caption_rejects_sentences_outside_the_grammar(caption: str) -> None:
    with pytest.raises(ValueError, match="grammar"):
        parse_caption(caption)


def test_heldout_combinations_never_appear_in_training_split() -> None:
    train = caption_combinations("train")
    heldout = caption_combinations("heldout")
    assert {caption_of(r) for r in train}.isdisjoint({caption_of(r) for r in heldout})
    assert heldout, "the held-out split must not be empty"
    dataset = ShapesDataset(seed=0, split="train")
    for index in range(20):
        for scene in dataset.scenes(index, 64):
            assert all((o.colour, o.shape) not in HELD_OUT for o in scene.objects)
    for scene in ShapesDataset(seed=0, split="heldout").scenes(0, 64):
        assert any((o.colour, o.shape) in HELD_OUT for o in scene.objects)
        assert split_of(scene.attributes) == "heldout"


# --- metrics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_reader_reads_clean_renders_at_least_99_percent(split: str) -> None:
    images, captions, _ = ShapesDataset(seed=11, split=split).batch(0, 300)
    accuracy = alignment(images, captions).accuracy()
    assert set(accuracy) >= {"colour", "shape", "size", "position", "relation", "colour_2", "whole"}
    for name, value in accuracy.items():
        assert value >= 0.99, f"{name}: {value}"


def test_reader_accepts_torch_chw_and_survives_mild_noise() -> None:
    images, captions, _ = ShapesDataset(seed=2).batch(0, 100)
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert alignment(chw, captions).accuracy()["whole"] == alignment(images, captions).accuracy()["whole"]
    assert alignment(degrade(images, noise_std=0.1), captions).accuracy()["whole"] >= 0.99


def test_reader_fails_on_wrong_captions() -> None:
    images, _, scenes = ShapesDataset(seed=2).batch(0, 50)
    swapped = []
    for scene in scenes:
        record = dict(scene.attributes)
        key = "colour" if record["count"] == 1 else "colour_1"
        other = "green" if record[key] != "green" else "yellow"
        if record["count"] == 2 and record["colour_2"] == other:
            other = "red" if record[key] != "red" else "blue"
        record[key] = other
        swapped.append(caption_of(record))
    result = alignment(images, swapped)
    assert result.accuracy()["whole"] == 0.0


def test_frechet_distance_is_zero_on_identical_sets_and_grows_with_blur() -> None:
    real = image_features(ShapesDataset(seed=5).batch(0, 200)[0])
    other = image_features(ShapesDataset(seed=6).batch(0, 200)[0])
    blurred = image_features(degrade(ShapesDataset(seed=6).batch(0, 200)[0], blur_sigma=1.0))
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, other) < frechet_distance(real, blurred)


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_data() -> None:
    rng = np.random.default_rng(0)
    small = (rng.random(50) < 0.7).astype(float)
    large = (rng.random(2000) < 0.7).astype(float)
    est_small, est_large = bootstrap_ci(small), bootstrap_ci(large)
    for est in (est_small, est_large):
        assert est.low <= est.value <= est.high
    assert est_large.high - est_large.low < est_small.high - est_small.low
    assert est_large.low < 0.7 < est_large.high
    with_nan = np.array([1.0, np.nan, 0.0, 1.0])
    assert bootstrap_ci(with_nan).value == pytest.approx(2 / 3)


def test_basic_bootstrap_reflects_the_percentile_interval_about_a_biased_fd() -> None:
    """Resampling with replacement duplicates rows, which biases a Fréchet distance upwards: its percentile
    interval lies above the estimate θ. The basic interval [2θ − q_hi, 2θ − q_lo] is that interval
    reflected about θ, so it moves down by as much (towards the population FD, below the biased θ);
    ``minimum`` clips it at 0."""
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(400, 6)), rng.normal(size=(200, 6))

    def fd(f: np.ndarray) -> float:
        return frechet_distance(real, f)

    percentile = bootstrap_ci(fake, statistic=fd, n_resamples=200)
    basic = bootstrap_ci(fake, statistic=fd, n_resamples=200, method="basic")
    assert percentile.low > percentile.value  # the bias this corrects
    assert basic.value == percentile.value
    assert basic.low == pytest.approx(2 * basic.value - percentile.high)
    assert basic.high == pytest.approx(2 * basic.value - percentile.low)
    assert basic.high < basic.value  # here the bias exceeds the spread: the interval lies below θ
    clipped = bootstrap_ci(fake, statistic=fd, n_resamples=200, method="basic", minimum=0.0)
    assert clipped.low == max(0.0, basic.low) and clipped.high == basic.high
    with pytest.raises(ValueError, match="method"):
        bootstrap_ci(fake, statistic=fd, method="bca")


# --- tokenizer, networks, pipeline folder ----------------------------------------------------------


def test_tokenizer_gives_one_token_per_grammar_word_and_pads_with_the_end_token(
    tiny_reference_folder,
) -> None:
    pipe = load_pipeline(tiny_reference_folder)
    tok = pipe.tokenizer
    ids = tok(
        "a small red circle at the top", padding="max_length", max_length=tok.model_max_length
    ).input_ids
    words = tok.convert_ids_to_tokens(ids)
    assert words[:9] == [
        "<|startoftext|>",
        "a</w>",
        "small</w>",
        "red</w>",
        "circle</w>",
        "at</w>",
        "the</w>",
        "top</w>",
        "<|endoftext|>",
    ]
    assert set(words[9:]) == {"<|endoftext|>"} and len(ids) == tok.model_max_length == 16
    empty = tok("", padding="max_length", max_length=tok.model_max_length).input_ids
    assert empty[0] == tok.bos_token_id and set(empty[1:]) == {tok.eos_token_id}
    for caption in (caption_of(r) for r in caption_combinations("train")):
        assert len(tok(caption).input_ids) == len(caption.split()) + 2


def test_tokenizer_files_hold_every_word_once_and_reject_non_letters() -> None:
    vocab, merges = tokenizer_files(vocabulary())
    assert all(f"{w}</w>" in vocab for w in vocabulary())
    assert len(set(vocab.values())) == len(vocab)
    assert len(merges) == len(set(merges))
    with pytest.raises(ValueError, match="words"):
        tokenizer_files(["red", "Red!"])


def test_pipeline_folder_loads_offline_with_the_stock_diffusers_class(tiny_reference_folder) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_reference_folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert {p.name for p in (tiny_reference_folder / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    images = pipe(
        ["a red circle above a blue square"],
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_load_pipeline_names_a_missing_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="scheduler"):
        from hopfield_aa.reference import build_scheduler

        build_scheduler(ModelConfig(), "heun-ish")


def test_cfg_at_scale_one_equals_no_guidance_and_larger_scales_change_the_image(
    tiny_reference_folder,
) -> None:
    pipe = load_pipeline(tiny_reference_folder)
    prompts = ["a large green square on the right", "a red circle above a blue square"]
    latents = initial_latents(pipe, [0, 1])
    plain = generate(pipe, prompts, latents, num_inference_steps=3, guidance_scale=1.0)
    # the CFG combination at s = 1, computed from the two branches by hand, equals the plain prediction
    states = encode_captions(pipe.tokenizer, pipe.text_encoder, prompts)
    empty = encode_captions(pipe.tokenizer, pipe.text_encoder, ["", ""])
    z, t = latents, torch.tensor(500)
    with torch.no_grad():
        eps_c = pipe.unet(z, t, encoder_hidden_states=states).sample
        eps_u = pipe.unet(z, t, encoder_hidden_states=empty).sample
    assert torch.allclose(eps_u + 1.0 * (eps_c - eps_u), eps_c, atol=1e-6)
    stronger = generate(pipe, prompts, latents, num_inference_steps=3, guidance_scale=4.0)
    assert not np.allclose(plain, stronger, atol=1e-4)


def test_generate_rejects_bad_arguments(tiny_reference_folder) -> None:
    pipe = load_pipeline(tiny_reference_folder)
    latents = initial_latents(pipe, [0])
    with pytest.raises(ValueError, match="num_inference_steps"):
        generate(pipe, ["a small red circle at the top"], latents, num_inference_steps=0)
    with pytest.raises(ValueError, match="latents"):
        generate(pipe, ["a small red circle at the top", ""], latents)


def test_sample_grid_uses_one_noise_per_seed_across_prompts(tiny_reference_folder) -> None:
    pipe = load_pipeline(tiny_reference_folder)
    grid = sample_grid(pipe, ["a small red circle at the top", ""], seeds=[0, 1], num_inference_steps=2)
    assert grid.shape == (2, 2, 32, 32, 3)
    single = generate(
        pipe, ["a small red circle at the top"], initial_latents(pipe, [1]), num_inference_steps=2
    )
    assert np.allclose(grid[0, 1], single[0], atol=1e-5)


# --- training -----------------------------------------------------------------------------------------


def test_a_few_denoiser_steps_reduce_the_loss_on_a_fixed_batch(tmp_path) -> None:
    config = TrainConfig.from_dict({**TINY_TRAIN, "out_dir": str(tmp_path), "batch_size": 8, "lr": 3e-3})
    trainer = Trainer(config)
    trainer.train_vae(progress=False)
    latents, captions = trainer.batch(0)

    def fixed_loss() -> torch.Tensor:
        return trainer.loss(latents, captions, torch.Generator().manual_seed(0))

    with torch.no_grad():
        before = float(fixed_loss())
    for _ in range(15):
        trainer.optimizer.zero_grad()
        fixed_loss().backward()
        trainer.optimizer.step()
    with torch.no_grad():
        after = float(fixed_loss())
    assert after < 0.8 * before


def test_autoencoder_stage_sets_unit_latent_scale_and_is_reused(tmp_path) -> None:
    config = TrainConfig.from_dict({**TINY_TRAIN, "out_dir": str(tmp_path)})
    trainer = Trainer(config)
    trainer.train_vae(progress=False)
    assert (tmp_path / "vae" / "config.json").is_file() and len(trainer.vae_losses) == 2
    again = Trainer(config)
    again.train_vae(progress=False)  # loads the finished autoencoder instead of training it again
    assert again.vae_losses == trainer.vae_losses
    assert again.net.vae.config.scaling_factor == trainer.net.vae.config.scaling_factor
    probe = again.latents_of(ShapesDataset(5).batch(0, 64)[0])
    assert 0.5 < float(probe.std()) < 2.0


def test_training_resumes_exactly_from_a_checkpoint(tmp_path) -> None:
    base = {**TINY_TRAIN, "checkpoint_minutes": 1e9}
    straight = Trainer(TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "a"), "steps": 3}))
    straight.train(progress=False)
    first = Trainer(TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "b"), "steps": 2}))
    first.train(progress=False)
    resumed = Trainer(TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "b"), "steps": 3}))
    assert resumed.load_checkpoint()
    assert resumed.step == 2
    resumed.train(progress=False)
    assert resumed.losses == straight.losses
    for p, q in zip(resumed.params, straight.params, strict=True):
        assert torch.equal(p, q)
    assert (tmp_path / "b" / "loss.png").is_file()
    assert (tmp_path / "b" / "final" / "model_index.json").is_file()


def test_resume_from_committed_ema_weights_alone_restarts_the_warmup(tmp_path) -> None:
    base = {**TINY_TRAIN, "checkpoint_minutes": 1e9, "out_dir": str(tmp_path)}
    Trainer(TrainConfig.from_dict({**base, "steps": 2})).train(progress=False)
    for name in ("params.safetensors", "optimizer.safetensors"):
        (tmp_path / "checkpoint" / name).unlink()
    resumed = Trainer(TrainConfig.from_dict({**base, "steps": 3}))
    assert resumed.load_checkpoint()
    assert resumed.step == resumed.warmup_from == 2
    for p, q in zip(resumed.params, resumed.ema.shadow_params, strict=True):
        assert torch.equal(p, q)
    assert resumed.lr_at(2) == pytest.approx(resumed.config.lr / resumed.config.warmup_steps)


def test_learning_rate_warms_up_holds_then_decays_by_half_cosine_to_lr_final(tmp_path) -> None:
    config = TrainConfig.from_dict(
        {
            **TINY_TRAIN,
            "out_dir": str(tmp_path),
            "steps": 100,
            "warmup_steps": 10,
            "lr": 1e-3,
            "lr_decay_steps": 40,
            "lr_final": 1e-4,
        }
    )
    trainer = Trainer(config)
    assert trainer.lr_at(0) == pytest.approx(1e-4)  # warm-up: (step + 1) / warmup_steps of lr
    assert trainer.lr_at(9) == pytest.approx(1e-3)
    assert trainer.lr_at(60) == pytest.approx(1e-3)  # constant until steps - lr_decay_steps
    assert trainer.lr_at(80) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way down the cosine
    assert trainer.lr_at(100) == pytest.approx(1e-4)
    lrs = [trainer.lr_at(s) for s in range(10, 101)]
    assert all(b <= a for a, b in itertools.pairwise(lrs))
    constant = Trainer(
        TrainConfig.from_dict({**TINY_TRAIN, "out_dir": str(tmp_path / "c"), "steps": 100, "warmup_steps": 1})
    )
    assert constant.lr_at(99) == constant.config.lr  # lr_decay_steps = 0: no decay


def test_train_config_names_bad_fields() -> None:
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainConfig.from_dict({"caption_dropout": 1.5})
    with pytest.raises(ValueError, match="lr_decay_steps"):
        TrainConfig.from_dict({"steps": 10, "lr_decay_steps": 11})
    with pytest.raises(ValueError, match="lr_final"):
        TrainConfig.from_dict({"lr": 1e-3, "lr_final": 2e-3})
    with pytest.raises(ValueError, match="unknown model config keys"):
        TrainConfig.from_dict({"model": {"block_out_channels": [8]}})


# --- command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "A Small Red Circle At The Top."], "nearest: 'a small red circle at the top'"),
        (["--prompt", "a red circle", "--steps", "0"], "nearest"),
        (["--prompt", "a small red circle at the top", "--steps", "0"], "--steps must be >= 1"),
        (["--prompt", "a small red circle at the top", "--out", "grid.jpg"], "--out must name a .png"),
    ],
)
def test_sample_command_answers_bad_input_in_two_lines_without_a_traceback(argv, message, capsys) -> None:
    from hopfield_aa.cli import main

    assert main(["sample", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_sample_command_writes_where_it_says(tiny_reference_folder, tmp_path, capsys) -> None:
    from hopfield_aa.cli import main

    out = tmp_path / "grid.png"
    argv = [
        "sample",
        "--prompt",
        "a small red circle at the top",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--weights",
        str(tiny_reference_folder),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_sample_help_shows_defaults_and_the_grammar(capsys) -> None:
    from hopfield_aa.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 5.0)" in text and "(default: 25)" in text and "(default: reference_samples.png)" in text
    assert "on the left" in text and "the sampler" in text


def test_nearest_caption_repairs_case_punctuation_and_typos() -> None:
    assert nearest_caption("A Small Red Circle At The Top.") == "a small red circle at the top"
    assert nearest_caption("a red cirle above a blue squre") == "a red circle above a blue square"


# --- shipped pipeline ---------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (BUNDLED_PIPELINE / "model_index.json").is_file(), reason="reference pipeline not shipped"
)
def test_shipped_pipeline_is_small_loads_and_samples_deterministically() -> None:
    size = sum(p.stat().st_size for p in BUNDLED_PIPELINE.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    meta = json.loads((BUNDLED_PIPELINE / "reference_model.json").read_text())
    assert meta["training"]["step"] > 0
    pipe = load_pipeline()
    prompts = ["a small red circle at the top", "a blue square left of a yellow triangle"]
    latents = initial_latents(pipe, [7, 8])
    a = generate(pipe, prompts, latents, num_inference_steps=4, guidance_scale=3.0)
    b = generate(pipe, prompts, latents, num_inference_steps=4, guidance_scale=3.0)
    assert a.shape == (2, 32, 32, 3) and np.array_equal(a, b) and np.isfinite(a).all()


def test_a_termination_signal_stops_training_after_the_step_and_still_checkpoints(tmp_path) -> None:
    import os
    import signal

    config = TrainConfig.from_dict(
        {**TINY_TRAIN, "out_dir": str(tmp_path), "steps": 50, "checkpoint_minutes": 1e9}
    )
    trainer = Trainer(config)
    step = trainer.train_step

    def signalling_step() -> float:
        value = step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` from a shell would
        return value

    trainer.train_step = signalling_step  # type: ignore[method-assign]
    summary = trainer.train(progress=False)
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again


def test_export_writes_the_checkpoints_ema_weights_as_a_half_precision_pipeline(tmp_path) -> None:
    from hopfield_aa.cli import main

    config = {**TINY_TRAIN, "out_dir": str(tmp_path / "run"), "steps": 2, "checkpoint_minutes": 1e9}
    Trainer(TrainConfig.from_dict(config)).train(progress=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert (
        main(
            ["train-reference", "--config", str(tmp_path / "config.json"), "--export", str(tmp_path / "out")]
        )
        == 0
    )
    meta = json.loads((tmp_path / "out" / "reference_model.json").read_text())
    assert meta["training"]["step"] == 2
    unet = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == TINY_REFERENCE["unet_channels"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert fh.get_tensor(next(iter(fh.keys()))).dtype == torch.float16
    assert (
        main(
            [
                "train-reference",
                "--config",
                str(tmp_path / "config.json"),
                "--out-dir",
                str(tmp_path / "none"),
                "--export",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


def _eval_reference_module():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "analysis" / "eval_reference.py"
    spec = importlib.util.spec_from_file_location("eval_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_best_cfg_scale_is_the_lowest_fd_among_scales_statistically_tied_with_the_highest_alignment() -> None:
    """The operating point of the reference evaluation: s = 5 has the highest seen accuracy, s = 2 and 3
    contain it in their intervals (tied) and s = 2 has the lowest FD among them; s = 1 has a lower FD
    still but its interval excludes the highest accuracy, so it is not a candidate."""
    from hopfield_aa.reference.metrics import Estimate

    module = _eval_reference_module()

    def scale(single: tuple[float, float, float], pair: tuple[float, float, float], fd: float) -> dict:
        cells = {
            ("train", "single"): {"whole": Estimate(*single)},
            ("train", "pair"): {"whole": Estimate(*pair)},
        }
        return {"cells": cells, "fd": Estimate(fd, fd, fd)}

    results = {
        1.0: scale((0.90, 0.85, 0.95), (0.80, 0.75, 0.85), 0.005),
        2.0: scale((1.00, 1.00, 1.00), (0.996, 0.988, 1.00), 0.011),
        3.0: scale((0.996, 0.988, 1.00), (1.00, 1.00, 1.00), 0.012),
        5.0: scale((1.00, 1.00, 1.00), (1.00, 1.00, 1.00), 0.022),
    }
    assert module.best_scale(results) == (2.0, 5.0)
    results[2.0]["cells"][("train", "pair")]["whole"] = Estimate(0.95, 0.93, 0.97)  # no longer tied
    assert module.best_scale(results) == (3.0, 5.0)


def test_full_evaluations_form_a_history_one_entry_per_step_in_order_of_samples_seen(tmp_path) -> None:
    """eval_reference's history (the FD-against-training curve): an evaluation of a step already recorded
    replaces it, entries stay ordered by training step, and each keeps FD and the seen/held-out accuracy."""
    module = _eval_reference_module()

    def summary(step: int, fd: float) -> dict:
        est = {"value": fd, "low": 0.0, "high": fd}
        cells = {
            c: {"whole": {"value": 1.0, "low": 1.0, "high": 1.0}} for c in ("train/single", "train/pair")
        }
        return {
            "step": step,
            "samples_seen": 64 * step,
            "per_cell": 256,
            "fd_real_floor_matched": {"value": 0.005, "low": 0.0, "high": 0.002},
            "scales": {"2": {"fd": est, "heldout": {"value": 0.9}, "cells": cells}},
        }

    path = tmp_path / "history.json"
    module.record_history(module.history_entry(summary(200, 0.02)), path)
    module.record_history(module.history_entry(summary(100, 0.03)), path)
    history = module.record_history(module.history_entry(summary(200, 0.01)), path)
    assert [h["step"] for h in history] == [100, 200]
    assert history[1]["scales"]["2"] == {
        "fd": {"value": 0.01, "low": 0.0, "high": 0.01},
        "seen": 1.0,
        "heldout": 0.9,
    }
    module.plot_fd_history(history, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
