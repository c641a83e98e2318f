"""Compare trained approaches (creative agent, fixed masks, no masking) on the validation pairs of a pairs folder.

  python evaluate.py --checkpoints agent=checkpoints/A/checkpoint_best.pt temporal=checkpoints/T/checkpoint_best.pt \\
                     none=checkpoints/N/checkpoint_best.pt --dataset_folder dataset_wav_pairs --out eval

Writes OUT/report.html (one page to listen on: the table, and per example pair the input, the target and each
approach's arrangement beside its mask picture; open it in a browser, no server needed), OUT/metrics.csv,
OUT/report.md (which approach is best on each metric), OUT/audio/ and OUT/plots/ (mask pictures per approach
and a comparison figure).
"""
from __future__ import annotations

import argparse
import csv
import html
import os
import shutil
import sys
import tempfile
import time
from urllib.parse import quote

import torch
from tqdm import tqdm

from audio_codec import CodecUnavailable
from beats import align, bar_of, lay_on_grid
from checkpoints import CheckpointError
from config import SILENCE_DB
from creative_agent import component_names, takes_stems
from inference import Arranger, MaskPicture, arrange_latents, plot_masks, ride_fader, save_wave
from listening import IN_TIME_KEYS, LAYER_KEYS, heard_in_time_and_layers, mean_in_time
from losses import mask_variability, reconstruction_loss
from objective import Scored, figures, loss_weights
from pairs_dataset import BadDataError, WavPairsDataset, pair_name
from records import Conditions

