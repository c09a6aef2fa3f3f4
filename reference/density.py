"""Token densities: allowed (query, key) pairs over all pairs, per scale and kind.

These are the numbers block densities of the kernels are compared against. Counting uses the
separability of CSLA windows (rows times columns) and the fixed sizes of CS4A kept sets and
bands, so nothing of size ``[Lq, Lk]`` is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cs4a import CS4AParams, band_ranges, num_groups, num_keep
from .csla import CSLAParams, centre, key_windows
from .plan import SparsityPlan
from .schedule import Schedule

__all__ = ["StepDensity", "csla_pairs", "cs4a_pairs", "plan_densities", "generation_density"]


@dataclass(frozen=True)
class StepDensity:
    step: int
    kind: str
    layers: int
    queries: int
    keys: int
    allowed_pairs: int

    @property
    def density(self) -> float:
        return self.allowed_pairs / (self.queries * self.keys)


def _clipped_span(n_src: int, n_dst: int, half: int) -> int:
    """Sum over source positions of the clipped window length in the destination axis."""
    c = centre(torch.arange(n_src), n_src, n_dst)
    return int(((c + half).clamp(max=n_dst - 1) - (c - half).clamp(min=0) + 1).sum())


def csla_pairs(schedule: Schedule, step: int, params: CSLAParams) -> int:
    """Allowed pairs of CSLA at query scale ``step`` (SPEC section 3)."""
    hk, wk = schedule.grids[step]
    total = 0
    for m, win in enumerate(key_windows(schedule.num_scales, params)[: step + 1]):
        hm, wm = schedule.grids[m]
        if win == -1:
            total += hk * wk * hm * wm
        elif win > 0:
            total += _clipped_span(hk, hm, win // 2) * _clipped_span(wk, wm, win // 2)
    return total


def cs4a_pairs(schedule: Schedule, step: int, params: CS4AParams) -> int:
    """Allowed pairs of ``O_sel`` at step ``step >= d``: kept keys plus band ranges per group."""
    d, g = params.decision_scale, params.group_size
    nq = schedule.sizes[step]
    keep = num_keep(schedule.num_keys(d), params.keep_ratio)
    sizes = torch.full((num_groups(nq, g),), g)
    sizes[-1] = nq - g * (len(sizes) - 1)
    per_group = torch.full_like(sizes, keep)
    if step > d:
        ranges = band_ranges(schedule, step, params)
        per_group = per_group + (ranges[..., 1] - ranges[..., 0] + 1).sum(dim=1)
    return int((per_group * sizes).sum())


def plan_densities(plan: SparsityPlan, schedule: Schedule) -> list[StepDensity]:
    """One row per (step, kind) the plan uses, with how many layers run it.

    ``cs4a_decide`` computes dense attention, so its row counts all pairs; the pairs of its
    selected attention are in ``cs4a_pairs``.
    """
    plan.check_schedule(schedule)
    rows = []
    for step in range(schedule.num_scales):
        counts: dict[str, int] = {}
        for layer in range(plan.depth):
            kind = plan.kind(layer, step)
            counts[kind] = counts.get(kind, 0) + 1
        nq, nk = schedule.sizes[step], schedule.num_keys(step)
        for kind, layers in counts.items():
            if kind == "csla":
                pairs = csla_pairs(schedule, step, plan.csla)
            elif kind == "cs4a_sparse":
                pairs = cs4a_pairs(schedule, step, plan.cs4a)
            else:
                pairs = nq * nk
            rows.append(StepDensity(step, kind, layers, nq, nk, pairs))
    return rows


def generation_density(plan: SparsityPlan, schedule: Schedule) -> float:
    """Allowed pairs of a whole generation (all layers and scales) over the dense count."""
    rows = plan_densities(plan, schedule)
    allowed = sum(r.allowed_pairs * r.layers for r in rows)
    dense = sum(r.queries * r.keys * r.layers for r in rows)
    return allowed / dense
