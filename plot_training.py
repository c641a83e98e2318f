"""Training curves of one or more runs from their metrics.jsonl, overlaid in one PNG.

  python plot_training.py logs/RUN_A logs/RUN_B --out curves.png
"""
from __future__ import annotations

import argparse
import json
import sys

from run_log import plot_runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="log folders of runs (each holding metrics.jsonl)")
    p.add_argument("--out", default="training_curves.png", help="PNG to write (default training_curves.png)")
    args = p.parse_args(argv)
    try:
        plot_runs(args.runs, args.out)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
