"""CS4A kernel entry points (twins of ``sparvar.reference.cs4a``): column scores, selected
attention, the decision step and the sparse step."""

from __future__ import annotations

import torch

from sparvar.reference import CS4AParams, CS4AState, Schedule, check_step_inputs, num_keep
from sparvar.reference.cs4a import _check_decision, check_state

from .config import KernelConfig, default_config
from .launch import check_device, check_kernel_inputs, column_scores_fwd, dense_lse_fwd, select_topk_fwd, sparse_attn_fwd
from .tiles import group_tiles, residual_tables

__all__ = ["column_scores", "select_keys", "selected_attention", "cs4a_decide", "cs4a_sparse"]

Configs = dict[str, KernelConfig]


def _cfg(configs: Configs | None, kind: str) -> KernelConfig:
    return (configs or {}).get(kind) or default_config(kind)


def column_scores(q: torch.Tensor, k: torch.Tensor, scale: float, group_size: int, *,
                  configs: Configs | None = None) -> torch.Tensor:
    """Column scores ``[B, H, n_groups, L]`` (fp32), each query's probabilities normalised by
    its full softmax: a dense pass gives the log-sum-exp, a second pass sums ``exp(s - lse)``
    over the queries of each tile, and tiles are added per group (no atomics)."""
    check_kernel_inputs(q, k)
    _, lse = dense_lse_fwd(q, k, k, scale, _cfg(configs, "cs4a_dense"))
    return scores_from_lse(q, k, lse, scale, group_size, configs)


def scores_from_lse(q, k, lse, scale, group_size, configs=None):
    """The column-score pass alone, given the dense pass's log-sum-exp ``[B, H, Lq]``."""
    cfg = _cfg(configs, "cs4a_scores")
    # The tiles only depend on the query count and group size: a one-scale schedule describes them.
    tables = group_tiles(Schedule([(1, q.shape[2])]), 0, CS4AParams(0, group_size, 1.0, ()), cfg.block_m, cfg.block_n)
    return column_scores_fwd(q, k, lse, scale, tables, group_size, cfg)


def select_keys(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Top-``n_keep`` of each row of non-negative scores, ties to the lower index, ascending,
    as int32 (twin of the reference's ``select_keys``): one program per row bisects the bits."""
    if not isinstance(n_keep, int) or not 1 <= n_keep <= scores.shape[-1]:
        raise ValueError(f"n_keep must be an int in [1, {scores.shape[-1]}], got {n_keep!r}")
    check_device(scores)
    return select_topk_fwd(scores.float(), n_keep)


def _kept_table(kept: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    if kept.device != q.device:
        raise ValueError(f"kept key indices are on {kept.device}, the inputs on {q.device}")
    if kept.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kept key indices must be int32 or int64, got {kept.dtype}")
    B, H = kept.shape[:2]
    return kept.reshape(B * H, *kept.shape[2:]).to(torch.int32).contiguous()


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                       params: CS4AParams, kept: torch.Tensor, scale: float = 1.0, *,
                       configs: Configs | None = None) -> torch.Tensor:
    """``O_sel``: attention over the source group's kept keys plus, after ``d``, the bands.

    ``kept``: ``[B, H, n_groups(d), n_keep]`` integer key indices (the decision state's).
    """
    check_step_inputs(q, k, v, schedule, step)
    check_kernel_inputs(q, k, v)
    kind = "cs4a_select" if step == params.decision_scale else "cs4a_sparse"
    cfg = _cfg(configs, kind)
    tables = group_tiles(schedule, step, params, cfg.block_m, cfg.block_n)
    out, _ = sparse_attn_fwd(q, k, v, tables, cfg, scale, name=kind, kept=_kept_table(kept, q),
                             kv_list=step > params.decision_scale)
    return out


def cs4a_decide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                params: CS4AParams = CS4AParams(), scale: float = 1.0, *,
                configs: Configs | None = None) -> tuple[torch.Tensor, CS4AState]:
    """CS4A decision step (SPEC section 4): ``(O_dense, state)``.

    Args:
        q: ``[B, H, h_d*w_d, D]``; k, v: ``[B, H, L_d, D]`` (fp16, bf16 or fp32).
        configs: per launch kind (``cs4a_dense``, ``cs4a_scores``, ``cs4a_select``) a ``KernelConfig``.

    Passes: dense attention with log-sum-exp; column scores per group; a stable sort picks the
    kept keys; if ``residual``, selected attention whose epilogue writes ``R = O_dense - O_sel``.
    ``state.kept`` is int32 ``[B, H, n_groups, n_keep]``; ``state.residual`` is in ``q``'s dtype.

    Example::

        out, state = cs4a_decide(q, k, v, infinity_schedule(), 10)
    """
    check_step_inputs(q, k, v, schedule, step)
    check_kernel_inputs(q, k, v)
    _check_decision(step, params, after=False)
    out, lse = dense_lse_fwd(q, k, v, scale, _cfg(configs, "cs4a_dense"))
    scores = scores_from_lse(q, k, lse, scale, params.group_size, configs)
    kept = select_keys(scores, num_keep(k.shape[2], params.keep_ratio))
    residual = None
    if params.residual:
        cfg = _cfg(configs, "cs4a_select")
        tables = group_tiles(schedule, step, params, cfg.block_m, cfg.block_n)
        res, _ = sparse_attn_fwd(q, k, v, tables, cfg, scale, name="cs4a_select", kept=_kept_table(kept, q),
                                 epilogue=2, res=out)
        hd, wd = schedule.grids[step]
        residual = res.reshape(*res.shape[:2], hd, wd, res.shape[3])
    return out, CS4AState(step, kept, residual)


def cs4a_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                params: CS4AParams, state: CS4AState, scale: float = 1.0, *,
                configs: Configs | None = None) -> torch.Tensor:
    """CS4A later step ``step > d`` (SPEC section 4): ``O_sel + up(R)``, the residual fused in
    the epilogue (4 bilinear taps per query). Shapes as the reference; ``configs`` key
    ``cs4a_sparse``."""
    check_step_inputs(q, k, v, schedule, step)
    check_kernel_inputs(q, k, v)
    _check_decision(step, params, after=True)
    check_state(state, q, schedule, params)
    cfg = _cfg(configs, "cs4a_sparse")
    tables = group_tiles(schedule, step, params, cfg.block_m, cfg.block_n)
    res, res_tables = None, None
    if params.residual:
        if state.residual.device != q.device:
            raise ValueError(f"state.residual is on {state.residual.device}, the inputs on {q.device}")
        d = params.decision_scale
        res = state.residual.reshape(*state.residual.shape[:2], -1, state.residual.shape[-1])
        res_tables = residual_tables(schedule.grids[d], schedule.grids[step])
    out, _ = sparse_attn_fwd(q, k, v, tables, cfg, scale, name="cs4a_sparse", kept=_kept_table(state.kept, q),
                             kv_list=True, epilogue=1 if params.residual else 0, res=res, res_tables=res_tables)
    return out
