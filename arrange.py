"""Arrange two songs with a trained checkpoint: input + target -> a new arrangement WAV (+ a picture of the masks).

  python arrange.py --checkpoint checkpoints/RUN/checkpoint_best.pt --input A.wav --target B.flac \\
                    --output arrangement.wav --mask_plot masks.png

Songs of any length, sample rate and channel count are converted to what the checkpoint expects. The target is
laid on the input's grid (tempo, beats, key, loudness; beats.py) and written beside the output as
NAME.target_aligned.wav; the songs are processed in windows of the trained segment length, cut where sections of
the input's beat grid start, so every section is decided once. The output has the input's length.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import soundfile as sf
import torch

from audio_codec import CodecUnavailable
from beats import SWITCH_FADE_SECONDS, AlignmentError, Grid, align, analyse, level_switches, section_ids
from checkpoints import CheckpointError, balance_problem, load_checkpoint, model_from_checkpoint, str2bool
from listening import in_time, input_share, tone_distance_db
from losses import mask_metrics, temporal_variation
from pairs_dataset import SILENCE_DB, path_problem, silence_problem


class AudioInputError(ValueError):
    """An input song that cannot be used; the message names the file and why."""


def load_audio(path: str, sample_rate: int, silence_db: float = SILENCE_DB) -> torch.Tensor:
    """A song as a mono float32 tensor [S] at `sample_rate`; AudioInputError if it is missing, unreadable or silent."""
    if problem := path_problem(path):
        raise AudioInputError(f"{path}: {problem}")
    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioInputError(f"{path}: unreadable or not audio ({str(err).splitlines()[0][:120]})") from err
    audio = audio.mean(axis=1)
    if len(audio) == 0:
        raise AudioInputError(f"{path}: holds no samples")
    if not np.isfinite(audio).all():
        raise AudioInputError(f"{path}: non-finite samples (NaN or Inf)")
    if problem := silence_problem(audio, silence_db):
        raise AudioInputError(f"{path}: {problem}")
    if sr != sample_rate:
        import soxr

        audio = soxr.resample(audio, sr, sample_rate).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(audio))


def save_wave(path: str, wave: torch.Tensor, sample_rate: int) -> None:
    """Write a mono WAV atomically (temporary file, then rename): a crash never leaves a partial file."""
    audio = np.nan_to_num(wave.detach().float().cpu().numpy())
    tmp = f"{path}.tmp{os.getpid()}.wav"
    try:
        sf.write(tmp, np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_24")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def peak_limit(wave: torch.Tensor, ceiling: float = 0.99) -> torch.Tensor:
    """Finite samples, scaled down (never up) so the peak is at most `ceiling`."""
    wave = torch.nan_to_num(wave)
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    return wave * (ceiling / peak) if peak > ceiling else wave


@torch.no_grad()
def arrange_latents(model, codec, norm, inp: torch.Tensor, tgt: torch.Tensor, hard: bool = False,
                    keep_attention: bool = False, balance: float | None = None, style: torch.Tensor | None = None,
                    style_strength: float = 0.5, sections: torch.Tensor | None = None):
    """One window: waveforms [B, 1, S] -> (output [B, 1, S], (input mask, target mask) [B, D, T], attention).
    `balance`: the input share the agent should aim at (default 0.5); `style`: a style reference's normalised
    latent [1, D, T'] (models trained with --style_weight), whose statistics the output takes `style_strength` of;
    `sections` [B, T]: each frame's section of the input's beat grid (model.sections)."""
    agent = model.creative_agent.mask_generator if model.use_creative_agent else None
    if agent is not None:
        agent.keep_attention = keep_attention
    try:
        z_out, _ = model(norm.normalize(codec.encode(inp)), norm.normalize(codec.encode(tgt)), hard=hard,
                         balance=balance, style_reference=None if style is None else style.expand(len(inp), -1, -1),
                         style_strength=style_strength,
                         sections=None if sections is None else sections.to(inp.device))
    finally:
        if agent is not None:
            agent.keep_attention = False
    out = codec.decode(norm.denormalize(z_out))[..., : inp.shape[-1]]
    attention = agent.last_attention if agent is not None and keep_attention else None
    return out, model.last_masks, attention


def loop_to_length(song: torch.Tensor, length: int) -> torch.Tensor:
    """`song` repeated as often as needed and cut to `length` samples."""
    return song.repeat(-(-length // song.shape[0]))[:length]


def song_sections(model, song_grid: Grid | None, num_samples: int, codec) -> torch.Tensor:
    """Each latent frame's section [frames] over the whole song: sections of the model's `section_beats` beats of
    the input's grid, or fixed blocks of frames (a model that decides in blocks, or a song without a pulse)."""
    generator = model.creative_agent.mask_generator if model.use_creative_agent else None
    block = (generator.block_frames if generator is not None else model.temporal_segment_frames) or 32
    beats = song_grid.beats if song_grid is not None and model.section_beats > 0 else None
    frame_rate = codec.sample_rate / codec.hop_length
    return section_ids(beats, codec.num_frames(num_samples), frame_rate, model.section_beats, block)


def plan_windows(sections: torch.Tensor, hop: int, length: int, window: int, margin: int) -> list[tuple[int, int, int]]:
    """(window start, kept start, kept end) in samples: windows of `window` samples whose kept parts tile 0..length,
    cut only where a section starts (hop-aligned), with `margin` samples of context before a kept part. A section
    longer than a window is cut where it must be."""
    starts = (torch.nonzero(torch.diff(sections)).flatten() + 1).tolist()  # frames where a new section starts
    bounds = [f * hop for f in starts if 0 < f * hop < length] + [length]
    plan, kept = [], 0
    while kept < length:
        begin = max(0, min(kept - margin, length - window)) // hop * hop
        limit = begin + window - margin if begin + window < length else length
        fitting = [b for b in bounds if kept < b <= limit]
        end = fitting[-1] if fitting else max(kept + hop, limit // hop * hop)
        plan.append((begin, kept, min(end, length)))
        kept = min(end, length)
    return plan


def ride_fader(model, out: torch.Tensor, input_mask: torch.Tensor, sections: torch.Tensor, hop: int,
               sample_rate: int) -> torch.Tensor:
    """The arrangement `out` [S] with the fader ridden at every switch between the songs (beats.level_switches):
    a switch is a section start [frames] whose decision (the input mask [D, frames], there) differs from the
    section before. Only for models that decide in time (the agent, the temporal rule)."""
    if not (model.use_creative_agent or model.mask_type == "temporal"):
        return out
    starts = torch.nonzero(torch.diff(sections)).flatten() + 1
    frames = torch.cat([torch.zeros(1, dtype=starts.dtype), starts]).clamp(max=input_mask.shape[-1] - 1)
    decided = (input_mask.float().mean(dim=0)[frames] > 0.5).tolist()  # each section's song, at its first frame
    points = [f * hop for f in starts.tolist()] + [len(out)]
    switches = [(points[k], points[k + 1]) for k in range(len(starts)) if decided[k + 1] != decided[k]]
    if not switches:
        return out
    s, e = zip(*switches, strict=True)
    return torch.from_numpy(level_switches(out.numpy(), list(s), list(e), sample_rate))


def window_sections(sections: torch.Tensor, begin_frame: int, frames: int) -> torch.Tensor:
    """The sections of one window's frames, numbered from 0 or 1 so that their parity (which the temporal rule
    alternates on) is the song's."""
    part = sections[begin_frame : begin_frame + frames]
    part = torch.cat([part, part[-1:].expand(frames - len(part))]) if len(part) < frames else part
    return part - part[0] + part[0] % 2


@torch.no_grad()
def arrange_song(model, codec, norm, song: torch.Tensor, other: torch.Tensor, window: int, hard: bool = False,
                 batch_size: int = 4, keep_attention: bool = False, balance: float | None = None,
                 style: torch.Tensor | None = None, style_strength: float = 0.5, song_grid: Grid | None = None):
    """Whole songs [S_in], [S_tgt] (the target aligned to the input) -> (output [S_in], masks [D, frames] each,
    attention of the first window, each frame's section [frames]).

    The song is cut into windows of `window` samples on the boundaries of its sections (beats.py), so every
    section is decided once, by one window; neighbouring windows cross-fade only across a section boundary,
    where a switch is allowed anyway. The target is looped or cut to the input's length. At every switch the
    fader is ridden (ride_fader), so the level does not step.
    """
    length, hop = song.shape[0], codec.hop_length
    other = loop_to_length(other, length)
    sections = song_sections(model, song_grid, length, codec)
    fade = max(hop, int(SWITCH_FADE_SECONDS * codec.sample_rate))
    plan = plan_windows(sections, hop, length, window, margin=max(2 * fade, window // 8) // hop * hop)
    pad = lambda x: torch.nn.functional.pad(x, (0, window + 2 * fade))  # noqa: E731  windows past the end: silence
    song_p, other_p = pad(song), pad(other)
    out, weight = torch.zeros(length + window + 2 * fade), torch.zeros(length + window + 2 * fade)
    frames = codec.num_frames(window)
    masks = [torch.zeros(codec.dim, sections.shape[0]), torch.zeros(codec.dim, sections.shape[0])]
    attention = None
    positions = torch.arange(window)
    for i in range(0, len(plan), batch_size):
        batch = plan[i : i + batch_size]
        inp = torch.stack([song_p[b : b + window] for b, _, _ in batch])[:, None]
        tgt = torch.stack([other_p[b : b + window] for b, _, _ in batch])[:, None]
        parts = torch.stack([window_sections(sections, b // hop, frames) for b, _, _ in batch])
        y, (m_in, m_tgt), att = arrange_latents(model, codec, norm, inp, tgt, hard, keep_attention and i == 0,
                                                balance, style, style_strength,
                                                parts if model.section_beats > 0 else None)
        attention = att[0].cpu() if att is not None else attention
        for j, (begin, kept, end) in enumerate(batch):
            rise = ((positions + begin - kept + fade) / (2 * fade)).clamp(0, 1) if kept > 0 else 1.0
            fall = ((end + fade - positions - begin) / (2 * fade)).clamp(0, 1) if end < length else 1.0
            w = rise * fall
            out[begin : begin + window] += w * y[j, 0].float().cpu()
            weight[begin : begin + window] += w
            f0 = kept // hop
            f1 = sections.shape[0] if end == length else min(-(-end // hop), sections.shape[0])
            f1 = min(f1, f0 + m_in.shape[-1] - (f0 - begin // hop))
            for k, m in enumerate((m_in, m_tgt)):
                masks[k][:, f0:f1] = m[j, :, f0 - begin // hop : f1 - begin // hop].float().cpu()
    out = ride_fader(model, out[:length] / weight[:length].clamp_min(1e-8), masks[0], sections, hop,
                     codec.sample_rate)
    return peak_limit(out), tuple(masks), attention, sections


def plot_masks(path: str, masks, inp: torch.Tensor, tgt: torch.Tensor, out: torch.Tensor, sample_rate: int,
               hop_length: int, attention: torch.Tensor | None = None, title: str = "", beats=None,
               sections: torch.Tensor | None = None) -> None:
    """PNG: input and target masks (channels x time), the attention map if given, and the three waveforms; with
    `beats` (s) the beat grid is drawn on the waveforms (thin red lines), with `sections` [frames] the section
    starts on the masks (white dashes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m_in, m_tgt = (m[0] if m.dim() == 3 else m for m in masks)
    seconds = m_in.shape[-1] * hop_length / sample_rate
    rows = 5 + (attention is not None)
    fig, axes = plt.subplots(rows, 1, figsize=(11, 2.1 * rows), constrained_layout=True,
                             gridspec_kw=dict(height_ratios=[2, 2] + [3] * (attention is not None) + [1, 1, 1]))
    for ax, mask, name in ((axes[0], m_in, "input mask"), (axes[1], m_tgt, "target mask")):
        image = ax.imshow(mask.float().cpu().numpy(), aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1,
                          extent=(0, seconds, 0, mask.shape[0]), interpolation="nearest")
        ax.set_ylabel(f"{name}\nchannel")
        fig.colorbar(image, ax=ax, pad=0.01)
        if sections is not None:
            for f in torch.nonzero(torch.diff(sections)).flatten().tolist():
                ax.axvline((f + 1) * hop_length / sample_rate, color="white", linewidth=0.6, linestyle="--")
    row = 2
    if attention is not None:
        t = attention.shape[-1] * hop_length / sample_rate
        image = axes[row].imshow(attention.float().cpu().numpy(), aspect="auto", origin="lower", cmap="viridis",
                                 extent=(0, t, 0, t))
        axes[row].set_ylabel("input frame (s)")
        axes[row].set_title("cross-attention: which target frames (x) each input frame (y) attends to", fontsize=9)
        fig.colorbar(image, ax=axes[row], pad=0.01)
        row += 1
    for ax, wave, name in zip(axes[row:], (inp, tgt, out), ("input", "target", "output"), strict=True):
        wave = wave.detach().float().cpu().numpy()
        ax.plot(np.arange(len(wave)) / sample_rate, wave, linewidth=0.4)
        for b in [] if beats is None else beats:
            ax.axvline(b, color="C3", linewidth=0.4, alpha=0.6)
        ax.set_xlim(0, max(seconds, len(wave) / sample_rate))
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel(name)
    axes[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title)
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of train_simple_ddp.py")
    p.add_argument("--input", required=True, help="the input song (any format soundfile reads)")
    p.add_argument("--target", required=True, help="the target song")
    p.add_argument("--output", required=True, help="the arrangement WAV to write")
    p.add_argument("--mask_plot", default=None, help="also write a PNG of the masks and waveforms")
    p.add_argument("--hard", action="store_true", help="hard 0/1 complementary masks (creative agent only)")
    p.add_argument("--balance", type=float, default=0.5,
                   help="the input's wanted share of the arrangement, 0..1 (default 0.5; creative agent trained "
                        "with --balance_range)")
    p.add_argument("--style_reference", default=None, metavar="SONG",
                   help="a third song whose style the arrangement takes (checkpoints trained with --style_weight)")
    p.add_argument("--style_strength", type=float, default=0.5,
                   help="with --style_reference: how far the arrangement's band levels move towards the reference's, "
                        "0 (only the learned conditioning) to 1 (all the way); default 0.5")
    p.add_argument("--match_key", type=str2bool, default=True,
                   help="shift the target to the input's key by the smallest step, -6..+5 semitones (default true)")
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


def aligned_path(output: str) -> str:
    """NAME.target_aligned.wav beside NAME.wav: the target as it enters the arrangement."""
    return os.path.splitext(output)[0] + ".target_aligned.wav"


def prepare_songs(song: torch.Tensor, other: torch.Tensor, sample_rate: int, match_key: bool = True,
                  align_songs: bool = True, song_beats=None):
    """(input grid, the target aligned to the input, Alignment or None): both songs' grids, then the target laid on
    the input's tempo, beats, key and loudness (beats.align). `song_beats`: the input's beats where they are known
    (a pair's, tracked on its whole song). AlignmentError for tempos too far apart."""
    song_np = song.numpy()
    grid = analyse(song_np, sample_rate, song_beats)
    if not align_songs:
        return grid, loop_to_length(other, len(song)), None
    aligned, info = align(other.numpy(), song_np, sample_rate, input_grid=grid, match_key=match_key)
    return grid, torch.from_numpy(aligned), info


def summary_line(path: str, out: torch.Tensor, song: torch.Tensor, other: torch.Tensor, masks, grid: Grid,
                 sample_rate: int, balance: float) -> str:
    """What a listener hears, from the audio: input share, the sections in time, and the mask figures."""
    metrics = mask_metrics(*masks)
    share = input_share(out[None, None], song[None, None], other[None, None]).item()
    t = in_time(out.numpy(), song.numpy(), other.numpy(), grid.beats if grid.has_pulse else None, sample_rate)
    asked = f" (asked {balance:g})" if balance != 0.5 else ""
    beats = (f" ({t['section_in_beats']:.1f} beats), {t['on_beat']:.0%} of switches on the beat (chance "
             f"{t['on_beat_chance']:.0%}), tempo \u00d7{t['tempo_ratio']:.2f}" if grid.has_pulse else " (no beat grid)")
    return (f"{path}: {len(out) / sample_rate:.1f} s at {sample_rate} Hz | input share {share:.2f}{asked} | "
            f"{t['switches_per_s']:.2f} switches/s, median section {t['section_s']:.2f} s{beats}, loudness jump "
            f"{t['loudness_jump_db']:.1f} dB (the input alone {t['input_jump_db']:.1f} dB) | temporal variation "
            f"{temporal_variation(masks[0][None]).item():.2f}, "
            f"complementarity {metrics['complementarity']:.1f}%, coverage {metrics['coverage']:.1f}%, "
            f"balance {metrics['balance']:.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
        if problem := balance_problem(state["config"], args.balance):
            raise CheckpointError(f"{args.checkpoint}: {problem}")
        model, codec, norm = model_from_checkpoint(state, args.checkpoint)
        sr = state["config"]["sample_rate"]
        song, other = load_audio(args.input, sr, args.silence_db), load_audio(args.target, sr, args.silence_db)
        style = reference = None
        if args.style_reference:
            if model.style_encoder is None:
                raise CheckpointError(f"{args.checkpoint}: --style_reference needs a checkpoint trained with "
                                      f"--style_weight > 0")
            reference = load_audio(args.style_reference, sr, args.silence_db)[None, None]
            with torch.no_grad():
                style = norm.normalize(codec.encode(reference))
        if os.path.isdir(args.output):
            raise AudioInputError(f"{args.output}: is a folder, but the output is a file to write")
        grid, other, alignment = prepare_songs(song, other, sr, args.match_key, args.align)
    except (CheckpointError, AudioInputError, CodecUnavailable, AlignmentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in (alignment.notes if alignment else [grid.note] if grid.note else []):
        print(f"note: {note}; the songs switch in fixed blocks of frames there")
    window = state["config"]["segment_samples"]
    out, masks, attention, sections = arrange_song(model, codec, norm, song, other, window, args.hard,
                                                   batch_size=args.batch_size, keep_attention=bool(args.mask_plot),
                                                   balance=args.balance, style=style,
                                                   style_strength=args.style_strength, song_grid=grid)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_wave(args.output, out, sr)
    save_wave(aligned_path(args.output), other, sr)
    if args.mask_plot:
        plot_masks(args.mask_plot, masks, song, other, out, sr, codec.hop_length, attention,
                   title=os.path.basename(args.output), beats=grid.beats, sections=sections)
    if alignment is not None:
        print(f"aligned target ({aligned_path(args.output)}): {alignment.line()}")
    print(summary_line(args.output, out, song, other, masks, grid, sr, args.balance))
    if reference is not None:
        tone = [tone_distance_db(w[None, None], reference, sr).item() for w in (out, song, other)]
        print(f"tone distance to the style reference: arrangement {tone[0]:.1f} dB (input {tone[1]:.1f} dB, "
              f"target {tone[2]:.1f} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
