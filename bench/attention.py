"""Attention benchmark at Infinity 1024 shapes on the current GPU (see sparvar/benchmark.py).

    python bench/attention.py [--heads 16 28] [--steps 10 11 12] [--no-flex]

Checks correctness first, prints a table and writes bench/results/<gpu>/attention.json.
"""

import argparse

from sparvar.benchmark import run_attention_benchmark

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 28])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 11, 12])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes)")
    args = ap.parse_args()
    run_attention_benchmark(args.heads, args.steps, args.out, flex=not args.no_flex)
