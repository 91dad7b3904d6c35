"""Shared test set-up: hypothesis profiles and deterministic torch."""

from __future__ import annotations

import os

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
