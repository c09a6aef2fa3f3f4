"""The autotuner end to end on the tiny model (Triton's interpreter without a GPU)."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

import optuna
import torch
import pytest

from sparvar.autotune.measure import BenchWorker, MeasurerSpec
from sparvar.autotune.setup import AutotuneOptions
from sparvar.autotune.space import CPU_SPACE, SPACE, default_params, param_name, plan_units
from sparvar.autotune.storage import open_storage
from sparvar.autotune.study import run_autotune
from sparvar.configs import load_config_file
from sparvar.errors import SparvarError
from sparvar.models import get_model, model_plan, resolve_schedule
from sparvar.reference import default_plan, infinity_schedule
from fake_measurer import FaultyMeasurer


def test_units_of_the_infinity_plan():
    plan = default_plan(infinity_schedule(), 32)
    cs4a, csla = plan.bound_layer + 1, plan.depth - plan.bound_layer - 1
    assert [(u.key, u.count) for u in plan_units(plan)] == [
        ("cs4a_decide@10", cs4a), ("csla@10", csla), ("cs4a_sparse@11", cs4a), ("csla@11", csla),
        ("cs4a_sparse@12", cs4a), ("csla@12", csla)]


@pytest.mark.parametrize("space", [SPACE, CPU_SPACE])
def test_default_config_is_inside_the_space(space):
    units = plan_units(default_plan(infinity_schedule(), 32))
    params = default_params(units, space)
    for u in units:
        for launch in u.launches:
            names = [n for n in space[launch] if n != "backend"]
            if launch == "cs4a_dense" and "cudnn" in space[launch]["backend"]:
                names = ["backend"]
            for n in names:
                assert param_name(launch, u.step, n) in params


def test_tiny_autotune_writes_a_config_and_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    opts = AutotuneOptions(model="tiny", trials=3, storage=storage, output_dir=str(tmp_path), progress=False)
    config, path, measured = run_autotune(opts)
    assert path == tmp_path / "cpu" / "tiny_128x128.json"
    loaded = load_config_file(path)
    assert loaded.plan == config.plan and set(loaded.kernels) == set(config.kernels)
    assert {"csla@4", "csla@5", "cs4a_dense@3", "cs4a_scores@3", "cs4a_select@3", "cs4a_sparse@5"} <= {
        str(k) for k in loaded.kernels}
    assert measured.trials == {"COMPLETE": 3} and loaded.measured == measured
    assert "interpreter" in measured.timing
    study = optuna.load_study(study_name="cpu-tiny-128x128", storage=storage)
    first = study.trials[0]
    assert first.user_attrs.get("default") is True
    # The same command again resumes: nothing left to run, same study.
    run_autotune(opts)
    assert len(optuna.load_study(study_name="cpu-tiny-128x128", storage=storage).trials) == 3
    run_autotune(AutotuneOptions(**{**opts.__dict__, "trials": 4}))
    assert len(optuna.load_study(study_name="cpu-tiny-128x128", storage=storage).trials) == 4


def test_bad_configs_are_recorded_and_the_study_goes_on(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    opts = AutotuneOptions(model="tiny", trials=14, storage=storage, output_dir=str(tmp_path), progress=False,
                           measurer=FaultyMeasurer, seed=3)
    run_autotune(opts)
    trials = optuna.load_study(study_name="cpu-tiny-128x128", storage=storage).trials
    assert len(trials) == 14
    states = {t.state for t in trials}
    assert optuna.trial.TrialState.COMPLETE in states
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    reasons = " ".join(t.user_attrs.get("failure", "") for t in failed)
    assert failed and pruned
    assert all(t.user_attrs.get("failure") for t in failed)
    assert all(t.user_attrs.get("pruned_by") for t in pruned)
    assert "worker process died" in reasons or "wrong" in reasons


def test_worker_restarts_after_its_process_dies():
    from sparvar.kernels import KernelConfig, Launch

    plan = model_plan(get_model("tiny"), resolve_schedule(get_model("tiny"), 128, 128))
    spec = MeasurerSpec(plan, resolve_schedule(get_model("tiny"), 128, 128).grids, 1, 2, 16)
    worker = BenchWorker(FaultyMeasurer, (spec,))
    try:
        crash = worker.measure("csla", 4, {Launch.CSLA: KernelConfig(16, 16, 4, 1, 4, 4)})
        assert crash.status == "crash" and "exit code 3" in crash.message
        ok = worker.measure("csla", 4, {Launch.CSLA: KernelConfig(32, 32, 4, 1, 4, 8)})
        assert ok.status == "ok" and ok.ms > 0 and worker.restarts == 1
    finally:
        worker.close()


def test_corrupt_and_locked_storage_give_clear_errors(tmp_path):
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SparvarError, match="corrupt.db cannot be"):
        run_autotune(AutotuneOptions(model="tiny", trials=1, storage=f"sqlite:///{bad}", progress=False))
    assert bad.read_bytes().startswith(b"this is not a database")
    locked = tmp_path / "locked.db"
    open_storage(f"sqlite:///{locked}")
    holder = sqlite3.connect(locked)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        opts = AutotuneOptions(model="tiny", trials=1, storage=f"sqlite:///{locked}", progress=False,
                               lock_timeout=0.5)
        with pytest.raises(SparvarError, match="locked"):
            run_autotune(opts)
    finally:
        holder.rollback()
        holder.close()


def _pg_bin(name):
    for d in sorted(os.listdir("/usr/lib/postgresql"), reverse=True) if os.path.isdir("/usr/lib/postgresql") else []:
        p = f"/usr/lib/postgresql/{d}/bin/{name}"
        if os.path.exists(p):
            return p
    return shutil.which(name)


@pytest.fixture
def postgres_url():
    """A PostgreSQL server on loopback in a temporary directory, run as the postgres user."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are missing: .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL server binaries are not installed")
    run_as = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="sparvar-pg-")
    os.chmod(root, 0o777)
    data = os.path.join(root, "data")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(run_as + [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(run_as + [pg_ctl, "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
                             f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(postgres_url, tmp_path):
    sparvar = os.path.join(os.path.dirname(sys.executable), "sparvar")
    out = subprocess.run([sparvar, "autotune", "--model", "tiny", "--trials", "6", "--workers", "2",
                          "--storage", postgres_url, "--output-dir", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    study = optuna.load_study(study_name="cpu-tiny-128x128", storage=postgres_url)
    trials = study.trials
    assert len(trials) == 6
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.is_finished() for t in trials)
    assert {t.user_attrs.get("worker") for t in trials} == {0, 1}
    assert json.loads((tmp_path / "cpu" / "tiny_128x128.json").read_text())["model"] == "tiny"


def test_semantic_search_under_a_quality_bound(tmp_path):
    from sparvar.autotune.quality import make_calibration

    preset = get_model("tiny")
    schedule = resolve_schedule(preset, 128, 128)
    calib = make_calibration(tmp_path / "calib.pt", schedule, layers=[0, 3], heads=2, head_dim=16)
    opts = AutotuneOptions(model="tiny", trials=4, storage=f"sqlite:///{tmp_path}/s.db", output_dir=str(tmp_path),
                           progress=False, calibration=str(calib), max_rel_error=1.5)
    config, path, measured = run_autotune(opts)
    assert config.quality.bound == 1.5 and config.quality.measured <= 1.5
    assert path.with_suffix(".pareto.png").stat().st_size > 1000
    study = optuna.load_study(study_name="cpu-tiny-128x128-semantic", storage=opts.storage)
    assert len(study.directions) == 2 and len(study.trials) == 4
    assert load_config_file(path).quality == config.quality
    with pytest.raises(SparvarError, match="no plan met --max-rel-error"):
        run_autotune(AutotuneOptions(**{**opts.__dict__, "max_rel_error": 1e-12, "study_name": "strict"}))


def test_bad_calibration_file_is_named(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"layers": {0: {}}}, bad)
    opts = AutotuneOptions(model="tiny", trials=1, storage=f"sqlite:///{tmp_path}/s.db", progress=False,
                           calibration=str(bad), max_rel_error=0.5)
    with pytest.raises(SparvarError, match="layer 0 needs q, k, v tensors at step 2"):
        run_autotune(opts)


@pytest.mark.slow
def test_readme_main_command_runs_on_cpu(tmp_path):
    """The README's first set-up command's job, as a user runs it: default storage and output."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "sparvar autotune --model tiny" in l)
    argv = line.split("&&")[-1].split("#")[0].split()
    assert argv[:2] == ["sparvar", "autotune"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    sparvar = os.path.join(os.path.dirname(sys.executable), "sparvar")
    t0 = time.monotonic()
    out = subprocess.run([sparvar, *argv[1:], "--no-progress"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "whole generation's attention" in out.stdout
    written = list((tmp_path / "config").rglob("tiny_128x128.json"))
    assert len(written) == 1 and list((tmp_path / "cache").rglob("studies.db"))
    # Loaded by the runtime from the user's config directory.
    check = subprocess.run([sparvar, "configs", "--model", "tiny"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "user config for this GPU" in check.stdout, check.stdout
    assert time.monotonic() - t0 < 600


def test_corrupt_journal_is_named(tmp_path):
    bad = tmp_path / "bad.journal"
    bad.write_text("garbage\n")
    with pytest.raises(SparvarError, match="bad.journal is not an Optuna journal"):
        run_autotune(AutotuneOptions(model="tiny", trials=1, storage=f"journal:{bad}", progress=False))
    assert bad.read_text() == "garbage\n"
