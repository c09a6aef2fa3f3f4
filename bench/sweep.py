"""Grid sweep of kernel configs per launch kind at Infinity 1024 shapes (a quick look before a
full `sparvar autotune`). Prints the best configs per kind; correctness is checked per config
against the default config's output.

    python bench/sweep.py [--heads 16] [--kinds csla cs4a_scores ...]
"""

import argparse
import itertools

import torch
import triton

import sparvar.kernels as K
import sparvar.reference as R
from sparvar.kernels.cs4a import _kept_table, scores_from_lse
from sparvar.kernels.launch import KernelLaunchError, dense_lse_fwd, sparse_attn_fwd
from sparvar.kernels.tiles import group_tiles


def runners(H):
    s, B, D = R.infinity_schedule(), 2, 128
    plan = R.default_plan(s, 32)
    cs4a, d = plan.cs4a, plan.decision_scale
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(step):
        return [torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
                for n in (s.num_queries(step), s.num_keys(step), s.num_keys(step))]
    qd, kd, vd = qkv(d)
    out, lse = dense_lse_fwd(qd, kd, vd, 1.0, K.default_config("cs4a_dense"))
    _, state = K.cs4a_decide(qd, kd, vd, s, d, cs4a)
    q12, k12, v12 = qkv(12)
    return {
        "csla": lambda c: K.csla_attention(q12, k12, v12, s, 12, plan.csla, config=c),
        "cs4a_sparse": lambda c: K.cs4a_sparse(q12, k12, v12, s, 12, cs4a, state, configs={"cs4a_sparse": c}),
        "cs4a_scores": lambda c: scores_from_lse(qd, kd, lse, 1.0, cs4a.group_size, {"cs4a_scores": c}),
        "cs4a_select": lambda c: sparse_attn_fwd(qd, kd, vd, group_tiles(s, d, cs4a, c.block_m, c.block_n), c, 1.0,
                                                 name="sel", kept=_kept_table(state.kept, qd), epilogue=2, res=out)[0],
        "cs4a_dense": lambda c: dense_lse_fwd(qd, kd, vd, 1.0, c)[0],
    }


def grid(kind):
    for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        if kind == "csla":
            for tw in (8, 16):
                if bm // tw >= 2:
                    yield K.KernelConfig(bm, bn, w, st, bm // tw, tw)
        elif kind == "cs4a_dense":
            yield K.KernelConfig(bm, bn, w, st)
        else:
            yield K.KernelConfig(bm, bn, w, st)
    if kind == "cs4a_dense":
        yield K.KernelConfig(128, 64, 8, 3, backend="cudnn")
        yield K.KernelConfig(128, 64, 8, 3, backend="flash")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kinds", nargs="+", default=list(K.STEP_KINDS))
    args = ap.parse_args()
    run = runners(args.heads)
    for kind in args.kinds:
        ref = run[kind](K.default_config(kind)).float()
        results = []
        for cfg in grid(kind):
            try:
                out = run[kind](cfg).float()
            except KernelLaunchError as e:
                results.append((float("inf"), cfg, str(e)[:60]))
                continue
            err = ((out - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                results.append((float("inf"), cfg, f"wrong: rel err {err:.2e}"))
                continue
            results.append((triton.testing.do_bench(lambda: run[kind](cfg), warmup=25, rep=100, return_mode="median"), cfg, ""))
        results.sort(key=lambda r: r[0])
        default_ms = triton.testing.do_bench(lambda: run[kind](K.default_config(kind)), warmup=25, rep=100,
                                             return_mode="median")
        print(f"== {kind} (H={args.heads}) default {default_ms:.4f} ms")
        for ms, cfg, why in results[:5]:
            print(f"  {ms:.4f} ms  {cfg}")
        bad = [r for r in results if r[2]]
        print(f"  {len(bad)} failed/wrong; e.g. {bad[0][2] if bad else '-'}")
