"""Where a generation's time goes, for one model on this GPU:

1. per-scale wall times of graphed generations (dense and the default plan) and whether each
   scale's CUDA graph was captured;
2. one eager generation under ``torch.profiler``: kernels launched per (layer, scale) and the
   kernels that take the GPU time, grouped by name.

    python bench/profile_generation.py --model infinity-2b [--resolution 1024x1024] [--top 25]
"""

import argparse
import collections
import time

import torch

from sparvar.pipeline import build_pipeline


def graphed(model: str, resolution: str, plan: str, runs: int = 2) -> None:
    p = build_pipeline(model, resolution, plan=plan)
    cond = p.condition(0)
    p.generator.generate(cond, cfg=3.0, top_k=900, top_p=0.97)  # compile, plans, capture
    torch.cuda.synchronize()
    for _ in range(runs):
        t0 = time.perf_counter()
        r = p.generator.generate(cond, cfg=3.0, top_k=900, top_p=0.97)
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) * 1e3
    print(f"{model} plan={plan}: {total:.1f} ms; per scale {[round(x, 1) for x in r.scale_ms]}")
    print(f"  graphs captured: {sum(1 for e in p.generator._graphs.values() if e[1] is not None)}"
          f"/{len(p.generator._graphs)}; failures: {p.generator.capture_failures or 'none'}")


def profiled(model: str, resolution: str, top: int) -> None:
    p = build_pipeline(model, resolution, plan="dense", graphs=False)
    cond = p.condition(0)
    p.generator.generate(cond, cfg=3.0, top_k=900, top_p=0.97)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        p.generator.generate(cond, cfg=3.0, top_k=900, top_p=0.97)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    depth, scales = len(p.net.blocks), p.schedule.num_scales
    total_us = sum(e.device_time for e in kernels)
    print(f"eager dense generation: {len(kernels)} kernels, {total_us / 1e3:.1f} ms GPU busy; "
          f"{len(kernels) / (depth * scales):.1f} kernels per (layer, scale)")
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name[:90]][0] += 1
        by_name[e.name[:90]][1] += e.device_time
    print(f"{'count':>7} {'ms':>9} {'share':>6}  kernel")
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{n:7d} {us / 1e3:9.2f} {us / total_us:6.1%}  {name}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--resolution", default="1024x1024")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--skip-graphed", action="store_true")
    a = ap.parse_args()
    print(torch.cuda.get_device_name())
    if not a.skip_graphed:
        for plan in ("dense", "default"):
            graphed(a.model, a.resolution, plan)
    profiled(a.model, a.resolution, a.top)
