"""What a listener hears, measured from the output audio of an arrangement (not from its masks, because mask area is
not loudness), in one vocabulary for training's validation, evaluate.py, arrange.py and the plots:

- input_share: the input's share of the arrangement (0 = only the target, 1 = only the input)
- rms_in, rms_tgt: RMS of output - input, output - target
- lsd_in_db, lsd_tgt_db, lsd_max_db: log-spectral distances to each song and to the farther one (dB), over what is
  heard (cells within losses.HEARD_RANGE_DB of the loudest)
- in time (`in_time`): switches_per_s, section_s and section_in_beats (median section), on_beat (share of switches
  within 70 ms of an input beat) beside on_beat_chance (what random times would get), loudness_jump_db (median
  level change across a switch, 0.2 s either side) beside input_jump_db (the input's own level change at the same
  times: on a beat a song gets louder by itself), on_bar beside on_bar_chance (the same, against the input's bar
  lines) and tempo_ratio (output tempo / input tempo, the output tracked afresh)
- bars (`bars_heard`, every file tracked afresh by the downbeat tracker): on_bar_afresh (and its chance),
  target_bars_f (the aligned target's bar lines on the input's, F within 70 ms), output_bars_f (the input's bars
  still heard in the arrangement)
- phrases (`phrase_figures`, from the audio against the input's phrases): changes_per_min (the song heard changes,
  flips within a beat of each other counted once: a cross-fade is one change), change_bars (median time between
  changes, in the input's bars), on_phrase (share of changes heard within the bar before a phrase start, where a
  DJ's cross-fade lies, up to ON_BEAT_SECONDS after it) and seam (the log-mel change across a change over the
  input's own change across its beats, SEAM_SECONDS either side: 1 is as smooth as a beat inside the song)
"""
from __future__ import annotations

import math

import numpy as np
import torch

import trackers
from beats import extend_grid, level_db, track_beats, trusted
from layers import bass_rows, harmony_mask
from losses import DB_PER_NEPER, lsd_of_magnitudes, magnitude, mel_filterbank

ON_BEAT_SECONDS = 0.07  # a switch this close to a beat is on the beat
JUMP_SECONDS = 0.2  # the level before and after a switch is measured over this long
SEAM_SECONDS = 0.25  # the sound either side of a change (or a beat) is compared over this long
LABEL_SMOOTH_SECONDS = 0.09  # which song is heard is smoothed over this long (a majority of frames) before counting
PHRASE_KEYS = ("changes_per_min", "change_bars", "on_phrase", "seam")
IN_TIME_KEYS = ("switches_per_s", "section_s", "section_in_beats", "on_beat", "on_beat_chance", "on_bar",
                "on_bar_chance", "loudness_jump_db", "input_jump_db", "tempo_ratio")


@torch.no_grad()
def input_share(output: torch.Tensor, input_wave: torch.Tensor, target_wave: torch.Tensor,
                n_fft: int = 1024, hop: int = 256) -> torch.Tensor:
    """The input's share of what is heard, per example [B]: 0 = only the target, 1 = only the input.

    The output's magnitude spectrogram O is fitted by a * |input| + b * |target| with a, b >= 0 (non-negative least
    squares over all time-frequency cells, solved in closed form for two sources); the share is a / (a + b).
    Symmetric: swapping the songs gives 1 - share. Measured on the audio, so it counts loudness, not mask area.
    """
    o, a, b = magnitude(torch.cat([output, input_wave, target_wave]), n_fft, hop).chunk(3)
    return share_of_magnitudes(o, a, b)


