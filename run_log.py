"""A run's logs: metrics.jsonl (one JSON record per epoch, rewritten atomically), TensorBoard events beside it and
a picture of the training curves; plot_training.py draws the same curves for several runs. And how every file of
the project is written: atomically (`replaced`, `atomic_write`), so a crash never leaves a partial one."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager


@contextmanager
def replaced(path: str):
    """A temporary path beside `path`, with its extension (writers that go by it still can), to write to: when the
    block ends without an error it replaces `path`; otherwise it is removed."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, write) -> None:
    """Write through `write(file)` into a temporary file beside `path`, flush, fsync, then rename over `path`."""
    with replaced(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


PANELS = (("train_loss", "val_loss"), ("train_mask_reg_loss", "mask_reg_loss"), ("input_share",), ("both_heard",),
          ("temporal_variation",), ("complementarity",), ("coverage",), ("balance",))


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
                    label = name if len(keys) == 1 else f"{name} {'train' if key.startswith('train') else 'val'}"
                    ax.plot(x, y, style, color=f"C{i}", marker="o", markersize=3, label=label)
        ax.set_title(" / ".join(keys) + (" (%)" if keys[0] in ("complementarity", "coverage") else ""))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    with replaced(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


class RunLog:
    """The log folder of one run, written by rank 0 after every epoch."""

    def __init__(self, folder: str, log=print):
        self.folder, self.log = folder, log
        self.history: list[dict] = []
        self.writer = None

    def resume(self, epoch: int) -> None:
        """Keep the records up to `epoch` (a resumed run rewrites what came after its checkpoint)."""
        if os.path.isfile(os.path.join(self.folder, "metrics.jsonl")):
            self.history = [r for r in read_metrics(self.folder) if r["epoch"] <= epoch]

    def write(self, record: dict) -> None:
        """Add one epoch's record to metrics.jsonl and TensorBoard, and draw the curves again."""
        self.history.append(record)
        os.makedirs(self.folder, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write(os.path.join(self.folder, "metrics.jsonl"), lambda f: f.write(text.encode()))
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.folder)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()
        try:
            plot_runs([self.folder], os.path.join(self.folder, "training_curves.png"))
        except Exception as err:  # a picture must never stop a training run
            self.log(f"⚠️  training_curves.png not written: {err}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
