"""Semantic search: windows, sinks, decision scale, keep ratio and bound layer, under a quality
bound measured on the user's calibration data (SPEC section 6).

Calibration file (``torch.save``): ``{"scale": float, "layers": {layer: {step: {"q", "k", "v"}}}}``
with ``q [B, H, h_k*w_k, D]`` and ``k, v [B, H, L_k, D]`` captured from the model at every step
from the smallest decision scale searched (``S - 4``) to the last. Quality of a plan is the
largest relative error ``||O_plan - O_dense|| / ||O_dense||`` over the file's (layer, step)
pairs. The study is multi-objective (attention time, error) with the bound as a constraint;
its Pareto front is plotted next to the config, and the fastest plan within the bound is kept,
with the kernels' default parameters (tune those for the chosen plan with a plain
``sparvar autotune`` afterwards, which searches speed parameters only).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import optuna
import torch

from sparvar.capture import read_calibration_folder
from sparvar.configs import user_config_dir
from sparvar.dispatch import StepDispatcher
from sparvar.errors import SparvarError
from sparvar.kernels import default_config
from sparvar.records import Quality
from sparvar.reference import SparsityPlan, relative_error

from .measure import BenchWorker
from .result import finish
from .setup import TuneSetup
from .space import plan_units
from .storage import create_study, open_storage

__all__ = ["BUILTIN", "builtin_calibration", "load_calibration", "plan_error", "semantic_params", "run_quality_search",
           "make_calibration", "first_calibration_step"]


def first_calibration_step(num_scales: int) -> int:
    """The smallest decision scale the semantic search tries (``S - 4``): calibration data starts there."""
    return max(0, num_scales - 4)


def _read_calibration(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise SparvarError(f"calibration file {path} does not exist")
    # torch.save writes a zip archive; anything else (a text file, a pickle of something else)
    # would fail deep inside the unpickler with an unhelpful message.
    if not zipfile.is_zipfile(path):
        raise SparvarError(f"calibration file {path} is not a torch.save file (write it with `sparvar capture` "
                           "or torch.save of {'scale': float, 'layers': {layer: {step: {'q', 'k', 'v'}}}})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise SparvarError(f"calibration file {path} cannot be read: {type(e).__name__}: {e}") from None


#: ``--calibration builtin``: the trained small model's own attention inputs.
BUILTIN = "builtin"


def builtin_calibration(model: str, schedule, depth: int, seeds=(0,)) -> dict:
    """The small model's attention inputs (``sparvar.small``) from dense generations of ``seeds``
    at its first, middle and last layer and the steps the search reads: calibration data from a
    trained model for anyone without their own. Only for ``--model small``: another model's
    attention is its own (``sparvar capture`` records it)."""
    from sparvar.analysis import RecordingAttention, generate_with
    from sparvar.pipeline import build_pipeline

    if model != "small":
        raise SparvarError(f"--calibration builtin is the small model's attention (12 layers, 3 heads); for "
                           f"{model} capture its own with `sparvar capture --model {model} --weights ... --out DIR`")
    pipe = build_pipeline("small", plan="dense", graphs=False)
    steps = range(first_calibration_step(schedule.num_scales), schedule.num_scales)
    layers = sorted({0, depth // 2, depth - 1})
    out = {"scale": None, "layers": {layer: {} for layer in layers}}
    for sample, seed in enumerate(seeds):
        recorder = RecordingAttention(pipe.schedule, steps, values=True, layers=layers,
                                      backend=pipe.generator.dispatcher.backend)
        generate_with(pipe, recorder, seed)
        for (layer, step), (q, k, v, scale) in recorder.inputs.items():
            entry = {"q": q.cpu(), "k": k.cpu(), "v": v.cpu()}
            prev = out["layers"][layer].get(step)
            out["layers"][layer][step] = entry if prev is None else {n: torch.cat((prev[n], entry[n])) for n in entry}
            out["scale"] = scale
    return out


def load_calibration(path: str | Path, schedule, depth: int, model: str | None = None) -> dict:
    """Load and validate a ``torch.save`` file or a folder written by ``sparvar capture`` (or
    ``builtin``: ``builtin_calibration`` of ``model``); ``SparvarError`` names the layer, step
    and tensor that is wrong."""
    if str(path) == BUILTIN:
        data = builtin_calibration(model, schedule, depth)
    elif Path(path).is_dir():
        data = read_calibration_folder(path)
        if [tuple(g) for g in data["grids"]] != list(schedule.grids):
            raise SparvarError(f"calibration folder {path} was captured on the schedule {data['grids']}, "
                               f"not {[list(g) for g in schedule.grids]}")
    else:
        data = _read_calibration(path)
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise SparvarError(f"calibration file {path}: expected a dict with a non-empty 'layers' dict")
    scale = data.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise SparvarError(f"calibration file {path}: 'scale' must be a number, got {scale!r}")
    first = first_calibration_step(schedule.num_scales)
    for layer, steps in layers.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
            raise SparvarError(f"calibration file {path}: layer {layer!r} is not in [0, {depth - 1}]")
        for step in range(first, schedule.num_scales):
            entry = steps.get(step) if isinstance(steps, dict) else None
            if not isinstance(entry, dict) or not all(isinstance(entry.get(n), torch.Tensor) for n in "qkv"):
                raise SparvarError(f"calibration file {path}: layer {layer} needs q, k, v tensors at step {step} "
                                   f"(steps {first}..{schedule.num_scales - 1})")
            nq, nk = schedule.num_queries(step), schedule.num_keys(step)
            for n, want in (("q", nq), ("k", nk), ("v", nk)):
                t = entry[n]
                if t.dim() != 4 or t.shape[2] != want or not t.is_floating_point():
                    raise SparvarError(f"calibration file {path}: layer {layer} step {step} {n} has shape "
                                       f"{tuple(t.shape)} ({t.dtype}), expected floating [B, H, {want}, D]")
    return {"scale": float(scale), "layers": layers}


def plan_error(plan: SparsityPlan, schedule, calibration: dict, device: str, dtype) -> float:
    """Largest relative error of the plan's attention against dense over the calibration data."""
    attn = StepDispatcher(plan, schedule)
    worst = 0.0
    for layer, steps in calibration["layers"].items():
        attn.new_image()
        for step in range(first_calibration_step(schedule.num_scales), schedule.num_scales):
            q, k, v = (steps[step][n].to(device, dtype) for n in "qkv")
            out = attn(layer, step, q, k, v, calibration["scale"])
            dense = torch.nn.functional.scaled_dot_product_attention(
                *(t.double() for t in (q, k, v)), scale=calibration["scale"])
            worst = max(worst, relative_error(out, dense))
    return worst


