"""Model presets: depth, heads and head dim of the models SparVAR tunes for, and their schedules."""

from __future__ import annotations

from dataclasses import dataclass, replace

from sparvar.reference import Schedule, default_plan, infinity_schedule, schedule_for_pixels, var_schedule

from .errors import SparvarError

__all__ = ["ModelPreset", "MODELS", "get_model", "resolve_schedule", "parse_resolution", "model_plan"]


@dataclass(frozen=True)
class ModelPreset:
    """``batch`` is 2 for classifier-free guidance (conditional and unconditional rows)."""

    name: str
    family: str
    depth: int
    heads: int
    head_dim: int
    batch: int = 2
    default_resolution: str = "1024x1024"
    # Last CS4A layer; None: the plan's default (10, or the last layer of shallower models).
    bound_layer: int | None = None
    # Whether the pipeline has an image decoder (generate writes images).
    decoder: bool = False


MODELS = {
    "infinity-2b": ModelPreset("infinity-2b", "infinity", 32, 16, 128),
    "infinity-8b": ModelPreset("infinity-8b", "infinity", 40, 28, 128),
    **{f"var-d{d}": ModelPreset(f"var-d{d}", "var", d, d, 64, default_resolution="256x256")
       for d in (16, 20, 24, 30)},
    # A small model for CPU runs through Triton's interpreter (CI, first contact).
    "tiny": ModelPreset("tiny", "tiny", 4, 2, 16, batch=1, default_resolution="128x128", bound_layer=1),
    # The model trained here (sparvar.small): 256x256 images from 4x4-pixel tokens on Infinity's
    # 1024 token schedule. CS4A on its first 4 of 12 layers, the share Infinity's default plan
    # gives it (11 of 32).
    "small": ModelPreset("small", "small", 12, 3, 128, default_resolution="256x256", bound_layer=3,
                         decoder=True),
}

_TINY = Schedule([(1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)], name="tiny-128")
_SMALL = Schedule(infinity_schedule("1.000", "1M").grids, name="small-256")


def get_model(name: str) -> ModelPreset:
    if name not in MODELS:
        raise SparvarError(f"unknown model {name!r}; presets: {', '.join(MODELS)}")
    return MODELS[name]


def parse_resolution(text: str | None, model: ModelPreset) -> tuple[int, int]:
    """``"1024x768"`` -> (1024, 768) as (height, width); ``"512"`` means square."""
    text = text or model.default_resolution
    parts = str(text).lower().split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        raise SparvarError(f"resolution must look like 1024x1024 (height x width), got {text!r}") from None
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) <= 0:
        raise SparvarError(f"resolution must look like 1024x1024 (height x width), got {text!r}")
    return hw


def resolve_schedule(model: ModelPreset, height: int, width: int) -> Schedule:
    """The preset schedule of the model's family that makes a ``height x width`` image."""
    if model.family == "tiny":
        if (height, width) != _TINY.pixel_hw:
            raise SparvarError(f"model tiny has one resolution, 128x128; got {height}x{width}")
        return _TINY
    if model.family == "small":
        if (height, width) != (256, 256):
            raise SparvarError(f"model small has one resolution, 256x256; got {height}x{width}")
        return _SMALL
    if model.family == "var":
        if height != width or height not in (256, 512):
            raise SparvarError(f"VAR models run at 256x256 or 512x512, got {height}x{width}")
        return var_schedule(height)
    try:
        return schedule_for_pixels(model.family, height, width)
    except ValueError as e:
        raise SparvarError(str(e)) from None


def model_plan(model: ModelPreset, schedule: Schedule):
    """The authors' default plan for this model (``reference.default_plan``)."""
    plan = default_plan(schedule, model.depth)
    if model.bound_layer is not None:
        plan = replace(plan, bound_layer=model.bound_layer)
    return plan
