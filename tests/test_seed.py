"""The seed's usage and the design card's interfaces, written as their users write them: if a refactor drops a
name, a keyword or a behaviour they rely on, one of these goes red."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from creative_agent import AttentionMaskGenerator, CreativeAgent, StyleDiscriminator, count_parameters
from model_simple_transformer import SimpleTransformer
from train_simple_ddp import parse_args


def test_the_three_classes_and_their_sizes():
    agent = CreativeAgent(128)  # "wrapper combining both": about 700 K = 500 K mask generator + 200 K discriminator
    assert isinstance(agent.mask_generator, AttentionMaskGenerator)
    assert isinstance(agent.discriminator, StyleDiscriminator)
    assert 450_000 < count_parameters(agent.mask_generator) < 600_000
    assert 150_000 < count_parameters(agent.discriminator) < 250_000
    assert 600_000 < count_parameters(agent) < 800_000
    x, y = torch.randn(2, 128, 64), torch.randn(2, 128, 64)
    input_mask, target_mask, reg_loss = agent.mask_generator(x, y)
    assert input_mask.shape == target_mask.shape == x.shape and reg_loss.dim() == 0
    real_fake, style = agent.discriminator(x)
    assert real_fake.shape == style.shape == (2, 1)


def test_the_seed_constructor_and_forward():
    model = SimpleTransformer(encoding_dim=128, num_transformer_layers=2, use_creative_agent=True, nhead=4,
                              num_layers=1)
    assert len(model.stages) == 2 and model.use_creative_agent
    encoded_input, encoded_target = torch.randn(1, 128, 32), torch.randn(1, 128, 32)
    encoded_output, mask_reg_loss = model(encoded_input, encoded_target)
    assert encoded_output.shape == encoded_input.shape and mask_reg_loss.dim() == 0
    mask_reg_loss.backward()  # the regularisation trains the agent
    assert model.creative_agent.mask_generator.input_head.weight.grad is not None
    without = SimpleTransformer(encoding_dim=128, num_layers=1)
    assert without(encoded_input, encoded_target)[1] is None  # no agent, no regularisation
    assert len(SimpleTransformer(encoding_dim=16, nhead=2, num_layers=1, num_stages=3).stages) == 3


def test_a_mistyped_keyword_is_refused_by_the_model_by_name():
    with pytest.raises(ValueError, match=r"SimpleTransformer got unknown keyword\(s\) num_transfomer_layers\. It "
                                         r"takes encoding_dim, .*num_transformer_layers"):
        SimpleTransformer(encoding_dim=128, num_transfomer_layers=2, use_creative_agent=True)
    with pytest.raises(ValueError, match="name the same thing"):
        SimpleTransformer(encoding_dim=16, num_stages=3, num_transformer_layers=2)


def test_the_seed_flags():
    config = parse_args(["--use_creative_agent", "true", "--mask_reg_weight", "0.1", "--num_epochs", "10",
                         "--world_size", "1"])
    assert config.use_creative_agent is True and config.mask_reg_weight == 0.1
    assert config.num_epochs == 10 and config.world_size == 1


def test_the_self_test_prints_both_parts():
    result = subprocess.run([sys.executable, "creative_agent.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for text in ("Mask generator parameters:", "Style discriminator parameters:", "Creative agent parameters:",
                 "Complementarity:", "Coverage:", "Mask regularization loss:",
                 "Gradients reach every trainable parameter: yes"):
        assert text in result.stdout


def test_the_split_agent_is_regularised_on_what_it_decides():
    """A frame-gated agent splits its sections at the wanted share, so the share terms are met by construction
    (weight 0; a cell-gated agent keeps them), and its complementarity is the overlap p (1 - p) of the soft decisions
    that the straight-through estimator trains: 0.25 when undecided, lower as its scores part, with the same
    decisions (which is why what is heard is measured from the audio, not from this figure)."""
    frame, cell = AttentionMaskGenerator(32, hidden_dim=32), AttentionMaskGenerator(32, hidden_dim=32, gates="cell")
    assert {name: frame.weights[name] for name in ("area", "share", "diversity")} == dict.fromkeys(
        ("area", "share", "diversity"), 0.0)
    assert cell.weights["area"] == cell.weights["share"] == 30.0
    torch.manual_seed(0)
    x, y = torch.randn(2, 32, 96), torch.randn(2, 32, 96)
    masks = frame(x, y)
    m_in, undecided = masks.input, masks.terms["complementarity"].item()
    assert 0.2 < undecided <= 0.25
    with torch.no_grad():
        for head in (frame.input_head, frame.target_head):
            head.weight.mul_(200.0)
            head.bias.mul_(200.0)
    sure = frame(x, y)
    assert torch.equal(sure.input, m_in)  # the same decisions, more decided
    assert sure.terms["complementarity"].item() < 0.5 * undecided


def test_the_mask_regularisation_falls_as_the_agent_learns(tmp_path, pairs_dir, capsys):
    """The trainer prints and logs the regularisation of the validation pairs (fixed shares, so the training's
    draws do not move it) and the training mean beside it; on the tiny pairs it falls from the first epoch on."""
    from test_training import read_metrics, train

    train(tmp_path, pairs_dir, "--use_creative_agent", "true", "--mask_reg_weight", "0.1", "--num_epochs", "4",
          "--lr", "1e-3")
    regs = [r["mask_reg_loss"] for r in read_metrics(tmp_path)]
    assert all(later < earlier for earlier, later in zip(regs, regs[1:], strict=False)), regs
    assert regs[-1] < 0.9 * regs[0]  # on the true grids of the tiny songs: 6.25 -> 5.22 in 4 epochs
    assert f"Mask reg={regs[-1]:.4f} (train " in capsys.readouterr().out
