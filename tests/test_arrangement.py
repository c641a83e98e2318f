"""What a listener hears (input share, temporal variation, distance to the farther song) and an agent
that arranges both songs over time instead of copying one."""
import json
import math
import os
import re

import pytest
import torch
from conftest import SR, tiny_args

from config import upgrade
from creative_agent import AttentionMaskGenerator, Evidence, novelty
from fixed_masks import Rule, make_fixed_masks
from listening import distances_and_share, input_share
from losses import DB_PER_NEPER, farther_song_loss, lsd_per_example, mask_variability, temporal_variation
from model_simple_transformer import build_model
from pairs_folder import synth_song
from train_simple_ddp import parse_args
from train_simple_worker import run


def two_songs(seconds=2.0):
    a, b = (torch.from_numpy(synth_song(seed, seconds, SR)).float()[None, None] for seed in (3, 8))
    return a, b


def test_input_share_of_copies_mix_and_swap():
    a, b = two_songs()
    assert input_share(a, a, b).item() >= 0.95
    assert input_share(b, a, b).item() <= 0.05
    mix = 0.5 * (a + b)
    assert input_share(mix, a, b).item() == pytest.approx(0.5, abs=0.05)
    for out in (a, b, mix, 0.8 * a + 0.3 * b):
        assert input_share(out, a, b).item() == pytest.approx(1.0 - input_share(out, b, a).item(), abs=1e-6)


def test_input_share_counts_what_is_heard_over_time():
    a, b = two_songs()
    half = a.shape[-1] // 2
    first_a_then_b = torch.cat([a[..., :half], b[..., half:]], dim=-1)
    assert 0.3 < input_share(first_a_then_b, a, b).item() < 0.7
    quiet_b = torch.cat([a[..., :half], 0.05 * b[..., half:]], dim=-1)  # the target barely heard
    assert input_share(quiet_b, a, b).item() > 0.75


def test_the_distances_count_what_is_heard():
    """Cells 80 dB and more below the music do not count; a difference a listener hears does. Before the floor, a
    hiss 74 dB below a tone put them 20 dB apart, in the measure and in the loss."""
    torch.manual_seed(0)
    t = torch.arange(2 * SR) / SR
    tone = 0.5 * torch.sin(2 * math.pi * 440 * t).view(1, 1, -1)
    hiss = tone + 1e-4 * torch.randn_like(tone)
    assert distances_and_share(hiss, tone, tone)["lsd_max_db"].item() < 0.5
    assert lsd_per_example(hiss, tone).item() * DB_PER_NEPER < 0.5  # the loss counts what is heard too
    chord = tone + 0.1 * torch.sin(2 * math.pi * 660 * t).view(1, 1, -1)  # a fifth, 14 dB down: heard
    assert distances_and_share(chord, tone, tone)["lsd_max_db"].item() > 3


def test_temporal_variation_and_mask_variability():
    x = torch.randn(3, 16, 64)
    static = torch.rand(1, 16, 1).expand(3, 16, 64)
    assert temporal_variation(static).max().item() == pytest.approx(0.0, abs=1e-6)
    m_in, _ = make_fixed_masks(Rule("temporal", segment_frames=8), x, x)
    assert temporal_variation(m_in).mean().item() == pytest.approx(0.5)
    assert mask_variability(m_in) == pytest.approx(0.0)  # one pattern for every pair
    flipped = torch.stack([m_in[0], 1 - m_in[0]])
    assert mask_variability(flipped) == pytest.approx(0.5)


def test_copying_one_song_is_the_farthest_from_the_other():
    a, b = two_songs()
    copy = farther_song_loss(a, a, b).item()
    assert copy == pytest.approx(lsd_per_example(a, b).item(), rel=1e-5)
    frames = torch.arange(a.shape[-1]) // (SR // 4) % 2  # quarter-second turns
    turns = torch.where(frames.bool(), b, a)
    assert farther_song_loss(turns, a, b).item() < 0.75 * copy
    every_sample_mixed = 0.5 * (a + b)
    assert farther_song_loss(turns, a, b).item() < farther_song_loss(every_sample_mixed, a, b).item() + 0.2


@pytest.mark.parametrize("block_frames, shift", [(32, 64), (0, 37)])  # blocks: a shift by whole blocks
def test_decisions_come_from_the_music_not_from_the_position(block_frames, shift):
    torch.manual_seed(0)
    gen = AttentionMaskGenerator(32, hidden_dim=32, block_frames=block_frames).eval()
    x, y = torch.randn(1, 32, 256), torch.randn(1, 32, 256)
    m, _, _ = gen(x, y)
    m_shifted, _, _ = gen(torch.roll(x, shift, -1), torch.roll(y, shift, -1))
    interior = slice(shift + 32, 224)  # away from the edges, where padding and the wrapped block differ
    same = m_shifted[..., interior] == m[..., interior.start - shift: interior.stop - shift]
    assert same.float().mean() > 0.95  # the same music, the same decisions (a frame may tip at the threshold)


