"""Agent controls: the balance knob, Gumbel hard masks, multi-scale attention, the compositional agent,
the style reference, and checkpoints that say which controls they honour."""
import csv
import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SR, tiny_args

import arrange
import evaluate
from checkpoints import load_checkpoint, load_model_state
from config import upgrade
from creative_agent import AttentionMaskGenerator, CreativeAgent, Evidence, split_at
from listening import tone_distance_db
from losses import lsd_per_example, reconstruction_loss
from model_simple_transformer import SimpleTransformer, build_model, restyle
from objective import style_distance
from pairs_folder import synth_song
from records import Conditions
from train_simple_worker import Trainer, run


def latents(batch=2, dim=16, frames=300, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, dim, frames), torch.randn(batch, dim, frames)


def test_balance_sets_each_examples_share_of_the_frames():
    x, y = latents()
    gen = AttentionMaskGenerator(16, hidden_dim=16).eval()
    areas = {}
    for b in (0.2, 0.5, 0.8):
        m_in, m_tgt, _ = gen(x, y, balance=b)
        assert torch.equal(m_in + m_tgt, torch.ones_like(m_in))
        areas[b] = m_in.mean(dim=(1, 2))
        assert areas[b].sub(b).abs().max() < 0.12  # the split weighs frames by how different the songs sound there
    assert (areas[0.2] < areas[0.5]).all() and (areas[0.5] < areas[0.8]).all()
    m_in, _, _ = gen(x, y, balance=torch.tensor([0.25, 0.75]))  # one wanted share per example
    assert m_in[0].mean() < 0.4 < 0.6 < m_in[1].mean()


def test_balance_and_share_terms_vanish_at_the_wanted_share():
    gen = AttentionMaskGenerator(4, hidden_dim=8)
    quarter = torch.zeros(1, 4, 64)
    quarter[..., :16] = 1.0
    _, terms = gen.regularization(quarter, 1 - quarter, Evidence(balance=torch.full((1, 1, 1), 0.25)))
    assert terms["area"].item() == pytest.approx(0.0, abs=1e-12)
    assert terms["share"].item() == pytest.approx(0.0, abs=1e-12)
    _, terms = gen.regularization(quarter, 1 - quarter)  # the default aims at one half
    assert terms["area"].item() == pytest.approx(0.25)


def test_far_lsd_follows_the_wanted_share():
    a, b = (torch.from_numpy(synth_song(seed, 1.0, SR)).float()[None, None] for seed in (3, 8))
    apart = lsd_per_example(a, b).item()
    only_far = dict(wave_input=0, wave_target=0, stft_input=0, stft_target=0, far_lsd=1)
    even, _ = reconstruction_loss(a, a, b, SR, only_far)
    assert even.item() == pytest.approx(apart, rel=1e-4)  # a copy of the input is as far as the songs are apart
    mostly_input, _ = reconstruction_loss(a, a, b, SR, only_far, balance=torch.tensor([0.75]))
    assert mostly_input.item() == pytest.approx(0.5 * apart, rel=1e-4)  # the target's distance counts half
    mostly_target, _ = reconstruction_loss(a, a, b, SR, only_far, balance=torch.tensor([0.25]))
    assert mostly_target.item() == pytest.approx(1.5 * apart, rel=1e-4)


@pytest.mark.parametrize("gates", ["cell", "frame"])
def test_gumbel_hard_masks_are_decided_and_still_learn(gates):
    x, y = latents()
    gen = AttentionMaskGenerator(16, hidden_dim=16, gates=gates, hard_masks=True)
    gen.tau.fill_(0.5)
    m_in, m_tgt, reg = gen(x, y)
    assert set(m_in.unique().tolist()) <= {0.0, 1.0} and torch.equal(m_in + m_tgt, torch.ones_like(m_in))
    (m_in * x).square().mean().add(reg).backward()
    assert gen.input_head.weight.grad.abs().sum() > 0  # straight-through: the soft mask's gradient
    again, _, _ = gen(x, y)
    assert not torch.equal(again, m_in)  # Gumbel noise: the decisions explore during training
    gen.eval()
    assert torch.equal(gen(x, y).input, gen(x, y).input)  # no noise at inference


def test_multi_scale_attention_reaches_every_scale():
    x, y = latents(frames=37)  # not a multiple of the scales
    gen = AttentionMaskGenerator(16, hidden_dim=16, scales=(1, 4, 16))
    assert sorted(gen.coarse_attention) == ["16", "4"]
    m_in, _, reg = gen(x, y)
    assert m_in.shape == x.shape
    (m_in * x).square().mean().add(reg).backward()
    for scale in ("4", "16"):
        assert gen.coarse_attention[scale].q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="distinct positive"):
        AttentionMaskGenerator(16, hidden_dim=16, scales=(1, 0))


