"""From a finished study to a tuned config: the best config per unit, re-measured beside the
default and dense in one process, written atomically with what was measured."""

from __future__ import annotations

from pathlib import Path

import optuna

from sparvar.configs import TunedConfig, user_config_dir
from sparvar.errors import SparvarError
from sparvar.hardware import gpu_name
from sparvar.kernels import LaunchKey, default_config
from sparvar.records import DenseStepTiming, Measured, Quality, UnitTiming
from sparvar.reference import StepKind

from .measure import BenchWorker
from .setup import AutotuneOptions, TuneSetup
from .space import configs_from_params

__all__ = ["best_per_unit", "trial_states", "finish", "format_summary"]


def best_per_unit(study: optuna.Study, units) -> dict:
    """Per unit, the params of the fastest measurement in any trial (the objective is a sum of
    independent per-unit times, so each unit's best can come from a different trial)."""
    best = {}
    for t in study.get_trials(deepcopy=False):
        for unit in units:
            ms = t.user_attrs.get(f"ms.{unit.key}")
            if ms is not None and (unit.key not in best or ms < best[unit.key][0]):
                best[unit.key] = (ms, t.params, t.number)
    return best


def trial_states(study: optuna.Study) -> dict[str, int]:
    """Trials by state; a trial stopped by Ctrl-C is ``INTERRUPTED``, not a failure."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        name = "INTERRUPTED" if t.user_attrs.get("interrupted") else t.state.name
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def finish(opts: AutotuneOptions, setup: TuneSetup, study: optuna.Study, best: dict | None = None,
           quality: Quality | None = None) -> tuple[TunedConfig, Path, Measured]:
    """Re-measure ``best`` (default: the best per unit of ``study``) and write the config."""
    best = best if best is not None else best_per_unit(study, setup.units)
    if len(best) < len(setup.units):
        missing = [u.key for u in setup.units if u.key not in best]
        raise SparvarError(f"no trial produced a working config for {missing}; see the study's failed trials")
    worker = BenchWorker(opts.measurer, (setup.spec,))
    try:
        measured, kernels = _remeasure(setup, worker, best)
    finally:
        worker.close()
    measured.trials = trial_states(study)
    config = TunedConfig(model=setup.preset.name, height=setup.height, width=setup.width, plan=setup.plan,
                         kernels=kernels, measured=measured, quality=quality, heads=setup.preset.heads,
                         head_dim=setup.preset.head_dim)
    path = config.save(opts.output_dir or user_config_dir())
    return config, path, measured


def _remeasure(setup: TuneSetup, worker: BenchWorker, best: dict) -> tuple[Measured, dict]:
    """Best, default and dense times per unit, all measured now in one process."""
    units, kernels, method = [], {}, ""

    def measure(kind, step, configs, what):
        nonlocal method
        m = worker.measure(kind, step, configs)
        if m.status != "ok":
            raise SparvarError(f"re-measuring {what} failed: {m.status}: {m.message[:200]}")
        method = m.method
        return m.ms

    for unit in setup.units:
        configs = configs_from_params(unit, best[unit.key][1])
        defaults = {launch: default_config(launch) for launch in unit.launches}
        row = UnitTiming(unit.key, unit.count, best[unit.key][2],
                         measure(unit.kind, unit.step, configs, f"best of {unit.key}"),
                         measure(unit.kind, unit.step, defaults, f"default of {unit.key}"),
                         measure(StepKind.DENSE, unit.step, {}, f"dense at {unit.key}"))
        if row.default_ms < row.best_ms:
            # Timing noise can make the default win the re-measurement: keep the faster one.
            configs, row.best_ms, row.trial = defaults, row.default_ms, "default"
        units.append(row)
        kernels.update({LaunchKey(launch, unit.step): cfg for launch, cfg in configs.items()})
    dense_steps = []
    for step in range(setup.schedule.num_scales):
        layers = sum(setup.plan.kind(layer, step) == StepKind.DENSE for layer in range(setup.plan.depth))
        if layers:
            dense_steps.append(DenseStepTiming(step, layers, measure(StepKind.DENSE, step, {}, f"dense step {step}")))
    return Measured(gpu_name(), method, units, dense_steps), kernels


def format_summary(measured: Measured, path: Path, quality: Quality | None = None) -> str:
    lines = [f"device: {measured.device}", f"timing: {measured.timing}",
             f"{'sparse step':<18} {'layers':>6} {'best ms':>10} {'default ms':>11} {'dense ms':>10} "
             f"{'vs default':>10} {'vs dense':>9}"]
    for r in measured.units:
        lines.append(f"{r.unit:<18} {r.layers:>6} {r.best_ms:>10.4f} {r.default_ms:>11.4f} "
                     f"{r.dense_ms:>10.4f} {r.default_ms / r.best_ms:>9.2f}x {r.dense_ms / r.best_ms:>8.2f}x")
    d = measured.to_dict()
    s, g = d["sparse_steps_ms"], d["generation_attention_ms"]
    lines.append(f"{'all sparse steps':<18} {'':>6} {s['best']:>10.3f} {s['default']:>11.3f} {s['dense']:>10.3f} "
                 f"{measured.speedup_vs_default:>9.2f}x {measured.speedup_vs_dense:>8.2f}x")
    lines.append(f"whole generation's attention: {g['best']:.3f} ms vs dense {g['dense']:.3f} ms "
                 f"({measured.generation_speedup_vs_dense:.2f}x)")
    if quality is not None:
        lines.append(f"quality: {quality.metric} {quality.measured:.4g} (bound {quality.bound:g})")
    lines.append(f"trials: {measured.trials}")
    lines.append(f"wrote {path}")
    return "\n".join(lines)
