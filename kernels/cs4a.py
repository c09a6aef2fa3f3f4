"""CS4A kernel entry points (twins of ``sparvar.reference.cs4a``): column scores, key selection,
selected attention, the decision step and the sparse step. The decision step's passes are public
too (``dense_with_lse``, ``scores_from_lse``, ``selected_residual``) so that benchmarks can time
them one by one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparvar.reference import CS4AParams, CS4AState, Schedule, check_decision, check_state, check_step_inputs, num_keep

from .config import DenseBackend, KernelConfig, Launch, default_config
from .launch import (AttentionLaunch, PlanCache, check_device, check_kernel_inputs, column_scores_fwd,
                     dense_backend_for, dense_lse_fwd, select_topk_fwd, signature)
from .sparse_attn import Epilogue
from .tiles import dense_tiles, group_tiles, residual_tables

__all__ = ["LaunchConfigs", "launch_config", "column_scores", "select_keys", "selected_attention", "cs4a_decide",
           "cs4a_sparse", "dense_with_lse", "scores_from_lse", "selected_residual", "kept_table", "pack_kept"]

#: Kernel configs by launch; a launch not in the mapping uses ``default_config``.
LaunchConfigs = dict[Launch, KernelConfig]

_PLANS = PlanCache()

#: A packed copy pads each group's kept rows to a multiple of this; the kernel's ``KEPT_PACKED``
#: path computes the same padding (``sparse_attn._visit_keys``).
_PACK_ROWS = 128


def _packed_rows(n_keep: int) -> int:
    return -(-n_keep // _PACK_ROWS) * _PACK_ROWS


def launch_config(configs: LaunchConfigs | None, launch: Launch) -> KernelConfig:
    """The config of ``launch`` in ``configs``, else its default."""
    return (configs or {}).get(launch) or default_config(launch)


def kept_table(kept: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Kept indices ``[B, H, G, n_keep]`` as the kernels read them: ``[B*H, G, n_keep]`` int32 on
    ``q``'s device (a view when they already are)."""
    if kept.device != q.device:
        raise ValueError(f"kept key indices are on {kept.device}, the inputs on {q.device}")
    if kept.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kept key indices must be int32 or int64, got {kept.dtype}")
    B, H = kept.shape[:2]
    return kept.reshape(B * H, *kept.shape[2:]).to(torch.int32).contiguous()


def _launch_args(q: torch.Tensor) -> dict:
    return dict(batch_heads=q.shape[:2], head_dim=q.shape[3], dtype=q.dtype)


@dataclass(frozen=True)
class _DensePlan:
    backend: DenseBackend
    triton: AttentionLaunch | None


def _dense_plan(q, config: KernelConfig) -> _DensePlan:
    backend, _ = dense_backend_for(config, q)
    launch = None
    if backend is DenseBackend.TRITON:
        launch = AttentionLaunch(**_launch_args(q), config=config, name="cs4a_dense", kv_dense=True, store_lse=True,
                                 q_idx=dense_tiles(q.shape[2], config.block_m).to(q.device))
    return _DensePlan(backend, launch)


def dense_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0, *,
                   config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, DenseBackend]:
    """Dense attention, its log-sum-exp ``[B, H, Lq]`` (fp32, natural log) and the backend that
    ran (``config.backend`` where it can run here, else the Triton kernel). Library outputs keep
    PyTorch's handling of non-finite values (``cs4a_decide`` applies the project's rule)."""
    cfg = config or default_config(Launch.CS4A_DENSE)
    plan = _PLANS.get(("dense", cfg, signature(q, k, v)),
                      lambda: (check_kernel_inputs(q, k, v), _dense_plan(q, cfg))[1])
    out, lse = dense_lse_fwd(q, k, v, scale, plan.backend, plan.triton)
    return out, lse, plan.backend


def scores_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, group_size: int, *,
                    config: KernelConfig | None = None) -> torch.Tensor:
    """The column-score pass alone, given each query's log-sum-exp ``[B, H, Lq]``."""
    return column_scores_fwd(q, k, lse, scale, group_size, config or default_config(Launch.CS4A_SCORES))


def column_scores(q: torch.Tensor, k: torch.Tensor, scale: float, group_size: int, *,
                  configs: LaunchConfigs | None = None) -> torch.Tensor:
    """Column scores ``[B, H, n_groups, L]`` (fp32), each query's probabilities normalised by
    its full softmax: a log-sum-exp pass (no values), then per (key block, group) a sum of
    ``exp(s - lse)`` over the group's queries (twin of the reference's ``column_scores``)."""
    cfg = launch_config(configs, Launch.CS4A_DENSE)

    def build():
        check_kernel_inputs(q, k)
        return AttentionLaunch(**_launch_args(q), config=cfg, name="lse", kv_dense=True, store_lse=True,
                               values=False, q_idx=dense_tiles(q.shape[2], cfg.block_m).to(q.device))
    _, lse = _PLANS.get(("lse", cfg, signature(q, k)), build)(q, k, None, scale)
    return scores_from_lse(q, k, lse, scale, group_size, config=launch_config(configs, Launch.CS4A_SCORES))


