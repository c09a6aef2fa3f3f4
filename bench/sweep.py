"""Grid sweep of kernel configs per launch at Infinity 1024 shapes (a quick look before a full
`sparvar autotune`). Prints the best configs per launch, timed as CUDA graph replays; each
config's output is checked against the default config's.

    python bench/sweep.py [--heads 16] [--launches csla cs4a_scores ...]
"""

import argparse
import itertools

import torch

import sparvar.kernels as K
import sparvar.reference as R
from sparvar.kernels import KernelConfig, Launch
from sparvar.timing import time_gpu


def runners(H):
    s, B, D = R.infinity_schedule(), 2, 128
    plan = R.default_plan(s, 32)
    cs4a, d, last = plan.cs4a, plan.decision_scale, s.num_scales - 1
    _, k_all, v_all = R.step_inputs(s, last, B, H, D, dtype=torch.bfloat16, device="cuda", seed=0)
    q_all = R.step_inputs(s, last, B, H, D, dtype=torch.bfloat16, device="cuda", seed=1)[1]

    def qkv(step):
        return q_all[:, :, s.offsets[step]:s.offsets[step + 1]], k_all[:, :, :s.num_keys(step)], v_all[:, :, :s.num_keys(step)]
    qd, kd, vd = qkv(d)
    out, lse, _ = K.dense_with_lse(qd, kd, vd)
    _, state = K.cs4a_decide(qd, kd, vd, s, d, cs4a)
    q12, k12, v12 = qkv(last)
    return {
        Launch.CSLA: lambda c: K.csla_attention(q12, k12, v12, s, last, plan.csla, config=c),
        Launch.CS4A_SPARSE: lambda c: K.cs4a_sparse(q12, k12, v12, s, last, cs4a, state, configs={Launch.CS4A_SPARSE: c}),
        Launch.CS4A_SCORES: lambda c: K.scores_from_lse(qd, kd, lse, 1.0, cs4a.group_size, config=c),
        Launch.CS4A_SELECT: lambda c: K.selected_residual(qd, kd, vd, s, d, cs4a, state.kept, out.clone(), config=c),
        Launch.CS4A_DENSE: lambda c: K.dense_with_lse(qd, kd, vd, config=c)[0],
    }


def grid(launch):
    for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        if launch == Launch.CSLA:
            for tw in (8, 16):
                if bm // tw >= 2:
                    yield KernelConfig(bm, bn, w, st, bm // tw, tw)
        else:
            yield KernelConfig(bm, bn, w, st)
    if launch == Launch.CS4A_DENSE:
        yield KernelConfig(128, 64, 8, 3, backend="cudnn")
        yield KernelConfig(128, 64, 8, 3, backend="flash")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--launches", nargs="+", default=[x.value for x in Launch])
    args = ap.parse_args()
    run = runners(args.heads)
    for launch in map(Launch, args.launches):
        ref = run[launch](K.default_config(launch)).float()
        results = []
        for cfg in grid(launch):
            try:
                out = run[launch](cfg).float()
            except K.KernelLaunchError as e:
                results.append((float("inf"), cfg, str(e)[:60]))
                continue
            err = R.relative_error(out, ref)
            if not err < 1e-2:
                results.append((float("inf"), cfg, f"wrong: rel err {err:.2e}"))
                continue
            results.append((time_gpu(lambda: run[launch](cfg)).ms, cfg, ""))
        results.sort(key=lambda r: r[0])
        default_ms = time_gpu(lambda: run[launch](K.default_config(launch))).ms
        print(f"== {launch} (H={args.heads}) default {default_ms:.4f} ms (graph replay)")
        for ms, cfg, why in results[:5]:
            print(f"  {ms:.4f} ms  {cfg}")
        bad = [r for r in results if r[2]]
        print(f"  {len(bad)} failed/wrong; e.g. {bad[0][2] if bad else '-'}")
