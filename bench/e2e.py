"""End-to-end generation benchmark on the current GPU (see sparvar/e2e.py); writes
bench/results/<gpu>/e2e.json.

    python bench/e2e.py [--models infinity-2b infinity-8b] [--resolutions 1024x1024 1152x864] [--smoke]
"""

import argparse

from sparvar.e2e import run_e2e

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["infinity-2b", "infinity-8b"])
    ap.add_argument("--resolutions", nargs="+", default=["1024x1024"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--smoke", action="store_true", help="CPU, a small model: checks the run, times nothing")
    args = ap.parse_args()
    run_e2e(args.models, args.resolutions, args.runs, args.out, args.smoke)
