"""CSLA: cross-scale local sparse attention (SPEC sections 2 and 3).

Query ``(k, i, j)`` may attend key ``(m, p, r)`` (``m <= k``) iff ``m < sink_scales``, or
``win[m] == -1``, or ``win[m] > 0`` and the key lies in the ``win[m] x win[m]`` window of scale
``m`` around the query's centre ``(c_y, c_x)`` in that scale, clipped at the borders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import check_step_inputs, masked_attention
from .schedule import Schedule
from .validate import int_field, window_list

__all__ = ["CSLAParams", "centre", "key_windows", "csla_allows", "csla_mask", "csla_attention"]


@dataclass(frozen=True)
class CSLAParams:
    """``sink_scales``: the first n scales every query sees whole. ``win_rel[t]``: the window side
    of scale ``S-1-t`` (odd > 0; 0 = excluded; -1 = whole scale); non-sink scales it does not
    reach are excluded. Default: the authors' Infinity 1024 setting."""

    sink_scales: int = 5
    win_rel: tuple[int, ...] = (7, 5, 3, 1, 1, 0, 0, 0)

    def __post_init__(self):
        int_field("CSLAParams field", "sink_scales", self.sink_scales, 0)
        object.__setattr__(self, "win_rel",
                           window_list("CSLAParams field", "win_rel", self.win_rel, None, allow_whole=True))


def centre(index: torch.Tensor, src_len: int, dst_len: int) -> torch.Tensor:
    """SPEC section 2, one axis: ``floor((2*i + 1) * dst_len / (2 * src_len))``, exact in integers.

    Maps row (or column) ``i`` of a grid with ``src_len`` rows to the row of a grid with
    ``dst_len`` rows that contains its centre. The identity when ``src_len == dst_len``.
    """
    return torch.div((2 * index + 1) * dst_len, 2 * src_len, rounding_mode="floor")


def key_windows(num_scales: int, params: CSLAParams) -> list[int]:
    """Per key scale ``m``: -1 (whole scale) for sinks, else the window configured backwards."""
    out = []
    for m in range(num_scales):
        t = num_scales - 1 - m
        if m < params.sink_scales:
            out.append(-1)
        else:
            out.append(params.win_rel[t] if t < len(params.win_rel) else 0)
    return out


def csla_allows(qi: torch.Tensor, qj: torch.Tensor, schedule: Schedule, step: int, key_scale: int,
                p: torch.Tensor, r: torch.Tensor, window: int) -> torch.Tensor:
    """The SPEC section 3 predicate for queries ``(step, qi, qj)`` and keys ``(key_scale, p, r)``.

    ``window`` is ``key_windows(...)[key_scale]``. Inputs broadcast; returns a bool tensor.
    """
    if window == -1:
        return torch.ones(torch.broadcast_shapes(qi.shape, p.shape), dtype=torch.bool)
    if window == 0:
        return torch.zeros(torch.broadcast_shapes(qi.shape, p.shape), dtype=torch.bool)
    (hk, wk), (hm, wm) = schedule.grids[step], schedule.grids[key_scale]
    half = window // 2
    cy, cx = centre(qi, hk, hm), centre(qj, wk, wm)
    return ((p - cy).abs() <= half) & ((r - cx).abs() <= half)


def csla_mask(schedule: Schedule, step: int, params: CSLAParams) -> torch.Tensor:
    """Token mask ``[Lq, Lk]`` (bool) of query scale ``step`` against scales ``0..step``."""
    schedule.check_step(step)
    hk, wk = schedule.grids[step]
    q = torch.arange(hk * wk)
    qi, qj = (q // wk)[:, None], (q % wk)[:, None]
    windows = key_windows(schedule.num_scales, params)
    blocks = []
    for m in range(step + 1):
        hm, wm = schedule.grids[m]
        key = torch.arange(hm * wm)
        blocks.append(csla_allows(qi, qj, schedule, step, m, (key // wm)[None, :],
                                  (key % wm)[None, :], windows[m]))
    return torch.cat(blocks, dim=1)


def csla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                   params: CSLAParams = CSLAParams(), scale: float = 1.0) -> torch.Tensor:
    """CSLA attention of query scale ``step`` (SPEC section 3).

    ``q``: ``[B, H, h_k*w_k, D]``; ``k, v``: ``[B, H, L_k, D]``. Returns ``[B, H, h_k*w_k, D]``;
    a query with no allowed key outputs zeros.
    """
    check_step_inputs(q, k, v, schedule, step)
    allowed = csla_mask(schedule, step, params).to(q.device)
    return masked_attention(q, k, v, allowed, scale)[0]
