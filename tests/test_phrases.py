"""Phrases of whole bars, the mashability rule's plan (the best-fitting piece of the target for a phrase) and its
rendering: bar-long equal-power cross-fades with the bass swapped on the downbeat, and the figures of a plan heard
from the audio."""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from arrange import main as arrange_main
from beats import Grid
from fixed_masks import make_fixed_masks, plan_masks
from listening import phrase_figures
from pairs_folder import make_song
from phrases import Bars, Phrases, Plan, Step, bars_of, lead_gains, make_plan, render_target, song_phrases

SR = 8000


def grid_of(song) -> Grid:
    """A synthetic song's true grid (no tracker: what is tested here is what is built on the bars)."""
    return Grid(60.0 / float(np.median(np.diff(song.beats))), song.beats, song.key, False, -20.0,
                downbeats=song.downbeats, meter=4, confidence=1.0)


def test_phrases_of_eight_bars_are_found_on_their_bar_lines():
    for seed in range(4):
        song = make_song(seed, 60.0, SR, phrase_bars=8)
        bars, phrases = song_phrases(song.audio, grid_of(song), SR)
        assert phrases.found
        assert phrases.starts.tolist() == list(range(0, bars.count - 4, 8)), seed
        assert set(phrases.lengths[:-1].tolist()) == {8}


def test_a_song_without_bars_is_cut_into_blocks_with_a_note():
    bars = bars_of(Grid(0.0, np.zeros(0), 0, False, -20.0), 9.0)
    assert bars.lines.tolist() == [0.0, 2.0, 4.0, 6.0, 9.0]
    assert "no bars" in bars.note


def rearranged(song, order: list[int], bars: int = 8) -> np.ndarray:
    """The song's phrases of `bars` bars in another `order` (cut on its bar lines: the tempo is steady)."""
    cut = [int(round(t * SR)) for t in song.downbeats[::bars]] + [len(song.audio)]
    return np.concatenate([song.audio[cut[k] : cut[k + 1]] for k in order])


def test_the_plan_takes_the_piece_of_the_target_that_fits_each_phrase():
    """The target holds the input's phrases in another order: for each phrase the target leads, the plan finds the
    one that is that phrase (from any bar, not the one at the same time), unshifted, and renders it in place."""
    song = make_song(1, 72.0, SR, phrase_bars=8)
    phrases = len(song.downbeats) // 8
    target = rearranged(song, [2, 3, 0, 1] + list(range(4, phrases)))[: len(song.audio)]
    plan = make_plan(song.audio, target, grid_of(song), SR)
    led = [s for s in plan.steps if s.lead == "target"]
    assert [s.lead for s in plan.steps[:4]] == ["input", "target", "input", "target"]
    assert [(s.bar, s.source, s.shift) for s in led[:2]] == [(8, 24, 0), (24, 8, 0)]
    assert led[0].fit.harmonic > 0.95 and "same time" in led[0].why
    rendered = render_target(target, plan, SR)
    a, b = (int(round(song.downbeats[k] * SR)) for k in (8, 16))
    assert np.abs(rendered[a:b] - song.audio[a:b]).max() < 1e-5  # phrase 1 of the input, from the target's bar 24
    table = plan.table()
    assert "bar 24" in table and "mashability" in table
    steps = json.loads(plan.to_json())["steps"]
    assert steps[1]["source"] == 24 and steps[1]["fit"]["harmonic"] > 0.95


def plan_of(leads: list[str], bar: float = 2.0) -> Plan:
    """A plan of phrases of 2 bars of `bar` seconds, led as `leads` say."""
    steps = [Step(2 * bar * i, 2 * bar * (i + 1), 2 * i, 2, lead, 2 * i if lead == "target" else -1)
             for i, lead in enumerate(leads)]
    lines = np.arange(0, 2 * len(leads) + 1) * bar
    return Plan(steps, Bars(lines, 4), Phrases(np.arange(0, 2 * len(leads), 2), 2 * len(leads), True, np.zeros(0)),
                Phrases(np.zeros(1, int), 1, False, np.zeros(0)))


def test_a_transition_is_a_bar_long_equal_power_fade_with_the_bass_swapped_on_the_downbeat():
    rate = 100.0  # frames a second
    gains = lead_gains(plan_of(["input", "target", "input"]), 1200, rate, fade_frames=3)
    upper, bass = gains
    at = lambda t: int(round(t * rate))  # noqa: E731
    assert upper[at(1.9)] == 1 and upper[at(4.0)] == 0 and upper[at(8.0)] == 1  # 1 bar before the phrase: the input
    assert upper[at(3.0)] == pytest.approx(math.cos(math.pi / 4), abs=0.02)  # half way through the bar
    assert bass[at(3.9)] == 1 and bass[at(4.0)] == 0 and bass[at(4.0) - 4] == 1  # swapped on the downbeat
    assert 0 < bass[at(4.0) - 2] < 1  # ... in fade_frames, no click
    assert upper[at(7.0)] == pytest.approx(math.sin(math.pi / 4), abs=0.02)  # and back: the input fades in
    x = torch.randn(1, 8, 1200)
    m_in, m_tgt = plan_masks(x, gains[None], bass=2)
    assert torch.allclose(m_in.square() + m_tgt.square(), torch.ones_like(m_in), atol=1e-5)  # equal power
    assert torch.equal(m_in[0, 0], bass) and torch.equal(m_in[0, 5], upper)
    with pytest.raises(ValueError, match="plan"):
        make_fixed_masks("mashability", x, x)


def test_the_mashability_rule_arranges_in_phrases_with_smooth_seams(tmp_path, capsys):
    """arrange.py --rule mashability: the plan on the console and in JSON, its changes heard on phrase starts and
    smoother than the 2-beat rule's cuts (the seam, from the audio)."""
    song, other = make_song(2, 48.0, SR, phrase_bars=8), make_song(5, 48.0, SR, phrase_bars=8)
    paths = {name: str(tmp_path / f"{name}.wav") for name in ("a", "b")}
    sf.write(paths["a"], song.audio, SR)
    sf.write(paths["b"], other.audio, SR)
    seams = {}
    for rule, extra in (("mashability", ["--plan_json", str(tmp_path / "plan.json")]),
                        ("temporal", ["--section_bars", "0"])):
        out = str(tmp_path / f"{rule}.wav")
        assert arrange_main(["--rule", rule, "--input", paths["a"], "--target", paths["b"], "--output", out,
                             "--sample_rate", str(SR), "--track_afresh", "false", *extra]) == 0
        printed = capsys.readouterr().out
        assert "phrases: the input's" in printed
        output, _ = sf.read(out, dtype="float32")
        aligned, _ = sf.read(out.replace(".wav", ".target_aligned.wav"), dtype="float32")
        assert len(output) == len(song.audio) and np.abs(output).max() < 1.0
        plan = json.loads(open(tmp_path / "plan.json").read())
        starts = np.asarray([s["start"] for s in plan["steps"]])
        figures = phrase_figures((output, song.audio, aligned), starts, np.asarray(plan["bar_lines"]), SR)
        seams[rule] = figures["seam"]
        if rule == "mashability":
            assert "plan (mashability)" in printed and plan["steps"][1]["lead"] == "target"
            assert figures["on_phrase"] >= 0.9 and figures["change_bars"] >= 4
    assert seams["mashability"] < seams["temporal"]
