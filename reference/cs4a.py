"""CS4A: cross-scale self-similar sparse attention (SPEC section 4).

At the decision scale ``d`` each group of ``g`` consecutive queries keeps the ``n_keep`` keys with
the largest column score (probability mass summed over the group). Later scales reuse the kept
sets of the matching decision group, add contiguous *band* ranges of the scales above ``d``, and
add the bilinearly up-sampled residual ``R = O_dense - O_sel`` of the decision step.
Layout as in ``attention.py``; groups are ``G = q // g`` over raster query indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import check_step_inputs, dense_attention, masked_attention
from .csla import centre
from .schedule import Schedule
from .validate import int_field, window_list

__all__ = [
    "CS4AParams", "CS4AState", "num_groups", "num_keep", "column_scores", "select_keys",
    "kept_mask", "source_groups", "band_windows", "band_ranges", "cs4a_mask",
    "upsample_residual", "selected_attention", "cs4a_decide", "cs4a_sparse", "check_decision", "check_state",
]


@dataclass(frozen=True)
class CS4AParams:
    """``decision_scale`` d; ``group_size`` g >= 1; ``keep_ratio`` rho in (0, 1]; ``band_rel[t]``:
    band window of scale ``S-1-t`` (only scales > d; odd > 0 or 0 = none); ``residual``: add
    ``up(R)`` at later scales. Defaults: the authors' Infinity 1024 setting."""

    decision_scale: int = 10
    group_size: int = 192
    keep_ratio: float = 0.2
    band_rel: tuple[int, ...] = (9, 7)
    residual: bool = True

    def __post_init__(self):
        owner = "CS4AParams field"
        int_field(owner, "decision_scale", self.decision_scale, 0)
        int_field(owner, "group_size", self.group_size, 1)
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) \
                or not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"{owner} 'keep_ratio' must be a number in (0, 1], got {self.keep_ratio!r}")
        if not isinstance(self.residual, bool):
            raise ValueError(f"{owner} 'residual' must be true or false, got {self.residual!r}")
        # -1 (a whole scale) is not a band: bands are ranges around a group's windows.
        object.__setattr__(self, "band_rel", window_list(owner, "band_rel", self.band_rel, None, allow_whole=False))


@dataclass
class CS4AState:
    """What the decision step leaves for later steps of the same layer.

    ``kept``: ``[B, H, n_groups(d), n_keep]`` int64 key indices (each row ascending) into the
    ``L_d`` keys; ``residual``: ``[B, H, h_d, w_d, D]`` or ``None`` when the plan has no residual.
    """

    decision_scale: int
    kept: torch.Tensor
    residual: torch.Tensor | None