def semantic_params(trial: optuna.Trial, base: SparsityPlan) -> SparsityPlan:
    """Sample a plan near the authors' default; invalid combinations are pruned with the reason."""
    S = base.num_scales
    first = first_calibration_step(S)
    d = trial.suggest_categorical("decision_scale", sorted({max(first, min(S - 1, base.decision_scale + o))
                                                            for o in (-1, 0, 1)}))
    sinks = trial.suggest_categorical("sink_scales", sorted({min(S - 1, s) for s in (3, 4, 5, 6)}))
    finest = [trial.suggest_categorical(f"win_rel[{t}]", [1, 3, 5, 7, 9, 11]) for t in range(min(3, S - sinks))]
    tail = list(base.win_rel[len(finest):S - sinks])
    layers = {min(base.depth - 1, b) for b in (base.depth // 4, base.bound_layer, base.depth // 2)}
    bound = trial.suggest_categorical("bound_layer", sorted(layers | {-1}))
    try:
        return dataclasses.replace(
            base, decision_scale=d, sink_scales=sinks, win_rel=tuple(finest + tail), bound_layer=bound,
            keep_ratio=trial.suggest_categorical("keep_ratio", [0.1, 0.15, 0.2, 0.3, 0.4]),
            band_rel=base.band_rel[: S - 1 - d])
    except ValueError as e:
        trial.set_user_attr("pruned_by", str(e))
        raise optuna.TrialPruned(str(e)) from None


def run_quality_search(opts, setup: TuneSetup, storage_url: str, calibration: dict):
    """The semantic study under the bound, its Pareto plot, and the config it chooses."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    storage = open_storage(storage_url, opts.lock_timeout)
    # Optuna 5 reads constraints set on the trial; older releases take a constraints function.
    native = hasattr(optuna.trial.Trial, "set_constraint")
    legacy = {} if native else {"constraints_func": lambda t: [t.user_attrs.get("constraint", 1.0)]}
    study = create_study(f"{setup.study_name}-semantic", storage, storage_url, directions=["minimize", "minimize"],
                         sampler=optuna.samplers.TPESampler(seed=opts.seed, **legacy))
    bound = opts.max_rel_error
    worker = BenchWorker(opts.measurer, (setup.spec,))

    def objective(trial: optuna.Trial):
        plan = semantic_params(trial, setup.plan)
        err = plan_error(plan, setup.schedule, calibration, device, dtype)
        total = 0.0
        for unit in plan_units(plan):
            m = worker.measure(unit.kind, unit.step, {n: default_config(n) for n in unit.launches}, plan=plan)
            if m.status != "ok":
                trial.set_user_attr("failure", f"{unit.key}: {m.status}: {m.message[:200]}")
                raise optuna.TrialPruned(f"{unit.key}: {m.status}")
            total += unit.count * m.ms
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("rel_error", err)
        trial.set_user_attr("constraint", err - bound)
        if native:
            trial.set_constraint("max_rel_error", err - bound)
        return total, err

    if not study.trials:
        study.enqueue_trial({"decision_scale": setup.plan.decision_scale, "sink_scales": setup.plan.sink_scales,
                             **{f"win_rel[{t}]": w for t, w in enumerate(setup.plan.win_rel[:3])},
                             "bound_layer": setup.plan.bound_layer, "keep_ratio": setup.plan.keep_ratio})
    done = sum(t.state.is_finished() for t in study.trials)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study.optimize(objective, n_trials=max(0, opts.trials - done), timeout=opts.timeout)
    finally:
        worker.close()
    feasible = [t for t in study.best_trials if t.user_attrs.get("constraint", 1.0) <= 0]
    if not feasible:
        errors = [t.values[1] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = f"{min(errors):.3g}" if errors else "none measured"
        seen = ""
        if errors:  # the front the study found is still worth seeing: it says how far the bound is
            folder = Path(opts.output_dir or user_config_dir())
            folder.mkdir(parents=True, exist_ok=True)
            path = plot_pareto(study, bound, folder / f"{setup.study_name}-semantic.pareto.png")
            seen = f"; the trials' Pareto front is in {path}"
        raise SparvarError(f"no plan met --max-rel-error {bound} on the calibration data "
                           f"(smallest error {best}); raise the bound{seen}")
    chosen = min(feasible, key=lambda t: t.values[0])
    setup = setup.with_plan(SparsityPlan.from_dict(chosen.user_attrs["plan"]))
    quality = Quality("max relative error of attention outputs against dense", bound, chosen.user_attrs["rel_error"],
                      str(opts.calibration), chosen.number)
    defaults = {u.key: (float("nan"), {}, "default") for u in setup.units}
    config, path, measured = finish(opts, setup, study, defaults, quality)
    plot_pareto(study, bound, path.with_suffix(".pareto.png"))
    return config, path, measured


def plot_pareto(study: optuna.Study, bound: float, path: Path) -> Path:
    """Attention time against error for every finished trial, the Pareto front and the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = sorted(study.best_trials, key=lambda t: t.values[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.values[0] for t in done], [t.values[1] for t in done], s=12, c="0.6", label="trials")
    ax.plot([t.values[0] for t in front], [t.values[1] for t in front], "o-", c="C0", label="Pareto front")
    ax.axhline(bound, color="C3", ls="--", label=f"bound {bound:g}")
    ax.set_xlabel("attention time of the sparse steps per generation (ms)")
    ax.set_ylabel("max relative error vs dense")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps(
        [{"trial": t.number, "ms": t.values[0], "rel_error": t.values[1], "plan": t.user_attrs.get("plan")}
         for t in front], indent=2))
    return path


def make_calibration(path: str | Path, schedule, layers, heads: int, head_dim: int, batch: int = 1,
                     seed: int = 0, scale: float | None = None, sharpness: float = 2.0) -> Path:
    """A synthetic calibration file whose attention is local, as at VAR's large scales: q and k
    are Fourier features of each token's position in the image (so ``q . k`` peaks where the
    positions meet), v is random. For trying the pipeline; real calibration data comes from the
    model's own attention inputs."""
    g = torch.Generator().manual_seed(seed)
    freqs = torch.tensor([1.0, 2.0, 4.0, 8.0])

    def features(h: int, w: int) -> torch.Tensor:
        y = ((torch.arange(h) + 0.5) / h).repeat_interleave(w)
        x = ((torch.arange(w) + 0.5) / w).repeat(h)
        ang = 2 * torch.pi * torch.cat([y[:, None] * freqs, x[:, None] * freqs], 1)
        f = torch.cat([ang.cos(), ang.sin()], 1)  # [h*w, 16]
        return f.repeat(1, -(-head_dim // f.shape[1]))[:, :head_dim] * sharpness

    out = {"scale": scale if scale is not None else head_dim ** -0.5, "layers": {}}
    for layer in layers:
        # One KV cache per layer: step k sees its first L_k tokens, as in generation.
        k_all = torch.cat([features(h, w) for h, w in schedule.grids])
        k_all = k_all.expand(batch, heads, *k_all.shape) + 0.1 * torch.randn(batch, heads, *k_all.shape, generator=g)
        v_all = torch.randn(batch, heads, k_all.shape[2], head_dim, generator=g)
        q_all = k_all + 0.1 * torch.randn(k_all.shape, generator=g)
        steps = {}
        for step in range(first_calibration_step(schedule.num_scales), schedule.num_scales):
            lo, hi = schedule.offsets[step], schedule.offsets[step + 1]
            steps[step] = {"q": q_all[:, :, lo:hi].contiguous(), "k": k_all[:, :, :hi].contiguous(),
                           "v": v_all[:, :, :hi].contiguous()}
        out["layers"][layer] = steps
    torch.save(out, path)
    return Path(path)
