"""CSLA attention kernel entry point (twin of ``sparvar.reference.csla_attention``)."""

from __future__ import annotations

import torch

from sparvar.reference import CSLAParams, Schedule, check_step_inputs

from .config import KernelConfig, default_config
from .launch import check_kernel_inputs, sparse_attn_fwd
from .tiles import csla_tiles

__all__ = ["csla_attention"]


def csla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
                   params: CSLAParams = CSLAParams(), scale: float = 1.0, *,
                   config: KernelConfig | None = None) -> torch.Tensor:
    """CSLA attention of query scale ``step`` (SPEC section 3), token-exact, block-sparse.

    Args:
        q: ``[B, H, h_k*w_k, D]`` queries of scale ``step`` (fp16, bf16 or fp32; any strides).
        k, v: ``[B, H, L_k, D]`` keys and values of scales ``0..step``.
        schedule, step, params, scale: as in the reference.
        config: speed parameters (``KernelConfig``); the default tiles 8x8 query patches.

    Returns ``[B, H, h_k*w_k, D]`` in ``q``'s dtype; queries with no allowed key get zeros.
    Each program takes a 2-D patch of queries and visits only the keys some query of the patch
    may see; a per-(query, key) bit inside each visited block applies the exact rule.

    Example::

        s = infinity_schedule()
        q = torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
        k = v = torch.randn(2, 16, 10521, 128, device="cuda", dtype=torch.bfloat16)
        out = csla_attention(q, k, v, s, 12)
    """
    check_step_inputs(q, k, v, schedule, step)
    check_kernel_inputs(q, k, v)
    cfg = (config or default_config("csla")).for_grid(*schedule.grids[step])
    tables = csla_tiles(schedule, step, params, cfg.tile_h, cfg.tile_w, cfg.block_n)
    out, _ = sparse_attn_fwd(q, k, v, tables, cfg, scale, name="csla", kv_list=True, token_mask=True)
    return out
