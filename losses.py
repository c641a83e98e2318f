"""Waveform and spectral reconstruction losses, the combined loss against input and target, and mask metrics."""
from __future__ import annotations

import math

import torch

STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop)


def _check_pair(output: torch.Tensor, reference: torch.Tensor) -> None:
    if output.shape != reference.shape:
        raise ValueError(f"output and reference must have the same shape, got {tuple(output.shape)} "
                         f"and {tuple(reference.shape)}")


def rms_loss(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Root mean square of the difference."""
    _check_pair(output, reference)
    return (output - reference).square().mean().add(1e-12).sqrt()


def magnitude(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """|STFT| of [B, 1, S] or [B, S] waveforms -> [B, F, frames] (Hann window, centred)."""
    window = torch.hann_window(n_fft, device=wave.device, dtype=torch.float32)
    spec = torch.stft(wave.reshape(-1, wave.shape[-1]).float(), n_fft, hop, window=window, return_complex=True)
    return spec.abs()


def stft_loss(output: torch.Tensor, reference: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Spectral convergence + mean absolute log-magnitude difference at one resolution."""
    _check_pair(output, reference)
    mag_out, mag_ref = magnitude(output, n_fft, hop), magnitude(reference, n_fft, hop)
    convergence = torch.linalg.norm(mag_ref - mag_out) / (torch.linalg.norm(mag_ref) + 1e-7)
    log_mag = (torch.log(mag_out + 1e-7) - torch.log(mag_ref + 1e-7)).abs().mean()
    return convergence + log_mag


def multi_resolution_stft_loss(output: torch.Tensor, reference: torch.Tensor,
                               resolutions=STFT_RESOLUTIONS) -> torch.Tensor:
    """Mean of `stft_loss` over several (n_fft, hop) resolutions."""
    return sum(stft_loss(output, reference, n, h) for n, h in resolutions) / len(resolutions)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, device=None) -> torch.Tensor:
    """Triangular HTK-mel filters [n_mels, n_fft // 2 + 1] from 0 Hz to Nyquist."""
    def to_mel(hz):
        return 2595.0 * math.log10(1.0 + hz / 700.0)

    mels = torch.linspace(0.0, to_mel(sample_rate / 2), n_mels + 2, device=device)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, device=device)
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def log_mel_loss(output: torch.Tensor, reference: torch.Tensor, sample_rate: int,
                 n_fft: int = 1024, hop: int = 256, n_mels: int = 64) -> torch.Tensor:
    """Mean absolute difference of log-mel spectrograms."""
    _check_pair(output, reference)
    fb = mel_filterbank(sample_rate, n_fft, n_mels, output.device)
    mel_out = fb @ magnitude(output, n_fft, hop)
    mel_ref = fb @ magnitude(reference, n_fft, hop)
    return (torch.log(mel_out + 1e-5) - torch.log(mel_ref + 1e-5)).abs().mean()


LOSS_WEIGHT_NAMES = ("wave_input", "wave_target", "stft_input", "stft_target", "mel_input", "mel_target")
DEFAULT_LOSS_WEIGHTS = dict(wave_input=1.0, wave_target=1.0, stft_input=1.0, stft_target=1.0,
                            mel_input=0.0, mel_target=0.0)


def reconstruction_loss(output: torch.Tensor, input_wave: torch.Tensor, target_wave: torch.Tensor,
                        sample_rate: int, weights: dict[str, float] | None = None):
    """Weighted sum of waveform (RMS), multi-resolution STFT and log-mel losses against input and target.

    Returns (total, terms) where terms maps each weighted term's name to its unweighted, detached value.
    """
    weights = {**DEFAULT_LOSS_WEIGHTS, **(weights or {})}
    unknown = set(weights) - set(LOSS_WEIGHT_NAMES)
    if unknown:
        raise ValueError(f"unknown loss weights {sorted(unknown)}: expected names from {LOSS_WEIGHT_NAMES}")
    fns = {"wave": rms_loss, "stft": multi_resolution_stft_loss,
           "mel": lambda o, r: log_mel_loss(o, r, sample_rate)}
    total, terms = output.new_zeros(()), {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        kind, source = name.split("_")
        value = fns[kind](output, input_wave if source == "input" else target_wave)
        terms[name] = value.detach()
        total = total + weight * value
    return total, terms


@torch.no_grad()
def mask_metrics(input_mask: torch.Tensor, target_mask: torch.Tensor) -> dict[str, float]:
    """Complementarity % = (1 - mean(m_in*m_tgt))*100, coverage % = mean(m_in+m_tgt)*100,
    balance = mean(m_in) / mean(m_in+m_tgt)."""
    m_in, m_tgt = input_mask.float(), target_mask.float()
    total = (m_in + m_tgt).mean()
    return {
        "complementarity": float((1.0 - (m_in * m_tgt).mean()) * 100.0),
        "coverage": float(total * 100.0),
        "balance": float(m_in.mean() / total.clamp_min(1e-12)),
    }


@torch.no_grad()
def log_spectral_distance(output: torch.Tensor, reference: torch.Tensor, n_fft: int = 1024, hop: int = 256):
    """Log-spectral distance in dB: RMS over frequency of the dB difference, averaged over frames and batch."""
    _check_pair(output, reference)
    db_out = 20 * torch.log10(magnitude(output, n_fft, hop) + 1e-5)
    db_ref = 20 * torch.log10(magnitude(reference, n_fft, hop) + 1e-5)
    return (db_out - db_ref).square().mean(dim=-2).sqrt().mean()
