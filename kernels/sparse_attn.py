"""One block-sparse attention kernel for every SparVAR step, variants chosen by constexpr flags.

A program owns one query tile (a row of ``q_idx``; CSLA tiles are 2-D patches) of one
(batch, head) and runs an online softmax over the keys the tile visits:
- ``KV_DENSE``: all ``L`` keys in order (the CS4A decision step's dense pass);
- ``kept`` given: the kept keys of the tile's decision group (CS4A), by index, or with
  ``KEPT_PACKED`` streamed from a contiguous copy of their K and V rows;
- ``kv_idx`` given: the tile's key list, with ``kv_bits`` the per-(query, key) bits that make
  CSLA token-exact inside every computed block;
- ``tile_band`` given: contiguous band ranges per scale, each row limited to its own range.
An absent tensor is passed as ``None`` and the flag that uses it follows from that
(``triton.heuristics``); ``v=None`` computes the log-sum-exp alone.

Non-finite inputs follow ``sparvar.reference.attention``: NaN or +inf scores poison their row
through the softmax itself. A value row with a NaN or an infinity would also leak into rows that
may not see it (0 * NaN is NaN inside the product), so a program whose tile result holds anything
non-finite computes the tile again with values checked key by key (``SAFE``). On finite inputs
that costs one reduction per tile; one launch does everything (a second launch for the redo cost
a launch's host time, more than the kernel at small scales).

Scores are kept in the log2 domain (``qk * scale * log2(e)``) so the softmax uses ``exp2``.
"""

from __future__ import annotations

from enum import IntEnum

import triton
import triton.language as tl

