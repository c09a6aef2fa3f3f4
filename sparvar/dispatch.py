"""The one place that decides which attention runs at a (layer, step), and runs it.

``run_step`` is the switch over the plan's step kinds (dense, CSLA, CS4A decide, CS4A sparse)
for either backend: the float64-capable reference or the Triton kernels with their configs.
``StepDispatcher`` asks the plan for the kind at each (layer, step) and owns every layer's CS4A
state from its decision step to its last sparse step. The runtime (``SparseAttention``), the
autotuner's measurements and checks, the benchmarks and the model integrations all call these;
a new attention kind is one more branch in ``run_step`` and one more ``StepKind``.
"""

from __future__ import annotations

from enum import Enum

import torch

import sparvar.kernels as K
import sparvar.reference as R
from sparvar.kernels import KernelConfig, Launch, LaunchConfigs, LaunchKey
from sparvar.reference import CS4AState, Schedule, SparsityPlan, StepKind

__all__ = ["Backend", "run_step", "StepDispatcher"]


class Backend(str, Enum):
    """``reference``: the semantics in PyTorch (any dtype, any device). ``kernels``: the Triton
    kernels (CUDA, or the interpreter on the CPU); dense steps use PyTorch's SDPA."""

    REFERENCE = "reference"
    KERNELS = "kernels"

    def __str__(self) -> str:
        return self.value


def run_step(kind: StepKind, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, step: int,
             plan: SparsityPlan, scale: float = 1.0, state: CS4AState | None = None, *,
             backend: Backend = Backend.KERNELS,
             configs: LaunchConfigs | None = None) -> tuple[torch.Tensor, CS4AState | None]:
    """Run one attention of ``kind`` at query scale ``step``; returns ``(out, state)``: the new
    CS4A state after ``cs4a_decide``, else ``state`` unchanged.

    ``q``: ``[B, H, h_k*w_k, D]``; ``k, v``: ``[B, H, L_k, D]``. ``state`` is the layer's decision
    state (``cs4a_sparse`` needs it). ``configs`` (kernels only): a ``KernelConfig`` per launch.
    """
    kernels = Backend(backend) is Backend.KERNELS
    if kind == StepKind.DENSE:
        if kernels:
            R.check_step_inputs(q, k, v, schedule, step)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), state
        return R.dense_attention(q, k, v, scale), state
    if kind == StepKind.CSLA:
        if kernels:
            return K.csla_attention(q, k, v, schedule, step, plan.csla, scale,
                                    config=(configs or {}).get(Launch.CSLA)), state
        return R.csla_attention(q, k, v, schedule, step, plan.csla, scale), state
    if kind == StepKind.CS4A_DECIDE:
        if kernels:
            return K.cs4a_decide(q, k, v, schedule, step, plan.cs4a, scale, configs=configs)
        return R.cs4a_decide(q, k, v, schedule, step, plan.cs4a, scale)
    if kind == StepKind.CS4A_SPARSE:
        if state is None:
            raise ValueError(f"step {step} is cs4a_sparse and needs the state of its decision step "
                             f"{plan.decision_scale}")
        if kernels:
            return K.cs4a_sparse(q, k, v, schedule, step, plan.cs4a, state, scale, configs=configs), state
        return R.cs4a_sparse(q, k, v, schedule, step, plan.cs4a, state, scale), state
    raise ValueError(f"unknown step kind {kind!r}; kinds: {[x.value for x in StepKind]}")


class StepDispatcher:
    """Every (layer, step) attention of one schedule as ``plan`` says.

    ``dispatcher(layer, step, q, k, v, scale)`` returns ``[B, H, h_k*w_k, D]``. The CS4A state of
    each layer is kept from its decision step to its later steps; ``new_image()`` drops them
    before the next generation. ``kernels`` maps ``LaunchKey`` (launch at a step) to configs.
    ``plan=None`` is dense attention at every step (the baseline a sparse plan is measured
    against). ``skip_sparse=True`` makes every sparse step a no-op that returns ``q`` (an upper
    bound on what faster sparse attention could gain; the outputs mean nothing).
    """

    #: Whether a CUDA graph may capture its calls (a subclass with Python side effects per call,
    #: such as recording its inputs, would have them only at capture, never at the replays).
    capturable = True

    def __init__(self, plan: SparsityPlan | None, schedule: Schedule, *, backend: Backend = Backend.KERNELS,
                 kernels: dict[LaunchKey, KernelConfig] | None = None, skip_sparse: bool = False):
        self.skip_sparse = skip_sparse
        if plan is not None:
            plan.check_schedule(schedule)
        self.plan, self.schedule, self.backend = plan, schedule, Backend(backend)
        self.kernels = dict(kernels or {})
        self._configs = [{key.launch: cfg for key, cfg in self.kernels.items() if key.step == step}
                         for step in range(schedule.num_scales)]
        self._states: dict[int, CS4AState] = {}

    def configs_at(self, step: int) -> LaunchConfigs:
        """The configs of every launch at ``step`` (launches not listed use their defaults)."""
        self.schedule.check_step(step)
        return self._configs[step]

    def state(self, layer: int) -> CS4AState | None:
        """The CS4A state of ``layer`` since its decision step (``None`` before it)."""
        return self._states.get(layer)

    def new_image(self) -> None:
        self._states.clear()

    def drop_state(self, layer: int) -> None:
        """Forget ``layer``'s CS4A state (its next generation has begun)."""
        self._states.pop(layer, None)

    def __call__(self, layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float = 1.0) -> torch.Tensor:
        kind = self.plan.kind(layer, step) if self.plan is not None else StepKind.DENSE
        if self.skip_sparse and kind != StepKind.DENSE:
            return q
        state = self._states.get(layer)
        if kind == StepKind.CS4A_SPARSE and state is None:
            raise ValueError(f"layer {layer} step {step} is cs4a_sparse but its decision step "
                             f"{self.plan.decision_scale} has not run since new_image()")
        out, state = run_step(kind, q, k, v, self.schedule, step, self.plan, scale, state, backend=self.backend,
                              configs=self._configs[step])
        if kind == StepKind.CS4A_DECIDE:
            self._states[layer] = state
        return out
