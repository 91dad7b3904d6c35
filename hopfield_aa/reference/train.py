"""Training the reference model: configuration, the denoising loss, EMA, resumable checkpoints
(safetensors + JSON only) and the loss curve.
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
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file

from hopfield_aa.reference.dataset import ShapesDataset
from hopfield_aa.reference.model import (
    ModelConfig,
    build_model,
    build_scheduler,
    count_parameters,
    save_model,
    write_json,
    write_safetensors,
)


@dataclass
class TrainConfig:
    """Everything a training run depends on (read from a JSON or TOML file by :func:`load_config`).

    ``model`` holds :class:`ModelConfig` fields. A run stops after ``steps`` optimiser steps or
    ``max_minutes`` of wall time, whichever comes first, and writes a checkpoint every
    ``checkpoint_minutes`` (and every ``checkpoint_every`` steps when that is > 0).
    """

    out_dir: str = "runs/reference"
    seed: int = 0
    steps: int = 6000
    batch_size: int = 32
    lr: float = 6e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_minutes: float = 4.0
    checkpoint_every: int = 0
    max_minutes: float = 0.0
    num_threads: int = 1
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
        if config.steps < 1 or config.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0.0 <= config.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {config.caption_dropout}")
        if not 0.0 < config.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {config.ema_decay}")
        config.model_config()  # validates the model section
        return config


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read a :class:`TrainConfig` from a ``.json`` or ``.toml`` file."""
    file = Path(path)
    if file.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError as err:  # Python 3.10
            raise ValueError("TOML configs need Python >= 3.11; use JSON") from err
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    elif file.suffix == ".json":
        data = json.loads(file.read_text(encoding="utf-8"))
    else:
        raise ValueError(f"config must be a .json or .toml file, got {file}")
    return TrainConfig.from_dict(data)


