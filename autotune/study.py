"""``sparvar autotune``: an Optuna study over the kernels' speed parameters for one GPU, model and
resolution, and the tuned config it writes.

The objective is the attention time of one whole generation's sparse steps: each unit
(``space.plan_units``) is timed once and weighted by how many layers run it. Trials run in
this process; each measurement runs in a spawned ``BenchWorker`` that is restarted after a
fault. The default config is the first trial. Studies live in SQLite in the user's cache
directory unless ``--storage`` names a PostgreSQL URL or a journal file; ``--workers N`` runs
N processes (one per visible GPU) on one shared study.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from sparvar.configs import TunedConfig, user_config_dir
from sparvar.errors import SparvarError
from sparvar.hardware import gpu_name, sanitize
from sparvar.models import get_model, model_plan, parse_resolution, resolve_schedule

from .measure import BenchWorker, MeasurerSpec, StepMeasurer
from .space import CPU_SPACE, SPACE, configs_from_params, default_params, plan_units, suggest_unit

__all__ = ["AutotuneOptions", "run_autotune", "open_storage", "default_storage_url"]


@dataclass
class AutotuneOptions:
    model: str = "tiny"
    resolution: str | None = None
    trials: int = 30
    timeout: float | None = None
    study_name: str | None = None
    storage: str | None = None
    output_dir: str | None = None
    seed: int = 0
    workers: int = 1
    calibration: str | None = None
    max_rel_error: float | None = None
    progress: bool = True
    # The class that times and checks steps in the worker process (tests pass a faulty one).
    measurer: type = StepMeasurer
    # Seconds to wait for a locked SQLite study before giving up with an error.
    lock_timeout: float = 30.0


class ConfigRejected(Exception):
    """A candidate config that is wrong or crashed the worker: the trial fails with this reason."""


def default_storage_url() -> str:
    import platformdirs

    path = Path(platformdirs.user_cache_dir("sparvar")) / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(url: str | None, lock_timeout: float = 30.0):
    """An Optuna storage for ``url``: ``sqlite:///...``, ``postgresql://...``, or ``journal:PATH``.

    A locked or corrupt storage raises ``SparvarError`` naming it; nothing in it is changed.
    """
    import sqlalchemy.exc

    url = url or default_storage_url()
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal:"):])
            _check_journal(path, url)
            return JournalStorage(JournalFileBackend(str(path)))
        engine = {"connect_args": {"timeout": lock_timeout}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=60, grace_period=180)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise SparvarError(f"study storage {url} cannot be opened: {_first_line(e)}") from None
    except ImportError as e:
        raise SparvarError(f"study storage {url} needs a database driver: {_first_line(e)} "
                           "(for PostgreSQL: pip install 'sparvar[postgres]')") from None
    except (ValueError, OSError, RuntimeError) as e:
        raise SparvarError(f"study storage {url} cannot be opened: {_first_line(e)}") from None


def _check_journal(path: Path, url: str) -> None:
    """Refuse a file that is not Optuna's JSON-lines journal before Optuna appends to it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        first = f.readline()
    try:
        ok = isinstance(json.loads(first), dict)
    except ValueError:
        ok = False
    if not ok:
        raise SparvarError(f"study storage {url} is not an Optuna journal (its first line is not a JSON "
                           "object); the file was left as it is")


def _first_line(e: BaseException) -> str:
    return str(getattr(e, "orig", None) or e).strip().splitlines()[0]


@dataclass
class _Setup:
    preset: object
    schedule: object
    plan: object
    units: list
    space: dict
    spec: MeasurerSpec
    height: int
    width: int
    study_name: str


def _setup(opts: AutotuneOptions) -> _Setup:
    preset = get_model(opts.model)
    h, w = parse_resolution(opts.resolution, preset)
    schedule = resolve_schedule(preset, h, w)
    plan = model_plan(preset, schedule)
    units = plan_units(plan)
    space = SPACE if torch.cuda.is_available() else CPU_SPACE
    spec = MeasurerSpec(plan, schedule.grids, preset.batch, preset.heads, preset.head_dim, opts.seed)
    name = opts.study_name or f"{sanitize(gpu_name())}-{preset.name}-{h}x{w}"
    return _Setup(preset, schedule, plan, units, space, spec, h, w, name)


def _smem_limit() -> int:
    if not torch.cuda.is_available():
        return 1 << 30
    props = torch.cuda.get_device_properties(0)
    return getattr(props, "shared_memory_per_block_optin", 232448)


