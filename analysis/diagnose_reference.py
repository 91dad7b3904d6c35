"""Why is a reference model's text conditioning weak (or strong)? Three measurements, for any model given
as a caption encoder and a noise predictor:

1. **Text separation**: for captions that differ in exactly one word (colour, shape, size, position,
   relation), the distance between their text states (what cross-attention reads), relative to the mean
   distance between two random captions. A ratio near 0 means the encoder barely tells the words apart.
2. **Conditioning in the denoiser**: ``‖ε(z_t, c) − ε(z_t, c')‖ / ‖ε(z_t, c) − ε(z_t, ∅)‖`` for the same
   one-word changes, per timestep band: how much of the caption's effect on the prediction is carried by
   each attribute. CFG amplifies ``ε_c − ε_∅``; an attribute with a near-zero share cannot be guided.
3. **CFG direction size**: ``‖ε_c − ε_∅‖ / ‖ε_c‖`` per timestep band.

Usage::

    python analysis/diagnose_reference.py                      # the bundled pipeline
    python analysis/diagnose_reference.py --weights analysis/training/reference/ema --out diag.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from hopfield_aa.reference.dataset import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    caption_combinations,
    caption_of,
)

Encoder = Callable[[Sequence[str]], torch.Tensor]
Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SWAPS = {
    "colour": ("colour", list(COLOURS)),
    "shape": ("shape", list(SHAPES)),
    "size": ("size", list(SIZES)),
    "position": ("position", list(POSITIONS)),
}
BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def one_word_pairs(attribute: str, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``n`` pairs of single-object captions that differ only in ``attribute`` (or the pair relation)."""
    out = []
    if attribute == "relation":
        pool = caption_combinations("train", "pair")
        for index in rng.integers(0, len(pool), n):
            record = dict(pool[int(index)])
            other = {**record, "relation": "above" if record["relation"] == "left of" else "left of"}
            out.append((caption_of(record), caption_of(other)))
        return out
    key, values = SWAPS[attribute]
    pool = caption_combinations("train", "single")
    for index in rng.integers(0, len(pool), n):
        record = dict(pool[int(index)])
        choices = [v for v in values if v != record[key]]
        other = {**record, key: choices[int(rng.integers(len(choices)))]}
        out.append((caption_of(record), caption_of(other)))
    return out


def text_separation(encode: Encoder, n: int = 256, seed: int = 0) -> dict[str, float]:
    """Mean distance between text states of one-word-different captions over the mean distance between
    random caption pairs (flattened states; 1 = as different as unrelated captions)."""
    rng = np.random.default_rng(seed)
    pool = [caption_of(r) for kind in ("single", "pair") for r in caption_combinations("train", kind)]
    a = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    b = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    with torch.no_grad():
        baseline = (encode(a) - encode(b)).flatten(1).norm(dim=1).mean()
        out = {}
        for attribute in (*SWAPS, "relation"):
            pairs = one_word_pairs(attribute, n, rng)
            left = encode([p[0] for p in pairs])
            right = encode([p[1] for p in pairs])
            out[attribute] = float((left - right).flatten(1).norm(dim=1).mean() / baseline)
    return out


def conditioning_shares(
    encode: Encoder,
    predict: Predictor,
    clean: torch.Tensor,
    add_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    n: int = 64,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per timestep band: the CFG direction's size and each attribute's share of it (see the module)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for low, high in BANDS:
            t = torch.randint(low, high, (n,), generator=gen)
            z0 = clean[:n]
            zt = add_noise(z0, torch.randn(z0.shape, generator=gen), t)
            row: dict[str, float] = {}
            pairs_by_attr = {a: one_word_pairs(a, n, rng) for a in (*SWAPS, "relation")}
            empty = encode([""] * n)
            for attribute, pairs in pairs_by_attr.items():
                eps_c = predict(zt, t, encode([p[0] for p in pairs]))
                eps_o = predict(zt, t, encode([p[1] for p in pairs]))
                eps_u = predict(zt, t, empty)
                cfg = (eps_c - eps_u).flatten(1).norm(dim=1)
                row[attribute] = float(((eps_c - eps_o).flatten(1).norm(dim=1) / cfg).mean())
                if attribute == "colour":
                    row["cfg_direction_over_eps"] = float((cfg / eps_c.flatten(1).norm(dim=1)).mean())
            out[f"t in [{low}, {high})"] = row
    return out


def sd_model(folder: str | None) -> tuple[Encoder, Predictor, torch.Tensor, Callable]:
    """Encoder, predictor, clean latents and noising of a Stable-Diffusion-shaped reference pipeline."""
    from hopfield_aa.reference.pipeline import encode_captions, load_pipeline
    from hopfield_aa.reference.train import to_pixels

    pipe = load_pipeline(folder)
    images = ShapesDataset(123, "train").batch(0, 64)[0]
    with torch.no_grad():
        clean = pipe.vae.encode(to_pixels(images)).latent_dist.mean * pipe.vae.config.scaling_factor

    def encode(captions: Sequence[str]) -> torch.Tensor:
        return encode_captions(pipe.tokenizer, pipe.text_encoder, captions)

    def predict(zt: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return pipe.unet(zt, t, encoder_hidden_states=states).sample

    return encode, predict, clean, pipe.scheduler.add_noise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default=None, help="pipeline folder (default: the bundled one)")
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    parser.add_argument("--n", type=int, default=64, help="caption pairs per attribute and band")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    encode, predict, clean, add_noise = sd_model(args.weights)
    result = {
        "text_separation": text_separation(encode, n=4 * args.n),
        "conditioning_shares": conditioning_shares(encode, predict, clean, add_noise, n=args.n),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        from hopfield_aa._io import write_json

        write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
