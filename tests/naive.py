"""A second, deliberately naive implementation: explicit Python loops over tokens.

Written from SPEC.md independently of ``sparvar.reference`` (no shared helpers) so that the two
can be checked against each other on small cases.
"""

import math

import torch


def _offsets(grids):
    out = [0]
    for h, w in grids:
        out.append(out[-1] + h * w)
    return out


def _centre(i, n_src, n_dst):
    return ((2 * i + 1) * n_dst) // (2 * n_src)


def _softmax_row(q, keys, values, idx, scale):
    """One query over the keys ``idx``, with the project's rule for non-finite values: a NaN or
    +inf score, or a non-finite value row, among them gives an all-NaN row; -inf scores count
    as absent keys; nothing left gives zeros."""
    if not idx:
        return torch.zeros_like(q)
    s = [((q * keys[t]).sum() * scale).item() for t in idx]
    if any(math.isnan(x) or x == math.inf for x in s) or any(not torch.isfinite(values[t]).all() for t in idx):
        return torch.full_like(q, math.nan)
    live = [n for n, x in enumerate(s) if x != -math.inf]
    if not live:
        return torch.zeros_like(q)
    top = max(s[n] for n in live)
    w = {n: math.exp(s[n] - top) for n in live}
    total = sum(w.values())
    return sum((w[n] / total) * values[idx[n]] for n in live)


def _window_for(grids, m, sinks, win_rel):
    if m < sinks:
        return -1
    t = len(grids) - 1 - m
    return win_rel[t] if t < len(win_rel) else 0


def csla_allowed_keys(grids, step, sinks, win_rel, i, j):
    off = _offsets(grids)
    hk, wk = grids[step]
    keys = []
    for m in range(step + 1):
        hm, wm = grids[m]
        win = _window_for(grids, m, sinks, win_rel)
        cy, cx = _centre(i, hk, hm), _centre(j, wk, wm)
        for p in range(hm):
            for r in range(wm):
                if win == -1 or (win > 0 and abs(p - cy) <= win // 2 and abs(r - cx) <= win // 2):
                    keys.append(off[m] + p * wm + r)
    return keys


def csla(q, k, v, grids, step, sinks, win_rel, scale):
    B, H, _, _ = q.shape
    hk, wk = grids[step]
    out = torch.zeros_like(q)
    for qi in range(hk * wk):
        idx = csla_allowed_keys(grids, step, sinks, win_rel, qi // wk, qi % wk)
        for b in range(B):
            for h in range(H):
                out[b, h, qi] = _softmax_row(q[b, h, qi], k[b, h], v[b, h], idx, scale)
    return out


def cs4a_decide(q, k, v, grids, step, group_size, keep_ratio, scale):
    """Returns (dense output, kept sets [b][h][group] as sorted lists, residual [B,H,hd,wd,D])."""
    B, H, nq, D = q.shape
    L = k.shape[2]
    n_keep = min(L, max(1, math.floor(keep_ratio * L + 0.5)))
    n_groups = -(-nq // group_size)
    out = torch.zeros_like(q)
    sel = torch.zeros_like(q)
    kept = []
    for b in range(B):
        kept.append([])
        for h in range(H):
            scores = [[0.0] * L for _ in range(n_groups)]
            for qi in range(nq):
                s = torch.stack([(q[b, h, qi] * k[b, h, t]).sum() * scale for t in range(L)])
                p = torch.softmax(s, dim=0)
                out[b, h, qi] = _softmax_row(q[b, h, qi], k[b, h], v[b, h], list(range(L)), scale)
                for t in range(L):
                    scores[qi // group_size][t] += p[t].item()
            # NaN ranks first, then larger scores, then lower indices.
            sets = [sorted(sorted(range(L), key=lambda t: (not math.isnan(scores[g][t]),
                                                           0.0 if math.isnan(scores[g][t]) else -scores[g][t], t))[:n_keep])
                    for g in range(n_groups)]
            kept[b].append(sets)
            for qi in range(nq):
                sel[b, h, qi] = _softmax_row(q[b, h, qi], k[b, h], v[b, h], sets[qi // group_size], scale)
    hd, wd = grids[step]
    return out, kept, (out - sel).reshape(B, H, hd, wd, D)


def band_keys(grids, d, step, band_rel, queries):
    """Union of the band ranges of the given query indices of scale ``step``."""
    off = _offsets(grids)
    hk, wk = grids[step]
    keys = []
    for m in range(d + 1, step + 1):
        t = len(grids) - 1 - m
        band = band_rel[t] if t < len(band_rel) else 0
        if band == 0:
            continue
        hm, wm = grids[m]
        covered = set()
        for qi in queries:
            cy, cx = _centre(qi // wk, hk, hm), _centre(qi % wk, wk, wm)
            for p in range(max(0, cy - band // 2), min(hm, cy + band // 2 + 1)):
                for r in range(max(0, cx - band // 2), min(wm, cx + band // 2 + 1)):
                    covered.add(p * wm + r)
        keys.extend(off[m] + x for x in range(min(covered), max(covered) + 1))
    return keys


def _bilinear_axis(dst, n_in, n_out):
    if n_in == n_out:  # an axis that keeps its size is copied (PyTorch's CPU kernel)
        return dst, dst, 0.0
    src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = int(math.floor(src))
    i1 = min(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def bilinear(res, hk, wk):
    """Explicit bilinear resampling, align_corners=False: [B,H,hd,wd,D] -> [B,H,hk*wk,D]."""
    B, H, hd, wd, D = res.shape
    out = torch.zeros(B, H, hk * wk, D, dtype=res.dtype)
    for y in range(hk):
        y0, y1, ly = _bilinear_axis(y, hd, hk)
        for x in range(wk):
            x0, x1, lx = _bilinear_axis(x, wd, wk)
            out[:, :, y * wk + x] = ((1 - ly) * ((1 - lx) * res[:, :, y0, x0] + lx * res[:, :, y0, x1])
                                     + ly * ((1 - lx) * res[:, :, y1, x0] + lx * res[:, :, y1, x1]))
    return out


def cs4a_sparse(q, k, v, grids, d, step, group_size, band_rel, residual, kept, res, scale):
    B, H, nq, D = q.shape
    n_d = len(kept[0][0])
    n_k = -(-nq // group_size)
    out = torch.zeros_like(q)
    for g in range(n_k):
        src = min(n_d - 1, ((2 * g + 1) * n_d) // (2 * n_k))
        queries = list(range(g * group_size, min(nq, (g + 1) * group_size)))
        band = band_keys(grids, d, step, band_rel, queries)
        for b in range(B):
            for h in range(H):
                idx = sorted(set(kept[b][h][src]) | set(band))
                for qi in queries:
                    out[b, h, qi] = _softmax_row(q[b, h, qi], k[b, h], v[b, h], idx, scale)
    if residual:
        out = out + bilinear(res, *grids[step])
    return out
