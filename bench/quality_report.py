"""``bench/results/quality.json`` from a ``sparvar eval`` and a ``sparvar analyze`` run of the
trained small model, with the issue's targets checked:

    sparvar eval --seeds 0 1 2 3 --out EVAL && sparvar analyze --out ANALYSIS
    python bench/quality_report.py EVAL ANALYSIS [GPU]

Targets: the default plan at least 28 dB PSNR against dense and at least 8 dB above dense with the
last two scales skipped; mean attention-mass recall of the default plan at least 0.9.
"""

import json
import sys
from pathlib import Path

from sparvar.configs import write_json_atomic
from sparvar.small import load_small


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def main(eval_dir: str, analysis_dir: str, gpu: str = "NVIDIA H200") -> None:
    ev = json.loads((Path(eval_dir) / "eval.json").read_text())
    an = json.loads((Path(analysis_dir) / "analysis.json").read_text())
    rows = {r["row"]: r for r in ev["rows"]}
    default, skip2 = rows["default"], rows["dense_skip_last_2"]
    grids = an["schedule"]

    def keys(s):
        return sum(h * w for h, w in grids[:s + 1])
    summary = {
        "sink_mass_by_scale": {s: _mean([v[str(s)] for v in an["sinks"].values()]) for s in an["steps"]},
        "similarity_by_pair": {p: _mean([v.get(p) for v in an["similarity"].values()])
                               for p in next(iter(an["similarity"].values()))},
        # Probability of one same-scale key at each Chebyshev distance, times the number of keys
        # (1: uniform attention), mean over layers.
        "locality_vs_uniform": {s: [keys(s) * _mean([v[str(s)][r] for v in an["locality"].values()])
                                    for r in range(an["max_distance"] + 1)] for s in an["steps"][-3:]},
        "recall_by_layer": {layer: _mean(list(v.values())) for layer, v in an["recall"].items()},
    }
    targets = {
        "default_psnr_db >= 28": default["psnr_db"] >= 28,
        "default_psnr_db - skip_last_2_psnr_db >= 8": default["psnr_db"] - skip2["psnr_db"] >= 8,
        "default mean_recall >= 0.9": default["mean_recall"] >= 0.9,
    }
    out = {"gpu": gpu, "model": "small", "training": load_small().meta["training"],
           "eval": {k: v for k, v in ev.items() if k != "rows"},
           "rows": [{k: v for k, v in r.items() if k not in ("attention_rel_error", "recall", "plan")}
                    for r in ev["rows"]],
           "analysis": {"sink_scales": an["sink_scales"], **summary}, "targets_met": targets}
    path = write_json_atomic(Path(__file__).parent / "results" / "quality.json", out, indent=1)
    print(f"wrote {path}")
    for name, met in targets.items():
        print(f"{'met ' if met else 'MISSED'} {name}")


if __name__ == "__main__":
    main(*sys.argv[1:])
