"""Arrange two songs with a trained checkpoint or a rule: input + target -> a new arrangement WAV (+ a picture of
the masks).

  python arrange.py --checkpoint checkpoints/RUN/checkpoint_best.pt --input A.wav --target B.flac \\
                    --output arrangement.wav --mask_plot masks.png
  python arrange.py --rule temporal --input A.wav --target B.flac --output arrangement.wav

Songs of any length, sample rate and channel count are converted to what the checkpoint expects. The target is
laid on the input's bars (tempo, bar lines, key, loudness; beats.py) and written beside the output as
NAME.target_aligned.wav; the songs are processed in windows of the trained segment length, cut where sections of
the input's bars start, so every section is decided once. The output has the input's length. Last, the input,
the aligned target and the output are tracked afresh, and the bar figures say what a listener's bars are.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from audio_codec import CodecUnavailable
from beats import AlignmentError
from checkpoints import CheckpointError
from config import SILENCE_DB, str2bool
from fixed_masks import RULES
from inference import (
    Arrangement,
    Arranger,
    AudioInputError,
    Request,
    aligned_path,
    load_audio,
    save_wave,
    stem_layers,
    summary_line,
)
from listening import bars_heard, phrase_figures, tone_distance_db
from phrases import phrase_starts, song_phrases


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint of train_simple_ddp.py")
    source.add_argument("--rule", choices=RULES, help="arrange by a rule, nothing learned (the MDCT codec): "
                        "temporal switches songs every --section_bars bars, layers lays the input's rhythm under "
                        "the target's harmony, mashability plans the whole song in phrases (the best-fitting piece "
                        "of the target for every other phrase, bar-long cross-fades), ...")
    p.add_argument("--section_bars", type=int, default=None, metavar="N",
                   help="sections of N bars of the input where its bars are known (0: of --section_beats beats); "
                        "default 1 with --rule, and with --checkpoint what it was trained with (its agent then "
                        "decides once per N bars)")
    p.add_argument("--section_beats", type=int, default=2, metavar="N",
                   help="with --rule: sections of N beats where the input's bars are not known (default 2)")
    p.add_argument("--sample_rate", type=int, default=24000, help="with --rule: the rate to arrange at (24000)")
    p.add_argument("--input", required=True, help="the input song (any format soundfile reads)")
    p.add_argument("--target", required=True, help="the target song")
    p.add_argument("--output", required=True, help="the arrangement WAV to write")
    p.add_argument("--mask_plot", default=None, help="also write a PNG of the masks and waveforms")
    p.add_argument("--plan_json", default=None, metavar="FILE",
                   help="with --rule mashability: also write the plan (phrases, which song leads, which piece of the "
                        "target, its shift and fit) as JSON")
    p.add_argument("--hard", action="store_true", help="hard 0/1 complementary masks (creative agent only)")
    p.add_argument("--balance", type=float, default=0.5,
                   help="the input's wanted share of the arrangement, 0..1 (default 0.5; creative agent trained "
                        "with --balance_range)")
    p.add_argument("--style_reference", default=None, metavar="SONG",
                   help="a third song whose style the arrangement takes (checkpoints trained with --style_weight)")
    p.add_argument("--style_strength", type=float, default=0.5,
                   help="with --style_reference: how far the arrangement's band levels move towards the reference's, "
                        "0 (only the learned conditioning) to 1 (all the way); default 0.5")
    p.add_argument("--input_stems", default=None, metavar="FOLDER",
                   help="the input's stems from a separator (a Demucs output folder: drums, bass, other, vocals): "
                        "the layering agent takes drums + bass as the rhythm and the rest as the harmony, instead of "
                        "harmonic-percussive separation (checkpoints trained with --agent layered)")
    p.add_argument("--target_stems", default=None, metavar="FOLDER", help="the target's stems, likewise")
    p.add_argument("--match_key", type=str2bool, default=True,
                   help="shift the target only as far as the keys need: none where they fit already (the same, the "
                        "relative, a neighbour on the circle of fifths), else the smallest step (default true)")
    p.add_argument("--track_afresh", type=str2bool, default=True,
                   help="track the written files' bars afresh for the bar figures (default true; a few seconds a "
                        "minute of audio)")
    p.add_argument("--align", type=str2bool, default=True,
                   help="lay the target on the input's grid first: tempo, beats, key, loudness (default true; false "
                        "arranges the songs as they are)")
    p.add_argument("--batch_size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--silence_db", type=float, default=SILENCE_DB,
                   help=f"refuse a song whose RMS level is below this (default {SILENCE_DB:g} dBFS)")
    args = p.parse_args(argv)
    if not 0.0 <= args.style_strength <= 1.0:
        p.error(f"--style_strength must be between 0 and 1, got {args.style_strength:g}")
    return args


def report(args: argparse.Namespace, arranger: Arranger, result: Arrangement, reference) -> None:
    """The mask picture and the figures of a written arrangement; its files are tracked afresh meanwhile."""
    sr, out, song = arranger.sample_rate, result.output, result.input
    with ThreadPoolExecutor(1) as pool:  # the files are tracked afresh while the picture and the figures are made
        heard = (pool.submit(bars_heard, out.numpy(), song.numpy(), result.target.numpy(), sr, result.grid.downbeats)
                 if args.track_afresh else None)
        if args.mask_plot:
            arranger.picture(args.mask_plot, result, title=os.path.basename(args.output))
        if result.alignment is not None:
            print(f"aligned target ({aligned_path(args.output)}): {result.alignment.line()}")
        print(summary_line(args.output, result, sr, args.balance, heard))
        heard = heard.result() if heard else None
    if heard:
        print(f"bars, every file tracked afresh: {heard['on_bar_afresh']:.0%} of switches on the input's bar lines "
              f"(chance {heard['on_bar_afresh_chance']:.0%}), the aligned target's bar lines on the input's "
              f"F={heard['target_bars_f']:.2f}, the input's bars heard in the arrangement "
              f"F={heard['output_bars_f']:.2f}")
    plan = result.plan
    bars, phrases = (plan.bars, plan.phrases) if plan else song_phrases(song.numpy(), result.grid, sr)
    p = phrase_figures((out.numpy(), song.numpy(), result.target.numpy()), phrase_starts(bars, phrases), bars.lines,
                       sr)
    print(f"phrases: the input's {len(phrases.starts)} phrases of {np.median(phrases.lengths):g} bars (median"
          f"{'' if phrases.found else ', fixed: no phrase structure heard'}); heard: {p['changes_per_min']:.1f} "
          f"changes a minute, {p['change_bars']:.1f} bars apart (median), {p['on_phrase']:.0%} on a phrase start, "
          f"seam {p['seam']:.2f} (1: as smooth as a beat inside the input)")
    if reference is not None:
        tone = [tone_distance_db(w[None, None], reference[None, None], sr).item() for w in (out, song, result.target)]
        print(f"tone distance to the style reference: arrangement {tone[0]:.1f} dB (input {tone[1]:.1f} dB, "
              f"target {tone[2]:.1f} dB)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.checkpoint:
            arranger = Arranger.load(args.checkpoint)
            if args.section_bars is not None:
                arranger.use_bars(args.section_bars)
        else:
            bars = 1 if args.section_bars is None else args.section_bars
            arranger = Arranger.rule(args.rule, args.sample_rate, args.section_beats, section_bars=bars)
        arranger.check_balance(args.balance)
        sr = arranger.sample_rate
        song, other = load_audio(args.input, sr, args.silence_db), load_audio(args.target, sr, args.silence_db)
        reference = load_audio(args.style_reference, sr, args.silence_db) if args.style_reference else None
        rhythm = None
        if args.input_stems or args.target_stems:
            arranger.check_stems()
            rhythm = tuple(stem_layers(folder, audio, sr) if folder else None
                           for folder, audio in ((args.input_stems, song), (args.target_stems, other)))
        style = arranger.style_latent(reference) if reference is not None else None
        if os.path.isdir(args.output):
            raise AudioInputError(f"{args.output}: is a folder, but the output is a file to write")
        result = arranger.arrange(Request(song, other, args.balance, args.hard, args.match_key, args.align, style,
                                          args.style_strength, rhythm, attention=bool(args.mask_plot),
                                          batch_size=args.batch_size))
    except (CheckpointError, AudioInputError, CodecUnavailable, AlignmentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in result.notes():
        print(f"note: {note}")
    if result.plan is not None:
        print(result.plan.table())
        if args.plan_json:
            with open(args.plan_json, "w") as f:
                f.write(result.plan.to_json())
    if not result.grid.has_pulse:
        print("note: without the input's beat grid, the songs switch in fixed blocks of frames")
    out = result.output
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_wave(args.output, out, sr)
    save_wave(aligned_path(args.output), result.target, sr)
    report(args, arranger, result, reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
