"""Timing and checking one plan step with given kernel configs, in a separate process.

``StepMeasurer`` owns the inputs of every step (random, fixed seed, one KV cache per schedule so
that later steps continue the decision step's keys), runs steps through the dispatcher
(``sparvar.dispatch.run_step``), checks each new config once against the reference backend on
one (batch, head) slice, and times it (``sparvar.timing``: CUDA graph replays on a GPU).
``BenchWorker`` runs a measurer in a spawned process and restarts it when the process dies (a
CUDA fault poisons its context), so one bad trial never takes the study down.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
from dataclasses import dataclass

import torch

import sparvar.reference as R
from sparvar.dispatch import Backend, run_step
from sparvar.kernels import KernelLaunchError, Launch, dense_backend_for, launch_config
from sparvar.reference import StepKind
from sparvar.timing import time_gpu

__all__ = ["Measurement", "StepMeasurer", "BenchWorker", "MeasurerSpec"]


@dataclass
class Measurement:
    """``status``: ``ok``, ``compile`` (the config does not build or fit), ``wrong`` (fails the
    reference check) or ``crash`` (the worker process died). ``ms`` for ``ok``; ``method`` says
    how it was timed; ``backend`` is the dense backend that ran (decision steps)."""

    status: str
    ms: float = float("nan")
    message: str = ""
    method: str = ""
    backend: str = ""


@dataclass(frozen=True)
class MeasurerSpec:
    """Everything a worker needs to rebuild its measurer (picklable)."""

    plan: R.SparsityPlan
    grids: tuple
    batch: int
    heads: int
    head_dim: int
    seed: int = 0


class StepMeasurer:
    def __init__(self, spec: MeasurerSpec):
        self.spec = spec
        self.schedule = R.Schedule(spec.grids)
        self.plan = spec.plan
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        # The interpreter cannot do bf16 dots; fp32 keeps its checks tight.
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.tol = 1e-2 if self.cuda else 1e-4
        last = self.schedule.num_scales - 1
        # One cache for the whole schedule: step k's keys are the first L_k of it, as in generation.
        self._cache = R.step_inputs(self.schedule, last, spec.batch, spec.heads, spec.head_dim,
                                    dtype=self.dtype, device=self.device, seed=spec.seed)[1:]
        q_all = R.step_inputs(self.schedule, last, spec.batch, spec.heads, spec.head_dim,
                              dtype=self.dtype, device=self.device, seed=spec.seed + 1)[1]
        self._queries = q_all
        self._checked: set = set()
        self._state = None

    def inputs(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.schedule
        k, v = (t[:, :, : s.num_keys(step)] for t in self._cache)
        return self._queries[:, :, s.offsets[step]: s.offsets[step + 1]], k, v

    def decision_state(self):
        if self._state is None:
            d = self.plan.decision_scale
            self._state = run_step(StepKind.CS4A_DECIDE, *self.inputs(d), self.schedule, d, self.plan)[1]
        return self._state

    def check(self, kind: StepKind, step: int, result, state) -> str:
        """Empty string if the kernel result matches the reference backend on slice (0, 0), else why."""
        # The reference runs on the CPU, in float64, on slice (0, 0) of the inputs.
        q, k, v = (t[:1, :1].double().cpu() for t in self.inputs(step))
        s, plan = self.schedule, self.plan
        if kind == StepKind.CS4A_DECIDE:
            dense = R.dense_attention(q, k, v, 1.0)
            pairs = [("O_dense", result, dense, None)]
            if state.residual is not None:
                sel = R.selected_attention(q, k, v, s, step, plan.cs4a, state.kept[:1, :1].long().cpu(), 1.0)
                # R is a small difference: measure its error against the output's size.
                pairs.append(("R", state.residual.reshape_as(result), dense - sel, dense))
        else:
            ref_state = None
            if kind == StepKind.CS4A_SPARSE:
                st = self.decision_state()
                ref_state = R.CS4AState(st.decision_scale, st.kept[:1, :1].long().cpu(),
                                        None if st.residual is None else st.residual[:1, :1].double().cpu())
            want = run_step(kind, q, k, v, s, step, plan, 1.0, ref_state, backend=Backend.REFERENCE)[0]
            pairs = [("out", result, want, None)]
        for name, got, want, norm_of in pairs:
            err = R.relative_error(got[:1, :1].cpu(), want.cpu(), None if norm_of is None else norm_of.cpu())
            if not err < self.tol:
                return f"{name} relative error {err:.2e} >= {self.tol:.0e} against the reference"
        return ""

    def measure(self, kind: StepKind, step: int, configs: dict, plan: R.SparsityPlan | None = None) -> Measurement:
        """Check (once per config) and time one step; ``plan`` replaces the spec's plan (semantic search)."""
        kind = StepKind(kind)
        if plan is not None and plan != self.plan:
            self.plan, self._state = plan, None
            self._checked.clear()
        backend = ""
        if kind == StepKind.CS4A_DECIDE:
            backend = dense_backend_for(launch_config(configs, Launch.CS4A_DENSE), self._queries)[0].value
        q, k, v = self.inputs(step)
        state_in = self.decision_state() if kind == StepKind.CS4A_SPARSE else None
        try:
            result, state = run_step(kind, q, k, v, self.schedule, step, self.plan, 1.0, state_in, configs=configs)
        except KernelLaunchError as e:
            return Measurement("compile", message=str(e), backend=backend)
        key = (kind, step, tuple(sorted((str(k), c) for k, c in configs.items())))
        if kind != StepKind.DENSE and key not in self._checked:
            why = self.check(kind, step, result, state)
            if why:
                return Measurement("wrong", message=why, backend=backend)
            self._checked.add(key)
        timing = time_gpu(lambda: run_step(kind, q, k, v, self.schedule, step, self.plan, 1.0, state_in,
                                           configs=configs))
        return Measurement("ok", timing.ms, method=timing.method, backend=backend)


