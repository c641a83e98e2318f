"""The music's grid and alignment: the beats, tempo, key and loudness of a song, the sections of N beats that the
agent and the temporal rule decide on, and laying one song onto another's grid before both are encoded.

librosa tracks the beats and the chroma, pedalboard's Rubber Band stretches and shifts, pyloudnorm measures
ITU-R BS.1770 loudness. A song without a usable pulse (ambient, rubato, noise, a clip shorter than a few beats)
gets an empty grid and a note, never an error: its sections fall back to fixed blocks of frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MIN_BEATS = 4  # fewer tracked beats than this is no usable pulse
SNAP_SECONDS = 0.05  # a beat moves to an attack's start at most this far
MIN_PULSE = 0.1  # the onset envelope's autocorrelation at the beat period below which a "pulse" is noise
MAX_STRETCH = 2.0  # tempos further apart than this after folding octave errors are not stretched
SWITCH_FADE_SECONDS = 0.025  # a switch between the songs is a cross-fade of this length, not a cut (no click)
RIDE_SECONDS = 0.2  # at a switch, the incoming song meets the level of the last this-many seconds (a DJ's fader)
MAX_RIDE_DB = 12.0  # ... moved by at most this much either way
KEY_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Krumhansl-Kessler key profiles (Krumhansl 1990), tonic first: how well each pitch class fits a major / minor key
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


class AlignmentError(ValueError):
    """Two songs that cannot be laid on one grid (tempos too far apart); the message says why."""


@dataclass
class Grid:
    """What a song's grid holds: tempo (BPM, 0 without a pulse), beat times (s), key (tonic pitch class, minor or
    major), integrated loudness (LUFS) and, for a song without a usable pulse, a note that says why."""

    tempo: float
    beats: np.ndarray
    key: int
    minor: bool
    loudness: float
    note: str = ""

    @property
    def has_pulse(self) -> bool:
        return len(self.beats) >= 2 and self.tempo > 0

    @property
    def key_name(self) -> str:
        return KEY_NAMES[self.key] + (" minor" if self.minor else " major")


# ---------------------------------------------------------------- analysis

def track_beats(audio: np.ndarray, sample_rate: int) -> tuple[float, np.ndarray, str]:
    """(tempo BPM, beat times s, note): librosa's dynamic-programming beat tracker (Ellis 2007) on 10 ms frames,
    each beat moved to the start of its attack (the backtracked onset within SNAP_SECONDS), where a switch between
    songs belongs; checked for a real pulse: the onset envelope must repeat at the beat period. Without one:
    (0.0, [], why)."""
    import librosa

    seconds = len(audio) / sample_rate
    if seconds < 1.0:
        return 0.0, np.zeros(0), f"no beat grid: {seconds:.2f} s is too short to track beats"
    hop = max(32, int(round(0.01 * sample_rate)))
    envelope = librosa.onset.onset_strength(y=audio, sr=sample_rate, hop_length=hop)
    _, beats = librosa.beat.beat_track(onset_envelope=envelope, sr=sample_rate, hop_length=hop, units="time")
    if len(beats) < MIN_BEATS:
        return 0.0, np.zeros(0), f"no beat grid: fewer than {MIN_BEATS} beats found in {seconds:.1f} s"
    tempo = tempo_of(beats)  # from the tracker's regular beats, before they move to the attacks
    clarity = pulse_clarity(envelope, 60.0 / tempo * sample_rate / hop)
    if clarity < MIN_PULSE:
        return 0.0, np.zeros(0), f"no beat grid: no steady pulse (clarity {clarity:.2f} < {MIN_PULSE})"
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=sample_rate, hop_length=hop, units="time",
                                        backtrack=True)
    if len(onsets):  # the tracker's beats lag the attacks by up to a frame and its envelope's rise
        nearest = onsets[np.abs(onsets[None] - beats[:, None]).argmin(axis=1)]
        beats = np.where(np.abs(nearest - beats) <= SNAP_SECONDS, nearest, beats)
    return tempo, np.asarray(beats, dtype=np.float64), ""


def tempo_of(beats: np.ndarray) -> float:
    """BPM of beat times: a line fitted to the beats against their count on the grid (each beat numbered by the
    median period, so a beat the tracker left out is a gap, not a slower tempo). librosa's own estimate is
    quantised to its autocorrelation lags, 2 % off at 120 BPM; the median period alone to its frames."""
    period = float(np.median(np.diff(beats)))
    count = np.round((beats - beats[0]) / period)
    return 60.0 / float(np.polyfit(count, beats, 1)[0])


def pulse_clarity(envelope: np.ndarray, period_frames: float) -> float:
    """How strongly an onset envelope repeats at `period_frames`: its normalised autocorrelation there (best of the
    neighbouring lags), about 0 for noise, near 1 for a click track."""
    env = envelope - envelope.mean()
    energy = float(env @ env)
    lag = int(round(period_frames))
    if energy <= 0 or lag < 1 or lag + 1 >= len(env):
        return 0.0
    return max(float(env[:-k] @ env[k:]) / energy for k in (lag - 1, lag, lag + 1) if k >= 1)


def estimate_key(audio: np.ndarray, sample_rate: int) -> tuple[int, bool, float]:
    """(tonic pitch class, minor?, correlation): the Krumhansl-Schmuckler key finder on librosa's chroma."""
    import librosa

    n_fft = 1 << max(9, int(math.log2(sample_rate / 6)))  # bins of about 6 Hz or finer: low notes resolved
    chroma = librosa.feature.chroma_stft(y=audio, sr=sample_rate, n_fft=min(n_fft, max(512, len(audio))))
    profile = chroma.mean(axis=1)
    best = (0, False, -1.0)
    for minor, template in ((False, MAJOR_PROFILE), (True, MINOR_PROFILE)):
        for tonic in range(12):
            r = float(np.corrcoef(profile, np.roll(template, tonic))[0, 1]) if profile.std() > 0 else 0.0
            if r > best[2]:
                best = (tonic, minor, r)
    return best


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (LUFS, ITU-R BS.1770-4 via pyloudnorm); the K-weighted level of clips shorter than
    its 0.4 s block is taken as the RMS level in dBFS, and -inf stands for silence."""
    import pyloudnorm

    if len(audio) >= int(0.4 * sample_rate) + 1:
        value = float(pyloudnorm.Meter(sample_rate).integrated_loudness(audio.astype(np.float64)))
        if math.isfinite(value):
            return value
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def analyse(audio: np.ndarray, sample_rate: int, beats: np.ndarray | None = None) -> Grid:
    """The grid of a whole mono song: beats, tempo, key and loudness. `beats`: beat times known already (tracked
    on the whole song the audio was cut from, as make_pairs.py keeps them; NaN entries are padding)."""
    audio = np.asarray(audio, dtype=np.float32)
    if beats is None:
        tempo, beats, note = track_beats(audio, sample_rate)
    else:
        beats = np.asarray(beats, dtype=np.float64)
        beats = beats[np.isfinite(beats)]
        tempo, note = 0.0, "no beat grid: fewer than 2 beats in the segment"
        if len(beats) >= 2:
            tempo, note = tempo_of(beats), ""
    key, minor, _ = estimate_key(audio, sample_rate)
    return Grid(tempo, beats, key, minor, loudness_lufs(audio, sample_rate), note)


# ---------------------------------------------------------------- sections

def extend_grid(beats: np.ndarray, seconds: float) -> np.ndarray:
    """Beat times continued at the median period before the first and after the last tracked beat, so the grid
    covers 0..seconds (librosa leaves out the weak beats at both ends)."""
    period = float(np.median(np.diff(beats)))
    before = beats[0] - period * np.arange(math.ceil(beats[0] / period), 0, -1)
    after = beats[-1] + period * np.arange(1, math.ceil((seconds - beats[-1]) / period) + 1)
    return np.concatenate([before, beats, after])


def section_starts(beats: np.ndarray, seconds: float, beats_per_section: int) -> np.ndarray:
    """The times (s) at which sections of `beats_per_section` beats start within 0..seconds, counted from the first
    tracked beat; 0 always starts one, and a start within half a beat of 0 or of the end is dropped (no section
    shorter than half a beat). Empty beats: only 0."""
    if len(beats) < 2:
        return np.zeros(1)
    grid = extend_grid(np.asarray(beats, dtype=np.float64), seconds)
    first = int(np.searchsorted(grid, beats[0]))
    starts = grid[first % beats_per_section :: beats_per_section]
    half = 0.5 * float(np.median(np.diff(beats)))
    starts = starts[(starts >= half) & (starts <= seconds - half)]
    return np.concatenate([[0.0], starts])


def switch_fade_frames(frame_rate: float) -> int:
    """The number of latent frames closest to SWITCH_FADE_SECONDS at `frame_rate` frames per second."""
    return max(1, int(round(SWITCH_FADE_SECONDS * frame_rate)))


def section_ids(beats: np.ndarray | None, frames: int, frame_rate: float, beats_per_section: int,
                block_frames: int) -> torch.Tensor:
    """Which section each of `frames` latent frames belongs to [frames] (int64, 0, 1, ... in time order): sections
    of `beats_per_section` beats of `beats` (seconds, NaN or none for no pulse), or fixed blocks of `block_frames`
    frames where there is no usable grid or `beats_per_section` is 0."""
    beats = np.asarray([] if beats is None else beats, dtype=np.float64)
    beats = beats[np.isfinite(beats)]
    if beats_per_section <= 0 or len(beats) < 2:
        return torch.arange(frames) // max(1, block_frames)
    starts = np.round(section_starts(beats, frames / frame_rate, beats_per_section) * frame_rate)
    return torch.from_numpy(np.searchsorted(starts, np.arange(frames), side="right") - 1).long()


def batch_section_ids(beats: torch.Tensor, frames: int, frame_rate: float, beats_per_section: int,
                      block_frames: int) -> torch.Tensor:
    """section_ids of every example of a batch of beat times [B, K] (NaN-padded) -> [B, frames]."""
    return torch.stack([section_ids(b.numpy(), frames, frame_rate, beats_per_section, block_frames)
                        for b in beats.detach().cpu().double()])


def padded_beats(beats: np.ndarray, seconds: float) -> torch.Tensor:
    """Beat times within 0..seconds as a float tensor of a fixed size for batching (up to 8 beats a second),
    padded with NaN."""
    size = int(math.ceil(8 * seconds)) + 1
    out = torch.full((size,), math.nan)
    inside = np.asarray(beats, dtype=np.float64)
    inside = inside[(inside >= 0) & (inside < seconds)][:size]
    out[: len(inside)] = torch.from_numpy(inside).float()
    return out


# ---------------------------------------------------------------- alignment

@dataclass
class Alignment:
    """What was done to the target: tempo ratio (target's speed-up), semitones, gains, beat offset, and notes."""

    tempo_in: float
    tempo_tgt: float
    ratio: float
    key_in: str
    key_tgt: str
    semitones: int
    lufs_in: float
    lufs_tgt: float
    notes: list
    used: int  # samples of the target that were stretched
    offset: int  # samples of the stretched target skipped, so its beats fall on the input's
    gain: float = 1.0  # the loudness match, as a factor

    def line(self) -> str:
        tempo = (f"tempo {self.tempo_tgt:.1f}\u2192{self.tempo_in:.1f} BPM (\u00d7{self.ratio:.3f})"
                 if self.tempo_in and self.tempo_tgt else "tempo unchanged (no beat grid)")
        key = f"key {self.key_tgt}\u2192{self.key_in} ({self.semitones:+d} semitones)"
        return f"{tempo}, {key}, loudness {self.lufs_tgt:.1f}\u2192{self.lufs_in:.1f} LUFS"


def tempo_ratio(tempo_in: float, tempo_tgt: float) -> float:
    """The speed-up that brings the target to the input's tempo, with octave errors folded (x2, x1/2: a tracker
    often counts half or double time). AlignmentError when even the folded ratio is beyond MAX_STRETCH."""
    candidates = [tempo_in / tempo_tgt * f for f in (1.0, 2.0, 0.5)]
    ratio = min(candidates, key=lambda r: abs(math.log(r)))
    if not 1 / MAX_STRETCH <= ratio <= MAX_STRETCH:
        raise AlignmentError(f"tempos {tempo_tgt:.1f} and {tempo_in:.1f} BPM are too far apart to stretch one onto "
                             f"the other (x{ratio:.2f} after folding octave errors; at most x{MAX_STRETCH:g})")
    return ratio


def key_shift(input_grid: Grid, target_grid: Grid) -> int:
    """Semitones (-6..+5) that move the target's key onto the input's by the smallest step; a relative major or
    minor counts as the same key (A minor = C major)."""
    def major(g: Grid) -> int:
        return (g.key + 3) % 12 if g.minor else g.key

    return (major(input_grid) - major(target_grid) + 6) % 12 - 6


def beat_phase(beats: np.ndarray, period: float) -> float:
    """Where in the beat period (s) the beats fall: the circular mean of their times modulo the period."""
    angle = np.angle(np.exp(2j * np.pi * np.asarray(beats) / period).mean())
    return float(angle % (2 * np.pi)) / (2 * np.pi) * period


def stretch(audio: np.ndarray, sample_rate: int, ratio: float, semitones: int) -> np.ndarray:
    """Rubber Band (pedalboard) time-stretch by `ratio` (> 1: faster) and pitch-shift by `semitones` in one pass."""
    if abs(ratio - 1) < 1e-4 and semitones == 0:
        return audio
    import pedalboard

    out = pedalboard.time_stretch(audio[None].astype(np.float32), sample_rate, stretch_factor=float(ratio),
                                  pitch_shift_in_semitones=float(semitones))
    return out[0]


def level_db(audio: np.ndarray) -> float:
    """RMS level (dB) of some samples; -100 for none or silence."""
    return 10 * math.log10(float(np.mean(np.square(audio, dtype=np.float64))) + 1e-10) if len(audio) else -100.0


def level_switches(audio: np.ndarray, sections: list[tuple[int, int]], sample_rate: int,
                   seconds: float = RIDE_SECONDS, max_db: float = MAX_RIDE_DB, match_end: bool = True) -> np.ndarray:
    """An arrangement with the fader of the target ridden at each switch, as a DJ rides the incoming deck against
    the one playing: each of the target's `sections` [start, end) (samples) starts at the level of the `seconds`
    of the input before it, held there for `seconds` and eased to its own level over the next `seconds`, and ends
    likewise at the level of the `seconds` of the input after it (a run shorter than four times `seconds` never
    reaches its own level: it moves from one end's level to the other's). In between the target plays as it is, so
    the ride costs it nothing where no switch is near. The input's sections, and the target's ends at the
    arrangement's ends, keep their own level: the input is the song the arrangement is built on. `match_end`
    False: only the start is ridden (a layered arrangement, where every section is ridden against the one before
    it)."""
    w, n = max(1, int(seconds * sample_rate)), len(audio)
    gain_db = np.zeros(n)
    for s, e in sections:
        e = min(e, n)
        if e <= s:
            continue
        before = audio[s - w : s] * 10 ** (gain_db[s - w : s] / 20)  # as ridden so far (a ride may end there)
        first = level_db(before) - level_db(audio[s : s + w]) if s >= w else 0.0
        last = level_db(audio[e : e + w]) - level_db(audio[max(0, e - w) : e]) if e + w <= n and match_end else 0.0
        first, last = (float(np.clip(g, -max_db, max_db)) for g in (first, last))
        if not match_end or e - s >= 4 * w:  # held, eased to its own level, and (match_end) back again
            points, gains = [s, s + w, s + 2 * w], [first, first, 0.0]
            if match_end:
                points, gains = points + [e - 2 * w, e - w, e - 1], gains + [0.0, last, last]
        elif e - s >= 2 * w:
            points, gains = [s, s + w, e - w, e - 1], [first, first, last, last]
        else:
            points, gains = [s, e - 1], [first, last]
        gain_db[s:e] = np.interp(np.arange(s, e), points, gains)
    return (audio * 10 ** (gain_db / 20)).astype(np.float32)


def loop_to(audio: np.ndarray, length: int) -> np.ndarray:
    """`audio` repeated as often as needed and cut to `length` samples."""
    return np.tile(audio, -(-length // max(1, len(audio))))[:length]


def align(target: np.ndarray, input_song: np.ndarray, sample_rate: int, target_grid: Grid | None = None,
          input_grid: Grid | None = None, match_key: bool = True,
          tolerant: bool = False) -> tuple[np.ndarray, Alignment]:
    """The target laid on the input's grid, as it enters the arrangement: stretched to the input's tempo with its
    beats on the input's beats, shifted to the input's key (`match_key`), brought to the input's loudness
    (BS.1770) and looped or cut to the input's length (levels at the switches: level_switches). Where either
    song has no beat grid the tempo is left alone, with a note. AlignmentError for tempos too far apart, unless
    `tolerant` (training pairs): then the tempo is left alone, with a note."""
    input_grid = input_grid or analyse(input_song, sample_rate)
    target_grid = target_grid or analyse(target, sample_rate)
    notes = [f"{name}: {g.note}" for name, g in (("input", input_grid), ("target", target_grid)) if g.note]
    pulse = input_grid.has_pulse and target_grid.has_pulse
    try:
        ratio = tempo_ratio(input_grid.tempo, target_grid.tempo) if pulse else 1.0
    except AlignmentError as err:
        if not tolerant:
            raise
        pulse, ratio = False, 1.0
        notes.append(f"tempo left alone: {err}")
    semitones = key_shift(input_grid, target_grid) if match_key else 0
    period = 60.0 / input_grid.tempo if pulse else 0.0
    # stretch only what the arrangement takes (the input's length, and a beat for the offset), not a long tail
    used = math.ceil((len(input_song) / sample_rate + period + 0.1) * ratio * sample_rate)
    offset = 0  # samples: the stretched target starts where its beats fall on the input's
    if pulse:
        phase = (beat_phase(target_grid.beats / ratio, period) - beat_phase(input_grid.beats, period)) % period
        offset = int(round(phase * sample_rate))
    info = Alignment(input_grid.tempo, target_grid.tempo, ratio, input_grid.key_name, target_grid.key_name, semitones,
                     input_grid.loudness, target_grid.loudness, notes, used, offset)
    out = lay_on_grid(target, info, len(input_song), sample_rate)
    lufs_tgt = loudness_lufs(out, sample_rate)
    if math.isfinite(lufs_tgt) and math.isfinite(info.lufs_in):
        info.gain = 10 ** ((info.lufs_in - lufs_tgt) / 20)
    return (out * np.float32(info.gain)).astype(np.float32), info


def lay_on_grid(audio: np.ndarray, alignment: Alignment, length: int, sample_rate: int) -> np.ndarray:
    """A recording of the target (the target itself, or one of its stems) laid on the input's grid as `align` laid
    the target: stretched and shifted alike, started at the same offset, looped or cut to `length` samples and
    levelled by the same gain. Stems laid this way still sum to the aligned target, up to Rubber Band's rounding."""
    a = alignment
    out = stretch(np.asarray(audio[: a.used], dtype=np.float32), sample_rate, a.ratio, a.semitones)
    return loop_to(out[a.offset :], length) * np.float32(a.gain)
