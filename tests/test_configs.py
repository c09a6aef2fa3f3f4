"""Tuned-config files, the loader's search order and fallbacks, the runtime and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sparvar import configs as C
from sparvar.cli import main
from sparvar.configs import SCHEMA_VERSION, TunedConfig, find_config, load_config_file
from sparvar.errors import SparvarError
from sparvar.hardware import gpu_name, sanitize
from sparvar.dispatch import Backend, run_step
from sparvar.kernels import KernelConfig, Launch, LaunchKey
from sparvar.models import get_model, model_plan, resolve_schedule
from sparvar.records import Measured, UnitTiming
from sparvar.reference import CS4AState, plan_densities, step_inputs
from assertions import assert_close
from sparvar.runtime import SparseAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tiny_config(measured=None):
    preset = get_model("tiny")
    plan = model_plan(preset, resolve_schedule(preset, 128, 128))
    return TunedConfig("tiny", 128, 128, plan, {LaunchKey(Launch.CSLA, 5): KernelConfig(32, 16, 4, 2, 4, 8)},
                       measured=measured, heads=preset.heads, head_dim=preset.head_dim)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No user config dir or env dirs from the machine running the tests."""
    monkeypatch.setattr(C, "user_config_dir", lambda: tmp_path / "user")
    monkeypatch.delenv(C.ENV_VAR, raising=False)
    return tmp_path


def test_round_trip(tmp_path):
    cfg = _tiny_config(Measured("cpu", "interpreter", [UnitTiming("csla@5", 3, 0, 1.0, 2.0, 4.0)], [], {"COMPLETE": 1}))
    path = cfg.save(tmp_path)
    assert path == tmp_path / sanitize(gpu_name()) / "tiny_128x128.json"
    again = load_config_file(path)
    assert again.to_dict() == cfg.to_dict()
    assert again.to_dict()["schema_version"] == SCHEMA_VERSION


def test_search_order_env_before_user(isolated, monkeypatch):
    env_dir = isolated / "env"
    cfg = _tiny_config()
    env_path = cfg.save(env_dir)
    cfg.save(isolated / "user")
    monkeypatch.setenv(C.ENV_VAR, str(env_dir))
    choice = find_config("tiny", 128, 128)
    assert choice.path == env_path and "env config for this GPU" in choice.reason


def test_fallback_to_defaults_with_warning(isolated):
    with pytest.warns(UserWarning, match="no tuned config for tiny 128x128"):
        choice = find_config("tiny", 128, 128)
    assert choice.config is None and "built-in defaults" in choice.reason


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(kernels={"csla@5": {"block_m": 48}}), "kernels.csla@5"),
    (lambda d: d["plan"].update(keep_ratio=2.0), "plan"),
    (lambda d: d.update(kernels={"oops@1": {}}), "kernels.oops@1"),
    (lambda d: d.update(kernels={"csla@6": {}}), "kernels.csla@6"),
    (lambda d: d.update(measured={"device": "x"}), "field 'measured' is missing field 'timing'"),
    (lambda d: d["plan"].update(num_scales=7, decision_scale=3), "'plan.num_scales' is 7, but tiny at 128x128 has 6"),
    (lambda d: d["plan"].update(depth=2, bound_layer=1), "'plan.depth' is 2, but tiny has 4 layers"),
    (lambda d: d.update(heads=3), "field 'heads' is 3, but tiny has 2"),
    (lambda d: d.update(height="128"), "'height'"),
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "newer than this sparvar"),
])
def test_malformed_files_warn_name_the_field_and_fall_back(isolated, monkeypatch, mutate, field):
    good = _tiny_config().save(isolated / "env")
    bad_dir = isolated / "bad"
    data = _tiny_config().to_dict()
    mutate(data)
    bad = bad_dir / sanitize(gpu_name()) / "tiny_128x128.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(data))
    monkeypatch.setenv(C.ENV_VAR, f"{bad_dir}:{isolated / 'env'}")
    with pytest.warns(UserWarning, match=field):
        choice = find_config("tiny", 128, 128)
    assert choice.path == good
    assert any(str(bad) in s for s in choice.skipped)
    with pytest.raises(SparvarError, match=field):
        find_config("tiny", 128, 128, strict=True)


