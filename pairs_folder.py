"""Writing a pairs folder: songs cut into consecutive segments, pair k = (segment k, segment k + 1) of one song,
train and val split by song, each pair's beat grid in SPLIT/beats.json and manifest.csv, and with a separator's
stems each segment's rhythm layer (drums and bass) beside it; and the synthetic demo songs. make_pairs.py is its
command line; the trainer generates the demo set through `make_demo`."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
from tqdm import tqdm

from beats import estimate_key, track_beats
from config import SILENCE_DB
from layers import rhythm_stem_files
from pairs_dataset import BEATS_FILE, RHYTHM_SUFFIX, pair_grid, path_problem, silence_problem

DEMO = dict(songs=8, seconds=16.0, segment_seconds=2.0, val_fraction=0.25)


# ---------------------------------------------------------------- demo songs

def _envelope(n: int, sr: int, attack: float, decay: float) -> np.ndarray:
    t = np.arange(n) / sr
    return np.minimum(t / attack, 1.0) * np.exp(-t / decay)


def _place(track: np.ndarray, sound: np.ndarray, start: int) -> None:
    end = min(len(track), start + len(sound))
    if start < end:
        track[start:end] += sound[: end - start]


@dataclass
class SynthSong:
    """A synthetic song and its truth: audio, beat and bar-line times (s), meter and key (tonic, major)."""

    audio: np.ndarray
    beats: np.ndarray
    downbeats: np.ndarray
    meter: int
    key: int


def beat_starts(n: int, beat: int, drift: float) -> list[int]:
    """Beat starts (samples) of a song of `n` samples at `beat` samples a beat, its tempo swaying by +-`drift`
    over the song (one slow sine: slower, then faster); exactly every `beat` samples for no drift."""
    starts, at = [], 0.0
    while at < n:
        starts.append(int(round(at)))
        at += beat / (1 + drift * math.sin(2 * math.pi * at / n))
    return starts


def make_song(seed: int, seconds: float = 16.0, sr: int = 24000, meter: int = 4, drift: float = 0.0,
              phrase_bars: int = 0) -> SynthSong:
    """A deterministic little song with its truth: drums (kick on the bar line), bass, a chord a bar and a melody;
    tempo, key and timbre depend on `seed`, the bars have `meter` beats, the tempo sways by +-`drift`. With
    `phrase_bars`, phrases of that many bars from the first bar line: every other one without the melody, its
    chords an octave up (the phrases' truth is downbeats[::phrase_bars])."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    bpm, root = rng.uniform(84, 140), 40 + int(rng.integers(0, 12))  # root: MIDI note of the bass
    hz = lambda midi: 440.0 * 2 ** ((midi - 69) / 12)  # noqa: E731
    progression = [[0, 4, 7], [7, 11, 14], [9, 12, 16], [5, 9, 12]][:: 1 if seed % 2 else -1]
    scale = [0, 2, 4, 7, 9, 12, 14, 16]
    drums, bass, chords, melody = (np.zeros(n) for _ in range(4))
    starts = beat_starts(n, int(sr * 60 / bpm), drift)
    for b, start in enumerate(starts):
        beat = (starts[b + 1] if b + 1 < len(starts) else n) - start if drift else int(sr * 60 / bpm)
        t = np.arange(beat) / sr
        kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-t * 30)) * t) * _envelope(beat, sr, 0.002, 0.12)
        noise = rng.standard_normal(beat)
        if b % meter % 2 == 0:
            _place(drums, kick, start)
        else:
            _place(drums, 0.5 * noise * _envelope(beat, sr, 0.001, 0.06), start)
        hat = np.diff(noise, prepend=0) * _envelope(beat, sr, 0.001, 0.015)
        _place(drums, 0.15 * hat, start + beat // 2)
        verse = phrase_bars > 0 and b // meter // phrase_bars % 2 == 1  # a phrase of the other kind
        chord = progression[(b // meter) % 4]
        bass_hz = hz(root + chord[0])
        saw = 2 * ((t * bass_hz) % 1.0) - 1
        _place(bass, 0.4 * saw * _envelope(beat, sr, 0.005, 0.3), start)
        if b % meter == 0:
            bar = np.arange(meter * beat) / sr
            tone = sum(np.sin(2 * np.pi * hz(root + 24 + 12 * verse + c) * bar) for c in chord) / 3
            _place(chords, 0.3 * tone * _envelope(meter * beat, sr, 0.05, 1.5), start)
        for half in range(2):
            if rng.random() < 0.7:
                note = hz(root + 36 + scale[int(rng.integers(0, len(scale)))])
                m = np.arange(beat // 2) / sr
                tone = np.sin(2 * np.pi * note * m + 0.3 * np.sin(2 * np.pi * 5 * m))
                _place(melody, 0.25 * (not verse) * tone * _envelope(beat // 2, sr, 0.01, 0.2),
                       start + half * beat // 2)
    gains = rng.uniform(0.6, 1.0, size=4)
    song = gains[0] * drums + gains[1] * bass + gains[2] * chords + gains[3] * melody
    beats = np.asarray(starts, dtype=np.float64) / sr
    return SynthSong((0.8 * song / np.abs(song).max()).astype(np.float32), beats, beats[::meter], meter, root % 12)


def synth_song(seed: int, seconds: float = 16.0, sr: int = 24000) -> np.ndarray:
    """The audio of make_song: a demo song in 4/4 at a steady tempo."""
    return make_song(seed, seconds, sr).audio


# ---------------------------------------------------------------- reading songs

AUDIO_EXTENSIONS = {f".{fmt.lower()}" for fmt in sf.available_formats()} | {".mp3", ".oga", ".opus", ".aif"}


def read_song(path: str, sample_rate: int) -> np.ndarray:
    """Any file soundfile reads -> mono float32 at `sample_rate` (resampled with soxr)."""
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if not np.isfinite(audio).all():
        raise ValueError("non-finite samples")
    if sr != sample_rate:
        import soxr

        audio = soxr.resample(audio, sr, sample_rate).astype(np.float32)
    return audio


def find_songs(folder: str) -> list[str]:
    """Audio files below `folder`, sorted, by extension."""
    paths = []
    for root, _, files in os.walk(folder):
        paths += [os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in AUDIO_EXTENSIONS]
    return sorted(paths)


# ---------------------------------------------------------------- writing pairs

@dataclass
class Summary:
    songs_read: int = 0
    pairs: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    bad_files: list = field(default_factory=list)
    no_pulse: list = field(default_factory=list)
    beats: dict = field(default_factory=lambda: {"train": {}, "val": {}})  # split -> pair -> its grid (beats.json)

    def report(self) -> str:
        lines = [f"songs read: {self.songs_read}",
                 f"pairs written: train {self.pairs['train']}, val {self.pairs['val']}"]
        lines += [f"skipped: {count} {reason}" for reason, count in sorted(self.skipped.items())]
        lines += [f"  bad file {path}: {reason}" for path, reason in self.bad_files]
        if self.no_pulse:
            lines.append(f"songs without a beat grid (their sections are fixed blocks of frames): {len(self.no_pulse)}")
            lines += [f"  {song}: {note}" for song, note in self.no_pulse]
        return "\n".join(lines)


def split_songs(names: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Song -> 'train' or 'val', by song so no song is in both; at least one val song when there are two or more."""
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names)))) if len(names) > 1 and val_fraction > 0 else 0
    return {names[i]: ("val" if rank < n_val else "train") for rank, i in enumerate(order)}


@dataclass(frozen=True)
class Cutting:
    """How make_pairs cuts songs into pairs: segments of `segment_seconds` at `sample_rate`, `val_fraction` of the
    songs (drawn by `seed`, a song in one split only) for validation, a pair with a segment below `silence_db`
    skipped; `stems`: a folder holding a separator's output folder for each song, named as the song's file without
    its extension (Demucs: separated/htdemucs/NAME/drums.wav ...), so that every pair carries its rhythm layer."""
    segment_seconds: float
    sample_rate: int
    val_fraction: float = 0.0
    seed: int = 0
    silence_db: float = SILENCE_DB
    stems: str | None = None


@dataclass
class PairsWriter:
    """Writes the pairs of one folder `out` cut as `cutting` says, song by song, and tallies them (`summary`,
    and one manifest row per pair)."""
    out: str
    cutting: Cutting
    summary: Summary = field(default_factory=Summary)
    rows: list = field(default_factory=list)

    def song(self, audio: np.ndarray, song: str, split: str, rhythm: np.ndarray | None = None) -> None:
        """Cut one song into consecutive segments and write each (k, k+1) pair that is not silent, with the beat
        times of both its segments, tracked on the whole song, and the song's tempo and key; `rhythm`: the song's
        rhythm layer from a separator's stems, cut the same way (pair_XXXX_input_rhythm.wav, ...output_rhythm.wav)."""
        out, summary, rows = self.out, self.summary, self.rows
        sample_rate, silence_db = self.cutting.sample_rate, self.cutting.silence_db
        segment = int(round(self.cutting.segment_seconds * sample_rate))
        n_segments = len(audio) // segment
        if n_segments < 2:
            summary.skipped["songs too short for one pair"] += 1
            return
        pulse = track_beats(audio, sample_rate)
        key = estimate_key(audio, sample_rate)[:2]
        if pulse.note:
            summary.no_pulse.append((song, pulse.note))
        pieces = [audio[k * segment : (k + 1) * segment] for k in range(n_segments)]
        loud = [silence_problem(p, silence_db) is None for p in pieces]
        for k in range(n_segments - 1):
            if not (loud[k] and loud[k + 1]):
                summary.skipped["silent pairs"] += 1
                continue
            index = summary.pairs[split]
            for role, piece in (("input", pieces[k]), ("output", pieces[k + 1])):
                sf.write(os.path.join(out, split, f"pair_{index:04d}_{role}.wav"), np.clip(piece, -1, 1), sample_rate,
                         subtype="PCM_16")
            for role, j in (("input", k), ("output", k + 1)) if rhythm is not None else ():
                sf.write(os.path.join(out, split, f"pair_{index:04d}_{role}{RHYTHM_SUFFIX}.wav"),
                         np.clip(rhythm[j * segment : (j + 1) * segment], -1, 1), sample_rate, subtype="PCM_16")
            start, end = k * segment / sample_rate, (k + 1) * segment / sample_rate
            summary.beats[split][f"pair_{index:04d}"] = pair_grid(pulse, start, end, 2 * end - start, key)
            rows.append(dict(split=split, pair=f"pair_{index:04d}", song=song, input_offset_s=start,
                             output_offset_s=end, tempo_bpm=round(pulse.tempo, 2)))
            summary.pairs[split] += 1


def read_rhythm(folder: str, length: int, sample_rate: int) -> np.ndarray:
    """A song's rhythm layer from its separator's output folder (layers.rhythm_stem_files), `length` samples long;
    ValueError for a missing folder, no drums or bass, or stems of another length (> 0.1 s off)."""
    if problem := path_problem(folder, "folder"):
        raise ValueError(f"stems {folder}: {problem}")
    try:
        rhythm = sum(read_song(path, sample_rate) for path in rhythm_stem_files(folder))
    except ValueError as err:
        raise ValueError(f"stems {folder}: {err}") from err
    if abs(len(rhythm) - length) > sample_rate // 10:
        raise ValueError(f"stems {folder}: {len(rhythm) / sample_rate:.2f} s for a song of "
                         f"{length / sample_rate:.2f} s: stems of another recording?")
    return np.pad(rhythm, (0, max(0, length - len(rhythm))))[:length]


def stem_folder(stems: str, song: str) -> str:
    """The separator's output folder of `song` (a path or a name) in `stems`: its file name without extension."""
    return os.path.join(stems, os.path.splitext(os.path.basename(song))[0])


def make_pairs(songs, out: str, cutting: Cutting, progress: bool = True) -> Summary:
    """The pairs folder `out` (train/, val/, manifest.csv) of `songs`, a list of (name, loader) where loader()
    returns mono audio at the cutting's sample rate or raises; a song that cannot be read, or that has no stems
    where the cutting asks for them, is listed and skipped."""
    for split in ("train", "val"):
        os.makedirs(os.path.join(out, split), exist_ok=True)
    sample_rate, stems = cutting.sample_rate, cutting.stems
    splits = split_songs([name for name, _ in songs], cutting.val_fraction, cutting.seed)
    writer = PairsWriter(out, cutting)
    summary, rows = writer.summary, writer.rows
    for name, load in tqdm(songs, desc="songs", unit="song", disable=not progress):
        try:
            audio = load()
            rhythm = None if stems is None else read_rhythm(stem_folder(stems, name), len(audio), sample_rate)
        except Exception as err:  # a bad song is listed and skipped, never a crash
            summary.skipped["unreadable songs"] += 1
            summary.bad_files.append((name, str(err).splitlines()[0] if str(err) else type(err).__name__))
            continue
        summary.songs_read += 1
        writer.song(audio, name, splits[name], rhythm)
    for split, grids in summary.beats.items():
        with open(os.path.join(out, split, BEATS_FILE), "w") as f:
            json.dump(grids, f)
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["split", "pair", "song", "input_offset_s", "output_offset_s",
                                               "tempo_bpm"])
        writer.writeheader()
        writer.writerows(rows)
    return summary


def make_demo(out: str, sample_rate: int = 24000, seed: int = 0, progress: bool = True) -> Summary:
    """The demo set: DEMO['songs'] synthetic songs, small enough to train on a laptop CPU in minutes."""
    songs = [(f"demo_song_{i:02d}", lambda i=i: synth_song(seed * 1000 + i, DEMO["seconds"], sample_rate))
             for i in range(DEMO["songs"])]
    return make_pairs(songs, out, Cutting(DEMO["segment_seconds"], sample_rate, DEMO["val_fraction"], seed), progress)
