"""Loading official state dicts into the project's networks, with mismatches named."""

from __future__ import annotations

import torch
from torch import nn

from .errors import SparvarError

__all__ = ["load_state"]


def load_state(module: nn.Module, state: dict, what: str) -> None:
    """Load ``state`` into ``module`` exactly (every name, every shape); otherwise one
    ``SparvarError`` listing the missing, unexpected and mis-shaped entries by name and shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{n} {tuple(state[n].shape)} (expected {tuple(own[n].shape)})" for n in set(own) & set(state)
                    if isinstance(state[n], torch.Tensor) and state[n].shape != own[n].shape)
    problems = [f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if items]
    if problems:
        raise SparvarError(f"{what} does not fit this model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