def test_checkpoints_without_the_new_options_still_load(tmp_path, pairs_dir):
    """A run from before the controls existed has no agent_scales, balance_range or hard_masks in its config."""
    config = vars(tiny_args(tmp_path, pairs_dir, "--use_creative_agent", "true", "--agent_gates", "cell"))
    config["codec_dim"] = 32
    weights = build_model(upgrade(config), 32).state_dict()
    for key in ("agent_scales", "balance_range", "hard_masks"):
        del config[key]
    model = build_model(upgrade(config), 32)
    load_model_state(model, weights, "old.pt")
    assert model.creative_agent.mask_generator.scales == (1,)


@pytest.fixture(scope="module")
def balance_checkpoints(tmp_path_factory, pairs_dir):
    """An agent trained for any share (the default), one trained always even, and a fixed-mask run."""
    paths = {}
    for name, extra in (("any", []), ("even", ["--balance_range", "0.5,0.5"])):
        tmp = tmp_path_factory.mktemp(name)
        assert run(0, 1, 0, tiny_args(tmp, pairs_dir, "--use_creative_agent", "true", *extra)) == 0
        paths[name] = str(tmp / "ckpt" / "run" / "checkpoint_last.pt")
    tmp = tmp_path_factory.mktemp("temporal")
    assert run(0, 1, 0, tiny_args(tmp, pairs_dir, "--mask_type", "temporal")) == 0
    paths["temporal"] = str(tmp / "ckpt" / "run" / "checkpoint_last.pt")
    return paths


def songs(tmp_path):
    paths = []
    for seed in (5, 6):
        path = str(tmp_path / f"song_{seed}.wav")
        sf.write(path, synth_song(seed, 2.0, SR), SR)
        paths.append(path)
    return paths


def test_arrange_balance_is_recorded_asked_and_achieved(tmp_path, balance_checkpoints, capsys):
    assert load_checkpoint(balance_checkpoints["any"])["config"]["balance_range"] == (0.2, 0.8)
    a, b = songs(tmp_path)
    shares = {}
    for balance in ("0.25", "0.75"):
        out = tmp_path / f"out_{balance}.wav"
        assert arrange.main(["--checkpoint", balance_checkpoints["any"], "--input", a, "--target", b,
                             "--output", str(out), "--balance", balance]) == 0
        line = capsys.readouterr().out
        shares[balance] = float(re.search(rf"input share (\d\.\d\d) \(asked {balance}\)", line).group(1))
        wave, _ = sf.read(out)
        assert np.isfinite(wave).all() and np.abs(wave).max() <= 1.0
    assert shares["0.25"] < shares["0.75"]


@pytest.mark.parametrize("name,balance,message", [
    ("even", "0.3", "trained without the balance conditioning"),
    ("temporal", "0.3", "needs a creative-agent checkpoint"),
    ("any", "0.9", r"outside the range this checkpoint was trained for \(0.2..0.8\)"),
])
def test_a_balance_the_checkpoint_cannot_honour_is_refused(tmp_path, balance_checkpoints, capsys, name, balance,
                                                            message):
    a, b = songs(tmp_path)
    out = tmp_path / "out.wav"
    assert arrange.main(["--checkpoint", balance_checkpoints[name], "--input", a, "--target", b,
                         "--output", str(out), "--balance", balance]) == 2
    assert re.search(message, capsys.readouterr().err) and not out.exists()


