"""The ``sparvar`` command: ``autotune``, ``configs``, ``plan``, ``generate``, ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .errors import SparvarError

__all__ = ["main"]


def _weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, help="checkpoint (.safetensors or torch) with the official parameter "
                   "names (default: seeded random weights; for --model small, its trained weights shipped with "
                   "the package)")


def _model_args(p: argparse.ArgumentParser, default_model: str | None = "tiny") -> None:
    from .models import MODELS

    default = " (default: %(default)s)" if default_model else " (required)"
    p.add_argument("--model", default=default_model, required=default_model is None,
                   help=f"model preset: {', '.join(MODELS)}{default}")
    p.add_argument("--resolution", default=None,
                   help="image HEIGHTxWIDTH in pixels, e.g. 1024x1024 or 1152x864 (default: the model's)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparvar", description="Sparse attention (CS4A, CSLA) for visual "
                                 "autoregressive models: tune kernels per GPU, inspect plans and configs, benchmark.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("autotune", help="search kernel parameters on this GPU and write a tuned config",
                       description="Optuna search over the kernels' speed parameters for one model and resolution, "
                       "on this GPU (or Triton's interpreter without one). Resumes an interrupted study when run again.")
    _model_args(p)
    p.add_argument("--trials", type=int, default=None, help="total trials in the study (default: 40 on a GPU, 6 on CPU)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds "
                   "(default: no limit)")
    p.add_argument("--study-name", default=None, help="default: <gpu>-<model>-<h>x<w>")
    p.add_argument("--storage", default=None, help="Optuna storage: sqlite:///path, postgresql://..., or "
                   "journal:PATH (default: SQLite in the user's cache directory)")
    p.add_argument("--output-dir", default=None, help="where the tuned config goes (default: the user's config directory)")
    p.add_argument("--seed", type=int, default=0, help="sampler and input seed (default: 0)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on one shared study, one per visible GPU "
                   "(default: 1)")
    p.add_argument("--calibration", default=None, help="q/k/v per (layer, scale) for the semantic search (windows, "
                   "sinks, decision scale, keep ratio): a torch file, a `sparvar capture` folder, or builtin (the "
                   "trained small model's own, with --model small); needs --max-rel-error")
    p.add_argument("--max-rel-error", type=float, default=None,
                   help="quality bound: largest relative error of attention outputs against dense (with --calibration)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("configs", help="list tuned configs and show which one would be loaded here, and why",
                       description="List the tuned configs in every search directory and, for a model, say which one "
                       "loads on this GPU and why (files that do not fit the model are named with the field).")
    _model_args(p, default_model=None)
    p.add_argument("--config", default=None, help="an explicit config file to validate and prefer")
    p.add_argument("--strict", action="store_true", help="a malformed config is an error, not a warning")

    p = sub.add_parser("plan", help="the default plan and its token densities for a model and resolution",
                       description="The authors' default plan fitted to a model and resolution, and the share of "
                       "(query, key) pairs each sparse step computes.")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("generate", help="generate one image's tokens with the plan's attention, timed per scale",
                       description="Next-scale generation with the project's own Infinity or VAR network (seeded "
                       "random weights unless --weights names a checkpoint with the official parameter names), "
                       "every attention as the plan says, a per-scale timing table and the peak memory. Without a "
                       "decoder the output is the tokens and features (torch.save).")
    _model_args(p)
    p.add_argument("--seed", type=int, default=0, help="weights (when random), conditioning and sampling seed (default: 0)")
    _weights_arg(p)
    p.add_argument("--plan", default="default", help="dense, default (tuned config of this GPU, else the authors' "
                   "plan) or a plan/config JSON file (default: %(default)s)")
    p.add_argument("--skip-last", type=int, default=0, help="stop this many scales early (default: 0)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: 3 for Infinity, 1.5 for VAR)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: 900 for Infinity, 600 for VAR)")
    p.add_argument("--top-p", type=float, default=None, help="top-p sampling (default: 0.97 for Infinity, 0.8 for VAR)")
    p.add_argument("--out", default=None, help="output file (default: sparvar-<model>-seed<seed>.pt)")

    p = sub.add_parser("capture", help="save a model's attention inputs as calibration data for the semantic search",
                       description="Generate a few samples with dense attention and write q, k, v of chosen layers "
                       "and scales to a calibration folder (bf16, one file per attention, written as they come; the "
                       "size is estimated first). `sparvar autotune --calibration FOLDER --max-rel-error E` reads it. "
                       "For an official model object use sparvar.integrations.capture.")
    _model_args(p)
    p.add_argument("--out", required=True, help="the calibration folder to create (required)")
    _weights_arg(p)
    p.add_argument("--samples", type=int, default=2, help="generations to capture (default: %(default)s)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers (default: first, middle, last)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="scales (default: the last four, which the "
                   "semantic search reads)")
    p.add_argument("--seed", type=int, default=0, help="first sample's seed (default: 0)")

    p = sub.add_parser("analyze", help="measure the attention properties SparVAR builds on, and the plan's recall",
                       description="One dense generation; from the model's own attention: mass on the sink scales per "
                       "layer, cross-scale similarity of key profiles, mass against spatial distance, and the share "
                       "of each query's dense mass that the plan's pattern keeps (recall). JSON and plots in --out. "
                       "Random weights have none of this structure: the default model is the trained small one.")
    _model_args(p, "small")
    _weights_arg(p)
    p.add_argument("--plan", default="default", help="whose patterns' recall to measure: default or a plan/config "
                   "file (default: %(default)s)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="query scales (default: all from 1 on)")
    p.add_argument("--max-distance", type=int, default=4, help="locality: largest distance (default: %(default)s)")
    p.add_argument("--queries", type=int, default=256, help="queries per scale that enter the probabilities "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weights (when random), conditioning and sampling seed")
    p.add_argument("--out", default="sparvar-analysis", help="output folder (default: %(default)s)")

    p = sub.add_parser("eval", help="how much each plan (and scale skipping) changes the images against dense attention",
                       description="From the same seeds: dense generation against the default plan, CSLA only, CS4A "
                       "only, CSLA windows one size smaller and larger, and dense with the last one or two scales "
                       "skipped: PSNR and SSIM against the dense images (the decoder's input features where the "
                       "model has no decoder), per (layer, scale) attention error and recall on the dense inputs, "
                       "and each row's generation time. eval.json, eval.md and grid.png in --out. The default model is the "
                       "trained small one (256x256 images; minutes on a GPU, hours in the CPU interpreter).")
    _model_args(p, "small")
    _weights_arg(p)
    p.add_argument("--plan", default="default", help="the plan to compare and vary: default or a plan/config file "
                   "(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="generation seeds (default: 0 1)")
    p.add_argument("--out", default="sparvar-eval", help="output folder (default: %(default)s)")

    p = sub.add_parser("bench", help="benchmarks on this GPU: attention at Infinity 1024 shapes, or whole generations",
                       description="attention: correctness first, then cuDNN and flash SDPA, FlexAttention with the "
                       "identical mask and the SparVAR kernels, timed as CUDA graph replays, with eager and host times "
                       "beside. e2e: whole Infinity (or VAR) generations, the official code (plain, patched, "
                       "accelerated) against the project's dense, sparse, skip-2 and ceiling paths, in one run.")
    p.add_argument("what", nargs="?", choices=["attention", "e2e"], default="attention",
                   help="which benchmark (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=["infinity-2b", "infinity-8b"], help="e2e: models (default: both Infinity presets; var-d16 .. var-d30 too)")
    p.add_argument("--resolutions", nargs="+", default=["1024x1024"], help="e2e: Infinity resolutions (default: 1024x1024; VAR runs at 256x256)")
    p.add_argument("--smoke", action="store_true", help="e2e: small models on the CPU, to check the run")
    p.add_argument("--heads", type=int, nargs="+", default=[16, 28], help="head counts (default: 16 28)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 11, 12], help="query scales (default: 10 11 12)")
    p.add_argument("--out", default="bench/results", help="results folder (default: %(default)s)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes)")
    return ap


def _cmd_autotune(args) -> int:
    import torch

    from sparvar.autotune.setup import AutotuneOptions
    from sparvar.autotune.study import format_summary, run_autotune

    trials = args.trials if args.trials is not None else (40 if torch.cuda.is_available() else 6)
    opts = AutotuneOptions(model=args.model, resolution=args.resolution, trials=trials, timeout=args.timeout,
                           study_name=args.study_name, storage=args.storage, output_dir=args.output_dir,
                           seed=args.seed, workers=args.workers, calibration=args.calibration,
                           max_rel_error=args.max_rel_error, progress=not args.no_progress)
    config, path, measured = run_autotune(opts)
    print(format_summary(measured, path, config.quality))
    return 0


def _cmd_configs(args) -> int:
    from .configs import find_config, search_dirs
    from .hardware import compute_capability, gpu_name
    from .models import get_model, parse_resolution

    print(f"GPU: {gpu_name()} (compute capability {compute_capability()})")
    print("search order:")
    for origin, d in search_dirs():
        files = sorted(d.glob("*/*.json")) if d.is_dir() else []
        print(f"  {origin:<8} {d}  ({len(files)} configs)")
        for f in files:
            print(f"           {f.parent.name}/{f.name}")
    if args.model:
        preset = get_model(args.model)
        h, w = parse_resolution(args.resolution, preset)
        # Skipped files are printed below; the warnings would repeat them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            choice = find_config(preset.name, h, w, args.config, args.strict)
        for msg in choice.skipped:
            print(f"skipped: {msg}")
        where = f" ({choice.path})" if choice.path else ""
        print(f"{preset.name} {h}x{w} loads: {choice.reason}{where}")
        m = choice.config.measured if choice.config else None
        if m is not None:
            print(f"  measured on {m.device} ({m.timing}): sparse steps {m.speedup_vs_dense:.2f}x vs dense, "
                  f"{m.speedup_vs_default:.2f}x vs default config")
    return 0


def _cmd_plan(args) -> int:
    from sparvar.reference import StepKind, generation_density, plan_densities

    from .models import get_model, model_plan, parse_resolution, resolve_schedule

    preset = get_model(args.model)
    h, w = parse_resolution(args.resolution, preset)
    schedule = resolve_schedule(preset, h, w)
    plan = model_plan(preset, schedule)
    if args.json:
        print(plan.to_json())
        return 0
    print(f"{preset.name} {h}x{w}: {schedule.num_scales} scales {list(schedule.grids)}, depth {plan.depth}")
    print(json.dumps(plan.to_dict()))
    print(f"{'scale':>5} {'queries x keys':>16} {'kind':<12} {'layers':>6} {'density':>8}")
    for r in plan_densities(plan, schedule):
        if r.kind != StepKind.DENSE:
            print(f"{r.step:>5} {f'{r.queries} x {r.keys}':>16} {r.kind:<12} {r.layers:>6} {100 * r.density:>7.2f}%")
    print(f"whole generation: {100 * generation_density(plan, schedule):.1f}% of dense pairs")
    return 0


def _cmd_generate(args) -> int:
    import time

    import torch

    from .pipeline import build_pipeline

    if args.skip_last < 0:
        raise SparvarError(f"--skip-last must be >= 0, got {args.skip_last}")
    from .models import get_model, parse_resolution

    preset = get_model(args.model)
    image_hw = parse_resolution(args.resolution, preset)
    out = Path(args.out or f"sparvar-{args.model}-seed{args.seed}.{'png' if preset.decoder else 'pt'}")
    if out.suffix not in (".pt", ".png") or (out.suffix == ".png" and not preset.decoder):
        raise SparvarError(f"--out {out}: " + ("the output is a .png image or a .pt file of tokens and features"
                                                if preset.decoder else "no image decoder is available here for "
                                                f"{preset.name}, so the output is tokens and features in a .pt file"))
    if not out.parent.is_dir():
        raise SparvarError(f"--out {out}: the folder {out.parent} does not exist")
    pipe = build_pipeline(args.model, args.resolution, plan=args.plan, weights=args.weights, seed=args.seed)
    infinity = pipe.preset.family != "var"
    opts = dict(cfg=args.cfg if args.cfg is not None else (3.0 if infinity else 1.5),
                top_k=args.top_k if args.top_k is not None else (900 if infinity else 600),
                top_p=args.top_p if args.top_p is not None else (0.97 if infinity else 0.8),
                skip_last=args.skip_last)
    cond = pipe.condition(args.seed)
    cuda = torch.cuda.is_available()
    if cuda:
        pipe.generator.generate(cond, seed=args.seed, **opts)  # compiles kernels, captures graphs
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = pipe.generator.generate(cond, seed=args.seed, **opts)
    total = (time.perf_counter() - t0) * 1e3
    print(f"{pipe.preset.name} {image_hw[0]}x{image_hw[1]}, plan: {pipe.plan_source}"
          f"{'' if cuda else ' (Triton interpreter on the CPU: times say nothing about a GPU)'}")
    print(f"{'scale':>5} {'grid':>9} {'kind of attention':<28} {'ms':>9}")
    for step, ms in enumerate(result.scale_ms):
        kinds = sorted({str(pipe.plan.kind(layer, step)) for layer in range(pipe.plan.depth)}) if pipe.plan else ["dense"]
        h, w = pipe.schedule.grids[step]
        print(f"{step:>5} {f'{h}x{w}':>9} {'+'.join(kinds):<28} {ms:>9.2f}")
    print(f"total {total:.1f} ms" + (f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""))
    if out.suffix == ".png":
        import matplotlib.image

        image = pipe.decoder(result.features)[0].permute(1, 2, 0).float().cpu().numpy()
        tmp = out.with_name(out.name + ".tmp.png")
        matplotlib.image.imsave(tmp, image)
        tmp.replace(out)
        print(f"wrote {out}")
        return 0
    torch.save({"model": pipe.preset.name, "seed": args.seed, "plan": pipe.plan_source,
                "tokens": [t.cpu() for t in result.tokens], "features": result.features.float().cpu(),
                "scale_ms": result.scale_ms}, out)
    print(f"wrote {out} (tokens and features" + ("" if preset.decoder else "; no image decoder here") + ")")
    return 0


def _cmd_capture(args) -> int:
    from .capture import CalibrationWriter, RecordingDispatcher, estimate_bytes
    from .pipeline import build_pipeline

    if args.samples < 1:
        raise SparvarError(f"--samples must be >= 1, got {args.samples}")
    pipe = build_pipeline(args.model, args.resolution, plan="dense", weights=args.weights, seed=args.seed, graphs=False)
    cfg, S = pipe.net.cfg, pipe.schedule.num_scales
    layers = args.layers if args.layers is not None else [0, cfg.depth // 2, cfg.depth - 1]
    steps = args.steps if args.steps is not None else list(range(max(0, S - 4), S))
    bad = [x for x in layers if not 0 <= x < cfg.depth]
    if bad:
        raise SparvarError(f"--layers must be in [0, {cfg.depth - 1}], got {bad}")
    size = estimate_bytes(pipe.schedule, layers, steps, args.samples, 2, cfg.num_heads, cfg.embed_dim // cfg.num_heads)
    print(f"capturing {args.samples} samples x {len(set(layers))} layers x {len(set(steps))} scales of "
          f"{pipe.preset.name}: about {size / 2**20:.1f} MiB in {args.out}", flush=True)
    scale = (pipe.net.blocks[0].sa if hasattr(pipe.net.blocks[0], "sa") else pipe.net.blocks[0].attn).scale
    writer = CalibrationWriter(args.out, pipe.schedule, layers, steps, scale=float(scale), model=pipe.preset.name,
                               samples=args.samples)
    dispatcher = RecordingDispatcher(None, pipe.schedule, writer=writer)
    pipe.generator.dispatcher = dispatcher
    for i in range(args.samples):
        writer.sample = i
        pipe.generator.generate(pipe.condition(args.seed + i), seed=args.seed + i)
    print(f"wrote {args.out}")
    return 0


def _cmd_analyze(args) -> int:
    from pathlib import Path

    from .analysis import analyze, plot_analysis, write_analysis
    from .pipeline import build_pipeline

    if args.plan == "dense":
        raise SparvarError("--plan dense has no sparse pattern to measure; use default or a plan/config file")
    if args.max_distance < 0 or args.queries < 1:
        raise SparvarError(f"--max-distance must be >= 0 and --queries >= 1, got {args.max_distance} and "
                           f"{args.queries}")
    pipe = build_pipeline(args.model, args.resolution, plan=args.plan, weights=args.weights, seed=args.seed,
                          graphs=False)
    result = analyze(pipe, pipe.plan, seed=args.seed, steps=args.steps, max_distance=args.max_distance,
                     queries_per_step=args.queries)
    out = Path(args.out)
    path = write_analysis(result, out)
    plots = plot_analysis(result, out)
    print(f"{pipe.preset.name}, plan: {pipe.plan_source}")
    print(f"{'scale':>5} {'sink mass':>10} {'recall (sparse layers)':>23}")
    for s in result["steps"]:
        sinks = [v[str(s)] for v in result["sinks"].values()]
        rec = [v[str(s)] for v in result["recall"].values() if str(s) in v]
        rec_txt = f"{sum(rec) / len(rec):.3f}" if rec else "-"
        print(f"{s:>5} {sum(sinks) / len(sinks):>10.3f} {rec_txt:>23}")
    print(f"wrote {path} and {', '.join(p.name for p in plots)}")
    return 0


def _cmd_eval(args) -> int:
    from pathlib import Path

    from .evaluation import evaluate, write_evaluation
    from .pipeline import build_pipeline

    if args.plan == "dense":
        raise SparvarError("--plan dense has nothing to compare with dense attention; use default or a plan/config file")
    pipe = build_pipeline(args.model, args.resolution, plan=args.plan, weights=args.weights, seed=args.seeds[0])
    skips = [n for n in (1, 2) if n < pipe.schedule.num_scales]
    result, grid = evaluate(pipe, pipe.plan, seeds=tuple(args.seeds), skips=skips)
    paths = write_evaluation(result, grid, Path(args.out))
    print(paths[1].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _cmd_bench(args) -> int:
    if args.what == "e2e":
        from .e2e import run_e2e

        run_e2e(args.models, args.resolutions, out=args.out, smoke=args.smoke)
        return 0
    from .benchmark import run_attention_benchmark

    run_attention_benchmark(args.heads, args.steps, args.out, flex=not args.no_flex)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparvar")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Interrupts:
    """Whether Ctrl-C arrived during the command. A SIGINT that lands inside a storage write (an
    SQLite busy wait, an Optuna commit) can surface as that library's error instead of
    ``KeyboardInterrupt``; the flag lets the command still end as interrupted, with one line."""

    seen = False

    @classmethod
    def install(cls):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigint(signum, frame):
            cls.seen = True
            raise KeyboardInterrupt
        return signal.signal(signal.SIGINT, on_sigint)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"autotune": _cmd_autotune, "configs": _cmd_configs, "plan": _cmd_plan, "bench": _cmd_bench,
                "generate": _cmd_generate, "capture": _cmd_capture, "analyze": _cmd_analyze,
                "eval": _cmd_eval}
    _Interrupts.seen = False
    previous = _Interrupts.install()
    try:
        return commands[args.command](args)
    except (KeyboardInterrupt, Exception) as e:
        if isinstance(e, KeyboardInterrupt) or _Interrupts.seen:
            if args.command == "autotune":
                print("sparvar: interrupted; finished trials are kept in the study: run the same command to resume",
                      file=sys.stderr)
            else:
                print("sparvar: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, (SparvarError, ValueError)):
            print(f"sparvar: error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
