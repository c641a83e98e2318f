"""The layers of a song in a spectral latent: rhythm (percussive) and harmony (harmonic: chords, melody), by
harmonic–percussive separation with median filters (Fitzgerald 2010, as librosa's `hpss` does on an STFT).

The MDCT latent [B, D, T] is a time–frequency picture of the song (D bins, a frame every hop). Sustained partials
are horizontal lines in it, drum hits vertical ones: a median over time keeps the first, a median over frequency the
second, and soft masks from the two share every cell out between the layers, so the layers always sum back to the
latent (and, the codec being linear, their decoded waves to the song). Computed on the device where the latent is,
in every forward: no cache, no data-loader work. EnCodec's latent is not a time–frequency picture, so layering
needs the MDCT codec.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LAYERS = ("rhythm", "harmony")
TIME_FRAMES = 17  # median over time: 0.09 s at the MDCT's 187.5 frames/s keeps what is sustained (harmony)
BINS = 9  # median over frequency: 0.85 kHz at 94 Hz a bin keeps what is broadband (rhythm)
STEMS_ONLY_LAYERED = "rhythm stems are the layers of the layering agent (--agent layered) only"


def median_filter(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Running median of `x` over `size` (odd) neighbours along `dim`, edges reflected."""
    x = x.movedim(dim, -1)
    pad = min(size // 2, x.shape[-1] - 1)
    padded = F.pad(x.reshape(-1, 1, x.shape[-1]), (pad, pad), mode="reflect").reshape(*x.shape[:-1], -1)
    return padded.unfold(-1, 2 * pad + 1, 1).median(dim=-1).values.movedim(-1, dim)


@torch.no_grad()
def harmony_mask(latent: torch.Tensor, time_frames: int = TIME_FRAMES, bins: int = BINS) -> torch.Tensor:
    """[B, D, T] in [0, 1]: each cell's harmonic share, a soft (Wiener) mask from the two median-filtered
    magnitudes; 1 minus it is the cell's rhythmic share. Analysis: no gradient."""
    magnitude = latent.detach().float().abs()
    harmonic = median_filter(magnitude, time_frames, -1).square()
    percussive = median_filter(magnitude, bins, -2).square()
    total = harmonic + percussive
    return torch.where(total > 0, harmonic / total.clamp_min(1e-30), 0.5).to(latent.dtype)


def split_layers(latent: torch.Tensor) -> torch.Tensor:
    """[B, D, T] -> [B, 2, D, T]: the rhythm and harmony layers of a spectral latent, which sum to it exactly."""
    harmony = latent * harmony_mask(latent)
    return torch.stack([latent - harmony, harmony], dim=1)
