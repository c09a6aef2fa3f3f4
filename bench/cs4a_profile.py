"""Where CS4A's time goes, and what each design option buys, on the current GPU (Infinity 1024,
B=2, D=128, bf16; every time a CUDA graph replay median, all rows in one run).

Sparse step (scales 11, 12): cuDNN dense; the kernel reading kept keys by index (the shipped
design) and reading them packed (``pack_kept``: each decision group's kept K/V rows copied once
into contiguous memory) over a sweep of configs; the same kernel walking all keys densely (the
framework's ceiling at full density); the packing's time and memory. Decision step (scale 10):
its passes (dense + LSE, column scores, top-k, selection + residual) over configs, selection by
index and packed. Correctness first: packed outputs against the indexed ones.

    python bench/cs4a_profile.py [--heads 16 28] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparvar.kernels as K
import sparvar.reference as R
from sparvar.hardware import gpu_name, sanitize
from sparvar.kernels import cs4a as C
from sparvar.kernels.config import KernelConfig
from sparvar.kernels.sparse_attn import Epilogue
from sparvar.timing import time_gpu

SPARSE_CONFIGS = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3)]
DENSE_CONFIGS = [(128, 64, 8, 3)]
SCORE_CONFIGS = [(64, 128, 8, 3), (64, 256, 8, 3), (32, 256, 4, 3), (32, 128, 4, 3)]
SELECT_CONFIGS = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]


def _tflops(B, H, nq, nk, density, D, ms):
    return 4 * B * H * nq * nk * density * D / ms / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[16])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    s, B, D = R.infinity_schedule(), 2, 128
    plan = R.default_plan(s, 32)
    p, d = plan.cs4a, plan.decision_scale
    rows = []

    def row(H, step, what, cfg, ms, density=None, **extra):
        r = {"heads": H, "step": step, "what": what, "config": cfg, "ms": round(ms, 4), **extra}
        if density is not None:
            r["tflops_kept"] = round(_tflops(B, H, s.sizes[step], s.num_keys(step), density, D, ms), 1)
        rows.append(r)
        print(f"{H:>3} {step:>3} {what:<22} {str(cfg):<18} {ms:8.4f} ms {r.get('tflops_kept', ''):>7} "
              f"{' '.join(f'{k}={v}' for k, v in extra.items())}", flush=True)

    for H in args.heads:
        g = torch.Generator(device="cuda").manual_seed(0)
        n = s.num_keys(12)
        qa, ka, va = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))

        def inputs(step):
            lo, hi = s.offsets[step], s.offsets[step + 1]
            return qa[:, :, lo:hi].contiguous(), ka[:, :, :hi].contiguous(), va[:, :, :hi].contiguous()
        qd, kd, vd = inputs(d)
        _, state = K.cs4a_decide(qd, kd, vd, s, d, p)
        nk = state.kept.shape[-1]
        packed = K.pack_kept(kd, vd, state.kept)
        row(H, d, "pack_kept", None, time_gpu(lambda: K.pack_kept(kd, vd, state.kept)).ms,
            mib=round(packed.numel() * packed.element_size() / 2**20, 1))
        # Decision step passes.
        row(H, d, "cudnn_dense", None, time_gpu(lambda: torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd)).ms, 1.0)
        dense, lse, _ = K.dense_with_lse(qd, kd, vd, 1.0)
        row(H, d, "dense_lse", "cudnn", time_gpu(lambda: K.dense_with_lse(qd, kd, vd, 1.0)).ms, 1.0)
        for c in SCORE_CONFIGS:
            cfg = KernelConfig(*c)
            row(H, d, "scores", c, time_gpu(lambda: K.scores_from_lse(qd, kd, lse, 1.0, p.group_size,
                                                                       config=cfg)).ms, 0.5)
        scores = K.scores_from_lse(qd, kd, lse, 1.0, p.group_size)
        row(H, d, "topk", None, time_gpu(lambda: K.select_keys(scores, nk)).ms)
        res_ref = K.selected_residual(qd, kd, vd, s, d, p, state.kept, dense.clone(), 1.0)
        for c in SELECT_CONFIGS:
            cfg = KernelConfig(*c)
            row(H, d, "select_residual", c, time_gpu(lambda: K.selected_residual(
                qd, kd, vd, s, d, p, state.kept, dense, 1.0, config=cfg)).ms, p.keep_ratio)
            lau = C._group_launch(qd, kd, vd, s, d, p, cfg, "packed", Epilogue.RESIDUAL_FROM_DENSE, kept_packed=True)
            out = lau(qd, kd, vd, 1.0, kept=packed, res=dense, n_keep=nk)[0]
            err = (out.float() - res_ref.float()).abs().max().item()
            row(H, d, "select_residual_packed", c, time_gpu(lambda: lau(qd, kd, vd, 1.0, kept=packed, res=dense,
                                                                        n_keep=nk)).ms, p.keep_ratio,
                max_err_vs_indexed=round(err, 5))
        # Sparse steps.
        for step in (11, 12):
            q, k, v = inputs(step)
            density = R.cs4a_pairs(s, step, p) / (s.sizes[step] * s.num_keys(step))
            row(H, step, "cudnn_dense", None, time_gpu(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v)).ms, 1.0)
            ref = K.cs4a_sparse(q, k, v, s, step, p, state)
            for c in SPARSE_CONFIGS:
                cfg = KernelConfig(*c)
                ms = time_gpu(lambda: K.cs4a_sparse(q, k, v, s, step, p, state, configs={C.Launch.CS4A_SPARSE: cfg})).ms
                row(H, step, "sparse_indexed", c, ms, density)
                sparse = {C.Launch.CS4A_SPARSE: cfg}
                out = K.cs4a_sparse(q, k, v, s, step, p, state, configs=sparse, packed=packed)
                err = (out.float() - ref.float()).abs().max().item()
                ms = time_gpu(lambda: K.cs4a_sparse(q, k, v, s, step, p, state, configs=sparse, packed=packed)).ms
                row(H, step, "sparse_packed", c, ms, density, max_err_vs_indexed=round(err, 5))
            for c in DENSE_CONFIGS:
                cfg = KernelConfig(*c)
                row(H, step, "triton_dense", c, time_gpu(lambda: K.dense_with_lse(q, k, v, 1.0, config=cfg)).ms, 1.0)
    path = Path(args.out) / sanitize(gpu_name()) / "cs4a_profile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"gpu": gpu_name(), "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
