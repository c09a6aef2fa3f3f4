"""How much a plan changes what a model generates (``sparvar eval``).

From the same seeds, the model generates with dense attention and with each compared row:
plans (the default, CSLA only, CS4A only, CSLA windows one size smaller and larger) and scale
skipping (stop one or two scales early, dense). For each row:

- image agreement with the dense images: PSNR and SSIM. Images come from the pipeline's decoder;
  a model without one (the presets here ship no VAE) is compared on the decoder's input, the
  features on the last grid, mapped to three channels with the dense features' range, and the
  result says ``"compared": "features"``;
- per (layer, scale) relative error of the sparse attention output against dense attention, both
  on the dense generation's own inputs (teacher-forced, so errors do not compound), and the share
  of each query's dense attention mass the pattern keeps (``sparvar.analysis.recall``);
- the generation time of the row, from the same run.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sparvar.reference import SparsityPlan, StepKind, relative_error

from .analysis import RecordingAttention, attention_probs, decision_kept, generate_with, pattern_mask, recall
from .configs import write_json_atomic
from .dispatch import StepDispatcher, run_step

__all__ = ["psnr", "ssim", "compared_plans", "evaluate", "write_evaluation"]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images in ``[0, data_range]``; ``inf`` when equal."""
    mse = F.mse_loss(a.double(), b.double()).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity of ``[N, C, H, W]`` images (Wang et al. 2004: an 11x11 Gaussian
    window of sigma 1.5, K1 = 0.01, K2 = 0.03, each channel alone; images smaller than the
    window use a window of their size); 1 when equal."""
    a, b = a.double(), b.double()
    C = a.shape[1]
    size = min(11, a.shape[-2], a.shape[-1])
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(C, 1, size, size).to(a.device)

    def blur(t):
        return F.conv2d(t, win, groups=C)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def compared_plans(plan: SparsityPlan) -> dict[str, SparsityPlan]:
    """The default plan and its variants: CSLA only (no CS4A layer), CS4A only (every layer),
    CSLA windows one size smaller and one larger (each window of side > 1 minus or plus 2)."""
    def windows(delta):
        return tuple(w + delta if w > 1 else w for w in plan.win_rel)
    return {"default": plan, "csla_only": replace(plan, bound_layer=-1),
            "cs4a_only": replace(plan, bound_layer=plan.depth - 1),
            "windows_smaller": replace(plan, win_rel=windows(-2)), "windows_larger": replace(plan, win_rel=windows(2))}


def _images(pipeline, features: torch.Tensor, dense_features: torch.Tensor):
    """``([N, 3, H, W] in [0, 1], what they are)``: decoded images, or the features' first three
    channels mapped with the dense features' range (the same map for every row)."""
    decoder = getattr(pipeline, "decoder", None)
    if decoder is not None:
        return decoder(features).float().clamp(0, 1), "images"

    def three(f):
        f = f.float()
        return (f.squeeze(-3) if f.dim() == 5 else f)[:, :3]
    ref = three(dense_features)
    lo, hi = ref.amin(), ref.amax()
    return ((three(features) - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1), "features"


def _attention_rows(plan: SparsityPlan, recorder: RecordingAttention, backend) -> dict:
    """Per (layer, step) the plan makes sparse: relative error against dense attention and recall,
    on the recorded dense inputs."""
    schedule, d = recorder.schedule, plan.decision_scale
    errors, recalls = {}, {}
    for layer in range(plan.depth):
        state, kept = None, decision_kept(plan, recorder.inputs, layer)
        for step in range(schedule.num_scales):
            kind = plan.kind(layer, step)
            if kind == StepKind.DENSE:
                continue
            q, k, v, scale = recorder.inputs[(layer, step)]
            if kind == StepKind.CS4A_SPARSE and state is None:
                qd, kd, vd, _ = recorder.inputs[(layer, d)]
                _, state = run_step(StepKind.CS4A_DECIDE, qd, kd, vd, schedule, d, plan, scale, backend=backend)
            out, new_state = run_step(kind, q, k, v, schedule, step, plan, scale, state, backend=backend)
            if kind == StepKind.CS4A_DECIDE:
                state = new_state
            dense = run_step(StepKind.DENSE, q, k, v, schedule, step, plan, scale, backend=backend)[0]
            errors.setdefault(str(layer), {})[str(step)] = relative_error(out, dense)
            mask = pattern_mask(plan, schedule, layer, step, kept)
            recalls.setdefault(str(layer), {})[str(step)] = recall(attention_probs(q, k, scale), mask)
    return {"attention_rel_error": errors, "recall": recalls}


#: Seeds shown in the image grid (one row each).
GRID_SEEDS = 4


def evaluate(pipeline, plan: SparsityPlan, seeds=(0,), skips=(1, 2)) -> tuple[dict, dict]:
    """Rows as the module docstring says, for ``pipeline`` (``sparvar.pipeline.Pipeline``,
    ``plan`` its default plan); each row's numbers are means over ``seeds``. Returns the result
    (JSON-ready) and the first ``GRID_SEEDS`` seeds' images by row (for ``write_evaluation``'s grid)."""
    schedule = pipeline.schedule
    backend = pipeline.generator.dispatcher.backend
    kernels = pipeline.generator.dispatcher.kernels
    cuda = next(pipeline.net.parameters()).is_cuda

    def timed(dispatcher, skip=0):
        if cuda:  # a first generation compiles kernels and captures the graphs: not timed
            generate_with(pipeline, dispatcher, seeds[0], skip)
        return [generate_with(pipeline, dispatcher, seed, skip) for seed in seeds]

    # The attention rows are measured on the first seed's dense inputs, recorded (eagerly) here.
    recorder = RecordingAttention(schedule, range(schedule.num_scales), values=True, backend=backend)
    generate_with(pipeline, recorder, seeds[0])
    dense_runs = timed(StepDispatcher(None, schedule, backend=backend))
    rows = [{"row": "dense", "ms": sum(r[1] for r in dense_runs) / len(seeds)}]
    # Each seed's dense image, which every row of that seed is compared with: decoded once.
    refs = [_images(pipeline, r.features, r.features) for r, _ in dense_runs]
    compared = refs[0][1]
    grid = {"dense": [ref[0].cpu() for ref, _ in refs[:GRID_SEEDS]]}

    def image_row(name, results_ms, extra=None):
        metrics = []
        for i, ((result, ms), (dense, _), (ref, _)) in enumerate(zip(results_ms, dense_runs, refs)):
            img, _ = _images(pipeline, result.features, dense.features)
            metrics.append((psnr(img, ref), ssim(img, ref), ms))
            if i < GRID_SEEDS:
                grid.setdefault(name, []).append(img[0].cpu())
        n = len(metrics)
        rows.append({"row": name, "compared": compared, "psnr_db": sum(m[0] for m in metrics) / n,
                     "ssim": sum(m[1] for m in metrics) / n, "ms": sum(m[2] for m in metrics) / n, **(extra or {})})

    for name, variant in compared_plans(plan).items():
        dispatcher = StepDispatcher(variant, schedule, backend=backend, kernels=kernels if name == "default" else None)
        runs = timed(dispatcher)
        attention = _attention_rows(variant, recorder, backend)
        errs = [x for layer in attention["attention_rel_error"].values() for x in layer.values()]
        recs = [x for layer in attention["recall"].values() for x in layer.values()]
        image_row(name, runs, {"plan": variant.to_dict(), "mean_attention_rel_error": sum(errs) / max(1, len(errs)),
                               "mean_recall": sum(recs) / max(1, len(recs)), **attention})
    for skip in skips:
        image_row(f"dense_skip_last_{skip}", timed(StepDispatcher(None, schedule, backend=backend), skip))
    result = {"model": pipeline.preset.name, "schedule": [list(g) for g in schedule.grids], "seeds": list(seeds),
              "timing": "wall ms per generation" + ("" if cuda else " in Triton's interpreter on the CPU (says "
                                                    "nothing about a GPU)"), "rows": rows}
    return result, grid


def write_evaluation(result: dict, grid: dict, folder: Path) -> list[Path]:
    """``eval.json``, ``eval.md`` (one line per row) and ``grid.png`` (dense | default plan |
    dense skipping the last two scales; one row per seed, at most ``GRID_SEEDS``) in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [write_json_atomic(folder / "eval.json", result, indent=1), folder / "eval.md", folder / "grid.png"]
    lines = [f"# {result['model']}: rows against dense attention, seeds {result['seeds']}", "",
             f"Times: {result['timing']}.", "",
             "| row | compared | PSNR dB | SSIM | attention rel. error | recall | ms |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        def fmt(key, spec):
            return format(r[key], spec) if key in r else "-"
        lines.append(f"| {r['row']} | {r.get('compared', '-')} | {fmt('psnr_db', '.2f')} | {fmt('ssim', '.4f')} | "
                     f"{fmt('mean_attention_rel_error', '.4f')} | {fmt('mean_recall', '.3f')} | {r['ms']:.1f} |")
    paths[1].write_text("\n".join(lines) + "\n")
    shown = [n for n in ("dense", "default", "dense_skip_last_2") if n in grid]
    n_rows = len(grid[shown[0]])
    fig, axes = plt.subplots(n_rows, len(shown), figsize=(3 * len(shown), 3.1 * n_rows), squeeze=False)
    for col, name in enumerate(shown):
        for row, img in enumerate(grid[name]):
            ax = axes[row][col]
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            if row == 0:
                ax.set_title(name, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
