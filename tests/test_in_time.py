"""Arrangements in time with the music: the beat grid, tempo, key and loudness alignment, decisions per
section of beats, seamless switches, and the figures of what is heard in time."""
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SR

import arrange
from beats import (
    AlignmentError,
    SectionUnit,
    align,
    analyse,
    key_shift,
    lay_on_grid,
    loudness_lufs,
    section_ids,
    tempo_ratio,
)
from creative_agent import AttentionMaskGenerator
from fixed_masks import Rule, make_fixed_masks
from listening import in_time, source_labels

RATE = 22050


def clicks(bpm: float, seconds: float, sr: int = RATE, offset: float = 0.1, gain: float = 0.5) -> np.ndarray:
    """A click track: a short 1 kHz blip on every beat."""
    y = np.zeros(int(seconds * sr), np.float32)
    t = np.arange(int(0.01 * sr)) / sr
    click = (np.sin(2 * np.pi * 1000 * t) * np.exp(-t * 400)).astype(np.float32)
    for b in np.arange(offset, seconds - 0.02, 60 / bpm):
        i = int(b * sr)
        y[i : i + len(click)] += click[: len(y) - i]
    return gain * y


def chords(shift: int, sr: int = RATE, seconds: float = 8.0) -> np.ndarray:
    """I - IV - V - I in C major, moved by `shift` semitones."""
    y, n = np.zeros(int(seconds * sr)), int(seconds * sr) // 4
    t = np.arange(n) / sr
    for i, chord in enumerate([[0, 4, 7], [5, 9, 12], [7, 11, 14], [0, 4, 7]]):
        for note in chord:
            y[i * n : (i + 1) * n] += np.sin(2 * np.pi * 261.63 * 2 ** ((note + shift) / 12) * t)
    return (0.2 * y).astype(np.float32)


def onsets(audio: np.ndarray, sr: int = RATE) -> np.ndarray:
    """Times (s) where a click starts: the envelope crosses half its peak going up."""
    env = np.abs(audio) > 0.5 * np.abs(audio).max()
    return np.flatnonzero(env[1:] & ~env[:-1]) / sr


@pytest.mark.parametrize("bpm", [100, 120, 137])
def test_a_click_track_is_tracked_within_two_percent(bpm):
    grid = analyse(clicks(bpm, 10), RATE)
    assert grid.has_pulse and not grid.note
    assert grid.tempo == pytest.approx(bpm, rel=0.02)