def share_of_magnitudes(o: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """input_share from the magnitude spectrograms [B, F, frames] of output, input and target."""
    o, a, b = (m.double().flatten(1) for m in (o, a, b))
    aa, bb, ab = (a * a).sum(1), (b * b).sum(1), (a * b).sum(1)
    ao, bo = (a * o).sum(1), (b * o).sum(1)
    det = (aa * bb - ab * ab).clamp_min(1e-30)
    wa, wb = (bb * ao - ab * bo) / det, (aa * bo - ab * ao) / det
    only_b, only_a = wa < 0, wb < 0  # the unconstrained optimum leaves the quadrant: one source alone
    wa = torch.where(only_b, torch.zeros_like(wa), torch.where(only_a, (ao / aa.clamp_min(1e-30)).clamp_min(0), wa))
    wb = torch.where(only_a, torch.zeros_like(wb), torch.where(only_b, (bo / bb.clamp_min(1e-30)).clamp_min(0), wb))
    return (wa / (wa + wb).clamp_min(1e-30)).float()


@torch.no_grad()
def distances_and_share(output: torch.Tensor, input_wave: torch.Tensor, target_wave: torch.Tensor,
          n_fft: int = 1024, hop: int = 256) -> dict[str, torch.Tensor]:
    """What a listener hears, per example [B], from one STFT of output, input and target: the log-spectral distances
    (dB, over what is heard: losses.lsd_of_magnitudes) to each song and to the farther one, and the input's share
    (see input_share)."""
    o, a, b = magnitude(torch.cat([output, input_wave, target_wave]), n_fft, hop).chunk(3)
    lsd_in, lsd_tgt = (lsd_of_magnitudes(o, ref).view(output.shape[0], -1).mean(-1) * DB_PER_NEPER for ref in (a, b))
    return dict(lsd_in_db=lsd_in, lsd_tgt_db=lsd_tgt, lsd_max_db=torch.maximum(lsd_in, lsd_tgt),
                input_share=share_of_magnitudes(o, a, b))


@torch.no_grad()
def tone_distance_db(wave: torch.Tensor, reference: torch.Tensor, sample_rate: int, n_fft: int = 2048,
                     hop: int = 512, n_mels: int = 40) -> torch.Tensor:
    """How different the spectral balance of two recordings [B, 1, S] and [B, 1, S'] is, per example [B] (dB): the
    RMS over mel bands of the difference of their long-term average power per band. What is played when does not
    count, only how loud each band is on average: the tone that a --style_reference asks an arrangement to take."""
    fb = mel_filterbank(sample_rate, n_fft, n_mels, wave.device)
    tone = [10 * torch.log10(magnitude(w, n_fft, hop).square().mean(dim=-1) @ fb.T + 1e-10) for w in (wave, reference)]
    return (tone[0] - tone[1]).square().mean(dim=-1).sqrt()


BOTH_HEARD = (0.2, 0.8)  # a frame whose input share lies in this range holds both songs at once
LAYER_KEYS = ("both_heard", "rhythm_input_share", "harmony_input_share", "harmony_match")
# the layers' median filters in a 1024-point STFT with a hop of 512 (0.32 s, 730 Hz): half the frames of the
# shares' STFT, which leaves the filters a third of the work (they were most of arrange.py's summary)
STFT_LAYER_HOP, STFT_LAYER_FRAMES, STFT_LAYER_BINS = 512, 15, 31


@torch.no_grad()
def layering(output: np.ndarray, input_wave: np.ndarray, target_wave: np.ndarray, sample_rate: int) -> dict:
    """What is heard in layers, from the audio: `both_heard`, the share of the time both songs sound at once
    (frames whose input share lies in BOTH_HEARD); the input's share of the output's rhythm and of its harmony
    (input_share of each layer against the songs' same layers: harmonic-percussive separation of the three
    spectrograms and the bass band, layers.py); and `harmony_match`, where both are heard, how alike the two songs'
    notes are (cosine of the chroma of their harmony and bass: 1, the same notes; low means the layers clash)."""
    waves = torch.from_numpy(np.stack([np.asarray(w, dtype=np.float32) for w in (output, input_wave, target_wave)]))
    mags = magnitude(waves, 1024, 256)  # [3, F, frames]
    o, a, b = mags
    energy = o.square().sum(0)
    loud = energy > energy.max() * 1e-4  # frames with sound: within 40 dB of the loudest
    shares = share_of_magnitudes(*(m.T[loud] for m in (o, a, b)))
    both = torch.zeros_like(loud)
    both[loud] = heard_as_both(shares)
    coarse, harmony, notes = stft_layers(waves, sample_rate)  # frame k is frame 2k of `mags` (both centred)
    rhythm = coarse - harmony
    cosine = chroma_cosine(notes[1], notes[2], sample_rate)
    both_coarse = both[:: STFT_LAYER_HOP // 256][: cosine.shape[0]]
    return dict(both_heard=float(both[loud].float().mean()) if loud.any() else math.nan,
                rhythm_input_share=float(share_of_magnitudes(*rhythm[:, None])),
                harmony_input_share=float(share_of_magnitudes(*harmony[:, None])),
                harmony_match=float(cosine[both_coarse].mean()) if both_coarse.any() else math.nan)


def heard_as_both(shares: torch.Tensor) -> torch.Tensor:
    """Whether frames whose input share is `shares` hold both songs at once (BOTH_HEARD)."""
    lo, hi = BOTH_HEARD
    return (shares >= lo) & (shares <= hi)


def stft_layers(waves: torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Waves [N, S] -> their magnitude spectrograms [N, F, frames] (1024 points, a hop of STFT_LAYER_HOP), the
    harmony layer of each (layers.harmony_mask: median filters and the bass band) and their notes (the bass and the
    harmony: what a chroma counts). The rhythm is the spectrogram minus the harmony."""
    coarse = magnitude(waves, 1024, STFT_LAYER_HOP)
    bass = bass_rows(sample_rate / 1024)
    harmony = coarse * harmony_mask(coarse, STFT_LAYER_FRAMES, STFT_LAYER_BINS, bass)
    return coarse, harmony, torch.cat([coarse[:, :bass], harmony[:, bass:]], dim=1)


def chroma_cosine(notes_a: torch.Tensor, notes_b: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """How alike two songs' notes are in each frame: the cosine of the chroma of their spectrograms [..., F, frames]
    -> [..., frames] (1: the same notes)."""
    a, b = chroma_frames(notes_a, sample_rate), chroma_frames(notes_b, sample_rate)
    return (a * b).sum(-2) / (a.norm(dim=-2) * b.norm(dim=-2)).clamp_min(1e-12)


GUIDE_SHARPNESS = 10.0  # tanh(10 x (cosine - its median)): agreement or clash, nearly a sign


@torch.no_grad()
def layer_guide(input_wave: torch.Tensor, target_wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Which way round to layer two songs [B, 1, S] (the target aligned to the input), per frame of STFT_LAYER_HOP
    samples [B, frames] in [-1, 1] (`on_frames` takes it to a latent's frames): > 0, the input's rhythm under the
    target's harmony; < 0, the other way. Where the songs' notes agree more than is usual for them (chroma_cosine
    above its median over the clip), the way round in which both songs are heard at once (BOTH_HEARD); where they
    clash, the way round in which one song covers the other. Each way's frame is estimated as the sum of the
    layers' magnitudes (stft_layers), before anything is arranged. The layering agent's guide (--layer_guide): the
    notes come from the audio, because its latent cannot tell them apart (MDCT bins are 94 Hz wide, wider than a
    semitone below 1.6 kHz)."""
    batch = input_wave.shape[0]
    coarse, harmony, notes = stft_layers(torch.cat([input_wave, target_wave]).flatten(1).float(), sample_rate)
    a, b = coarse.chunk(2)
    (ha, hb), (na, nb) = harmony.chunk(2), notes.chunk(2)
    both = []
    for way in (a - ha + hb, b - hb + ha):  # the input's rhythm under the target's harmony, and the other way
        frame_rows = (m.transpose(1, 2).flatten(0, 1) for m in (way, a, b))  # one row per frame
        both.append(heard_as_both(share_of_magnitudes(*frame_rows).view(batch, -1)).float())
    cosine = chroma_cosine(na, nb, sample_rate)
    agree = torch.tanh(GUIDE_SHARPNESS * (cosine - cosine.median(dim=-1, keepdim=True).values))
    return agree * (both[0] - both[1])


def on_frames(values: torch.Tensor, frames: int) -> torch.Tensor:
    """Values per frame [B, n] at another frame rate over the same time, as `frames` frames [B, frames] (nearest)."""
    return torch.nn.functional.interpolate(values[:, None].float(), size=frames, mode="nearest")[:, 0]


def chroma_frames(mags: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[N, F, frames] magnitude spectrograms (n_fft = 2 (F - 1)) -> [N, 12, frames] chroma of their power, through
    librosa's chroma filter bank."""
    import librosa

    bank = torch.from_numpy(librosa.filters.chroma(sr=sample_rate, n_fft=2 * (mags.shape[-2] - 1))).to(mags.dtype)
    return bank @ mags.square()


def source_labels(output: np.ndarray, input_wave: np.ndarray, target_wave: np.ndarray, sample_rate: int,
                  hop_seconds: float = 0.01) -> tuple[np.ndarray, float]:
    """Which song is heard in each frame of `hop_seconds` (True: the input): the one whose log-mel frame is nearer
    the output's in shape, each frame's mean log level taken out first, smoothed by a majority over
    LABEL_SMOOTH_SECONDS. Returns (labels, frame hop in seconds). A song played louder or softer is still that song:
    alignment and the fader at a switch change the songs' levels by up to 12 dB, which a level-sensitive distance
    heard as the other song, several times a section."""
    hop = max(1, int(round(hop_seconds * sample_rate)))
    n_fft = 1 << int(math.ceil(math.log2(4 * hop)))
    waves = torch.from_numpy(np.stack([output, input_wave, target_wave]).astype(np.float32))
    mags = magnitude(waves, n_fft, hop)
    mel = torch.log(mel_filterbank(sample_rate, n_fft, 40) @ mags + 1e-5)
    mel = mel - mel.mean(dim=1, keepdim=True)
    near_input = ((mel[0] - mel[1]).abs().mean(0) < (mel[0] - mel[2]).abs().mean(0)).numpy().astype(np.float64)
    k = max(1, int(round(LABEL_SMOOTH_SECONDS / (hop / sample_rate)))) | 1
    smoothed = np.convolve(np.pad(near_input, k // 2, mode="edge"), np.ones(k) / k, mode="valid")
    return smoothed > 0.5, hop / sample_rate


def switch_times(output: np.ndarray, input_wave: np.ndarray, target_wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """The times (s) at which the song heard in the output changes (source_labels), midway between the frames."""
    labels, hop_s = source_labels(output, input_wave, target_wave, sample_rate)
    return (np.flatnonzero(labels[1:] != labels[:-1]) + 0.5) * hop_s


def near_grid(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Whether each of `times` lies within ON_BEAT_SECONDS of a time of the sorted `grid` (its neighbours on either
    side found by bisection, not a times x grid table)."""
    right = np.searchsorted(grid, times).clip(1, len(grid) - 1)
    gap = np.minimum(np.abs(times - grid[right - 1]), np.abs(grid[right] - times))
    return gap <= ON_BEAT_SECONDS


@torch.no_grad()
def in_time(waves: tuple[np.ndarray, np.ndarray, np.ndarray], beats: np.ndarray | None, sample_rate: int,
            bar: tuple[int, float] = (0, math.nan), output_tempo: float | None = None) -> dict[str, float]:
    """What is heard in time, from the audio of one arrangement (`waves`: the output, the input and the target,
    mono arrays of one length) and the input's beat times `beats` (s; None or empty: no grid, so the beat figures
    are NaN) and bars `bar` = (meter, one bar line's time; unknown: the bar figures are NaN): see the module's
    docstring. The output's tempo is tracked afresh,
    unless `output_tempo` (BPM, 0 for no pulse) says what it was tracked at already (bars_heard)."""
    output, input_wave, target_wave = waves
    seconds = len(output) / sample_rate
    switches = switch_times(output, input_wave, target_wave, sample_rate)
    edges = np.concatenate([[0.0], switches, [seconds]])
    runs = np.diff(edges)
    inner = runs[1:-1] if len(runs) > 2 else runs
    beats = np.asarray([] if beats is None else beats, dtype=np.float64)
    beats = beats[np.isfinite(beats)]
    result = dict(switches_per_s=len(switches) / seconds, section_s=float(np.median(inner)))
    nan = dict(section_in_beats=math.nan, on_beat=math.nan, on_beat_chance=math.nan, on_bar=math.nan,
               on_bar_chance=math.nan, tempo_ratio=math.nan)
    if len(beats) >= 2:
        grid = extend_grid(beats, seconds)
        period = float(np.median(np.diff(beats)))
        times = np.arange(0.0, seconds, 0.001)
        nan.update(section_in_beats=result["section_s"] / period,
                   on_beat=float(near_grid(switches, grid).mean()) if len(switches) else math.nan,
                   on_beat_chance=float(near_grid(times, grid).mean()))
        if bar[0] > 0 and math.isfinite(bar[1]):
            lines = grid[int(np.abs(grid - bar[1]).argmin()) % bar[0] :: bar[0]]
            nan.update(on_bar=float(near_grid(switches, lines).mean()) if len(switches) else math.nan,
                       on_bar_chance=float(near_grid(times, lines).mean()))
        out_tempo = (track_beats(np.asarray(output, dtype=np.float32), sample_rate).tempo if output_tempo is None
                     else output_tempo)
        nan["tempo_ratio"] = out_tempo * period / 60.0 if out_tempo else math.nan
    result.update(nan)
    w = int(JUMP_SECONDS * sample_rate)
    jumps = [abs(level_db(output[max(0, i - w) : i]) - level_db(output[i : i + w]))
             for i in (int(t * sample_rate) for t in switches)]
    own = [abs(level_db(input_wave[max(0, i - w) : i]) - level_db(input_wave[i : i + w]))
           for i in (int(t * sample_rate) for t in switches)]
    result["loudness_jump_db"] = float(np.median(jumps)) if jumps else math.nan
    result["input_jump_db"] = float(np.median(own)) if own else math.nan
    return result


def bar_fmeasure(detected: np.ndarray, reference: np.ndarray) -> float:
    """F-measure of bar lines against a reference's, each matched within ON_BEAT_SECONDS (madmom's evaluation)."""
    trackers.madmom()
    from madmom.evaluation.onsets import onset_evaluation

    if len(detected) == 0 and len(reference) == 0:
        return 1.0
    tp, fp, _, fn, _ = onset_evaluation(np.sort(detected), np.sort(reference), ON_BEAT_SECONDS)
    return 2 * len(tp) / max(1, 2 * len(tp) + len(fp) + len(fn))


def bars_heard(output: np.ndarray, input_wave: np.ndarray, aligned_target: np.ndarray, sample_rate: int,
               input_bars: np.ndarray | None = None) -> dict[str, float]:
    """The bar figures of one arrangement from its files' audio, each tracked afresh by the downbeat tracker (not
    from the grid the arrangement was made on): the share of switches on the input's bar lines (and by chance),
    the aligned target's bar lines on the input's (F) and the input's bars still heard in the output (F).
    `input_bars`: the input's bar lines where the same tracker heard them already on the same audio. Also
    gives the output's tempo as tracked (0 without a pulse), for in_time's `output_tempo`."""
    waves = (("target", aligned_target), ("output", output)) + ((("input", input_wave),) if input_bars is None else ())
    heard = trackers.track_bars([np.asarray(a, dtype=np.float32) for _, a in waves], sample_rate)
    bars = {name: b.downbeats for (name, _), b in zip(waves, heard, strict=True)}
    bars.setdefault("input", input_bars)
    switches = switch_times(output, input_wave, aligned_target, sample_rate)
    lines = bars["input"]
    on_bar = on_chance = math.nan
    if len(lines) >= 2:
        on_bar = float(near_grid(switches, lines).mean()) if len(switches) else math.nan
        on_chance = float(near_grid(np.arange(lines[0], lines[-1], 0.001), lines).mean())
    return dict(on_bar_afresh=on_bar, on_bar_afresh_chance=on_chance,
                target_bars_f=bar_fmeasure(bars["target"], lines), output_bars_f=bar_fmeasure(bars["output"], lines),
                output_tempo=trusted(heard[1], len(output) / sample_rate).tempo)


def mean_in_time(rows: list[dict[str, float]], keys: tuple[str, ...] = IN_TIME_KEYS) -> dict[str, float]:
    """The mean of each figure (in time, or `keys`) over arrangements, NaN ones left out (NaN where all are)."""
    out = {}
    for key in keys:
        values = [r[key] for r in rows if math.isfinite(r[key])]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


def heard_in_time_and_layers(output: np.ndarray, input_wave: np.ndarray, target_wave: np.ndarray,
                             beats: np.ndarray | None, sample_rate: int,
                             bar: tuple[int, float] = (0, math.nan)) -> dict[str, float]:
    """in_time and layering of one arrangement, in one record (training's validation, evaluate.py)."""
    return {**in_time((output, input_wave, target_wave), beats, sample_rate, bar),
            **layering(output, input_wave, target_wave, sample_rate)}


def log_mel(wave: np.ndarray, sample_rate: int, hop_seconds: float = 0.01) -> tuple[torch.Tensor, float]:
    """(log-mel [40, frames] of a mono wave, the frame hop in seconds)."""
    hop = max(1, int(round(hop_seconds * sample_rate)))
    n_fft = 1 << int(math.ceil(math.log2(4 * hop)))
    mags = magnitude(torch.from_numpy(np.asarray(wave, dtype=np.float32))[None], n_fft, hop)[0]
    return torch.log(mel_filterbank(sample_rate, n_fft, 40) @ mags + 1e-5), hop / sample_rate


def change_at(mel: torch.Tensor, times: np.ndarray, hop_seconds: float) -> np.ndarray:
    """How much the sound changes at each of `times` (s): the mean absolute difference (nepers) of the mean log-mel
    over SEAM_SECONDS before and after it; times too near either end are left out."""
    w, frames = int(round(SEAM_SECONDS / hop_seconds)), mel.shape[1]
    at = np.round(np.asarray(times) / hop_seconds).astype(int)
    at = at[(at >= w) & (at + w <= frames)]
    return np.asarray([(mel[:, k - w : k].mean(1) - mel[:, k : k + w].mean(1)).abs().mean().item() for k in at])


def merge_flips(switches: np.ndarray, gap: float) -> list[tuple[float, float]]:
    """Label flips closer than `gap` (s) to each other as one change: [(first, last)] (a cross-fade's flips)."""
    changes: list[tuple[float, float]] = []
    for t in switches:
        if changes and t - changes[-1][1] < gap:
            changes[-1] = (changes[-1][0], float(t))
        else:
            changes.append((float(t), float(t)))
    return changes


@torch.no_grad()
def phrase_figures(waves: tuple[np.ndarray, np.ndarray, np.ndarray], starts: np.ndarray, bar_lines: np.ndarray,
                   sample_rate: int) -> dict[str, float]:
    """The phrase figures (see the module's docstring) of one arrangement, from its audio (`waves`: the output, the
    input and the target as it entered, mono, one length), against the input's phrase `starts` (s; 0 left out) and
    its bar lines `bar_lines` (s). NaN where there is no change (on_phrase, seam) or no bars."""
    output, input_wave, target_wave = waves
    seconds = len(output) / sample_rate
    bar = float(np.median(np.diff(bar_lines))) if len(bar_lines) > 1 else math.nan
    beat = bar / 4 if math.isfinite(bar) else 0.5
    changes = merge_flips(switch_times(output, input_wave, target_wave, sample_rate), min(beat, 0.75))
    starts = np.asarray([s for s in starts if s > 0])
    on = [bool(np.any((first >= starts - bar - ON_BEAT_SECONDS) & (last <= starts + ON_BEAT_SECONDS)))
          for first, last in changes]
    middles = np.asarray([(first + last) / 2 for first, last in changes])
    out_mel, hop_s = log_mel(output, sample_rate)
    in_mel, _ = log_mel(input_wave, sample_rate)
    beats = np.arange(bar_lines[0], bar_lines[-1], beat) if math.isfinite(bar) else np.arange(0.5, seconds, 0.5)
    at_changes, at_beats = change_at(out_mel, middles, hop_s), change_at(in_mel, beats, hop_s)
    gaps = np.diff(np.concatenate([[0.0], middles, [seconds]]))
    return dict(changes_per_min=60 * len(changes) / seconds,
                change_bars=float(np.median(gaps[1:-1] if len(gaps) > 2 else gaps)) / bar,
                on_phrase=float(np.mean(on)) if on else math.nan,
                seam=float(np.median(at_changes) / np.median(at_beats)) if len(at_changes) and len(at_beats)
                else math.nan)