# column, how to pick the best ("min", "max", or a value to be closest to), what it means
METRICS = (
    ("input_share", 0.5, "the input's share of what is heard, from the output audio (0 = only the target)"),
    ("rms_ratio", 1.0, "RMS(output - input) / RMS(output - target): 1 is as far from one song as from the other"),
    ("lsd_max_db", "min", "log-spectral distance to the farther of the two songs (dB, over the 80 dB below the "
     "loudest): closer to both at once"),
    ("switches_per_s", "min", "how often the arrangement switches songs, from the audio (per second)"),
    ("section_s", "max", "median section between two switches (s)"),
    ("section_in_beats", "max", "median section in beats of the input"),
    ("on_beat", "max", "share of switches within 70 ms of an input beat"),
    ("on_beat_chance", "min", "the share random switch times would get (for scale)"),
    ("loudness_jump_db", "min", "median level change across a switch, 0.2 s either side (dB)"),
    ("input_jump_db", "min", "the input's own level change at the same times (dB; for scale)"),
    ("tempo_ratio", 1.0, "tempo of the output / tempo of the input"),
    ("both_heard", "max", "share of the time both songs are heard at once (a frame's input share in 0.2..0.8)"),
    ("rhythm_input_share", 0.5, "the input's share of the output's rhythm (percussive layer; 1: the input's rhythm)"),
    ("harmony_input_share", 0.5, "the input's share of the output's harmony (harmonic layer)"),
    ("harmony_match", "max", "where both are heard, how alike the two songs' chroma are (low: the layers clash)"),
    ("temporal_variation", "max", "how much the input mask changes over time (0: static, 0.5: even alternation)"),
    ("mask_variability", "max", "how much the masks differ from pair to pair (0: one pattern for all)"),
    ("val_loss", "min", "validation loss (the reconstruction objective, without mask regularisation)"),
    ("rms_in", "min", "RMS of output - input"),
    ("rms_tgt", "min", "RMS of output - target"),
    ("lsd_in_db", "min", "log-spectral distance of the output to the input (dB)"),
    ("lsd_tgt_db", "min", "log-spectral distance of the output to the target (dB)"),
    ("complementarity", "max", "complementarity of the masks (%)"),
    ("coverage", 100.0, "coverage of the masks (%, 100 is ideal)"),
    ("balance", 0.5, "share of the input in the mask area (0.5 is even)"),
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


def manifest_songs(folder: str) -> dict[str, str]:
    """Validation pair name -> its song, from the pairs folder's manifest.csv (empty without one)."""
    path = os.path.join(folder, "manifest.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {row["pair"]: row["song"] for row in csv.DictReader(f) if row.get("split") == "val"}


def validation_examples(dataset: WavPairsDataset, cross_song: bool = False, songs: dict | None = None) -> list:
    """The items of every validation pair (WavPairsDataset: input, target, input's beats, and the rhythm stems of
    both where the pairs carry them). `cross_song`: each input with the output segment of a pair from another song
    (`songs`: pair name -> song, from manifest.csv; without one, the pair half the set away), laid on the input's
    grid (tempo, beats, key, loudness) with the grids of beats.json, as arrange.py lays two songs."""
    examples = [dataset[i] for i in range(len(dataset))]
    if not cross_song:
        return examples
    names = [pair_name(inp) for inp, _ in dataset.pairs]
    crossed = []
    for i, example in enumerate(tqdm(examples, desc="aligning cross-song pairs", unit="pair", leave=False)):
        order = [(i + len(examples) // 2 + k) % len(examples) for k in range(len(examples))]
        others = [j for j in order if songs and songs.get(names[j]) != songs.get(names[i])] or order[:1]
        j, inp = others[0], example["input"]
        target = examples[j]["target"]
        grids = dataset.grid(j, "output", target), dataset.grid(i, "input", inp)
        aligned, alignment = align(target[0].numpy(), inp[0].numpy(), dataset.sample_rate, grids, tolerant=True)
        crossed.append({**example, "target": torch.from_numpy(aligned)[None]})
        if "rhythm" in example:  # the other song's rhythm, laid as its song was
            laid = lay_on_grid(examples[j]["rhythm"][1, 0].numpy(), alignment, inp.shape[-1], dataset.sample_rate)
            crossed[-1]["rhythm"] = torch.stack([example["rhythm"][0], torch.from_numpy(laid)[None]])
    return crossed


@torch.no_grad()
def evaluate_one(arranger: Arranger, examples: list, num_examples: int, batch_size: int = 4,
                 balance: float = 0.5, hard: bool = False):
    """Metrics of one checkpoint over the validation examples (validation_examples), and the example outputs and
    masks. A creative agent aims at the input share `balance` and, with `hard`, decides 0/1; the baselines have
    no such settings. The layering agent takes the examples' rhythm stems as its layers where they have them."""
    model, codec, config = arranger.model, arranger.codec, arranger.config
    balance = balance if model.use_creative_agent else None
    hard = hard and model.use_creative_agent
    sr, segment = config.sample_rate, config.segment_samples
    sums, count, seconds, patterns, shown, timing = {}, 0, 0.0, [], [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inp, tgt, beats, bars = (torch.stack([b[k] for b in batch]) for k in ("input", "target", "beats", "bars"))
        stems = "rhythm" in batch[0] and takes_stems(model)
        rhythm = torch.stack([b["rhythm"] for b in batch]).unbind(1) if stems else None
        sections = model.sections(beats, codec.num_frames(inp.shape[-1]), sr / codec.hop_length, bars)
        begin = time.perf_counter()
        asked = Conditions(hard, balance, sections=sections, attention=model.use_creative_agent and start == 0)
        out, mix = arrange_latents(arranger, inp, tgt, asked, rhythm)
        masks, attention = mix.masks, mix.attention
        if sections is not None:  # the fader ridden at every switch, as arrange.py does
            out = torch.stack([ride_fader(model, o[0], m, s, codec.hop_length, sr)
                               for o, m, s in zip(out, masks[0], sections, strict=True)])[:, None]
        seconds += time.perf_counter() - begin
        loss, _ = reconstruction_loss(out, inp, tgt, sr, loss_weights(config))
        values = figures(Scored(loss, {"recon_loss": loss}, out, inp, tgt, masks))  # as training's validation
        values["val_loss"] = values.pop("loss")
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * len(batch)
        count += len(batch)
        patterns.append(masks[0].float())
        for j in range(len(batch)):
            waves = (out[j, 0].numpy(), inp[j, 0].numpy(), tgt[j, 0].numpy())
            timing.append(heard_in_time_and_layers(*waves, beats[j].numpy(), sr, bar_of(bars[j])))
            if start + j < num_examples:
                att = attention[j] if attention is not None else None
                shown.append((start + j, MaskPicture((masks[0][j], masks[1][j]), inp[j, 0], tgt[j, 0], out[j, 0], att,
                                                     beats[j][torch.isfinite(beats[j])].numpy(),
                                                     None if sections is None else sections[j])))
    row = {key: value / count for key, value in sums.items()}
    row.update(mean_in_time(timing, IN_TIME_KEYS + LAYER_KEYS))
    row["mask_variability"] = mask_variability(torch.cat(patterns))
    row["rms_ratio"] = row["rms_in"] / max(row["rms_tgt"], 1e-12)
    row["seconds_per_audio_minute"] = seconds / (count * segment / sr / 60)
    row["pairs"] = count
    return row, shown, (sr, codec.hop_length, component_names(model))


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
    lines += ["", "Listen and look in `report.html`; audio examples are in `audio/`, mask pictures in `plots/`, the "
              "comparison in `plots/comparison.png`.", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def write_html(out: str, rows: dict[str, dict], stems: list[str], dataset_folder: str, pairs: int) -> None:
    """report.html: the metrics table, then per example pair (stem: pair_XXXX, or cross_XXXX for a cross-song one)
    the input, the target and every approach's arrangement of it as audio players beside its mask picture.
    Self-contained: relative links only, no scripts."""
    keys = [k for k, _, _ in METRICS]
    best = {key: best_of(rows, key, goal) for key, goal, _ in METRICS}
    head = "".join(f'<th title="{html.escape(meaning)}">{key}</th>' for key, _, meaning in METRICS)
    body = "".join("<tr><th>" + html.escape(name) + "</th>" + "".join(
        f'<td{" class=best" if best[k] == name else ""}>{row[k]:.4g}</td>' for k in keys) + "</tr>"
        for name, row in rows.items())
    legend = "".join(f"<li><b>{key}</b>: {html.escape(meaning)}</li>" for key, _, meaning in METRICS)

    def player(stem: str, label: str) -> str:
        return (f'<figure><figcaption>{html.escape(label)}</figcaption>'
                f'<audio controls preload="none" src="audio/{quote(stem)}.wav"></audio></figure>')

    sections = []
    for stem in stems:
        cells = "".join(f'<div class="approach">{player(f"{stem}_{name}", name)}'
                        f'<a href="plots/{quote(f"{stem}_{name}_masks.png")}"><img alt="masks of {html.escape(name)}" '
                        f'src="plots/{quote(f"{stem}_{name}_masks.png")}"></a></div>' for name in rows
                        if os.path.isfile(os.path.join(out, "audio", f"{stem}_{name}.wav")))
        sections.append(f'<section><h2>{stem}</h2><div class="sources">{player(f"{stem}_input", "input")}'
                        f'{player(f"{stem}_target", "target")}</div><div class="grid">{cells}</div></section>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Creative Agent evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }} td.best {{ background: #d8f0d8; }}
.sources, .grid {{ display: flex; flex-wrap: wrap; gap: 1em; }} .approach {{ width: 460px; }}
.approach img {{ width: 100%; border: 1px solid #ddd; }} figure {{ margin: 0.3em 0; }}
figcaption {{ font-weight: bold; }} li {{ font-size: 0.9em; }} .wide {{ overflow-x: auto; }}
</style></head><body>
<h1>Evaluation on {html.escape(dataset_folder)} ({pairs} validation pairs)</h1>
<div class="wide"><table><tr><th>approach</th>{head}</tr>{body}</table></div>
<p>Green: the best approach on that metric.</p><ul>{legend}</ul>
<p><a href="plots/comparison.png">All metrics as bars</a> · <a href="metrics.csv">metrics.csv</a>
 · <a href="report.md">report.md</a></p>
{"".join(sections)}
</body></html>
"""
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(page)


def plot_comparison(path: str, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(-(-len(METRICS) // 7), 7, figsize=(20, 9), constrained_layout=True)
    for ax, (key, _, _) in zip(axes.flat, METRICS, strict=False):
        ax.bar(list(rows), [rows[n][key] for n in rows], color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(key, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("Approaches compared on the validation pairs")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=CKPT", help="approaches to compare")
    p.add_argument("--dataset_folder", default="dataset_wav_pairs", help="pairs folder (its val/ split is used)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num_examples", type=int, default=4, help="pairs written as audio and mask pictures")
    p.add_argument("--silence_db", type=float, default=SILENCE_DB,
                   help=f"refuse validation files whose RMS level is below this (default {SILENCE_DB:g} dBFS)")
    p.add_argument("--balance", type=float, default=0.5,
                   help="the input share each creative agent aims at, 0..1 (default 0.5); the fixed-mask and "
                        "unmasked baselines have no such setting and are evaluated as they are")
    p.add_argument("--hard", action="store_true", help="creative agents decide 0/1 (exactly complementary masks)")
    p.add_argument("--cross_song", action="store_true",
                   help="also arrange each validation input with a segment of another song, aligned to it (tempo, "
                        "beats, key, loudness) as arrange.py does: rows NAME@cross beside the same-song rows")
    args = p.parse_args(argv)
    if not 0.0 <= args.balance <= 1.0:
        p.error(f"--balance must lie in 0..1, got {args.balance:g}")
    return args


def score_all(args) -> dict:
    """Every checkpoint's (row, examples shown, (sample rate, hop), prefix), checked before anything is written."""
    if os.path.exists(args.out) and os.listdir(args.out) and not os.path.isfile(os.path.join(args.out, "report.md")):
        raise ValueError(f"{args.out} exists and is not an earlier evaluation; choose another --out")
    named = parse_named(args.checkpoints)
    arrangers = {name: Arranger.load(path) for name, path in named}
    for name, path in named:
        if arrangers[name].config.use_creative_agent:
            arrangers[name].path = f"{name} ({path})"
            arrangers[name].check_balance(args.balance)
    modes = [("pair", "", False)] + [("cross", "@cross", True)] * args.cross_song
    examples = {}  # read (and aligned) once per (sample rate, segment length, mode), however many approaches
    results = {}
    for prefix, suffix, cross in modes:
        for name, _ in named:
            config = arrangers[name].config
            key = (config.sample_rate, config.segment_samples, cross)
            if key not in examples:
                dataset = WavPairsDataset(os.path.join(args.dataset_folder, "val"), *key[:2],
                                          silence_db=args.silence_db, stems=True)
                examples[key] = validation_examples(dataset, cross, manifest_songs(args.dataset_folder))
            results[name + suffix] = (*evaluate_one(arrangers[name], examples[key], args.num_examples,
                                                    balance=args.balance, hard=args.hard), prefix)
    return results


def write_all(work: str, results: dict, dataset_folder: str) -> None:
    """Audio, mask pictures, the comparison figure, report.md and report.html into the folder `work`."""
    os.makedirs(os.path.join(work, "audio"))
    os.makedirs(os.path.join(work, "plots"))
    for name, (_, shown, (sr, hop, components), prefix) in results.items():
        for index, picture in shown:
            stem = f"{prefix}_{index:04d}"
            for role, wave in (("input", picture.input), ("target", picture.target)):
                source = os.path.join(work, "audio", f"{stem}_{role}.wav")
                if not os.path.exists(source):  # the same for every approach of this rate
                    save_wave(source, wave, sr)
            save_wave(os.path.join(work, "audio", f"{stem}_{name}.wav"), picture.output, sr)
            plot_masks(os.path.join(work, "plots", f"{stem}_{name}_masks.png"), picture, sr, hop, f"{name}: {stem}",
                       components)
    rows = {name: result[0] for name, result in results.items()}
    plot_comparison(os.path.join(work, "plots", "comparison.png"), rows)
    pairs = next(iter(rows.values()))["pairs"]
    write_report(work, rows, dataset_folder, pairs)
    stems = sorted({f"{prefix}_{example[0]:04d}" for _, shown, _, prefix in results.values() for example in shown})
    write_html(work, rows, stems, dataset_folder, pairs)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = score_all(args)
    except (ValueError, CheckpointError, BadDataError, FileNotFoundError, CodecUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".evaluate_", dir=parent)  # filled, then moved into place
    try:
        write_all(work, results, args.dataset_folder)
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
