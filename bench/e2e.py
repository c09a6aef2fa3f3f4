"""End-to-end generation benchmark, one run per model, all rows on one card:

- official_eager: the unmodified official Infinity code (from SPARVAR_UPSTREAM), set up as its
  inference script does (bf16 blocks under autocast, compiled fused norms, KV cache by
  concatenation), eager;
- ours_dense: the project's network, dense attention, one CUDA graph per scale;
- ours_sparse: the same with the plan's sparse attention (tuned config of this GPU);
- ours_sparse_skip2: the same, stopping two scales early;
- ceiling_sparse_noop: the sparse scales' attention replaced by a no-op, all else as ours_sparse.

Random weights (seeded), CFG batch 2, stand-in T5 features. Whole-generation times are medians of
timed runs after a warm-up that compiles and captures; per-scale times (a synchronize after each
scale) and peak memory beside them; JSON under --out.

    python bench/e2e.py --models infinity-2b infinity-8b --out bench/results
    python bench/e2e.py --smoke     # CPU, a small model on Infinity's 0.06M schedule: checks the script
"""

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sparvar import official
from sparvar.dispatch import StepDispatcher
from sparvar.generation import NextScaleGenerator
from sparvar.hardware import gpu_name, sanitize, software_versions
from sparvar.infinity_net import InfinityConfig, InfinityNet, TextCondition
from sparvar.models import get_model, model_plan, parse_resolution, resolve_schedule
from sparvar.pipeline import resolve_plan
from sparvar.reference import default_plan, infinity_schedule

SMOKE = InfinityConfig(depth=4, embed_dim=64, num_heads=2, text_channels=128, text_maxlen=32, codebook_dim=8,
                       block_chunks=2)


def timed(fn, runs: int, cuda: bool):
    fn()  # warm-up: compiles kernels, builds launch plans, captures graphs
    times, res = [], None
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), res


def official_infinity(cfg: InfinityConfig, device: str, compiled_norms: bool):
    inf_mod, _, bsq = official.infinity_modules()
    if not compiled_norms:
        import importlib

        fused_op = importlib.import_module("infinity.models.fused_op")
        inf_mod.fused_ada_layer_norm = fused_op.fused_ada_layer_norm._torchdynamo_orig_callable
    torch._dynamo.config.cache_size_limit = 64
    # Built on the device (an 8B model's init on the CPU takes minutes); the official init draws
    # cfg_uncond from a CPU generator, which cannot fill a CUDA tensor: that one draw goes
    # without it (the weights are random either way).
    trunc_normal = torch.nn.init.trunc_normal_

    def device_safe(tensor, *args, generator=None, **kwargs):
        if generator is not None and generator.device != tensor.device:
            generator = None
        return trunc_normal(tensor, *args, generator=generator, **kwargs)
    torch.nn.init.trunc_normal_ = device_safe
    try:
        model, quantizer = _build_official(inf_mod, bsq, cfg, device)
    finally:
        torch.nn.init.trunc_normal_ = trunc_normal
    if device == "cuda":
        for block in model.unregistered_blocks:
            block.bfloat16()
    model.eval().requires_grad_(False)
    model.rng = torch.Generator(device=device)
    return model, SimpleNamespace(quantizer=quantizer)


def _build_official(inf_mod, bsq, cfg: InfinityConfig, device: str):
    with torch.device(device):
        quantizer = bsq.MultiScaleBSQ(dim=cfg.codebook_dim, codebook_size=2 ** cfg.codebook_dim)
        model = inf_mod.Infinity(
            vae_local=SimpleNamespace(embed_dim=cfg.codebook_dim, quantizer=quantizer),
            text_channels=cfg.text_channels, text_maxlen=cfg.text_maxlen, shared_aln=True, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, block_chunks=cfg.block_chunks,
            fused_norm=True, customized_flash_attn=False, pad_to_multiplier=128,
            add_lvl_embeding_only_first_block=int(cfg.add_lvl_embeding_only_first_block), use_bit_label=1,
            rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="1M", inference_mode=True,
            train_h_div_w_list=[1.0], cos_attn=True)
    return model, quantizer


