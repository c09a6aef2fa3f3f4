"""Hypothesis profiles and shared fixtures.

Profiles: ``fast`` (default, CI), ``thorough`` and ``gpu``; pick with ``SPARVAR_HYPOTHESIS_PROFILE``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# No example database: a test run writes nothing outside its temporary directories.
settings.register_profile(
    "fast", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
# On a GPU every drawn config is a fresh compile (seconds): few examples, from few configs.
settings.register_profile(
    "gpu", max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
settings.load_profile(os.environ.get("SPARVAR_HYPOTHESIS_PROFILE", "fast"))

torch.set_num_threads(min(4, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _user_dirs_in_a_temporary_directory(tmp_path_factory):
    """The user's config and cache directories (tuned configs, default study storage) point into
    the test session's temporary directory, so no test writes to the real ones."""
    root = tmp_path_factory.mktemp("user")
    saved = {n: os.environ.get(n) for n in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    os.environ["XDG_CONFIG_HOME"], os.environ["XDG_CACHE_HOME"] = str(root / "config"), str(root / "cache")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
