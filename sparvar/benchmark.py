"""Attention benchmark at Infinity 1024 shapes: correctness first, then medians against cuDNN SDPA,
flash SDPA and FlexAttention given the identical token mask, all in one run on one card.

Used by ``bench/attention.py`` and ``sparvar bench``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import sparvar.kernels as K
import sparvar.reference as R

from .hardware import gpu_name, sanitize, software_versions

__all__ = ["run_attention_benchmark"]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _check(name: str, out: torch.Tensor, ref: torch.Tensor, heads=(0,), tol: float = 1e-2) -> float:
    """Relative error on the checked heads; refuse to go on if it is over ``tol``."""
    err = max(_rel_err(out[:, h:h + 1], ref[:, i:i + 1]) for i, h in enumerate(heads))
    if not err < tol:
        raise SystemExit(f"correctness check failed for {name}: relative error {err:.3e} >= {tol}; "
                         "no speedup reported")
    return err


def _bench(fn) -> float:
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    return run


def _flex_runner(mask: torch.Tensor, B: int, H: int, nq: int, nk: int):
    """Compiled FlexAttention with ``mask`` ([nq, nk] or [B, H, nq, nk]); best of two block sizes."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compiled graph per shape and mask: lift dynamo's recompile limit, which otherwise sends
    # later shapes to the unfused fallback (seen at H=28 after 8 shapes).
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    flex = torch.compile(flex_attention, dynamic=False)
    if mask.dim() == 2:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask[q_idx, kv_idx]
        mb, mh = None, None
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask[b, h, q_idx, kv_idx]
        mb, mh = B, H
    runners = {}
    for bs in (128, (128, 64)):
        block_mask = create_block_mask(mask_mod, mb, mh, nq, nk, device="cuda", BLOCK_SIZE=bs)
        runners[str(bs)] = lambda q, k, v, bm=block_mask: flex(q, k, v, block_mask=bm, scale=1.0)
    return runners


def _inputs(s, step, B, H, D, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nq, nk = s.num_queries(step), s.num_keys(step)
    return [torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for n in (nq, nk, nk)]


def run_attention_benchmark(heads=(16, 28), steps=(10, 11, 12), out_dir: str | Path = "bench/results",
                            flex: bool = True) -> dict:
    """Benchmark every kernel kind at Infinity 1024 (B=2, D=128, bf16) and write
    ``<out_dir>/<gpu>/attention.json``. Returns the result dict."""
    from torch.nn.attention import SDPBackend

    if not torch.cuda.is_available():
        raise SystemExit("the attention benchmark needs a CUDA GPU")
    s, B, D = R.infinity_schedule(), 2, 128
    plan = R.default_plan(s, 32)
    d = plan.decision_scale
    csla, cs4a = plan.csla, plan.cs4a
    rows = []
    for H in heads:
        q, k, v = _inputs(s, d, B, H, D, 0)
        _, state = K.cs4a_decide(q, k, v, s, d, cs4a)
        for step in steps:
            q, k, v = _inputs(s, step, B, H, D, step)
            nq, nk = s.num_queries(step), s.num_keys(step)
            dense_pairs = nq * nk
            ref_dense = R.dense_attention(*(t[:, :1].double() for t in (q, k, v)), 1.0)
            base = {}
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                fn = _sdpa(backend)
                err = _check(name, fn(q, k, v), ref_dense)
                base[name] = _bench(lambda: fn(q, k, v))
                rows.append(_row(H, step, name, base[name], dense_pairs, dense_pairs, B, H, D, err, base))
            mask = R.csla_mask(s, step, csla).cuda()
            ref = R.masked_attention(*(t[:, :1].double() for t in (q, k, v)), mask, 1.0)[0]
            pairs = int(mask.sum())
            if flex:
                best = None
                for bs, fn in _flex_runner(mask, B, H, nq, nk).items():
                    err = _check(f"flex csla {bs}", fn(q, k, v), ref)
                    t = _bench(lambda: fn(q, k, v))
                    if best is None or t < best[0]:
                        best = (t, bs, err)
                base["flex_csla"] = best[0]
                rows.append(_row(H, step, f"flex_csla[{best[1]}]", best[0], pairs, dense_pairs, B, H, D, best[2], base))
            err = _check("csla", K.csla_attention(q, k, v, s, step, csla), ref)
            t = _bench(lambda: K.csla_attention(q, k, v, s, step, csla))
            rows.append(_row(H, step, "ours_csla", t, pairs, dense_pairs, B, H, D, err, base, "flex_csla"))
            if step == d:
                ref = R.cs4a_decide(*(t_[:, :1].double() for t_ in (q, k, v)), s, d, cs4a, 1.0)[0]
                err = _check("cs4a_decide", K.cs4a_decide(q, k, v, s, d, cs4a)[0], ref)
                t = _bench(lambda: K.cs4a_decide(q, k, v, s, d, cs4a))
                rows.append(_row(H, step, "ours_cs4a_decide", t, dense_pairs, dense_pairs, B, H, D, err, base))
                rows += _decision_parts(q, k, v, s, d, cs4a, H, B, D, base)
            else:
                kept = state.kept[:, :1].long()
                ref_state = R.CS4AState(d, kept, state.residual[:, :1].double())
                ref = R.cs4a_sparse(*(t_[:, :1].double() for t_ in (q, k, v)), s, step, cs4a, ref_state, 1.0)
                err = _check("cs4a_sparse", K.cs4a_sparse(q, k, v, s, step, cs4a, state), ref)
                pairs = R.cs4a_pairs(s, step, cs4a)
                t = _bench(lambda: K.cs4a_sparse(q, k, v, s, step, cs4a, state))
                rows.append(_row(H, step, "ours_cs4a_sparse", t, pairs, dense_pairs, B, H, D, err, base))
            torch.cuda.empty_cache()
    result = {"gpu": gpu_name(), **software_versions(), "date": time.strftime("%Y-%m-%d"),
              "shape": {"B": B, "D": D, "dtype": "bfloat16", "schedule": s.name}, "rows": rows}
    path = Path(out_dir) / sanitize(gpu_name()) / "attention.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {path}")
    return result


