"""Tile tables: which queries each program owns and which keys it visits (host side, cached).

Nothing here is ``[queries, keys]``-sized. A CSLA tile lists the union of its queries' allowed
keys (a few hundred at Infinity 1024) with one bit per (query slot, key) saying whether the SPEC
section 3 rule allows the pair. A CS4A tile is a run of queries that inherit one decision
group's kept set; its band keys are contiguous ranges per scale, with each query's own range
(its group's) applied per row. Tables are built once per (schedule, step, parameters, tiling).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from sparvar.reference import CS4AParams, CSLAParams, Schedule, band_ranges, key_windows, num_groups, source_groups

__all__ = ["CSLATiles", "GroupTiles", "csla_tiles", "group_tiles", "dense_tiles", "residual_tables", "mask_words"]


def mask_words(block_m: int) -> int:
    """64-bit words per key in a CSLA tile's mask: one bit per query slot."""
    return max(1, block_m // 64)


@dataclass(frozen=True)
class CSLATiles:
    """``q_idx [T, BM]`` query indices (-1 = empty slot); ``kv_idx [T, NK]`` key indices
    (-1 = padding, NK a multiple of BN); ``kv_len [T]`` entries used per tile; ``kv_bits
    [T, NK, mask_words(BM)]`` int64 masks (bit ``s % 64`` of word ``s // 64``: slot s may see the
    key)."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    kv_len: torch.Tensor
    kv_bits: torch.Tensor

    @property
    def num_tiles(self) -> int:
        return self.q_idx.shape[0]

    def to(self, device) -> "CSLATiles":
        return CSLATiles(*(t.to(device) for t in (self.q_idx, self.kv_idx, self.kv_len, self.kv_bits)))


@dataclass(frozen=True)
class GroupTiles:
    """CS4A tiles: ``q_idx [T, BM]`` (-1 = empty slot), ``tile_src [T]`` the decision group whose
    kept set the tile's queries inherit; for steps after ``d`` with bands, ``tile_band [T, NB, 2]``
    the union over the tile's queries of their inclusive band ranges per band scale, and
    ``row_band [NQ, NB, 2]`` each query's own ranges (its group's; ``[0, -1]`` = none). ``None``
    without bands."""

    q_idx: torch.Tensor
    tile_src: torch.Tensor
    tile_band: torch.Tensor | None = None
    row_band: torch.Tensor | None = None

    @property
    def num_tiles(self) -> int:
        return self.q_idx.shape[0]

    @property
    def num_bands(self) -> int:
        return 0 if self.row_band is None else self.row_band.shape[1]

    def to(self, device) -> "GroupTiles":
        return GroupTiles(*(None if t is None else t.to(device)
                            for t in (self.q_idx, self.tile_src, self.tile_band, self.row_band)))


def _pad_rows(rows: list[np.ndarray], multiple: int, fill: int) -> np.ndarray:
    width = max([len(r) for r in rows] + [1])
    width = -(-width // multiple) * multiple
    out = np.full((len(rows), width) + rows[0].shape[1:], fill, dtype=rows[0].dtype)
    for t, r in enumerate(rows):
        out[t, : len(r)] = r
    return out


def _query_row(indices: np.ndarray, block_m: int) -> np.ndarray:
    return np.concatenate([indices, np.full(block_m - indices.size, -1)]).astype(np.int32)


@lru_cache(maxsize=256)
def csla_tiles(schedule: Schedule, step: int, params: CSLAParams, tile_h: int, tile_w: int,
               block_n: int) -> CSLATiles:
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
            q_rows.append(_query_row(qi * wk + qj, block_m))
            keys, bits = [], []
            for m in range(step + 1):
                k, b = _scale_keys(schedule, step, m, windows[m], qi, qj)
                keys.append(k)
                bits.append(b)
            keys, allowed = np.concatenate(keys), np.concatenate(bits, axis=1)  # [nk], [nq, nk]
            kv_rows.append(keys.astype(np.int32))
            bit_rows.append(_pack_bits(allowed, block_m))
    return CSLATiles(
        q_idx=torch.from_numpy(np.stack(q_rows)),
        kv_idx=torch.from_numpy(_pad_rows(kv_rows, block_n, -1)),
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
    out = np.zeros((allowed.shape[1], mask_words(block_m)), dtype=np.uint64)
    for s in range(allowed.shape[0]):
        out[:, s // 64] |= allowed[s].astype(np.uint64) << np.uint64(s % 64)
    return out.view(np.int64)


@lru_cache(maxsize=256)
def group_tiles(schedule: Schedule, step: int, params: CS4AParams, block_m: int) -> GroupTiles:
    """CS4A tiles of up to ``block_m`` consecutive queries that inherit one kept set.

    At the decision scale a tile stays inside its group. Later, consecutive groups often inherit
    the same decision group (SPEC section 4, later step 1: 22 groups of scale 12 map onto 9 at
    Infinity 1024), so a tile runs across them and each row applies its own group's band ranges
    (step 2): full tiles of 128 queries where groups hold 192.
    """
    nq, g, d = schedule.sizes[step], params.group_size, params.decision_scale
    n_g = num_groups(nq, g)
    src = source_groups(num_groups(schedule.sizes[d], g), n_g).numpy() if step > d else np.arange(n_g)
    runs, start = [], 0
    for G in range(1, n_g + 1):
        if G == n_g or src[G] != src[G - 1]:
            runs.append((start * g, min(nq, G * g), int(src[G - 1])))
            start = G
    q_rows, tile_src = [], []
    for lo, hi, s in runs:
        for t0 in range(lo, hi, block_m):
            q_rows.append(_query_row(np.arange(t0, min(t0 + block_m, hi)), block_m))
            tile_src.append(s)
    q_idx = np.stack(q_rows)
    out = GroupTiles(q_idx=torch.from_numpy(q_idx), tile_src=torch.tensor(tile_src, dtype=torch.int32))
    if step == d:
        return out
    ranges = band_ranges(schedule, step, params).numpy()  # [n_g, S, 2]
    scales = [m for m in range(d + 1, step + 1) if (ranges[:, m, 1] >= ranges[:, m, 0]).any()]
    if not scales:
        return out
    row_band = ranges[np.arange(nq) // g][:, scales]  # [nq, NB, 2]
    valid = q_idx >= 0
    rows = row_band[np.where(valid, q_idx, 0)]  # [T, BM, NB, 2]
    empty = rows[..., 1] < rows[..., 0]
    lo = np.where(valid[..., None] & ~empty, rows[..., 0], np.iinfo(np.int64).max).min(axis=1)
    hi = np.where(valid[..., None] & ~empty, rows[..., 1], -1).max(axis=1)
    tile_band = np.stack([np.where(hi >= 0, lo, 0), hi], axis=-1)  # [T, NB, 2]; none: [0, -1]
    return GroupTiles(q_idx=out.q_idx, tile_src=out.tile_src,
                      tile_band=torch.from_numpy(tile_band.astype(np.int32)),
                      row_band=torch.from_numpy(np.ascontiguousarray(row_band).astype(np.int32)))


@lru_cache(maxsize=256)
def dense_tiles(num_queries: int, block_m: int) -> torch.Tensor:
    """``q_idx [T, BM]`` of consecutive query tiles (-1 = empty slot); the kernel walks all keys."""
    q = np.arange(-(-num_queries // block_m) * block_m)
    q[q >= num_queries] = -1
    return torch.from_numpy(q.reshape(-1, block_m).astype(np.int32))


def _bilinear_axis(n_in: int, n_out: int):
    """Source rows and weights of ``interpolate(mode="bilinear", align_corners=False)`` on the
    CPU: an axis whose size does not change is copied (its second tap is the first), which
    matters only for NaN and infinities (0 * NaN is NaN)."""
    if n_in == n_out:
        same = np.arange(n_out)
        return same, same, np.zeros(n_out)
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