def test_frame_gates_decide_whole_blocks_and_switch_only_at_their_edges():
    torch.manual_seed(0)
    x, y = torch.randn(2, 16, 200), torch.randn(2, 16, 200)  # 6 whole blocks of 32 frames and one of 8
    m, _, _ = AttentionMaskGenerator(16, hidden_dim=16, block_frames=32).eval()(x, y)
    switches = (m[:, 0, 1:] != m[:, 0, :-1]).nonzero()[:, 1] + 1
    assert len(switches) > 0 and (switches % 32 == 0).all()
    per_frame, _, _ = AttentionMaskGenerator(16, hidden_dim=16, block_frames=0).eval()(x, y)
    assert not ((per_frame[:, 0, 1:] != per_frame[:, 0, :-1]).nonzero()[:, 1] + 1).remainder(32).eq(0).all()
    with pytest.raises(SystemExit):
        parse_args(["--agent_block_frames", "-1"])


def test_checkpoints_from_before_blocks_decide_every_frame(tmp_path, pairs_dir):
    config = vars(tiny_args(tmp_path, pairs_dir, "--use_creative_agent", "true"))
    config["codec_dim"] = 32
    assert build_model(upgrade(config), 32).creative_agent.mask_generator.block_frames == 32
    del config["agent_block_frames"]
    assert build_model(upgrade(config), 32).creative_agent.mask_generator.block_frames == 0


def test_regularisation_prefers_decided_balanced_loud_switches_at_changes():
    gen = AttentionMaskGenerator(4, hidden_dim=8)
    t = 64
    loud_first = torch.cat([torch.full((1, 4, t // 2), 4.0), torch.full((1, 4, t // 2), 0.1)], -1)
    loud_last = loud_first.flip(-1)
    energy = (loud_first, loud_last)
    take_loud = torch.cat([torch.ones(1, 4, t // 2), torch.zeros(1, 4, t // 2)], -1)
    change = torch.zeros(1, t)
    change[0, t // 2] = 1.0  # the music changes in the middle
    loud = {k: v.item() for k, v in gen.regularization(take_loud, 1 - take_loud, Evidence(change, energy))[1].items()}
    quiet = {k: v.item() for k, v in gen.regularization(1 - take_loud, take_loud, Evidence(change, energy))[1].items()}
    assert loud["presence"] < quiet["presence"]
    assert loud["complementarity"] == loud["area"] == loud["share"] == loud["switching"] == 0.0
    assert loud["diversity"] == pytest.approx(0.0)
    half = torch.full_like(take_loud, 0.5)
    _, terms = gen.regularization(half, half, Evidence(change, energy))
    assert terms["complementarity"].item() == 0.25 and terms["diversity"].item() == 0.5
    wobbly = take_loud.clone()
    wobbly[..., 5:8] = 0.0  # three extra switches where nothing changes
    assert gen.regularization(wobbly, 1 - wobbly, Evidence(change, energy))[1]["switching"].item() > 0.0


def test_novelty_peaks_where_the_music_changes():
    torch.manual_seed(0)
    steady = torch.randn(1, 8, 100).sign() * (1 + 0.1 * torch.rand(1, 8, 100))  # signed coefficients, steady level
    z = steady * torch.cat([torch.full((50,), 0.1), torch.full((50,), 3.0)])  # quiet, then loud from frame 50
    n = novelty(z)
    assert n.shape == (1, 100) and n.max().item() == pytest.approx(1.0)
    assert 44 <= n.argmax().item() <= 56


def test_default_agent_arranges_both_songs(tmp_path, pairs_dir, capsys):
    """The default agent after a short run: both songs heard, decisions that change over time and between pairs."""
    args = tiny_args(tmp_path, pairs_dir, "--use_creative_agent", "true", "--num_epochs", "3")
    assert run(0, 1, 0, args) == 0
    with open(tmp_path / "logs" / "run" / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    # not a copy of either song (a copy scores >= 0.95 or <= 0.05). On 3 tiny synthetic validation pairs the share
    # swings with the songs' levels; the split holds the log-spectral distances to both songs level instead
    assert 0.1 <= last["input_share"] <= 0.9
    assert 0.67 < last["lsd_in_db"] / last["lsd_tgt_db"] < 1.5
    assert last["temporal_variation"] >= 0.15 and last["mask_variability"] > 0.05
    # decided sections; only the few frames of each switch's cross-fade are shared (their product is at most 0.25)
    assert last["complementarity"] >= 97.0 and last["coverage"] == pytest.approx(100.0)
    for key in ("lsd_in_db", "lsd_tgt_db"):
        assert last[key] > 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Epoch 3:")][0]
    assert re.search(r"Input share=0\.\d\d, Temporal var=0\.\d\d", line)
    assert os.path.getsize(tmp_path / "logs" / "run" / "training_curves.png") > 0
