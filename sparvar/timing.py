"""How the project times GPU work: replays of a CUDA graph (what a generation with graphs pays),
beside the eager time and the host time per call (what a Python caller pays). On these machines
a Python-side launch can cost more than the kernel, so eager timings of small steps measure the
host; graph replays measure the GPU. Without a GPU (Triton's interpreter) only wall-clock times
exist, and they say nothing about a GPU."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["Timing", "time_gpu", "host_us_per_call", "GRAPH", "INTERPRETER"]

GRAPH = "CUDA graph replay, triton.testing.do_bench_cudagraph median"
INTERPRETER = "Triton interpreter on the CPU, wall-clock median (not a GPU timing)"


@dataclass
class Timing:
    """``ms``: the time that counts (graph replay on a GPU; wall clock in the interpreter);
    ``eager_ms``: ``do_bench`` median of eager calls; ``host_us``: median host time per call."""

    ms: float
    method: str
    eager_ms: float | None = None
    host_us: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def host_us_per_call(fn, calls: int = 1000, sync_every: int = 50) -> float:
    """Median wall time of one call as the host sees it (launch and Python, not the GPU), over
    ``calls`` calls; the queue is drained every ``sync_every`` calls, outside the timed spans, so
    that it never fills and blocks a launch."""
    fn()
    torch.cuda.synchronize()
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if (i + 1) % sync_every == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def time_gpu(fn, *, eager: bool = False, host_calls: int = 0, rep_ms: int = 100) -> Timing:
    """Time ``fn`` (no arguments; it must not synchronise, so that a graph can capture it).

    On a GPU: median of CUDA graph replays; with ``eager``, also the eager ``do_bench`` median;
    with ``host_calls``, the median host time per call over that many calls. Without one: the
    median wall time of three calls in Triton's interpreter.
    """
    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return Timing(statistics.median(times), INTERPRETER)
    import triton

    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    eager_ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") if eager else None
    host = host_us_per_call(fn, host_calls) if host_calls else None
    return Timing(ms, GRAPH, eager_ms, host)
