"""Training curves of one or more runs from their metrics.jsonl, overlaid in one PNG.

  python plot_training.py logs/RUN_A logs/RUN_B --out curves.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

PANELS = (("train_loss", "val_loss"), ("mask_reg_loss",), ("input_share",), ("temporal_variation",),
          ("complementarity",), ("coverage",), ("balance",))


def read_metrics(run_dir: str) -> list[dict]:
    """The per-epoch records of a run folder (or of a metrics.jsonl path)."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run's log folder?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(run_dirs: list[str], out: str) -> None:
    """One panel per metric group; a line per run (solid train / dashed val for the losses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(os.path.basename(os.path.normpath(d)), read_metrics(d)) for d in run_dirs]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.2 * len(PANELS), 3.2), constrained_layout=True)
    for ax, keys in zip(axes, PANELS, strict=True):
        for i, (name, records) in enumerate(runs):
            for key, style in zip(keys, ("-", "--"), strict=False):
                points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    x, y = zip(*points, strict=True)
                    label = name if len(keys) == 1 else f"{name} {key.split('_')[0]}"
                    ax.plot(x, y, style, color=f"C{i}", marker="o", markersize=3, label=label)
        ax.set_title(" / ".join(keys) + (" (%)" if keys[0] in ("complementarity", "coverage") else ""))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    tmp = f"{out}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)


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
