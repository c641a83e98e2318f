"""Inference: a trained model and two songs -> an arrangement, its masks and pictures. arrange.py, evaluate.py, the
trainer's example and the web page all arrange through here.

`Arranger.load(checkpoint)` rebuilds everything from a checkpoint alone; `arranger.arrange(Request(song, other))`
lays the target on the input's grid (tempo, beats, key, loudness; beats.py) and arranges whole songs in windows of
the trained segment length, cut where sections of the input's beat grid start, so every section is decided once:
one Request in, one Arrangement out.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import soundfile as sf
import torch

from audio_codec import LatentNorm, build_codec
from beats import (
    SWITCH_FADE_SECONDS,
    Alignment,
    Grid,
    Pulse,
    SectionUnit,
    align,
    analyse,
    lay_on_grid,
    level_switches,
    loop_to,
    section_ids,
    switch_fade_frames,
    track_pulses,
)
from checkpoints import CheckpointError, balance_problem, load_checkpoint, model_from_checkpoint
from config import Config, upgrade
from creative_agent import component_names, takes_stems
from fixed_masks import Mixer, Rule, RuleMix
from layers import bass_rows
from listening import in_time, input_share, layering
from losses import mask_metrics, temporal_variation
from pairs_dataset import SILENCE_DB, path_problem, silence_problem
from pairs_folder import read_rhythm
from phrases import Plan, lead_gains, make_plan, render_target
from records import Conditions, Mix
from run_log import replaced


class AudioInputError(ValueError):
    """An input song that cannot be used; the message names the file and why."""


def load_audio(path: str, sample_rate: int, silence_db: float = SILENCE_DB, start: float = 0.0,
               seconds: float | None = None) -> torch.Tensor:
    """A song, or its excerpt of `seconds` from `start` (s), as a mono float32 tensor [S] at `sample_rate`;
    AudioInputError if it is missing, unreadable, silent or shorter than `start`."""
    if problem := path_problem(path):
        raise AudioInputError(f"{path}: {problem}")
    try:
        sr = sf.info(path).samplerate
        first, count = round(start * sr), -1 if seconds is None else max(1, round(seconds * sr))
        audio, sr = sf.read(path, start=first, frames=count, dtype="float32", always_2d=True)
    except Exception as err:
        reason = str(err).splitlines()[0].replace(f"Error opening {path!r}: ", "")  # soundfile names the path
        raise AudioInputError(f"{path}: unreadable or not audio ({reason[:120]})") from err
    audio = audio.mean(axis=1)
    if len(audio) == 0:
        raise AudioInputError(f"{path}: holds no samples" + (f" after {start:g} s" if start > 0 else ""))
    if not np.isfinite(audio).all():
        raise AudioInputError(f"{path}: non-finite samples (NaN or Inf)")
    if problem := silence_problem(audio, silence_db):
        raise AudioInputError(f"{path}: {problem}")
    if sr != sample_rate:
        import soxr

        audio = soxr.resample(audio, sr, sample_rate).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(audio))


def stem_layers(folder: str, song: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """The rhythm layer [S] of `song` [S] from a stem separator's output folder (pairs_folder.read_rhythm: its
    drums and bass, summed). AudioInputError for a missing folder, one without drums or bass, an unreadable stem,
    or stems of another length than the song."""
    try:
        return torch.from_numpy(read_rhythm(folder, len(song), sample_rate))
    except (ValueError, RuntimeError) as err:  # soundfile's read errors are RuntimeErrors
        raise AudioInputError(str(err).splitlines()[0]) from err


def save_wave(path: str, wave: torch.Tensor, sample_rate: int) -> None:
    """Write a mono WAV atomically (temporary file, then rename): a crash never leaves a partial file."""
    audio = np.nan_to_num(wave.detach().float().cpu().numpy())
    with replaced(path) as tmp:
        sf.write(tmp, np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_24")


def peak_limit(wave: torch.Tensor, ceiling: float = 0.99) -> torch.Tensor:
    """Finite samples, scaled down (never up) so the peak is at most `ceiling`."""
    wave = torch.nan_to_num(wave)
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    return wave * (ceiling / peak) if peak > ceiling else wave


@torch.no_grad()
def arrange_latents(arranger: Arranger, inp: torch.Tensor, tgt: torch.Tensor, asked: Conditions,
                    stems: tuple | None = None) -> tuple[torch.Tensor, Mix]:
    """One batch of windows: waveforms [B, 1, S] -> (output waveforms [B, 1, S], the model's Mix: masks [B, D, T],
    attention where `asked`). `asked` (records.Conditions) as the model takes them, with `style_reference` a style
    reference's normalised latent [1, D, T'] for the whole batch (Arranger.style_latent) and `guide` [B, T] taken
    from the windows' audio where it is not given; `stems` (the layering agent): the input's and the target's rhythm
    stems [B, 1, S], either one None (stem_layers)."""
    model, codec, norm = arranger.model, arranger.codec, arranger.norm
    z_in, z_tgt = norm.normalize(codec.encode(inp)), norm.normalize(codec.encode(tgt))
    reference = asked.style_reference
    asked = replace(
        asked,
        # on the normalised latents' scale: the layers sum to the normalised latent
        rhythm=None if stems is None else tuple(None if r is None else codec.encode(r) / norm.std for r in stems),
        style_reference=None if reference is None else reference.expand(len(inp), -1, -1),
        sections=None if asked.sections is None else asked.sections.to(inp.device),
        guide=(model.guide_from_audio(inp, tgt, codec.sample_rate, z_in.shape[-1]) if asked.guide is None
               else asked.guide.to(inp.device)))
    mix = model(z_in, z_tgt, asked)
    return codec.decode(norm.denormalize(mix.output))[..., : inp.shape[-1]], mix


GUIDE_SECONDS = 30.0  # the layering agent's guide is taken over stretches of this long (its median: what is usual)


def song_guide(model, song: torch.Tensor, other: torch.Tensor, codec, frames: int) -> torch.Tensor | None:
    """The layering agent's guide [frames] over whole songs [S] (SimpleTransformer.guide_from_audio), GUIDE_SECONDS
    at a time, or None for a model that takes none."""
    chunk = int(GUIDE_SECONDS * codec.sample_rate) // (4 * codec.hop_length) * 4 * codec.hop_length
    starts = list(range(0, song.shape[0], chunk))
    if len(starts) > 1 and song.shape[0] - starts[-1] < chunk // 2:
        starts.pop()  # a short end joins the stretch before it
    parts = []
    for begin, end in zip(starts, [*starts[1:], song.shape[0]], strict=True):
        inp, tgt = (x[begin:end][None, None] for x in (song, other))
        part = model.guide_from_audio(inp, tgt, codec.sample_rate, -(-inp.shape[-1] // codec.hop_length))
        if part is None:
            return None
        parts.append(part[0])
    return torch.nn.functional.pad(torch.cat(parts), (0, frames))[:frames]


def song_sections(model, song_grid: Grid | None, num_samples: int, codec) -> torch.Tensor:
    """Each latent frame's section [frames] over the whole song: sections of the model's `section_bars` bars (or
    `section_beats` beats) of the input's grid, or fixed blocks of frames (a model that decides in blocks, or a song
    without a pulse)."""
    generator = model.creative_agent.mask_generator if model.use_creative_agent else None
    block = generator.block_frames if generator is not None else model.rule.segment_frames
    beats = song_grid.beats if song_grid is not None and has_sections(model) else None
    bar = song_grid.bar if song_grid is not None else (0, math.nan)
    unit = SectionUnit.of(model.section_beats, model.section_bars, block)
    return section_ids(beats, codec.num_frames(num_samples), codec.sample_rate / codec.hop_length, unit, bar)


def has_sections(model) -> bool:
    """Whether a model (or rule) decides per section of the input's beats or bars."""
    return model.section_beats > 0 or model.section_bars > 0


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
    """The arrangement `out` [S] with the target's fader ridden at every switch between the songs
    (beats.level_switches): the target's runs of sections (the input mask [D, frames] below one half at a
    section's first frame [frames]) meet the input's level at both ends. In a layered arrangement (one band of the
    mask per layer) both songs play throughout: each section whose layers change song starts at the level before
    it and eases back to its own. Only for models that decide in time (the agents, the temporal rule)."""
    if not (model.use_creative_agent or model.rule.mask_type == "temporal"):
        return out
    starts = torch.nonzero(torch.diff(sections)).flatten() + 1
    frames = torch.cat([torch.zeros(1, dtype=starts.dtype), starts]).clamp(max=input_mask.shape[-1] - 1)
    points = [0] + [f * hop for f in starts.tolist()] + [len(out)]
    if bands := len(component_names(model)):  # each band's decision (its first row), at each section's first frame
        rows = -(-input_mask.shape[0] // bands)  # creative_agent.component_bands: band k starts at row k * rows
        decided = (input_mask.float()[::rows][:, frames] > 0.5).T.tolist()
        swaps = [(points[k], points[k + 1]) for k in range(1, len(decided)) if decided[k] != decided[k - 1]]
        return torch.from_numpy(level_switches(out.numpy(), swaps, sample_rate, match_end=False)) if swaps else out
    target = (input_mask.float().mean(dim=0)[frames] <= 0.5).tolist()  # each section's song, at its first frame
    runs = []  # the target's runs of sections: [start, end) in samples
    for k, is_target in enumerate(target):
        if is_target and runs and runs[-1][1] == points[k]:
            runs[-1] = (runs[-1][0], points[k + 1])
        elif is_target:
            runs.append((points[k], points[k + 1]))
    return torch.from_numpy(level_switches(out.numpy(), runs, sample_rate)) if runs else out


def window_sections(sections: torch.Tensor, begin_frame: int, frames: int) -> torch.Tensor:
    """The sections of one window's frames, numbered from 0 or 1 so that their parity (which the temporal rule
    alternates on) is the song's."""
    part = sections[begin_frame : begin_frame + frames]
    part = torch.cat([part, part[-1:].expand(frames - len(part))]) if len(part) < frames else part
    return part - part[0] + part[0] % 2


@torch.no_grad()
def arrange_song(arranger: Arranger, request: Request, song_grid: Grid | None = None,
                 guide: torch.Tensor | None = None):
    """The whole songs of a request (its target aligned to the input, its rhythm stems laid like the songs) ->
    (output [S_in], masks [D, frames] each, attention of the first window where asked, each frame's section
    [frames]). `song_grid`: the input's; `guide` [frames]: the layering agent's (song_guide, which is taken here
    when not given).

    The song is cut into windows of the model's segment length on the boundaries of its sections (beats.py), so
    every section is decided once, by one window; neighbouring windows cross-fade only across a section boundary,
    where a switch is allowed anyway. The target is looped or cut to the input's length. At every switch the
    fader is ridden (ride_fader), so the level does not step.
    """
    model, codec, window, song, rhythm = (arranger.model, arranger.codec, arranger.config.segment_samples,
                                          request.song, request.rhythm)
    length, hop, frames = song.shape[0], codec.hop_length, codec.num_frames(window)
    other = loop_to(request.other, length)
    sections = (song_sections(model, song_grid, length, codec) if request.plan is None else
                request.plan.section_ids(codec.num_frames(length), codec.sample_rate / hop))
    lead = request.plan and torch.nn.functional.pad(lead_gains(  # past the end: the input
        request.plan, sections.shape[0], codec.sample_rate / hop, model.rule.fade_frames), (0, frames), value=1.0)
    fade = max(hop, int(SWITCH_FADE_SECONDS * codec.sample_rate))
    plan = plan_windows(sections, hop, length, window, margin=max(2 * fade, window // 8) // hop * hop)
    pad = lambda x: torch.nn.functional.pad(x, (0, window + 2 * fade))  # noqa: E731  windows past the end: silence
    song_p, other_p = pad(song), pad(other)
    rhythm_p = [None if r is None else pad(loop_to(r, length)) for r in rhythm or (None, None)]
    out, weight = torch.zeros(length + window + 2 * fade), torch.zeros(length + window + 2 * fade)
    guide = song_guide(model, song, other, codec, sections.shape[0]) if guide is None else guide
    guide = None if guide is None else torch.nn.functional.pad(guide, (0, frames))  # past the end: no lean
    masks = [torch.zeros(codec.dim, sections.shape[0]), torch.zeros(codec.dim, sections.shape[0])]
    attention = None
    positions = torch.arange(window)
    for i in range(0, len(plan), request.batch_size):
        batch = plan[i : i + request.batch_size]
        inp = torch.stack([song_p[b : b + window] for b, _, _ in batch])[:, None]
        tgt = torch.stack([other_p[b : b + window] for b, _, _ in batch])[:, None]
        parts = torch.stack([window_sections(sections, b // hop, frames) for b, _, _ in batch])
        layers = None if rhythm is None else tuple(
            None if r is None else torch.stack([r[b : b + window] for b, _, _ in batch])[:, None] for r in rhythm_p)
        leans = None if guide is None else torch.stack([guide[b // hop : b // hop + frames] for b, _, _ in batch])
        asked = Conditions(request.hard, request.balance, request.style, request.style_strength,
                           parts if has_sections(model) else None, guide=leans,
                           attention=request.attention and i == 0,
                           lead=None if lead is None else torch.stack([lead[:, b // hop : b // hop + frames]
                                                                       for b, _, _ in batch]))
        y, mix = arrange_latents(arranger, inp, tgt, asked, layers)
        (m_in, m_tgt), attention = mix.masks, mix.attention[0].cpu() if mix.attention is not None else attention
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


@dataclass
class MaskPicture:
    """What a mask picture shows: the (input, target) masks [D, frames] each, the three waveforms [S], and where
    known the attention map [frames, frames], the beat grid `beats` (s), each frame's section, the layering
    agent's guide [frames] and the plan it rendered."""
    masks: tuple
    input: torch.Tensor
    target: torch.Tensor
    output: torch.Tensor
    attention: torch.Tensor | None = None
    beats: np.ndarray | None = None
    sections: torch.Tensor | None = None
    guide: torch.Tensor | None = None
    plan: Plan | None = None


def plot_masks(path: str, shown: MaskPicture, sample_rate: int, hop_length: int, title: str = "",
               components: tuple[str, ...] = ()) -> None:
    """PNG: input and target masks (channels x time, or one band per component), the attention map if given, and
    the three waveforms; with beats the beat grid is drawn on the waveforms (thin red lines), with sections their
    starts on the masks (white dashes), with a guide the layering agent's guide over the input mask, its mean per
    section (cyan; up: the input's rhythm under the target's harmony), with a plan each phrase's piece of the target
    (its first bar in the aligned target, its shift and fit) on the target mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attention, beats, sections, guide = shown.attention, shown.beats, shown.sections, shown.guide
    m_in, m_tgt = (m[0] if m.dim() == 3 else m for m in shown.masks)
    seconds = m_in.shape[-1] * hop_length / sample_rate
    rows = 5 + (attention is not None)
    fig, axes = plt.subplots(rows, 1, figsize=(11, 2.1 * rows), constrained_layout=True,
                             gridspec_kw=dict(height_ratios=[2, 2] + [3] * (attention is not None) + [1, 1, 1]))
    for ax, mask, name in ((axes[0], m_in, "input mask"), (axes[1], m_tgt, "target mask")):
        image = ax.imshow(mask.float().cpu().numpy(), aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1,
                          extent=(0, seconds, 0, mask.shape[0]), interpolation="nearest")
        ax.set_ylabel(f"{name}\n{'component' if components else 'channel'}")
        if components:  # one band per component (creative_agent.component_bands)
            band = mask.shape[0] / len(components)
            ax.set_yticks([band * (k + 0.5) for k in range(len(components))], components)
        fig.colorbar(image, ax=ax, pad=0.01)
        if sections is not None:
            for f in torch.nonzero(torch.diff(sections)).flatten().tolist():
                ax.axvline((f + 1) * hop_length / sample_rate, color="white", linewidth=0.6, linestyle="--")
    if guide is not None:
        plot_guide(axes[0], guide[: m_in.shape[-1]], sections, m_in.shape[0], hop_length / sample_rate)
    for step in [] if shown.plan is None else shown.plan.steps:
        if step.lead == "target":
            label = f"bar {step.source}" + (f" {step.shift:+d}" if step.shift else "") + (
                f"\nfit {step.fit.total:.2f}" if step.fit else "")
            axes[1].text(step.start + 0.2, 0.5 * m_tgt.shape[0], label, fontsize=7, color="black", va="center")
    row = 2
    if attention is not None:
        t = attention.shape[-1] * hop_length / sample_rate
        image = axes[row].imshow(attention.float().cpu().numpy(), aspect="auto", origin="lower", cmap="viridis",
                                 extent=(0, t, 0, t))
        axes[row].set_ylabel("input frame (s)")
        axes[row].set_title("cross-attention: which target frames (x) each input frame (y) attends to", fontsize=9)
        fig.colorbar(image, ax=axes[row], pad=0.01)
        row += 1
    for ax, wave, name in zip(axes[row:], (shown.input, shown.target, shown.output), ("input", "target", "output"),
                              strict=True):
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
    with replaced(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def plot_guide(ax, guide: torch.Tensor, sections: torch.Tensor | None, rows: int, frame_seconds: float) -> None:
    """The layering agent's guide [frames] in -1..1 drawn over a mask of `rows` rows, as its mean per section."""
    if sections is not None:
        sections = sections[: len(guide)]
        count = torch.bincount(sections).clamp_min(1)
        guide = (torch.zeros(len(count)).index_add_(0, sections, guide.float()) / count)[sections]
    ax.plot(np.arange(len(guide)) * frame_seconds, (guide.numpy() + 1) / 2 * rows, color="cyan", linewidth=1.0,
            label="guide (up: the input's rhythm)")
    ax.legend(loc="upper right", fontsize=7)


def aligned_path(output: str) -> str:
    """NAME.target_aligned.wav beside NAME.wav: the target as it enters the arrangement."""
    return os.path.splitext(output)[0] + ".target_aligned.wav"


def prepare_songs(song: torch.Tensor, other: torch.Tensor, sample_rate: int, match_key: bool = True,
                  align_songs: bool = True, song_pulse=None):
    """(input grid, the target aligned to the input, Alignment or None): both songs' grids, then the target laid on
    the input's tempo, bars, key and loudness (beats.align). `song_pulse`: the input's beats and bars where they
    are known (a pair's, tracked on its whole song). AlignmentError for tempos too far apart. The two songs are
    tracked together, then the rest of their analysis runs in two threads."""
    song_np, other_np = song.numpy(), other.numpy()
    tracked = iter(track_pulses(([] if song_pulse else [song_np]) + ([other_np] if align_songs else []), sample_rate))
    song_pulse = song_pulse or next(tracked)
    with ThreadPoolExecutor(1) as pool:
        target_grid = pool.submit(analyse, other_np, sample_rate, next(tracked)) if align_songs else None
        grid = analyse(song_np, sample_rate, song_pulse)
        target_grid = target_grid.result() if target_grid is not None else None
    if not align_songs:
        return grid, loop_to(other, len(song)), None
    aligned, info = align(other_np, song_np, sample_rate, (target_grid, grid), match_key)
    return grid, torch.from_numpy(aligned), info


def summary_line(path: str, result: Arrangement, sample_rate: int, balance: float,
                 heard: Future | None = None) -> str:
    """What a listener hears of an arrangement written to `path`, from the audio: input share, the sections in
    time, and the mask figures. `heard`: the files' bars_heard, being tracked meanwhile, whose output tempo in_time
    takes instead of tracking it."""
    out, song, other, masks, grid = result.output, result.input, result.target, result.masks, result.grid
    metrics = mask_metrics(*masks)
    share = input_share(out[None, None], song[None, None], other[None, None]).item()
    layered = layering(out.numpy(), song.numpy(), other.numpy(), sample_rate)
    t = in_time((out.numpy(), song.numpy(), other.numpy()), grid.beats if grid.has_pulse else None, sample_rate,
                grid.bar, heard.result()["output_tempo"] if heard else None)
    asked = f" (asked {balance:g})" if balance != 0.5 else ""
    both = (", both songs sound at once most of the time, so which one is heard, and so its switches, are "
            "ambiguous" if layered["both_heard"] > 0.5 else "")
    on_bar = (f", {t['on_bar']:.0%} on the input's bar lines (chance {t['on_bar_chance']:.0%})"
              if math.isfinite(t["on_bar"]) else "")
    beats = (f" ({t['section_in_beats']:.1f} beats), {t['on_beat']:.0%} of switches on the beat (chance "
             f"{t['on_beat_chance']:.0%}){on_bar}, tempo \u00d7{t['tempo_ratio']:.2f}" if grid.has_pulse
             else " (no beat grid)")
    return (f"{path}: {len(out) / sample_rate:.1f} s at {sample_rate} Hz | input share {share:.2f}{asked} | "
            f"{t['switches_per_s']:.2f} switches/s, median section {t['section_s']:.2f} s{beats}, loudness jump "
            f"{t['loudness_jump_db']:.1f} dB (the input alone {t['input_jump_db']:.1f} dB){both} | both songs heard "
            f"{layered['both_heard']:.0%} of the time, the input's share of the rhythm "
            f"{layered['rhythm_input_share']:.2f} and of the harmony {layered['harmony_input_share']:.2f}, harmony "
            f"match {layered['harmony_match']:.2f} where both are heard | "
            f"temporal variation {temporal_variation(masks[0][None]).item():.2f}, "
            f"complementarity {metrics['complementarity']:.1f}%, coverage {metrics['coverage']:.1f}%, "
            f"balance {metrics['balance']:.2f}")


@dataclass
class Request:
    """One arrangement asked for: the input `song` and the target `other` [S] at the model's sample rate, and how
    to lay and mix them. `balance`: the input share the agent aims at; `hard`: 0/1 masks; `match_key`, `align`:
    shift the target's key / lay it on the input's tempo, bars and loudness (beats.align); `style` (models trained
    with --style_weight): a reference's normalised latent (Arranger.style_latent), whose statistics the output
    takes `style_strength` of; `rhythm` (the layering agent): the songs' rhythm stems [S] from a separator, either
    one None (stem_layers); `attention`: the first window's attention map in the result, for its picture;
    `song_pulse`: the input's beats and bars where they are known already (a pair's, tracked on its whole song);
    `batch_size`: windows arranged at once; `plan`: phrase by phrase, which song leads and which piece of the
    target plays (phrases.Plan; the mashability rule makes one where none is given)."""
    song: torch.Tensor
    other: torch.Tensor
    balance: float = 0.5
    hard: bool = False
    match_key: bool = True
    align: bool = True
    style: torch.Tensor | None = None
    style_strength: float = 0.5
    rhythm: tuple | None = None
    attention: bool = False
    song_pulse: Pulse | None = None
    batch_size: int = 4
    plan: Plan | None = None


@dataclass
class Arrangement:
    """What `Arranger.arrange` gives: the output [S] (the input's length), the input, the target as it entered
    (aligned and looped to the input), the masks [D, frames] each, the attention map of the first window (or
    None), each frame's section, the input's beat grid and the alignment (None when not aligned)."""
    output: torch.Tensor
    input: torch.Tensor
    target: torch.Tensor
    masks: tuple
    attention: torch.Tensor | None
    sections: torch.Tensor
    grid: Grid
    alignment: Alignment | None
    guide: torch.Tensor | None = None  # the layering agent's guide [frames] (song_guide), None for other models
    plan: Plan | None = None  # the plan it rendered (the mashability rule), None for the others

    def notes(self) -> list[str]:
        """What the alignment could not do (no pulse, a key left as it was)."""
        return self.alignment.notes if self.alignment else [self.grid.note] if self.grid.note else []

    def picture(self) -> MaskPicture:
        return MaskPicture(self.masks, self.input, self.target, self.output, self.attention, self.grid.beats,
                           self.sections, self.guide, self.plan)


@dataclass
class Arranger:
    """A trained model (or a rule) ready to arrange: model, codec and latent statistics, on CPU, with the run's
    configuration."""
    model: Mixer
    codec: torch.nn.Module
    norm: torch.nn.Module
    config: Config
    path: str = "checkpoint"  # where it came from, for messages

    @classmethod
    def load(cls, path: str) -> Arranger:
        """From a checkpoint alone; CheckpointError names the file and what is wrong."""
        state = load_checkpoint(path)
        return cls(*model_from_checkpoint(state, path), upgrade(state["config"]), path)

    @classmethod
    def rule(cls, mask_type: str = "temporal", sample_rate: int = 24000, section_beats: int = 2,
             window_seconds: float = 8.0, section_bars: int = 0) -> Arranger:
        """A rule with nothing learned (fixed_masks.RuleMix) over the MDCT codec, which reconstructs exactly: the
        temporal rule switches songs every `section_bars` bars of the input (where its bars are known) or every
        `section_beats` beats, the layers rule lays the input's rhythm under the target's harmony. Arranges in
        windows of `window_seconds`."""
        codec = build_codec("mdct", sample_rate)
        fade = switch_fade_frames(codec.sample_rate / codec.hop_length)
        config = Config(mask_type=mask_type, sample_rate=sample_rate, section_beats=section_beats,
                        section_bars=section_bars, segment_seconds=window_seconds,
                        segment_samples=round(window_seconds * sample_rate), fade_frames=fade)
        rule = Rule(mask_type, fade_frames=fade, bass=bass_rows(codec.sample_rate / 2 / codec.dim))
        model = RuleMix(rule, section_beats, section_bars)
        return cls(model.eval(), codec.eval(), LatentNorm(codec.dim), config, f"the {mask_type} rule")

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def use_bars(self, bars: int) -> None:
        """Sections of `bars` bars of the input (where its bars are known; 0: of the model's beats) instead of the
        sections the checkpoint was trained with: its agent or rule then decides once per section of that size."""
        self.model.section_bars = bars
        self.config = replace(self.config, section_bars=bars)

    def check_stems(self) -> None:
        """CheckpointError unless this model's agent takes its layers from stems (the layering agent)."""
        if not takes_stems(self.model):
            agent = f"the {self.config.agent} agent" if self.model.use_creative_agent else "no agent"
            raise CheckpointError(f"{self.path}: stems are the layers of the layering agent, and this checkpoint "
                                  f"has {agent} (train one with --agent layered)")

    def check_balance(self, balance: float) -> None:
        """CheckpointError unless this model can aim at the input share `balance`."""
        if problem := balance_problem(self.config, balance):
            raise CheckpointError(f"{self.path}: {problem}")

    def style_latent(self, reference: torch.Tensor) -> torch.Tensor:
        """A style reference song [S] as the normalised latent [1, D, T] that --style_reference conditions on."""
        if self.model.style_encoder is None:
            raise CheckpointError(f"{self.path}: --style_reference needs a checkpoint trained with --style_weight > 0")
        with torch.no_grad():
            return self.norm.normalize(self.codec.encode(reference[None, None]))

    def arrange(self, request: Request) -> Arrangement:
        """The Arrangement of a Request: the target laid on the input's grid (tempo, bars, key, loudness), then the
        whole songs arranged. AlignmentError for tempos too far apart."""
        song, rhythm = request.song, request.rhythm
        grid, other, alignment = prepare_songs(song, request.other, self.sample_rate, request.match_key,
                                               request.align, request.song_pulse)
        if rhythm is not None and rhythm[1] is not None and alignment is not None:  # laid like the target
            laid = lay_on_grid(rhythm[1].numpy(), alignment, len(song), self.sample_rate)
            rhythm = (rhythm[0], torch.from_numpy(laid))
        other, plan = loop_to(other, len(song)), request.plan
        if plan is None and self.model.rule.mask_type == "mashability" and not self.model.use_creative_agent:
            plan = make_plan(song.numpy(), other.numpy(), grid, self.sample_rate)
        if plan is not None:  # the target as the plan plays it: its chosen pieces on the input's phrases
            other = torch.from_numpy(render_target(other.numpy(), plan, self.sample_rate))
        guide = song_guide(self.model, song, other, self.codec, self.codec.num_frames(len(song)))
        out, masks, attention, sections = arrange_song(self, replace(request, other=other, rhythm=rhythm, plan=plan),
                                                       grid, guide)
        return Arrangement(out, song, other, masks, attention, sections, grid, alignment, guide, plan)

    def picture(self, path: str, result: Arrangement, title: str = "") -> None:
        """The mask picture of an arrangement: masks, attention, the three waves with the beat grid."""
        plot_masks(path, result.picture(), self.sample_rate, self.codec.hop_length, title,
                   component_names(self.model))


def write_example(arranger: Arranger, song: torch.Tensor, other: torch.Tensor, folder: str, title: str = "",
                  song_pulse=None) -> None:
    """The trainer's example: `song` arranged with `other` laid on its grid (`song_pulse`: its known beats and
    bars), written to FOLDER/arrangement_example.wav with a picture of its masks and beat grid,
    FOLDER/masks_example.png."""
    result = arranger.arrange(Request(song, other, attention=arranger.model.use_creative_agent,
                                      song_pulse=song_pulse))
    save_wave(os.path.join(folder, "arrangement_example.wav"), result.output, arranger.sample_rate)
    arranger.picture(os.path.join(folder, "masks_example.png"), result, title)
