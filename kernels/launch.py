"""Launchers: allocate outputs, build grids, pick configs, turn launch failures into clear errors."""

from __future__ import annotations

import os
import warnings

import torch
import triton

from .config import KernelConfig
from .sparse_attn import LOG2E, _column_scores_kernel, _select_topk_kernel, _sparse_attn_fwd_kernel
from .tiles import TileTables, dense_tiles, to_device

__all__ = ["KernelLaunchError", "check_kernel_inputs", "sparse_attn_fwd", "column_scores_fwd", "select_topk_fwd",
           "dense_lse_fwd", "interpreting"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Tests set this so every output starts as NaN (indices as -1) and an element a kernel never
#: writes fails.
poison_outputs = False


def _empty(*args, **kwargs) -> torch.Tensor:
    t = torch.empty(*args, **kwargs)
    if poison_outputs:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


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
    check_device(q)
    if interpreting() and q.dtype == torch.bfloat16:
        raise ValueError("Triton's interpreter cannot do bfloat16 dots; use float16 or float32 on the CPU")


def check_device(t: torch.Tensor) -> None:
    if interpreting():
        if t.device.type != "cpu":
            raise ValueError(f"TRITON_INTERPRET=1 runs kernels on CPU tensors, got {t.device}")
    elif t.device.type != "cuda":
        raise ValueError(f"kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {t.device}")


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


def column_scores_fwd(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, tables: TileTables,
                      group_size: int, config: KernelConfig) -> torch.Tensor:
    """``[B, H, n_groups, L]`` fp32 column scores normalised by ``lse`` (natural log).

    ``tables``: group tiles of the decision scale (``group_tiles``) with ``config.block_m``.
    Per-tile partial sums are added per group in tile order (deterministic, no atomics).
    """
    B, H, NQ, D = q.shape
    L, T = k.shape[2], tables.num_tiles
    partial = _empty(B * H, T + 1, L, device=q.device, dtype=torch.float32)
    partial[:, T].zero_()
    _launch(_column_scores_kernel, (T, B * H), "cs4a_scores", config,
            q, k, lse, partial, to_device(tables.q_idx, q.device), *q.stride(), *k.stride(),
            H, L, NQ, T + 1, scale * LOG2E, BM=config.block_m, BN=config.block_n, D=D, IEEE=q.dtype == torch.float32)
    scores = partial[:, to_device(tables.members, q.device)].sum(dim=2)
    return scores.reshape(B, H, -1, L)


# Rows longer than this fall back to a stable sort (the bisection keeps a row in registers).
_TOPK_MAX_LEN = 32768


def select_topk_fwd(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``[..., L]`` non-negative scores -> ``[..., n_keep]`` int32 indices, ascending, ties to the
    lower index (SPEC section 4, step 3)."""
    L = scores.shape[-1]
    if L > _TOPK_MAX_LEN:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_keep]
        return torch.sort(order, dim=-1).values.to(torch.int32)
    rows = scores.reshape(-1, L).contiguous()
    kept = _empty(*scores.shape[:-1], n_keep, device=scores.device, dtype=torch.int32)
    BL = triton.next_power_of_2(L)
    _launch(_select_topk_kernel, (rows.shape[0],), "cs4a_topk", KernelConfig(16, 16, 8 if BL >= 4096 else 4, 1),
            rows, kept, L, n_keep, BL=BL)
    return kept


_warned_backends: set = set()


def dense_lse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: KernelConfig):
    """Dense attention and its log-sum-exp ``[B, H, Lq]`` (fp32, natural log).

    ``config.backend`` picks cuDNN or flash SDPA (their LSE outputs) or the Triton kernel; the
    library backends need CUDA and fp16/bf16, otherwise the Triton kernel runs (same function).
    """
    backend = config.backend
    if backend != "triton" and (q.device.type != "cuda" or q.dtype == torch.float32 or interpreting()):
        backend = "triton"
    try:
        if backend == "cudnn":
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
            return out, lse.reshape(q.shape[:3]).float().contiguous()
        if backend == "flash":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
            return out, lse.reshape(q.shape[:3]).float().contiguous()
    except RuntimeError as e:
        if backend not in _warned_backends:
            _warned_backends.add(backend)
            warnings.warn(f"{backend} attention is unavailable here ({e}); using the Triton kernel", stacklevel=2)
    return sparse_attn_fwd(q, k, v, dense_tiles(q.shape[2], config.block_m), config, scale, name="cs4a_dense",
                           kv_dense=True, store_lse=True)
