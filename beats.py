"""The music's grid and alignment: the beats, bars, meter, tempo, key and loudness of a song, the sections of N
bars (or beats) that the agent and the temporal rule decide on, and laying one song onto another's bars before both
are encoded.

The beats, bar lines, meter and key come from madmom's networks trained on annotated music (trackers.py),
pedalboard's Rubber Band stretches and shifts, pyloudnorm measures ITU-R BS.1770 loudness. A song without a pulse
the tracker trusts (ambient, rubato, noise, a clip shorter than a few beats) gets an empty grid and a note, never an
error: its sections fall back to fixed blocks of frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

import trackers

MIN_BEATS = 4  # fewer tracked beats than this is no usable pulse
MIN_CONFIDENCE = 0.2  # the tracker's mean activation at its beats below which a "pulse" is noise (docs/results.md)
MAP_MARKS = 4  # a time map needs this many bar lines (or beats) in both songs: not a training segment's few
MAX_STRETCH = 2.0  # tempos further apart than this after folding octave errors are not stretched
SWITCH_FADE_SECONDS = 0.025  # a switch between the songs is a cross-fade of this length, not a cut (no click)
RIDE_SECONDS = 0.2  # at a switch, the incoming song meets the level of the last this-many seconds (a DJ's fader)
MAX_RIDE_DB = 12.0  # ... moved by at most this much either way
KEY_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


class AlignmentError(ValueError):
    """Two songs that cannot be laid on one grid (tempos too far apart); the message says why."""


@dataclass
class Pulse:
    """What the beat and bar tracker heard: tempo (BPM, 0 without a pulse), beat times (s), bar lines (s), meter
    (beats a bar, 0 unknown), how sure it is (0..1) and, without a usable pulse, a note that says why."""

    tempo: float
    beats: np.ndarray
    downbeats: np.ndarray
    meter: int
    confidence: float
    note: str = ""


@dataclass
class Grid:
    """What a song's grid holds: tempo (BPM, 0 without a pulse), beat times (s), key (tonic pitch class, minor or
    major), integrated loudness (LUFS), a note for a song without a usable pulse, its bar lines (s), meter and how
    sure the trackers are of the pulse and of the key (0..1)."""

    tempo: float
    beats: np.ndarray
    key: int
    minor: bool
    loudness: float
    note: str = ""
    downbeats: np.ndarray = field(default_factory=lambda: np.zeros(0))
    meter: int = 0
    confidence: float = 0.0
    key_confidence: float = 0.0

    @property
    def has_pulse(self) -> bool:
        return len(self.beats) >= 2 and self.tempo > 0

    @property
    def has_bars(self) -> bool:
        return self.has_pulse and self.meter > 0 and len(self.downbeats) > 0

    @property
    def bar(self) -> tuple[int, float]:
        """(meter, its first bar line's time), or (0, NaN) where the bars are not known: what sections count from."""
        return (self.meter, float(self.downbeats[0])) if self.has_bars else (0, math.nan)

    @property
    def key_name(self) -> str:
        return key_name(self.key, self.minor)


def key_name(tonic: int, minor: bool) -> str:
    """'A minor', 'Eb major', ... of a tonic pitch class (0 = C)."""
    return KEY_NAMES[tonic % 12] + (" minor" if minor else " major")


# ---------------------------------------------------------------- analysis

def no_pulse(note: str) -> Pulse:
    return Pulse(0.0, np.zeros(0), np.zeros(0), 0, 0.0, f"no beat grid: {note}")


def track_beats(audio: np.ndarray, sample_rate: int) -> Pulse:
    """Beats, bar lines, meter and tempo of a mono song by madmom's downbeat tracker (trackers.track_bars),
    checked for a pulse it trusts. Without one: an empty Pulse with a note that says why."""
    return track_pulses([audio], sample_rate)[0]


def track_pulses(songs: list[np.ndarray], sample_rate: int) -> list[Pulse]:
    """track_beats of several songs at once (the tracker's networks step through them together)."""
    long_enough = [i for i, s in enumerate(songs) if len(s) >= sample_rate]
    bars = dict(zip(long_enough, trackers.track_bars([songs[i] for i in long_enough], sample_rate), strict=True))
    return [trusted(bars[i], len(s) / sample_rate) if i in bars else
            no_pulse(f"{len(s) / sample_rate:.2f} s is too short to track beats") for i, s in enumerate(songs)]


def trusted(bars: trackers.Bars, seconds: float) -> Pulse:
    """The tracker's Pulse of a song of `seconds`, or an empty one with a note where there is no pulse it trusts."""
    if len(bars.beats) < MIN_BEATS:
        return no_pulse(f"fewer than {MIN_BEATS} beats found in {seconds:.1f} s")
    if bars.confidence < MIN_CONFIDENCE:
        return no_pulse(f"no steady pulse (the tracker's confidence {bars.confidence:.2f} < {MIN_CONFIDENCE})")
    return Pulse(tempo_of(bars.beats), bars.beats, bars.downbeats, bars.meter, bars.confidence)


def tempo_of(beats: np.ndarray) -> float:
    """BPM of beat times: a line fitted to the beats against their count on the grid (each beat numbered by the
    median period, so a beat the tracker left out is a gap, not a slower tempo)."""
    period = float(np.median(np.diff(beats)))
    count = np.round((beats - beats[0]) / period)
    return 60.0 / float(np.polyfit(count, beats, 1)[0])


def estimate_key(audio: np.ndarray, sample_rate: int) -> tuple[int, bool, float]:
    """(tonic pitch class, minor?, probability): madmom's key CNN over the whole song (trackers.track_key)."""
    return trackers.track_key(audio, sample_rate)


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


def analyse(audio: np.ndarray, sample_rate: int, pulse: Pulse | None = None) -> Grid:
    """The grid of a whole mono song: beats, bars, tempo, key and loudness. `pulse`: the beats and bars known
    already (tracked on the whole song the audio was cut from, as make_pairs.py keeps them)."""
    audio = np.asarray(audio, dtype=np.float32)
    pulse = pulse or track_beats(audio, sample_rate)
    key, minor, key_confidence = estimate_key(audio, sample_rate)
    return Grid(pulse.tempo, pulse.beats, key, minor, loudness_lufs(audio, sample_rate), pulse.note, pulse.downbeats,
                pulse.meter, pulse.confidence, key_confidence)


def known_pulse(beats, downbeats=(), meter: int = 0) -> Pulse:
    """A Pulse from beat and bar times known already (NaN entries are padding)."""
    beats, downbeats = (np.asarray(b, dtype=np.float64) for b in (beats, downbeats))
    beats, downbeats = beats[np.isfinite(beats)], downbeats[np.isfinite(downbeats)]
    if len(beats) < 2:
        return no_pulse("fewer than 2 beats in the segment")
    return Pulse(tempo_of(beats), beats, downbeats, meter if len(downbeats) else 0, 1.0)


# ---------------------------------------------------------------- sections

def extend_grid(beats: np.ndarray, seconds: float) -> np.ndarray:
    """Beat times continued at the median period before the first and after the last tracked beat, so the grid
    covers 0..seconds (librosa leaves out the weak beats at both ends)."""
    period = float(np.median(np.diff(beats)))
    before = beats[0] - period * np.arange(math.ceil(beats[0] / period), 0, -1)
    after = beats[-1] + period * np.arange(1, math.ceil((seconds - beats[-1]) / period) + 1)
    return np.concatenate([before, beats, after])


def section_starts(beats: np.ndarray, seconds: float, beats_per_section: int,
                   downbeat: float = math.nan) -> np.ndarray:
    """The times (s) at which sections of `beats_per_section` beats start within 0..seconds, counted from a bar
    line `downbeat` (s, anywhere on the grid, even outside the clip) or else from the first tracked beat; 0
    always starts one, and a start within half a beat of 0 or of the end is dropped (no section shorter than half
    a beat). Empty beats: only 0."""
    if len(beats) < 2:
        return np.zeros(1)
    grid = extend_grid(np.asarray(beats, dtype=np.float64), seconds)
    period = float(np.median(np.diff(beats)))
    anchor = beats[0] if not math.isfinite(downbeat) else downbeat
    first = int(round((anchor - grid[0]) / period)) if not grid[0] <= anchor <= grid[-1] else \
        int(np.abs(grid - anchor).argmin())
    starts = grid[first % beats_per_section :: beats_per_section]
    starts = starts[(starts >= 0.5 * period) & (starts <= seconds - 0.5 * period)]
    return np.concatenate([[0.0], starts])


@dataclass
class SectionUnit:
    """What a section is: `bars` bars of the input (where its bars are known), else `beats` beats, else fixed
    blocks of `block_frames` latent frames (no pulse, or both 0)."""

    beats: int = 2
    bars: int = 0
    block_frames: int = 32

    @classmethod
    def of(cls, beats: int, bars: int, block_frames: int) -> SectionUnit:
        """A model's unit: `block_frames` 0 (a model or rule that sets no blocks) takes the default."""
        return cls(beats, bars, block_frames or cls.block_frames)


def section_ids(beats: np.ndarray | None, frames: int, frame_rate: float, unit: SectionUnit,
                bar: tuple[int, float] = (0, math.nan)) -> torch.Tensor:
    """Which section each of `frames` latent frames belongs to [frames] (int64, 0, 1, ... in time order): sections
    of `unit` over `beats` (seconds, NaN or none for no pulse) whose bars have `bar` = (meter, one bar line's
    time), or fixed blocks of frames where there is no usable grid."""
    beats = np.asarray([] if beats is None else beats, dtype=np.float64)
    beats = beats[np.isfinite(beats)]
    on_bars = unit.bars > 0 and bar[0] > 0 and math.isfinite(bar[1])
    count = unit.bars * bar[0] if on_bars else unit.beats
    if count <= 0 or len(beats) < 2:
        return torch.arange(frames) // max(1, unit.block_frames)
    downbeat = bar[1] if on_bars else math.nan
    starts = np.round(section_starts(beats, frames / frame_rate, count, downbeat) * frame_rate)
    return torch.from_numpy(np.searchsorted(starts, np.arange(frames), side="right") - 1).long()


def batch_section_ids(beats: torch.Tensor, bars: torch.Tensor | None, frames: int, frame_rate: float,
                      unit: SectionUnit) -> torch.Tensor:
    """section_ids of every example of a batch of beat times [B, K] (NaN-padded) and bars [B, 2] (meter, a bar
    line's time; None: unknown) -> [B, frames]."""
    bars = bars.detach().cpu().double().numpy() if bars is not None else np.tile([0.0, math.nan], (len(beats), 1))
    return torch.stack([section_ids(b.numpy(), frames, frame_rate, unit, (int(bar[0]), float(bar[1])))
                        for b, bar in zip(beats.detach().cpu().double(), bars, strict=True)])


def bar_of(bars: torch.Tensor) -> tuple[int, float]:
    """A batch entry of bar_anchor back as (meter, a bar line's time)."""
    return int(bars[0]), float(bars[1])


def bar_anchor(downbeats: np.ndarray, meter: int) -> torch.Tensor:
    """A segment's bars for batching [2]: (meter, its first bar line's time), (0, NaN) where it has none."""
    downbeats = np.asarray(downbeats, dtype=np.float64)
    downbeats = downbeats[np.isfinite(downbeats)]
    return torch.tensor([float(meter), float(downbeats[0])] if len(downbeats) and meter else [0.0, math.nan])


def switch_fade_frames(frame_rate: float) -> int:
    """The number of latent frames closest to SWITCH_FADE_SECONDS at `frame_rate` frames per second."""
    return max(1, int(round(SWITCH_FADE_SECONDS * frame_rate)))


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
    """What was done to the target: tempo ratio (target's speed-up), semitones, gains, the offset that puts its bar
    lines (or beats) on the input's, the time map where a drifting tempo is followed bar by bar, and notes."""

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
    offset: int  # samples of the stretched target skipped, so its bar lines fall on the input's
    gain: float = 1.0  # the loudness match, as a factor
    on: str = "beats"  # what was lined up: "bars" (downbeat phase), "beats" (beat phase) or "nothing"
    time_map: np.ndarray | None = None  # [K, 2] (target s, output s) anchors, stretched between them
    key_out: str = ""  # the target's key after the shift (a key that fits the input's, not always the same)

    def line(self) -> str:
        tempo = (f"tempo {self.tempo_tgt:.1f}\u2192{self.tempo_in:.1f} BPM (\u00d7{self.ratio:.3f}"
                 f"{', bar by bar' if self.time_map is not None else ''}) on the {self.on}"
                 if self.tempo_in and self.tempo_tgt else "tempo unchanged (no beat grid)")
        key = f"key {self.key_tgt}\u2192{self.key_out or self.key_tgt} ({self.semitones:+d} semitones) on {self.key_in}"
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


def fifths_apart(key_a: int, key_b: int) -> int:
    """Steps round the circle of fifths between two major keys' tonics (0..6)."""
    steps = (key_a - key_b) * 7 % 12
    return min(steps, 12 - steps)


def major_of(key: int, minor: bool) -> int:
    """The tonic of a key, or of its relative major (A minor -> C)."""
    return (key + 3) % 12 if minor else key


def key_shift(input_grid: Grid, target_grid: Grid) -> int:
    """Semitones (-6..+5) that move the target only as far as the music needs: none where the keys already fit (the
    same, the relative, a neighbour on the circle of fifths), else the smallest shift that makes them fit, the
    same key before a neighbour at an equal shift (every semitone of Rubber Band's shift changes the sound)."""
    def cost(shift: int) -> tuple[int, int, int]:
        apart = fifths_apart(major_of(input_grid.key, input_grid.minor),
                             (major_of(target_grid.key, target_grid.minor) + shift) % 12)
        return (0 if apart <= 1 else 1, abs(shift) if apart <= 1 else 0, apart)

    return min(range(-6, 6), key=lambda shift: (cost(shift), shift != 0))


def beat_phase(beats: np.ndarray, period: float) -> float:
    """Where in the period (s) the beats (or bar lines) fall: the circular mean of their times modulo the period."""
    angle = np.angle(np.exp(2j * np.pi * np.asarray(beats) / period).mean())
    return float(angle % (2 * np.pi)) / (2 * np.pi) * period


def stretch(audio: np.ndarray, sample_rate: int, ratio, semitones: int) -> np.ndarray:
    """Rubber Band (pedalboard) time-stretch by `ratio` (> 1: faster; a float, or one factor per sample of `audio`
    for a time map) and pitch-shift by `semitones` in one pass."""
    if np.ndim(ratio) == 0 and abs(ratio - 1) < 1e-4 and semitones == 0:
        return audio
    import pedalboard

    factor = np.asarray(ratio, dtype=np.float64) if np.ndim(ratio) else float(ratio)
    out = pedalboard.time_stretch(audio[None].astype(np.float32), sample_rate, stretch_factor=factor,
                                  pitch_shift_in_semitones=float(semitones))
    return out[0]


def level_db(audio: np.ndarray) -> float:
    """RMS level (dBFS, full scale = 1.0) of some samples; -100 for none or silence."""
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


def loop_to(audio: np.ndarray | torch.Tensor, length: int) -> np.ndarray | torch.Tensor:
    """`audio` (an array or a tensor of samples) repeated as often as needed and cut to `length` samples."""
    times = -(-length // max(1, len(audio)))
    return (audio.repeat(times) if isinstance(audio, torch.Tensor) else np.tile(audio, times))[:length]


def bar_offset(input_grid: Grid, target_grid: Grid, ratio: float, notes: list) -> tuple[float, float, str]:
    """(offset s of the stretched target, the period it was lined up in, "bars" or "beats"): the target's bar lines
    on the input's where both have bars of the same meter, else its beats on the input's beats, with a note."""
    beat = 60.0 / input_grid.tempo
    if input_grid.has_bars and target_grid.has_bars and input_grid.meter == target_grid.meter:
        bar = beat * input_grid.meter
        phase = beat_phase(target_grid.downbeats / ratio, bar) - beat_phase(input_grid.downbeats, bar)
        return phase % bar, bar, "bars"
    if input_grid.has_bars and target_grid.has_bars:
        notes.append(f"meters differ ({target_grid.meter} and {input_grid.meter} beats a bar): beats lined up, "
                     "not bars")
    return (beat_phase(target_grid.beats / ratio, beat) - beat_phase(input_grid.beats, beat)) % beat, beat, "beats"


def time_map(input_grid: Grid, target_grid: Grid, ratio: float, offset: float) -> np.ndarray | None:
    """Anchors [K, 2] (target s, output s) that lay the target bar by bar: each of its bar lines (beats where the
    meters differ) from the first that falls on the input's onto its partner in time (every other one where the
    tempos were folded by an octave), the tempo ratio held before and after. One global ratio is not enough even
    for steady songs: 0.5 % of tempo error is a beat after a minute (docs/results.md). None with fewer than
    MAP_MARKS marks."""
    fold = ratio * target_grid.tempo / input_grid.tempo  # 1, or 2 / 0.5: the target in double / half time
    bars = input_grid.meter == target_grid.meter and input_grid.has_bars and target_grid.has_bars
    mine, theirs = (input_grid.downbeats, target_grid.downbeats) if bars else (input_grid.beats, target_grid.beats)
    period = float(np.median(np.diff(mine))) if len(mine) > 1 else 60.0 / input_grid.tempo
    landed = theirs / ratio - offset  # where the target's marks fall under the global ratio
    first = np.abs(landed[:, None] - mine[None]).min(axis=1) < period / 2
    if first.sum() < 2:
        return None
    k = int(first.argmax())
    j = int(np.abs(mine - landed[k]).argmin())
    theirs, mine = theirs[k :: 2 if fold > 1.5 else 1], mine[j :: 2 if fold < 0.75 else 1]
    n = min(len(theirs), len(mine))
    if n < MAP_MARKS:
        return None
    anchors = np.stack([theirs[:n], mine[:n]], axis=1)
    start = anchors[0, 0] - anchors[0, 1] * ratio  # the target's time at output 0, under the global ratio
    return np.concatenate([[[start, 0.0]], anchors])


def map_factors(anchors: np.ndarray, samples: int, sample_rate: int, ratio: float) -> np.ndarray:
    """The stretch factor of each of `samples` target samples from its start anchors[0, 0]: the ratio of target to
    output time between consecutive anchors, `ratio` after the last."""
    t = anchors[0, 0] + np.arange(samples) / sample_rate
    speed = np.diff(anchors[:, 0]) / np.maximum(np.diff(anchors[:, 1]), 1e-3)
    piece = np.searchsorted(anchors[:, 0], t, side="right") - 1
    return np.where(piece < len(speed), speed[np.minimum(piece, len(speed) - 1)], ratio)


def align(target: np.ndarray, input_song: np.ndarray, sample_rate: int, grids: tuple | None = None,
          match_key: bool = True, tolerant: bool = False) -> tuple[np.ndarray, Alignment]:
    """The target laid on the input's grid, as it enters the arrangement: stretched to the input's tempo with its
    bar lines on the input's (beats where the meters differ; bar by bar where a tempo drifts), shifted only as far
    as the keys need (`match_key`), brought to the input's loudness (BS.1770) and looped or cut to the input's
    length (levels at the switches: level_switches). Where either song has no beat grid the tempo is left alone,
    with a note. AlignmentError for tempos too far apart, unless `tolerant` (training pairs): then the tempo is
    left alone, with a note. `grids`: the (target's, input's) Grid where they are known (analysed here if not)."""
    target_grid, input_grid = grids or (None, None)
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
    offset, period, on, anchors = 0.0, 0.0, "nothing", None
    if pulse:
        offset, period, on = bar_offset(input_grid, target_grid, ratio, notes)
        anchors = time_map(input_grid, target_grid, ratio, offset)
    # stretch only what the arrangement takes (the input's length, and a bar for the offset), not a long tail
    used = math.ceil((len(input_song) / sample_rate + period + 0.1) * ratio * sample_rate)
    info = Alignment(input_grid.tempo, target_grid.tempo, ratio, input_grid.key_name, target_grid.key_name, semitones,
                     input_grid.loudness, target_grid.loudness, notes, used, int(round(offset * sample_rate)),
                     on=on, time_map=anchors, key_out=key_name(target_grid.key + semitones, target_grid.minor))
    out = lay_on_grid(target, info, len(input_song), sample_rate)
    lufs_tgt = loudness_lufs(out, sample_rate)
    if math.isfinite(lufs_tgt) and math.isfinite(info.lufs_in):
        info.gain = 10 ** ((info.lufs_in - lufs_tgt) / 20)
    return (out * np.float32(info.gain)).astype(np.float32), info


def lay_on_grid(audio: np.ndarray, alignment: Alignment, length: int, sample_rate: int) -> np.ndarray:
    """A recording of the target (the target itself, or one of its stems) laid on the input's grid as `align` laid
    the target: stretched and shifted alike (through the same time map), started at the same offset, looped or cut
    to `length` samples and levelled by the same gain. Stems laid this way still sum to the aligned target, up to
    Rubber Band's rounding."""
    a = alignment
    if a.time_map is not None:
        start = int(round(a.time_map[0, 0] * sample_rate))  # before the target's start: silence
        piece = np.asarray(audio[max(0, start) : start + a.used], dtype=np.float32)
        piece = np.concatenate([np.zeros(max(0, -start), np.float32), piece])
        out = stretch(piece, sample_rate, map_factors(a.time_map, len(piece), sample_rate, a.ratio), a.semitones)
    else:
        out = stretch(np.asarray(audio[: a.used], dtype=np.float32), sample_rate, a.ratio, a.semitones)[a.offset :]
    return loop_to(out, length) * np.float32(a.gain)
