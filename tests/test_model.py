"""The creative agent, fixed masks, the cascade transformer, the codecs and the losses."""
import math

import pytest
import torch

from audio_codec import CodecUnavailable, LatentNorm, MDCTCodec, build_codec, latent_sums
from creative_agent import AttentionMaskGenerator, CreativeAgent, StyleDiscriminator, count_parameters
from fixed_masks import Rule, make_fixed_masks
from losses import (
    STFT_RESOLUTIONS,
    farther_song_loss,
    magnitude,
    mask_metrics,
    mel_distance,
    reconstruction_loss,
    rms_loss,
    spectral_distance,
)
from model_simple_transformer import SimpleTransformer
from records import Conditions


def stft_loss(output: torch.Tensor, reference: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Spectral convergence + mean absolute log-magnitude difference at one resolution, a term at a time."""
    return spectral_distance(magnitude(output, n_fft, hop), magnitude(reference, n_fft, hop))


def multi_resolution_stft_loss(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The mean of stft_loss over the loss's resolutions, one term at a time, to check the combined loss against."""
    return sum(stft_loss(output, reference, n, h) for n, h in STFT_RESOLUTIONS) / len(STFT_RESOLUTIONS)


def log_mel_loss(output: torch.Tensor, reference: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """The log-mel term alone (n_fft 1024, hop 256), likewise."""
    return mel_distance(magnitude(output, 1024, 256), magnitude(reference, 1024, 256), sample_rate)

D, T = 32, 40


def latents(b=2, d=D, t=T):
    return torch.randn(b, d, t), torch.randn(b, d, t)


def test_mask_generator_unpacking_shapes_and_range():
    x, y = latents()
    input_mask, target_mask, reg_loss = AttentionMaskGenerator(D, hidden_dim=64)(x, y)
    assert input_mask.shape == target_mask.shape == (2, D, T)
    for m in (input_mask, target_mask):
        assert m.min() >= 0 and m.max() <= 1
    assert reg_loss.dim() == 0 and torch.isfinite(reg_loss)


def test_reg_terms_are_logged_and_weighted():
    gen = AttentionMaskGenerator(D, hidden_dim=64, complementarity_weight=2.0, area_weight=0.0,
                                 diversity_weight=0.0, switching_weight=0.0, presence_weight=0.0, share_weight=0.0,
                                 gates="cell")
    masks = gen(*latents())
    m_in, m_tgt, reg = masks
    assert set(masks.terms) == {"complementarity", "area", "diversity", "switching", "presence", "share", "layering"}
    assert reg.item() == pytest.approx(2.0 * (m_in * m_tgt).mean().item(), rel=1e-5)
    assert masks.terms["area"].requires_grad  # the trainer's --balance_loss_weight trains through it


def test_untrained_masks_sit_near_75_and_100_percent():
    torch.manual_seed(0)
    m_in, m_tgt, _ = AttentionMaskGenerator(128, gates="cell")(*latents(d=128, t=100))
    metrics = mask_metrics(m_in, m_tgt)
    assert 65 < metrics["complementarity"] < 85
    assert metrics["coverage"] == pytest.approx(100.0)  # a softmax over the two songs shares out every cell
    assert 0.4 < metrics["balance"] < 0.6


def test_frame_gates_are_decided_per_frame_for_every_channel():
    torch.manual_seed(0)
    m_in, m_tgt, _ = AttentionMaskGenerator(128)(*latents(d=128, t=100))
    assert set(m_in.unique().tolist()) <= {0.0, 1.0} and torch.equal(m_in + m_tgt, torch.ones_like(m_in))
    assert torch.equal(m_in, m_in[:, :1].expand_as(m_in))  # one decision per frame
    assert mask_metrics(m_in, m_tgt)["complementarity"] == 100.0


def test_creative_agent_masks_hard_and_one_discriminator():
    agent = CreativeAgent(D, hidden_dim=64)
    x, y = latents()
    masked_x, masked_y, reg = agent.generate_creative_masks(x, y, hard=True)
    _, masks = agent(x, y, Conditions(hard=True))
    m_in, m_tgt = masks.input, masks.target
    assert set(m_in.unique().tolist()) <= {0.0, 1.0} and torch.equal(m_in + m_tgt, torch.ones_like(m_in))
    assert torch.equal(masked_x, x * m_in)
    real_fake, style = agent.discriminator(masked_x)
    assert real_fake.shape == style.shape == (2, 1)
    with pytest.raises(ValueError, match="at least 4 frames"):
        StyleDiscriminator(D, 64)(x[..., :3])
    model = SimpleTransformer(D, nhead=2, num_layers=1, use_creative_agent=True, agent_hidden_dim=32)
    assert model.creative_agent.discriminator is None  # training's is the objective's, with its own optimiser
    assert not any("discriminator" in name for name in model.state_dict())  # checkpoints keep their layout


@pytest.mark.parametrize("mask_type", ["temporal", "frequency", "energy"])
def test_fixed_masks_are_complementary(mask_type):
    x, y = latents()
    m_in, m_tgt = make_fixed_masks(Rule(mask_type, segment_frames=8), x, y)
    assert m_in.shape == m_tgt.shape == x.shape
    torch.testing.assert_close(m_in + m_tgt, torch.ones_like(x))
    assert 0.3 < m_in.mean() < 0.7


def test_fixed_mask_rules():
    x, y = latents()
    m_in, _ = make_fixed_masks(Rule("temporal", segment_frames=8), x, y)
    assert m_in[0, 0, :8].eq(1).all() and m_in[0, 0, 8:16].eq(0).all()
    m_in, _ = make_fixed_masks(Rule("frequency", split=0.25), x, y)
    assert m_in[0, :8].eq(1).all() and m_in[0, 8:].eq(0).all()
    y = torch.zeros_like(x)
    m_in, _ = make_fixed_masks("energy", x, y)
    assert m_in[x.abs() > 0.1].min() > 0.99
    ones = make_fixed_masks("none", x, y)
    assert all(m.eq(1).all() for m in ones)


def test_unknown_mask_type_and_codec_are_value_errors():
    with pytest.raises(ValueError, match="temporal"):
        make_fixed_masks("stripes", *latents())
    with pytest.raises(ValueError, match="expected one of"):
        SimpleTransformer(D, mask_type="stripes")
    with pytest.raises(ValueError, match="mdct"):
        build_codec("wavenet")
    with pytest.raises(ValueError, match=r"\[B, 1, S\]"):
        MDCTCodec().encode(torch.randn(2, 100))
    with pytest.raises(ValueError, match=r"\[B, 128, T\]"):
        MDCTCodec().decode(torch.randn(2, 64, 10))


def tiny_model(**kw):
    return SimpleTransformer(D, nhead=2, num_layers=1, dropout=0.0, agent_hidden_dim=32, **kw)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_model_unpacking_and_stages(stages):
    model = tiny_model(num_stages=stages)
    out, reg = model(*latents())
    assert out.shape == (2, D, T) and reg is None
    assert len(model.stages) == stages


def test_default_widths_and_size():
    model = SimpleTransformer()
    assert [s.proj_in.out_features for s in model.stages] == [256, 384]
    assert 14e6 < count_parameters(model) < 18e6


def test_gradients_reach_agent_and_every_stage():
    model = tiny_model(num_stages=3, use_creative_agent=True)
    for stage in model.stages:  # zero-initialised outputs would block gradients to the rest of the stage
        torch.nn.init.normal_(stage.proj_out.weight, std=0.02)
    mix = model(*latents())
    out, reg = mix
    (out.square().mean() + reg).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    assert mix.masks[0].shape == (2, D, T) and not mix.masks[0].requires_grad


def test_bad_shapes_are_value_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[B, 32, T\]"):
        model(torch.randn(2, 16, T), torch.randn(2, 16, T))
    with pytest.raises(ValueError, match="must match"):
        model(torch.randn(2, D, T), torch.randn(2, D, T + 1))
    with pytest.raises(ValueError, match=r"\[B, 32, T\]"):
        model(torch.randn(D, T), torch.randn(D, T))


def test_anti_cheating_noise_only_in_training():
    model = tiny_model(anti_cheating=0.5)
    for stage in model.stages:
        torch.nn.init.normal_(stage.proj_out.weight, std=0.1)
    x, y = latents()
    model.eval()
    torch.testing.assert_close(model(x, y).output, model(x, y).output)
    model.train()
    assert not torch.allclose(model(x, y).output, model(x, y).output)


def test_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny_model(mask_type="temporal")
    x, y = latents(b=2, t=24)
    goal = torch.randn(2, D, 24)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = (model(x, y).output - goal).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10


@pytest.mark.parametrize("window", ["sine", "kbd"])
def test_mdct_perfect_reconstruction(window):
    codec = MDCTCodec(sample_rate=24000, dim=128, window=window)
    x = torch.randn(2, 1, 24000 + 77)
    z = codec.encode(x)
    assert z.shape == (2, 128, codec.num_frames(x.shape[-1]))
    y = codec.decode(z)[..., : x.shape[-1]]
    err = (y - x)[..., 256:-256]
    snr = 10 * torch.log10(x[..., 256:-256].square().mean() / err.square().mean())
    assert snr > 80
    assert codec.hop_length == 128 and codec.frame_rate == 187.5


def test_mdct_decode_is_differentiable():
    codec = MDCTCodec(dim=32)
    z = torch.randn(1, 32, 20, requires_grad=True)
    codec.decode(z).square().sum().backward()
    assert z.grad.abs().sum() > 0
    assert not list(codec.parameters())


def test_latent_norm_gives_unit_scale_and_restores():
    z = torch.randn(4, D, 100) * torch.linspace(0.01, 10, D)[None, :, None] + 3.0
    norm = LatentNorm(D)
    norm.fit(*latent_sums(z))
    n = norm.normalize(z)
    torch.testing.assert_close(n.mean(dim=(0, 2)), torch.zeros(D), atol=1e-4, rtol=0)
    torch.testing.assert_close(n.std(dim=(0, 2)), torch.ones(D), atol=1e-2, rtol=0)
    torch.testing.assert_close(norm.denormalize(n), z, atol=1e-4, rtol=1e-4)
    again = LatentNorm(D)
    again.load_state_dict(norm.state_dict())
    torch.testing.assert_close(again.normalize(z), n)


def test_encodec_random_weights_shapes_and_frame_rate():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")
    from audio_codec import EncodecCodec

    codec = EncodecCodec(transformers.EncodecModel(transformers.EncodecConfig()))
    assert codec.dim == 128 and codec.sample_rate == 24000 and codec.frame_rate == 75
    wave = torch.randn(1, 1, 24000)
    z = codec.encode(wave)
    assert z.shape == (1, 128, 75) == (1, 128, codec.num_frames(24000))
    z.requires_grad_(True)
    out = codec.decode(z)
    assert out.shape == (1, 1, 24000)
    out.square().mean().backward()
    assert z.grad.abs().sum() > 0 and not any(p.requires_grad for p in codec.parameters())


def test_encodec_missing_weights_message(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")
    with pytest.raises(CodecUnavailable, match="save_pretrained"):
        build_codec("encodec", path=str(tmp_path / "nowhere"))


def test_losses_against_hand_checked_values():
    out, ref = torch.zeros(1, 1, 4), torch.tensor([[[1.0, -1.0, 1.0, -1.0]]])
    assert rms_loss(out, ref).item() == pytest.approx(1.0)
    assert rms_loss(ref * 0.5, ref).item() == pytest.approx(0.5)
    wave = torch.randn(1, 1, 4096)
    assert stft_loss(wave, wave, 512, 128).item() == pytest.approx(0.0, abs=1e-6)
    # twice the amplitude: spectral convergence 1, log magnitude ln 2
    assert stft_loss(2 * wave, wave, 512, 128).item() == pytest.approx(1.0 + math.log(2), rel=1e-3)
    assert multi_resolution_stft_loss(2 * wave, wave).item() == pytest.approx(1.0 + math.log(2), rel=1e-3)
    assert log_mel_loss(2 * wave, wave, 8000).item() == pytest.approx(math.log(2), rel=1e-2)


def test_reconstruction_loss_weights_against_input_and_target():
    x, y = torch.randn(1, 1, 4096), torch.randn(1, 1, 4096)
    total, terms = reconstruction_loss(x, x, y, 8000, dict(wave_input=1, wave_target=2, stft_input=0,
                                                           stft_target=0, far_lsd=0))
    assert terms["wave_input"].item() == pytest.approx(0.0, abs=1e-5)
    assert total.item() == pytest.approx(2 * rms_loss(x, y).item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss weights"):
        reconstruction_loss(x, x, y, 8000, dict(wave=1))


def test_reconstruction_loss_shares_its_spectra_without_changing_value_or_gradient():
    """The combined loss takes each STFT once (the songs' without a graph): its value and its gradient are those of
    the separate loss functions summed."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 8192), torch.randn(2, 1, 8192)
    out = (0.5 * x + 0.5 * y).requires_grad_(True)
    total, _ = reconstruction_loss(out, x, y, 8000, dict(mel_input=1.0, mel_target=1.0))
    grad, = torch.autograd.grad(total, out)
    separate = sum(rms_loss(out, s) + multi_resolution_stft_loss(out, s) + log_mel_loss(out, s, 8000) for s in (x, y))
    separate = separate + farther_song_loss(out, x, y)
    expected, = torch.autograd.grad(separate, out)
    assert total.item() == pytest.approx(separate.item(), rel=1e-5)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_mask_metrics_definitions():
    half = torch.full((1, 2, 3), 0.5)
    assert mask_metrics(half, half) == {"complementarity": 75.0, "coverage": 100.0, "balance": 0.5}
    m = torch.tensor([[[1.0, 0.0]]])
    assert mask_metrics(m, 1 - m) == {"complementarity": 100.0, "coverage": 100.0, "balance": 0.5}


def test_the_model_and_a_rule_share_one_interface():
    """Arranging uses a model and a rule alike (fixed_masks.Mixer): both give a Mix under the same Conditions."""
    from fixed_masks import Mixer, RuleMix
    from records import Conditions, Mix

    x, y = latents()
    sections = (torch.arange(T) // 10).expand(2, -1)
    for mixer in (tiny_model(use_creative_agent=True), RuleMix("temporal")):
        assert isinstance(mixer, Mixer)
        mix = mixer(x, y, Conditions(sections=sections))
        assert isinstance(mix, Mix) and mix.output.shape == x.shape and mix.masks[0].shape == x.shape
