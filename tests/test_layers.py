"""Layered arrangements. The rhythm and harmony layers of the MDCT latent, the `layers` rule, the layering
agent, and what is heard in layers, measured from the audio."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SR, tiny_args

import arrange
import make_pairs
from audio_codec import LatentNorm, MDCTCodec
from config import Config, parse_args, upgrade
from creative_agent import CreativeAgent
from fixed_masks import make_fixed_masks
from inference import GUIDE_SECONDS, Arrangement, Arranger, AudioInputError, Request, song_guide, stem_layers
from layers import bass_rows, harmony_mask, split_layers
from listening import layer_guide, layering
from model_simple_transformer import SimpleTransformer, build_model
from pairs_dataset import BadDataError, WavPairsDataset, rhythm_path
from train_simple_worker import run

RATE = 24000


def drums(seconds: float = 4.0, sr: int = RATE) -> np.ndarray:
    """Noise bursts that die away in 10 ms, four a second: a drums-only song."""
    rng, out = np.random.default_rng(0), np.zeros(int(seconds * sr))
    n = int(0.08 * sr)
    for start in range(0, len(out) - n, sr // 4):
        out[start : start + n] += 0.5 * rng.standard_normal(n) * np.exp(-np.arange(n) / (0.01 * sr))
    return out


def chord(seconds: float = 4.0, sr: int = RATE, root: float = 261.6) -> np.ndarray:
    """A sustained major chord: a harmony-only song."""
    t = np.arange(int(seconds * sr)) / sr
    return sum(0.15 * np.sin(2 * np.pi * root * r * t) for r in (1.0, 1.26, 1.5))


@pytest.mark.parametrize("name, make, layer", [("drums", drums, 0), ("chord", chord, 1)])
def test_layers_sum_back_and_separate_drums_from_chords(name, make, layer):
    codec = MDCTCodec()
    wave = torch.tensor(make(), dtype=torch.float32)[None, None]
    z = codec.encode(wave)
    parts = split_layers(z)
    assert parts.shape == (1, 2, *z.shape[1:])
    assert (parts.sum(dim=1) - z).abs().max() <= 1e-4 * z.abs().max()  # exactly the latent again
    decoded = [codec.decode(parts[:, k])[..., : wave.shape[-1]] for k in range(2)]
    assert (decoded[0] + decoded[1] - wave).abs().max() < 1e-4  # and the song again
    energy = [float(d.square().sum()) for d in decoded]
    assert energy[layer] / sum(energy) >= 0.9, f"{name}: {energy}"


def test_the_bass_goes_with_the_drums():
    """The rhythm layer is the rhythm section, drums and bass, as a separator's stems give it: without the bass the
    drums of real songs were too quiet to be heard under the other song's harmony. Models of today's configuration
    and the layers rule have the bass in it; a checkpoint saved before it keeps its drums-only rhythm."""
    codec = MDCTCodec()
    rows = bass_rows(codec.sample_rate / 2 / codec.dim)
    assert rows == 2  # the MDCT's rows below 187.5 Hz
    bass = 0.3 * np.sin(2 * np.pi * 82.4 * np.arange(4 * RATE) / RATE)  # E2, with drums and a C major chord
    z_drums, z_bass, z_chord = (codec.encode(torch.tensor(x, dtype=torch.float32)[None, None])
                                for x in (drums(), bass, chord()))
    song = z_drums + z_bass + z_chord
    share = lambda mask, z: float((mask * z).square().sum() / z.square().sum())  # noqa: E731 (the MDCT keeps energy)
    harmony = harmony_mask(song, bass=rows)  # each cell's share in the harmony layer
    assert min(share(1 - harmony, z_drums), share(1 - harmony, z_bass), share(harmony, z_chord)) > 0.95
    drums_only = harmony_mask(song)  # the bass is harmony, and it made the chord above it look percussive
    assert share(1 - drums_only, z_bass) < 0.2 and share(drums_only, z_chord) < 0.6
    layered = dict(agent="layered", use_creative_agent=True)
    assert build_model(Config(**layered), 128).creative_agent.mask_generator.bass == rows
    assert build_model(upgrade(layered), 128).creative_agent.mask_generator.bass == 0
    assert Arranger.rule("layers").model.rule.bass == rows


def test_the_layers_rule_takes_the_inputs_rhythm_and_the_targets_harmony():
    z_in, z_tgt = (MDCTCodec().encode(torch.tensor(x(), dtype=torch.float32)[None, None]) for x in (drums, chord))
    m_in, m_tgt = make_fixed_masks("layers", z_in, z_tgt)
    assert torch.equal(m_in, 1 - harmony_mask(z_in)) and torch.equal(m_tgt, harmony_mask(z_tgt))
    model = SimpleTransformer(encoding_dim=128, nhead=2, num_layers=1, mask_type="layers").eval()
    out, reg = model(z_in, z_tgt)  # untrained: the masked mix, the drums' rhythm under the chord's harmony
    assert reg is None and torch.allclose(out, split_layers(z_in)[:, 0] + split_layers(z_tgt)[:, 1], atol=1e-5)


def test_the_layering_agent_decides_each_layer_per_section_and_trains():
    torch.manual_seed(0)
    agent = CreativeAgent(16, hidden_dim=16, agent="layered")
    x, y = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    sections = (torch.arange(64) // 16).expand(2, -1)
    gates, _, reg = agent.mask_generator(x, y, sections=sections)
    assert gates.shape == (2, 2, 64)  # rhythm and harmony, every frame
    for s in range(4):  # one decision per section and layer, 0 or 1
        part = gates[..., s * 16 : (s + 1) * 16]
        assert torch.equal(part, part[..., :1].expand_as(part)) and set(part.unique().tolist()) <= {0.0, 1.0}
    masked_in, masked_tgt, reg = agent.generate_creative_masks(x, y, sections=sections)
    want = (split_layers(x) * gates[:, :, None]).sum(1)
    assert torch.allclose(masked_in, want, atol=1e-6)
    (masked_in.square().mean() + masked_tgt.square().mean() + reg).backward()
    assert agent.mask_generator.input_head.weight.grad.abs().sum() > 0
    assert not hasattr(agent.mask_generator, "harmony_analyser")  # no learned filters: nothing DDP could leave unused


def test_the_layering_term_asks_for_layers_from_different_songs():
    """Without it both layers follow the same scores: on real music the first layered agent took both from one song
    in every section (both songs heard 6 % of the time)."""
    from creative_agent import TERM_WEIGHTS, mask_regularization

    together = torch.tensor([[[1.0, 0.0, 1.0, 0.0]] * 2])  # [1, 2 layers, 4 frames]: the same song for both
    apart = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]])
    assert mask_regularization(together, 1 - together)[1]["layering"] == 1.0
    assert mask_regularization(apart, 1 - apart)[1]["layering"] == 0.0
    assert TERM_WEIGHTS["layering"] == 0.0 and CreativeAgent(16, hidden_dim=16).mask_generator.weights["layering"] == 0
    assert CreativeAgent(16, hidden_dim=16, agent="layered").mask_generator.weights["layering"] == 30.0


def test_layering_is_measured_from_the_audio():
    a, b = drums() + 0.3 * chord(root=220.0), chord() + 0.1 * drums()[::-1]
    alone = layering(a, a, b, RATE)
    assert alone["both_heard"] == 0.0 and alone["rhythm_input_share"] == alone["harmony_input_share"] == 1.0
    assert np.isnan(alone["harmony_match"])  # never both at once: nothing can clash
    mixed = layering(a + b, a, b, RATE)
    assert mixed["both_heard"] > 0.5 and 0.2 < mixed["harmony_match"] < 0.9  # C major over A major: partly alike
    layered = layering(drums() + chord(), a, b, RATE)  # a's rhythm under b's harmony
    assert layered["rhythm_input_share"] > 0.6 and layered["harmony_input_share"] < 0.1
    swapped = layering(0.3 * chord(root=220.0) + 0.1 * drums()[::-1], a, b, RATE)  # b's rhythm under a's harmony
    assert swapped["rhythm_input_share"] < 0.1 and swapped["harmony_input_share"] > 0.9


def test_the_guide_lays_agreeing_notes_together_and_clashing_ones_apart():
    """Which way round to layer, from the audio: the input's bass under the target's chord is heard as both songs,
    the target's faint bass under the input's chord as the input alone. Where the chords agree (C major over C
    major an octave up) the guide asks for the first, where they clash (F# major) for the second."""
    t = np.arange(4 * RATE) / RATE
    tone = lambda hz, a: a * np.sin(2 * np.pi * hz * t)  # noqa: E731
    triad = lambda root: sum(tone(root * r, 0.15) for r in (1.0, 1.26, 1.5))  # noqa: E731
    song = tone(110.0, 0.3) + triad(261.6)
    other = tone(82.4, 0.03) + np.where(t < 2, triad(523.2), triad(740.0))
    guide = layer_guide(*(torch.tensor(w, dtype=torch.float32)[None, None] for w in (song, other)), RATE)[0]
    half = len(guide) // 2
    assert guide[5 : half - 5].min() > 0.5 and guide[half + 5 : -5].max() < -0.5  # a few frames blur at the change

    torch.manual_seed(0)
    x, y = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    sections, lean = (torch.arange(64) // 16).expand(2, -1), torch.where(torch.arange(64) < 32, 1.0, -1.0).expand(2, -1)
    for weight in (0.0, 100.0):
        agent = CreativeAgent(16, hidden_dim=16, agent="layered", guide_weight=weight).mask_generator
        gates = agent(x, y, sections=sections, guide=lean).input
        if weight == 0:  # no guide: the lean is not looked at
            assert torch.equal(gates, agent(x, y, sections=sections).input)
        else:  # the guide's way round: the input's rhythm in the first half, the target's in the second
            assert (gates[:, 0, :32] == 1).all() and (gates[:, 0, 32:] == 0).all()
            assert torch.equal(gates[:, 1], 1 - gates[:, 0])  # and the harmony from the other song
    assert upgrade({}).layer_guide == 0.0 and Config().layer_guide == 3.0  # checkpoints from before: no guide


def test_a_songs_guide_is_taken_in_stretches_over_every_frame():
    class Model:  # gives each stretch its number as its guide
        def guide_from_audio(self, inp, tgt, sample_rate, frames):
            stretches.append(inp.shape[-1])
            return torch.full((1, frames), float(len(stretches)))

    codec = MDCTCodec()
    for seconds, count in ((GUIDE_SECONDS + 0.01, 1), (2.6 * GUIDE_SECONDS, 3)):
        stretches, song = [], torch.zeros(int(seconds * RATE))
        frames = codec.num_frames(len(song) + RATE)  # past the end: windows reach beyond the song
        guide = song_guide(Model(), song, song, codec, frames)
        assert len(stretches) == count and sum(stretches) == len(song)  # a short end joins the stretch before it
        assert guide.shape == (frames,) and guide[-1] == 0  # nothing past the end
        first = -(-stretches[0] // codec.hop_length)  # the frames of the first stretch
        assert (guide[:first] == 1).all() and (guide[first : first + 10] == (2 if count > 1 else 0)).all()


def test_a_layered_arrangement_is_ridden_where_its_layers_swap_and_says_its_switches_are_ambiguous():
    """Both songs play throughout a layered arrangement: where its layers change song the mix is brought to the
    level before and eased back to its own, the whole mix; and which song is heard (what the switch figures count)
    is ambiguous, which the summary line says."""
    from beats import Grid, level_db
    from inference import ride_fader, summary_line

    model = SimpleTransformer(encoding_dim=128, nhead=2, num_layers=1, use_creative_agent=True, agent="layered")
    a, b = (torch.tensor(x, dtype=torch.float32) for x in (drums() + 0.3 * chord(root=220.0), chord() + 0.1 * drums()))
    sections = torch.arange(750) // 75  # 10 sections of 0.4 s at the MDCT's 128-sample hop
    swapped = (sections % 2).float()  # the rhythm from the input in odd sections, the harmony in even ones
    bands = torch.cat([swapped.expand(64, -1), (1 - swapped).expand(64, -1)])
    loud = torch.where(swapped.repeat_interleave(128)[: len(a)] > 0, 3 * (a + b), a + b)  # a level step at each swap
    ridden, w = ride_fader(model, loud, bands, sections, 128, RATE).numpy(), int(0.2 * RATE)
    for start in range(75 * 128, len(loud) - w, 75 * 128):
        assert abs(level_db(loud.numpy()[start - w : start]) - level_db(loud.numpy()[start : start + w])) > 5
        assert abs(level_db(ridden[start - w : start]) - level_db(ridden[start : start + w])) < 0.5
    same = torch.ones_like(bands)  # no layer changes song: nothing to ride
    assert torch.equal(ride_fader(model, loud, same, sections, 128, RATE), loud)
    grid, masks = Grid(0.0, np.array([]), 0, False, -20.0), (bands, 1 - bands)
    heard = lambda out: Arrangement(out, a, b, masks, None, sections, grid, None)  # noqa: E731
    assert "ambiguous" in summary_line("mix.wav", heard(a + b), RATE, 0.5)
    assert "ambiguous" not in summary_line("mix.wav", heard(a), RATE, 0.5)


def test_layering_needs_the_mdct_codec(capsys):
    for flags in (["--agent", "layered"], ["--mask_type", "layers"]):
        with pytest.raises(SystemExit):
            parse_args([*flags, "--codec", "encodec"])
        assert "need --codec mdct" in capsys.readouterr().err


def stems_pairs(tmp_path, capsys) -> str:
    """`make_pairs.py --stems` on four songs with their stems (drums, bass, other) and one without: a pairs folder whose
    segments carry their rhythm layers, the drums and the bass."""
    music, separated, pairs = tmp_path / "music", tmp_path / "separated", str(tmp_path / "pairs")
    music.mkdir()
    t = np.arange(2 * SR) / SR
    for i in range(5):
        parts = dict(drums=drums(2.0, SR) * (0.3 + 0.1 * i), bass=0.2 * np.sin(2 * np.pi * (55 + 10 * i) * t),
                     other=chord(2.0, SR, root=220.0 + 30 * i))
        sf.write(str(music / f"song{i}.wav"), sum(parts.values()).astype(np.float32), SR)
        for stem, wave in parts.items() if i < 4 else ():
            (separated / f"song{i}").mkdir(parents=True, exist_ok=True)
            sf.write(str(separated / f"song{i}" / f"{stem}.wav"), wave.astype(np.float32), SR)
    argv = ["--from_folder", str(music), "--stems", str(separated), "--out", pairs, "--segment_seconds", "0.5",
            "--sample_rate", str(SR), "--val_fraction", "0.25"]
    assert make_pairs.main(argv) == 0
    assert "song4.wav: stems" in capsys.readouterr().out  # listed and skipped: no stems
    assert make_pairs.main([*argv[:3], str(tmp_path / "none"), "--out", str(tmp_path / "other")]) == 2
    assert "--stems" in capsys.readouterr().err
    return pairs


def test_pairs_carry_their_stems_and_a_layered_agent_trains_on_them_and_arranges_in_layers(tmp_path, checkpoints,
                                                                                           capsys):
    pairs = stems_pairs(tmp_path, capsys)
    data = WavPairsDataset(os.path.join(pairs, "train"), SR, SR // 2, stems=True)
    assert data.stems and not WavPairsDataset(os.path.join(pairs, "train"), SR, SR // 2).stems
    item, (inp, _) = data[0], data.pairs[0]
    assert item["rhythm"].shape == (2, 1, SR // 2)
    song, rhythm = sf.read(inp)[0], sf.read(rhythm_path(inp))[0]
    assert 0.01 < np.abs(rhythm).max() and np.abs(song - rhythm).max() > 0.05  # drums and bass, not the song
    guided = WavPairsDataset(os.path.join(pairs, "train"), SR, SR // 2, guide=True)
    guide = guided[0]["guide"]  # the layering agent's guide, computed once for a pair of fixed songs
    assert guide.ndim == 1 and guide.abs().max() <= 1 and guided[0]["guide"] is guide and "guide" not in item
    assert run(0, 1, 0, tiny_args(tmp_path, pairs, "--agent", "layered")) == 0
    assert "layers from the pairs' stems" in capsys.readouterr().out
    os.remove(rhythm_path(data.pairs[-1][1]))
    with pytest.raises(BadDataError, match="carry their rhythm stems"):
        WavPairsDataset(os.path.join(pairs, "train"), SR, SR // 2, stems=True)
    song, stems = tmp_path / "song.wav", tmp_path / "stems"
    sf.write(str(song), (drums(2.0, SR) + chord(2.0, SR)).astype(np.float32), SR)
    stems.mkdir()
    sf.write(str(stems / "drums.flac"), drums(2.0, SR).astype(np.float32), SR)
    out = tmp_path / "mix.wav"
    common = ["--input", str(song), "--target", str(song), "--output", str(out), "--align", "false"]
    layered = ["--checkpoint", str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt")]
    picture = tmp_path / "mix.png"  # with the guide over the input mask
    assert arrange.main(layered + common + ["--mask_plot", str(picture)]) == 0
    line = capsys.readouterr().out
    assert "both songs heard" in line and "share of the rhythm" in line and out.is_file() and picture.is_file()
    assert arrange.main(layered + common + ["--input_stems", str(stems), "--target_stems", str(stems)]) == 0
    assert "share of the rhythm" in capsys.readouterr().out
    assert arrange.main(layered + common + ["--input_stems", str(tmp_path / "nothing")]) == 2
    assert "nothing: does not exist" in capsys.readouterr().err
    assert arrange.main(["--checkpoint", checkpoints["agent"], *common, "--target_stems", str(stems)]) == 2
    assert "layers of the layering agent" in capsys.readouterr().err


def test_stems_from_a_separator_are_the_layers_the_agent_composes(tmp_path):
    """With a separator's stems the rhythm is the drums and bass, the harmony the rest of the song, exactly:
    an agent that takes the input's rhythm and the target's harmony plays the input's drums with the target's
    chord, where harmonic-percussive separation leaves some of each in the other layer."""
    model = SimpleTransformer(encoding_dim=128, nhead=2, num_layers=1, use_creative_agent=True, agent="layered").eval()
    generator = model.creative_agent.mask_generator
    generator.decisions = lambda z_in, *rest: (torch.stack(  # rhythm from the input, harmony from the target
        [torch.ones_like(z_in[:, 0]), torch.zeros_like(z_in[:, 0])], dim=1), None, None)
    arranger = Arranger(model, MDCTCodec(), LatentNorm(128), Config(agent="layered", use_creative_agent=True,
                                                                    segment_samples=2 * RATE))
    kick, snare = (torch.tensor(drums(6.0) * g, dtype=torch.float32) for g in (0.4, 0.3))
    song = kick + torch.tensor(chord(6.0), dtype=torch.float32)
    other = snare + torch.tensor(chord(6.0, root=329.6), dtype=torch.float32)
    for name, stem, wave in (("a", kick, song), ("b", snare, other)):
        (tmp_path / name).mkdir()
        sf.write(str(tmp_path / name / "drums.wav"), stem.numpy(), RATE)
        sf.write(str(tmp_path / name / "vocals.wav"), (wave - stem).numpy(), RATE)  # not read: the rest is harmony
    rhythm = tuple(stem_layers(str(tmp_path / n), w, RATE) for n, w in (("a", song), ("b", other)))
    wanted = kick + torch.tensor(chord(6.0, root=329.6), dtype=torch.float32)
    with_stems = arranger.arrange(Request(song, other, align=False, rhythm=rhythm)).output
    separated = arranger.arrange(Request(song, other, align=False)).output
    error = lambda out: float((out - wanted).norm() / wanted.norm())  # noqa: E731
    assert error(with_stems) < 1e-3 < 0.05 < error(separated)
    with pytest.raises(AudioInputError, match="no drums or bass stem"):
        stem_layers(str(tmp_path), song, RATE)
    with pytest.raises(AudioInputError, match="another recording"):
        stem_layers(str(tmp_path / "a"), song[: 3 * RATE], RATE)
    z = torch.zeros(1, 128, 40)
    for other_model in (SimpleTransformer(encoding_dim=128, nhead=2, num_layers=1, mask_type="temporal"),
                        SimpleTransformer(encoding_dim=128, nhead=2, num_layers=1, use_creative_agent=True)):
        with pytest.raises(ValueError, match="layering agent"):
            other_model(z, z, rhythm=(z, None))
