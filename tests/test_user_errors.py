"""What a user can get wrong ends in one clear line, with every file left as it was (one test per
case found by trying the tool as a new user would)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import torch

from sparvar import configs as C
from sparvar.autotune.setup import AutotuneOptions, build_setup
from sparvar.autotune.study import _warn_if_slow_on_cpu, interpreter_estimate_s
from sparvar.cli import main
from sparvar.configs import TunedConfig
from sparvar.hardware import gpu_name, sanitize
from sparvar.kernels import KernelConfig, Launch, LaunchKey
from sparvar.models import get_model, model_plan, resolve_schedule
from sparvar.runtime import SparseAttention


def one_line_error(capsys, argv, message) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _autotune(tmp_path, *extra):
    return ["autotune", "--model", "tiny", "--trials", "1", "--output-dir", str(tmp_path / "out"), "--no-progress",
            *extra]


def test_journal_that_is_not_optunas_is_refused_and_unchanged(tmp_path, capsys):
    path = tmp_path / "f.journal"
    path.write_text('{"a": 1}\n')
    one_line_error(capsys, _autotune(tmp_path, "--storage", f"journal:{path}"), "is not an Optuna journal (line 1")
    assert path.read_text() == '{"a": 1}\n'


def test_journal_with_a_cut_last_record_is_refused_and_unchanged(tmp_path, capsys):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = tmp_path / "s.journal"
    study = optuna.create_study(study_name="x", storage=JournalStorage(JournalFileBackend(str(path))))
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # a writer killed mid-record
    before = path.read_bytes()
    one_line_error(capsys, _autotune(tmp_path, "--storage", f"journal:{path}"), "its last record is incomplete")
    assert path.read_bytes() == before


def test_sqlite_file_that_is_not_a_study_is_refused_and_unchanged(tmp_path, capsys):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE photos (name TEXT)")
    con.commit()
    con.close()
    before = path.read_bytes()
    one_line_error(capsys, _autotune(tmp_path, "--storage", f"sqlite:///{path}"), "without Optuna's tables")
    assert path.read_bytes() == before


def _config_file(tmp_path, **plan_changes) -> None:
    preset = get_model("tiny")
    plan = model_plan(preset, resolve_schedule(preset, 128, 128))
    data = TunedConfig("tiny", 128, 128, plan, {LaunchKey(Launch.CSLA, 5): KernelConfig(32, 16, 4, 2, 4, 8)},
                       heads=preset.heads, head_dim=preset.head_dim).to_dict()
    data["plan"].update(plan_changes)
    path = tmp_path / "cfgs" / sanitize(gpu_name()) / "tiny_128x128.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, field", [
    ({"num_scales": 7, "decision_scale": 4}, "'plan.num_scales' is 7, but tiny at 128x128 has 6 scales"),
    ({"depth": 2, "bound_layer": 1}, "'plan.depth' is 2, but tiny has 4 layers"),
])
def test_config_for_another_schedule_or_depth_is_skipped_or_refused(tmp_path, capsys, monkeypatch, changes, field):
    _config_file(tmp_path, **changes)
    monkeypatch.setenv(C.ENV_VAR, str(tmp_path / "cfgs"))
    one_line_error(capsys, ["configs", "--model", "tiny", "--strict"], field)
    assert main(["configs", "--model", "tiny"]) == 0
    assert "skipped: " in capsys.readouterr().out
    with pytest.warns(UserWarning, match=field):
        attn = SparseAttention.for_model("tiny")
    # The model's own default plan, whole, never the file's in part.
    assert attn.choice.config is None and attn.plan.num_scales == 6 and attn.plan.depth == 4


def test_output_dir_that_cannot_be_written_is_refused_before_the_search(tmp_path, capsys):
    storage = tmp_path / "s.db"
    one_line_error(capsys, ["autotune", "--model", "tiny", "--output-dir", "/proc/nope", "--storage",
                            f"sqlite:///{storage}"], "--output-dir /proc/nope cannot be written")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(capsys, ["autotune", "--model", "tiny", "--output-dir", str(a_file), "--storage",
                            f"sqlite:///{storage}"], "is a file, not a directory")
    assert not storage.exists() and a_file.read_text() == "x"


def test_negative_timeout_is_refused(tmp_path, capsys):
    one_line_error(capsys, _autotune(tmp_path, "--timeout", "-5"), "--timeout must be a number of seconds > 0")


def test_calibration_file_of_the_wrong_form_is_named(tmp_path, capsys):
    text = tmp_path / "some.txt"
    text.write_text("not a tensor file\n")
    one_line_error(capsys, _autotune(tmp_path, "--calibration", str(text), "--max-rel-error", "0.05"),
                   "is not a torch.save file")
    wrong = tmp_path / "wrong.pt"
    torch.save({"layers": {0: {3: {"q": torch.zeros(1, 1, 5, 16)}}}}, wrong)
    one_line_error(capsys, _autotune(tmp_path, "--calibration", str(wrong), "--max-rel-error", "0.05"),
                   "layer 0 needs q, k, v tensors at step 2")


@pytest.mark.slow
def test_ctrl_c_during_autotune_prints_one_line_and_keeps_the_trials(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    command = [sys.executable, "-m", "sparvar.cli", *_autotune(tmp_path, "--storage", storage)]
    command[command.index("--trials") + 1] = "50"
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1)
        # A short read-only look (Optuna's storage would open a writing connection each time and
        # compete with the run for the database lock).
        try:
            con = sqlite3.connect(f"file:{tmp_path}/s.db?mode=ro", uri=True, timeout=0.1)
            try:
                done = con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:  # the study may not exist yet
            continue
        if done:
            break
    # Ctrl-C in a terminal reaches the whole foreground process group.
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if not line.startswith("study ")]
    assert lines == ["sparvar: interrupted; finished trials are kept in the study: run the same command to resume"], err
    trials = optuna.load_study(study_name="cpu-tiny-128x128", storage=storage).trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("interrupted")]


def test_large_model_on_the_cpu_warns_with_an_estimate_first(capsys):
    if torch.cuda.is_available():
        pytest.skip("the warning is for machines without a GPU")
    setup = build_setup(AutotuneOptions(model="infinity-2b"))
    assert interpreter_estimate_s(setup) > 60
    _warn_if_slow_on_cpu(setup, 6)
    err = capsys.readouterr().err
    assert "runs in Triton's interpreter: about" in err and "min per trial" in err and "--model tiny" in err
    _warn_if_slow_on_cpu(build_setup(AutotuneOptions(model="tiny")), 6)
    assert capsys.readouterr().err == ""


def test_end_to_end_benchmark_names_a_model_it_cannot_run_and_writes_nothing(tmp_path, capsys):
    """``sparvar bench e2e`` times the official code, which exists for Infinity and VAR only: any
    other preset, an unknown name or a malformed resolution is named before anything runs."""
    for argv, message in ((["--models", "tiny"], "runs the official code's models"),
                          (["--models", "nope"], "unknown model 'nope'"),
                          (["--models", "infinity-2b", "--resolutions", "12x"], "resolution must look like")):
        one_line_error(capsys, ["bench", "e2e", *argv, "--out", str(tmp_path)], message)
    assert not any(tmp_path.iterdir())
