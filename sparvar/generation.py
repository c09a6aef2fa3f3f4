"""Next-scale generation for the project's Infinity and VAR networks, with the plan's attention.

``NextScaleGenerator`` runs the scale loop of a network (``VARNet`` or ``InfinityNet``): a KV cache
allocated once for the whole schedule (each scale's keys and values are written into it, never
concatenated), classifier-free guidance as batch doubling, top-k/top-p sampling from a seeded
generator, and every attention through one ``StepDispatcher`` (dense, CSLA or CS4A as the plan
says). On a GPU each scale's transformer pass can be replayed from a CUDA graph captured once
per shape. ``skip_last`` stops that many scales early (the features already live on the last
scale's grid, so decoding sees them up-sampled), as FastVAR and SkipVAR do.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from sparvar.reference import Schedule

from .dispatch import StepDispatcher

__all__ = ["KVCache", "LayerAttention", "GenerationResult", "NextScaleGenerator", "sample_top_k_top_p"]


class KVCache:
    """Keys and values of every layer for the whole schedule, ``[depth, B, H, L_total, D]`` each.
    ``write`` puts one scale's keys and values in place (``LayerAttention`` reads the views of
    scales ``0..step``)."""

    def __init__(self, depth: int, batch: int, heads: int, total: int, head_dim: int, dtype, device):
        self.k = torch.zeros(depth, batch, heads, total, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write(self, layer: int, lo: int, hi: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer, :, :, lo:hi] = k
        self.v[layer, :, :, lo:hi] = v


def sample_top_k_top_p(logits: torch.Tensor, generator: torch.Generator | None, top_k: int = 0,
                       top_p: float = 0.0) -> torch.Tensor:
    """``[B, l, V]`` logits -> ``[B, l]`` samples: keep the ``top_k`` largest (0: all), then the
    smallest set whose probability reaches ``top_p`` (0: all), softmax, one multinomial draw per
    position from ``generator`` (the official samplers' order of operations, so the same seed
    draws the same tokens)."""
    B, l, V = logits.shape
    logits = logits.clone()
    if 0 < top_k < V:
        logits.masked_fill_(logits < logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(-1, keepdim=True),
                            -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    probs = logits.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


class LayerAttention:
    """One layer's self-attention at one scale, over the KV cache: ``slots()`` are the cache rows
    of this scale's keys and values (a fused block writes them itself), ``attend(q, scale)`` runs
    the dispatcher's attention of this (layer, step) over the cached scales ``0..step``, and
    calling it with ``(q, k, v, scale)`` writes ``k, v`` into the slots first (the unfused
    blocks)."""

    def __init__(self, dispatcher: StepDispatcher, cache: KVCache, layer: int, step: int, lo: int, hi: int):
        self.dispatcher, self.cache, self.layer, self.step, self.lo, self.hi = dispatcher, cache, layer, step, lo, hi

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k[self.layer, :, :, self.lo:self.hi], self.cache.v[self.layer, :, :, self.lo:self.hi]

    def attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        k = self.cache.k[self.layer, :, :, :self.hi]
        v = self.cache.v[self.layer, :, :, :self.hi]
        # Under autocast q and k leave their normalisation in fp32; the cache holds the
        # network's dtype, and attention runs in it (as SDPA under autocast does).
        return self.dispatcher(self.layer, self.step, q.to(k.dtype), k, v, scale)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        self.cache.write(self.layer, self.lo, self.hi, k, v)
        return self.attend(q, scale)


@dataclass
class GenerationResult:
    """``tokens``: per generated scale the sampled tokens (``[B, h*w]`` for VAR, bits
    ``[B, h*w, d]`` for Infinity); ``features``: what the decoder takes (VAR's ``f_hat``,
    Infinity's summed codes) on the last scale's grid; ``scale_ms``: wall time per scale."""

    tokens: list[torch.Tensor]
    features: torch.Tensor
    scale_ms: list[float] = field(default_factory=list)


class NextScaleGenerator:
    """The scale loop of ``net`` over ``schedule`` with ``dispatcher``'s attention.

    ``net`` provides ``cfg`` (``num_heads``, ``embed_dim``), ``begin(cond) -> (x, state)``, ``blocks``, ``block_cond(state, step)``,
    ``run_blocks(x, block_cond, attend_for)`` (``attend_for(layer)`` gives that layer's
    ``LayerAttention``), ``logits(x, state)``, ``guide(logits, step, cfg)``,
    ``sample(logits, generator, top_k, top_p)`` and ``next_input(step, tokens, aux, carry)``;
    ``aux`` is the family's VAE part (``VQInput`` for VAR; nothing for Infinity, whose bit codes
    need no parameters).
    """

    def __init__(self, net, schedule: Schedule, dispatcher: StepDispatcher, aux=None, *, graphs: bool = False):
        self.net, self.schedule, self.dispatcher, self.aux = net, schedule, dispatcher, aux
        self.graphs = graphs
        self._graphs: dict = {}
        self._graphs_for: StepDispatcher | None = None  # the dispatcher whose attention they replay
        self._cache: KVCache | None = None
        self._state: dict | None = None
        #: Why a scale's graph could not be captured (it then runs eagerly), one entry per failure.
        self.capture_failures: list[str] = []

    def _scale(self, step: int, x: torch.Tensor, state, cache: KVCache) -> torch.Tensor:
        """One scale's transformer pass: ``x [2B, h*w, C]`` -> logits ``[2B, h*w, V]``."""
        lo, hi = self.schedule.offsets[step], self.schedule.offsets[step + 1]

        def attend_for(layer: int) -> LayerAttention:
            return LayerAttention(self.dispatcher, cache, layer, step, lo, hi)
        return self.net.logits(self.net.run_blocks(x, self.net.block_cond(state, step), attend_for), state)

    def _buffers(self, x: torch.Tensor, state: dict) -> tuple[KVCache, dict]:
        """The KV cache (allocated once per batch and dtype, reused by later generations: each
        scale writes its rows before any attention reads them) and, with graphs, the conditioning
        copied into the tensors the captured graphs read."""
        shape = (len(self.net.blocks), x.shape[0], self.net.cfg.num_heads, self.schedule.offsets[-1],
                 self.net.cfg.embed_dim // self.net.cfg.num_heads)
        # The cache holds what the blocks compute in (their weights' dtype).
        dtype = next(self.net.blocks.parameters()).dtype
        if self._cache is None or tuple(self._cache.k.shape) != shape or self._cache.k.dtype != dtype \
                or self._cache.k.device != x.device:
            self._cache = KVCache(*shape[:2], shape[2], shape[3], shape[4], dtype, x.device)
            self._graphs.clear()
        if not (self.graphs and x.is_cuda):
            return self._cache, state
        def fits(old, new):
            if isinstance(new, torch.Tensor):
                return isinstance(old, torch.Tensor) and old.shape == new.shape and old.dtype == new.dtype
            return old == new  # host values (text bounds) are baked into the captured graphs
        if self._state is not None and self._state.keys() == state.keys() and all(
                fits(self._state[n], t) for n, t in state.items()):
            for n, t in state.items():
                if isinstance(t, torch.Tensor):
                    self._state[n].copy_(t)
        else:
            self._state = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in state.items()}
            self._graphs.clear()
        return self._cache, self._state

    @torch.no_grad()
    def generate(self, cond, *, seed: int | None = 0, cfg: float | list = 1.5, top_k: int = 0, top_p: float = 0.0,
                 skip_last: int = 0, generator: torch.Generator | None = None) -> GenerationResult:
        S = self.schedule.num_scales
        if isinstance(skip_last, bool) or not isinstance(skip_last, int) or not 0 <= skip_last < S:
            raise ValueError(f"skip_last must be an int in [0, {S - 1}], got {skip_last!r}")
        block = next(self.net.blocks.parameters())
        # Reduced-precision blocks run under autocast, as the official inference scripts do.
        # Without autocast's cast cache: a graph captured in one generation would read the cached
        # low-precision copies of fp32 weights that require grad (an official model's, shared by
        # accelerate), which the cache frees when the generation ends (NaN from the next one on).
        with torch.autocast(device_type=block.device.type, dtype=block.dtype, enabled=block.dtype != torch.float32,
                            cache_enabled=False):
            return self._generate(cond, seed, cfg, top_k, top_p, skip_last, generator)

    def _generate(self, cond, seed, cfg, top_k, top_p, skip_last, generator) -> GenerationResult:
        S = self.schedule.num_scales
        x, state = self.net.begin(cond)
        device = x.device
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        cache, state = self._buffers(x, state)
        self.dispatcher.new_image()
        tokens, carry, times = [], None, []
        for step in range(S - skip_last):
            t0 = time.perf_counter()
            logits = self._run_scale(step, x, state, cache)
            guidance = cfg[step] if isinstance(cfg, (list, tuple)) else cfg
            sampled = self.net.sample(self.net.guide(logits, step, guidance), generator, top_k, top_p)
            tokens.append(sampled)
            x, carry = self.net.next_input(step, sampled, self.aux, carry)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return GenerationResult(tokens, carry, times)

    def _run_scale(self, step, x, state, cache):
        if not (self.graphs and x.is_cuda and self.dispatcher.capturable):
            return self._scale(step, x, state, cache)
        if self._graphs_for is not self.dispatcher:
            # A graph replays the attention it captured: another dispatcher needs graphs of its own.
            self._graphs.clear()
            self._graphs_for = self.dispatcher
        key = (step, tuple(x.shape), x.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(step, x, state, cache)
            return entry[2]
        static_x, graph, out = entry
        if graph is None:
            return self._scale(step, x, state, cache)
        static_x.copy_(x)
        graph.replay()
        return out

    def _capture(self, step, x, state, cache):
        """Capture one scale's pass; the eager pass before it is the warm-up (compilation, launch
        plans) and writes the same cache rows the replays will."""
        static_x = x.clone()
        self._scale(step, static_x, state, cache)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._scale(step, static_x, state, cache)
        except RuntimeError as e:
            why = f"scale {step}: {str(e).splitlines()[0]}"
            self.capture_failures.append(why)
            warnings.warn(f"CUDA graph capture failed at {why}; running that scale eagerly", stacklevel=3)
            return static_x, None, self._scale(step, x, state, cache)
        graph.replay()
        return static_x, graph, out
