"""Compare trained approaches (creative agent, fixed masks, no masking) on the validation pairs of a pairs folder.

  python evaluate.py --checkpoints agent=checkpoints/A/checkpoint_best.pt temporal=checkpoints/T/checkpoint_best.pt \\
                     none=checkpoints/N/checkpoint_best.pt --dataset_folder dataset_wav_pairs --out eval

Writes OUT/metrics.csv, OUT/report.md (which approach is best on each metric), OUT/audio/ (input, target and each
approach's output for a few pairs), OUT/plots/ (mask pictures per approach and a comparison figure).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time

import torch

from arrange import arrange_latents, plot_masks, save_wave
from audio_codec import CodecUnavailable
from losses import log_spectral_distance, mask_metrics, reconstruction_loss
from pairs_dataset import BadDataError, WavPairsDataset
from train_simple_worker import CheckpointError, load_checkpoint, loss_weights, model_from_checkpoint

# column, how to pick the best ("min", "max", or a value to be closest to), what it means
METRICS = (
    ("val_loss", "min", "validation loss (the training objective without mask regularisation)"),
    ("wave_input", "min", "RMS of output - input"),
    ("wave_target", "min", "RMS of output - target"),
    ("lsd_input_db", "min", "log-spectral distance of the output to the input (dB)"),
    ("lsd_target_db", "min", "log-spectral distance of the output to the target (dB)"),
    ("complementarity", "max", "complementarity of the masks (%)"),
    ("coverage", 100.0, "coverage of the masks (%, 100 is ideal)"),
    ("balance", 0.5, "share of the input in the masks (0.5 is even)"),
    ("mask_variability", "max", "how much the masks differ from pair to pair (0: one pattern for all)"),
    ("seconds_per_audio_minute", "min", "processing seconds per minute of audio"),
)


def parse_named(items: list[str]) -> list[tuple[str, str]]:
    named = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--checkpoints takes NAME=PATH, got {item!r}")
        named.append((name, path))
    if len({n for n, _ in named}) != len(named):
        raise ValueError("each --checkpoints NAME must be unique")
    return named


@torch.no_grad()
def evaluate_one(state: dict, path: str, dataset: WavPairsDataset, num_examples: int, batch_size: int = 4):
    """Metrics of one checkpoint over the validation pairs, and the example outputs and masks."""
    model, codec, norm = model_from_checkpoint(state, path)
    config = state["config"]
    sr, segment = config["sample_rate"], config["segment_samples"]
    sums, count, seconds, patterns, examples = {}, 0, 0.0, [], []
    for start in range(0, len(dataset), batch_size):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inp, tgt = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        begin = time.perf_counter()
        out, masks, attention = arrange_latents(model, codec, norm, inp, tgt,
                                                keep_attention=model.use_creative_agent and start == 0)
        seconds += time.perf_counter() - begin
        loss, terms = reconstruction_loss(out, inp, tgt, sr, loss_weights(config))
        metrics = mask_metrics(*masks)
        values = dict(val_loss=float(loss), wave_input=float(terms.get("wave_input", 0.0)),
                      wave_target=float(terms.get("wave_target", 0.0)),
                      lsd_input_db=float(log_spectral_distance(out, inp)),
                      lsd_target_db=float(log_spectral_distance(out, tgt)), **metrics)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * len(batch)
        count += len(batch)
        patterns.append(masks[0].float())
        for j in range(len(batch)):
            if start + j < num_examples:
                att = attention[j] if attention is not None else None
                examples.append((start + j, inp[j, 0], tgt[j, 0], out[j, 0], (masks[0][j], masks[1][j]), att))
    row = {key: value / count for key, value in sums.items()}
    row["mask_variability"] = float(torch.cat(patterns).std(dim=0).mean()) if count > 1 else 0.0
    row["seconds_per_audio_minute"] = seconds / (count * segment / sr / 60)
    row["pairs"] = count
    return row, examples, (sr, codec.hop_length)


def best_of(rows: dict[str, dict], key: str, goal) -> str:
    score = {"min": lambda v: v, "max": lambda v: -v}.get(goal, lambda v: abs(v - goal))
    return min(rows, key=lambda name: score(rows[name][key]))


def write_report(out: str, rows: dict[str, dict], dataset_folder: str, pairs: int) -> None:
    keys = [k for k, _, _ in METRICS]
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["approach"] + keys)
        for name, row in rows.items():
            writer.writerow([name] + [f"{row[k]:.6g}" for k in keys])
    lines = [f"# Evaluation on {dataset_folder} ({pairs} validation pairs)", "",
             "| approach | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |" for name, row in rows.items()]
    lines += ["", "## Best per metric", ""]
    for key, goal, meaning in METRICS:
        best = best_of(rows, key, goal)
        lines.append(f"- **{key}** ({meaning}): **{best}** scores best with {rows[best][key]:.4g}.")
    lines += ["", "Audio examples are in `audio/`, mask pictures in `plots/`, the comparison in "
              "`plots/comparison.png`.", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def plot_comparison(path: str, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(16, 6), constrained_layout=True)
    for ax, (key, _, meaning) in zip(axes.flat, METRICS):
        ax.bar(list(rows), [rows[n][key] for n in rows], color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(key, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("Approaches compared on the validation pairs")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=CKPT", help="approaches to compare")
    p.add_argument("--dataset_folder", default="dataset_wav_pairs", help="pairs folder (its val/ split is used)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num_examples", type=int, default=4, help="pairs written as audio and mask pictures")
    args = p.parse_args(argv)
    try:  # check everything before writing anything
        if os.path.exists(args.out) and os.listdir(args.out) and not os.path.isfile(
                os.path.join(args.out, "report.md")):
            raise ValueError(f"{args.out} exists and is not an earlier evaluation; choose another --out")
        named = parse_named(args.checkpoints)
        states = {name: load_checkpoint(path) for name, path in named}
        datasets = {}  # checked once per (sample rate, segment length), however many approaches share it
        results = {}
        for name, path in named:
            key = (states[name]["config"]["sample_rate"], states[name]["config"]["segment_samples"])
            if key not in datasets:
                datasets[key] = WavPairsDataset(os.path.join(args.dataset_folder, "val"), *key)
            results[name] = evaluate_one(states[name], path, datasets[key], args.num_examples)
    except (ValueError, CheckpointError, BadDataError, FileNotFoundError, CodecUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".evaluate_", dir=parent)  # filled, then moved into place
    try:
        os.makedirs(os.path.join(work, "audio"))
        os.makedirs(os.path.join(work, "plots"))
        for name, (_, examples, (sr, hop)) in results.items():
            for index, inp, tgt, out, masks, attention in examples:
                stem = f"pair_{index:04d}"
                for role, wave in (("input", inp), ("target", tgt)):
                    source = os.path.join(work, "audio", f"{stem}_{role}.wav")
                    if not os.path.exists(source):  # the same for every approach of this rate
                        save_wave(source, wave, sr)
                save_wave(os.path.join(work, "audio", f"{stem}_{name}.wav"), out, sr)
                plot_masks(os.path.join(work, "plots", f"{stem}_{name}_masks.png"), masks, inp, tgt, out, sr, hop,
                           attention, title=f"{name}: {stem}")
        rows = {name: result[0] for name, result in results.items()}
        plot_comparison(os.path.join(work, "plots", "comparison.png"), rows)
        write_report(work, rows, args.dataset_folder, results[named[0][0]][0]["pairs"])
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)  # an earlier evaluation (checked above)
        os.replace(work, args.out)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work)
    print(open(os.path.join(args.out, "report.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
