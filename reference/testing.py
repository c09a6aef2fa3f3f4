"""The one input factory and the one error metric, shared by tests, the autotuner, benchmarks and
sweeps (so that "relative error" and "random inputs" mean the same thing everywhere)."""

from __future__ import annotations

import torch

from .schedule import Schedule

__all__ = ["step_inputs", "relative_error"]


def step_inputs(schedule: Schedule, step: int, batch: int, heads: int, head_dim: int, *,
                dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                token_major: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q [B, H, h_k*w_k, D]`` and ``k, v [B, H, L_k, D]`` for one step, standard normal,
    drawn in float32 from a generator seeded with ``seed`` on ``device`` and rounded to ``dtype``.

    ``token_major``: the tensors are views of ``[B, L, H, D]`` storage (the layout a fused QKV
    projection writes), so kernels see non-contiguous strides.
    """
    schedule.check_step(step)
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for n in (schedule.num_queries(step), schedule.num_keys(step), schedule.num_keys(step)):
        shape = (batch, n, heads, head_dim) if token_major else (batch, heads, n, head_dim)
        t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        out.append(t.transpose(1, 2) if token_major else t)
    return out[0], out[1], out[2]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, norm_of: torch.Tensor | None = None) -> float:
    """``||actual - expected|| / ||norm_of||`` (``norm_of`` defaults to ``expected``) in float64,
    over the elements where ``expected`` is finite; ``inf`` when ``actual`` is non-finite anywhere
    ``expected`` is not, or the reverse (NaN never passes as a small error)."""
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        return float("inf")
    ref = e if norm_of is None else norm_of.detach().double().to(actual.device)
    den = torch.where(torch.isfinite(ref), ref, 0.0).norm().clamp_min(1e-30)
    return ((a - e).where(finite, 0.0).norm() / den).item()
