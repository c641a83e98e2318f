"""Compare approaches on whole songs, as arrange.py is used: every ordered pair of different songs of a folder
arranged by each approach, and judged from the output audio (the phrase figures, the bars tracked afresh, the
harmony where both are heard).

  python compare_songs.py --songs FOLDER --out compare \\
      --approaches beats2=temporal:0 bars4=temporal:4 mashability=mashability agent=checkpoints/A/checkpoint_best.pt

An approach is NAME=RULE[:BARS] (a rule of arrange.py --rule, sections of BARS bars, 0: of 2 beats) or NAME=CKPT (a
checkpoint). Writes OUT/rows.csv (one row per pair and approach) and OUT/summary.md (the mean and the spread
between pairs of each figure per approach), and prints the summary.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from beats import AlignmentError
from checkpoints import CheckpointError
from fixed_masks import RULES
from inference import Arranger, Request, load_audio
from listening import bars_heard, layering, phrase_figures
from pairs_folder import find_songs
from phrases import phrase_starts, song_phrases

FIGURES = (("changes_per_min", "changes a minute"), ("change_bars", "bars between changes (median)"),
           ("on_phrase", "changes on a phrase start"), ("seam", "seam (1: as smooth as a beat)"),
           ("on_bar_afresh", "switches on bar lines, tracked afresh"),
           ("output_bars_f", "the input's bars heard in the output (F)"),
           ("harmony_match", "harmony match where both are heard"), ("fit", "mashability of the chosen pieces"))


def arranger_of(spec: str, sample_rate: int) -> Arranger:
    """An approach: RULE[:BARS] or a checkpoint's path."""
    rule, _, bars = spec.partition(":")
    if rule in RULES:
        return Arranger.rule(rule, sample_rate, section_beats=2, section_bars=int(bars or 1))
    return Arranger.load(spec)


def judge(arranger: Arranger, song: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """The figures of one arrangement of `song` with `other` [S], from its audio."""
    sr = arranger.sample_rate
    result = arranger.arrange(Request(song, other))
    out, inp, tgt = result.output.numpy(), result.input.numpy(), result.target.numpy()
    bars, phrases = ((result.plan.bars, result.plan.phrases) if result.plan
                     else song_phrases(inp, result.grid, sr))
    row = phrase_figures((out, inp, tgt), phrase_starts(bars, phrases), bars.lines, sr)
    heard = bars_heard(out, inp, tgt, sr, result.grid.downbeats)
    fits = [s.fit.total for s in result.plan.steps if s.fit] if result.plan else []
    return {**row, "on_bar_afresh": heard["on_bar_afresh"], "output_bars_f": heard["output_bars_f"],
            "harmony_match": layering(out, inp, tgt, sr)["harmony_match"],
            "fit": float(np.mean(fits)) if fits else math.nan}


def summary(rows: list[dict]) -> str:
    """A markdown table: per approach, each figure's mean ± its spread (std) over the pairs."""
    names = list(dict.fromkeys(r["approach"] for r in rows))
    lines = ["| figure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key, label in FIGURES:
        cells = []
        for name in names:
            values = np.asarray([r[key] for r in rows if r["approach"] == name and math.isfinite(r[key])])
            cells.append(f"{values.mean():.2f} ± {values.std():.2f}" if len(values) else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    pairs = len({r["pair"] for r in rows})
    return "\n".join(lines + ["", f"{pairs} ordered pairs of different songs; mean ± spread between pairs."])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--songs", required=True, help="a folder of songs (any format soundfile reads)")
    p.add_argument("--approaches", nargs="+", required=True, metavar="NAME=SPEC",
                   help="RULE[:BARS] (e.g. temporal:0, temporal:4, mashability) or a checkpoint's path")
    p.add_argument("--out", required=True, help="the folder to write rows.csv and summary.md to")
    p.add_argument("--sample_rate", type=int, default=24000, help="the rules' rate (checkpoints keep their own)")
    p.add_argument("--max_songs", type=int, default=4, help="songs used, the first in name order (default 4)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        approaches = [(name, arranger_of(spec, args.sample_rate))
                      for name, _, spec in (a.partition("=") for a in args.approaches)]
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    songs = find_songs(args.songs)[: args.max_songs]
    if len(songs) < 2:
        print(f"error: {args.songs}: needs at least 2 songs, found {len(songs)}", file=sys.stderr)
        return 2
    rows, audio = [], {}  # each song read once per sample rate
    pairs = list(itertools.permutations(songs, 2))
    for (a, b), (name, arranger) in tqdm(list(itertools.product(pairs, approaches)), desc="arranging"):
        sr = arranger.sample_rate
        for path in (a, b):
            audio.setdefault((path, sr), load_audio(path, sr))
        pair = f"{os.path.basename(a)} x {os.path.basename(b)}"
        try:
            row = judge(arranger, audio[a, sr], audio[b, sr])
        except AlignmentError as err:
            tqdm.write(f"{pair}: skipped ({err})")
            continue
        rows.append({"pair": pair, "approach": name, **row})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rows.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = summary(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
