"""Phrases and plans: the input cut into phrases of whole bars, and for each phrase the part of the target that
fits it best, decided once for the whole song (a `Plan`) and then rendered onto the input's bars.

- Phrases: the bar lines where the music changes most (the novelty of bar-synchronous chroma and timbre, Foote's
  idea on bars instead of frames), tiled into phrases of 4, 8 or 16 bars by dynamic programming. Where no bar line
  stands out (the mean novelty at the chosen starts below STRUCTURE_Z), fixed phrases of FIXED_BARS bars.
- The mashability rule (AutoMashUpper, Davies et al. 2014): for each phrase the target leads, the piece of the
  aligned target (from any of its phrase starts, not only the one at the same time) and the pitch shift with the
  highest fit: harmonic (beat-synchronous chroma), rhythmic (onset pattern), spectral balance and the seams into
  and out of it (Lee et al. 2015), less a penalty for a piece used before. Nothing learned: the strong baseline.
- Transitions as DJs make them (`lead_gains`): into a phrase of the other song, a bar-long equal-power cross-fade
  that ends on its downbeat, where the bass is swapped.

The target arrives here laid on the input's bars (beats.align), so both songs share the input's bar grid: a piece
of the target from bar m is moved onto bar a by whole bars, each bar stretched onto the input's (drift).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import torch

from beats import Grid, stretch

PHRASE_BARS = (4, 8, 16)  # the phrase lengths music has (DJs mix at multiples of 8 bars)
FIXED_BARS = 4  # the phrase length where the music shows none
NOVELTY_BARS = 4  # a bar line's novelty compares this many bars before it with as many after
STRUCTURE_Z = 1.0  # the mean novelty (z) at the chosen starts below which no phrase structure is heard
LENGTH_PRIOR = {4: 0.0, 8: 0.3, 16: 0.2}  # a little in favour of 8- and 16-bar phrases, at equal novelty
UNKNOWN_START = -0.5  # a phrase start near either end, where the novelty is not known
FIXED_BAR_SECONDS = 2.0  # a song without bars is cut into blocks of this length, counted as bars
HOP = 512  # analysis frames of librosa
SHIFTS = range(-2, 3)  # semitones a piece may move on top of the alignment's shift (every one costs sound)
WEIGHTS = dict(harmonic=1.0, rhythmic=0.2, balance=0.2, seam=0.3, shift=0.02, reuse=0.3)


# ---------------------------------------------------------------- bars and their features

@dataclass
class Bars:
    """The bar lines a plan counts in (s): `lines` [n + 1], bar k from lines[k] to lines[k + 1] (the last ends
    at the song's end or a bar after its last bar line); `meter` beats a bar; `note` where they are not the
    tracker's."""
    lines: np.ndarray
    meter: int
    note: str = ""

    @property
    def count(self) -> int:
        return len(self.lines) - 1


def bars_of(grid: Grid, seconds: float) -> Bars:
    """The input's bars from its grid, or blocks of FIXED_BAR_SECONDS where it has none (with a note)."""
    if not grid.has_bars or len(grid.downbeats) < 2:
        lines = np.arange(0.0, max(seconds - 0.5 * FIXED_BAR_SECONDS, 1e-3), FIXED_BAR_SECONDS)  # at least one
        return Bars(np.append(lines, seconds), 4, f"no bars heard: phrases of blocks of {FIXED_BAR_SECONDS:g} s")
    lines = np.asarray(grid.downbeats, dtype=np.float64)
    lines = lines[(lines >= 0) & (lines < seconds)]
    bar = float(np.median(np.diff(lines)))
    return Bars(np.append(lines, min(seconds, lines[-1] + bar)), grid.meter)


@dataclass
class BarFeatures:
    """What a song sounds like bar by bar, on a plan's bars: chroma per beat [bars, meter, 12], timbre (MFCC)
    [bars, 13], log band energies [bars, 8] and the onset pattern in 16ths [bars, meter * 4]."""
    chroma: np.ndarray
    timbre: np.ndarray
    bands: np.ndarray
    rhythm: np.ndarray

    @cached_property
    def summary(self) -> np.ndarray:
        """[bars, 25]: mean chroma and timbre of each bar, each dimension standardised over the bars (computed once:
        every candidate piece of a plan reads it)."""
        x = np.concatenate([self.chroma.mean(axis=1), self.timbre], axis=1)
        return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)