def test_evaluate_balance_applies_to_agents_and_refuses_the_untrained(tmp_path, balance_checkpoints, pairs_dir,
                                                                      capsys):
    args = ["--dataset_folder", pairs_dir, "--num_examples", "1", "--balance", "0.3"]
    assert evaluate.main(["--checkpoints", f"any={balance_checkpoints['any']}",
                          f"temporal={balance_checkpoints['temporal']}", "--out", str(tmp_path / "ok"), *args,
                          "--hard"]) == 0
    with open(tmp_path / "ok" / "metrics.csv") as f:
        rows = {row["approach"]: row for row in csv.DictReader(f)}
    assert float(rows["any"]["complementarity"]) == pytest.approx(100.0)
    assert float(rows["any"]["coverage"]) == pytest.approx(100.0)
    assert evaluate.main(["--checkpoints", f"even={balance_checkpoints['even']}", "--out", str(tmp_path / "no"),
                          *args]) == 2
    assert "trained without the balance conditioning" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_training_with_hard_masks_and_scales_records_them(tmp_path, pairs_dir):
    args = tiny_args(tmp_path, pairs_dir, "--use_creative_agent", "true", "--agent_gates", "cell",
                     "--hard_masks", "true", "--agent_scales", "1,4", "--num_epochs", "2")
    assert run(0, 1, 0, args) == 0
    config = load_checkpoint(str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt"))["config"]
    assert config["hard_masks"] is True and config["agent_scales"] == (1, 4)
    assert (config["gumbel_tau_start"], config["gumbel_tau_end"]) == (1.0, 0.1)


def test_gumbel_temperature_anneals_from_start_to_end(tmp_path, pairs_dir):
    args = tiny_args(tmp_path, pairs_dir, "--use_creative_agent", "true", "--hard_masks", "true",
                     "--gumbel_tau_start", "2.0", "--gumbel_tau_end", "0.5", "--num_epochs", "2")
    trainer = Trainer(0, 1, 0, args)
    tau = trainer.model.creative_agent.mask_generator.tau
    last = 2 * len(trainer.data.train_loader) - 1
    assert trainer.total_steps == last + 1
    for step, want in ((0, 2.0), (last // 2, 2.0 * 0.25 ** ((last // 2) / last)), (last, 0.5)):
        trainer.objective.anneal_gumbel(step, trainer.total_steps)
        assert tau.item() == pytest.approx(want)
    trainer.close()


def test_compositional_components_sum_to_the_song_and_are_chosen_per_component():
    x, y = latents(frames=120)
    agent = CreativeAgent(16, hidden_dim=16, agent="compositional")
    gen = agent.mask_generator
    parts = gen.components(x)
    assert parts.shape == (2, 3, 16, 120) and torch.allclose(parts.sum(dim=1), x, atol=1e-5)
    slow = parts[:, 2].diff(dim=-1).abs().mean()
    assert slow < parts[:, 0].diff(dim=-1).abs().mean()  # timbre moves slowly, rhythm fast
    gates_in, gates_tgt, reg = gen(x, y)
    assert gates_in.shape == (2, 3, 120) and set(gates_in.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gates_in + gates_tgt, torch.ones_like(gates_in))
    masked_in, masked_tgt, reg = agent.generate_creative_masks(x, y)
    assert torch.allclose(masked_in, gen.compose(x, gates_in), atol=1e-6)
    mixed = (gates_in[:, 0] != gates_in[:, 1]).float().mean()  # rhythm of one song with harmony of the other
    assert mixed > 0
    (masked_in + masked_tgt).square().mean().add(reg).backward()
    assert gen.harmony_analyser.weight.grad.abs().sum() > 0 and gen.input_head.weight.grad.abs().sum() > 0
    _, masks = agent(x, y, Conditions())
    shown = masks.input
    assert shown.shape == x.shape  # one band of channels per component in the pictures: rhythm, harmony, timbre
    assert torch.equal(shown[:, 0], gates_in[:, 0]) and torch.equal(shown[:, -1], gates_in[:, 2])


def test_compositional_agent_trains_and_arranges(tmp_path, pairs_dir, capsys):
    args = tiny_args(tmp_path, pairs_dir, "--use_creative_agent", "true", "--agent", "compositional")
    assert run(0, 1, 0, args) == 0
    checkpoint = str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt")
    assert load_checkpoint(checkpoint)["config"]["agent"] == "compositional"
    a, b = songs(tmp_path)
    out = tmp_path / "out.wav"
    assert arrange.main(["--checkpoint", checkpoint, "--input", a, "--target", b, "--output", str(out),
                         "--balance", "0.3"]) == 0
    assert "input share" in capsys.readouterr().out and np.isfinite(sf.read(out)[0]).all()


def test_style_reference_changes_the_output_and_none_changes_nothing():
    torch.manual_seed(0)
    model = SimpleTransformer(encoding_dim=16, nhead=2, num_layers=1, use_creative_agent=True, agent_hidden_dim=16,
                              style_dim=8).eval()
    for stage in model.stages:  # a trained cascade: corrections that are not zero
        torch.nn.init.normal_(stage.proj_out.weight, std=0.1)
    x, y = latents(batch=1, frames=50)
    reference = torch.randn(1, 16, 80) * 3 + 1  # another length, another level
    plain, _ = model(x, y)
    assert torch.equal(model.style_encoder(torch.zeros(1, 16, 80)), torch.zeros(1, 8))
    none, _ = model(x, y, style_reference=torch.zeros(1, 16, 80))
    assert torch.allclose(none, plain, atol=1e-6)
    styled, _ = model(x, y, style_reference=reference)
    assert torch.isfinite(styled).all() and (styled - plain).abs().max() > 1e-3
    assert style_distance(reference, reference).item() == 0 and style_distance(plain, reference).item() > 0
    restyled, _ = model(x, y, style_reference=reference, style_strength=0.5)
    assert style_distance(restyled, reference) < 0.6 * style_distance(styled, reference)
    none, _ = model(x, y, style_reference=torch.zeros(1, 16, 80), style_strength=1.0)
    assert torch.allclose(none, plain, atol=1e-6)
    without = SimpleTransformer(encoding_dim=16, nhead=2, num_layers=1)
    with pytest.raises(ValueError, match="without style conditioning"):
        without(x, y, style_reference=reference)


def test_restyle_takes_the_references_statistics_by_the_strength():
    x, reference = torch.randn(2, 16, 50), torch.randn(2, 16, 80) * 3 + 1
    assert torch.equal(restyle(x, reference, 0.0), x)
    assert torch.equal(restyle(x, torch.zeros(2, 16, 80), 1.0), x)  # no reference
    assert style_distance(restyle(x, reference, 1.0), reference).max() < 1e-4
    half = style_distance(restyle(x, reference, 0.5), reference)
    assert torch.allclose(half, 0.5 * style_distance(x, reference), rtol=1e-4)
    quiet = torch.randn(2, 16, 50) * 1e-3  # a band far quieter than the reference's is raised by at most 20 dB
    assert restyle(quiet, reference, 1.0).std(dim=-1).max() < 10 * quiet.std(dim=-1).max() * 1.01


def test_training_with_style_references_and_arranging_with_one(tmp_path, pairs_dir, balance_checkpoints, capsys):
    args = tiny_args(tmp_path, pairs_dir, "--use_creative_agent", "true", "--style_weight", "0.5")
    assert run(0, 1, 0, args) == 0
    with open(tmp_path / "logs" / "run" / "metrics.jsonl") as f:
        assert "style_loss" in json.loads(f.readline())
    checkpoint = str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt")
    a, b = songs(tmp_path)
    c = str(tmp_path / "style.wav")
    sf.write(c, 0.5 * synth_song(42, 3.0, SR), SR)
    outputs = {}
    for name, extra in (("plain", []), ("styled", ["--style_reference", c])):
        out = tmp_path / f"{name}.wav"
        assert arrange.main(["--checkpoint", checkpoint, "--input", a, "--target", b, "--output", str(out),
                             *extra]) == 0
        outputs[name] = sf.read(out)[0]
        assert np.isfinite(outputs[name]).all() and np.abs(outputs[name]).max() <= 1.0
    assert np.abs(outputs["styled"] - outputs["plain"]).max() > 1e-4
    assert "tone distance to the style reference: arrangement" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        arrange.parse_args(["--checkpoint", checkpoint, "--input", a, "--target", b, "--output", "x.wav",
                            "--style_strength", "1.5"])
    reference = torch.from_numpy(sf.read(c)[0]).float()[None, None]
    tone = {name: tone_distance_db(torch.from_numpy(wave).float()[None, None], reference, SR).item()
            for name, wave in outputs.items()}
    assert tone["styled"] < tone["plain"]  # the reference's tone, taken in part
    assert arrange.main(["--checkpoint", balance_checkpoints["any"], "--input", a, "--target", b,
                         "--output", str(tmp_path / "no.wav"), "--style_reference", c]) == 2
    assert "--style_reference needs a checkpoint trained with --style_weight > 0" in capsys.readouterr().err


def test_the_split_weighs_frames_by_how_different_the_songs_sound():
    score = torch.tensor([[[3.0, 2.0, 1.0, 0.0]]])
    half = torch.full((1, 1, 1), 0.5)
    apart_first = torch.tensor([[[4.0, 4.0, 1.0, 1.0]]])  # the songs differ most in the first two frames
    # the first frame (4 of 10) is the input's; the second would tip it past half, so the third (1) joins it
    assert (score > split_at(score, apart_first, half)).tolist() == [[[True, False, True, False]]]
    # three sections, the one in the middle of the order the farthest apart: it alone goes to the target (the input
    # holds 2 of 5); a cut of the order at one point would give the input the first alone (1 of 5)
    three = torch.tensor([[[1.0, 3.0, 1.0]]])
    assert (score[..., :3] > split_at(score[..., :3], three, half)).tolist() == [[[True, False, True]]]
    assert (score > split_at(score, torch.ones(1, 1, 4), half)).sum() == 2
    assert (score > split_at(score, torch.ones(1, 1, 4), torch.full((1, 1, 1), 0.75))).sum() == 3
