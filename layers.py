"""The layers of a song in a spectral latent: rhythm (the drums and the bass) and harmony (chords, melody), by
harmonic–percussive separation with median filters (Fitzgerald 2010, as librosa's `hpss` does on an STFT) and a
bass band: the percussive part and everything below BASS_HZ are the rhythm, the harmonic part above it the harmony,
as a separator's stems give them (RHYTHM_STEMS: drums and bass, which arrange.py and make_pairs.py take instead).

The MDCT latent [B, D, T] is a time–frequency picture of the song (D bins, a frame every hop). Sustained partials
are horizontal lines in it, drum hits vertical ones: a median over time keeps the first, a median over frequency the
second, and soft masks from the two share every cell out between the layers (the rows of the bass go wholly to the
rhythm), so the layers always sum back to the latent (and, the codec being linear, their decoded waves to the
song). Computed on the device where the latent is, in every forward: no cache, no data-loader work. EnCodec's latent
is not a time–frequency picture, so layering needs the MDCT codec.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

LAYERS = ("rhythm", "harmony")
TIME_FRAMES = 17  # median over time: 0.09 s at the MDCT's 187.5 frames/s keeps what is sustained (harmony)
BINS = 9  # median over frequency: 0.85 kHz at 94 Hz a bin keeps what is broadband (rhythm)
# the bass joins the drums in the rhythm layer (the rhythm section): the drums alone are too little of a song to be
# heard under the other song's harmony (docs/results.md, "Layered arrangements: the bass in the rhythm")
BASS_HZ = 200.0
RHYTHM_STEMS = ("drums", "bass")  # of a separator's stems (Demucs: drums, bass, other, vocals), the rhythm layer
STEMS_ONLY_LAYERED = "rhythm stems are the layers of the layering agent (--agent layered) only"


def median_filter(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Running median of `x` over `size` (odd) neighbours along `dim`, edges reflected."""
    x = x.movedim(dim, -1)
    pad = min(size // 2, x.shape[-1] - 1)
    padded = F.pad(x.reshape(-1, 1, x.shape[-1]), (pad, pad), mode="reflect").reshape(*x.shape[:-1], -1)
    return padded.unfold(-1, 2 * pad + 1, 1).median(dim=-1).values.movedim(-1, dim)


def bass_rows(hz_per_row: float, bass_hz: float = BASS_HZ) -> int:
    """How many of a spectrum's lowest rows, `hz_per_row` apart, lie below `bass_hz`: the bass."""
    return int(bass_hz // hz_per_row)


@torch.no_grad()
def harmony_mask(latent: torch.Tensor, time_frames: int = TIME_FRAMES, bins: int = BINS,
                 bass: int = 0) -> torch.Tensor:
    """[B, D, T] in [0, 1]: each cell's harmonic share, a soft (Wiener) mask from the two median-filtered
    magnitudes, 0 in the `bass` lowest rows (they belong to the rhythm); 1 minus it is the cell's rhythmic share.
    Analysis: no gradient."""
    magnitude = latent.detach().float().abs()
    harmonic = median_filter(magnitude, time_frames, -1).square()
    magnitude[..., :bass, :] = 0.0  # a loud bass in the median over frequency made the chords above it percussive
    percussive = median_filter(magnitude, bins, -2).square()
    total = harmonic + percussive
    mask = torch.where(total > 0, harmonic / total.clamp_min(1e-30), 0.5)
    mask[..., :bass, :] = 0.0
    return mask.to(latent.dtype)


def split_layers(latent: torch.Tensor, bass: int = 0) -> torch.Tensor:
    """[B, D, T] -> [B, 2, D, T]: the rhythm (with the `bass` lowest rows) and harmony layers of a spectral latent,
    which sum to it exactly."""
    harmony = latent * harmony_mask(latent, bass=bass)
    return torch.stack([latent - harmony, harmony], dim=1)


def rhythm_stem_files(folder: str) -> list[str]:
    """The drums and bass files in a stem separator's output folder for one song (as Demucs writes one: drums,
    bass, other, vocals, in any format soundfile reads). Their sum is the song's rhythm layer and the song minus it
    the harmony, so whatever the separator left out stays in the harmony. ValueError when it has neither."""
    names = {os.path.splitext(f)[0].lower(): f for f in sorted(os.listdir(folder))}
    found = [os.path.join(folder, names[stem]) for stem in RHYTHM_STEMS if stem in names]
    if not found:
        raise ValueError(f"no {' or '.join(RHYTHM_STEMS)} stem (a separator's output folder, with files such as "
                         f"drums.wav and bass.wav, is expected)")
    return found
