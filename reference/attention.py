"""Dense and masked attention for one autoregressive step (SPEC section 1).

Layout: ``q`` is ``[B, H, Lq, D]`` (the queries of the step's scale), ``k`` and ``v`` are
``[B, H, Lk, D]`` (the KV cache of scales ``0..k``). ``scale`` multiplies ``q @ k^T`` before the
softmax. The reference computes in the inputs' dtype; tests pass float64.

Non-finite inputs (the SPEC is silent; this is the project's reading, and the kernels match it
exactly). Query ``q`` sees only its allowed keys ``A(q)``; keys outside ``A(q)`` never affect it.
- If a scaled score ``s[q, j]``, ``j`` in ``A(q)``, is NaN or +inf, or a value row ``v[j]``,
  ``j`` in ``A(q)``, holds a NaN or an infinity, the output row of ``q`` is NaN in every channel.
  Its log-sum-exp is NaN when a score caused it, and is the usual one when only ``v`` did.
- A score of -inf gives its key probability 0, as if the key were excluded; a query whose
  allowed scores are all -inf (or whose ``A(q)`` is empty) outputs zeros, log-sum-exp -inf.
NaN or an infinity anywhere in ``q[q]`` or ``k[j]`` makes ``s[q, j]`` non-finite (0 times an
infinity is NaN), so the first rule covers them; only ``-inf`` scores are spared.
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
    """``softmax(q k^T * scale) v`` over all keys, with the module's rule for non-finite inputs.
    Shapes as in the module docstring; returns ``[B, H, Lq, D]``."""
    allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    return masked_attention(q, k, v, allowed, scale)[0]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the allowed keys only (SPEC section 1), non-finite inputs as the module says.

    ``allowed``: bool, broadcastable to ``[B, H, Lq, Lk]``. A query with no allowed key outputs
    zeros and log-sum-exp ``-inf``. Returns ``(out [B, H, Lq, D], lse [B, H, Lq])``, ``lse`` in
    natural log of the scaled scores.
    """
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    bad_score = (scores.isnan() | (scores == float("inf"))).any(dim=-1)
    finite_v = torch.isfinite(v)
    bad_v = (allowed & ~finite_v.all(dim=-1).unsqueeze(-2)).any(dim=-1)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(bad_score, float("nan"))
    # Rows poisoned by a score are overwritten below; zero them here so that NaN and -inf - -inf
    # (an empty row) stay out of the product.
    safe = ~bad_score & (lse > float("-inf"))
    probs = torch.exp(scores - lse.masked_fill(~safe, 0.0).unsqueeze(-1)).masked_fill(~safe.unsqueeze(-1), 0.0)
    # A non-finite value row is either outside A(q) (probability 0, and 0 * inf must not count)
    # or poisons the whole row: either way the product only needs its finite values.
    out = torch.matmul(probs, v.masked_fill(~finite_v, 0.0))
    return out.masked_fill((bad_score | bad_v).unsqueeze(-1), float("nan")), lse

