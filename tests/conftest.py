"""Hypothesis profiles and shared fixtures.

Profiles: ``fast`` (default, CI), ``thorough`` and ``gpu``; pick with ``SPARVAR_HYPOTHESIS_PROFILE``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fast", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# On a GPU every drawn config is a fresh compile (seconds): few examples, from few configs.
settings.register_profile(
    "gpu", max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SPARVAR_HYPOTHESIS_PROFILE", "fast"))

torch.set_num_threads(min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
