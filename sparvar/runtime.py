"""The runtime: a model's attention at every (layer, scale) as its plan says, with the tuned
kernel configs of this GPU. A thin wrapper over ``sparvar.dispatch``: it only finds the config."""

from __future__ import annotations

from .configs import ConfigChoice, find_config
from .dispatch import Backend, StepDispatcher
from .models import get_model, model_plan, parse_resolution, resolve_schedule

__all__ = ["SparseAttention"]


class SparseAttention(StepDispatcher):
    """Callable attention for one model and resolution.

    ``attn(layer, step, q, k, v, scale)`` returns ``[B, H, h_k*w_k, D]``; the CS4A state of each
    layer is kept between its decision step and later steps; call ``new_image()`` before the
    next generation. Dense steps use PyTorch SDPA (cuDNN / flash where available).

    Example::

        attn = SparseAttention.for_model("infinity-2b", "1024x1024")
        out = attn(layer, step, q, k, v, scale=1.0)
    """

    choice: ConfigChoice | None = None

    @classmethod
    def for_model(cls, model: str, resolution: str | None = None, config_path=None, strict: bool = False,
                  backend: Backend = Backend.KERNELS) -> "SparseAttention":
        """Load the tuned config for this GPU (``sparvar.configs.find_config``), else defaults."""
        preset = get_model(model)
        h, w = parse_resolution(resolution, preset)
        schedule = resolve_schedule(preset, h, w)
        choice = find_config(model, h, w, config_path, strict)
        if choice.config is not None:
            attn = cls(choice.config.plan, schedule, backend=backend, kernels=choice.config.kernels)
        else:
            attn = cls(model_plan(preset, schedule), schedule, backend=backend)
        attn.choice = choice
        return attn
