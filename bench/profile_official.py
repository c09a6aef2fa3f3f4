"""Where an official VAR model's generation spends its time, plain and patched, on this GPU:
wall time of each, then one generation of each under ``torch.profiler`` (operations by host
time and by GPU time). The model is built as ``sparvar bench e2e`` builds it. ``--alternate N``
instead times plain, patched with the dense plan and patched with the default plan in turn,
N rounds (medians), to tell the patch's own cost from the sparse kernels'; ``--python`` runs
each of the three once under cProfile (Python time by function).

    python bench/profile_official.py --model var-d30 [--top 15] [--alternate 5 | --python]
"""

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparvar import integrations
from sparvar.e2e import VAR_LABELS, official_var
from sparvar.models import get_model
from sparvar.reference import default_plan, var_schedule
from sparvar.var_net import VARConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="var-d30")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--alternate", type=int, default=0)
    ap.add_argument("--python", action="store_true",
                    help="cProfile one generation of each (plain, patched dense, patched default): Python time, "
                         "which torch.profiler's operation tables do not show")
    args = ap.parse_args()
    var, _ = official_var(VARConfig.preset(get_model(args.model).depth), "cuda")
    opts = dict(B=len(VAR_LABELS), label_B=torch.tensor(VAR_LABELS, device="cuda"), g_seed=0, cfg=4.0, top_k=900,
                top_p=0.95)

    def run():
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            var.autoregressive_infer_cfg(**opts)
        torch.cuda.synchronize()

    def use(plan):
        """The plain model (``None``) or the model patched with ``plan``."""
        integrations.unpatch(var)
        if plan is not None:
            integrations.patch(var, plan=plan)
    if args.python:
        for name, plan in (("official", None), ("dense", "dense"), ("default", "default")):
            use(plan)
            run()
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.runcall(run)
            print(f"== {name}: {(time.perf_counter() - t0) * 1e3:.1f} ms under cProfile")
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        return
    if args.alternate:
        plans = {"official": None, "patched dense": "dense", "patched default": "default"}
        times = {name: [] for name in plans}
        for _ in range(args.alternate):
            for name, plan in plans.items():
                use(plan)
                run()
                t0 = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - t0) * 1e3)
        for name, ms in times.items():
            print(f"{name:<16} median {statistics.median(ms):7.1f} ms  runs {[round(x, 1) for x in ms]}")
        return
    for name in ("official", "patched"):
        if name == "patched":
            use("default")
            plan = default_plan(var_schedule(256), var.depth)  # no tuned VAR config: the default plan
            for layer in (0, var.depth - 1):
                print(f"layer {layer} kinds by scale:", [plan.kind(layer, s).value for s in range(len(var.patch_nums))])
        run()
        t0 = time.perf_counter()
        run()
        print(f"{name}: {(time.perf_counter() - t0) * 1e3:.1f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