def _objective(setup: _Setup, worker: BenchWorker, worker_id: int):
    smem = _smem_limit()

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id)
        trial.set_user_attr("gpu", gpu_name())
        trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
        configs = {u.key: suggest_unit(trial, u, setup.space, setup.spec.head_dim, smem) for u in setup.units}
        total = 0.0
        for unit in setup.units:
            m = worker.measure(unit, configs=configs[unit.key])
            if m.status == "compile":
                trial.set_user_attr("pruned_by", f"{unit.key}: does not compile or fit: {m.message[:300]}")
                raise optuna.TrialPruned(f"{unit.key}: {m.status}")
            if m.status != "ok":
                trial.set_user_attr("failure", f"{unit.key}: {m.status}: {m.message[:300]}")
                raise ConfigRejected(f"{unit.key}: {m.status}: {m.message[:300]}")
            trial.set_user_attr(f"ms.{unit.key}", m.ms)
            total += unit.count * m.ms
        return total

    return objective


def _optimize(setup: _Setup, opts: AutotuneOptions, storage_url: str, n_trials: int, worker_id: int) -> None:
    """One worker's share of the trials on the shared study."""
    storage = open_storage(storage_url, opts.lock_timeout)
    study = optuna.load_study(study_name=setup.study_name, storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=opts.seed + worker_id))
    worker = BenchWorker(opts.measurer, (setup.spec,))
    timeout = opts.timeout
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, desc=f"autotune[{worker_id}]", position=worker_id, leave=True)
    start = time.monotonic()

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if bar is None:
            return
        bar.update(1)
        done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        post = {}
        if done:
            first = min(done, key=lambda t: t.number)
            best = min(t.value for t in done)
            post["best_speedup_vs_default"] = f"{first.value / best:.2f}x"
        if timeout:
            post["time_left"] = f"{max(0.0, timeout - (time.monotonic() - start)):.0f}s"
        bar.set_postfix(post)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    try:
        study.optimize(_objective(setup, worker, worker_id), n_trials=n_trials, timeout=timeout,
                       catch=(ConfigRejected,), callbacks=[callback])
    finally:
        worker.close()
        if bar is not None:
            bar.close()


def _worker_process(opts: AutotuneOptions, storage_url: str, n_trials: int, worker_id: int, gpu: int | None) -> None:
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    _optimize(_setup(opts), opts, storage_url, n_trials, worker_id)


def run_autotune(opts: AutotuneOptions) -> tuple[TunedConfig, Path, dict]:
    """Run (or resume) the study, re-measure the best, default and dense in one process, and
    write the tuned config. Returns ``(config, path, summary)``."""
    if opts.trials < 1:
        raise SparvarError(f"--trials must be >= 1, got {opts.trials}")
    if opts.workers < 1:
        raise SparvarError(f"--workers must be >= 1, got {opts.workers}")
    if opts.calibration or opts.max_rel_error is not None:
        from .quality import check_quality_options

        check_quality_options(opts)
    setup = _setup(opts)
    storage_url = opts.storage or default_storage_url()
    storage = open_storage(storage_url, opts.lock_timeout)
    if opts.calibration:
        from .quality import run_quality_search

        return run_quality_search(opts, setup, storage_url)
    study = _create_study(setup, storage, storage_url)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    remaining = max(0, opts.trials - len(finished))
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(default_params(setup.units, setup.space), user_attrs={"default": True})
    if remaining:
        if opts.workers == 1:
            _optimize(setup, opts, storage_url, remaining, 0)
        else:
            _run_workers(opts, storage_url, remaining)
    return _finish(opts, setup, optuna.load_study(study_name=setup.study_name, storage=storage))


def _create_study(setup: _Setup, storage, url: str) -> optuna.Study:
    import sqlalchemy.exc

    try:
        return optuna.create_study(study_name=setup.study_name, storage=storage, direction="minimize",
                                   load_if_exists=True)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise SparvarError(f"study storage {url} cannot be used: {_first_line(e)}") from None
    except (ValueError, KeyError) as e:
        # A journal file that is not Optuna's JSON lines.
        raise SparvarError(f"study storage {url} is not a readable Optuna study (corrupt?): {_first_line(e)}") from None


def _run_workers(opts: AutotuneOptions, storage_url: str, remaining: int) -> None:
    if storage_url.startswith("sqlite"):
        print("note: several workers share SQLite through file locks; use PostgreSQL or a journal file "
              "for workers on several machines")
    n_gpus = torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    procs = []
    for i in range(opts.workers):
        share = remaining // opts.workers + (i < remaining % opts.workers)
        if share == 0:
            continue
        gpu = i % n_gpus if n_gpus else None
        p = ctx.Process(target=_worker_process, args=(opts, storage_url, share, i, gpu))
        p.start()
        procs.append(p)
    failed = []
    for p in procs:
        p.join()
        if p.exitcode != 0:
            failed.append(p.exitcode)
    if failed:
        raise SparvarError(f"{len(failed)} autotune worker(s) exited with codes {failed}; their finished trials "
                           "are kept in the study: rerun the same command to resume")


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


