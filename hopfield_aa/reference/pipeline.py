"""The reference model as a Stable Diffusion pipeline in miniature: the stock diffusers and transformers
classes (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel``, ``CLIPTokenizer``), built from a
:class:`ModelConfig`, saved as a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads
offline.

The tokenizer is a byte-pair-encoding ``CLIPTokenizer`` whose ``vocab.json`` and ``merges.txt`` this
module writes: each word of the caption grammar is one token (``"red</w>"``), reached from its letters by
one merge per letter, so the files are small and every caption of the grammar tokenises to one id per word.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hopfield_aa.reference.dataset import IMAGE_SIZE, vocabulary

BUNDLED_PIPELINE = Path(__file__).resolve().parent.parent / "data" / "reference"
"""Folder of the shipped pipeline (a diffusers ``StableDiffusionPipeline`` folder)."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SCHEDULERS = ("ddim", "dpm", "euler", "pndm", "ddpm")
"""Sampler names accepted by :func:`build_scheduler` and :func:`load_pipeline`."""


@dataclass
class ModelConfig:
    """Sizes of the reference pipeline's networks and its noise schedule.

    The image autoencoder maps ``image_size``² RGB images to latents of ``latent_channels`` channels at
    ``image_size / 2^(len(vae_channels) − 1)`` per side (32 → 8 with three levels, as SD's factor 8 maps
    512 → 64). The UNet denoises those latents with cross-attention to the text encoder's states at the
    levels where ``cross_attention_levels`` is true, and in the mid block. The noise schedule defaults to
    Stable Diffusion 1.5's (``scaled_linear``, β from 0.00085 to 0.012, ε-prediction).
    """

    image_size: int = IMAGE_SIZE
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_groups: int = 16
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128)
    cross_attention_levels: tuple[bool, ...] = (True, True)
    layers_per_block: int = 1
    attention_heads: int = 4
    unet_groups: int = 16
    text_hidden_size: int = 128
    text_intermediate_size: int = 256
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 16
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    words: list[str] = field(default_factory=vocabulary)

    def __post_init__(self) -> None:
        self.vae_channels = tuple(int(c) for c in self.vae_channels)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.cross_attention_levels = tuple(bool(c) for c in self.cross_attention_levels)
        if len(self.unet_channels) != len(self.cross_attention_levels):
            raise ValueError(
                "cross_attention_levels must have one entry per unet_channels level, got "
                f"{len(self.cross_attention_levels)} and {len(self.unet_channels)}"
            )
        if not any(self.cross_attention_levels):
            raise ValueError("cross_attention_levels must enable cross-attention at one level at least")
        factor = 2 ** (len(self.vae_channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size must be divisible by the autoencoder's factor {factor}, got {self.image_size}"
            )

    @property
    def latent_size(self) -> int:
        """Side of the latent grid."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("vae_channels", "unet_channels", "cross_attention_levels"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**data)


# --- tokenizer ---------------------------------------------------------------------------------------


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as CLIP's tokenizer does it: repeatedly merge every occurrence of
    the adjacent pair with the lowest merge rank, until no adjacent pair has a merge."""
    while len(pieces) > 1:
        pairs = [(ranks[p], p) for p in itertools.pairwise(pieces) if p in ranks]
        if not pairs:
            break
        first, second = min(pairs)[1]
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and pieces[i] == first and pieces[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def tokenizer_files(words: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """The ``vocab.json`` mapping and ``merges.txt`` lines of the caption tokenizer.

    The vocabulary holds the two special tokens, the 26 letters with and without the end-of-word marker
    ``</w>``, and every token the merges create. Merges are added until byte-pair encoding (which applies
    the lowest-ranked merge first, whatever word it came from) turns every grammar word into one token; a
    merge added later has a higher rank, so it never changes a word that was already whole. A word outside
    the grammar splits into smaller pieces (still tokenised, never an error).
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    add(BOS_TOKEN)
    add(EOS_TOKEN)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    for letter in letters:
        add(letter)
    for letter in letters:
        add(letter + "</w>")
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word.isascii() or not word.isalpha() or not word.islower():
            raise ValueError(f"words must be lower-case ASCII letters only, got {word!r}")
        initial = [*word[:-1], word[-1] + "</w>"]
        pieces = _bpe(initial, ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            add(pieces[0] + pieces[1])
            pieces = _bpe(initial, ranks)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return vocab, merges


def write_tokenizer(folder: str | os.PathLike[str], words: Sequence[str], max_length: int) -> Path:
    """Write a ``CLIPTokenizer`` folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) for the caption grammar ``words``."""
    from hopfield_aa._io import write_json, write_text

    target = Path(folder)
    vocab, merges = tokenizer_files(words)
    write_json(target / "vocab.json", vocab)
    write_text(target / "merges.txt", "#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    write_json(target / "special_tokens_map.json", specials)
    write_json(
        target / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": int(max_length),
            "do_lower_case": True,
            "clean_up_tokenization_spaces": True,
            **specials,
        },
    )
    return target


def build_tokenizer(config: ModelConfig, folder: str | os.PathLike[str]) -> Any:
    """Write the tokenizer files to ``folder`` and load them as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    write_tokenizer(folder, config.words, config.max_length)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


# --- networks ----------------------------------------------------------------------------------------


def build_vae(config: ModelConfig) -> Any:
    """A fresh ``AutoencoderKL`` (image_size² RGB ↔ latent_size² × latent_channels)."""
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        latent_channels=config.latent_channels,
        layers_per_block=1,
        norm_num_groups=config.vae_groups,
        sample_size=config.image_size,
    )


def build_unet(config: ModelConfig) -> Any:
    """A fresh ``UNet2DConditionModel`` on the latent grid, cross-attending to the text states."""
    from diffusers import UNet2DConditionModel

    levels = config.cross_attention_levels
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in levels)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(levels))
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=config.unet_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_heads,  # diffusers' legacy name: this is the head count
        norm_num_groups=config.unet_groups,
    )


