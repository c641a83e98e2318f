"""Build a pairs folder (train/ and val/ of pair_XXXX_input.wav + pair_XXXX_output.wav, manifest.csv).

  python make_pairs.py --demo --out dataset_wav_pairs                 # small synthetic set, no download
  python make_pairs.py --from_folder ~/Music --out my_pairs           # your songs: wav, flac, ogg, mp3 ...
  python make_pairs.py --from_folder ~/Music --stems separated/htdemucs --out my_pairs   # with their stems

Each song is cut into consecutive segments; pair k holds segment k (input) and segment k+1 (output, the
continuation in the same song). Songs are split between train and val, so no song is in both. The beats are tracked
on each whole song (beats.py); each pair's beat times, with its song's tempo and key, are kept in SPLIT/beats.json.
With --stems (a separator's output, one folder per song named as its file: Demucs writes separated/htdemucs/NAME/
drums.wav, bass.wav, ...), each segment's rhythm layer, its drums and bass, is written beside it
(pair_XXXX_input_rhythm.wav), and the layering agent (--agent layered) trains on those layers instead of the
latent's harmonic-percussive separation.
"""
from __future__ import annotations

import argparse
import os
import sys

from config import SILENCE_DB
from pairs_dataset import path_problem
from pairs_folder import Cutting, find_songs, make_demo, make_pairs, read_song


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="synthesise the small demo set (no download)")
    source.add_argument("--from_folder", metavar="MUSIC", help="folder of songs (searched recursively)")
    p.add_argument("--out", required=True, help="pairs folder to write (train/, val/, manifest.csv)")
    p.add_argument("--stems", metavar="DIR", help="a stem separator's output for the songs of --from_folder: "
                   "DIR/NAME/drums.wav, bass.wav ... for the song NAME.mp3 (drums + bass: the rhythm layer)")
    p.add_argument("--segment_seconds", type=float, default=16.0, help="length of each segment (default 16)")
    p.add_argument("--sample_rate", type=int, default=24000, help="sample rate of the pairs (default 24000)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of songs for validation (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the song split and the demo songs")
    p.add_argument("--silence_db", type=float, default=SILENCE_DB,
                   help=f"songs and segments with an RMS level below this are silent and skipped "
                        f"(default {SILENCE_DB:g} dBFS)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: {args.out}: is a file, but a folder is expected here", file=sys.stderr)
        return 2
    if os.path.isdir(args.out) and any(f.endswith(".wav") for _, _, fs in os.walk(args.out) for f in fs):
        print(f"error: {args.out} already holds WAV files; choose an empty or new folder", file=sys.stderr)
        return 2
    if args.stems and (args.demo or (problem := path_problem(args.stems, "folder"))):
        print(f"error: --stems {args.stems}: {'the demo songs have no stems' if args.demo else problem}",
              file=sys.stderr)
        return 2
    if args.demo:
        summary = make_demo(args.out, args.sample_rate, args.seed)
    else:
        if problem := path_problem(args.from_folder, "folder"):
            print(f"error: {args.from_folder}: {problem}", file=sys.stderr)
            return 2
        paths = find_songs(args.from_folder)
        if not paths:
            print(f"error: no audio files found in {args.from_folder}", file=sys.stderr)
            return 2
        songs = [(p, lambda p=p: read_song(p, args.sample_rate)) for p in paths]
        cutting = Cutting(args.segment_seconds, args.sample_rate, args.val_fraction, args.seed, args.silence_db,
                          args.stems)
        summary = make_pairs(songs, args.out, cutting)
    print(summary.report())
    if summary.pairs["train"] == 0:
        print("error: no training pairs were written (songs too short or silent?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