def _finish(opts: AutotuneOptions, setup: _Setup, study: optuna.Study, best: dict | None = None,
            quality: dict | None = None):
    """Re-measure ``best`` (default: the best per unit of ``study``) and write the config."""
    best = best if best is not None else best_per_unit(study, setup.units)
    if len(best) < len(setup.units):
        missing = [u.key for u in setup.units if u.key not in best]
        raise SparvarError(f"no trial produced a working config for {missing}; see the study's failed trials")
    worker = BenchWorker(opts.measurer, (setup.spec,))
    try:
        rows, kernels = _remeasure(setup, worker, best)
    finally:
        worker.close()
    summary = _summary(setup, rows, study)
    config = TunedConfig(model=setup.preset.name, height=setup.height, width=setup.width, plan=setup.plan,
                         kernels=kernels, measured=summary, quality=quality)
    path = config.save(opts.output_dir or user_config_dir())
    return config, path, summary


def _remeasure(setup: _Setup, worker: BenchWorker, best: dict):
    """Best, default and dense times per unit, all measured now in one process."""
    from sparvar.kernels import default_config

    rows, kernels = [], {}
    for unit in setup.units:
        configs = configs_from_params(unit, best[unit.key][1])
        defaults = {launch: default_config(launch) for launch in unit.launches}
        row = {"unit": unit.key, "layers": unit.count, "trial": best[unit.key][2]}
        for name, kind, cfgs in (("best_ms", unit.kind, configs), ("default_ms", unit.kind, defaults),
                                 ("dense_ms", "dense", {})):
            m = worker.measure(kind, unit.step, cfgs)
            if m.status != "ok":
                raise SparvarError(f"re-measuring {name} of {unit.key} failed: {m.status}: {m.message[:200]}")
            row[name] = m.ms
        if row["default_ms"] < row["best_ms"]:
            # Timing noise can make the default win the re-measurement: keep the faster one.
            configs, row["best_ms"], row["trial"] = defaults, row["default_ms"], "default"
        rows.append(row)
        kernels.update({f"{launch}@{unit.step}": cfg for launch, cfg in configs.items()})
    dense_steps = []
    for step in range(setup.schedule.num_scales):
        layers = sum(setup.plan.kind(layer, step) == "dense" for layer in range(setup.plan.depth))
        if layers:
            m = worker.measure("dense", step, {})
            dense_steps.append({"step": step, "layers": layers, "dense_ms": m.ms})
    return {"units": rows, "dense_steps": dense_steps}, kernels


def _summary(setup: _Setup, rows: dict, study: optuna.Study) -> dict:
    units = rows["units"]
    best = sum(r["layers"] * r["best_ms"] for r in units)
    default = sum(r["layers"] * r["default_ms"] for r in units)
    dense = sum(r["layers"] * r["dense_ms"] for r in units)
    dense_steps = sum(r["layers"] * r["dense_ms"] for r in rows["dense_steps"])
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return {
        "device": gpu_name(), "units": units, "dense_steps": rows["dense_steps"],
        "sparse_steps_ms": {"best": best, "default": default, "dense": dense},
        "speedup_sparse_steps_vs_default": default / best, "speedup_sparse_steps_vs_dense": dense / best,
        "generation_attention_ms": {"best": best + dense_steps, "dense": dense + dense_steps},
        "speedup_generation_attention_vs_dense": (dense + dense_steps) / (best + dense_steps),
        "trials": {s: states.count(s) for s in sorted(set(states))},
    }


def format_summary(summary: dict, path: Path) -> str:
    lines = [f"device: {summary['device']}",
             f"{'sparse step':<18} {'layers':>6} {'best ms':>10} {'default ms':>11} {'dense ms':>10} "
             f"{'vs default':>10} {'vs dense':>9}"]
    for r in summary["units"]:
        lines.append(f"{r['unit']:<18} {r['layers']:>6} {r['best_ms']:>10.4f} {r['default_ms']:>11.4f} "
                     f"{r['dense_ms']:>10.4f} {r['default_ms'] / r['best_ms']:>9.2f}x {r['dense_ms'] / r['best_ms']:>8.2f}x")
    s = summary["sparse_steps_ms"]
    lines.append(f"{'all sparse steps':<18} {'':>6} {s['best']:>10.3f} {s['default']:>11.3f} {s['dense']:>10.3f} "
                 f"{summary['speedup_sparse_steps_vs_default']:>9.2f}x {summary['speedup_sparse_steps_vs_dense']:>8.2f}x")
    g = summary["generation_attention_ms"]
    lines.append(f"whole generation's attention: {g['best']:.3f} ms vs dense {g['dense']:.3f} ms "
                 f"({summary['speedup_generation_attention_vs_dense']:.2f}x)")
    lines.append(f"trials: {summary['trials']}")
    lines.append(f"wrote {path}")
    return "\n".join(lines)