def test_no_pulse_and_too_short_give_a_note_not_an_error():
    noise = (0.1 * np.random.default_rng(0).standard_normal(6 * RATE)).astype(np.float32)
    for audio in (noise, clicks(120, 0.3)):
        grid = analyse(audio, RATE)
        assert not grid.has_pulse and grid.note.startswith("no beat grid")
        assert section_ids(grid.beats, 100, 50.0, SectionUnit(2, 0, 32)).tolist() == (torch.arange(100) // 32).tolist()


def test_a_100_bpm_track_is_laid_on_the_grid_of_a_120_bpm_one():
    song, other = clicks(120, 8, offset=0.25), clicks(100, 10, offset=0.4)
    aligned, info = align(other, song, RATE)
    assert len(aligned) == len(song) and info.ratio == pytest.approx(1.2, rel=0.02)
    grid = np.arange(0.25, 8, 0.5)
    found = onsets(aligned)
    assert len(found) >= 14
    assert np.abs(found[:, None] - grid[None]).min(axis=1).max() < 0.02  # every beat within 20 ms of the grid
    longer = np.concatenate([other, clicks(100, 30, offset=0.4)])  # a long tail the arrangement never takes
    grids = analyse(other, RATE), analyse(song, RATE)
    np.testing.assert_allclose(align(longer, song, RATE, grids)[0], align(other, song, RATE, grids)[0], atol=1e-6)
    half = lay_on_grid(other / 2, info, len(song), RATE)  # a stem of the target, laid as the target was
    laid = onsets(2 * half)  # on the same grid (Rubber Band's time map treats quieter transients otherwise)
    assert len(laid) >= 14 and np.abs(laid[:, None] - grid[None]).min(axis=1).max() < 0.02


def test_octave_errors_fold_and_tempos_too_far_apart_are_refused():
    assert tempo_ratio(120, 60) == pytest.approx(1.0)  # double time is the same tempo
    assert tempo_ratio(120, 100) == pytest.approx(1.2)
    with pytest.raises(AlignmentError, match="too far apart"):
        tempo_ratio(200, 40)


def test_a_chord_progression_shifted_by_two_semitones_is_estimated_plus_two():
    c, d = analyse(chords(0), RATE), analyse(chords(2), RATE)
    assert (c.key_name, d.key_name) == ("C major", "D major")
    assert key_shift(d, c) == 2 and key_shift(c, d) == -2
    relative = c.__class__(0, np.zeros(0), 9, True, 0.0)  # A minor: the relative minor of C major
    assert key_shift(c, relative) == 0


def test_loudness_is_matched_within_half_a_db():
    song, other = clicks(120, 8, gain=0.5), clicks(120, 8, gain=0.05)
    aligned, info = align(other, song, RATE)
    assert abs(loudness_lufs(aligned, RATE) - loudness_lufs(song, RATE)) < 0.5
    assert info.lufs_in - info.lufs_tgt == pytest.approx(20.0, abs=1.0)


def test_sections_start_on_every_nth_beat():
    beats = np.arange(0.3, 4.0, 0.5)
    ids = section_ids(beats, 400, 100.0, SectionUnit(2, 0, 32))  # 100 frames a second, 4 s
    starts = torch.nonzero(torch.diff(ids)).flatten() + 1
    assert starts.tolist() == [30, 130, 230, 330]  # every second beat from the first
    assert ids[0] == 0 and (torch.diff(ids) >= 0).all()


def sectioned_agent(**options):
    torch.manual_seed(0)
    return AttentionMaskGenerator(16, hidden_dim=32, num_heads=2, fade_frames=5, **options).eval()


def test_every_switch_of_the_agent_and_the_rule_lies_on_a_section_start():
    x, y = torch.randn(3, 16, 400), torch.randn(3, 16, 400)
    beats = np.arange(0.13, 4.0, 0.47)
    ids = section_ids(beats, 400, 100.0, SectionUnit(2, 0, 32)).expand(3, -1)
    starts = set((torch.nonzero(torch.diff(ids[0])).flatten() + 1).tolist())
    m_agent = sectioned_agent()(x, y, sections=ids).input[:, 0]
    m_rule = make_fixed_masks(Rule("temporal", fade_frames=5), x, y, sections=ids)[0][:, 0]
    for mask in (m_agent, m_rule):
        for row in mask:
            decided = (row > 0.5).float()
            switches = (torch.nonzero(torch.diff(decided)).flatten() + 1).tolist()
            assert all(min(abs(s - b) for b in starts) <= 3 for s in switches)  # on a section start (the fade's middle)
            ramps_end = torch.nonzero(torch.diff((row > 0.99).float()).abs() + torch.diff((row < 0.01).float()).abs()
                                      ).flatten() + 1
            assert any(int(e) in starts for e in ramps_end) or not switches  # a fade ends where its section starts
            ramp = ((row > 0.01) & (row < 0.99)).sum().item()
            assert ramp <= 5 * len(switches)  # a few frames of fade around each switch, nothing else grey
    assert len(set((m_rule[0] > 0.5).tolist())) == 2  # the rule alternates


def test_sections_given_to_the_agent_replace_its_blocks():
    x, y = torch.randn(2, 16, 96), torch.randn(2, 16, 96)
    agent = sectioned_agent(block_frames=32)
    blocks = (torch.arange(96) // 32).expand(2, -1)
    torch.testing.assert_close(agent(x, y).input, agent(x, y, sections=blocks).input)


def test_in_time_figures_of_a_switching_mix():
    seconds, sr = 8.0, 8000
    a, b = (np.asarray(x, np.float32) for x in (clicks(120, seconds, sr, 0.25), clicks(120, seconds, sr, 0.5)))
    t = np.arange(len(a)) / sr
    a, b = a + 0.1 * np.sin(2 * np.pi * 220 * t), b + 0.1 * np.sin(2 * np.pi * 330 * t)
    beats = np.arange(0.25, seconds, 0.5)
    take_a = ((t - 0.25) // 1.0) % 2 == 0  # switch every 2 beats, on the beat
    out = np.where(take_a, a, b).astype(np.float32)
    figures = in_time((out, a, b), beats, sr)
    assert figures["switches_per_s"] == pytest.approx(1.0, abs=0.2)
    assert figures["section_s"] == pytest.approx(1.0, abs=0.1)
    assert figures["section_in_beats"] == pytest.approx(2, abs=0.2)
    assert figures["on_beat"] >= 0.9 and figures["on_beat_chance"] < 0.4
    copy = in_time((a.copy(), a, b), beats, sr)
    assert copy["switches_per_s"] == 0.0
    ridden = np.where(take_a, a, b * 10 ** (np.sin(t) * 12 / 20)).astype(np.float32)  # the fader moves b by ±12 dB
    assert in_time((ridden, a, b), beats, sr)["switches_per_s"] == figures["switches_per_s"]
    for gain in (0.25, 4.0):  # a song played softer or louder is still that song
        assert (source_labels(gain * out, a, b, sr)[0] == source_labels(out, a, b, sr)[0]).all()


def test_arrange_aligns_switches_on_the_beat_and_writes_the_aligned_target(tmp_path, checkpoints, capsys):
    sr = SR
    song = clicks(120, 6, sr, 0.25) + 0.05 * np.sin(2 * np.pi * 220 * np.arange(6 * sr) / sr).astype(np.float32)
    other = clicks(100, 7, sr, 0.3) + 0.05 * np.sin(2 * np.pi * 330 * np.arange(7 * sr) / sr).astype(np.float32)
    sf.write(tmp_path / "a.wav", song, sr)
    sf.write(tmp_path / "b.wav", 0.3 * other, sr)
    out = tmp_path / "mix.wav"
    assert arrange.main(["--checkpoint", checkpoints["agent"], "--input", str(tmp_path / "a.wav"), "--target",
                         str(tmp_path / "b.wav"), "--output", str(out), "--mask_plot", str(tmp_path / "m.png")]) == 0
    text = capsys.readouterr().out
    tempo = re.search(r"tempo ([\d.]+)\u2192([\d.]+) BPM", text)
    assert float(tempo.group(1)) == pytest.approx(100, rel=0.03)
    assert float(tempo.group(2)) == pytest.approx(120, rel=0.03)
    assert "LUFS" in text and "switches/s" in text and "on the beat" in text
    aligned, _ = sf.read(tmp_path / "mix.target_aligned.wav")
    assert len(aligned) == len(song)
    assert abs(loudness_lufs(aligned.astype(np.float32), sr) - loudness_lufs(song, sr)) < 1.0


def test_tempos_too_far_apart_exit_2_with_a_clear_message(tmp_path, checkpoints, capsys, monkeypatch):
    import beats

    monkeypatch.setattr(beats, "MAX_STRETCH", 1.1)  # real trackers fold octaves themselves: x1.2 stands for x2.5
    sf.write(tmp_path / "a.wav", clicks(120, 6, SR), SR)
    sf.write(tmp_path / "b.wav", clicks(100, 6, SR), SR)
    code = arrange.main(["--checkpoint", checkpoints["agent"], "--input", str(tmp_path / "a.wav"), "--target",
                         str(tmp_path / "b.wav"), "--output", str(tmp_path / "o.wav")])
    assert code == 2 and "too far apart" in capsys.readouterr().err


def test_make_pairs_keeps_every_pairs_beats_tempo_and_key(pairs_dir):
    with open(os.path.join(pairs_dir, "train", "beats.json")) as f:
        grids = json.load(f)
    pairs = [n[: -len("_input.wav")] for n in os.listdir(os.path.join(pairs_dir, "train")) if n.endswith("_input.wav")]
    assert sorted(grids) == sorted(pairs)
    for grid in grids.values():
        assert all(0 <= t < 0.5 for role in ("input", "output") for t in grid[role])  # from each segment's start
        assert 0 <= grid["key"] < 12 and isinstance(grid["minor"], bool)
        assert grid["tempo"] > 0 or not grid["input"] + grid["output"]  # no pulse: no beats (fixed blocks)
    assert any(g["tempo"] and g["input"] for g in grids.values())


def test_a_pairs_folder_from_before_gets_its_grids_once(tmp_path, pairs_dir):
    import shutil

    from pairs_dataset import WavPairsDataset

    folder = tmp_path / "val"
    shutil.copytree(os.path.join(pairs_dir, "val"), folder)
    os.remove(folder / "beats.json")
    data = WavPairsDataset(str(folder), SR, SR // 2)
    assert (folder / "beats.json").is_file()
    item = data[0]
    assert item["input"].shape == item["target"].shape == (1, SR // 2) and item["beats"].dim() == 1


def test_the_fader_rides_the_target_at_switches_and_leaves_the_input_alone():
    """A DJ rides the incoming deck against the one playing: each run of the target's sections starts at the level
    of the input before it and ends at the level of the input after it, and plays at its own level in between; the
    input is never touched."""
    from beats import level_db, level_switches
    from fixed_masks import RuleMix
    from inference import ride_fader

    sr, t = 8000, np.arange(8 * 8000) / 8000
    loud = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    quiet = (0.2 * (1 + 0.3 * np.sin(2 * np.pi * 0.7 * t)) * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    take_input = (t // 1.0) % 2 == 0  # the input (loud) in even seconds, the target (quiet) in odd ones
    mix = np.where(take_input, loud, quiet).astype(np.float32)
    rode = level_switches(mix, [(s * sr, (s + 1) * sr) for s in range(1, 8, 2)], sr)
    w = int(0.2 * sr)
    for s in range(1, 8):
        assert abs(level_db(mix[s * sr - w : s * sr]) - level_db(mix[s * sr : s * sr + w])) > 5  # a cut steps ~10 dB
        assert abs(level_db(rode[s * sr - w : s * sr]) - level_db(rode[s * sr : s * sr + w])) < 0.5  # ridden: not
    assert np.array_equal(rode[take_input], mix[take_input])  # the input as it was
    assert np.array_equal(rode[sr + 2 * w : 2 * sr - 2 * w], mix[sr + 2 * w : 2 * sr - 2 * w])  # away from switches
    assert abs(level_db(rode[-w:]) - level_db(mix[-w:])) < 0.1  # the last run ends at its own level: no input after
    hop, frames = 100, 8 * sr // 100  # the same from an arrangement's masks: sections of a second, three target runs
    sections = torch.arange(frames) // (sr // hop)
    target = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])[sections]
    ridden = ride_fader(RuleMix("temporal"), torch.from_numpy(mix), 1.0 - target.float().expand(4, -1), sections,
                        hop, sr)
    want = level_switches(mix, [(sr, 3 * sr), (5 * sr, 6 * sr), (7 * sr, 8 * sr)], sr)
    assert np.array_equal(ridden.numpy(), want)
