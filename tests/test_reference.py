"""Tests of the reference model: dataset, captions and splits, the alignment reader and Fréchet distance,
training, saving and loading, the pipeline's guidance, and the shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hopfield_aa.reference import (
    BUNDLED_WEIGHTS,
    HELD_OUT,
    ModelConfig,
    ReferencePipeline,
    ShapesDataset,
    TrainConfig,
    Trainer,
    WordTokenizer,
    alignment,
    bootstrap_ci,
    build_model,
    build_scheduler,
    caption_combinations,
    caption_of,
    degrade,
    frechet_distance,
    image_features,
    load_pipeline,
    parse_caption,
    split_of,
)
from hopfield_aa.reference.cli import sample_grid
from hopfield_aa.reference.model import WEIGHTS_NAME

TINY_MODEL = {
    "block_out_channels": [8, 16],
    "cross_attention_levels": [False, True],
    "attention_heads": 2,
    "norm_num_groups": 4,
    "text_hidden_size": 16,
    "text_layers": 1,
    "text_heads": 2,
}


def tiny_pipeline(seed: int = 0) -> ReferencePipeline:
    torch.manual_seed(seed)
    config = ModelConfig.from_dict(TINY_MODEL)
    unet, text_encoder, tokenizer = build_model(config)
    return ReferencePipeline(unet.eval(), text_encoder.eval(), tokenizer, build_scheduler(config), config)


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


# --- model, training, saving ------------------------------------------------------------------------


def test_tokenizer_pads_and_marks_the_empty_caption() -> None:
    tok = WordTokenizer(["a", "red"], max_length=5)
    assert tok(["", "a red"]).tolist() == [[1, 2, 0, 0, 0], [1, 4, 5, 2, 0]]
    assert tok(["a blue"]).tolist()[0][2] == tok.unk_id
    with pytest.raises(ValueError, match="captions"):
        tok(["a red a red"])


def test_a_few_training_steps_reduce_the_loss_on_a_fixed_batch(tmp_path) -> None:
    config = TrainConfig.from_dict(
        {"out_dir": str(tmp_path), "batch_size": 8, "lr": 3e-3, "model": TINY_MODEL}
    )
    trainer = Trainer(config)
    pixels, ids = trainer.batch(0)

    def fixed_loss() -> torch.Tensor:
        return trainer.loss(pixels, ids, torch.Generator().manual_seed(0))

    with torch.no_grad():
        before = float(fixed_loss())
    for _ in range(15):
        trainer.optimizer.zero_grad()
        fixed_loss().backward()
        trainer.optimizer.step()
    with torch.no_grad():
        after = float(fixed_loss())
    assert after < 0.8 * before


def test_training_resumes_exactly_from_a_checkpoint(tmp_path) -> None:
    base = {"batch_size": 4, "model": TINY_MODEL, "checkpoint_minutes": 1e9}
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
    assert (tmp_path / "b" / "final" / WEIGHTS_NAME).is_file()


def test_save_and_load_round_trip_gives_the_same_weights_and_samples(tmp_path) -> None:
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)
    for (name, p), (_, q) in zip(
        pipe.unet.state_dict().items(), loaded.unet.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    prompts = ["a small red circle at the top", "a blue square left of a yellow triangle"]
    a = pipe(prompts, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    b = loaded(prompts, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(a, b)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model"]["block_out_channels"] == TINY_MODEL["block_out_channels"]


def test_load_pipeline_names_a_missing_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pipeline(tmp_path)


class _AlwaysCFG(ReferencePipeline):
    """Runs the two-branch classifier-free guidance batch even at scale 1."""

    def predict_noise(self, latents, t, cond, uncond, guidance_scale):  # type: ignore[no-untyped-def]
        if uncond is None:
            uncond = self.encode_prompt([""] * latents.shape[0])
        return super().predict_noise(latents, t, cond, uncond, guidance_scale)


def test_cfg_at_scale_one_equals_no_guidance() -> None:
    pipe = tiny_pipeline(seed=2)
    cfg = _AlwaysCFG(pipe.unet, pipe.text_encoder, pipe.tokenizer, build_scheduler(pipe.config), pipe.config)
    prompts = ["a large green square on the right", "a red circle above a blue square"]
    plain = pipe(
        prompts, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)
    )
    both = cfg(prompts, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    stronger = cfg(
        prompts, num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(0)
    )
    assert np.allclose(plain, both, atol=1e-5)
    assert not np.allclose(plain, stronger, atol=1e-3)


def test_pipeline_rejects_bad_arguments() -> None:
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(["a small red circle at the top"], num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(["a small red circle at the top"], guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="latents"):
        pipe(["a small red circle at the top"], latents=torch.zeros(2, 3, 32, 32))


def test_sample_grid_uses_one_noise_per_seed_across_prompts() -> None:
    pipe = tiny_pipeline()
    grid = sample_grid(pipe, ["a small red circle at the top", ""], seeds=[0, 1], num_inference_steps=2)
    assert grid.shape == (2, 2, 32, 32, 3)
    single = pipe(
        ["a small red circle at the top"],
        num_inference_steps=2,
        latents=torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(1)),
    )
    assert np.allclose(grid[0, 1], single[0], atol=1e-6)


# --- shipped weights --------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (BUNDLED_WEIGHTS / WEIGHTS_NAME).is_file(),
    reason="reference weights not yet shipped in hopfield_aa/data",
)
def test_shipped_weights_load_and_sample_deterministically() -> None:
    pipe = load_pipeline()
    assert (BUNDLED_WEIGHTS / WEIGHTS_NAME).stat().st_size <= 20 * 2**20
    prompts = ["a small red circle at the top", "a blue square left of a yellow triangle"]
    a = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(7))
    b = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 32, 32, 3)
    assert np.array_equal(a, b)
    assert np.isfinite(a).all()
