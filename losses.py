"""Waveform and spectral reconstruction losses, the combined loss against input and target, and mask metrics.
(What a listener hears, measured from the output audio, is in listening.py.)"""
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


def spectral_distance(mag_out: torch.Tensor, mag_ref: torch.Tensor) -> torch.Tensor:
    """Spectral convergence + mean absolute log-magnitude difference of two magnitude spectrograms."""
    convergence = torch.linalg.norm(mag_ref - mag_out) / (torch.linalg.norm(mag_ref) + 1e-7)
    return convergence + (torch.log(mag_out + 1e-7) - torch.log(mag_ref + 1e-7)).abs().mean()


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


def mel_distance(mag_out: torch.Tensor, mag_ref: torch.Tensor, sample_rate: int, n_mels: int = 64) -> torch.Tensor:
    """Mean absolute difference of the log-mel spectrograms of two magnitude spectrograms."""
    fb = mel_filterbank(sample_rate, 2 * (mag_out.shape[-2] - 1), n_mels, mag_out.device)
    return (torch.log(fb @ mag_out + 1e-5) - torch.log(fb @ mag_ref + 1e-5)).abs().mean()


DEFAULT_LOSS_WEIGHTS = dict(wave_input=1.0, wave_target=1.0, stft_input=1.0, stft_target=1.0,
                            mel_input=0.0, mel_target=0.0, far_lsd=1.0)


def reconstruction_loss(output: torch.Tensor, input_wave: torch.Tensor, target_wave: torch.Tensor,
                        sample_rate: int, weights: dict[str, float] | None = None,
                        balance: torch.Tensor | None = None):
    """Weighted sum of waveform (RMS), multi-resolution STFT and log-mel losses against input and target, and the
    log-spectral distance to the farther of the two (`far_lsd`, see farther_song_loss). Given the wanted input
    share `balance` [B], far_lsd weighs the distance to the input by 2 x balance and to the target by
    2 x (1 - balance), so that the output stays nearer the song it should hold more of.

    Returns (total, terms) where terms maps each weighted term's name to its unweighted, detached value. The songs
    are data: their spectra are taken without a graph, so no gradient flows into them through the spectral terms.
    """
    weights = {**DEFAULT_LOSS_WEIGHTS, **(weights or {})}
    unknown = set(weights) - set(DEFAULT_LOSS_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown loss weights {sorted(unknown)}: expected names from {tuple(DEFAULT_LOSS_WEIGHTS)}")
    for reference in (input_wave, target_wave):
        _check_pair(output, reference)
    # one STFT per resolution for the output and one, without a graph, for both songs; every spectral term reads them
    resolutions = set(STFT_RESOLUTIONS) if weights["stft_input"] or weights["stft_target"] else set()
    if weights["far_lsd"] or weights["mel_input"] or weights["mel_target"]:
        resolutions.add((1024, 256))
    with torch.no_grad():
        songs = torch.cat([input_wave, target_wave])
        song_mags = {res: magnitude(songs, *res).chunk(2) for res in resolutions}
    mags = {res: (magnitude(output, *res), *song_mags[res]) for res in resolutions}

    def term(name: str) -> torch.Tensor:
        if name == "far_lsd":
            out, inp, tgt = mags[(1024, 256)]
            to_in, to_tgt = (lsd_of_magnitudes(out, m).view(output.shape[0], -1) for m in (inp, tgt))
            if balance is not None:
                b = balance.float().view(-1, 1)
                to_in, to_tgt = 2 * b * to_in, 2 * (1 - b) * to_tgt
            return torch.maximum(to_in, to_tgt).mean()
        kind, source = name.split("_")
        k = 1 if source == "input" else 2
        if kind == "wave":
            return rms_loss(output, (input_wave, target_wave)[k - 1])
        if kind == "stft":
            return sum(spectral_distance(mags[r][0], mags[r][k]) for r in STFT_RESOLUTIONS) / len(STFT_RESOLUTIONS)
        return mel_distance(mags[(1024, 256)][0], mags[(1024, 256)][k], sample_rate)

    total, terms = output.new_zeros(()), {}
    for name, weight in weights.items():
        if weight:
            value = term(name)
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


DB_PER_NEPER = 20.0 / math.log(10.0)
HEARD_RANGE_DB = 80.0  # the log-spectral distance counts cells within this many dB of the loudest (librosa's top_db)


def lsd_per_example(output: torch.Tensor, reference: torch.Tensor, n_fft: int = 1024, hop: int = 256):
    """Log-spectral distance [B] in nepers (dB / 8.69): RMS over frequency of the log-magnitude difference,
    averaged over frames. Differentiable, so it serves as a loss as well as a metric."""
    _check_pair(output, reference)
    return lsd_of_magnitudes(magnitude(output, n_fft, hop), magnitude(reference, n_fft, hop)).view(
        output.shape[0], -1).mean(dim=-1)


def lsd_of_magnitudes(mag_out: torch.Tensor, mag_ref: torch.Tensor) -> torch.Tensor:
    """Log-spectral distance [N] (nepers) of magnitude spectrograms [N, F, frames] over what is heard: every cell
    raised to HEARD_RANGE_DB below the louder spectrogram's loudest cell (as librosa's top_db), then the RMS over
    frequency of the log-magnitude difference, averaged over frames. Without the floor (1e-5 alone: 140 dB below a
    song's loudest cell), cells far below the music counted as much as the notes: a target shifted down 4 semitones
    (empty above 9.5 kHz, -94 dB there against the song's -25) was 34 dB from the input it was shifted to, 16 dB
    with the floor. What lies under the floor has no gradient: training is not asked to match what is not heard."""
    log_out, log_ref = torch.log(mag_out + 1e-5), torch.log(mag_ref + 1e-5)
    peak = torch.maximum(log_out.detach().flatten(1).amax(dim=1), log_ref.detach().flatten(1).amax(dim=1))
    floor = (peak - HEARD_RANGE_DB / DB_PER_NEPER).view(-1, 1, 1)
    diff = log_out.maximum(floor) - log_ref.maximum(floor)
    return (diff.square().mean(dim=-2) + 1e-8).sqrt().mean(dim=-1)


def farther_song_loss(output: torch.Tensor, input_wave: torch.Tensor, target_wave: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the log-spectral distance to the farther of the two songs (nepers).

    Copying one song scores the full distance between the songs; an arrangement heard as both scores about half,
    so this term cannot be met by a copy. Because the distance is an average over frames of a per-frame RMS,
    taking whole frames from one song or the other costs less than mixing every frame (the square root is concave):
    it rewards decisions over time.
    """
    return torch.maximum(lsd_per_example(output, input_wave), lsd_per_example(output, target_wave)).mean()


@torch.no_grad()
def temporal_variation(input_mask: torch.Tensor) -> torch.Tensor:
    """Per example [B]: the mean over channels of the standard deviation over time of the input mask [B, D, T].
    0 for a mask that never changes over time, 0.5 for an even 0/1 alternation (the temporal baseline)."""
    return input_mask.float().std(dim=-1, unbiased=False).mean(dim=-1)


@torch.no_grad()
def mask_variability(input_masks: torch.Tensor) -> float:
    """How much the input masks [N, D, T] differ from pair to pair: the mean over cells of their std across pairs
    (0: one pattern for every pair)."""
    return float(input_masks.float().std(dim=0, unbiased=False).mean()) if len(input_masks) > 1 else 0.0
