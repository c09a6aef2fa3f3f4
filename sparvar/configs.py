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

from sparvar.kernels.config import STEP_KINDS, KernelConfig
from sparvar.reference import SparsityPlan

from .errors import SparvarError
from .hardware import compute_capability, gpu_name, sanitize, software_versions

__all__ = ["SCHEMA_VERSION", "TunedConfig", "ConfigChoice", "config_filename", "search_dirs",
           "find_config", "load_config_file", "user_config_dir", "ENV_VAR"]

SCHEMA_VERSION = 1
ENV_VAR = "SPARVAR_CONFIG_PATH"


def user_config_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("sparvar")) / "tuned_configs"


@dataclass
class TunedConfig:
    """Plan and kernel parameters for one (GPU, model, resolution), with what was measured.

    ``kernels`` maps a step key ``"<kind>@<scale>"`` (kind in ``STEP_KINDS``) to a ``KernelConfig``.
    """

    model: str
    height: int
    width: int
    plan: SparsityPlan
    kernels: dict[str, KernelConfig]
    gpu: str = field(default_factory=gpu_name)
    compute_capability: str = field(default_factory=compute_capability)
    versions: dict = field(default_factory=software_versions)
    measured: dict = field(default_factory=dict)
    quality: dict | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))

    def kernel_config(self, kind: str, step: int) -> KernelConfig | None:
        return self.kernels.get(f"{kind}@{step}")

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION, "gpu": self.gpu, "compute_capability": self.compute_capability,
            **{k: self.versions.get(k) for k in ("torch", "triton", "cuda")},
            "model": self.model, "height": self.height, "width": self.width, "created": self.created,
            "plan": self.plan.to_dict(), "kernels": {k: c.to_dict() for k, c in sorted(self.kernels.items())},
            "measured": self.measured, "quality": self.quality,
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / sanitize(self.gpu) / config_filename(self.model, self.height, self.width)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "TunedConfig":
        """Validate and build; ``ValueError`` names the field that is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"top level must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ValueError(f"field 'schema_version' must be an int, got {version!r}")
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(f"field 'schema_version' is {version}, newer than this sparvar's "
                                   f"{SCHEMA_VERSION}: upgrade sparvar to read it")
        for name, typ in (("model", str), ("height", int), ("width", int), ("gpu", str),
                          ("compute_capability", str), ("plan", dict), ("kernels", dict)):
            if not isinstance(data.get(name), typ):
                raise ValueError(f"field {name!r} must be {typ.__name__}, got {data.get(name)!r}")
        try:
            plan = SparsityPlan.from_dict(data["plan"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"field 'plan': {e}") from None
        kernels = {}
        for key, cfg in data["kernels"].items():
            kind, _, step = key.partition("@")
            if kind not in STEP_KINDS or not step.isdigit() or int(step) >= plan.num_scales:
                raise ValueError(f"field 'kernels.{key}': key must be <kind>@<scale> with kind in "
                                 f"{list(STEP_KINDS)} and scale < {plan.num_scales}")
            try:
                kernels[key] = KernelConfig.from_dict(cfg)
            except (ValueError, TypeError) as e:
                raise ValueError(f"field 'kernels.{key}': {e}") from None
        return cls(model=data["model"], height=data["height"], width=data["width"], plan=plan, kernels=kernels,
                   gpu=data["gpu"], compute_capability=data["compute_capability"],
                   versions={k: data.get(k) for k in ("torch", "triton", "cuda")},
                   measured=data.get("measured") or {}, quality=data.get("quality"),
                   created=data.get("created", ""))


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

    def load(p: Path) -> TunedConfig | None:
        try:
            cfg = load_config_file(p)
        except SparvarError as e:
            if strict:
                raise
            skipped.append(str(e))
            warnings.warn(f"skipping config {e}", stacklevel=3)
            return None
        if (cfg.model, cfg.height, cfg.width) != (model, height, width):
            msg = f"{p}: fields 'model'/'height'/'width' say {cfg.model} {cfg.height}x{cfg.width}, not {model} {height}x{width}"
            if strict:
                raise SparvarError(msg)
            skipped.append(msg)
            warnings.warn(f"skipping config {msg}", stacklevel=3)
            return None
        return cfg

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