def _decision_parts(q, k, v, s, d, cs4a, H, B, D, base) -> list[dict]:
    """Time each pass of the decision step alone, to show where its time goes."""
    from sparvar.kernels.cs4a import _cfg, _kept_table, scores_from_lse
    from sparvar.kernels.launch import dense_lse_fwd, select_topk_fwd, sparse_attn_fwd
    from sparvar.kernels.tiles import group_tiles

    nq, nk = q.shape[2], k.shape[2]
    out, lse = dense_lse_fwd(q, k, v, 1.0, _cfg(None, "cs4a_dense"))
    scores = scores_from_lse(q, k, lse, 1.0, cs4a.group_size)
    n_keep = R.num_keep(nk, cs4a.keep_ratio)
    kept = select_topk_fwd(scores, n_keep)
    cfg = _cfg(None, "cs4a_select")
    tables = group_tiles(s, d, cs4a, cfg.block_m, cfg.block_n)
    parts = {
        "part_dense_lse": (lambda: dense_lse_fwd(q, k, v, 1.0, _cfg(None, "cs4a_dense")), nq * nk),
        "part_scores": (lambda: scores_from_lse(q, k, lse, 1.0, cs4a.group_size), nq * nk / 2),
        "part_topk": (lambda: select_topk_fwd(scores, n_keep), 0),
        "part_select_residual": (lambda: sparse_attn_fwd(q, k, v, tables, cfg, 1.0, name="cs4a_select",
                                                         kept=_kept_table(kept, q), epilogue=2, res=out), nq * n_keep),
    }
    return [_row(H, d, name, _bench(fn), pairs, nq * nk, B, H, D, float("nan"), base)
            for name, (fn, pairs) in parts.items()]


def _row(H, step, name, ms, pairs, dense_pairs, B, heads, D, err, base, flex_key=None) -> dict:
    row = {"heads": H, "step": step, "impl": name, "ms": round(ms, 4),
           "density": round(pairs / dense_pairs, 4),
           "tflops": round(4 * pairs * D * B * heads / (ms * 1e-3) / 1e12, 1), "rel_err": err}
    if "sdpa_cudnn" in base:
        row["x_vs_cudnn"] = round(base["sdpa_cudnn"] / ms, 2)
    if flex_key and flex_key in base:
        row["x_vs_flex"] = round(base[flex_key] / ms, 2)
    return row


def print_table(result: dict) -> None:
    print(f"GPU {result['gpu']} | CUDA {result['cuda']} | torch {result['torch']} | triton {result['triton']}")
    print(f"{'H':>3} {'scale':>5} {'impl':<24} {'ms':>8} {'TFLOP/s':>8} {'density':>8} {'vs cuDNN':>9} {'vs flex':>8}")
    for r in result["rows"]:
        print(f"{r['heads']:>3} {r['step']:>5} {r['impl']:<24} {r['ms']:>8.4f} {r['tflops']:>8.1f} "
              f"{r['density']:>8.4f} {r.get('x_vs_cudnn', ''):>9} {r.get('x_vs_flex', ''):>8}")
