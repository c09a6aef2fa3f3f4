"""What one autotune run works on: the options as given, and the setup derived from them (model,
schedule, plan, units, search space), both checked before any trial runs."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sparvar.errors import SparvarError
from sparvar.hardware import gpu_name, sanitize
from sparvar.kernels import DenseBackend, KernelConfig, dense_backend_for, interpreting
from sparvar.models import ModelPreset, get_model, model_plan, parse_resolution, resolve_schedule
from sparvar.reference import Schedule, SparsityPlan

from .measure import MeasurerSpec, StepMeasurer
from .space import CPU_SPACE, SPACE, Unit, available_space, plan_units

__all__ = ["AutotuneOptions", "TuneSetup", "build_setup", "check_output_dir"]


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

    def check(self) -> None:
        """Raise ``SparvarError`` for an option outside its range (before anything runs)."""
        for name, lo in (("trials", 1), ("workers", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SparvarError(f"--{name} must be an int >= {lo}, got {v!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise SparvarError(f"--timeout must be a number of seconds > 0, got {self.timeout!r}")
        if (self.calibration is None) != (self.max_rel_error is None):
            raise SparvarError("--calibration and --max-rel-error go together: the semantic search needs both")
        if self.max_rel_error is not None and not self.max_rel_error > 0:
            raise SparvarError(f"--max-rel-error must be > 0, got {self.max_rel_error}")


@dataclass
class TuneSetup:
    preset: ModelPreset
    schedule: Schedule
    plan: SparsityPlan
    units: list[Unit]
    space: dict
    spec: MeasurerSpec
    height: int
    width: int
    study_name: str

    def with_plan(self, plan: SparsityPlan) -> "TuneSetup":
        """The same setup for another plan (the semantic search's choice)."""
        from dataclasses import replace

        return replace(self, plan=plan, units=plan_units(plan), spec=replace(self.spec, plan=plan))


def _usable_backends(preset: ModelPreset) -> dict[str, str]:
    """Each dense backend and what runs for it on this machine (the capability check)."""
    device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    probe = torch.empty(1, 1, 1, preset.head_dim, device=device, dtype=dtype)
    return {b.value: dense_backend_for(KernelConfig(backend=b.value), probe)[0].value for b in DenseBackend}


def build_setup(opts: AutotuneOptions) -> TuneSetup:
    preset = get_model(opts.model)
    h, w = parse_resolution(opts.resolution, preset)
    schedule = resolve_schedule(preset, h, w)
    plan = model_plan(preset, schedule)
    usable = [b for b, ran in _usable_backends(preset).items() if b == ran]
    space = available_space(SPACE if torch.cuda.is_available() else CPU_SPACE, usable)
    spec = MeasurerSpec(plan, schedule.grids, preset.batch, preset.heads, preset.head_dim, opts.seed)
    name = opts.study_name or f"{sanitize(gpu_name())}-{preset.name}-{h}x{w}"
    return TuneSetup(preset, schedule, plan, plan_units(plan), space, spec, h, w, name)


def check_output_dir(path: str | Path) -> Path:
    """The directory a config will be written to, created if missing; ``SparvarError`` if it
    cannot be written (checked before the search, which can take hours)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SparvarError(f"--output-dir {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".sparvar-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SparvarError(f"--output-dir {path} cannot be written: {e.strerror or e}") from None
    return path
