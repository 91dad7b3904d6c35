"""Training the reference pipeline in two stages, as Stable Diffusion was: first the image autoencoder
(``AutoencoderKL``) on the renders, then, on its frozen latents, the UNet and the text encoder with the
denoising loss. Both stages resume from checkpoints (safetensors + JSON only).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hopfield_aa._io import write_json, write_safetensors
from hopfield_aa.reference.dataset import ShapesDataset
from hopfield_aa.reference.pipeline import (
    Components,
    ModelConfig,
    build_components,
    build_scheduler,
    encode_captions,
    save_pipeline,
)


@dataclass
class TrainConfig:
    """Everything a training run depends on (read from a JSON or TOML file by :func:`load_config`).

    Stage 1 trains the autoencoder for ``vae_steps`` steps (skipped when ``out_dir/vae`` holds a finished
    one). Stage 2 trains UNet and text encoder for ``steps`` optimiser steps or ``max_minutes`` of wall
    time, whichever comes first, writing a checkpoint every ``checkpoint_minutes``. ``model`` holds
    :class:`~hopfield_aa.reference.pipeline.ModelConfig` fields.
    """

    out_dir: str = "runs/reference"
    seed: int = 0
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    steps: int = 16000
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 0.01
    warmup_steps: int = 300
    lr_decay_steps: int = 0
    lr_final: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.9995
    checkpoint_minutes: float = 10.0
    max_minutes: float = 0.0
    num_threads: int = 2
    pair_fraction: float = 0.5
    model: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        config = cls(**data)
        for name in ("steps", "batch_size", "vae_batch_size"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
        if config.vae_steps < 0:
            raise ValueError(f"vae_steps must be >= 0, got {config.vae_steps}")
        if not 0.0 <= config.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {config.caption_dropout}")
        if not 0.0 < config.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {config.ema_decay}")
        if not 0 <= config.lr_decay_steps <= config.steps:
            raise ValueError(
                f"lr_decay_steps must lie in [0, steps = {config.steps}], got {config.lr_decay_steps}"
            )
        if not 0.0 <= config.lr_final <= config.lr:
            raise ValueError(f"lr_final must lie in [0, lr = {config.lr}], got {config.lr_final}")
        config.model_config()  # validates the model section
        return config


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read a :class:`TrainConfig` from a ``.json`` or ``.toml`` file."""
    file = Path(path)
    if file.suffix == ".toml":
        import tomllib

        data = tomllib.loads(file.read_text(encoding="utf-8"))
    elif file.suffix == ".json":
        data = json.loads(file.read_text(encoding="utf-8"))
    else:
        raise ValueError(f"config must be a .json or .toml file, got {file}")
    return TrainConfig.from_dict(data)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """Renders ``(B, H, W, 3)`` in [0, 1] as the autoencoder's input ``(B, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) * 2.0 - 1.0


class Trainer:
    """One training run: the autoencoder stage, then the denoiser stage with EMA.

    Autoencoder loss (stage 1), on pixels ``x`` in [-1, 1] and a latent ``z ~ q(z | x)``:

        L_vae = E |x − dec(z)| + E (x − dec(z))² + w_KL KL(q(z | x) ‖ N(0, I)),

    after which the latents are scaled by ``1 / std(z)`` (the ``scaling_factor`` SD stores, 0.18215 there).

    Denoising loss (stage 2), the min-SNR-weighted noise-prediction error on scaled latents ``z₀``:

        L = E_{t, ε} [ w(t) ‖ε_θ(z_t, t, c) − ε‖² ],   z_t = √ᾱ_t z₀ + √(1 − ᾱ_t) ε,
        w(t) = min(SNR(t), γ) / SNR(t),  SNR(t) = ᾱ_t / (1 − ᾱ_t),

    with the caption ``c`` replaced by ``""`` with probability ``caption_dropout`` (so the same network
    gives the unconditional prediction for classifier-free guidance). Data, noise, timesteps and caption
    dropout at step ``k`` depend only on ``(seed, k)``, so a resumed run continues exactly.
    """

    def __init__(self, config: TrainConfig) -> None:
        from diffusers.training_utils import EMAModel

        self.config = config
        self.model_config = config.model_config()
        self.out_dir = Path(config.out_dir)
        torch.manual_seed(config.seed)
        self.net: Components = build_components(self.model_config, self.out_dir / "tokenizer")
        self.noise_scheduler = build_scheduler(self.model_config, "ddpm")
        self.params = [*self.net.unet.parameters(), *self.net.text_encoder.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.ema = EMAModel(self.params, decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)
        self.dataset = ShapesDataset(config.seed, "train", pair_fraction=config.pair_fraction)
        self.step = 0
        self.warmup_from = 0
        self.losses: list[float] = []
        self.vae_losses: list[float] = []

    @property
    def n_parameters(self) -> dict[str, int]:
        return {
            name: sum(p.numel() for p in getattr(self.net, name).parameters())
            for name in ("vae", "unet", "text_encoder")
        }

    # --- stage 1: the autoencoder -------------------------------------------------------------------

    def train_vae(self, progress: bool = True) -> None:
        """Train the autoencoder (or load the finished one from ``out_dir/vae``) and set its scaling."""
        from diffusers import AutoencoderKL
        from tqdm.auto import tqdm

        folder = self.out_dir / "vae"
        if (folder / "config.json").is_file():
            self.net.vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
            self.vae_losses = _read_losses(folder / "losses.safetensors")
            self.net.vae.requires_grad_(False).eval()
            return
        cfg = self.config
        vae = self.net.vae.train()
        optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        data = ShapesDataset(cfg.seed + 1, "train", pair_fraction=cfg.pair_fraction)
        generator = torch.Generator().manual_seed(cfg.seed)
        for step in tqdm(range(cfg.vae_steps), desc="autoencoder", disable=not progress):
            pixels = to_pixels(data.batch(step, cfg.vae_batch_size)[0])
            posterior = vae.encode(pixels).latent_dist
            recon = vae.decode(posterior.sample(generator)).sample
            err = recon - pixels
            loss = err.abs().mean() + err.square().mean() + cfg.vae_kl_weight * posterior.kl().mean()
            lr = (
                cfg.vae_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"autoencoder loss became {value} at step {step}")
            self.vae_losses.append(value)
        vae.requires_grad_(False).eval()
        with torch.no_grad():
            probe = to_pixels(ShapesDataset(cfg.seed + 2, "train", cfg.pair_fraction).batch(0, 1024)[0])
            latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in probe.split(256)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        vae.save_pretrained(folder, safe_serialization=True)
        write_safetensors(folder / "losses.safetensors", {"loss": torch.tensor(self.vae_losses)})

    @torch.no_grad()
    def latents_of(self, images: np.ndarray) -> torch.Tensor:
        """Scaled latents ``z₀`` of renders (the posterior mean, as at sampling time the decoder sees)."""
        vae = self.net.vae
        return vae.encode(to_pixels(images)).latent_dist.mean * vae.config.scaling_factor

    # --- stage 2: the denoiser ----------------------------------------------------------------------

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """Scaled latents and captions (with caption dropout) of batch ``step``."""
        images, captions, _ = self.dataset.batch(step, self.config.batch_size)
        rng = np.random.default_rng([self.config.seed, 7, step])
        dropped = rng.random(len(captions)) < self.config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, dropped, strict=True)]
        return self.latents_of(images), captions

    def loss(self, latents: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        """The weighted denoising loss of one batch (see the class docstring)."""
        from diffusers.training_utils import compute_snr

        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        states = encode_captions(self.net.tokenizer, self.net.text_encoder, captions)
        pred = self.net.unet(noisy, timesteps, encoder_hidden_states=states).sample
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        if self.config.snr_gamma > 0:
            snr = compute_snr(self.noise_scheduler, timesteps)
            per_sample = per_sample * torch.clamp(snr, max=self.config.snr_gamma) / snr
        return per_sample.mean()

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr`` over ``warmup_steps`` (again after a resume from EMA weights only),
        then constant (the EMA does the averaging) until the last ``lr_decay_steps`` of ``steps``, over
        which it follows a half cosine down to ``lr_final``."""
        cfg = self.config
        warm = min(1.0, (step - self.warmup_from + 1) / max(cfg.warmup_steps, 1))
        lr = cfg.lr
        if cfg.lr_decay_steps > 0:
            t = min(max((step - (cfg.steps - cfg.lr_decay_steps)) / cfg.lr_decay_steps, 0.0), 1.0)
            lr = cfg.lr_final + (cfg.lr - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * t))
        return lr * warm

    def train_step(self) -> float:
        """One optimiser step on batch ``self.step``; returns its loss."""
        self.net.unet.train()
        self.net.text_encoder.train()
        latents, captions = self.batch(self.step)
        generator = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + self.step)
        loss = self.loss(latents, captions, generator)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.ema.step(self.params)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {self.step}")
        self.losses.append(value)
        self.step += 1
        return value

    # --- checkpoints --------------------------------------------------------------------------------

    def parameter_names(self) -> list[str]:
        names = [f"unet.{n}" for n, _ in self.net.unet.named_parameters()]
        return names + [f"text_encoder.{n}" for n, _ in self.net.text_encoder.named_parameters()]

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint/``: ``ema.safetensors``, ``state.json`` and ``losses.safetensors`` (enough
        to resume; small enough to commit) and ``params.safetensors`` + ``optimizer.safetensors`` (an
        exact resume), then the EMA pipeline (``out_dir/ema``) and the loss curve."""
        folder = self.out_dir / "checkpoint"
        names = self.parameter_names()
        write_safetensors(folder / "params.safetensors", dict(zip(names, self.params, strict=True)))
        write_safetensors(folder / "ema.safetensors", dict(zip(names, self.ema.shadow_params, strict=True)))
        opt_state = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, float]] = {}
        for index, entry in opt_state["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    tensors[f"{index}.{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = float(value)
        write_safetensors(folder / "optimizer.safetensors", tensors)
        write_safetensors(
            folder / "losses.safetensors", {"loss": torch.tensor(self.losses, dtype=torch.float32)}
        )
        ema_meta = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        write_json(
            folder / "state.json",
            {
                "step": self.step,
                "warmup_from": self.warmup_from,
                "config": self.config.to_dict(),
                "ema": ema_meta,
                "optimizer_scalars": scalars,
                "param_groups": opt_state["param_groups"],
                "parameter_names": names,
            },
        )
        self.export_ema(self.out_dir / "ema")
        plot_losses(self.losses, self.vae_losses, self.out_dir / "loss.png")
        return folder

    def export_ema(self, path: str | os.PathLike[str], half: bool = False) -> Path:
        """Save the EMA weights as a pipeline folder loadable by ``load_pipeline``."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            extra = {
                "training": {
                    "step": self.step,
                    "samples_seen": self.step * self.config.batch_size,
                    "n_parameters": self.n_parameters,
                    "final_loss_mean_last_200": _tail_mean(self.losses, 200),
                    "config": self.config.to_dict(),
                }
            }
            return save_pipeline(path, self.net, half=half, extra=extra)
        finally:
            self.ema.restore(self.params)

    def load_checkpoint(self, folder: str | os.PathLike[str] | None = None) -> bool:
        """Resume from ``folder`` (default ``out_dir/checkpoint``); returns False when there is none.

        With ``params.safetensors`` and ``optimizer.safetensors`` present the resume is exact; with the
        EMA weights alone (a committed checkpoint) the parameters restart from the EMA weights and the
        learning rate warms up again.
        """
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else self.out_dir / "checkpoint"
        if not (folder / "state.json").is_file():
            return False
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = state["parameter_names"]
        if names != self.parameter_names():
            raise ValueError(f"{folder}: checkpoint parameters do not match the model configuration")
        ema = load_file(folder / "ema.safetensors")
        exact = (folder / "params.safetensors").is_file() and (folder / "optimizer.safetensors").is_file()
        params = load_file(folder / "params.safetensors") if exact else ema
        with torch.no_grad():
            for name, param in zip(names, self.params, strict=True):
                param.copy_(params[name])
        self.ema.load_state_dict({**state["ema"], "shadow_params": [ema[n].clone() for n in names]})
        self.step = int(state["step"])
        self.warmup_from = int(state.get("warmup_from", 0))
        if exact:
            tensors = load_file(folder / "optimizer.safetensors")
            opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
            for key, value in tensors.items():
                index, name = key.split(".", 1)
                opt_state["state"].setdefault(int(index), {})[name] = value
            for index, entry in state["optimizer_scalars"].items():
                for name, value in entry.items():
                    opt_state["state"].setdefault(int(index), {})[name] = torch.tensor(value)
            self.optimizer.load_state_dict(opt_state)
        else:
            self.warmup_from = self.step
        self.losses = _read_losses(folder / "losses.safetensors")
        return True

    def train(self, progress: bool = True) -> dict[str, Any]:
        """Run (or resume) both stages to ``steps`` or ``max_minutes``; returns a summary dict."""
        from tqdm.auto import tqdm

        cfg = self.config
        start = time.monotonic()
        self.train_vae(progress=progress)
        last_save = time.monotonic()
        first_step = self.step
        bar = tqdm(total=cfg.steps, initial=self.step, desc="denoiser", disable=not progress)
        stop = _StopRequest()
        with stop:
            while self.step < cfg.steps and not stop.requested:
                self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{_tail_mean(self.losses, 50):.4f}")
                now = time.monotonic()
                if (now - last_save) / 60.0 >= cfg.checkpoint_minutes:
                    self.save_checkpoint()
                    last_save = now
                if cfg.max_minutes > 0 and (now - start) / 60.0 >= cfg.max_minutes:
                    break
        bar.close()
        elapsed = time.monotonic() - start
        self.save_checkpoint()
        final = self.export_ema(self.out_dir / "final", half=True)
        return {
            "steps": self.step,
            "steps_this_run": self.step - first_step,
            "seconds": elapsed,
            "seconds_per_step": elapsed / max(self.step - first_step, 1),
            "final_loss": _tail_mean(self.losses, 200),
            "n_parameters": self.n_parameters,
            "final": str(final),
        }


