"""Experiment: fine-tune only the autoencoder's decoder of a reference pipeline, written to another folder,
to measure how much of the pipeline's Fréchet distance the decoder accounts for.

The encoder (so the latent space, and therefore the trained denoiser) stays as it is; the decoder learns to
reconstruct renders from their latent means (what it decodes at sampling time) with an L1 + L2 loss, as
Stable Diffusion's ft-MSE autoencoder did. The shipped pipeline is never written: give ``--out``.

    python analysis/finetune_decoder.py --out /tmp/ft --steps 2000
    python analysis/eval_reference.py --weights /tmp/ft --quick      # compare with the bundled pipeline's
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hopfield_aa.reference.dataset import ShapesDataset
from hopfield_aa.reference.pipeline import BUNDLED_PIPELINE
from hopfield_aa.reference.train import to_pixels


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default=str(BUNDLED_PIPELINE), help="pipeline folder to start from")
    parser.add_argument("--out", required=True, help="folder for the pipeline with the fine-tuned decoder")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    source, out = Path(args.weights), Path(args.out)
    if out.resolve() == source.resolve() or out.resolve() == BUNDLED_PIPELINE.resolve():
        raise SystemExit("--out must be a new folder, not the pipeline it starts from")
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    with safe_open(source / "vae" / "diffusion_pytorch_model.safetensors", "pt") as stored:
        dtype = stored.get_tensor(next(iter(stored.keys()))).dtype  # float16 in the shipped pipeline
    vae = AutoencoderKL.from_pretrained(source / "vae", local_files_only=True)  # loads as float32
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    if vae.post_quant_conv is not None:
        vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    data = ShapesDataset(args.seed, "train")
    start = time.monotonic()
    losses = []
    for step in tqdm(range(args.steps), desc="decoder"):
        pixels = to_pixels(data.batch(step, args.batch)[0])
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean
        err = vae.decode(latents).sample - pixels
        loss = err.abs().mean() + err.square().mean()
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:  # warm-up, then cosine decay
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out)
    shutil.rmtree(out / "vae")
    vae.requires_grad_(False).to(dtype).save_pretrained(out / "vae", safe_serialization=True)
    first, last = sum(losses[:50]) / min(50, len(losses)), sum(losses[-50:]) / min(50, len(losses))
    print(
        f"decoder fine-tuned {args.steps} steps in {time.monotonic() - start:.0f} s; loss (mean of 50 steps) "
        f"{first:.4f} -> {last:.4f}; written to {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
