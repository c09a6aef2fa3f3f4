"""Tuned configs: ``tuned_configs/<sanitised GPU name>/<model>_<h>x<w>.json`` and the loader.

Search order for the current GPU, model and resolution: an explicit path; each directory in
``SPARVAR_CONFIG_PATH`` (``os.pathsep``-separated); the user's config directory; the configs
shipped in the package. Then any config for the same compute capability in those places; then
the built-in defaults, with a warning. A malformed or incompatible file is skipped with a warning
naming the file and field (an error with ``strict=True``); a newer schema version is refused.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from sparvar.kernels import KernelConfig, LaunchKey
from sparvar.reference import SparsityPlan

from .errors import SparvarError
from .hardware import compute_capability, gpu_name, sanitize, software_versions
from .models import ModelPreset, get_model, resolve_schedule
from .records import Measured, Quality

__all__ = ["SCHEMA_VERSION", "TunedConfig", "ConfigChoice", "config_filename", "search_dirs",
           "find_config", "load_config_file", "user_config_dir", "ENV_VAR", "check_fits", "write_json_atomic"]

# Version 2 records the model's heads and head dim and how times were measured; version 1 files
# are read as they are (their times were eager do_bench medians).
SCHEMA_VERSION = 2
ENV_VAR = "SPARVAR_CONFIG_PATH"


def user_config_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("sparvar")) / "tuned_configs"


def write_json_atomic(path: Path, data, indent: int = 2) -> Path:
    """Write ``data`` as JSON to ``path`` (its folder made if needed) through a temporary file
    renamed over it, so that a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    tmp.replace(path)
    return path


