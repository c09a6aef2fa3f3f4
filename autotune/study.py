"""``sparvar autotune``: an Optuna study over the kernels' speed parameters for one GPU, model and
resolution, and the tuned config it writes.

The objective is the attention time of one whole generation's sparse steps: each unit
(``space.plan_units``) is timed once (CUDA graph replays) and weighted by how many layers run
it. Trials run in this process; each measurement runs in a spawned ``BenchWorker`` that is
restarted after a fault. The default config is the first trial. Everything the run needs
(options, output directory, calibration file, storage) is checked before the first trial.
Studies live in SQLite in the user's cache directory unless ``--storage`` names a PostgreSQL URL
or a journal file; ``--workers N`` runs N processes (one per visible GPU) on one shared study.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import warnings

import optuna
import torch

from sparvar.configs import user_config_dir
from sparvar.errors import SparvarError
from sparvar.hardware import gpu_name

from .measure import BenchWorker
from .quality import load_calibration, run_quality_search
from .result import finish, format_summary
from .setup import AutotuneOptions, TuneSetup, build_setup, check_output_dir
from .space import default_params, suggest_unit
from .storage import create_study, default_storage_url, open_storage

__all__ = ["AutotuneOptions", "run_autotune", "format_summary", "interpreter_estimate_s"]


class ConfigRejected(Exception):
    """A candidate config that is wrong or crashed the worker: the trial fails with this reason."""


def _smem_limit() -> int:
    if not torch.cuda.is_available():
        return 1 << 30
    props = torch.cuda.get_device_properties(0)
    return getattr(props, "shared_memory_per_block_optin", 232448)


def _counted(t: optuna.trial.FrozenTrial) -> bool:
    """Trials that count toward ``--trials``: finished, and not stopped by Ctrl-C."""
    return t.state.is_finished() and not t.user_attrs.get("interrupted")


def _objective(setup: TuneSetup, worker: BenchWorker, worker_id: int):
    smem = _smem_limit()

    def objective(trial: optuna.Trial) -> float:
        try:
            trial.set_user_attr("worker", worker_id)
            trial.set_user_attr("gpu", gpu_name())
            trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
            configs = {u.key: suggest_unit(trial, u, setup.space, setup.spec.head_dim, smem) for u in setup.units}
            total = 0.0
            for unit in setup.units:
                m = worker.measure(unit.kind, unit.step, configs[unit.key])
                if m.backend:
                    trial.set_user_attr(f"backend.{unit.key}", m.backend)
                if m.status == "compile":
                    trial.set_user_attr("pruned_by", f"{unit.key}: does not compile or fit: {m.message[:300]}")
                    raise optuna.TrialPruned(f"{unit.key}: {m.status}")
                if m.status != "ok":
                    trial.set_user_attr("failure", f"{unit.key}: {m.status}: {m.message[:300]}")
                    raise ConfigRejected(f"{unit.key}: {m.status}: {m.message[:300]}")
                trial.set_user_attr(f"ms.{unit.key}", m.ms)
                trial.set_user_attr("timing", m.method)
                total += unit.count * m.ms
            return total
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise

    return objective


def _optimize(setup: TuneSetup, opts: AutotuneOptions, storage_url: str, n_trials: int, worker_id: int) -> None:
    """One worker's share of the trials on the shared study."""
    storage = open_storage(storage_url, opts.lock_timeout, check=False)
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

    # Failed and pruned trials keep their reason in the study; Optuna's own log lines (a
    # traceback per failed trial) would bury the progress bar.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
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
    try:
        _optimize(build_setup(opts), opts, storage_url, n_trials, worker_id)
    except KeyboardInterrupt:
        # The parent prints the one line about it.
        sys.exit(130)


