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

For a VAR model (``var-d16`` .. ``var-d30``): the official VAR code plain and patched, then
``accelerate`` of that model with the dense plan (official_accelerated_dense: the project's path)
and the default plan (official_accelerated), the official demo's 8 classes (batch 16 with CFG).

Random weights (seeded), Infinity at CFG batch 2 with stand-in T5 features. Whole-generation times are medians of
timed runs after a warm-up that compiles and captures; per-scale times (a synchronize after each
scale) and peak memory beside them; JSON under --out.

    sparvar bench e2e --models infinity-2b infinity-8b     (or python bench/e2e.py ...)
    sparvar bench e2e --models var-d30
    sparvar bench e2e --smoke      # CPU, small models (Infinity's 0.06M schedule, VAR on 4 scales): checks the run
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

from sparvar.reference import default_plan, infinity_schedule

from . import integrations, official
from .errors import SparvarError
from .dispatch import StepDispatcher
from .generation import NextScaleGenerator
from .hardware import gpu_name, sanitize, software_versions
from .infinity_net import InfinityConfig, InfinityNet, TextCondition
from .models import get_model, parse_resolution, resolve_schedule
from .var_net import VARConfig
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


def _record(rows: list, save, label: str, impl: str, fn, runs: int, cuda: bool, scale_ms=None) -> None:
    """Time ``fn`` and append its row (or its error) to ``rows``, saving after each row."""
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
        _record(rows, save, label, impl, fn, runs, cuda, scale_ms)

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


#: The official VAR demo's classes (``demo_sample.ipynb``): one batch of 8, 16 rows with CFG.
VAR_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
VAR_BATCH = f"{len(VAR_LABELS)} classes, CFG {2 * len(VAR_LABELS)}"
VAR_SMOKE = VARConfig(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4))


def official_var(cfg: VARConfig, device: str, vae_channels: int = 160):
    """An official ``VAR`` and its ``VQVAE`` as ``build_vae_var`` makes them (random weights, the
    official init), on ``device``; on a GPU its blocks in bf16, as Infinity's inference script
    keeps its own (the demo's fp16 autocast over fp32 weights computes in the same precision)."""
    var_mod, vqvae_mod = official.var_modules()
    with torch.device(device):
        vae = vqvae_mod.VQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.Cvae, ch=vae_channels, test_mode=True,
                              share_quant_resi=cfg.share_quant_resi, v_patch_nums=cfg.patch_nums)
        var = var_mod.VAR(vae_local=vae, num_classes=cfg.num_classes, depth=cfg.depth, embed_dim=cfg.embed_dim,
                          num_heads=cfg.num_heads, norm_eps=cfg.norm_eps, shared_aln=cfg.shared_aln,
                          attn_l2_norm=cfg.attn_l2_norm, patch_nums=cfg.patch_nums, flash_if_available=False,
                          fused_if_available=False)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    # The official model takes its generator's device from its distributed set-up (the CPU here).
    var.rng = torch.Generator(device=device)
    var.uniform_prob = var.uniform_prob.to(device)
    if device == "cuda":
        var.blocks.bfloat16()
    return var.eval().requires_grad_(False), vae.eval()


def _run_var_case(label: str, cfg: VARConfig, device: str, runs: int, rows: list, save, vae_channels: int) -> None:
    """Official VAR plain and patched (bf16 autocast on a GPU), then ``accelerate`` of the same model
    with the dense and the default plan: B=8 classes, guidance 4, top-k 900, top-p 0.95, seed 0."""
    cuda = device == "cuda"
    var, vae = official_var(cfg, device, vae_channels)
    labels = torch.tensor(VAR_LABELS, device=device)
    opts = dict(B=len(VAR_LABELS), label_B=labels, g_seed=0, cfg=4.0, top_k=900, top_p=0.95)

    def official_run():
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
            return var.autoregressive_infer_cfg(**opts)
    _record(rows, save, label, "official_eager", official_run, runs, cuda)
    integrations.patch(var, plan="default")
    _record(rows, save, label, "official_patched", official_run, runs, cuda)
    integrations.unpatch(var)
    for impl, plan in (("official_accelerated_dense", "dense"), ("official_accelerated", "default")):
        fast = integrations.accelerate(var, vae, plan=plan)
        _record(rows, save, label, impl, lambda fast=fast: fast.generate(**opts), runs, cuda)
        del fast


def run_e2e(models=("infinity-2b", "infinity-8b"), resolutions=("1024x1024",), runs: int = 3,
            out: str | Path = "bench/results", smoke: bool = False) -> Path:
    """Run the benchmark (module docstring) and write ``<out>/<gpu>/e2e.json``; ``smoke`` checks the
    whole run on the CPU with small models (its times mean nothing). ``resolutions`` are the
    Infinity models'; a VAR model runs at its preset's resolution."""
    result = {"gpu": gpu_name(), **software_versions(), "date": time.strftime("%Y-%m-%d"),
              "timing": "whole generations: median of timed runs after a warm-up; per scale: with a synchronize "
                        "after each scale", "runs": []}
    path = Path(out) / sanitize(gpu_name()) / "e2e.json"
    device, runs = ("cpu", 1) if smoke else ("cuda", runs)
    cases = []  # (label, batch, run(rows, save))
    if smoke:
        s = infinity_schedule("1.000", "0.06M")
        cases.append(("smoke 0.06M", "CFG 2", partial(
            _run_case, "smoke 0.06M", SMOKE, s, infinity_schedule("1.000", "1M").grids[-1],
            default_plan(s, SMOKE.depth), {}, device, runs)))
        cases.append(("smoke var", VAR_BATCH,
                      partial(_run_var_case, "smoke var", VAR_SMOKE, device, runs, vae_channels=32)))
    for name in () if smoke else models:
        preset = get_model(name)
        if preset.family not in ("infinity", "var"):
            raise SparvarError(f"the end-to-end benchmark runs the official code's models (infinity-2b, infinity-8b, "
                               f"var-d16 .. var-d30), got {name!r}")
        if preset.family == "var":
            label = f"{name} {preset.default_resolution}"
            run = partial(_run_var_case, label, VARConfig.preset(preset.depth), device, runs, vae_channels=160)
            cases.append((label, VAR_BATCH, run))
            continue
        for res in resolutions:
            h, w = parse_resolution(res, preset)
            s = resolve_schedule(preset, h, w)
            plan, kernels, _ = resolve_plan("default", preset, h, w, s)
            cases.append((f"{name} {res}", "CFG 2", partial(
                _run_case, f"{name} {res}", InfinityConfig.preset(name), s, infinity_reference_grid(h, w), plan,
                kernels, device, runs)))
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("the end-to-end benchmark needs a CUDA GPU (or --smoke on the CPU)")
    path.parent.mkdir(parents=True, exist_ok=True)
    for label, batch, run in cases:
        entry = {"model": label, "batch": batch, "rows": []}
        result["runs"].append(entry)
        run(rows=entry["rows"], save=lambda: path.write_text(json.dumps(result, indent=1)))
        if not smoke:
            torch.cuda.empty_cache()  # the case's models are gone with its frame
    print(f"wrote {path}")
    return path
