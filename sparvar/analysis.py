"""The three properties of VAR attention SparVAR builds on, measured on a model's own attention,
and how much of each query's dense attention a plan keeps (``sparvar analyze``).

A dense generation is run once with a dispatcher that keeps every layer's queries and keys at the
chosen scales; from the dense probabilities (float64):

- sinks: per layer, the attention mass each query of a scale puts on the keys of the first
  ``sink_scales`` scales (the plan's CSLA sinks), averaged over queries, heads and samples;
- cross-scale similarity: per layer and adjacent query scales ``(s, s+1)``, the cosine similarity
  of their key profiles over scales ``0..s`` (each query's attention there, renormalised and
  averaged over the queries of its scale): 1 means both scales attend alike;
- locality: per layer, the probability a query of scale ``s`` gives one same-scale key at
  Chebyshev distance ``r`` (``r = 0..max_distance``) in its grid, averaged over keys and queries;
- recall: per (layer, sparse step) of the plan, the share of each query's dense mass on the keys
  the step's pattern allows (CSLA windows and sinks; CS4A kept keys of the decision group plus
  bands, the kept sets chosen as the decision step chooses them), averaged over queries.

Random weights have none of this structure; the numbers mean something on a trained model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import sparvar.reference as R
from sparvar.reference import Schedule, SparsityPlan, StepKind

from .configs import write_json_atomic
from .dispatch import StepDispatcher

__all__ = ["attention_probs", "sink_mass", "scale_similarity", "locality", "recall", "pattern_mask",
           "decision_kept", "RecordingAttention", "generate_with", "analyze", "plot_analysis", "write_analysis"]


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense softmax probabilities ``[B, H, Lq, Lk]`` in float64."""
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)


def sink_mass(p: torch.Tensor, schedule: Schedule, sink_scales: int) -> float:
    """Mean mass on the keys of scales ``0..sink_scales-1``."""
    return p[..., :schedule.offsets[min(sink_scales, schedule.num_scales)]].sum(-1).mean().item()


