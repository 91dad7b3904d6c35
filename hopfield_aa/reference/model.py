"""The reference text-to-image model: word tokenizer, CLIP text encoder, conditional UNet, and the
pipeline that samples from them with classifier-free guidance; saving and loading in safetensors + JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from hopfield_aa.reference.dataset import IMAGE_SIZE, vocabulary

BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "data" / "reference"
"""Folder of the shipped weights: ``model.safetensors`` and ``config.json``."""

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class ModelConfig:
    """Sizes of the reference model (UNet, text encoder) and its noise schedule.

    The UNet is a diffusers ``UNet2DConditionModel`` on RGB pixels; ``cross_attention_levels`` says which
    resolution levels use ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` (the others are plain
    ResNet blocks), so cross-attention to the caption happens at those resolutions and in the mid block.
    """

    image_size: int = IMAGE_SIZE
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    cross_attention_levels: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 8
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 12
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    words: list[str] = field(default_factory=vocabulary)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.cross_attention_levels = tuple(bool(c) for c in self.cross_attention_levels)
        if len(self.block_out_channels) != len(self.cross_attention_levels):
            raise ValueError(
                "cross_attention_levels must have one entry per block_out_channels level, got "
                f"{len(self.cross_attention_levels)} and {len(self.block_out_channels)}"
            )
        if not any(self.cross_attention_levels):
            raise ValueError("cross_attention_levels must enable cross-attention at one level at least")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        out["cross_attention_levels"] = list(self.cross_attention_levels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**known)


class WordTokenizer:
    """Word-level tokenizer over the grammar's vocabulary: ``<bos> words <eos> <pad>...``.

    The empty caption (used for classifier-free guidance) is ``<bos> <eos> <pad>...``; unknown words map
    to ``<unk>``.

    Examples
    --------
    >>> tok = WordTokenizer(["a", "red", "circle"], max_length=6)
    >>> tok(["a red circle"]).tolist()
    [[1, 4, 5, 3, 2, 0]]
    """

    SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, words: Sequence[str], max_length: int = 12) -> None:
        self.words = list(words)
        self.max_length = int(max_length)
        self.token_to_id = {t: i for i, t in enumerate([*self.SPECIAL, *self.words])}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    @property
    def vocab_size(self) -> int:
        return len(self.token_to_id)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids ``(len(captions), max_length)`` as int64."""
        if isinstance(captions, str):
            captions = [captions]
        ids = torch.full((len(captions), self.max_length), self.pad_id, dtype=torch.long)
        for row, caption in enumerate(captions):
            tokens = [self.token_to_id.get(w, self.unk_id) for w in caption.lower().split()]
            seq = [self.bos_id, *tokens, self.eos_id]
            if len(seq) > self.max_length:
                raise ValueError(
                    f"captions[{row}] has {len(tokens)} words; at most {self.max_length - 2} fit: {caption!r}"
                )
            ids[row, : len(seq)] = torch.tensor(seq)
        return ids


def build_unet(config: ModelConfig) -> Any:
    """The conditional UNet of ``config`` (randomly initialised)."""
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in config.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(config.cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_heads,  # diffusers' legacy name: this is the head count
        norm_num_groups=config.norm_num_groups,
    )


def build_text_encoder(config: ModelConfig) -> Any:
    """A small transformers ``CLIPTextModel`` over the word vocabulary (randomly initialised)."""
    text_config = CLIPTextConfig(
        vocab_size=len(WordTokenizer.SPECIAL) + len(config.words),
        hidden_size=config.text_hidden_size,
        intermediate_size=2 * config.text_hidden_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        projection_dim=config.text_hidden_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return CLIPTextModel(text_config)


def build_scheduler(config: ModelConfig, kind: str = "ddim") -> Any:
    """The noise schedule: ``"ddpm"`` for training, ``"ddim"`` or ``"dpm"`` (DPM-Solver++) for sampling."""
    ddpm: Any = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,
    )
    if kind == "ddpm":
        return ddpm
    # Sampling starts below t = T - 1 ("leading" spacing, offset 1): the cosine schedule has
    # ᾱ_{T-1} ≈ 2e-9, where x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t multiplies any error in ε̂ by ~2e4 and the
    # first step's garbage would set the layout of the image. x̂_0 is clipped to the data range [-1, 1].
    if kind == "ddim":
        return DDIMScheduler.from_config(
            ddpm.config, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1, clip_sample=True
        )
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            ddpm.config, timestep_spacing="leading", steps_offset=1, thresholding=True, sample_max_value=1.0
        )
    raise ValueError(f"scheduler must be 'ddpm', 'ddim' or 'dpm', got {kind!r}")


class ReferencePipeline:
    """Text-to-image sampling from the reference model, called like a diffusers pipeline.

    Each denoising step predicts noise with ``self.unet(latents, t, encoder_hidden_states=...)``, so
    attention processors installed with ``pipe.unet.set_attn_processor`` act on every call. With
    classifier-free guidance (``guidance_scale != 1``) the batch is ``[unconditional, conditional]`` and

        ε̂ = ε_∅ + s (ε_c − ε_∅),

    where ``ε_∅`` is the prediction for the empty caption; at ``s = 1`` only the conditional branch runs
    (ε̂ = ε_c exactly). The scheduler then steps ``x_t → x_{t-1}`` with the predicted clean image
    ``x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t`` clipped to [-1, 1] (pixel-space sampling).

    Parameters
    ----------
    unet : UNet2DConditionModel
    text_encoder : CLIPTextModel
    tokenizer : WordTokenizer
    scheduler : diffusers scheduler (DDIM by default from :func:`load_pipeline`)
    config : ModelConfig

    Examples
    --------
    >>> pipe = load_pipeline()  # doctest: +SKIP
    >>> images = pipe(["a small red circle at the top"], num_inference_steps=25, guidance_scale=3.0,
    ...               generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    >>> images.shape  # doctest: +SKIP
    (1, 32, 32, 3)
    """

    def __init__(
        self,
        unet: Any,
        text_encoder: Any,
        tokenizer: WordTokenizer,
        scheduler: Any,
        config: ModelConfig,
    ) -> None:
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device) -> ReferencePipeline:
        """Move the networks to ``device``; returns ``self``."""
        self.unet.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text encoder states ``(len(prompts), max_length, hidden)``; ``""`` is the unconditional prompt."""
        ids = self.tokenizer(list(prompts)).to(self.device)
        return self.text_encoder(input_ids=ids).last_hidden_state.to(self.dtype)

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The guided noise prediction of one step (classifier-free guidance when ``uncond`` is given).

        ``ε̂ = ε_∅ + s (ε_c − ε_∅)`` with the two branches stacked in one UNet call ``[uncond, cond]``.
        A subclass overrides this method to apply another guidance rule.
        """
        if uncond is None:
            return self.unet(latents, t, encoder_hidden_states=cond).sample
        both = self.unet(
            torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])
        ).sample
        eps_uncond, eps_cond = both.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        latents: torch.Tensor | None = None,
        progress: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """Sample one image per prompt.

        Parameters
        ----------
        prompts : str or sequence of str, length ``B``
        num_inference_steps : int, default 25
        guidance_scale : float, default 1.0
            CFG scale ``s``; 1 means no guidance (one UNet call per step).
        generator : torch.Generator, optional
            Seeds the initial noise ``x_T ~ N(0, I)`` (and any stochastic scheduler step).
        output_type : {"np", "pt"}
            ``"np"``: float32 array ``(B, H, W, 3)`` in [0, 1]; ``"pt"``: tensor ``(B, 3, H, W)`` in [-1, 1].
        latents : torch.Tensor, optional
            Initial noise ``(B, 3, H, W)``; drawn from ``generator`` when omitted.
        progress : bool, default False
            Show a tqdm bar over the denoising steps.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must hold one prompt at least")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        guidance_scale = float(guidance_scale)
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        size = self.config.image_size
        shape = (len(prompts), 3, size, size)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt([""] * len(prompts)) if guidance_scale != 1.0 else None
        self.scheduler.set_timesteps(int(num_inference_steps), device=self.device)
        timesteps = self.scheduler.timesteps
        if progress:
            from tqdm.auto import tqdm

            timesteps = tqdm(timesteps, desc="sampling", leave=False)
        for t in timesteps:
            model_input = self.scheduler.scale_model_input(latents, t)
            eps = self.predict_noise(model_input, t, cond, uncond, guidance_scale)
            latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample
        images = latents.float().clamp(-1.0, 1.0)
        if output_type == "pt":
            return images
        return ((images + 1.0) / 2.0).permute(0, 2, 3, 1).cpu().numpy()

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` (keys ``unet.*``, ``text_encoder.*``) and ``config.json`` to
        ``path``."""
        return save_model(path, self.unet, self.text_encoder, self.config)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shipped files must be readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON atomically (temporary file in the same folder, then rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")

    _atomic_write(Path(path), write)


def write_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to a safetensors file atomically."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def model_state(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One flat state dict with keys ``unet.*`` and ``text_encoder.*`` (what ``model.safetensors`` holds)."""
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    return state