__all__ = ["LOG2E", "LN2", "Epilogue"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


class Epilogue(IntEnum):
    """What the attention kernel does with ``O`` before storing it."""

    NONE = 0
    #: ``O + up(R)``: the decision step's residual, bilinearly up-sampled (4 taps per query).
    ADD_RESIDUAL = 1
    #: ``R = O_dense - O``, with ``O_dense`` read from ``res`` (rows holding a non-finite value
    #: are made all-NaN there first, as the rule for non-finite inputs says).
    RESIDUAL_FROM_DENSE = 2


@triton.jit
def _attend_block(acc, m_i, l_i, bad, b_q, k, v, o_n, m_n, allowed, stride_kl, stride_kd, stride_vl,
                  stride_vd, qk_scale, D: tl.constexpr, HAS_V: tl.constexpr, SAFE: tl.constexpr,
                  IEEE: tl.constexpr, MASKED: tl.constexpr, GUARD: tl.constexpr):
    """One key block of the online softmax. ``MASKED``: apply ``m_n`` (keys) and ``allowed``
    (pairs); a block whose every pair is allowed skips both. ``GUARD``: rows may have seen no
    allowed key yet (m = -inf). Without it such a row turns NaN, which the fast pass's final
    check catches and the ``SAFE`` redo (always guarded) computes right, so an unguarded pass is
    exact whenever its result is finite."""
    o_d = tl.arange(0, D)
    o_n64 = o_n.to(tl.int64)
    if MASKED:
        b_k = tl.load(k + o_n64[:, None] * stride_kl + o_d[None, :] * stride_kd, mask=m_n[:, None], other=0.0)
    else:
        b_k = tl.load(k + o_n64[:, None] * stride_kl + o_d[None, :] * stride_kd)
    # [BM, BN]
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    if MASKED:
        b_s = tl.where(allowed, b_s * qk_scale, float("-inf"))
    else:
        b_s = b_s * qk_scale
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    if GUARD:
        # A row with nothing allowed yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    b_p = tl.exp2(b_s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    if HAS_V:
        if MASKED:
            b_v = tl.load(v + o_n64[:, None] * stride_vl + o_d[None, :] * stride_vd, mask=m_n[:, None], other=0.0)
        else:
            b_v = tl.load(v + o_n64[:, None] * stride_vl + o_d[None, :] * stride_vd)
        if SAFE:
            # x * 0 is 0 for a finite x and NaN otherwise.
            b_vz = b_v * 0.0
            v_bad = tl.max((b_vz != 0).to(tl.int32), 1) > 0
            if MASKED:
                bad = bad | (tl.max((allowed & v_bad[None, :]).to(tl.int32), 1) > 0)
            else:
                bad = bad | (tl.max(v_bad.to(tl.int32), 0) > 0)
            b_v = tl.where(b_vz == 0, b_v, 0.0)
        # [BM, D]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return acc, m_new, l_i, bad


@triton.jit
def _visit_keys(b_q, b_qi64, m_q, k, v, kv_idx, kv_len, kv_bits, kept, tile_src, tile_band, row_band,
                i_t, i_bh, stride_kl, stride_kd, stride_vl, stride_vd, L, NK, n_keep, n_src, NB, qk_scale,
                BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, NWORDS: tl.constexpr,
                KV_DENSE: tl.constexpr, HAS_KEPT: tl.constexpr, HAS_LIST: tl.constexpr,
                TOKEN_MASK: tl.constexpr, HAS_BANDS: tl.constexpr, HAS_V: tl.constexpr,
                SAFE: tl.constexpr, IEEE: tl.constexpr, KEPT_PACKED: tl.constexpr):
    """The online softmax over every key the tile visits; ``bad`` flags rows poisoned by a
    non-finite value row (checked only when ``SAFE``)."""
    o_m = tl.arange(0, BM)
    o_bn = tl.arange(0, BN)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    bad = o_m < 0
    all_rows = o_m[:, None] >= 0
    # Dense and kept keys: every row may see every key of a block, and the first block gives
    # each row at least one key, so full blocks run unmasked; the tail is masked. Unguarded
    # where a NaN reaches the output check (values on, fast pass); the LSE-only pass has no redo.
    if KV_DENSE:
        n_full = L // BN * BN
        for start in range(0, n_full, BN):
            acc, m_i, l_i, bad = _attend_block(acc, m_i, l_i, bad, b_q, k, v, start + o_bn, None, None,
                                               stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, D, HAS_V,
                                               SAFE, IEEE, False, SAFE or not HAS_V)
        if n_full < L:
            o_n = n_full + o_bn
            m_n = o_n < L
            acc, m_i, l_i, bad = _attend_block(acc, m_i, l_i, bad, b_q, k, v, o_n, m_n, all_rows & m_n[None, :],
                                               stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, D, HAS_V,
                                               SAFE, IEEE, True, SAFE or not HAS_V)
    if KEPT_PACKED:
        # ``kept`` holds the kept keys' K then V rows, ``[BH, n_src, 2, NKP, D]`` (NKP: n_keep
        # rounded up to 128 as cs4a._packed_rows does, rows past n_keep zero and never allowed):
        # streamed like dense keys.
        src = tl.load(tile_src + i_t).to(tl.int64)
        nkp = (n_keep + 127) // 128 * 128
        p_kk = kept + (i_bh.to(tl.int64) * n_src + src) * 2 * nkp * D
        n_full = n_keep // BN * BN
        for start in range(0, n_full, BN):
            acc, m_i, l_i, bad = _attend_block(acc, m_i, l_i, bad, b_q, p_kk, p_kk + nkp * D, start + o_bn, None,
                                               None, D, 1, D, 1, qk_scale, D, HAS_V, SAFE, IEEE, False,
                                               SAFE or not HAS_V)
        if n_full < n_keep:
            o_n = n_full + o_bn
            m_n = o_n < n_keep
            acc, m_i, l_i, bad = _attend_block(acc, m_i, l_i, bad, b_q, p_kk, p_kk + nkp * D, o_n, m_n,
                                               all_rows & m_n[None, :], D, 1, D, 1, qk_scale, D, HAS_V, SAFE, IEEE,
                                               True, SAFE or not HAS_V)
    elif HAS_KEPT:
        src = tl.load(tile_src + i_t).to(tl.int64)
        p_kept = kept + (i_bh.to(tl.int64) * n_src + src) * n_keep
        n_full = n_keep // BN * BN
        for start in range(0, n_full, BN):
            o_n = tl.load(p_kept + start + o_bn)
            acc, m_i, l_i, bad = _attend_block(acc, m_i, l_i, bad, b_q, k, v, o_n, None, None,
                                               stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, D, HAS_V,
                                               SAFE, IEEE, False, SAFE or not HAS_V)
        if n_full < n_keep:
            m_n = n_full + o_bn < n_keep
            o_n = tl.load(p_kept + n_full + o_bn, mask=m_n, other=0)
            acc, m_i, l_i, bad = _attend_block(acc, m_i, l_i, bad, b_q, k, v, o_n, m_n, all_rows & m_n[None, :],
                                               stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, D, HAS_V,
                                               SAFE, IEEE, True, SAFE or not HAS_V)
    if HAS_LIST:
        n_list = tl.load(kv_len + i_t)
        p_list = kv_idx + i_t.to(tl.int64) * NK
        for start in range(0, n_list, BN):
            o_n = tl.load(p_list + start + o_bn)
            m_n = o_n >= 0
            allowed = all_rows & m_n[None, :]
            if TOKEN_MASK:
                # Slot s reads bit s % 64 of word s // 64 of each key's mask.
                p_bits = kv_bits + (i_t.to(tl.int64) * NK + start + o_bn) * NWORDS
                if NWORDS == 1:
                    b_word = tl.load(p_bits)[None, :]
                else:
                    b_word = tl.zeros([BM, BN], dtype=tl.int64)
                    for w in tl.static_range(NWORDS):
                        b_word = tl.where((o_m // 64)[:, None] == w, tl.load(p_bits + w)[None, :], b_word)
                allowed = allowed & (((b_word >> (o_m % 64).to(tl.int64)[:, None]) & 1) != 0)
            acc, m_i, l_i, bad = _attend_block(acc, m_i, l_i, bad, b_q, k, v, o_n, m_n, allowed,
                                               stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, D, HAS_V,
                                               SAFE, IEEE, True, True)
    if HAS_BANDS:
        for b in range(0, NB):
            p_tile = tile_band + (i_t.to(tl.int64) * NB + b) * 2
            lo, hi = tl.load(p_tile), tl.load(p_tile + 1)
            p_row = row_band + (b_qi64 * NB + b) * 2
            r_lo = tl.load(p_row, mask=m_q, other=0)
            r_hi = tl.load(p_row + 1, mask=m_q, other=-1)
            for start in range(lo, hi + 1, BN):
                o_n = start + o_bn
                m_n = o_n <= hi
                allowed = (o_n[None, :] >= r_lo[:, None]) & (o_n[None, :] <= r_hi[:, None]) & m_n[None, :]
                # Kept keys came first (each row has seen one): guarded only in the redo.
                acc, m_i, l_i, bad = _attend_block(acc, m_i, l_i, bad, b_q, k, v, o_n, m_n, allowed,
                                                   stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, D, HAS_V,
                                                   SAFE, IEEE, True, SAFE or not HAS_V or not HAS_KEPT)
    return acc, m_i, l_i, bad


@triton.jit
def _tile(q, k, v, o, lse, res, q_idx, kv_idx, kv_len, kv_bits, kept, tile_src, tile_band, row_band, res_idx, res_w,
          i_t, i_bh, stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
          stride_vb, stride_vh, stride_vl, stride_vd, stride_ob, stride_oh, stride_ol, stride_od,
          stride_rb, stride_rh, stride_rl, stride_rd, H, L, NQ, NK, n_keep, n_src, NB, qk_scale,
          BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, NWORDS: tl.constexpr, KV_DENSE: tl.constexpr,
          EPILOGUE: tl.constexpr, IEEE: tl.constexpr, SAFE: tl.constexpr, HAS_V: tl.constexpr,
          STORE_LSE: tl.constexpr, HAS_KEPT: tl.constexpr, HAS_LIST: tl.constexpr, TOKEN_MASK: tl.constexpr,
          HAS_BANDS: tl.constexpr, KEPT_PACKED: tl.constexpr):
    """Attention of query tile ``i_t`` of (batch, head) ``i_bh``, stored; returns whether the
    result holds anything non-finite (only looked at when ``SAFE`` is off)."""
    i_b, i_h = i_bh // H, i_bh % H
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    b_qi = tl.load(q_idx + i_t * BM + o_m)
    m_q = b_qi >= 0
    b_qi64 = b_qi.to(tl.int64)
    q += i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k += i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    if HAS_V:
        v += i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    b_q = tl.load(q + b_qi64[:, None] * stride_ql + o_d[None, :] * stride_qd, mask=m_q[:, None], other=0.0)

    acc, m_i, l_i, bad = _visit_keys(
        b_q, b_qi64, m_q, k, v, kv_idx, kv_len, kv_bits, kept, tile_src, tile_band, row_band, i_t, i_bh,
        stride_kl, stride_kd, stride_vl, stride_vd, L, NK, n_keep, n_src, NB, qk_scale,
        BM, BN, D, NWORDS, KV_DENSE, HAS_KEPT, HAS_LIST, TOKEN_MASK, HAS_BANDS, HAS_V, SAFE, IEEE, KEPT_PACKED)
    # x * 0 is 0 for a finite x and NaN otherwise.
    nonfinite = tl.sum(tl.where(m_q[:, None], (acc * 0.0 != 0).to(tl.int32), 0)) > 0

    if STORE_LSE:
        # Rows with nothing allowed have l = 0: lse = -inf. NaN stays NaN.
        b_lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * 0.6931471805599453,
                         tl.where(l_i == 0, float("-inf"), l_i))
        tl.store(lse + i_bh.to(tl.int64) * NQ + b_qi64, b_lse, mask=m_q)
    if HAS_V:
        # Rows with no allowed key have l = 0 and acc = 0: they output zeros.
        b_o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        b_o = tl.where(bad[:, None], float("nan"), b_o)
        if EPILOGUE == 1:
            res += i_b.to(tl.int64) * stride_rb + i_h.to(tl.int64) * stride_rh
            for c in tl.static_range(4):
                b_src = tl.load(res_idx + b_qi64 * 4 + c, mask=m_q, other=0).to(tl.int64)
                b_w = tl.load(res_w + b_qi64 * 4 + c, mask=m_q, other=0.0)
                b_r = tl.load(res + b_src[:, None] * stride_rl + o_d[None, :] * stride_rd, mask=m_q[:, None],
                              other=0.0)
                b_o += b_w[:, None] * b_r.to(tl.float32)
        if EPILOGUE == 2:
            res += i_b.to(tl.int64) * stride_rb + i_h.to(tl.int64) * stride_rh
            p_dense = res + b_qi64[:, None] * stride_rl + o_d[None, :] * stride_rd
            b_dense = tl.load(p_dense, mask=m_q[:, None], other=0.0)
            dense_bad = tl.max(((b_dense * 0.0) != 0).to(tl.int32), 1) > 0
            b_dense = tl.where(dense_bad[:, None], float("nan"), b_dense)
            tl.store(p_dense, b_dense, mask=m_q[:, None])
            b_o = b_dense.to(tl.float32) - b_o
        o += i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
        tl.store(o + b_qi64[:, None] * stride_ol + o_d[None, :] * stride_od, b_o.to(o.dtype.element_ty),
                 mask=m_q[:, None])
    return nonfinite


@triton.heuristics({
    "HAS_V": lambda a: a["v"] is not None,
    "STORE_LSE": lambda a: a["lse"] is not None,
    "HAS_KEPT": lambda a: a["kept"] is not None,
    "HAS_LIST": lambda a: a["kv_idx"] is not None,
    "TOKEN_MASK": lambda a: a["kv_bits"] is not None,
    "HAS_BANDS": lambda a: a["tile_band"] is not None,
})
@triton.jit
def _sparse_attn_fwd_kernel(
    q, k, v, o, lse, res,
    q_idx, kv_idx, kv_len, kv_bits, kept, tile_src, tile_band, row_band, res_idx, res_w,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_rb, stride_rh, stride_rl, stride_rd,
    H, L, NQ, NK, n_keep, n_src, NB, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, NWORDS: tl.constexpr, KV_DENSE: tl.constexpr,
    EPILOGUE: tl.constexpr, IEEE: tl.constexpr, HAS_V: tl.constexpr, STORE_LSE: tl.constexpr,
    HAS_KEPT: tl.constexpr, HAS_LIST: tl.constexpr, TOKEN_MASK: tl.constexpr, HAS_BANDS: tl.constexpr,
    KEPT_PACKED: tl.constexpr,
):
    """One program per (query tile, batch*head). The tile is computed without any check; if its
    result holds anything non-finite (rare: only non-finite inputs do that), the same program
    computes and stores it again with value rows checked key by key (the rule for non-finite
    values). The redo sits after the first store, so nothing of the fast pass is live across it."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    nonfinite = _tile(q, k, v, o, lse, res, q_idx, kv_idx, kv_len, kv_bits, kept, tile_src, tile_band, row_band,
                      res_idx, res_w, i_t, i_bh, stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh,
                      stride_kl, stride_kd, stride_vb, stride_vh, stride_vl, stride_vd, stride_ob, stride_oh,
                      stride_ol, stride_od, stride_rb, stride_rh, stride_rl, stride_rd, H, L, NQ, NK, n_keep,
                      n_src, NB, qk_scale, BM, BN, D, NWORDS, KV_DENSE, EPILOGUE, IEEE, False, HAS_V, STORE_LSE,
                      HAS_KEPT, HAS_LIST, TOKEN_MASK, HAS_BANDS, KEPT_PACKED)
    if HAS_V:
        if nonfinite:
            _tile(q, k, v, o, lse, res, q_idx, kv_idx, kv_len, kv_bits, kept, tile_src, tile_band, row_band,
                  res_idx, res_w, i_t, i_bh, stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh,
                  stride_kl, stride_kd, stride_vb, stride_vh, stride_vl, stride_vd, stride_ob, stride_oh,
                  stride_ol, stride_od, stride_rb, stride_rh, stride_rl, stride_rd, H, L, NQ, NK, n_keep,
                  n_src, NB, qk_scale, BM, BN, D, NWORDS, KV_DENSE, EPILOGUE, IEEE, True, HAS_V, STORE_LSE,
                  HAS_KEPT, HAS_LIST, TOKEN_MASK, HAS_BANDS, KEPT_PACKED)


@triton.jit
def _column_scores_kernel(
    q, k, lse, scores,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    H, L, NQ, group_size, n_groups, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):
    """``scores[bh, G, key] = sum_{q in G} exp(s[q, key] - lse[q])`` for one block of keys.

    One program per (key block, group, batch*head): its keys stay on chip while the group's
    queries stream through in sub-tiles of ``BM``, so each group's score is written once, summed
    in a fixed order (no partial buffers, no atomics). Scores are computed transposed, keys as
    rows, so the per-key sum is a row reduction.
    """
    i_n, i_g, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, D)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < L
    q += i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k += i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    b_k = tl.load(k + o_n.to(tl.int64)[:, None] * stride_kl + o_d[None, :] * stride_kd, mask=m_n[:, None], other=0.0)
    q_lo = i_g * group_size
    q_hi = tl.minimum(q_lo + group_size, NQ)
    acc = tl.zeros([BN], dtype=tl.float32)
    for q0 in range(q_lo, q_hi, BM):
        o_q = q0 + tl.arange(0, BM)
        m_q = o_q < q_hi
        b_qt = tl.load(q + o_q.to(tl.int64)[None, :] * stride_ql + o_d[:, None] * stride_qd, mask=m_q[None, :],
                       other=0.0)
        b_lse2 = tl.load(lse + i_bh.to(tl.int64) * NQ + o_q, mask=m_q, other=0.0) * 1.4426950408889634
        # [BN, BM]
        if IEEE:
            b_st = tl.dot(b_k, b_qt, input_precision="ieee")
        else:
            b_st = tl.dot(b_k, b_qt)
        b_pt = tl.exp2(b_st * qk_scale - b_lse2[None, :])
        acc += tl.sum(tl.where(m_q[None, :], b_pt, 0.0), 1)
    tl.store(scores + (i_bh.to(tl.int64) * n_groups + i_g) * L + o_n, acc, mask=m_n)


@triton.jit
def _select_topk_kernel(scores, kept, L, n_keep, BL: tl.constexpr):
    """Per row: indices of the ``n_keep`` largest scores, ties to the lower index, ascending.

    Each float becomes an int32 key that orders like the float (NaN above +inf, -0.0 equal to
    0.0, as ``torch.sort`` orders them). A 32-step bisection over the key range finds the
    ``n_keep``-th largest key exactly; ties at it are taken in index order, and a prefix sum
    places the chosen indices in ascending order. Exactly ``n_keep`` slots are written, each
    inside the row, whatever the scores hold.
    """
    i_row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BL)
    m = o < L
    b_s = tl.load(scores + i_row * L + o, mask=m, other=0.0)
    b_s = tl.where(b_s == 0.0, 0.0, b_s)
    b_s = tl.where(b_s != b_s, float("nan"), b_s)
    bits = b_s.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip their lower 31 bits.
    key = tl.where(m, bits ^ ((bits >> 31) & 0x7FFFFFFF), -2147483648)
    # Invariant: at least n_keep keys are >= lo, fewer than n_keep are >= hi (int64 scalars, so
    # the midpoint of the full int32 range cannot overflow). Padding holds the smallest key and
    # never counts: no real float maps to it.
    lo = tl.full([], -2147483647, dtype=tl.int64)
    hi = tl.full([], 2147483648, dtype=tl.int64)
    for _ in range(32):
        mid = (lo + hi) // 2
        enough = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0) >= n_keep
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    threshold = lo.to(tl.int32)
    above = m & (key > threshold)
    tie = m & (key == threshold)
    need = n_keep - tl.sum(above.to(tl.int32), 0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(kept + i_row * n_keep + pos, o, mask=take & (pos < n_keep))
