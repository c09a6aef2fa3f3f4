"""Timing and checking one sparse step with given kernel configs, in a separate process.

``StepMeasurer`` owns the inputs of every unit (random, fixed seed), checks each new config once
against the float64 reference on one (batch, head) slice, and times it (``do_bench`` median on
a GPU, wall-clock median in Triton's interpreter). ``BenchWorker`` runs a measurer in a spawned
process and restarts it when the process dies (a CUDA fault poisons its context), so one bad
trial never takes the study down.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
import traceback
from dataclasses import dataclass

import torch

import sparvar.kernels as K
import sparvar.reference as R
from sparvar.kernels.launch import KernelLaunchError

from .space import Unit

__all__ = ["Measurement", "StepMeasurer", "BenchWorker", "MeasurerSpec"]


@dataclass
class Measurement:
    """``status``: ``ok``, ``compile`` (the config does not build or fit), ``wrong`` (fails the
    reference check) or ``crash`` (the worker process died). ``ms`` for ``ok``."""

    status: str
    ms: float = float("nan")
    message: str = ""


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
        self._inputs: dict[int, list[torch.Tensor]] = {}
        self._checked: set = set()
        self._state = None

    def inputs(self, step: int) -> list[torch.Tensor]:
        if step not in self._inputs:
            g = torch.Generator().manual_seed(self.spec.seed + step)
            s, sp = self.schedule, self.spec
            self._inputs[step] = [torch.randn(sp.batch, sp.heads, n, sp.head_dim, generator=g).to(self.device, self.dtype)
                                  for n in (s.num_queries(step), s.num_keys(step), s.num_keys(step))]
        return self._inputs[step]

    def decision_state(self):
        if self._state is None:
            d = self.plan.decision_scale
            self._state = K.cs4a_decide(*self.inputs(d), self.schedule, d, self.plan.cs4a)[1]
        return self._state

    def runner(self, unit_kind: str, step: int, configs: dict):
        q, k, v = self.inputs(step)
        s, plan = self.schedule, self.plan
        if unit_kind == "csla":
            return lambda: K.csla_attention(q, k, v, s, step, plan.csla, 1.0, config=configs["csla"])
        if unit_kind == "cs4a_decide":
            return lambda: K.cs4a_decide(q, k, v, s, step, plan.cs4a, 1.0, configs=configs)
        if unit_kind == "cs4a_sparse":
            state = self.decision_state()
            return lambda: K.cs4a_sparse(q, k, v, s, step, plan.cs4a, state, 1.0, configs=configs)
        if unit_kind == "dense":
            return self._dense(q, k, v)
        raise ValueError(f"unknown unit kind {unit_kind!r}")

    def _dense(self, q, k, v):
        """The dense baseline: cuDNN SDPA where it runs, else PyTorch's own choice."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if self.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return sdpa(q, k, v, scale=1.0)
            try:
                cudnn()
                return cudnn
            except RuntimeError:
                pass
        return lambda: sdpa(q, k, v, scale=1.0)

    def check(self, unit_kind: str, step: int, result) -> str:
        """Empty string if the kernel output matches the reference on slice (0, 0), else why not."""
        q, k, v = (t[:1, :1].double() for t in self.inputs(step))
        s, plan = self.schedule, self.plan
        if unit_kind == "csla":
            pairs = [("out", result, R.csla_attention(q, k, v, s, step, plan.csla, 1.0), None)]
        elif unit_kind == "cs4a_decide":
            out, state = result
            dense = R.dense_attention(q, k, v, 1.0)
            pairs = [("O_dense", out, dense, None)]
            if state.residual is not None:
                sel = R.selected_attention(q, k, v, s, step, plan.cs4a, state.kept[:1, :1].long(), 1.0)
                # R is a small difference: measure its error against the output's size.
                pairs.append(("R", state.residual.reshape_as(out), dense - sel, dense))
        else:
            st = self.decision_state()
            res = None if st.residual is None else st.residual[:1, :1].double()
            ref_state = R.CS4AState(st.decision_scale, st.kept[:1, :1].long(), res)
            pairs = [("out", result, R.cs4a_sparse(q, k, v, s, step, plan.cs4a, ref_state, 1.0), None)]
        for name, got, want, scale_ref in pairs:
            got = got[:1, :1].double()
            err = ((got - want).norm() / (scale_ref if scale_ref is not None else want).norm().clamp_min(1e-30)).item()
            if not err < self.tol:
                return f"{name} relative error {err:.2e} >= {self.tol:.0e} against the reference"
        return ""

    def time_ms(self, fn) -> float:
        if self.cuda:
            import triton

            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def measure(self, unit_kind: str, step: int, configs: dict, plan: R.SparsityPlan | None = None) -> Measurement:
        """Check (once per config) and time one unit; ``plan`` replaces the spec's plan (semantic search)."""
        if plan is not None and plan != self.plan:
            self.plan, self._state = plan, None
            self._checked.clear()
        fn = self.runner(unit_kind, step, configs)
        try:
            result = fn()
        except KernelLaunchError as e:
            return Measurement("compile", message=str(e))
        key = (unit_kind, step, tuple(sorted((k, c) for k, c in configs.items())))
        if unit_kind != "dense" and key not in self._checked:
            why = self.check(unit_kind, step, result)
            if why:
                return Measurement("wrong", message=why)
            self._checked.add(key)
        return Measurement("ok", self.time_ms(fn))


def _worker_main(conn, factory, args) -> None:
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
            if "CUDA" in str(e) or "cuda" in str(e):
                return
        except Exception as e:  # noqa: BLE001 - reported to the study as this trial's failure
            conn.send(Measurement("crash", message=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


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

    def measure(self, unit: Unit | str, step: int | None = None, configs: dict | None = None,
                plan: R.SparsityPlan | None = None) -> Measurement:
        kind, step = (unit.kind, unit.step) if isinstance(unit, Unit) else (unit, step)
        if self._proc is None or not self._proc.is_alive():
            self.restarts += self._started
            self._started = True
            self._start()
        try:
            self._conn.send((kind, step, configs or {}, plan))
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
