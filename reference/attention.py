"""Dense and masked attention for one autoregressive step (SPEC section 1).

Layout: ``q`` is ``[B, H, Lq, D]`` (the queries of the step's scale), ``k`` and ``v`` are
``[B, H, Lk, D]`` (the KV cache of scales ``0..k``). ``scale`` multiplies ``q @ k^T`` before the
softmax. The reference computes in the inputs' dtype; tests pass float64.
"""

from __future__ import annotations

import torch

from .schedule import Schedule

__all__ = ["check_step_inputs", "dense_attention", "masked_attention"]


def check_step_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      schedule: Schedule, step: int) -> None:
    """Raise ``ValueError`` unless ``q, k, v`` are the step's ``[B, H, Lq, D]`` / ``[B, H, Lk, D]``."""
    schedule.check_step(step)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    nq, nk = schedule.num_queries(step), schedule.num_keys(step)
    if q.shape[2] != nq:
        raise ValueError(f"q has {q.shape[2]} tokens but scale {step} of the schedule has {nq}")
    if k.shape[2] != nk:
        raise ValueError(f"k has {k.shape[2]} tokens but step {step} sees {nk} keys (scales 0..{step})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over all keys. Shapes as in the module docstring; returns ``[B, H, Lq, D]``."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the allowed keys only (SPEC section 1).

    ``allowed``: bool, broadcastable to ``[B, H, Lq, Lk]``. A query with no allowed key outputs
    zeros and log-sum-exp ``-inf`` (never NaN). Returns ``(out [B, H, Lq, D], lse [B, H, Lq])``,
    ``lse`` in natural log of the scaled scores.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - (-inf)) is NaN for an empty row; those rows are all zeros by definition.
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(nan=0.0)
    return torch.matmul(probs, v), lse
