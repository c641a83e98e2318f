"""The ears: madmom's trained trackers, run batched here, against madmom's own code; the analysis against the truth
of synthetic songs (beats, bars, meter, key, a drifting tempo); bar-by-bar alignment; sections on bar lines; and
arrange.py with a rule and no checkpoint."""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

import trackers
from beats import Grid, SectionUnit, align, analyse, key_shift, section_ids, track_beats
from check_analysis import drift_followed, truth_figures
from listening import bar_fmeasure, bars_heard, in_time
from pairs_folder import make_song

SR = 24000


@pytest.fixture(scope="module")
def song() -> np.ndarray:
    return make_song(3, 6.0, SR).audio


def test_batched_networks_give_madmoms_own_activations(song):
    trackers.madmom()
    from madmom.features.downbeats import RNNDownBeatProcessor
    from madmom.features.key import CNNKeyRecognitionProcessor

    audio = trackers.to_model_rate(song[: 3 * SR], SR)
    shorter = audio[: 2 * trackers.MODEL_RATE]  # stepped with the longer song, padded after its end
    ours = trackers.downbeat_activations([audio, shorter], trackers.MODEL_RATE)
    for mine, clip in zip(ours, (audio, shorter), strict=True):
        theirs = RNNDownBeatProcessor()(clip)
        assert mine.shape == theirs.shape and np.abs(mine - theirs).max() < 1e-4
    key = trackers.key_probabilities(audio, trackers.MODEL_RATE)
    assert np.abs(key - CNNKeyRecognitionProcessor()(audio)[0]).max() < 1e-4


@pytest.mark.parametrize("seed, meter", [(0, 4), (2, 3), (5, 4), (8, 3)])
def test_synthetic_truth_beats_bars_meter_key(seed, meter):
    figures = truth_figures(seed, meter, seconds=12.0)
    assert figures["beat_f"] >= 0.95 and figures["bar_f"] >= 0.9
    assert figures["tempo_error"] < 0.01 and figures["meter_right"] == 1.0 and figures["key_or_relative"] == 1.0


def test_a_drifting_tempo_is_followed_bar_by_bar():
    assert drift_followed(100, 0.06, seconds=12.0) >= 0.9


def test_no_pulse_in_noise_says_why():
    noise = np.random.default_rng(0).standard_normal(4 * SR).astype(np.float32) * 0.1
    pulse = track_beats(noise, SR)
    assert pulse.tempo == 0 and len(pulse.beats) == 0 and "no beat grid" in pulse.note


def test_bar_lines_land_on_the_inputs_and_sections_start_on_them():
    steady, other = make_song(0, 10.0, SR), make_song(7, 12.0, SR)
    aligned, info = align(other.audio, steady.audio, SR)
    assert info.on == "bars"
    lines = trackers.track_bars([aligned], SR)[0].downbeats
    assert bar_fmeasure(lines, steady.downbeats) >= 0.8
    ids = section_ids(steady.beats, 400, 40.0, SectionUnit(beats=2, bars=1), (4, float(steady.downbeats[1])))
    starts = np.flatnonzero(np.diff(ids.numpy())) + 1
    assert len(starts) >= 3
    assert np.abs(starts[:, None] / 40.0 - steady.downbeats[None]).min(axis=1).max() <= 0.026  # a frame


def test_keys_that_fit_are_not_shifted():
    def grid(key: int, minor: bool) -> Grid:
        return Grid(120.0, np.arange(8) * 0.5, key, minor, -20.0)

    c = grid(0, False)
    assert key_shift(c, grid(7, False)) == 0  # G: a neighbour on the circle of fifths
    assert key_shift(c, grid(9, True)) == 0  # A minor: the relative
    assert key_shift(c, grid(2, False)) == -2  # D: two fifths away, moved to C
    assert key_shift(c, grid(6, False)) in (-1, 1)  # F#: a tritone, a semitone to a neighbour of C


def test_in_time_counts_switches_on_bar_lines():
    s = make_song(0, 8.0, SR)
    other = make_song(5, 8.0, SR).audio
    bar = int(round(np.median(np.diff(s.downbeats)) * SR))
    out, first = s.audio.copy(), int(s.downbeats[1] * SR)
    for k in range(first, len(out) - bar, 2 * bar):  # the other song in every other bar
        out[k : k + bar] = other[k : k + bar]
    t = in_time((out, s.audio, other), s.beats, SR, (4, float(s.downbeats[0])))
    assert t["on_bar"] >= 0.9 and t["on_bar_chance"] < 0.2
    heard = bars_heard(out, s.audio, other, SR)
    assert heard["on_bar_afresh"] >= 0.9 and math.isfinite(heard["target_bars_f"])


def test_arrange_with_a_rule_and_no_checkpoint(tmp_path, capsys):
    import arrange

    for name, seed, seconds in (("a", 0, 10.0), ("b", 7, 12.0)):
        sf.write(tmp_path / f"{name}.wav", make_song(seed, seconds, SR).audio, SR)
    out = tmp_path / "mix.wav"
    assert arrange.main(["--rule", "temporal", "--input", str(tmp_path / "a.wav"), "--target",
                         str(tmp_path / "b.wav"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and (tmp_path / "mix.target_aligned.wav").is_file()
    assert "on the bars" in printed and "on the input's bar lines" in printed and "tracked afresh" in printed
    audio, rate = sf.read(out)
    assert rate == SR and len(audio) == 10 * SR and np.abs(audio).max() > 0.05
    grid = analyse(audio.astype(np.float32), SR)
    assert grid.has_bars


def test_a_checkpoint_asked_for_bars_decides_once_a_bar(checkpoints):
    """arrange.py --checkpoint C --section_bars 1: the agent trained in sections of 2 beats then decides per bar."""
    from beats import known_pulse
    from inference import Arranger, song_sections

    arranger = Arranger.load(checkpoints["agent"])
    rate, hop = arranger.sample_rate, arranger.codec.hop_length
    song = make_song(3, 8.0, rate)
    grid = analyse(song.audio, rate, known_pulse(song.beats, song.downbeats, 4))

    def starts() -> np.ndarray:  # the times (s) where a new section starts
        ids = song_sections(arranger.model, grid, len(song.audio), arranger.codec)
        return (np.flatnonzero(np.diff(ids.numpy())) + 1) * hop / rate

    def on_bar_lines(times: np.ndarray) -> bool:
        return bool(np.all(np.abs(times[:, None] - song.downbeats[None]).min(axis=1) <= 1.5 * hop / rate))

    assert not on_bar_lines(starts())  # as trained: every 2 beats, so half the starts fall mid-bar
    arranger.use_bars(1)
    assert on_bar_lines(starts()) and len(starts()) >= len(song.downbeats) - 2
    assert arranger.config.section_bars == 1
