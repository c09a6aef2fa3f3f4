"""One block-sparse attention kernel for every SparVAR step, variants chosen by constexpr flags.

A program owns one query tile (a row of ``q_idx``, gathered: CSLA tiles are 2-D patches) of one
(batch, head) and runs an online softmax over the key blocks the tile visits:
- ``KV_DENSE``: all ``L`` keys in order (the CS4A decision step's dense pass);
- ``HAS_KEPT``: the ``n_keep`` kept keys of the tile's decision group (CS4A);
- ``HAS_LIST``: the tile's key list (CSLA windows or CS4A bands), with ``TOKEN_MASK`` applying
  the per-(query, key) bits of the list (CSLA is token-exact inside every computed block).
Epilogues: ``EPILOGUE == 1`` adds the bilinearly up-sampled residual (4 taps per query);
``EPILOGUE == 2`` writes ``res - O`` (the decision step's ``R = O_dense - O_sel``).
Scores are kept in the log2 domain (``qk * scale * log2(e)``) so the softmax uses ``exp2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(acc, m_i, l_i, b_q, k, v, o_n, m_n, allowed, stride_kl, stride_kd, stride_vl,
                  stride_vd, qk_scale, D: tl.constexpr, IEEE: tl.constexpr):
    o_d = tl.arange(0, D)
    o_n64 = o_n.to(tl.int64)
    b_k = tl.load(k + o_n64[:, None] * stride_kl + o_d[None, :] * stride_kd, mask=m_n[:, None], other=0.0)
    b_v = tl.load(v + o_n64[:, None] * stride_vl + o_d[None, :] * stride_vd, mask=m_n[:, None], other=0.0)
    # [BM, BN]
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    b_s = tl.where(allowed, b_s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    # A row with nothing allowed yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_p = tl.exp2(b_s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    # [BM, D]
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return acc, m_new, l_i


@triton.jit
def _sparse_attn_fwd_kernel(
    q, k, v, o, lse, res,
    q_idx, kv_idx, kv_len, kv_bits, kept, tile_src, res_idx, res_w,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_rb, stride_rh, stride_rl, stride_rd,
    H, L, NQ, NK, n_keep, n_src_groups, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, NWORDS: tl.constexpr,
    KV_DENSE: tl.constexpr, HAS_KEPT: tl.constexpr, HAS_LIST: tl.constexpr, TOKEN_MASK: tl.constexpr,
    EPILOGUE: tl.constexpr, STORE_LSE: tl.constexpr, IEEE: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    b_qi = tl.load(q_idx + i_t * BM + o_m)
    m_q = b_qi >= 0
    b_qi64 = b_qi.to(tl.int64)
    q += i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k += i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    v += i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    b_q = tl.load(q + b_qi64[:, None] * stride_ql + o_d[None, :] * stride_qd, mask=m_q[:, None], other=0.0)

    acc = tl.zeros([BM, D], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    o_bn = tl.arange(0, BN)
    all_rows = o_m[:, None] >= 0

    if KV_DENSE:
        for start in range(0, L, BN):
            o_n = start + o_bn
            m_n = o_n < L
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, b_q, k, v, o_n, m_n, all_rows & m_n[None, :],
                                          stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, D, IEEE)
    if HAS_KEPT:
        src = tl.load(tile_src + i_t).to(tl.int64)
        p_kept = kept + (i_bh.to(tl.int64) * n_src_groups + src) * n_keep
        for start in range(0, n_keep, BN):
            m_n = start + o_bn < n_keep
            o_n = tl.load(p_kept + start + o_bn, mask=m_n, other=0)
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, b_q, k, v, o_n, m_n, all_rows & m_n[None, :],
                                          stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, D, IEEE)
    if HAS_LIST:
        n_list = tl.load(kv_len + i_t)
        p_list = kv_idx + i_t.to(tl.int64) * NK
        for start in range(0, n_list, BN):
            o_n = tl.load(p_list + start + o_bn)
            m_n = o_n >= 0
            allowed = all_rows & m_n[None, :]
            if TOKEN_MASK:
                p_bits = kv_bits + (i_t.to(tl.int64) * NK + start + o_bn) * NWORDS
                if NWORDS == 1:
                    b_word = tl.load(p_bits)[None, :]
                else:
                    lo = tl.load(p_bits)
                    hi = tl.load(p_bits + 1)
                    b_word = tl.where(o_m[:, None] < 64, lo[None, :], hi[None, :])
                allowed = allowed & (((b_word >> (o_m[:, None] % 64).to(tl.int64)) & 1) != 0)
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, b_q, k, v, o_n, m_n, allowed,
                                          stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, D, IEEE)

    # Rows with no allowed key have l = 0 and acc = 0: they output zeros and lse = -inf.
    b_o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if EPILOGUE == 1:
        res += i_b.to(tl.int64) * stride_rb + i_h.to(tl.int64) * stride_rh
        for c in tl.static_range(4):
            b_src = tl.load(res_idx + b_qi64 * 4 + c, mask=m_q, other=0).to(tl.int64)
            b_w = tl.load(res_w + b_qi64 * 4 + c, mask=m_q, other=0.0)
            b_r = tl.load(res + b_src[:, None] * stride_rl + o_d[None, :] * stride_rd, mask=m_q[:, None], other=0.0)
            b_o += b_w[:, None] * b_r.to(tl.float32)
    if EPILOGUE == 2:
        res += i_b.to(tl.int64) * stride_rb + i_h.to(tl.int64) * stride_rh
        b_dense = tl.load(res + b_qi64[:, None] * stride_rl + o_d[None, :] * stride_rd, mask=m_q[:, None], other=0.0)
        b_o = b_dense.to(tl.float32) - b_o
    o += i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(o + b_qi64[:, None] * stride_ol + o_d[None, :] * stride_od, b_o.to(o.dtype.element_ty), mask=m_q[:, None])
    if STORE_LSE:
        b_lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * 0.6931471805599453, float("-inf"))
        tl.store(lse + i_bh.to(tl.int64) * NQ + b_qi64, b_lse, mask=m_q)


@triton.jit
def _column_scores_kernel(
    q, k, lse, partial, q_idx,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    H, L, NQ, T, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):
    """``partial[bh, t, key] = sum_{q in tile t} exp(s[q, key] - lse[q])``.

    One program per (query tile, batch*head) walks all keys like a flash-attention forward pass
    (the tile's queries stay on chip, keys stream through); tiles never straddle a group, so a
    group's score is the sum of its tiles' rows, added in a fixed order by the caller. Scores are
    computed transposed, keys as rows: the per-key sum is then a row reduction inside a warp
    quad instead of a cross-warp column reduction.
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    b_qi = tl.load(q_idx + i_t * BM + o_m)
    m_q = b_qi >= 0
    q += i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k += i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    b_qt = tl.load(q + b_qi.to(tl.int64)[None, :] * stride_ql + o_d[:, None] * stride_qd, mask=m_q[None, :], other=0.0)
    # Invalid queries get lse = +inf so their probabilities are exactly 0.
    b_lse2 = tl.load(lse + i_bh.to(tl.int64) * NQ + b_qi, mask=m_q, other=float("inf")) * 1.4426950408889634
    p_out = partial + (i_bh.to(tl.int64) * T + i_t) * L
    for start in range(0, L, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < L
        b_k = tl.load(k + o_n.to(tl.int64)[:, None] * stride_kl + o_d[None, :] * stride_kd, mask=m_n[:, None], other=0.0)
        # [BN, BM]
        if IEEE:
            b_st = tl.dot(b_k, b_qt, input_precision="ieee")
        else:
            b_st = tl.dot(b_k, b_qt)
        b_pt = tl.exp2(b_st * qk_scale - b_lse2[None, :])
        tl.store(p_out + o_n, tl.sum(b_pt, 1), mask=m_n)


@triton.jit
def _select_topk_kernel(scores, kept, L, n_keep, BL: tl.constexpr):
    """Per row: indices of the ``n_keep`` largest scores, ties to the lower index, ascending.

    Scores are non-negative floats, whose bit patterns order like the floats, so a 31-step
    bisection on the bits finds the ``n_keep``-th largest value exactly; ties at that value are
    taken in index order, and a prefix sum compacts the chosen indices in ascending order.
    """
    i_row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BL)
    m = o < L
    b_s = tl.load(scores + i_row * L + o, mask=m, other=-1.0)
    bits = b_s.to(tl.int32, bitcast=True)
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.full([], 0x7F800001, dtype=tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((bits >= mid).to(tl.int32), 0) >= n_keep
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = bits > lo
    ties = (bits == lo).to(tl.int32)
    take = above | ((bits == lo) & (tl.cumsum(ties, 0) <= n_keep - tl.sum(above.to(tl.int32), 0)))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(kept + i_row * n_keep + pos, o, mask=take)
