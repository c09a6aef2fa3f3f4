"""Check ``accelerate`` on an official Infinity model on the GPU, set up as the end-to-end
benchmark sets it up (random weights, bf16 blocks, the rest fp32), and find the first place a
generation goes non-finite: every block's output and every scale's logits are checked, eagerly
(no CUDA graphs unless --graphs). Prints one line per scale and the first offender.

    CUDA_LAUNCH_BLOCKING=1 python bench/accelerate_check.py --model infinity-2b [--graphs] [--fp32]
"""

from __future__ import annotations

import argparse
import traceback

import torch

from sparvar import e2e, integrations
from sparvar.generation import NextScaleGenerator
from sparvar.infinity_net import InfinityConfig, TextCondition
from sparvar.reference import Schedule, infinity_schedule

TINY = InfinityConfig(depth=4, embed_dim=256, num_heads=2, text_channels=128, text_maxlen=32, codebook_dim=16,
                      block_chunks=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="infinity-2b", help="a preset name, or 'tiny'")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--fp32", action="store_true", help="keep the official blocks in fp32")
    ap.add_argument("--plan", default="dense")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fast-generate", action="store_true",
                    help="AcceleratedModel.generate twice (CUDA graphs, as a user calls it), no official runs first")
    ap.add_argument("--as-e2e", action="store_true",
                    help="as the end-to-end benchmark: compiled norms, the official model generates eagerly and "
                         "patched first, then AcceleratedModel.generate (CUDA graphs)")
    args = ap.parse_args()
    cfg = TINY if args.model == "tiny" else InfinityConfig.preset(args.model)
    s = infinity_schedule("1.000", "1M")
    model, vae = e2e.official_infinity(cfg, args.device, compiled_norms=args.as_e2e)
    if args.fp32:
        for block in model.unregistered_blocks:
            block.float()
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(f"official model: depth {cfg.depth}, width {cfg.embed_dim}, parameter dtypes {dtypes}", flush=True)
    if args.as_e2e or args.fast_generate:
        as_e2e(model, vae, cfg, s, args.plan, official=args.as_e2e)
        return
    fast = integrations.accelerate(model, plan=args.plan)
    net = fast.net
    net.set_schedule(s.grids, s.grids[-1])
    g = torch.Generator().manual_seed(0)
    text = TextCondition.from_features([torch.randn(24, cfg.text_channels, generator=g).to(args.device)])
    first: list[str] = []
    step_now = [0]

    def check(name):
        def hook(_module, _inputs, out):
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, torch.Tensor) and not first and not torch.isfinite(t).all():
                first.append(f"scale {step_now[0]}: {name} output non-finite "
                             f"({(~torch.isfinite(t)).sum().item()} of {t.numel()}, dtype {t.dtype})")
        return hook
    if not args.graphs:
        for name, module in net.named_modules():
            if name:
                module.register_forward_hook(check(name))
    real_logits, real_sample = net.logits, net.sample

    def logits(x, state):
        out = real_logits(x, state)
        if args.graphs:
            return out
        ok = torch.isfinite(out).all().item()
        print(f"scale {step_now[0]:>2}: x {x.dtype} |x|max {x.float().abs().max().item():.3g} logits finite {ok}",
              flush=True)
        return out

    def sample(lg, generator, top_k, top_p):
        res = real_sample(lg, generator, top_k, top_p)
        step_now[0] += 1
        return res
    net.logits, net.sample = logits, sample
    gen = NextScaleGenerator(net, Schedule(s.grids), fast.source.dispatcher(Schedule(s.grids)), graphs=args.graphs)
    try:
        gen.generate(TextCondition(text.kv_compact.float(), text.lens, text.cu_seqlens, text.max_len), seed=0,
                     cfg=[3.0] * s.num_scales, top_k=2, top_p=0.97)
        print("generation finished", flush=True)
    except Exception:
        traceback.print_exc()
    print("first non-finite:", first[0] if first else "none")


def s_device(model) -> str:
    return next(model.parameters()).device.type


def as_e2e(model, vae, cfg, s, plan, official: bool) -> None:
    g = torch.Generator().manual_seed(0)
    text = TextCondition.from_features([torch.randn(24, cfg.text_channels, generator=g).to(s_device(model)).bfloat16()])
    text32 = TextCondition(text.kv_compact.float(), text.lens, text.cu_seqlens, text.max_len)
    S = s.num_scales
    sched = [(1, h, w) for h, w in s.grids]

    def official_run():
        return e2e.official_infinity_generate(model, vae, text32, s.grids, autocast=True)
    where = [0, 0]
    for what in ("official", "patched", "accelerated") if official else ("accelerated",):
        try:
            if what == "official":
                official_run()
            elif what == "patched":
                integrations.patch(model, plan=plan)
                official_run()
                integrations.unpatch(model)
            else:
                fast = integrations.accelerate(model, plan=plan)
                real_sample = fast.net.sample

                def sample(*a):
                    where[1] += 1
                    return real_sample(*a)
                fast.net.sample = sample
                for i in range(2):
                    where[:] = [i, 0]
                    print(f"generation {i}", flush=True)
                    res = fast.generate(text32.as_tuple(), sched, [3.0] * S, [1.0] * S, g_seed=0, top_k=900,
                                        top_p=0.97, reference_hw=s.grids[-1])
                print("accelerated tokens finite:", all(torch.isfinite(t.float()).all().item() for t in res.tokens))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            print(f"{what}: ok", flush=True)
        except Exception:
            print(f"{what}: failed" + (f" in generation {where[0]} at scale {where[1] - 1}" if what == "accelerated"
                                        else ""), flush=True)
            traceback.print_exc()
            return


if __name__ == "__main__":
    main()
