"""Check the project's ears against references it was not built from: synthetic songs whose beats, bars, meter, key
and tempo drift are known (the demo generator's truth), and, on your own music, a second, different analyser.

  python check_analysis.py --synthetic 12            # beat / bar F-measure, tempo, meter, key, a drift followed
  python check_analysis.py --songs FOLDER            # agreement with essentia (pip install essentia; AGPL)

F-measures match within 70 ms (madmom's evaluation). Tempo agreement is within 4 %, folded by octaves; keys are
the same, relative, a fifth apart or other.
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np
from tqdm import tqdm

from beats import align, analyse, fifths_apart, major_of, track_beats
from listening import bar_fmeasure
from pairs_folder import find_songs, make_song, read_song

SAMPLE_RATE = 24000


def truth_figures(seed: int, meter: int, drift: float = 0.0, seconds: float = 16.0) -> dict:
    """One synthetic song analysed against its truth: beat and bar-line F, tempo error, meter and key right."""
    song = make_song(seed, seconds, SAMPLE_RATE, meter, drift)
    grid = analyse(song.audio, SAMPLE_RATE)
    true_tempo = 60.0 / float(np.median(np.diff(song.beats)))
    return dict(beat_f=bar_fmeasure(grid.beats, song.beats), bar_f=bar_fmeasure(grid.downbeats, song.downbeats),
                tempo_error=abs(grid.tempo / true_tempo - 1) if grid.tempo else math.inf,
                meter_right=float(grid.meter == meter), key_right=float(grid.key == song.key and not grid.minor),
                key_or_relative=float(major_of(grid.key, grid.minor) == song.key))


def drift_followed(seed: int, drift: float, seconds: float = 16.0) -> float:
    """A take of a song whose tempo sways by +-`drift` (a live take) laid on a steady take: the beat F of the
    aligned target, tracked afresh, against the steady input's true beats."""
    steady = make_song(seed, seconds, SAMPLE_RATE)
    drifting = make_song(seed, seconds + 4, SAMPLE_RATE, drift=drift)
    aligned, _ = align(drifting.audio, steady.audio, SAMPLE_RATE)
    return bar_fmeasure(track_beats(aligned, SAMPLE_RATE).beats, steady.beats)


def synthetic_report(count: int) -> list[str]:
    rows = [truth_figures(seed, 3 if seed % 3 == 2 else 4) for seed in tqdm(range(count), desc="synthetic songs")]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    follow = [drift_followed(100 + seed, 0.06) for seed in tqdm(range(max(1, count // 4)), desc="drifting songs")]
    return [f"synthetic songs: {count} (a third in 3/4)",
            f"beat F {mean['beat_f']:.3f}, bar-line F {mean['bar_f']:.3f}, tempo error {mean['tempo_error']:.2%}, "
            f"meter right {mean['meter_right']:.0%}, key right {mean['key_right']:.0%} (or its relative minor "
            f"{mean['key_or_relative']:.0%})",
            f"a +-6 % drift laid on a steady song: beat F {np.mean(follow):.3f} after alignment ({len(follow)} pairs)"]


def folded_agreement(a: float, b: float) -> bool:
    """Tempos within 4 % of each other, folded by octaves (x2, x1/2)."""
    return a > 0 and b > 0 and min(abs(math.log(a / b * f)) for f in (1, 2, 0.5)) <= math.log(1.04)


def key_relation(ours, theirs) -> str:
    """same, relative, fifth or other, between two (tonic, minor) keys."""
    if ours == theirs:
        return "same"
    a, b = major_of(*ours), major_of(*theirs)
    return "relative" if a == b else "fifth" if fifths_apart(a, b) == 1 else "other"


def essentia_report(folder: str) -> list[str]:
    try:
        import essentia.standard as es
    except ImportError:
        raise SystemExit("error: --songs needs the second analyser: pip install essentia (AGPL-3.0)") from None
    lines, tempo_ok, keys = ["| song | ours: tempo, meter, pulse | essentia: tempo, confidence | ours: key (p) | "
                             "essentia: key (strength) | tempo | key |", "|---|---|---|---|---|---|---|"], [], []
    for path in tqdm(find_songs(folder), desc="songs"):
        audio = read_song(path, 44100)
        grid = analyse(audio, 44100)
        bpm, _, confidence, _, _ = es.RhythmExtractor2013(method="multifeature")(audio)
        tonic, scale, strength = es.KeyExtractor(profileType="edma")(audio)
        theirs = (("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B").index(
            {"Db": "C#", "D#": "Eb", "Gb": "F#", "G#": "Ab", "A#": "Bb"}.get(tonic, tonic)), scale == "minor")
        tempo_ok.append(folded_agreement(grid.tempo, bpm))
        keys.append(key_relation((grid.key, grid.minor), theirs))
        lines.append(f"| {path.split('/')[-1]} | {grid.tempo:.1f}, {grid.meter}/4, {grid.confidence:.2f} | {bpm:.1f}, "
                     f"{confidence:.2f} | {grid.key_name} ({grid.key_confidence:.2f}) | {tonic} {scale} "
                     f"({strength:.2f}) | {'agree' if tempo_ok[-1] else 'differ'} | {keys[-1]} |")
    n = max(1, len(keys))
    lines.append(f"tempo within 4 % (octave-folded): {sum(tempo_ok)}/{len(tempo_ok)}; key same or relative "
                 f"{sum(k in ('same', 'relative') for k in keys) / n:.0%}, within a fifth "
                 f"{sum(k != 'other' for k in keys) / n:.0%}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="check on N synthetic songs")
    p.add_argument("--songs", default=None, metavar="FOLDER", help="compare with essentia on the songs in FOLDER")
    args = p.parse_args(argv)
    if not args.synthetic and not args.songs:
        p.error("give --synthetic N, --songs FOLDER or both")
    lines = (synthetic_report(args.synthetic) if args.synthetic else []) + (
        essentia_report(args.songs) if args.songs else [])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
