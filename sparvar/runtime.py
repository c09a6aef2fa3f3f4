"""The runtime: run every (layer, scale) attention of a generation as the plan says, with the
tuned kernel configs of this GPU."""

from __future__ import annotations

import torch

import sparvar.kernels as K
from sparvar.reference import CS4AState, Schedule, SparsityPlan, check_step_inputs

from .configs import ConfigChoice, find_config
from .models import get_model, model_plan, parse_resolution, resolve_schedule

__all__ = ["SparseAttention"]


class SparseAttention:
    """Callable attention for one model and resolution.

    ``attn(layer, step, q, k, v, scale)`` returns ``[B, H, h_k*w_k, D]``; the CS4A state of each
    layer is kept between its decision step and later steps; call ``new_image()`` before the
    next generation. Dense steps use PyTorch SDPA (cuDNN / flash where available).

    Example::

        attn = SparseAttention.for_model("infinity-2b", "1024x1024")
        out = attn(layer, step, q, k, v, scale=1.0)
    """

    def __init__(self, plan: SparsityPlan, schedule: Schedule, kernels: dict[str, K.KernelConfig] | None = None,
                 choice: ConfigChoice | None = None):
        plan.check_schedule(schedule)
        self.plan, self.schedule = plan, schedule
        self.kernels = dict(kernels or {})
        self.choice = choice
        self._states: dict[int, CS4AState] = {}

    @classmethod
    def for_model(cls, model: str, resolution: str | None = None, config_path=None, strict: bool = False):
        """Load the tuned config for this GPU (``sparvar.configs.find_config``), else defaults."""
        preset = get_model(model)
        h, w = parse_resolution(resolution, preset)
        schedule = resolve_schedule(preset, h, w)
        choice = find_config(model, h, w, config_path, strict)
        if choice.config is not None:
            return cls(choice.config.plan, schedule, choice.config.kernels, choice)
        return cls(model_plan(preset, schedule), schedule, None, choice)

    def kernel_configs(self, step: int) -> dict[str, K.KernelConfig]:
        """The configs of every launch kind at ``step`` (missing ones use the kernels' defaults)."""
        return {kind: cfg for kind in K.STEP_KINDS if (cfg := self.kernels.get(f"{kind}@{step}"))}

    def new_image(self) -> None:
        self._states.clear()

    def __call__(self, layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float = 1.0) -> torch.Tensor:
        check_step_inputs(q, k, v, self.schedule, step)
        kind = self.plan.kind(layer, step)
        cfgs = self.kernel_configs(step)
        if kind == "dense":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        if kind == "csla":
            return K.csla_attention(q, k, v, self.schedule, step, self.plan.csla, scale, config=cfgs.get("csla"))
        if kind == "cs4a_decide":
            out, self._states[layer] = K.cs4a_decide(q, k, v, self.schedule, step, self.plan.cs4a, scale,
                                                     configs=cfgs)
            return out
        state = self._states.get(layer)
        if state is None:
            raise ValueError(f"layer {layer} step {step} is cs4a_sparse but its decision step "
                             f"{self.plan.decision_scale} has not run since new_image()")
        return K.cs4a_sparse(q, k, v, self.schedule, step, self.plan.cs4a, state, scale, configs=cfgs)
