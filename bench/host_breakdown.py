"""Host time of one eager kernel call, broken into its parts (median us over 1,000 calls, the
queue drained outside the timed spans): the whole call; the plan lookup alone; the call with
its launch replaced by a no-op (allocation and argument assembly); one compiled-kernel launch
alone. Infinity 1024 shapes, B=2, H=16, D=128, bf16.

    python bench/host_breakdown.py
"""

import torch

import sparvar.kernels as K
import sparvar.reference as R
from sparvar.kernels import launch as L
from sparvar.timing import host_us_per_call


def main() -> None:
    s, B, H, D = R.infinity_schedule(), 2, 16, 128
    plan = R.default_plan(s, 32)
    g = torch.Generator(device="cuda").manual_seed(0)
    n = s.num_keys(12)
    k_all, v_all, q_all = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
                           for _ in range(3))

    def inputs(step):
        lo, hi = s.offsets[step], s.offsets[step + 1]
        return q_all[:, :, lo:hi].contiguous(), k_all[:, :, :hi].contiguous(), v_all[:, :, :hi].contiguous()
    d = plan.decision_scale
    _, state = K.cs4a_decide(*inputs(d), s, d, plan.cs4a)
    attn = __import__("sparvar").SparseAttention.for_model("infinity-2b", "1024x1024")
    attn.new_image()
    layer_cs4a = next(layer for layer in range(32) if plan.kind(layer, 11) == R.StepKind.CS4A_SPARSE)
    layer_csla = next(layer for layer in range(32) if plan.kind(layer, 10) == R.StepKind.CSLA)
    attn(layer_cs4a, d, *inputs(d))
    cases = {
        "csla@10": lambda q=inputs(10): K.csla_attention(*q, s, 10, plan.csla),
        "cs4a_sparse@11": lambda q=inputs(11): K.cs4a_sparse(*q, s, 11, plan.cs4a, state),
        "SparseAttention csla@10": lambda q=inputs(10): attn(layer_csla, 10, *q),
        "SparseAttention cs4a@11": lambda q=inputs(11): attn(layer_cs4a, 11, *q),
    }
    print(f"{'call':<26} {'whole':>8} {'no launch':>10} {'one launch':>11}")
    for name, fn in cases.items():
        whole = host_us_per_call(fn)
        real_runner = L._Launcher.runner
        runner_us = []

        def no_launch(self, spec):
            runner = real_runner(self, spec)
            if runner is None:
                return None

            def stub(*args):
                if not runner_us:
                    runner_us.append(host_us_per_call(lambda: runner(*args)))
            return stub
        L._Launcher.runner = no_launch
        L.clear_plans()  # a plan keeps the runners it has used: rebuilt, it asks for the stub
        try:
            bare = host_us_per_call(fn)
        finally:
            L._Launcher.runner = real_runner
            L.clear_plans()
        print(f"{name:<26} {whole:8.1f} {bare:10.1f} {runner_us[0] if runner_us else float('nan'):11.1f}")


if __name__ == "__main__":
    main()
