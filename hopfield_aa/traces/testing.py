"""Tiny randomly initialised diffusers models (UNet, SD3, FLUX) and inputs for them, built from config with
no downloads: used by the tests, the capture benchmark and anyone trying the trace tools offline.
Keyword arguments of ``tiny_unet``/``tiny_sd3``/``tiny_flux`` replace entries of their config.
"""

from __future__ import annotations

from typing import Any

import torch

# The tiny configs by diffusers class; SD3 and FLUX share 2 heads of dim 8 and text widths 12 (pooled: 6).
_MMDIT = {
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "pooled_projection_dim": 6,
}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "UNet2DConditionModel": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (16, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 12,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "SD3Transformer2DModel": {
        **_MMDIT,
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 2,
        "caption_projection_dim": 16,
        "pos_embed_max_size": 16,
        "qk_norm": "rms_norm",
    },
    "FluxTransformer2DModel": {
        **_MMDIT,
        "patch_size": 1,
        "in_channels": 8,
        "num_layers": 1,
        "num_single_layers": 1,
        "axes_dims_rope": (2, 2, 4),
    },
}


def _tiny(model_class: str, seed: int, config: dict[str, Any]) -> Any:
    """``diffusers.<model_class>`` from its tiny config updated by ``config``, weights drawn from ``seed``,
    in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, model_class)(**{**TINY_CONFIGS[model_class], **config}).eval()


def tiny_unet(seed: int = 0, **config: Any) -> Any:
    """A ``UNet2DConditionModel`` with self- and cross-attention: 2 levels, 4 heads of dim 4, 8×8 latents."""
    return _tiny("UNet2DConditionModel", seed, config)


def unet_inputs(model: Any, batch: int = 2, text_tokens: int = 5, seed: int = 1) -> dict[str, Any]:
    """Keyword inputs of :func:`tiny_unet` (latents, timestep, text embeddings)."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    return {
        "sample": torch.randn(batch, model.config.in_channels, size, size, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(
            batch, text_tokens, model.config.cross_attention_dim, generator=g
        ),
    }


def tiny_sd3(seed: int = 0, **config: Any) -> Any:
    """An ``SD3Transformer2DModel`` with joint attention (with q/k RMS norm): 2 blocks, 2 heads of dim 8."""
    return _tiny("SD3Transformer2DModel", seed, config)


def sd3_inputs(model: Any, batch: int = 2, text_tokens: int = 5, seed: int = 1) -> dict[str, Any]:
    """Keyword inputs of :func:`tiny_sd3`."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return {
        "hidden_states": torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_tokens, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), 500.0),
    }


def tiny_flux(seed: int = 0, **config: Any) -> Any:
    """A ``FluxTransformer2DModel`` (double and single blocks, rotary embedding): 2 heads of dim 8."""
    return _tiny("FluxTransformer2DModel", seed, config)


def flux_inputs(
    model: Any, batch: int = 1, text_tokens: int = 5, side: int = 4, seed: int = 1
) -> dict[str, Any]:
    """Keyword inputs of :func:`tiny_flux` (packed latents of a ``side``×``side`` grid, ids for rotary)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return {
        "hidden_states": torch.randn(batch, side * side, c.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_tokens, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_tokens, 3),
    }


def tiny_sd_pipeline(seed: int = 0) -> Any:
    """A ``StableDiffusionPipeline`` of tiny random parts (UNet, VAE, CLIP text encoder, character tokenizer).

    Images are 16×16 (8×8 latents); text is tokenised by single characters. Save it with
    ``pipe.save_pretrained(path)`` to get a local model directory for ``hopfield-aa capture --model path``.
    """
    import json
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges.write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=12,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        sample_size=16,
    )
    vae.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(seed),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
