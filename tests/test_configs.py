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
from sparvar.kernels import KernelConfig
from sparvar.models import get_model, model_plan, resolve_schedule
from sparvar.reference import CS4AState, attention_step
from sparvar.runtime import SparseAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tiny_config(**measured):
    preset = get_model("tiny")
    plan = model_plan(preset, resolve_schedule(preset, 128, 128))
    return TunedConfig("tiny", 128, 128, plan, {"csla@5": KernelConfig(32, 16, 4, 2, 4, 8)}, measured=measured)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No user config dir or env dirs from the machine running the tests."""
    monkeypatch.setattr(C, "user_config_dir", lambda: tmp_path / "user")
    monkeypatch.delenv(C.ENV_VAR, raising=False)
    return tmp_path


def test_round_trip(tmp_path):
    cfg = _tiny_config(speedup=1.5)
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
    assert attn.kernel_configs(5)["csla"] == KernelConfig(32, 16, 4, 2, 4, 8)
    g = torch.Generator().manual_seed(0)
    for layer in (0, 3):
        state = None
        attn.new_image()
        for step in range(s.num_scales):
            q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (s.sizes[step], s.num_keys(step), s.num_keys(step)))
            out = attn(layer, step, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)).cpu()
            want, state = attention_step(plan, s, layer, step, q.double(), k.double(), v.double(), 1.0, state)
            if plan.kind(layer, step) == "cs4a_decide":
                # Continue from the kernel's kept sets (near-ties may be ranked apart in float32).
                kernel_state = attn._states[layer]
                state = CS4AState(kernel_state.decision_scale, kernel_state.kept.long().cpu(),
                                  kernel_state.residual.double().cpu())
            assert ((out.double() - want).norm() / want.norm()) < 1e-4, (layer, step, plan.kind(layer, step))


def test_cli_plan_and_configs(capsys, isolated):
    assert main(["plan", "--model", "infinity-2b"]) == 0
    out = capsys.readouterr().out
    assert "csla" in out and "1.92%" in out
    assert main(["configs", "--model", "tiny"]) == 0
    assert "built-in defaults" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "nope"], "unknown model 'nope'"),
    (["plan", "--model", "infinity-2b", "--resolution", "100x100"], "no infinity schedule makes a 100x100"),
    (["plan", "--model", "var-d16", "--resolution", "1024"], "VAR models run at 256x256 or 512x512"),
    (["autotune", "--model", "tiny", "--trials", "0"], "--trials must be >= 1"),
    (["autotune", "--model", "tiny", "--max-rel-error", "0.1"], "--calibration and --max-rel-error go together"),
    (["configs", "--model", "tiny", "--config", "/nonexistent.json", "--strict"], "no such config file"),
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