def run(label: str, cfg: InfinityConfig, schedule, reference_hw, plan, kernels, device: str, runs: int,
        rows: list, save) -> None:
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        net = InfinityNet(cfg)
    net = net.to(device, dtype).eval().requires_grad_(False)
    net.set_schedule(schedule.grids, reference_hw)
    g = torch.Generator().manual_seed(0)
    text = TextCondition.from_features([torch.randn(24, cfg.text_channels, generator=g).to(device, dtype)])
    opts = dict(seed=0, cfg=3.0, top_k=900, top_p=0.97)

    def record(impl, fn, scale_ms=None):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ms, res = timed(fn, runs, cuda)
        row = {"impl": impl, "ms": round(ms, 2),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        if scale_ms is not None:
            row["scale_ms"] = [round(x, 3) for x in scale_ms(res)]
        rows.append(row)
        save()
        print(f"{label:<24} {impl:<20} {ms:9.1f} ms   peak {row['peak_gib']} GiB", flush=True)

    for impl, the_plan, noop, skip in (("ours_dense", None, False, 0), ("ours_sparse", plan, False, 0),
                                       ("ours_sparse_skip2", plan, False, 2), ("ceiling_sparse_noop", plan, True, 0)):
        gen = NextScaleGenerator(net, schedule, StepDispatcher(the_plan, schedule, kernels=kernels, skip_sparse=noop),
                                 graphs=cuda)
        record(impl, lambda gen=gen, skip=skip: gen.generate(text, skip_last=skip, **opts), lambda r: r.scale_ms)
        del gen
    del net
    if cuda:
        torch.cuda.empty_cache()
    model, vae = official_infinity(cfg, device, compiled_norms=cuda)
    text32 = TextCondition(text.kv_compact.float(), text.lens, text.cu_seqlens, text.max_len)
    S = schedule.num_scales

    def official_run():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
            return model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=[(1, h, w) for h, w in schedule.grids], label_B_or_BLT=text32.as_tuple(),
                B=1, g_seed=0, cfg_list=[3.0] * S, tau_list=[1.0] * S, top_k=900, top_p=0.97, returns_vemb=1,
                cfg_insertion_layer=[0], vae_type=1, ret_img=False, inference_mode=True)
    record("official_eager", official_run)
    del model
    if cuda:
        torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["infinity-2b", "infinity-8b"])
    ap.add_argument("--resolutions", nargs="+", default=["1024x1024"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    result = {"gpu": gpu_name(), **software_versions(), "date": time.strftime("%Y-%m-%d"), "batch": "CFG 2",
              "timing": "whole generations: median of timed runs after a warm-up; per scale: with a synchronize "
                        "after each scale", "runs": []}
    path = Path(args.out) / sanitize(gpu_name()) / "e2e.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        s = infinity_schedule("1.000", "0.06M")
        runs = [("smoke 0.06M", SMOKE, s, infinity_schedule("1.000", "1M").grids[-1], default_plan(s, SMOKE.depth), {})]
    else:
        runs = []
        for name in args.models:
            for res in args.resolutions:
                preset = get_model(name)
                h, w = parse_resolution(res, preset)
                s = resolve_schedule(preset, h, w)
                plan, kernels, _ = resolve_plan("default", preset, h, w, s)
                ref = infinity_schedule(f"{h / w:.3f}", "1M").grids[-1]
                runs.append((f"{name} {res}", InfinityConfig.preset(name), s, ref, plan, kernels))
    for label, cfg, s, ref, plan, kernels in runs:
        entry = {"model": label, "rows": []}
        result["runs"].append(entry)
        run(label, cfg, s, ref, plan, kernels, "cpu" if args.smoke else "cuda", 1 if args.smoke else args.runs,
            entry["rows"], lambda: path.write_text(json.dumps(result, indent=1)))
    print(f"wrote {path}")