@dataclass
class TunedConfig:
    """Plan and kernel parameters for one (GPU, model, resolution), with what was measured.

    ``kernels`` maps a ``LaunchKey`` (a launch at a query scale) to a ``KernelConfig``;
    ``heads``/``head_dim`` are the model's (``None`` in version 1 files).
    """

    model: str
    height: int
    width: int
    plan: SparsityPlan
    kernels: dict[LaunchKey, KernelConfig]
    gpu: str = field(default_factory=gpu_name)
    compute_capability: str = field(default_factory=compute_capability)
    versions: dict = field(default_factory=software_versions)
    measured: Measured | None = None
    quality: Quality | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))
    heads: int | None = None
    head_dim: int | None = None

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION, "gpu": self.gpu, "compute_capability": self.compute_capability,
            **{k: self.versions.get(k) for k in ("torch", "triton", "cuda")},
            "model": self.model, "height": self.height, "width": self.width, "heads": self.heads,
            "head_dim": self.head_dim, "created": self.created, "plan": self.plan.to_dict(),
            "kernels": {str(k): c.to_dict() for k, c in sorted(self.kernels.items())},
            "measured": self.measured.to_dict() if self.measured else None,
            "quality": self.quality.to_dict() if self.quality else None,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/<gpu>/<model>_<h>x<w>.json`` atomically (a temporary file renamed
        over the target, so a reader never sees half a file)."""
        return write_json_atomic(Path(directory) / sanitize(self.gpu) /
                                 config_filename(self.model, self.height, self.width), self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "TunedConfig":
        """Validate and build; ``ValueError`` names the field that is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"top level must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"field 'schema_version' must be an int >= 1, got {version!r}")
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(f"field 'schema_version' is {version}, newer than this sparvar's "
                                   f"{SCHEMA_VERSION}: upgrade sparvar to read it")
        for name, typ in (("model", str), ("height", int), ("width", int), ("gpu", str),
                          ("compute_capability", str), ("plan", dict), ("kernels", dict)):
            if isinstance(data.get(name), bool) or not isinstance(data.get(name), typ):
                raise ValueError(f"field {name!r} must be {typ.__name__}, got {data.get(name)!r}")
        for name in ("heads", "head_dim"):
            v = data.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"field {name!r} must be a positive int or null, got {v!r}")
        try:
            plan = SparsityPlan.from_dict(data["plan"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"field 'plan': {e}") from None
        kernels = {}
        for key, cfg in data["kernels"].items():
            try:
                kernels[LaunchKey.parse(key, plan.num_scales)] = KernelConfig.from_dict(cfg)
            except (ValueError, TypeError) as e:
                raise ValueError(f"field 'kernels.{key}': {e}") from None
        measured = Measured.from_dict(data["measured"], version) if data.get("measured") else None
        quality = Quality.from_dict(data["quality"]) if data.get("quality") else None
        return cls(model=data["model"], height=data["height"], width=data["width"], plan=plan, kernels=kernels,
                   gpu=data["gpu"], compute_capability=data["compute_capability"],
                   versions={k: data.get(k) for k in ("torch", "triton", "cuda")},
                   measured=measured, quality=quality, created=data.get("created", ""),
                   heads=data.get("heads"), head_dim=data.get("head_dim"))


def check_fits(config: TunedConfig, preset: ModelPreset, height: int, width: int) -> None:
    """Raise ``ValueError`` naming the field in which ``config`` does not fit the model it is
    loaded for: model and image size, the schedule's scales, depth, heads and head dim (where
    the file records them). A config that fits is applied whole, never in part."""
    if (config.model, config.height, config.width) != (preset.name, height, width):
        raise ValueError(f"fields 'model'/'height'/'width' say {config.model} {config.height}x{config.width}, "
                         f"not {preset.name} {height}x{width}")
    schedule = resolve_schedule(preset, height, width)
    if config.plan.num_scales != schedule.num_scales:
        raise ValueError(f"field 'plan.num_scales' is {config.plan.num_scales}, but {preset.name} at "
                         f"{height}x{width} has {schedule.num_scales} scales")
    if config.plan.depth != preset.depth:
        raise ValueError(f"field 'plan.depth' is {config.plan.depth}, but {preset.name} has {preset.depth} layers")
    for name in ("heads", "head_dim"):
        got = getattr(config, name)
        if got is not None and got != getattr(preset, name):
            raise ValueError(f"field {name!r} is {got}, but {preset.name} has {getattr(preset, name)}")


class NewerSchemaError(ValueError):
    pass


def config_filename(model: str, height: int, width: int) -> str:
    return f"{model}_{height}x{width}.json"


def load_config_file(path: str | Path) -> TunedConfig:
    """Read and validate one file; ``SparvarError`` names the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SparvarError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SparvarError(f"{path}: cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise SparvarError(f"{path}: not valid JSON: {e}") from None
    try:
        return TunedConfig.from_dict(data)
    except ValueError as e:
        raise SparvarError(f"{path}: {e}") from None


@dataclass
class ConfigChoice:
    """The config the runtime uses and why; ``config`` is ``None`` for built-in defaults."""

    config: TunedConfig | None
    path: Path | None
    reason: str
    skipped: list[str] = field(default_factory=list)


def search_dirs() -> list[tuple[str, Path]]:
    """``(origin, directory)`` in search order (see the module docstring)."""
    out = [("env", Path(p)) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    out.append(("user", user_config_dir()))
    out.append(("shipped", Path(str(importlib.resources.files("sparvar.tuned_configs")))))
    return out


def find_config(model: str, height: int, width: int, path: str | Path | None = None,
                strict: bool = False) -> ConfigChoice:
    """Pick the tuned config for this GPU, model and resolution (module docstring)."""
    skipped: list[str] = []
    preset = get_model(model)

    def load(p: Path) -> TunedConfig | None:
        try:
            cfg = load_config_file(p)
            check_fits(cfg, preset, height, width)
            return cfg
        except (SparvarError, ValueError) as e:
            msg = str(e) if isinstance(e, SparvarError) else f"{p}: {e}"
            if strict:
                raise SparvarError(msg) from None
            skipped.append(msg)
            warnings.warn(f"skipping config {msg}", stacklevel=3)
            return None

    if path is not None:
        cfg = load(Path(path))
        if cfg is not None:
            return ConfigChoice(cfg, Path(path), "explicit path", skipped)
    name = config_filename(model, height, width)
    gpu_dir = sanitize(gpu_name())
    for origin, d in search_dirs():
        p = d / gpu_dir / name
        if p.is_file() and (cfg := load(p)) is not None:
            return ConfigChoice(cfg, p, f"{origin} config for this GPU ({gpu_name()})", skipped)
    cc = compute_capability()
    for origin, d in search_dirs():
        for p in sorted(d.glob(f"*/{name}")) if d.is_dir() else []:
            try:
                same_cc = json.loads(p.read_text()).get("compute_capability") == cc
            except (OSError, ValueError, AttributeError):
                same_cc = False
            if same_cc and (cfg := load(p)) is not None:
                return ConfigChoice(cfg, p, f"{origin} config of another GPU with compute capability {cc}", skipped)
    warnings.warn(f"no tuned config for {model} {height}x{width} on {gpu_name()}; using built-in defaults "
                  f"(run `sparvar autotune --model {model} --resolution {height}x{width}`)", stacklevel=2)
    return ConfigChoice(None, None, "built-in defaults (no tuned config found)", skipped)