def _key_profile(p: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Each query's attention over the first ``n_keys`` keys, renormalised, averaged over queries,
    heads and samples: ``[n_keys]``."""
    part = p[..., :n_keys]
    return (part / part.sum(-1, keepdim=True).clamp_min(1e-300)).mean(dim=(0, 1, 2))


def scale_similarity(p_s: torch.Tensor, p_next: torch.Tensor, schedule: Schedule, s: int) -> float:
    """Cosine similarity of the key profiles (over scales ``0..s``) of query scales ``s`` and ``s+1``."""
    n = schedule.num_keys(s)
    a, b = _key_profile(p_s, n), _key_profile(p_next, n)
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def locality(p: torch.Tensor, schedule: Schedule, step: int, max_distance: int,
             rows: torch.Tensor | None = None) -> list[float | None]:
    """Per distance ``r = 0..max_distance``: the mean probability of one same-scale key at
    Chebyshev distance ``r`` from its query (a ring's mass over its size, so that uniform
    attention gives a flat curve), averaged over the queries that have keys there (``None`` when
    none has). ``rows``: the scale's query indices ``p`` holds (default: all)."""
    h, w = schedule.grids[step]
    lo = schedule.offsets[step]
    same = p[..., lo:lo + h * w]  # [B, H, Lq, h*w]
    idx = torch.arange(h * w)
    y, x = idx // w, idx % w
    dist = torch.maximum((y[:, None] - y[None, :]).abs(), (x[:, None] - x[None, :]).abs())
    if rows is not None:
        dist = dist[rows.cpu()]
    dist = dist.to(p.device)
    out = []
    for r in range(max_distance + 1):
        ring = dist == r
        size = ring.sum(-1)  # keys at distance r, per query
        has = size > 0
        if not has.any():
            out.append(None)
            continue
        per_key = (same * ring).sum(-1)[..., has] / size[has]
        out.append(per_key.mean().item())
    return out


def recall(p: torch.Tensor, allowed: torch.Tensor) -> float:
    """Mean over queries of the dense mass on allowed keys (``allowed`` broadcasts to ``p``)."""
    return (p * allowed.to(p.device, p.dtype)).sum(-1).mean().item()


def decision_kept(plan: SparsityPlan, inputs: dict, layer: int) -> torch.Tensor | None:
    """``layer``'s CS4A kept sets, chosen from its decision scale's recorded queries and keys (a
    ``RecordingAttention``'s ``inputs``) as the decision step chooses them; ``None`` for a layer
    without CS4A."""
    d = plan.decision_scale
    if plan.kind(layer, d) != StepKind.CS4A_DECIDE:
        return None
    q_d, k_d, _, scale = inputs[(layer, d)]
    cs4a = plan.cs4a
    scores = R.column_scores(q_d.double(), k_d.double(), scale, cs4a.group_size)
    return R.select_keys(scores, R.num_keep(k_d.shape[2], cs4a.keep_ratio))


def pattern_mask(plan: SparsityPlan, schedule: Schedule, layer: int, step: int,
                 kept: torch.Tensor | None) -> torch.Tensor | None:
    """The keys ``plan`` lets each query of ``(layer, step)`` see (``None`` at dense steps):
    ``[Lq, Lk]`` for CSLA, ``[B, H, Lq, Lk]`` for CS4A with the layer's ``decision_kept``."""
    kind = plan.kind(layer, step)
    if kind == StepKind.CSLA:
        return R.csla_mask(schedule, step, plan.csla)
    if kind in (StepKind.CS4A_DECIDE, StepKind.CS4A_SPARSE):
        return R.cs4a_mask(schedule, step, plan.cs4a, kept)
    return None


class RecordingAttention(StepDispatcher):
    """Dense attention (``plan=None``) that keeps, per (layer, step) of ``steps``, what it was
    given as ``inputs[(layer, step)] = (q, k, v, scale)`` (of every layer, or of ``layers``). Without ``values``: q and k in fp32
    on the CPU (probabilities are computed there), v ``None``; with ``values``: copies of q, k,
    v where they are (the kernels run on them; sized for small models)."""

    capturable = False

    def __init__(self, schedule: Schedule, steps, *, values: bool = False, layers=None, **kwargs):
        super().__init__(None, schedule, **kwargs)
        self.steps, self.values = set(steps), values
        self.layers = None if layers is None else set(layers)
        self.inputs: dict = {}

    def __call__(self, layer, step, q, k, v, scale=1.0):
        if step in self.steps and (self.layers is None or layer in self.layers):
            if self.values:
                kept = tuple(t.detach().clone() for t in (q, k, v))
            else:
                kept = (q.detach().float().cpu(), k.detach().float().cpu(), None)
            self.inputs[(layer, step)] = kept + (float(scale),)
        return super().__call__(layer, step, q, k, v, scale)


def generate_with(pipeline, dispatcher: StepDispatcher, seed: int, skip_last: int = 0):
    """One generation of ``pipeline`` (its stand-in conditioning and the inference scripts'
    sampling) with ``dispatcher``'s attention; returns ``(result, wall ms)``."""
    gen = pipeline.generator
    saved, gen.dispatcher = gen.dispatcher, dispatcher
    try:
        cuda = next(pipeline.net.parameters()).is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = gen.generate(pipeline.condition(seed), seed=seed, cfg=3.0, top_k=900, top_p=0.97,
                              skip_last=skip_last)
        if cuda:
            torch.cuda.synchronize()
        return result, (time.perf_counter() - t0) * 1e3
    finally:
        gen.dispatcher = saved


def analyze(pipeline, plan: SparsityPlan, *, seed: int = 0, steps=None, max_distance: int = 4,
            queries_per_step: int = 256) -> dict:
    """Run one dense generation of ``pipeline`` (``sparvar.pipeline.Pipeline``) and measure the
    properties above at ``steps`` (default: every scale from 1 on); ``plan`` gives the sink
    scales and the patterns whose recall is measured. At most ``queries_per_step`` queries per
    scale (evenly spaced) enter the probabilities, which bounds memory at large scales."""
    schedule = pipeline.schedule
    S, depth = schedule.num_scales, len(pipeline.net.blocks)
    steps = sorted(set(range(1, S) if steps is None else steps))
    for s in steps:
        schedule.check_step(s)
    d = plan.decision_scale
    wanted = set(steps) | ({d} if plan.bound_layer >= 0 and any(s >= d for s in steps) else set())
    recorder = RecordingAttention(schedule, wanted, backend=pipeline.generator.dispatcher.backend)
    generate_with(pipeline, recorder, seed)

    def probs(layer, step):
        q, k, _, scale = recorder.inputs[(layer, step)]
        rows = torch.linspace(0, q.shape[2] - 1, min(queries_per_step, q.shape[2])).round().long().unique()
        return attention_probs(q[:, :, rows], k, scale), rows

    out = {"schedule": [list(g) for g in schedule.grids], "depth": depth, "steps": steps,
           "sink_scales": plan.sink_scales, "max_distance": max_distance, "queries_per_step": queries_per_step,
           "sinks": {}, "similarity": {}, "locality": {}, "recall": {}, "maps": []}
    # Attention maps at the last scale: the first CS4A layer and the last (CSLA) layer.
    map_layers = {layer for layer in (0, depth - 1) if plan.kind(layer, steps[-1]) != StepKind.DENSE}
    for layer in range(depth):
        full = {}
        kept = decision_kept(plan, recorder.inputs, layer) if d in wanted else None
        for s in steps:
            p, rows = probs(layer, s)
            full[s] = p
            out["sinks"].setdefault(str(layer), {})[str(s)] = sink_mass(p, schedule, plan.sink_scales)
            out["locality"].setdefault(str(layer), {})[str(s)] = locality(p, schedule, s, max_distance, rows)
            if plan.kind(layer, s) != StepKind.DENSE:
                mask = pattern_mask(plan, schedule, layer, s, kept)
                mask = mask[..., rows, :] if mask.dim() == 4 else mask[rows]
                out["recall"].setdefault(str(layer), {})[str(s)] = recall(p, mask)
                if s == steps[-1] and layer in map_layers:
                    out["maps"].extend(_maps(p, mask, rows, schedule, s, layer, plan.kind(layer, s).value))
        for s in steps:
            if s + 1 in full:
                out["similarity"].setdefault(str(layer), {})[f"{s}-{s + 1}"] = scale_similarity(
                    full[s], full[s + 1], schedule, s)
    return out


def _maps(p, mask, rows, schedule: Schedule, step: int, layer: int, kind: str, n: int = 2) -> list[dict]:
    """Same-scale attention of ``n`` queries (sample 0, head 0: CS4A keeps keys per head) as
    ``h x w`` maps, with the keys the pattern allows there, for the README's pictures."""
    h, w = schedule.grids[step]
    lo = schedule.offsets[step]
    out = []
    for i in torch.linspace(len(rows) // 3, len(rows) - 1 - len(rows) // 5, n).round().long().tolist():
        m = mask[0, 0, i] if mask.dim() == 4 else mask[i]
        out.append({"layer": layer, "step": step, "kind": kind, "query": int(rows[i]),
                    "probs": [[float(f"{v:.4g}") for v in r] for r in p[0, 0, i, lo:lo + h * w].view(h, w).tolist()],
                    "allowed": m[lo:lo + h * w].view(h, w).int().tolist(),
                    "mass_elsewhere": float(1 - p[0, 0, i, lo:lo + h * w].sum())})
    return out


def plot_analysis(result: dict, folder: Path) -> list[Path]:
    """Sinks per layer, similarity per layer and scale pair, and mass against distance: PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    layers = sorted(result["sinks"], key=int)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for s in result["steps"]:
        ax.plot([int(x) for x in layers], [result["sinks"][x][str(s)] for x in layers], marker=".", label=f"scale {s}")
    ax.set(xlabel="layer", ylabel=f"mass on scales < {result['sink_scales']}", title="attention sinks")
    ax.legend(fontsize=7)
    paths.append(folder / "sinks.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    pairs = sorted({p for v in result["similarity"].values() for p in v}, key=lambda p: int(p.split("-")[0]))
    if pairs:
        grid = [[result["similarity"][x].get(p, float("nan")) for p in pairs] for x in layers]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set(xticks=range(len(pairs)), xticklabels=pairs, xlabel="query scales", ylabel="layer",
               title="cross-scale similarity of key profiles")
        fig.colorbar(im)
        paths.append(folder / "similarity.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if result["locality"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for s in result["steps"]:
            curves = [result["locality"][x][str(s)] for x in layers if str(s) in result["locality"].get(x, {})]
            if curves:
                rs = [r for r in range(result["max_distance"] + 1) if curves[0][r] is not None]
                n_keys = sum(h * w for h, w in result["schedule"][:s + 1])
                ax.plot(rs, [n_keys * sum(c[r] for c in curves) / len(curves) for r in rs], marker=".",
                        label=f"scale {s}")
        ax.set(xlabel="Chebyshev distance in the query's grid", ylabel="probability per key x keys (1: uniform)",
               yscale="log", title="locality: same-scale attention against distance")
        ax.legend(fontsize=7)
        paths.append(folder / "locality.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if result.get("maps"):
        import numpy as np

        maps = result["maps"]
        fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.4), squeeze=False)
        for ax, m in zip(axes[0], maps):
            probs = np.array(m["probs"])
            ax.imshow(np.log10(np.maximum(probs, 1e-7)), cmap="magma")
            ax.contour(np.array(m["allowed"]), levels=[0.5], colors="cyan", linewidths=0.8)
            qy, qx = divmod(m["query"], probs.shape[1])  # the query's index in its scale
            ax.plot([qx], [qy], marker="+", color="lime", markersize=9)
            ax.set_title(f"layer {m['layer']} ({m['kind']}), scale {m['step']}\n"
                         f"{m['mass_elsewhere']:.2f} of the mass on earlier scales", fontsize=8)
            ax.axis("off")
        fig.suptitle("log10 attention on the query's own scale; cyan: keys the pattern keeps", fontsize=9)
        paths.append(folder / "attention_maps.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_analysis(result: dict, folder: Path) -> Path:
    return write_json_atomic(folder / "analysis.json", result, indent=1)