def select_keys(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Top-``n_keep`` of each row, ties to the lower index, NaN above every number, ascending,
    as int32 (twin of the reference's ``select_keys``): one program per row runs a radix select."""
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep <= scores.shape[-1]:
        raise ValueError(f"n_keep must be an int in [1, {scores.shape[-1]}], got {n_keep!r}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    check_device(scores)
    return select_topk_fwd(scores.float(), n_keep)


def _group_launch(q, k, v, schedule, step, params, config, name: str, epilogue: Epilogue = Epilogue.NONE,
                  kept_packed: bool = False) -> AttentionLaunch:
    """Validate the inputs and build a CS4A attention launch over ``group_tiles``."""
    check_step_inputs(q, k, v, schedule, step)
    check_kernel_inputs(q, k, v)
    check_decision(step, params, after=step > params.decision_scale)
    tiles = group_tiles(schedule, step, params, config.block_m).to(q.device)
    res_idx = res_w = None
    if epilogue == Epilogue.ADD_RESIDUAL:
        res_idx, res_w = (t.to(q.device) for t in residual_tables(schedule.grids[params.decision_scale],
                                                                  schedule.grids[step]))
    return AttentionLaunch(**_launch_args(q), config=config, name=name, q_idx=tiles.q_idx, tile_src=tiles.tile_src,
                           tile_band=tiles.tile_band, row_band=tiles.row_band, epilogue=epilogue, res_idx=res_idx,
                           res_w=res_w, kept_packed=kept_packed)


def selected_residual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                      params: CS4AParams, kept: torch.Tensor, dense: torch.Tensor, scale: float = 1.0, *,
                      config: KernelConfig | None = None) -> torch.Tensor:
    """``R = O_dense - O_sel`` at the decision scale, ``[B, H, h_d*w_d, D]``; rows of ``dense``
    holding a non-finite value are made all-NaN in place first (the reference's rule)."""
    cfg = config or default_config(Launch.CS4A_SELECT)
    if step != params.decision_scale:
        raise ValueError(f"the residual is taken at the decision scale {params.decision_scale}, got step {step}")
    launch = _PLANS.get(("residual", schedule, step, params, cfg, signature(q, k, v)),
                        lambda: _group_launch(q, k, v, schedule, step, params, cfg, "cs4a_select",
                                              Epilogue.RESIDUAL_FROM_DENSE))
    return launch(q, k, v, scale, kept=kept_table(kept, q), res=dense)[0]


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                       params: CS4AParams, kept: torch.Tensor, scale: float = 1.0, *,
                       configs: LaunchConfigs | None = None) -> torch.Tensor:
    """``O_sel``: attention over the source group's kept keys plus, after ``d``, the bands.

    ``kept``: ``[B, H, n_groups(d), n_keep]`` integer key indices (the decision state's).
    """
    which = Launch.CS4A_SELECT if step == params.decision_scale else Launch.CS4A_SPARSE
    cfg = launch_config(configs, which)
    launch = _PLANS.get(("selected", schedule, step, params, cfg, signature(q, k, v)),
                        lambda: _group_launch(q, k, v, schedule, step, params, cfg, str(which)))
    return launch(q, k, v, scale, kept=kept_table(kept, q))[0]


@dataclass(frozen=True)
class _DecidePlan:
    dense: _DensePlan
    scores: KernelConfig
    select: AttentionLaunch
    n_keep: int
    grid: tuple[int, int]


def _decide_plan(q, k, v, schedule, step, params, configs) -> _DecidePlan:
    select = _group_launch(q, k, v, schedule, step, params, configs[2], "cs4a_select", Epilogue.RESIDUAL_FROM_DENSE)
    return _DecidePlan(_dense_plan(q, configs[0]), configs[1], select, num_keep(k.shape[2], params.keep_ratio),
                       schedule.grids[step])


def cs4a_decide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                params: CS4AParams = CS4AParams(), scale: float = 1.0, *,
                configs: LaunchConfigs | None = None) -> tuple[torch.Tensor, CS4AState]:
    """CS4A decision step (SPEC section 4): ``(O_dense, state)``.

    Args:
        q: ``[B, H, h_d*w_d, D]``; k, v: ``[B, H, L_d, D]`` (fp16, bf16 or fp32).
        configs: per launch (``cs4a_dense``, ``cs4a_scores``, ``cs4a_select``) a ``KernelConfig``.

    Passes: dense attention with log-sum-exp (cuDNN, flash or Triton: ``cs4a_dense.backend``);
    column scores per group; a radix select keeps ``n_keep`` keys per group; if ``residual``,
    selected attention whose epilogue writes ``R = O_dense - O_sel``. ``state.kept`` is int32
    ``[B, H, n_groups, n_keep]``; ``state.residual`` is in ``q``'s dtype (a view of token-major
    memory, as the outputs are). Non-finite inputs as ``sparvar.reference.attention`` says, kept
    sets included.

    Example::

        out, state = cs4a_decide(q, k, v, infinity_schedule(), 10)
    """
    cfgs = tuple(launch_config(configs, x) for x in (Launch.CS4A_DENSE, Launch.CS4A_SCORES, Launch.CS4A_SELECT))
    plan = _PLANS.get(("decide", schedule, step, params, cfgs, signature(q, k, v)),
                      lambda: _decide_plan(q, k, v, schedule, step, params, cfgs))
    out, lse = dense_lse_fwd(q, k, v, scale, plan.dense.backend, plan.dense.triton)
    scores = column_scores_fwd(q, k, lse, scale, params.group_size, plan.scores)
    kept = select_topk_fwd(scores, plan.n_keep)
    residual = None
    if params.residual:
        res = plan.select(q, k, v, scale, kept=kept.view(-1, *kept.shape[2:]), res=out)[0]
        residual = res.view(*res.shape[:2], *plan.grid, res.shape[3])
    elif plan.dense.backend is not DenseBackend.TRITON:
        out = out.masked_fill(~torch.isfinite(out).all(dim=-1, keepdim=True), float("nan"))
    return out, CS4AState(step, kept, residual)