class Trainer:
    """One training run: model, optimiser, EMA, and the deterministic data stream.

    The loss at step ``k`` is the min-SNR-weighted noise-prediction error

        L = E_{t, ε} [ w(t) ‖ε_θ(x_t, t, c) − ε‖² ],   x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,
        w(t) = min(SNR(t), γ) / SNR(t),  SNR(t) = ᾱ_t / (1 − ᾱ_t),

    with the caption ``c`` replaced by ``""`` with probability ``caption_dropout`` (so the same network
    gives the unconditional prediction for classifier-free guidance). Data, noise, timesteps and caption
    dropout at step ``k`` depend only on ``(seed, k)``, so a resumed run continues exactly.

    Examples
    --------
    >>> trainer = Trainer(TrainConfig(steps=2, batch_size=4, out_dir="/tmp/ref"))  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.model_config = config.model_config()
        torch.manual_seed(config.seed)
        self.unet, self.text_encoder, self.tokenizer = build_model(self.model_config)
        self.noise_scheduler = build_scheduler(self.model_config, "ddpm")
        self.params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.ema = EMAModel(self.params, decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)
        self.dataset = ShapesDataset(config.seed, "train", pair_fraction=config.pair_fraction)
        self.step = 0
        self.losses: list[float] = []
        self.out_dir = Path(config.out_dir)

    @property
    def n_parameters(self) -> dict[str, int]:
        return {"unet": count_parameters(self.unet), "text_encoder": count_parameters(self.text_encoder)}

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels ``(B, 3, 32, 32)`` in [-1, 1] and token ids of batch ``step`` with caption dropout."""
        images, captions, _ = self.dataset.batch(step, self.config.batch_size)
        rng = np.random.default_rng([self.config.seed, 7, step])
        dropped = rng.random(len(captions)) < self.config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, dropped, strict=True)]
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2) * 2.0 - 1.0
        return pixels, self.tokenizer(captions)

    def loss(self, pixels: torch.Tensor, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The weighted denoising loss of one batch (see the class docstring)."""
        n = pixels.shape[0]
        noise = torch.randn(pixels.shape, generator=generator)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator
        )
        noisy = self.noise_scheduler.add_noise(pixels, noise, timesteps)
        states = self.text_encoder(input_ids=ids).last_hidden_state
        pred = self.unet(noisy, timesteps, encoder_hidden_states=states).sample
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        if self.config.snr_gamma > 0:
            snr = compute_snr(self.noise_scheduler, timesteps)
            per_sample = per_sample * torch.clamp(snr, max=self.config.snr_gamma) / snr
        return per_sample.mean()

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr`` over ``warmup_steps``, then constant (EMA does the averaging)."""
        warm = max(self.config.warmup_steps, 1)
        return self.config.lr * min(1.0, (step + 1) / warm)

    def train_step(self) -> float:
        """One optimiser step on batch ``self.step``; returns its loss."""
        self.unet.train()
        self.text_encoder.train()
        pixels, ids = self.batch(self.step)
        generator = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + self.step)
        loss = self.loss(pixels, ids, generator)
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

    # --- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint/`` (weights, EMA, optimiser state as safetensors; the rest JSON) and
        ``ema/`` (the EMA weights as a loadable model) under ``out_dir``, plus the loss curve."""
        folder = self.out_dir / "checkpoint"
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"unet.{n}" for n, _ in self.unet.named_parameters()]
        names += [f"text_encoder.{n}" for n, _ in self.text_encoder.named_parameters()]
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
        ema_meta = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        state = {
            "step": self.step,
            "config": self.config.to_dict(),
            "ema": ema_meta,
            "optimizer_scalars": scalars,
            "param_groups": opt_state["param_groups"],
            "parameter_names": names,
        }
        write_safetensors(
            folder / "losses.safetensors", {"loss": torch.tensor(self.losses, dtype=torch.float32)}
        )
        write_json(folder / "state.json", state)
        self.export_ema(self.out_dir / "ema")
        plot_loss(self.losses, self.out_dir / "loss.png")
        return folder

    def export_ema(self, path: str | os.PathLike[str]) -> Path:
        """Save the EMA weights as a model folder loadable by :func:`~hopfield_aa.reference.load_pipeline`."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            extra = {
                "training": {
                    "step": self.step,
                    "n_parameters": self.n_parameters,
                    "final_loss_mean_last_200": _tail_mean(self.losses, 200),
                    "config": self.config.to_dict(),
                }
            }
            return save_model(path, self.unet, self.text_encoder, self.model_config, extra=extra)
        finally:
            self.ema.restore(self.params)

    def load_checkpoint(self, folder: str | os.PathLike[str] | None = None) -> bool:
        """Resume from ``folder`` (default ``out_dir/checkpoint``); returns False when there is none."""
        folder = Path(folder) if folder is not None else self.out_dir / "checkpoint"
        if not (folder / "state.json").is_file():
            return False
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        params = load_file(folder / "params.safetensors")
        ema = load_file(folder / "ema.safetensors")
        names = state["parameter_names"]
        if len(names) != len(self.params):
            raise ValueError(
                f"{folder}: checkpoint has {len(names)} parameters, the model {len(self.params)}"
            )
        with torch.no_grad():
            for name, param in zip(names, self.params, strict=True):
                if params[name].shape != param.shape:
                    raise ValueError(f"{folder}: parameter {name} has shape {tuple(params[name].shape)}")
                param.copy_(params[name])
        self.ema.load_state_dict({**state["ema"], "shadow_params": [ema[n].clone() for n in names]})
        tensors = load_file(folder / "optimizer.safetensors")
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            opt_state["state"].setdefault(int(index), {})[name] = value
        for index, entry in state["optimizer_scalars"].items():
            for name, value in entry.items():
                opt_state["state"].setdefault(int(index), {})[name] = torch.tensor(value)
        self.optimizer.load_state_dict(opt_state)
        self.step = int(state["step"])
        self.losses = load_file(folder / "losses.safetensors")["loss"].tolist()
        return True

    def train(self, progress: bool = True) -> dict[str, Any]:
        """Run (or resume) to ``steps`` or ``max_minutes``; returns a summary dict."""
        from tqdm.auto import tqdm

        cfg = self.config
        start = time.monotonic()
        last_save = start
        first_step = self.step
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train-reference", disable=not progress)
        while self.step < cfg.steps:
            loss = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{_tail_mean(self.losses, 50):.4f}")
            now = time.monotonic()
            due = (now - last_save) / 60.0 >= cfg.checkpoint_minutes
            due |= cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0
            if due:
                self.save_checkpoint()
                last_save = now
            if cfg.max_minutes > 0 and (now - start) / 60.0 >= cfg.max_minutes:
                break
            del loss
        bar.close()
        elapsed = time.monotonic() - start
        self.save_checkpoint()
        final = self.export_ema(self.out_dir / "final")
        return {
            "steps": self.step,
            "steps_this_run": self.step - first_step,
            "seconds": elapsed,
            "seconds_per_step": elapsed / max(self.step - first_step, 1),
            "final_loss": _tail_mean(self.losses, 200),
            "n_parameters": self.n_parameters,
            "final": str(final),
        }


def _tail_mean(values: list[float], n: int) -> float:
    return float(np.mean(values[-n:])) if values else float("nan")


def plot_loss(losses: list[float], path: str | os.PathLike[str], window: int = 50) -> None:
    """Save the training loss (raw and moving average over ``window`` steps, log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not losses:
        return
    values = np.asarray(losses)
    steps = np.arange(1, len(values) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, lw=0.5, alpha=0.35, label="per step")
    if len(values) >= window:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window} steps")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("min-SNR weighted ε-MSE")
    ax.set_title("reference model training loss")
    ax.legend()
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, target)


def train_reference(config: TrainConfig, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train (resuming from ``out_dir/checkpoint`` when present) and return the run summary."""
    torch.set_num_threads(max(int(config.num_threads), 1))
    trainer = Trainer(config)
    if resume and trainer.load_checkpoint():
        print(f"resumed from step {trainer.step}")
    summary = trainer.train(progress=progress)
    write_json(Path(config.out_dir) / "summary.json", summary)
    return summary


__all__ = ["TrainConfig", "Trainer", "load_config", "plot_loss", "train_reference"]
