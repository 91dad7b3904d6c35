"""Shared test set-up: hypothesis profiles and deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" is the small default profile; "deep" is for on-demand runs: HYPOTHESIS_PROFILE=deep pytest
settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests run many small operations, where intra-op threads only add overhead (and pytest -n 2 already
# uses both cores).
torch.set_num_threads(1)


# A reference pipeline small enough to build, train a few steps and sample in well under a second.
TINY_REFERENCE = {
    "vae_channels": [8, 8, 8],
    "vae_groups": 4,
    "unet_channels": [16, 32],
    "unet_groups": 4,
    "attention_heads": 2,
    "text_hidden_size": 16,
    "text_intermediate_size": 32,
    "text_layers": 1,
    "text_heads": 2,
}


@pytest.fixture(scope="session")
def tiny_reference_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved, randomly initialised reference pipeline folder (shared by the session; do not modify)."""
    from hopfield_aa.reference.pipeline import ModelConfig, build_components, save_pipeline

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_reference")
    components = build_components(ModelConfig.from_dict(TINY_REFERENCE), root / "tokenizer-src")
    return save_pipeline(root / "pipeline", components, half=True)