def cs4a_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                params: CS4AParams, state: CS4AState, scale: float = 1.0, *,
                configs: LaunchConfigs | None = None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """CS4A later step ``step > d`` (SPEC section 4): ``O_sel + up(R)``, the residual fused in
    the epilogue (4 bilinear taps per query). Tiles run across consecutive groups that inherit
    the same decision group, each row limited to its own group's bands. Shapes as the reference;
    ``configs`` key ``cs4a_sparse``.

    ``packed``: ``pack_kept(k, v, state.kept)`` made once after the decision step; the kernel
    then streams the kept keys' rows from it instead of gathering them from ``k`` and ``v`` by
    index. Exact only while the first ``L_d`` rows of ``k`` and ``v`` are the ones it was made
    from (a KV cache's are). Measured 12-15% less time at Infinity 1024 on an H200, for 126 MiB per
    layer (B=2, H=16) and 0.37 ms to make (``bench/cs4a_profile.py``); off by default."""
    cfg = launch_config(configs, Launch.CS4A_SPARSE)
    epilogue = Epilogue.ADD_RESIDUAL if params.residual else Epilogue.NONE
    launch = _PLANS.get(("sparse", schedule, step, params, cfg, packed is not None, signature(q, k, v)),
                        lambda: _group_launch(q, k, v, schedule, step, params, cfg, "cs4a_sparse", epilogue,
                                              kept_packed=packed is not None))
    kept, res = _state_tables(state, q, schedule, params)
    if packed is None:
        return launch(q, k, v, scale, kept=kept, res=res)[0]
    n_keep = kept.shape[2]
    want = (kept.shape[0], kept.shape[1], 2, _packed_rows(n_keep), q.shape[3])
    if tuple(packed.shape) != want or packed.dtype != k.dtype or packed.device != q.device:
        raise ValueError(f"packed must be pack_kept(k, v, state.kept): {list(want)} {k.dtype} on {q.device}, got "
                         f"{list(packed.shape)} {packed.dtype} on {packed.device}")
    return launch(q, k, v, scale, kept=packed, res=res, n_keep=n_keep)[0]


def pack_kept(k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """K and V rows of every group's kept keys, contiguous: ``[B*H, G, 2, NKP, D]`` in ``k``'s
    dtype, NKP = n_keep rounded up to 128 (rows past n_keep are zero; the kernel never allows
    them). ``kept``: ``[B, H, G, n_keep]``."""
    B, H, G, nk = kept.shape
    D = k.shape[-1]
    nkp = _packed_rows(nk)
    idx = kept.reshape(B, H, G * nk).long()[..., None].expand(-1, -1, -1, D)
    out = k.new_zeros(B * H, G, 2, nkp, D)
    out[:, :, 0, :nk] = torch.gather(k, 2, idx).reshape(B * H, G, nk, D)
    out[:, :, 1, :nk] = torch.gather(v.to(k.dtype), 2, idx).reshape(B * H, G, nk, D)
    return out


def _state_tables(state: CS4AState, q: torch.Tensor, schedule: Schedule, params: CS4AParams):
    """``state``'s kept sets and residual as the kernel reads them, checked against the inputs.
    What a state holds can change between calls (its tensors may be replaced), so the check and
    the tables are kept on the state itself, with the tensors and inputs they were made for, and
    made again when any of them changes."""
    made_for = (state.decision_scale, schedule, params, q.shape[0], q.shape[1], q.shape[3], q.device)
    cached = getattr(state, "_kernel_tables", None)
    if cached is not None and cached[0] is state.kept and cached[1] is state.residual and cached[2] == made_for:
        return cached[3]
    check_state(state, q, schedule, params)
    res = None
    if params.residual:
        if state.residual.device != q.device:
            raise ValueError(f"state.residual is on {state.residual.device}, the inputs on {q.device}")
        res = state.residual.reshape(*state.residual.shape[:2], -1, state.residual.shape[-1])
    tables = (kept_table(state.kept, q), res)
    state._kernel_tables = (state.kept, state.residual, made_for, tables)
    return tables
