"""Tile schedules: which queries each program owns and which keys it visits (host side, cached).

Nothing here is ``[queries, keys]``-sized: a CSLA tile lists the union of its queries' allowed
keys (a few hundred at Infinity 1024) with one bit per (query slot, key) saying whether the SPEC
section 3 rule allows the pair; a CS4A tile lists its group's band keys. Tables are built once
per (schedule, step, parameters, tiling) and kept on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from sparvar.reference import CS4AParams, CSLAParams, Schedule, band_ranges, key_windows, num_groups
from sparvar.reference.cs4a import source_groups

__all__ = ["TileTables", "csla_tiles", "group_tiles", "dense_tiles", "residual_tables", "to_device"]


@dataclass(frozen=True)
class TileTables:
    """``q_idx [T, BM]`` query indices (-1 = empty slot); ``kv_idx [T, NK]`` key indices
    (-1 = padding, NK a multiple of BN); ``kv_len [T]`` entries used per tile; ``kv_bits
    [T, NK, BM // 64 or 1]`` int64 masks (bit s: slot s may see the key) or ``None``;
    ``tile_src [T]`` the decision group whose kept set a tile uses, or ``None``; ``members
    [n_groups, width]`` the tiles of each group of this scale, padded with ``T`` (group tiles only)."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    kv_len: torch.Tensor
    kv_bits: torch.Tensor | None = None
    tile_src: torch.Tensor | None = None
    members: torch.Tensor | None = None

    @property
    def num_tiles(self) -> int:
        return self.q_idx.shape[0]

    def visited_pairs(self) -> int:
        """Query-key pairs a tile visits (listed keys times valid queries), for density reports."""
        valid_q = (self.q_idx >= 0).sum(dim=1)
        blocks = self.kv_len
        return int((valid_q * blocks).sum())


def _pad_rows(rows: list[np.ndarray], multiple: int, fill: int) -> np.ndarray:
    width = max([len(r) for r in rows] + [1])
    width = -(-width // multiple) * multiple
    out = np.full((len(rows), width) + rows[0].shape[1:], fill, dtype=rows[0].dtype)
    for t, r in enumerate(rows):
        out[t, : len(r)] = r
    return out


def _words(block_m: int) -> int:
    return max(1, block_m // 64)


@lru_cache(maxsize=256)
def csla_tiles(schedule: Schedule, step: int, params: CSLAParams, tile_h: int, tile_w: int,
               block_n: int) -> TileTables:
    """2-D query tiles of ``tile_h x tile_w`` tokens and their allowed-key lists (SPEC section 3).

    For each key scale the tile's keys are the bounding rectangle of its queries' windows
    (rows ascending, so the list is sorted by key index); the bit of slot ``s`` is the exact
    per-token rule for that slot's query.
    """
    hk, wk = schedule.grids[step]
    block_m = tile_h * tile_w
    windows = key_windows(schedule.num_scales, params)
    q_rows, kv_rows, bit_rows = [], [], []
    for y0 in range(0, hk, tile_h):
        for x0 in range(0, wk, tile_w):
            qi, qj = np.meshgrid(np.arange(y0, min(y0 + tile_h, hk)), np.arange(x0, min(x0 + tile_w, wk)),
                                 indexing="ij")
            qi, qj = qi.ravel(), qj.ravel()
            q_rows.append(np.concatenate([qi * wk + qj, np.full(block_m - qi.size, -1)]).astype(np.int32))
            keys, bits = [], []
            for m in range(step + 1):
                k, b = _scale_keys(schedule, step, m, windows[m], qi, qj)
                keys.append(k)
                bits.append(b)
            keys, allowed = np.concatenate(keys), np.concatenate(bits, axis=1)  # [nk], [nq, nk]
            kv_rows.append(keys.astype(np.int32))
            bit_rows.append(_pack_bits(allowed, block_m))
    kv_idx = _pad_rows(kv_rows, block_n, -1)
    return TileTables(
        q_idx=torch.from_numpy(np.stack(q_rows)),
        kv_idx=torch.from_numpy(kv_idx),
        kv_len=torch.tensor([len(r) for r in kv_rows], dtype=torch.int32),
        kv_bits=torch.from_numpy(_pad_rows(bit_rows, block_n, 0)),
    )


def _scale_keys(schedule: Schedule, step: int, m: int, window: int, qi: np.ndarray, qj: np.ndarray):
    """Keys of scale ``m`` some query of the tile may see, and the per-query allowed matrix."""
    (hk, wk), (hm, wm) = schedule.grids[step], schedule.grids[m]
    off = schedule.offsets[m]
    if window == 0:
        return np.zeros(0, np.int64), np.zeros((qi.size, 0), bool)
    if window == -1:
        return off + np.arange(hm * wm), np.ones((qi.size, hm * wm), bool)
    half = window // 2
    cy, cx = (2 * qi + 1) * hm // (2 * hk), (2 * qj + 1) * wm // (2 * wk)
    rows = np.arange(max(cy.min() - half, 0), min(cy.max() + half, hm - 1) + 1)
    cols = np.arange(max(cx.min() - half, 0), min(cx.max() + half, wm - 1) + 1)
    p, r = np.meshgrid(rows, cols, indexing="ij")
    p, r = p.ravel(), r.ravel()
    allowed = (np.abs(p[None] - cy[:, None]) <= half) & (np.abs(r[None] - cx[:, None]) <= half)
    return off + p * wm + r, allowed


def _pack_bits(allowed: np.ndarray, block_m: int) -> np.ndarray:
    """``[nq, nk]`` bool -> ``[nk, words]`` int64, bit ``s % 64`` of word ``s // 64`` for slot s."""
    words = _words(block_m)
    out = np.zeros((allowed.shape[1], words), dtype=np.uint64)
    for s in range(allowed.shape[0]):
        out[:, s // 64] |= allowed[s].astype(np.uint64) << np.uint64(s % 64)
    return out.view(np.int64)


@lru_cache(maxsize=256)
def group_tiles(schedule: Schedule, step: int, params: CS4AParams, block_m: int, block_n: int) -> TileTables:
    """Tiles of ``block_m`` consecutive queries that never straddle a CS4A group, with the
    decision group each inherits (SPEC section 4, later step 1) and its band keys (step 2)."""
    nq, g = schedule.sizes[step], params.group_size
    n_g = num_groups(nq, g)
    d = params.decision_scale
    src = source_groups(num_groups(schedule.sizes[d], g), n_g) if step > d else torch.arange(n_g)
    ranges = band_ranges(schedule, step, params).numpy() if step > d else None
    q_rows, kv_rows, tile_src, members = [], [], [], []
    for G in range(n_g):
        members.append([])
        band = np.zeros(0, np.int64)
        if ranges is not None:
            band = np.concatenate([np.arange(lo, hi + 1) for lo, hi in ranges[G]])
        for start in range(G * g, min(nq, (G + 1) * g), block_m):
            stop = min(start + block_m, (G + 1) * g, nq)
            q_rows.append(np.concatenate([np.arange(start, stop), np.full(block_m - (stop - start), -1)]))
            kv_rows.append(band.astype(np.int32))
            tile_src.append(int(src[G]))
            members[G].append(len(q_rows) - 1)
    width = max(len(m) for m in members)
    return TileTables(
        q_idx=torch.from_numpy(np.stack(q_rows).astype(np.int32)),
        kv_idx=torch.from_numpy(_pad_rows(kv_rows, block_n, -1)),
        kv_len=torch.tensor([len(r) for r in kv_rows], dtype=torch.int32),
        tile_src=torch.tensor(tile_src, dtype=torch.int32),
        members=torch.tensor([m + [len(q_rows)] * (width - len(m)) for m in members], dtype=torch.long),
    )


@lru_cache(maxsize=256)
def dense_tiles(num_queries: int, block_m: int) -> TileTables:
    """Consecutive query tiles with no key list (the kernel walks all keys)."""
    q = np.arange(-(-num_queries // block_m) * block_m)
    q[q >= num_queries] = -1
    return TileTables(q_idx=torch.from_numpy(q.reshape(-1, block_m).astype(np.int32)),
                      kv_idx=torch.full((1, 1), -1, dtype=torch.int32),
                      kv_len=torch.zeros(q.size // block_m, dtype=torch.int32))


def _bilinear_axis(n_in: int, n_out: int):
    """Source rows and weights of ``interpolate(mode="bilinear", align_corners=False)``."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


@lru_cache(maxsize=64)
def residual_tables(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per destination token: 4 source raster indices ``[n, 4]`` int32 and weights ``[n, 4]`` fp32."""
    (hs, ws), (hd, wd) = src_hw, dst_hw
    y0, y1, ly = _bilinear_axis(hs, hd)
    x0, x1, lx = _bilinear_axis(ws, wd)
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")
    Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
    LY, LX = np.meshgrid(ly, lx, indexing="ij")
    idx = np.stack([Y0 * ws + X0, Y0 * ws + X1, Y1 * ws + X0, Y1 * ws + X1], -1).reshape(-1, 4)
    w = np.stack([(1 - LY) * (1 - LX), (1 - LY) * LX, LY * (1 - LX), LY * LX], -1).reshape(-1, 4)
    return torch.from_numpy(idx.astype(np.int32)), torch.from_numpy(w.astype(np.float32))


_DEVICE_CACHE: dict = {}


def to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The cached host table on ``device``, copied once (tables are immutable)."""
    if t is None or t.device == device:
        return t
    key = (id(t), str(device))
    hit = _DEVICE_CACHE.get(key)
    if hit is None or hit[0] is not t:
        hit = _DEVICE_CACHE[key] = (t, t.to(device))
    return hit[1]