def save_model(
    path: str | os.PathLike[str],
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    config: ModelConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save weights (safetensors) and configuration (JSON) of a model to the folder ``path``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_NAME, model_state(unet, text_encoder), metadata={"format": "pt"})
    write_json(folder / CONFIG_NAME, {"model": config.to_dict(), **(extra or {})})
    return folder


def build_model(config: ModelConfig) -> tuple[Any, Any, WordTokenizer]:
    """Fresh (random) UNet, text encoder and tokenizer for ``config``."""
    return build_unet(config), build_text_encoder(config), WordTokenizer(config.words, config.max_length)


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[Any, Any, WordTokenizer, ModelConfig]:
    """Load a folder written by :func:`save_model` (strict: every weight must match the configuration)."""
    folder = Path(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"reference model file missing: {f}")
    with open(config_file, encoding="utf-8") as fh:
        meta = json.load(fh)
    if "model" not in meta:
        raise ValueError(f"{config_file} has no 'model' section")
    config = ModelConfig.from_dict(meta["model"])
    unet, text_encoder, tokenizer = build_model(config)
    state = load_file(weights_file)
    for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(part, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"{weights_file}: weights do not match the configuration "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
    unet.to(device).eval()
    text_encoder.to(device).eval()
    return unet, text_encoder, tokenizer, config


def load_pipeline(
    path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu", scheduler: str = "ddim"
) -> ReferencePipeline:
    """The sampling pipeline of a saved reference model.

    Parameters
    ----------
    path : path-like, optional
        Folder with ``model.safetensors`` and ``config.json``; None loads the weights bundled with the
        package (``hopfield_aa/data/reference/``).
    device : str or torch.device, default "cpu"
    scheduler : {"ddim", "dpm"}, default "ddim"
        Sampler: DDIM (deterministic, η = 0) or DPM-Solver++ (multistep).

    Raises
    ------
    FileNotFoundError
        If the folder has no weights (e.g. the bundled weights are not installed).
    """
    unet, text_encoder, tokenizer, config = load_model(BUNDLED_WEIGHTS if path is None else path, device)
    return ReferencePipeline(unet, text_encoder, tokenizer, build_scheduler(config, scheduler), config)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
