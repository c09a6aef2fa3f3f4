"""The official sources for tests: skipped, with the reason, where they or a package they need
are missing (``sparvar.official`` imports them)."""

import os
from pathlib import Path

import pytest

from sparvar import official

# The sources sit beside the project's checkout (CI and every developer have them there); the
# installed package cannot know where the checkout is.
os.environ.setdefault("SPARVAR_UPSTREAM", str(Path(__file__).resolve().parents[2] / "shared" / "upstream"))


def var_modules():
    try:
        return official.var_modules()
    except official.OfficialSourcesMissing as e:
        pytest.skip(str(e))


def infinity_modules():
    try:
        return official.infinity_modules()
    except official.OfficialSourcesMissing as e:
        pytest.skip(str(e))