class _StopRequest:
    """While active, SIGTERM and SIGINT ask the training loop to stop after the current step (which then
    writes its checkpoint and final export) instead of killing it mid-write; a second signal kills."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def export_checkpoint(out_dir: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Write the EMA weights of ``out_dir``'s latest checkpoint as a float16 pipeline folder ``target``
    (what the package ships), without training."""
    folder = Path(out_dir)
    state = folder / "checkpoint" / "state.json"
    if not state.is_file():
        raise FileNotFoundError(f"no checkpoint to export: {state} is missing")
    config = TrainConfig.from_dict(
        {**json.loads(state.read_text(encoding="utf-8"))["config"], "out_dir": str(folder)}
    )
    trainer = Trainer(config)
    trainer.train_vae(progress=False)  # loads the finished autoencoder
    trainer.load_checkpoint()
    return trainer.export_ema(target, half=True)


def _read_losses(path: Path) -> list[float]:
    from safetensors.torch import load_file

    return load_file(path)["loss"].tolist() if path.is_file() else []


def _tail_mean(values: list[float], n: int) -> float:
    return float(np.mean(values[-n:])) if values else float("nan")


def plot_losses(losses: list[float], vae_losses: list[float], path: str | os.PathLike[str]) -> None:
    """Save both stages' loss curves (moving averages, log scale) as one PNG."""
    from hopfield_aa.reference.plots import loss_figure

    if losses or vae_losses:
        from hopfield_aa._io import save_figure

        save_figure(loss_figure(losses, vae_losses), path)


def train_reference(config: TrainConfig, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train (resuming from ``out_dir/checkpoint`` when present) and return the run summary."""
    torch.set_num_threads(max(int(config.num_threads), 1))
    trainer = Trainer(config)
    if resume and trainer.load_checkpoint():
        print(f"resumed from step {trainer.step}")
    summary = trainer.train(progress=progress)
    write_json(Path(config.out_dir) / "summary.json", summary)
    return summary


__all__ = [
    "TrainConfig",
    "Trainer",
    "export_checkpoint",
    "load_config",
    "plot_losses",
    "to_pixels",
    "train_reference",
]
