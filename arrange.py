"""Arrange two songs with a trained checkpoint: input + target -> a new arrangement WAV (+ a picture of the masks).

  python arrange.py --checkpoint checkpoints/RUN/checkpoint_best.pt --input A.wav --target B.flac \\
                    --output arrangement.wav --mask_plot masks.png

Songs of any length, sample rate and channel count are converted to what the checkpoint expects and processed
in windows of the trained segment length, cross-faded where they overlap. The output has the input's length.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import soundfile as sf
import torch

from audio_codec import CodecUnavailable
from checkpoints import CheckpointError, balance_problem, load_checkpoint, model_from_checkpoint
from losses import input_share, mask_metrics, temporal_variation, tone_distance_db
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
                    style_strength: float = 0.5):
    """One window: waveforms [B, 1, S] -> (output [B, 1, S], (input mask, target mask) [B, D, T], attention).
    `balance`: the input share the agent should aim at (default 0.5); `style`: a style reference's normalised
    latent [1, D, T'] (models trained with --style_weight), whose statistics the output takes `style_strength` of."""
    agent = model.creative_agent.mask_generator if model.use_creative_agent else None
    if agent is not None:
        agent.keep_attention = keep_attention
    try:
        z_out, _ = model(norm.normalize(codec.encode(inp)), norm.normalize(codec.encode(tgt)), hard=hard,
                         balance=balance, style_reference=None if style is None else style.expand(len(inp), -1, -1),
                         style_strength=style_strength)
    finally:
        if agent is not None:
            agent.keep_attention = False
    out = codec.decode(norm.denormalize(z_out))[..., : inp.shape[-1]]
    attention = agent.last_attention if agent is not None and keep_attention else None
    return out, model.last_masks, attention


def loop_to_length(song: torch.Tensor, length: int) -> torch.Tensor:
    """`song` repeated as often as needed and cut to `length` samples."""
    return song.repeat(-(-length // song.shape[0]))[:length]


def window_starts(length: int, window: int, hop: int) -> list[int]:
    """Window starts every `hop` samples, the last one ending at `length` (one window if the song is shorter)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, hop))
    return starts + [length - window]


def crossfade_weights(window: int, overlap: int) -> torch.Tensor:
    """sin² fade in and cos² fade out over `overlap` samples: overlapping windows sum to one."""
    w = torch.ones(window)
    if overlap > 0:
        ramp = torch.sin(0.5 * torch.pi * (torch.arange(overlap) + 0.5) / overlap) ** 2
        w[:overlap], w[-overlap:] = ramp, ramp.flip(0)
    return w


@torch.no_grad()
def arrange_song(model, codec, norm, song: torch.Tensor, other: torch.Tensor, window: int, hard: bool = False,
                 overlap_fraction: float = 0.25, batch_size: int = 4, keep_attention: bool = False,
                 balance: float | None = None, style: torch.Tensor | None = None, style_strength: float = 0.5):
    """Whole songs [S_in], [S_tgt] -> (output [S_in], masks [D, frames] each, attention of the first window).

    The target is looped or cut to the input's length; windows of `window` samples overlap by
    `overlap_fraction` and are cross-faded, so no seam is audible.
    """
    length = song.shape[0]
    other = loop_to_length(other, max(length, window))
    song = torch.nn.functional.pad(song, (0, max(0, window - length)))
    hop_len = codec.hop_length
    overlap = int(window * overlap_fraction) // hop_len * hop_len
    starts = window_starts(song.shape[0], window, window - overlap)
    fade = crossfade_weights(window, overlap)
    out, weight = torch.zeros(song.shape[0]), torch.zeros(song.shape[0])
    frames = codec.num_frames(song.shape[0]) + 1
    masks = [torch.zeros(codec.dim, frames), torch.zeros(codec.dim, frames)]
    mask_weight = torch.zeros(frames)
    attention = None
    for i in range(0, len(starts), batch_size):
        batch = starts[i : i + batch_size]
        inp = torch.stack([song[s : s + window] for s in batch])[:, None]
        tgt = torch.stack([other[s : s + window] for s in batch])[:, None]
        y, (m_in, m_tgt), att = arrange_latents(model, codec, norm, inp, tgt, hard, keep_attention and i == 0,
                                                balance, style, style_strength)
        attention = att[0].cpu() if att is not None else attention
        for j, s in enumerate(batch):
            out[s : s + window] += fade * y[j, 0].float().cpu()
            weight[s : s + window] += fade
            f0 = s // hop_len
            n = min(m_in.shape[-1], frames - f0)
            masks[0][:, f0 : f0 + n] += m_in[j, :, :n].float().cpu()
            masks[1][:, f0 : f0 + n] += m_tgt[j, :, :n].float().cpu()
            mask_weight[f0 : f0 + n] += 1
    out = peak_limit(out / weight.clamp_min(1e-8))[:length]
    used = codec.num_frames(length)
    m_in, m_tgt = (m[:, :used] / mask_weight[:used].clamp_min(1) for m in masks)
    return out, (m_in, m_tgt), attention


def plot_masks(path: str, masks, inp: torch.Tensor, tgt: torch.Tensor, out: torch.Tensor, sample_rate: int,
               hop_length: int, attention: torch.Tensor | None = None, title: str = "") -> None:
    """PNG: input and target masks (channels x time), the attention map if given, and the three waveforms."""
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
    p.add_argument("--batch_size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--silence_db", type=float, default=SILENCE_DB,
                   help=f"refuse a song whose RMS level is below this (default {SILENCE_DB:g} dBFS)")
    args = p.parse_args(argv)
    if not 0.0 <= args.style_strength <= 1.0:
        p.error(f"--style_strength must be between 0 and 1, got {args.style_strength:g}")
    return args


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
    except (CheckpointError, AudioInputError, CodecUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    window = state["config"]["segment_samples"]
    out, masks, attention = arrange_song(model, codec, norm, song, other, window, args.hard,
                                         batch_size=args.batch_size, keep_attention=args.mask_plot is not None,
                                         balance=args.balance, style=style, style_strength=args.style_strength)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_wave(args.output, out, sr)
    if args.mask_plot:
        plot_masks(args.mask_plot, masks, song, loop_to_length(other, len(song)), out, sr, codec.hop_length, attention,
                   title=os.path.basename(args.output))
    metrics = mask_metrics(*masks)
    share = input_share(out[None, None], song[None, None], loop_to_length(other, len(song))[None, None]).item()
    change = temporal_variation(masks[0][None]).item()
    asked = f" (asked {args.balance:g})" if args.balance != 0.5 else ""
    print(f"{args.output}: {len(out) / sr:.1f} s at {sr} Hz | input share {share:.2f}{asked}, temporal variation "
          f"{change:.2f} | complementarity {metrics['complementarity']:.1f}%, coverage {metrics['coverage']:.1f}%, "
          f"balance {metrics['balance']:.2f}")
    if reference is not None:
        tone = [tone_distance_db(w[None, None], reference, sr).item() for w in (out, song, other)]
        print(f"tone distance to the style reference: arrangement {tone[0]:.1f} dB (input {tone[1]:.1f} dB, "
              f"target {tone[2]:.1f} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