def interpreter_estimate_s(setup: TuneSetup) -> float:
    """Seconds one trial would take in Triton's interpreter, from a probe of the tiny model's
    last CSLA step scaled by the pairs of attention (times head dim) a trial computes."""
    import sparvar.kernels as K
    import sparvar.reference as R
    from sparvar.models import get_model, model_plan, resolve_schedule

    tiny = get_model("tiny")
    s = resolve_schedule(tiny, 128, 128)
    step = s.num_scales - 1
    q, k, v = R.step_inputs(s, step, tiny.batch, tiny.heads, tiny.head_dim)
    params = model_plan(tiny, s).csla
    K.csla_attention(q, k, v, s, step, params)
    t0 = time.perf_counter()
    K.csla_attention(q, k, v, s, step, params)
    rate = R.csla_pairs(s, step, params) * tiny.batch * tiny.heads * tiny.head_dim / (time.perf_counter() - t0)
    work = 0.0
    for unit in setup.units:
        nq, nk = setup.schedule.num_queries(unit.step), setup.schedule.num_keys(unit.step)
        if unit.kind == R.StepKind.CSLA:
            pairs = R.csla_pairs(setup.schedule, unit.step, setup.plan.csla)
        elif unit.kind == R.StepKind.CS4A_SPARSE:
            pairs = R.cs4a_pairs(setup.schedule, unit.step, setup.plan.cs4a)
        else:
            # dense with log-sum-exp, column scores, selection
            pairs = 2 * nq * nk + R.cs4a_pairs(setup.schedule, unit.step, setup.plan.cs4a)
        work += pairs * setup.preset.batch * setup.preset.heads * setup.preset.head_dim
    return work / rate


def _warn_if_slow_on_cpu(setup: TuneSetup, trials: int) -> None:
    if torch.cuda.is_available() or setup.preset.name == "tiny":
        return
    per_trial = interpreter_estimate_s(setup)
    if per_trial > 60:
        print(f"warning: no GPU here, so {setup.preset.name} runs in Triton's interpreter: about "
              f"{per_trial / 60:.0f} min per trial by a quick probe ({trials} trials: about "
              f"{trials * per_trial / 3600:.1f} h), and its timings say nothing about a GPU. "
              "Tune on a GPU, or try the pipeline with --model tiny.", file=sys.stderr, flush=True)


def run_autotune(opts: AutotuneOptions):
    """Run (or resume) the study, re-measure the best, default and dense in one process, and
    write the tuned config. Returns ``(config, path, measured)``."""
    opts.check()
    # Optuna's own INFO lines (a new study, each trial) would interleave with ours.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup = build_setup(opts)
    check_output_dir(opts.output_dir or user_config_dir())
    calibration = load_calibration(opts.calibration, setup.schedule, setup.plan.depth,
                                   setup.preset.name) if opts.calibration else None
    storage_url = opts.storage or default_storage_url()
    storage = open_storage(storage_url, opts.lock_timeout)
    _warn_if_slow_on_cpu(setup, opts.trials)
    if calibration is not None:
        return run_quality_search(opts, setup, storage_url, calibration)
    study = create_study(setup.study_name, storage, storage_url, direction="minimize")
    print(f"study {setup.study_name!r} in {storage_url}", file=sys.stderr, flush=True)
    remaining = max(0, opts.trials - sum(_counted(t) for t in study.get_trials(deepcopy=False)))
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(default_params(setup.units, setup.space), user_attrs={"default": True})
    if remaining:
        if opts.workers == 1:
            _optimize(setup, opts, storage_url, remaining, 0)
        else:
            _run_workers(opts, storage_url, remaining)
    return finish(opts, setup, optuna.load_study(study_name=setup.study_name, storage=storage))


def _run_workers(opts: AutotuneOptions, storage_url: str, remaining: int) -> None:
    if storage_url.startswith("sqlite"):
        print("note: several workers share SQLite through file locks; use PostgreSQL or a journal file "
              "for workers on several machines", file=sys.stderr)
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
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        raise
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise SparvarError(f"{len(failed)} autotune worker(s) exited with codes {failed}; their finished trials "
                           "are kept in the study: rerun the same command to resume")

