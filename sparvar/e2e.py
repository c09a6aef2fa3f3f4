"""End-to-end generation benchmark, one run per model, all rows on one card:

- official_eager: the unmodified official Infinity code (from SPARVAR_UPSTREAM), set up as its
  inference script does (bf16 blocks under autocast, compiled fused norms, KV cache by
  concatenation), eager;
- official_patched: the same model after ``sparvar.integrations.patch`` (the plan inside its own
  attention);
- official_accelerated: ``sparvar.integrations.accelerate`` of that model (its weights in the
  project's generation path, with the plan);
- ours_dense: the project's network, dense attention, one CUDA graph per scale;
- ours_sparse: the same with the plan's sparse attention (tuned config of this GPU);
- ours_sparse_skip2: the same, stopping two scales early;
- ceiling_sparse_noop: the sparse scales' attention replaced by a no-op, all else as ours_sparse.

Random weights (seeded), CFG batch 2, stand-in T5 features. Whole-generation times are medians of
timed runs after a warm-up that compiles and captures; per-scale times (a synchronize after each
scale) and peak memory beside them; JSON under --out.

    sparvar bench e2e --models infinity-2b infinity-8b     (or python bench/e2e.py ...)
    sparvar bench e2e --smoke      # CPU, a small model on Infinity's 0.06M schedule: checks the run
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sparvar.reference import default_plan, infinity_schedule

from . import integrations, official
from .dispatch import StepDispatcher
from .generation import NextScaleGenerator
from .hardware import gpu_name, sanitize, software_versions
from .infinity_net import InfinityConfig, InfinityNet, TextCondition
from .models import get_model, parse_resolution, resolve_schedule
from .pipeline import infinity_reference_grid, resolve_plan

__all__ = ["run_e2e"]

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


def official_infinity_generate(model, vae, text: TextCondition, grids, *, autocast: bool):
    """One generation of an official Infinity model as its inference script calls it (guidance 3,
    top-k 900, top-p 0.97, seed 0; bf16 autocast when ``autocast``), without decoding."""
    S = len(grids)
    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=autocast):
        return model.autoregressive_infer_cfg(
            vae=vae, scale_schedule=[(1, h, w) for h, w in grids], label_B_or_BLT=text.as_tuple(),
            B=1, g_seed=0, cfg_list=[3.0] * S, tau_list=[1.0] * S, top_k=900, top_p=0.97, returns_vemb=1,
            cfg_insertion_layer=[0], vae_type=1, ret_img=False, inference_mode=True)


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


def _run_case(label: str, cfg: InfinityConfig, schedule, reference_hw, plan, kernels, device: str, runs: int,
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
        try:
            ms, res = timed(fn, runs, cuda)
        except RuntimeError as e:
            # Recorded, not raised: the rows before it stand. (A failure inside a CUDA kernel
            # leaves the device unusable for the rest of the process: run one case per process.)
            rows.append({"impl": impl, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            save()
            print(f"{label:<24} {impl:<20} failed: {rows[-1]['error']}", flush=True)
            return
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
        # Scales whose graph could not be captured ran eagerly: say so beside the time.
        rows[-1]["graph_capture_failures"] = list(gen.capture_failures)
        del gen
    del net
    if cuda:
        torch.cuda.empty_cache()
    model, vae = official_infinity(cfg, device, compiled_norms=cuda)
    text32 = TextCondition(text.kv_compact.float(), text.lens, text.cu_seqlens, text.max_len)
    S = schedule.num_scales
    sched = [(1, h, w) for h, w in schedule.grids]

    def official_run():
        return official_infinity_generate(model, vae, text32, schedule.grids, autocast=cuda)
    record("official_eager", official_run)
    # "default": the tuned config of this GPU for the preset these shapes match (as for ours_sparse).
    integrations.patch(model, plan="default")
    record("official_patched", official_run)
    integrations.unpatch(model)
    fast = integrations.accelerate(model, plan="default")
    record("official_accelerated", lambda: fast.generate(text32.as_tuple(), sched, [3.0] * S, [1.0] * S, g_seed=0,
                                                         top_k=900, top_p=0.97, reference_hw=reference_hw),
           lambda r: r.scale_ms)


def run_e2e(models=("infinity-2b", "infinity-8b"), resolutions=("1024x1024",), runs: int = 3,
            out: str | Path = "bench/results", smoke: bool = False) -> Path:
    """Run the benchmark (module docstring) and write ``<out>/<gpu>/e2e.json``; ``smoke`` checks the
    whole run on the CPU with a small model (its times mean nothing)."""
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("the end-to-end benchmark needs a CUDA GPU (or --smoke on the CPU)")
    result = {"gpu": gpu_name(), **software_versions(), "date": time.strftime("%Y-%m-%d"), "batch": "CFG 2",
              "timing": "whole generations: median of timed runs after a warm-up; per scale: with a synchronize "
                        "after each scale", "runs": []}
    path = Path(out) / sanitize(gpu_name()) / "e2e.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if smoke:
        s = infinity_schedule("1.000", "0.06M")
        cases = [("smoke 0.06M", SMOKE, s, infinity_schedule("1.000", "1M").grids[-1], default_plan(s, SMOKE.depth),
                  {})]
    else:
        cases = []
        for name in models:
            for res in resolutions:
                preset = get_model(name)
                h, w = parse_resolution(res, preset)
                s = resolve_schedule(preset, h, w)
                plan, kernels, _ = resolve_plan("default", preset, h, w, s)
                cases.append((f"{name} {res}", InfinityConfig.preset(name), s, infinity_reference_grid(h, w), plan,
                              kernels))
    for label, cfg, s, ref, plan, kernels in cases:
        entry = {"model": label, "rows": []}
        result["runs"].append(entry)
        _run_case(label, cfg, s, ref, plan, kernels, "cpu" if smoke else "cuda", 1 if smoke else runs, entry["rows"],
            lambda: path.write_text(json.dumps(result, indent=1)))
        if not smoke:
            torch.cuda.empty_cache()  # the case's models are gone with its frame
    print(f"wrote {path}")
    return path