def slot_means(feature: np.ndarray, lines: np.ndarray, slots: int, sample_rate: int) -> np.ndarray:
    """The mean of frame features [dims, frames] over `slots` equal parts of each bar -> [bars, slots, dims]."""
    parts = [np.linspace(a, b, slots, endpoint=False) for a, b in zip(lines[:-1], lines[1:], strict=True)]
    edges = np.append(np.concatenate(parts), lines[-1])
    idx = np.clip(np.round(edges * sample_rate / HOP).astype(int), 0, feature.shape[1] - 1)
    idx = np.maximum.accumulate(idx)
    sums = np.add.reduceat(feature, idx[:-1], axis=1) if feature.shape[1] else feature
    counts = np.maximum(np.diff(idx), 1)
    means = np.where(np.diff(idx) > 0, sums / counts, feature[:, idx[:-1]])
    return means.T.reshape(len(lines) - 1, slots, -1)


def bar_features(audio: np.ndarray, sample_rate: int, bars: Bars) -> BarFeatures:
    """librosa's chroma, MFCC, mel band energies and onset strength of a song, averaged on `bars`."""
    import librosa

    y = np.asarray(audio, dtype=np.float32)
    chroma = librosa.feature.chroma_stft(y=y, sr=sample_rate, hop_length=HOP, n_fft=4096)
    mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, hop_length=HOP, n_fft=2048, n_mels=64)
    log_mel = librosa.power_to_db(mel)
    timbre = librosa.feature.mfcc(S=log_mel, n_mfcc=13)
    bands = librosa.power_to_db(mel.reshape(8, 8, -1).sum(axis=1))
    onsets = librosa.onset.onset_strength(S=log_mel, sr=sample_rate, hop_length=HOP)[None]
    meter = bars.meter
    return BarFeatures(slot_means(chroma, bars.lines, meter, sample_rate),
                       slot_means(timbre, bars.lines, 1, sample_rate)[:, 0],
                       slot_means(bands, bars.lines, 1, sample_rate)[:, 0],
                       slot_means(onsets, bars.lines, 4 * meter, sample_rate)[..., 0])


# ---------------------------------------------------------------- phrases

@dataclass
class Phrases:
    """A song's phrases: `starts`, the first bar of each (0 first), of `bars` bars in all; `found` whether they
    come from the music (else fixed FIXED_BARS); `novelty` [bars] at each bar line (z, NaN near the ends)."""
    starts: np.ndarray
    bars: int
    found: bool
    novelty: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.append(self.starts, self.bars))


def novelty(summary: np.ndarray, span: int = NOVELTY_BARS) -> np.ndarray:
    """[bars]: how much the music changes at each bar line, Foote's checkerboard on bars: the mean distance between
    the `span` bars before and the `span` after it, less the mean distance within each side (so that a chord
    progression's own changes, which both sides hold, cancel), standardised over the bar lines with `span` bars on
    both sides (NaN at the others)."""
    n = len(summary)
    d = np.linalg.norm(summary[:, None] - summary[None], axis=-1)
    within = span * span - span  # the distances between two different bars of one side
    z = np.full(n, np.nan)
    raw = np.asarray([d[b - span : b, b : b + span].mean()
                      - (d[b - span : b, b - span : b].sum() + d[b : b + span, b : b + span].sum()) / (2 * within)
                      for b in range(span, n - span + 1)])
    if len(raw) >= 2 and raw.std() > 1e-8:
        z[span : n - span + 1] = (raw - raw.mean()) / raw.std()
    return z


def tile(z: np.ndarray) -> list[int]:
    """The phrase starts (bars) that tile len(z) bars with the most novelty at the starts: phrases of PHRASE_BARS
    bars, a first one (an intro or a pickup) of any length up to the longest and a last one of whatever is left.
    A start where the novelty is not known (NaN, near the ends) costs UNKNOWN_START."""
    n, longest = len(z), max(PHRASE_BARS)
    best, back = np.full(n + 1, -np.inf), np.zeros(n + 1, dtype=int)
    best[0] = 0.0
    for end in range(1, n + 1):
        for length in range(1, min(longest, end) + 1):
            start = end - length
            regular = length in PHRASE_BARS
            if not (regular or start == 0 or end == n) or best[start] == -np.inf:
                continue
            known = z[start] if math.isfinite(z[start]) else UNKNOWN_START
            gain = (known if start > 0 else 0.0) + LENGTH_PRIOR.get(length, -0.5 if end < n else 0.0)
            if best[start] + gain > best[end]:
                best[end], back[end] = best[start] + gain, start
    starts, end = [], n
    while end > 0:
        end = back[end]
        starts.append(end)
    return starts[::-1]