def num_groups(num_queries: int, group_size: int) -> int:
    """``ceil(num_queries / group_size)``; the last group may be smaller."""
    return -(-num_queries // group_size)


def num_keep(num_keys: int, keep_ratio: float) -> int:
    """``min(L_d, max(1, floor(rho * L_d + 0.5)))`` (SPEC section 4, step 3)."""
    return min(num_keys, max(1, int(keep_ratio * num_keys + 0.5)))


def _query_groups(num_queries: int, group_size: int, device=None) -> torch.Tensor:
    return torch.arange(num_queries, device=device) // group_size


def column_scores(q: torch.Tensor, k: torch.Tensor, scale: float, group_size: int) -> torch.Tensor:
    """``c_G[key] = sum_{q in G} softmax(q k^T * scale)[q, key]``: ``[B, H, n_groups, Lk]``.

    A query whose scores hold a NaN or +inf, or are all -inf, has a NaN softmax row (the rule in
    ``attention.py``), which makes every score of its group NaN."""
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    groups = _query_groups(q.shape[2], group_size, q.device)
    out = probs.new_zeros(*probs.shape[:2], num_groups(q.shape[2], group_size), probs.shape[3])
    return out.index_add_(2, groups, probs)


def select_keys(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` largest scores along the last axis, ascending.

    Ties go to the lower key index: a stable descending sort keeps equal scores in index order.
    NaN ranks above every number (so a group whose scores are all NaN keeps its first ``n_keep``
    keys), and -0.0 ties with 0.0: the order ``torch.sort`` gives.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :n_keep], dim=-1).values


def kept_mask(kept: torch.Tensor, query_groups: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[B, H, Lq, num_keys]`` bool: query ``q`` may see the kept keys of group ``query_groups[q]``."""
    per_group = torch.zeros(*kept.shape[:3], num_keys, dtype=torch.bool, device=kept.device)
    per_group.scatter_(-1, kept, True)
    return per_group[:, :, query_groups]


def source_groups(n_groups_d: int, n_groups_k: int) -> torch.Tensor:
    """``src(G) = min(n_d - 1, floor((2G + 1) * n_d / (2 n_k)))`` for every group of scale k."""
    g = torch.arange(n_groups_k)
    return centre(g, n_groups_k, n_groups_d).clamp(max=n_groups_d - 1)


def band_windows(num_scales: int, decision_scale: int, band_rel) -> list[int]:
    """Per scale ``m``: the band window (``band_rel`` read from the finest scale backwards), 0 for
    scales ``<= d`` and scales the list does not reach."""
    out = []
    for m in range(num_scales):
        t = num_scales - 1 - m
        out.append(band_rel[t] if m > decision_scale and t < len(band_rel) else 0)
    return out


def band_ranges(schedule: Schedule, step: int, params: CS4AParams) -> torch.Tensor:
    """``[n_groups(step), S, 2]`` int64: per group and key scale ``m``, the inclusive global key
    range ``[lo, hi]`` of its band (SPEC section 4, later step 2), or ``[0, -1]`` for none.

    A window is a rectangle, so its smallest raster index is its top-left corner and its largest
    its bottom-right; the union's range runs from the smallest corner to the largest.
    """
    S, g = schedule.num_scales, params.group_size
    hk, wk = schedule.grids[step]
    q = torch.arange(hk * wk)
    groups = _query_groups(hk * wk, g)
    n_g = num_groups(hk * wk, g)
    out = torch.tensor([0, -1]).repeat(n_g, S, 1)
    windows = band_windows(S, params.decision_scale, params.band_rel)
    for m in range(params.decision_scale + 1, step + 1):
        if windows[m] == 0:
            continue
        hm, wm = schedule.grids[m]
        half = windows[m] // 2
        cy, cx = centre(q // wk, hk, hm), centre(q % wk, wk, wm)
        first = (cy - half).clamp(min=0) * wm + (cx - half).clamp(min=0)
        last = (cy + half).clamp(max=hm - 1) * wm + (cx + half).clamp(max=wm - 1)
        lo = torch.full((n_g,), hm * wm, dtype=torch.long).scatter_reduce(0, groups, first, "amin")
        hi = torch.full((n_g,), -1, dtype=torch.long).scatter_reduce(0, groups, last, "amax")
        out[:, m, 0] = lo + schedule.offsets[m]
        out[:, m, 1] = hi + schedule.offsets[m]
    return out


def cs4a_mask(schedule: Schedule, step: int, params: CS4AParams, kept: torch.Tensor) -> torch.Tensor:
    """``[B, H, Lq, L_step]`` bool: kept keys of the source group plus the group's band ranges."""
    d, g = params.decision_scale, params.group_size
    nq, nk = schedule.num_queries(step), schedule.num_keys(step)
    groups = _query_groups(nq, g, kept.device)
    if step == d:
        return kept_mask(kept, groups, nk)
    src = source_groups(kept.shape[2], num_groups(nq, g)).to(kept.device)
    allowed = kept_mask(kept[:, :, src], groups, nk)
    key = torch.arange(nk, device=kept.device)
    ranges = band_ranges(schedule, step, params).to(kept.device)
    lo, hi = ranges[..., 0], ranges[..., 1]
    in_band = ((key >= lo[..., None]) & (key <= hi[..., None])).any(dim=1)  # [n_groups, nk]
    return allowed | in_band[groups]


def upsample_residual(residual: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear ``[B, H, h_d, w_d, D] -> [B, H, h*w, D]`` (``align_corners=False``, no antialias).

    Computed on the CPU, whose kernel is the definition: each output mixes 4 taps, zero weights
    included (so a NaN reaches every output one of its taps touches), except along an axis whose
    size does not change, which is copied. The CUDA kernel also mixes that axis's second tap.
    """
    B, H, hd, wd, D = residual.shape
    x = residual.permute(0, 1, 4, 2, 3).reshape(B * H, D, hd, wd).cpu()
    x = torch.nn.functional.interpolate(x, size=hw, mode="bilinear", align_corners=False)
    return x.reshape(B, H, D, hw[0] * hw[1]).transpose(-1, -2).to(residual.device)


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule,
                       step: int, params: CS4AParams, kept: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``O_sel``: attention over ``A(q)`` (kept set of the query's group, plus bands after ``d``)."""
    check_step_inputs(q, k, v, schedule, step)
    return masked_attention(q, k, v, cs4a_mask(schedule, step, params, kept), scale)[0]


def cs4a_decide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                params: CS4AParams = CS4AParams(), scale: float = 1.0) -> tuple[torch.Tensor, CS4AState]:
    """Decision step (SPEC section 4, steps 1-5). ``q``: ``[B, H, h_d*w_d, D]``, ``k, v``:
    ``[B, H, L_d, D]``. Returns ``(O_dense [B, H, h_d*w_d, D], state)``."""
    check_step_inputs(q, k, v, schedule, step)
    check_decision(step, params, after=False)
    out = dense_attention(q, k, v, scale)
    scores = column_scores(q, k, scale, params.group_size)
    kept = select_keys(scores, num_keep(k.shape[2], params.keep_ratio))
    residual = None
    if params.residual:
        sel = selected_attention(q, k, v, schedule, step, params, kept, scale)
        hd, wd = schedule.grids[step]
        residual = (out - sel).reshape(*out.shape[:2], hd, wd, out.shape[3])
    return out, CS4AState(step, kept, residual)


def cs4a_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                params: CS4AParams, state: CS4AState, scale: float = 1.0) -> torch.Tensor:
    """Later step ``k > d`` (SPEC section 4): ``O_sel + up(R)`` (``O_sel`` without residual)."""
    check_step_inputs(q, k, v, schedule, step)
    check_decision(step, params, after=True)
    check_state(state, q, schedule, params)
    out = selected_attention(q, k, v, schedule, step, params, state.kept, scale)
    if params.residual:
        out = out + upsample_residual(state.residual, schedule.grids[step]).to(out.dtype)
    return out


def check_decision(step: int, params: CS4AParams, after: bool) -> None:
    """Raise ``ValueError`` unless ``step`` is the decision scale (``after=False``) or later."""
    d = params.decision_scale
    if after and step <= d:
        raise ValueError(f"cs4a_sparse runs at steps after the decision scale {d}, got step {step}")
    if not after and step != d:
        raise ValueError(f"cs4a_decide runs at the decision scale {d}, got step {step}")


def check_state(state: CS4AState, q: torch.Tensor, schedule: Schedule, params: CS4AParams) -> None:
    """Raise ``ValueError`` unless ``state`` is the decision state these inputs continue from."""
    d = params.decision_scale
    if not isinstance(state, CS4AState):
        raise ValueError(f"state must be the CS4AState of the decision step, got {type(state).__name__}")
    if state.decision_scale != d:
        raise ValueError(f"state comes from decision scale {state.decision_scale}, the plan says {d}")
    want = (q.shape[0], q.shape[1], num_groups(schedule.sizes[d], params.group_size),
            num_keep(schedule.num_keys(d), params.keep_ratio))
    if tuple(state.kept.shape) != want:
        raise ValueError(f"state.kept has shape {tuple(state.kept.shape)}, expected {want}")
    if params.residual:
        hd, wd = schedule.grids[d]
        want_r = (q.shape[0], q.shape[1], hd, wd, q.shape[3])
        if state.residual is None or tuple(state.residual.shape) != want_r:
            got = None if state.residual is None else tuple(state.residual.shape)
            raise ValueError(f"state.residual has shape {got}, expected {want_r}")