def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{")
    with pytest.raises(SparvarError, match="x.json: not valid JSON"):
        load_config_file(p)
    with pytest.raises(SparvarError, match="no such config file"):
        load_config_file(tmp_path / "missing.json")


def test_same_compute_capability_from_another_gpu(isolated, monkeypatch):
    cfg = _tiny_config()
    cfg.gpu = "Some Other GPU"
    path = cfg.save(isolated / "env")
    monkeypatch.setenv(C.ENV_VAR, str(isolated / "env"))
    choice = find_config("tiny", 128, 128)
    assert choice.path == path and "compute capability" in choice.reason


def test_runtime_runs_a_generation_like_the_reference(isolated):
    attn = SparseAttention.for_model("tiny", config_path=_tiny_config().save(isolated / "cfg"))
    s, plan = attn.schedule, attn.plan
    assert attn.configs_at(5)[Launch.CSLA] == KernelConfig(32, 16, 4, 2, 4, 8)
    _, k_all, v_all = step_inputs(s, s.num_scales - 1, 1, 2, 16, seed=0)
    q_all = step_inputs(s, s.num_scales - 1, 1, 2, 16, seed=1)[1]
    for layer in (0, 3):
        attn.new_image()
        for step in range(s.num_scales):
            lo, hi = s.offsets[step], s.offsets[step + 1]
            q, k, v = q_all[:, :, lo:hi], k_all[:, :, :hi], v_all[:, :, :hi]
            out = attn(layer, step, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)).cpu()
            kind, state = plan.kind(layer, step), None
            if kind == "cs4a_sparse":
                # Continue from the kernel's kept sets (near-ties may be ranked apart in float32).
                st = attn.state(layer)
                state = CS4AState(st.decision_scale, st.kept.long().cpu(), st.residual.double().cpu())
            want = run_step(kind, q.double(), k.double(), v.double(), s, step, plan, 1.0, state,
                            backend=Backend.REFERENCE)[0]
            assert_close(f"layer {layer} step {step} ({kind})", out, want, torch.float32)


def test_cli_plan_and_configs(capsys, isolated):
    assert main(["plan", "--model", "infinity-2b"]) == 0
    out = capsys.readouterr().out
    plan = model_plan(get_model("infinity-2b"), resolve_schedule(get_model("infinity-2b"), 1024, 1024))
    last = [r for r in plan_densities(plan, resolve_schedule(get_model("infinity-2b"), 1024, 1024))
            if r.kind == "csla" and r.step == 12][0]
    assert f"{100 * last.density:.2f}%" in out
    assert main(["configs", "--model", "tiny"]) == 0
    assert "built-in defaults" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "nope"], "unknown model 'nope'"),
    (["plan", "--model", "infinity-2b", "--resolution", "100x100"], "no infinity schedule makes a 100x100"),
    (["plan", "--model", "var-d16", "--resolution", "1024"], "VAR models run at 256x256 or 512x512"),
    (["autotune", "--model", "tiny", "--trials", "0"], "--trials must be an int >= 1, got 0"),
    (["autotune", "--model", "tiny", "--max-rel-error", "0.1"], "--calibration and --max-rel-error go together"),
    (["configs", "--model", "tiny", "--config", "/nonexistent.json", "--strict"], "no such config file"),
    (["autotune", "--model", "tiny", "--timeout", "-5"], "--timeout must be a number of seconds > 0, got -5.0"),
    (["autotune", "--model", "tiny", "--workers", "0"], "--workers must be an int >= 1"),
    (["autotune", "--model", "tiny", "--output-dir", "/proc/nope"], "--output-dir /proc/nope cannot be written"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_entry_point_help(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "sparvar")
    # The console script where the package is installed; the module where it is only on the path.
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "sparvar.cli"]
    for sub in ("autotune", "configs", "plan", "bench"):
        out = subprocess.run([*command, sub, "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0 and "usage: sparvar" in out.stdout
        assert "(default: None)" not in out.stdout, out.stdout
        # A description of its own beyond the usage line and the options.
        assert len(out.stdout.split("\n\n")[1].strip()) > 40, out.stdout
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("sparvar ")
