"""Attention benchmark at Infinity 1024 shapes: correctness first, then medians against cuDNN SDPA,
flash SDPA and FlexAttention given the identical token mask, all in one run on one card.

Every time is a median of CUDA graph replays (``sparvar.timing``); the eager ``do_bench`` median
and the host time per call (median over 1,000 eager calls) stand beside it. Used by
``bench/attention.py`` and ``sparvar bench``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import sparvar.kernels as K
import sparvar.reference as R

from .dispatch import StepDispatcher
from .hardware import gpu_name, sanitize, software_versions
from .timing import time_gpu

__all__ = ["run_attention_benchmark", "print_table"]


def _check(name: str, out: torch.Tensor, ref: torch.Tensor, heads=(0,), tol: float = 1e-2) -> float:
    """Relative error on the checked heads; refuse to go on if it is over ``tol``."""
    err = max(R.relative_error(out[:, h:h + 1], ref[:, i:i + 1]) for i, h in enumerate(heads))
    if not err < tol:
        raise SystemExit(f"correctness check failed for {name}: relative error {err:.3e} >= {tol}; "
                         "no speedup reported")
    return err


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    return run


def _flex_runners(mask: torch.Tensor, nq: int, nk: int):
    """Compiled FlexAttention with ``mask`` ``[nq, nk]``, for two block sizes."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compiled graph per shape and mask: lift dynamo's recompile limit, which otherwise sends
    # later shapes to the unfused fallback (seen at H=28 after 8 shapes).
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    flex = torch.compile(flex_attention, dynamic=False)

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]
    runners = {}
    for bs in (128, (128, 64)):
        block_mask = create_block_mask(mask_mod, None, None, nq, nk, device="cuda", BLOCK_SIZE=bs)
        runners[str(bs)] = lambda q, k, v, bm=block_mask: flex(q, k, v, block_mask=bm, scale=1.0)
    return runners


class _Rows:
    def __init__(self, B: int, D: int, host_calls: int):
        self.B, self.D, self.host_calls, self.rows = B, D, host_calls, []

    def add(self, H, step, impl, fn, pairs, dense_pairs, err, base=None, flex=None, host=False) -> float:
        t = time_gpu(fn, eager=True, host_calls=self.host_calls if host else 0)
        row = {"heads": H, "step": step, "impl": impl, "ms": round(t.ms, 4), "eager_ms": round(t.eager_ms, 4),
               "host_us": None if t.host_us is None else round(t.host_us, 1),
               "density": round(pairs / dense_pairs, 4),
               "tflops": round(4 * pairs * self.D * self.B * H / (t.ms * 1e-3) / 1e12, 1), "rel_err": err}
        if base is not None:
            row["x_vs_cudnn"] = round(base / t.ms, 2)
        if flex is not None:
            row["x_vs_flex"] = round(flex / t.ms, 2)
        self.rows.append(row)
        return t.ms