def find_phrases(features: BarFeatures) -> Phrases:
    """The phrases of a song from its bar features (tile of novelty), or fixed FIXED_BARS where the starts it finds
    stand out no more than STRUCTURE_Z above the average bar line."""
    z = novelty(features.summary)
    n = len(z)
    starts = tile(z) if n else [0]
    known = [z[s] for s in starts if s > 0 and math.isfinite(z[s])]
    found = bool(known) and float(np.mean(known)) >= STRUCTURE_Z
    if not found:
        starts = list(range(0, max(n, 1), FIXED_BARS))
        if len(starts) > 1 and n - starts[-1] < FIXED_BARS // 2:  # a last scrap joins the phrase before it
            starts.pop()
    return Phrases(np.asarray(starts), n, found, z)


# ---------------------------------------------------------------- the mashability of a piece

def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of the rows of two arrays of one shape [..., dims]."""
    num = (a * b).sum(axis=-1)
    return float(np.mean(num / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-8)))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8))


@dataclass
class Fit:
    """How well a piece of the target fits an input phrase: the parts of the mashability and their sum."""
    harmonic: float
    rhythmic: float
    balance: float
    seam: float
    total: float


def spectral_balance(bands_a: np.ndarray, bands_b: np.ndarray) -> float:
    """1 where two songs' band energies [bars, 8] (dB) together fill the spectrum evenly, less as they pile up in
    the same bands (AutoMashUpper's spectral balance)."""
    power = lambda db: 10 ** (db / 10)  # noqa: E731
    share = lambda p: p / (p.sum(axis=-1, keepdims=True) + 1e-12)  # noqa: E731
    both = share(power(bands_a)) + share(power(bands_b))
    return float(np.clip(1 - both.std(axis=-1) / (both.mean(axis=-1) + 1e-12) / math.sqrt(7), 0, 1).mean())


def mashability(mine: BarFeatures, theirs: BarFeatures, span: tuple[int, int, int], shift: int) -> Fit:
    """The fit of the target's bars from `span`[1] over the input's phrase of bars `span`[0] .. `span`[2] (end
    excluded), shifted by `shift` semitones: chroma beat by beat, the onset pattern, the spectral balance and the
    seams (the bar that fades in against the input's bar before the phrase, the piece's last bar against the
    input's)."""
    a, m, end = span
    n = end - a
    chroma = np.roll(theirs.chroma[m : m + n], shift, axis=-1)
    harmonic = cosine(mine.chroma[a:end], chroma)
    rhythmic = correlation(mine.rhythm[a:end], theirs.rhythm[m : m + n])
    balance = spectral_balance(mine.bands[a:end], theirs.bands[m : m + n])
    s_in, s_tgt = mine.summary, theirs.summary
    seams = [cosine(s_in[end - 1], s_tgt[m + n - 1])]
    if a > 0 and m > 0:
        seams.append(cosine(s_in[a - 1], s_tgt[m - 1]))
    seam = float(np.mean(seams))
    w = WEIGHTS
    total = (w["harmonic"] * harmonic + w["rhythmic"] * rhythmic + w["balance"] * balance + w["seam"] * seam
             - w["shift"] * abs(shift))
    return Fit(harmonic, rhythmic, balance, seam, total)


# ---------------------------------------------------------------- the plan

@dataclass
class Step:
    """One input phrase of a plan: its time (s) and bars, which song leads, and where the target leads the piece
    of the aligned target that plays (from bar `source`), its extra pitch shift, its fit and why it was chosen."""
    start: float
    end: float
    bar: int
    bars: int
    lead: str
    source: int = -1
    shift: int = 0
    fit: Fit | None = None
    why: str = ""


@dataclass
class Plan:
    """An arrangement decided for the whole song: a Step per input phrase, on `bars`, the input's phrases and
    the target's it chose from, how it was decided (`rule`) and notes."""
    steps: list[Step]
    bars: Bars
    phrases: Phrases
    target_phrases: Phrases
    rule: str = "mashability"
    notes: list[str] = field(default_factory=list)

    def starts(self) -> np.ndarray:
        """The phrase starts (s), the first at 0."""
        return np.asarray([s.start for s in self.steps])


    def table(self) -> str:
        """The plan as a console table, one line per phrase."""
        rows = [f"plan ({self.rule}): {len(self.steps)} phrases of {median_bars(self):g} bars (median)"
                + ("" if self.phrases.found else f", fixed {FIXED_BARS} bars: no phrase structure heard")]
        rows.append("  #  start    end    bars  lead    piece      shift  fit   (harm  rhythm  balance  seam)")
        for i, s in enumerate(self.steps):
            piece = f"bar {s.source:<4d}" if s.lead == "target" else "-" * 8
            parts = (f"{s.fit.total:5.2f} ({s.fit.harmonic:.2f}  {s.fit.rhythmic:5.2f}  {s.fit.balance:5.2f}    "
                     f"{s.fit.seam:5.2f})" if s.fit else "")
            rows.append(f"{i:3d}  {s.start:6.1f} {s.end:6.1f}  {s.bars:4d}  {s.lead:6s}  {piece:9s}  "
                        f"{s.shift:+4d}  {parts}")
        return "\n".join(rows + [f"  note: {n}" for n in self.notes])

    def to_json(self) -> str:
        return json.dumps(dict(rule=self.rule, found=self.phrases.found, notes=self.notes, meter=self.bars.meter,
                               bar_lines=[round(float(t), 4) for t in self.bars.lines],
                               steps=[asdict(s) for s in self.steps]), indent=1)

    def section_ids(self, frames: int, frame_rate: float) -> torch.Tensor:
        """Each of `frames` latent frames' phrase [frames] (int64)."""
        starts = np.round(self.starts() * frame_rate)
        return torch.from_numpy(np.searchsorted(starts, np.arange(frames), side="right") - 1).long()


def median_bars(plan: Plan) -> float:
    return float(np.median([s.bars for s in plan.steps])) if plan.steps else 0.0


def candidates(target: Phrases, bars: int, length: int) -> list[int]:
    """The target bars a piece of `length` bars may start at: its phrase starts (and every FIXED_BARS where it
    has no phrases) with the whole piece inside the song; the first bar where none fits."""
    starts = [int(s) for s in target.starts if s + length <= bars]
    return starts or [0]


def phrase_starts(bars: Bars, phrases: Phrases) -> np.ndarray:
    """The times (s) the phrases start at, the first at 0 (a pickup before the first bar line joins it)."""
    return np.concatenate([[0.0], bars.lines[phrases.starts[1:]]])


def song_phrases(song: np.ndarray, grid: Grid, sample_rate: int) -> tuple[Bars, Phrases]:
    """The bars and phrases of a song (its grid's bars, or blocks where it has none)."""
    bars = bars_of(grid, len(song) / sample_rate)
    return bars, find_phrases(bar_features(song, sample_rate, bars))


def make_plan(song: np.ndarray, target: np.ndarray, grid: Grid, sample_rate: int) -> Plan:
    """The mashability rule's plan for an input `song` and the `target` laid on its bars (beats.align): the
    input's phrases, the target leading every other one (the input first), each with the piece and the shift of the
    highest fit, less WEIGHTS["reuse"] for each time that piece was used before."""
    seconds = len(song) / sample_rate
    bars = bars_of(grid, seconds)
    mine, theirs = bar_features(song, sample_rate, bars), bar_features(target, sample_rate, bars)
    phrases, target_phrases = find_phrases(mine), find_phrases(theirs)
    used: dict[int, int] = {}
    steps = []
    for i, (a, n) in enumerate(zip(phrases.starts.tolist(), phrases.lengths.tolist(), strict=True)):
        start = 0.0 if i == 0 else float(bars.lines[a])
        end = float(bars.lines[a + n]) if a + n < bars.count else seconds
        if i % 2 == 0:
            steps.append(Step(start, end, a, n, "input", why="the input leads every other phrase"))
            continue
        scored = [(mashability(mine, theirs, (a, m, a + n), s), m, s)
                  for m in candidates(target_phrases, bars.count, n) for s in SHIFTS]
        fit, m, shift = max(scored, key=lambda f: f[0].total - WEIGHTS["reuse"] * used.get(f[1], 0))
        used[m] = used.get(m, 0) + 1
        same = next((f for f, mm, ss in scored if mm == a and ss == 0), None)
        why = (f"best of {len(scored)} (pieces x shifts)" + (f"; the piece at the same time fits {same.total:.2f}"
                                                               if same and m != a else ""))
        steps.append(Step(start, end, a, n, "target", m, shift, fit, why))
    notes = [bars.note] if bars.note else []
    return Plan(steps, bars, phrases, target_phrases, notes=notes)


# ---------------------------------------------------------------- rendering

def place(out: np.ndarray, piece: np.ndarray, at: int, fade: int) -> None:
    """Write `piece` into `out` from sample `at`, its first `fade` samples an equal-power cross-fade from what
    was there (0: written over)."""
    piece = piece[: max(0, len(out) - at)]
    if fade > 0:
        u = np.clip(np.arange(len(piece)) / fade, 0, 1)
        old = out[at : at + len(piece)]
        piece = np.cos(0.5 * np.pi * u) * old + np.sin(0.5 * np.pi * u) * piece
    out[at : at + len(piece)] = piece


def piece_of(target: np.ndarray, bars: Bars, step: Step, sample_rate: int, seconds: float) -> tuple[np.ndarray, int]:
    """(the audio, its first sample in the output) of a step's piece of the aligned target: from the bar before
    its phrase (it fades in there) to the phrase's end, each of its bars stretched onto the input's, shifted by
    the step's semitones."""
    a, m, n = step.bar, step.source, step.bars
    pre = 1 if a > 0 and m > 0 else 0
    out_t = np.append(bars.lines[a - pre : a + n], step.end)
    src_t = np.append(bars.lines[m - pre : m + n], bars.lines[m + n - 1] + step.end - bars.lines[a + n - 1])
    s0, o0 = int(round(src_t[0] * sample_rate)), int(round(out_t[0] * sample_rate))
    source = target[s0 : int(round(src_t[-1] * sample_rate))]
    length = int(round(out_t[-1] * sample_rate)) - o0
    factors = np.diff(src_t) / np.maximum(np.diff(out_t), 1e-3)
    if np.all(np.abs(factors - 1) < 2e-3) and step.shift == 0:
        piece = source
    else:
        per_sample = np.repeat(factors, np.diff(np.round((src_t - src_t[0]) * sample_rate).astype(int)))
        piece = stretch(source, sample_rate, per_sample[: len(source)], step.shift)
    return np.pad(piece[:length], (0, max(0, length - len(piece)))).astype(np.float32), o0


def render_target(target: np.ndarray, plan: Plan, sample_rate: int) -> np.ndarray:
    """The target as a plan plays it: the aligned target, with each target-led phrase (and the bar before it,
    where it fades in) replaced by its chosen piece; two target-led phrases in a row cross-fade over that bar."""
    out = np.array(target, dtype=np.float32)
    seconds = len(target) / sample_rate
    for i, step in enumerate(plan.steps):
        if step.lead != "target":
            continue
        piece, at = piece_of(target, plan.bars, step, sample_rate, seconds)
        follows = i > 0 and plan.steps[i - 1].lead == "target"
        place(out, piece, at, int(round(step.start * sample_rate)) - at if follows else 0)
    return out


def lead_gains(plan: Plan, frames: int, frame_rate: float, fade_frames: int) -> torch.Tensor:
    """[2, frames]: the input's gain above the bass and in the bass, frame by frame, as the plan leads: into a
    phrase of the other song, a bar-long equal-power fade (the input's gain a cosine or sine quarter-wave) that ends
    on the phrase's downbeat, where the bass is swapped (in `fade_frames`). The target's gain is sqrt(1 - g^2)."""
    gains = torch.ones(2, frames)
    t = torch.arange(frames) / frame_rate
    for i, step in enumerate(plan.steps):
        inside = (t >= step.start) & (t < step.end)
        gains[:, inside] = 1.0 if step.lead == "input" else 0.0
        if i == 0 or plan.steps[i - 1].lead == step.lead:
            continue
        bar = step.start - float(plan.bars.lines[max(0, step.bar - 1)])
        u = ((t - (step.start - bar)) / max(bar, 1e-3)).clamp(0, 1)
        into = (t >= step.start - bar) & (t < step.start)
        wave = torch.sin(0.5 * math.pi * u) if step.lead == "input" else torch.cos(0.5 * math.pi * u)
        gains[0, into] = wave[into]
        k = int(round(step.start * frame_rate))
        ramp = torch.linspace(0, 1, fade_frames + 2)[1:-1] if fade_frames > 0 else torch.zeros(0)
        ramp = ramp if step.lead == "input" else 1 - ramp
        gains[1, max(0, k - len(ramp)) : k] = ramp[len(ramp) - min(k, len(ramp)) :]
    return gains
