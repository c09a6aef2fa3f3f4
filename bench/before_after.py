"""Time the public kernel entry points at Infinity 1024 shapes (B=2, D=128, bf16) as CUDA graph
replays, using only the API both an older and the current checkout share, so that two versions
can be compared in one run on one card:

    PYTHONPATH=<old site> python bench/before_after.py --label before --out DIR
    PYTHONPATH=<new site> python bench/before_after.py --label after --out DIR
    python bench/before_after.py --compare DIR/before.json DIR/after.json

Correctness is checked first against the float64 reference on one (batch, head) slice.
"""

import argparse
import json
import sys


def measure(label: str, heads: list[int], out: str) -> None:
    import torch
    import triton

    import sparvar.kernels as K
    import sparvar.reference as R

    s, B, D = R.infinity_schedule(), 2, 128
    plan = R.default_plan(s, 32)
    d, csla, cs4a = plan.decision_scale, plan.csla, plan.cs4a
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for H in heads:
        L = s.num_keys(s.num_scales - 1)
        k_all, v_all, q_all = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
                               for _ in range(3))

        def inputs(step):
            lo, hi = s.offsets[step], s.offsets[step + 1]
            return q_all[:, :, lo:hi].contiguous(), k_all[:, :, :hi].contiguous(), v_all[:, :, :hi].contiguous()
        qd, kd, vd = inputs(d)
        _, state = K.cs4a_decide(qd, kd, vd, s, d, cs4a)
        cases = [(f"cs4a_decide@{d}", lambda: K.cs4a_decide(qd, kd, vd, s, d, cs4a), None)]
        for step in (10, 11, 12):
            q, k, v = inputs(step)
            ref = R.csla_attention(*(t[:1, :1].double() for t in (q, k, v)), s, step, csla, 1.0)
            cases.append((f"csla@{step}", (lambda q=q, k=k, v=v, st=step: K.csla_attention(q, k, v, s, st, csla)), ref))
            if step > d:
                st_ref = R.CS4AState(d, state.kept[:1, :1].long(), state.residual[:1, :1].double())
                ref = R.cs4a_sparse(*(t[:1, :1].double() for t in (q, k, v)), s, step, cs4a, st_ref, 1.0)
                cases.append((f"cs4a_sparse@{step}",
                              (lambda q=q, k=k, v=v, st=step: K.cs4a_sparse(q, k, v, s, st, cs4a, state)), ref))
        for name, fn, ref in cases:
            if ref is not None:
                got = fn()[:1, :1].double()
                err = ((got - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    sys.exit(f"{label} {name} H={H}: relative error {err:.2e}; not timed")
            fn()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
            rows.append({"heads": H, "case": name, "ms": round(ms, 4)})
            print(f"{label:<7} H={H:<3} {name:<16} {ms:.4f} ms", flush=True)
    with open(f"{out}/{label}.json", "w") as f:
        json.dump({"label": label, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


def compare(before: str, after: str) -> None:
    a, b = json.load(open(before)), json.load(open(after))
    old = {(r["heads"], r["case"]): r["ms"] for r in a["rows"]}
    print(f"{a['gpu']}: graph-replay ms, before -> after (ratio > 1: faster now)")
    for r in b["rows"]:
        o = old.get((r["heads"], r["case"]))
        if o is not None:
            print(f"H={r['heads']:<3} {r['case']:<16} {o:.4f} -> {r['ms']:.4f}  {o / r['ms']:.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label")
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 28])
    ap.add_argument("--out", default=".")
    ap.add_argument("--compare", nargs=2)
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        measure(args.label, args.heads, args.out)