def build_text_encoder(config: ModelConfig, vocab_size: int) -> Any:
    """A fresh transformers ``CLIPTextModel`` (causal, as CLIP's) over ``vocab_size`` tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=config.text_hidden_size,
            intermediate_size=config.text_intermediate_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_length,
            projection_dim=config.text_hidden_size,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def build_scheduler(config: ModelConfig | dict[str, Any], kind: str = "ddim") -> Any:
    """The noise schedule as a diffusers scheduler: ``"ddpm"`` (training), or a sampler ``"ddim"``,
    ``"dpm"`` (DPM-Solver++ multistep), ``"euler"`` or ``"pndm"``, all with SD 1.5's timestep spacing
    (``"leading"``, offset 1). ``config`` may also be an existing scheduler's config."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    base: Any
    if isinstance(config, ModelConfig):
        ddpm: Any = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            prediction_type=config.prediction_type,
            clip_sample=False,
        )
        base = ddpm.config
    else:
        base = config
    common = {"timestep_spacing": "leading", "steps_offset": 1}
    if kind == "ddpm":
        return DDPMScheduler.from_config(base)
    if kind == "ddim":
        return DDIMScheduler.from_config(base, set_alpha_to_one=False, clip_sample=False, **common)
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(base, **common)
    if kind == "euler":
        return EulerDiscreteScheduler.from_config(base, **common)
    if kind == "pndm":
        return PNDMScheduler.from_config(base, skip_prk_steps=True, **common)
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {kind!r}")


@dataclass
class Components:
    """The networks of one reference pipeline (what ``StableDiffusionPipeline`` is built from)."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    config: ModelConfig


def build_components(config: ModelConfig, tokenizer_folder: str | os.PathLike[str]) -> Components:
    """Fresh (random) networks of ``config``; the tokenizer files are written to ``tokenizer_folder``."""
    tokenizer = build_tokenizer(config, tokenizer_folder)
    return Components(
        vae=build_vae(config),
        unet=build_unet(config),
        text_encoder=build_text_encoder(config, len(tokenizer)),
        tokenizer=tokenizer,
        config=config,
    )


def encode_captions(tokenizer: Any, text_encoder: Any, captions: Sequence[str]) -> torch.Tensor:
    """Text states ``(len(captions), max_length, hidden)`` exactly as ``StableDiffusionPipeline`` computes
    them: padded to ``model_max_length`` with the end token, no attention mask."""
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def assemble(components: Components, scheduler: str = "ddim") -> Any:
    """A ``diffusers.StableDiffusionPipeline`` of ``components`` (no safety checker, no progress bar)."""
    from diffusers import StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=build_scheduler(components.config, scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(
    folder: str | os.PathLike[str],
    components: Components,
    scheduler: str = "ddim",
    half: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save ``components`` as a ``StableDiffusionPipeline`` folder (safetensors weights, JSON configs).

    The tokenizer folder holds the project's ``vocab.json`` and ``merges.txt``; ``reference_model.json``
    holds the :class:`ModelConfig` and ``extra`` (training record). With ``half=True`` the weights are
    stored in float16 (loaded back in the dtype the caller asks for, float32 by default).
    The folder is written next to the target and renamed into place, so an interrupted save leaves the
    previous folder intact.
    """
    import shutil

    from hopfield_aa._io import atomic_folder, write_json

    target = Path(folder)
    with atomic_folder(target) as staging:
        pipe = assemble(components, scheduler)
        # UNet and autoencoder may be stored in float16; the text encoder stays float32, because
        # transformers loads a checkpoint in its stored dtype while diffusers loads float32 by default, and
        # the pipeline takes the latents' dtype from the text states.
        stored = (pipe.vae, pipe.unet) if half else ()
        for module in stored:
            module.to(torch.float16)
        try:
            pipe.save_pretrained(staging, safe_serialization=True)
        finally:
            for module in stored:
                module.to(torch.float32)
        shutil.rmtree(staging / "tokenizer", ignore_errors=True)
        write_tokenizer(staging / "tokenizer", components.config.words, components.config.max_length)
        write_json(staging / "reference_model.json", {"model": components.config.to_dict(), **(extra or {})})
        for path in staging.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return target


