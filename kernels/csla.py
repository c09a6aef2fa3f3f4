"""CSLA attention kernel entry point (twin of ``sparvar.reference.csla_attention``)."""

from __future__ import annotations

import torch

from sparvar.reference import CSLAParams, Schedule, check_step_inputs

from .config import KernelConfig, Launch, default_config
from .launch import AttentionLaunch, PlanCache, check_kernel_inputs, signature
from .tiles import csla_tiles

__all__ = ["csla_attention"]

_PLANS = PlanCache()


def csla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                   params: CSLAParams = CSLAParams(), scale: float = 1.0, *,
                   config: KernelConfig | None = None) -> torch.Tensor:
    """CSLA attention of query scale ``step`` (SPEC section 3), token-exact, block-sparse.

    Args:
        q: ``[B, H, h_k*w_k, D]`` queries of scale ``step`` (fp16, bf16 or fp32; any strides).
        k, v: ``[B, H, L_k, D]`` keys and values of scales ``0..step``.
        schedule, step, params, scale: as in the reference.
        config: speed parameters (``KernelConfig``); the default tiles 8x8 query patches.

    Returns ``[B, H, h_k*w_k, D]`` in ``q``'s dtype; queries with no allowed key get zeros;
    non-finite inputs as ``sparvar.reference.attention`` says. Each program takes a 2-D patch
    of queries and visits only the keys some query of the patch may see; a per-(query, key) bit
    inside each visited block applies the exact rule. The first call with a new signature
    (shapes, dtypes, devices, schedule, step, parameters, config) validates the inputs and builds
    the tile tables; later calls reuse them.

    Example::

        s = infinity_schedule()
        q = torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
        k = v = torch.randn(2, 16, 10521, 128, device="cuda", dtype=torch.bfloat16)
        out = csla_attention(q, k, v, s, 12)
    """
    key = (schedule, step, params, config, signature(q, k, v))
    launch = _PLANS.get(key, lambda: _plan(q, k, v, schedule, step, params, config))
    return launch(q, k, v, scale)[0]


def _plan(q, k, v, schedule, step, params, config) -> AttentionLaunch:
    check_step_inputs(q, k, v, schedule, step)
    check_kernel_inputs(q, k, v)
    if not isinstance(params, CSLAParams):
        raise ValueError(f"params must be CSLAParams, got {type(params).__name__}")
    cfg = (config or default_config(Launch.CSLA)).for_grid(*schedule.grids[step])
    tiles = csla_tiles(schedule, step, params, cfg.tile_h, cfg.tile_w, cfg.block_n).to(q.device)
    return AttentionLaunch(batch_heads=q.shape[:2], head_dim=q.shape[3], dtype=q.dtype, config=cfg, name="csla",
                           q_idx=tiles.q_idx, kv_idx=tiles.kv_idx, kv_len=tiles.kv_len, kv_bits=tiles.kv_bits)
