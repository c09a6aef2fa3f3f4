"""Launchers: allocate outputs, build grids, pick configs, turn launch failures into clear errors."""

from __future__ import annotations

import os

import torch
import triton

from .config import KernelConfig
from .sparse_attn import LOG2E, _column_scores_kernel, _sparse_attn_fwd_kernel
from .tiles import TileTables, to_device

__all__ = ["KernelLaunchError", "check_kernel_inputs", "sparse_attn_fwd", "column_scores_fwd", "interpreting"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Tests set this so every output starts as NaN and an element a kernel never writes fails.
poison_outputs = False


def _empty(*args, **kwargs) -> torch.Tensor:
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if poison_outputs else t


class KernelLaunchError(RuntimeError):
    """A kernel failed to compile or launch with a given config (e.g. out of shared memory)."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_inputs(*tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` for dtypes, devices and head dims the kernels do not take."""
    q = tensors[0]
    if q.dtype not in _DTYPES:
        raise ValueError(f"kernels take float16, bfloat16 or float32 inputs, got {q.dtype}")
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {D}")
    if interpreting():
        if q.device.type != "cpu":
            raise ValueError(f"TRITON_INTERPRET=1 runs kernels on CPU tensors, got {q.device}")
        if q.dtype == torch.bfloat16:
            raise ValueError("Triton's interpreter cannot do bfloat16 dots; use float16 or float32 on the CPU")
    elif q.device.type != "cuda":
        raise ValueError(f"kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {q.device}")


def _launch(kernel, grid, name: str, config: KernelConfig, *args, **kwargs) -> None:
    try:
        kernel[grid](*args, num_warps=config.num_warps, num_stages=config.num_stages, **kwargs)
    except (triton.CompilationError, triton.runtime.errors.OutOfResources) as e:
        raise KernelLaunchError(f"{name} kernel failed with {config}: {type(e).__name__}: {e}") from e


def sparse_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: TileTables,
                    config: KernelConfig, scale: float, *, name: str, kv_dense: bool = False, kv_list: bool = False,
                    kept: torch.Tensor | None = None, token_mask: bool = False, epilogue: int = 0,
                    res: torch.Tensor | None = None, res_tables=None, store_lse: bool = False):
    """Run ``_sparse_attn_fwd_kernel`` over ``tables``; returns ``(out, lse or None)``.

    ``kept``: ``[B*H, n_src_groups, n_keep]`` int32. ``res``: ``[B, H, n, D]`` (residual to up-sample
    for ``epilogue=1`` with ``res_tables=(idx, w)``; the dense output for ``epilogue=2``).
    """
    B, H, NQ, D = q.shape
    dev = q.device
    q_idx, kv_idx, kv_len = (to_device(t, dev) for t in (tables.q_idx, tables.kv_idx, tables.kv_len))
    kv_bits = to_device(tables.kv_bits, dev) if token_mask else kv_idx
    tile_src = to_device(tables.tile_src, dev) if kept is not None else kv_len
    out = _empty(B, H, NQ, D, device=dev, dtype=q.dtype)
    lse = _empty(B, H, NQ, device=dev, dtype=torch.float32) if store_lse else out
    res_t = res if res is not None else out
    res_idx, res_w = (to_device(t, dev) for t in res_tables) if res_tables is not None else (kv_len, kv_len)
    kept_t = kept if kept is not None else kv_len
    n_src, n_keep = (kept.shape[1], kept.shape[2]) if kept is not None else (1, 0)
    grid = (tables.num_tiles, B * H)
    _launch(_sparse_attn_fwd_kernel, grid, name, config,
            q, k, v, out, lse, res_t, q_idx, kv_idx, kv_len, kv_bits, kept_t, tile_src, res_idx, res_w,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *res_t.stride(),
            H, k.shape[2], NQ, kv_idx.shape[1], n_keep, n_src, scale * LOG2E,
            BM=config.block_m, BN=config.block_n, D=D, NWORDS=max(1, config.block_m // 64),
            KV_DENSE=kv_dense, HAS_KEPT=kept is not None, HAS_LIST=kv_list,
            TOKEN_MASK=token_mask, EPILOGUE=epilogue, STORE_LSE=store_lse, IEEE=q.dtype == torch.float32)
    return out, (lse if store_lse else None)


def column_scores_fwd(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, group_size: int,
                      config: KernelConfig) -> torch.Tensor:
    """``[B, H, n_groups, L]`` fp32 column scores normalised by ``lse`` (natural log)."""
    B, H, NQ, D = q.shape
    L = k.shape[2]
    n_groups = -(-NQ // group_size)
    scores = _empty(B, H, n_groups, L, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(L, config.block_n), n_groups, B * H)
    _launch(_column_scores_kernel, grid, "cs4a_scores", config,
            q, k, lse, scores, *q.stride(), *k.stride(), H, L, NQ, n_groups, group_size, scale * LOG2E,
            BM=config.block_m, BN=config.block_n, D=D, IEEE=q.dtype == torch.float32)
    return scores