def read_model_config(folder: str | os.PathLike[str]) -> ModelConfig:
    """The :class:`ModelConfig` recorded in a pipeline folder's ``reference_model.json``."""
    file = Path(folder) / "reference_model.json"
    if not file.is_file():
        raise FileNotFoundError(f"not a reference pipeline folder (no reference_model.json): {folder}")
    return ModelConfig.from_dict(json.loads(file.read_text(encoding="utf-8"))["model"])


def load_components(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Components:
    """Load the networks of a saved pipeline folder (offline)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(folder)
    config = read_model_config(root)
    kwargs: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype}
    return Components(
        vae=AutoencoderKL.from_pretrained(root / "vae", **kwargs),
        unet=UNet2DConditionModel.from_pretrained(root / "unet", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", **kwargs),
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True),
        config=config,
    )


__all__ = [
    "BUNDLED_PIPELINE",
    "SCHEDULERS",
    "Components",
    "ModelConfig",
    "assemble",
    "build_components",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "encode_captions",
    "generate",
    "image_size_of",
    "initial_latents",
    "load_components",
    "load_pipeline",
    "pipeline_sha256",
    "read_model_config",
    "save_pipeline",
    "tokenizer_files",
    "write_tokenizer",
]


# --- sampling ----------------------------------------------------------------------------------------


def load_pipeline(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    scheduler: str = "ddim",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """The reference model as a stock ``diffusers.StableDiffusionPipeline`` (offline, no safety checker).

    Parameters
    ----------
    path : path-like, optional
        A pipeline folder written by :func:`save_pipeline`; None loads the one bundled with the package
        (``hopfield_aa/data/reference/``).
    device : str or torch.device, default "cpu"
    scheduler : {"ddim", "dpm", "euler", "pndm", "ddpm"}, default "ddim"
        The sampler, with SD 1.5's timestep spacing.
    dtype : torch.dtype, default float32
        The weights' dtype (they are stored in float16; CPU sampling wants float32).

    Raises
    ------
    FileNotFoundError
        If the folder is not a reference pipeline folder.

    Examples
    --------
    >>> pipe = load_pipeline()  # doctest: +SKIP
    >>> out = pipe("a small red circle at the top", guidance_scale=5.0, output_type="np")  # doctest: +SKIP
    >>> out.images.shape  # doctest: +SKIP
    (1, 32, 32, 3)
    """
    from diffusers import StableDiffusionPipeline

    folder = BUNDLED_PIPELINE if path is None else Path(path)
    if not (Path(folder) / "model_index.json").is_file():
        raise FileNotFoundError(f"not a diffusers pipeline folder (no model_index.json): {folder}")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder),
        local_files_only=True,
        torch_dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = build_scheduler(pipe.scheduler.config, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def image_size_of(pipe: Any) -> int:
    """Side in pixels of the images ``pipe`` generates at its default resolution."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def initial_latents(pipe: Any, seeds: Sequence[int], per_seed: int = 1) -> torch.Tensor:
    """Initial noise ``(len(seeds) * per_seed, C, h, w)`` in float32 on the CPU: seed ``s`` draws its block
    of ``per_seed`` rows from ``torch.Generator().manual_seed(s)`` (rows are seed-major), so a seed gives
    the same starting point whatever the prompt, the guidance or the batch it is sampled in."""
    config = pipe.unet.config
    shape = (per_seed, int(config.in_channels), int(config.sample_size), int(config.sample_size))
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def generate(
    pipe: Any,
    prompts: Sequence[str],
    latents: torch.Tensor,
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    **kwargs: Any,
) -> np.ndarray:
    """Images ``(len(prompts), H, W, 3)`` in [0, 1] from ``pipe`` (a ``StableDiffusionPipeline`` or one
    with its call), one per prompt from the matching row of ``latents``, in batches of ``batch_size``.

    ``guidance_scale`` is the CFG scale s (``s <= 1``: no CFG, one UNet call per step); other keyword
    arguments go to the pipeline (e.g. ``pag_scale`` for a PAG pipeline).
    """
    if len(prompts) != latents.shape[0]:
        raise ValueError(f"latents must have one row per prompt ({len(prompts)}), got {latents.shape[0]}")
    if int(num_inference_steps) < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    chunks = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        out = pipe(
            prompt=list(prompts[start:stop]),
            num_inference_steps=int(num_inference_steps),
            guidance_scale=float(guidance_scale),
            latents=latents[start:stop].to(pipe.device, pipe.unet.dtype),
            output_type="np",
            **kwargs,
        )
        chunks.append(np.asarray(out.images, dtype=np.float32))
    return np.concatenate(chunks)


def pipeline_sha256(folder: str | os.PathLike[str]) -> str:
    """One SHA-256 identifying a saved pipeline: the hash of every file's relative path and bytes, in sorted
    order (weights, configs, tokenizer files, ``reference_model.json``)."""
    import hashlib

    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