def _worker_main(conn, factory, args) -> None:
    # Ctrl-C goes to the whole process group: the parent reports it; this process just ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    measurer = factory(*args)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            conn.send(measurer.measure(*msg))
        except RuntimeError as e:
            # A CUDA error leaves this process's context unusable: report, then exit so the
            # parent starts a fresh worker.
            conn.send(Measurement("crash", message=f"{type(e).__name__}: {e}"))
            if any(m in str(e) for m in _CONTEXT_ERRORS):
                return
        except Exception as e:  # noqa: BLE001 - reported to the study as this trial's failure
            conn.send(Measurement("crash", message=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


#: Messages of errors after which the CUDA context is unusable (a device mismatch or a bad shape,
#: which mention "cuda" too, leave it intact: the worker goes on).
_CONTEXT_ERRORS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS", "cuDNN error",
                   "unspecified launch failure")


class BenchWorker:
    """A measurer in a spawned process; ``measure`` restarts the process after it dies."""

    def __init__(self, factory=StepMeasurer, args: tuple = (), timeout_s: float = 600.0):
        self.factory, self.args, self.timeout_s = factory, args, timeout_s
        self.restarts = 0
        self._started = False
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, self.factory, self.args), daemon=True)
        self._proc.start()
        child.close()

    def measure(self, kind: StepKind | str, step: int, configs: dict | None = None,
                plan: R.SparsityPlan | None = None) -> Measurement:
        if self._proc is None or not self._proc.is_alive():
            self.restarts += self._started
            self._started = True
            self._start()
        try:
            self._conn.send((StepKind(kind), step, configs or {}, plan))
            if not self._conn.poll(self.timeout_s):
                self._kill()
                return Measurement("crash", message=f"no answer in {self.timeout_s:.0f} s; worker restarted")
            return self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            # The pipe closes a moment before the process is reaped: wait for its exit code.
            self._proc.join(5)
            code = self._proc.exitcode
            self._kill()
            return Measurement("crash", message=f"worker process died (exit code {code}); restarted")

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        self._proc = None

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        self._proc = None