def run_attention_benchmark(heads=(16, 28), steps=(10, 11, 12), out_dir: str | Path = "bench/results",
                            flex: bool = True, host_calls: int = 1000) -> dict:
    """Benchmark every kernel kind at Infinity 1024 (B=2, D=128, bf16) and write
    ``<out_dir>/<gpu>/attention.json``. Returns the result dict."""
    from torch.nn.attention import SDPBackend

    if not torch.cuda.is_available():
        raise SystemExit("the attention benchmark needs a CUDA GPU")
    s, B, D = R.infinity_schedule(), 2, 128
    plan = R.default_plan(s, 32)
    d, csla, cs4a = plan.decision_scale, plan.csla, plan.cs4a
    rows = _Rows(B, D, host_calls)
    result = {"gpu": gpu_name(), **software_versions(), "date": time.strftime("%Y-%m-%d"),
              "timing": "ms: CUDA graph replay median; eager_ms: do_bench median of eager calls; host_us: median "
                        "host time per eager call",
              "shape": {"B": B, "D": D, "dtype": "bfloat16", "schedule": s.name}, "rows": rows.rows}
    path = Path(out_dir) / sanitize(gpu_name()) / "attention.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    one = lambda *ts: (t[:, :1].double() for t in ts)  # noqa: E731 - the checked (batch, head) slice
    for H in heads:
        # One KV cache for the schedule: later steps continue the decision step's keys.
        _, k_all, v_all = R.step_inputs(s, s.num_scales - 1, B, H, D, dtype=torch.bfloat16, device="cuda", seed=H)
        q_all = R.step_inputs(s, s.num_scales - 1, B, H, D, dtype=torch.bfloat16, device="cuda", seed=H + 1)[1]

        def inputs(step):
            lo, hi = s.offsets[step], s.offsets[step + 1]
            return q_all[:, :, lo:hi], k_all[:, :, :hi], v_all[:, :, :hi]
        # The runtime's dispatcher runs layer 0's decision step; its state feeds the sparse rows.
        attn = StepDispatcher(plan, s)
        attn(0, d, *inputs(d))
        state = attn.state(0)
        for step in steps:
            q, k, v = inputs(step)
            dense_pairs = s.num_queries(step) * s.num_keys(step)
            ref_dense = R.dense_attention(*one(q, k, v), 1.0)
            base = {}
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                fn = _sdpa(backend)
                err = _check(name, fn(q, k, v), ref_dense)
                base[name] = rows.add(H, step, name, lambda: fn(q, k, v), dense_pairs, dense_pairs, err,
                                      base.get("sdpa_cudnn"))
            cudnn = base["sdpa_cudnn"]
            mask = R.csla_mask(s, step, csla).cuda()
            ref = R.masked_attention(*one(q, k, v), mask, 1.0)[0]
            pairs = R.csla_pairs(s, step, csla)
            flex_ms = None
            if flex:
                best = None
                for bs, fn in _flex_runners(mask, s.num_queries(step), s.num_keys(step)).items():
                    err = _check(f"flex csla {bs}", fn(q, k, v), ref)
                    t = time_gpu(lambda: fn(q, k, v)).ms
                    if best is None or t < best[0]:
                        best = (t, bs, fn, err)
                flex_ms = rows.add(H, step, f"flex_csla[{best[1]}]", lambda: best[2](q, k, v), pairs, dense_pairs,
                                   best[3], cudnn)
            err = _check("csla", K.csla_attention(q, k, v, s, step, csla), ref)
            rows.add(H, step, "ours_csla", lambda: K.csla_attention(q, k, v, s, step, csla), pairs, dense_pairs, err,
                     cudnn, flex_ms, host=True)
            if step == d:
                ref = R.cs4a_decide(*one(q, k, v), s, d, cs4a, 1.0)[0]
                err = _check("cs4a_decide", K.cs4a_decide(q, k, v, s, d, cs4a)[0], ref)
                rows.add(H, step, "ours_cs4a_decide", lambda: K.cs4a_decide(q, k, v, s, d, cs4a), dense_pairs,
                         dense_pairs, err, cudnn, host=True)
                _decision_parts(rows, q, k, v, s, d, cs4a, H, dense_pairs, cudnn)
            elif step > d:
                ref_state = R.CS4AState(d, state.kept[:, :1].long(), state.residual[:, :1].double())
                ref = R.cs4a_sparse(*one(q, k, v), s, step, cs4a, ref_state, 1.0)
                err = _check("cs4a_sparse", K.cs4a_sparse(q, k, v, s, step, cs4a, state), ref)
                rows.add(H, step, "ours_cs4a_sparse", lambda: K.cs4a_sparse(q, k, v, s, step, cs4a, state),
                         R.cs4a_pairs(s, step, cs4a), dense_pairs, err, cudnn, host=True)
                rows.add(H, step, "runtime_cs4a_sparse", lambda: attn(0, step, q, k, v),
                         R.cs4a_pairs(s, step, cs4a), dense_pairs, float("nan"), cudnn, host=True)
            torch.cuda.empty_cache()
            path.write_text(json.dumps(result, indent=2))  # rows so far: a run cut short keeps them
    print_table(result)
    print(f"wrote {path}")
    return result


def _decision_parts(rows: _Rows, q, k, v, s, d, cs4a, H, dense_pairs, cudnn) -> None:
    """Time each pass of the decision step alone, to show where its time goes."""
    nq, nk = q.shape[2], k.shape[2]
    out, lse, _ = K.dense_with_lse(q, k, v)
    scores = K.scores_from_lse(q, k, lse, 1.0, cs4a.group_size)
    n_keep = R.num_keep(nk, cs4a.keep_ratio)
    kept = K.select_keys(scores, n_keep)
    parts = {
        "part_dense_lse": (lambda: K.dense_with_lse(q, k, v), nq * nk),
        "part_scores": (lambda: K.scores_from_lse(q, k, lse, 1.0, cs4a.group_size), nq * nk / 2),
        "part_topk": (lambda: K.select_keys(scores, n_keep), 0),
        "part_select_residual": (lambda: K.selected_residual(q, k, v, s, d, cs4a, kept, out), nq * n_keep),
    }
    for name, (fn, pairs) in parts.items():
        rows.add(H, d, name, fn, pairs, dense_pairs, float("nan"), cudnn)


def print_table(result: dict) -> None:
    print(f"GPU {result['gpu']} | CUDA {result['cuda']} | torch {result['torch']} | triton {result['triton']}")
    print("ms = CUDA graph replay median; eager = do_bench median; host = us per eager call")
    print(f"{'H':>3} {'scale':>5} {'impl':<22} {'ms':>8} {'eager':>8} {'host us':>8} {'TFLOP/s':>8} "
          f"{'density':>8} {'vs cuDNN':>9} {'vs flex':>8}")
    for r in result["rows"]:
        host = "" if r.get("host_us") is None else f"{r['host_us']:.1f}"
        print(f"{r['heads']:>3} {r['step']:>5} {r['impl']:<22} {r['ms']:>8.4f} {r.get('eager_ms', 0):>8.4f} "
              f"{host:>8} {r['tflops']:>8.1f} {r['density']:>8.4f} {r.get('x_vs_cudnn', ''):>9} "
              f"{r.get('x_vs_flex', ''):>8}")
