"""Frozen audio codecs that turn waveforms [B, 1, S] into latents [B, D, T] and back, and latent normalisation.

The contract every codec keeps: `sample_rate`, `dim` (D), `hop_length` (samples per frame),
`encode(wave [B,1,S]) -> [B,D,T]` and `decode([B,D,T]) -> [B,1,S']` with S' >= S (callers crop to S).
Codecs are frozen: they hold no trainable parameters, but gradients flow through `decode`.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

CODECS = ("mdct", "encodec")
ENCODEC_NAME = "facebook/encodec_24khz"


def _check_wave(wave: torch.Tensor) -> None:
    if wave.dim() != 3 or wave.shape[1] != 1:
        raise ValueError(f"expected a waveform of shape [B, 1, S], got {tuple(wave.shape)}")


def mdct_window(length: int, kind: str = "sine") -> torch.Tensor:
    """A Princen-Bradley window of `length` = 2N samples: 'sine' or 'kbd' (Kaiser-Bessel derived, alpha 4)."""
    n = length // 2
    if kind == "sine":
        return torch.sin(math.pi * (torch.arange(length, dtype=torch.float64) + 0.5) / length)
    if kind == "kbd":
        kaiser = torch.kaiser_window(n + 1, periodic=False, beta=math.pi * 4.0, dtype=torch.float64)
        half = torch.sqrt(torch.cumsum(kaiser[:n], 0) / kaiser.sum())
        return torch.cat([half, half.flip(0)])
    raise ValueError(f"unknown MDCT window {kind!r}: expected 'sine' or 'kbd'")


class MDCTCodec(nn.Module):
    """Weight-free, critically sampled MDCT: D bins, hop D, perfect reconstruction by time-domain alias cancellation.

    With an orthonormal scale the lapped transform is orthogonal, so `encode` is one strided conv1d and
    `decode` is its transpose (conv_transpose1d with the same kernel): exact inverse, and differentiable.
    """

    def __init__(self, sample_rate: int = 24000, dim: int = 128, window: str = "sine"):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"MDCT dim must be an even number >= 2, got {dim}")
        self.sample_rate, self.dim, self.hop_length, self.window = sample_rate, dim, dim, window
        n = torch.arange(2 * dim, dtype=torch.float64)[:, None]
        k = torch.arange(dim, dtype=torch.float64)[None, :]
        basis = torch.cos(math.pi / dim * (n + 0.5 + dim / 2) * (k + 0.5)) * math.sqrt(2.0 / dim)
        kernel = (basis * mdct_window(2 * dim, window)[:, None]).T  # [D, 2D]
        self.register_buffer("kernel", kernel[:, None, :].float(), persistent=False)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def settings(self) -> dict:
        """What the latents depend on (the key of the latent cache)."""
        return dict(name="mdct", sample_rate=self.sample_rate, dim=self.dim, window=self.window)

    def num_frames(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.dim) + 1

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        _check_wave(wave)
        n = self.dim
        right = n + (-wave.shape[-1]) % n
        return F.conv1d(F.pad(wave, (n, right)), self.kernel.to(wave.dtype), stride=n)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.dim() != 3 or latent.shape[1] != self.dim:
            raise ValueError(f"expected MDCT latents of shape [B, {self.dim}, T], got {tuple(latent.shape)}")
        wave = F.conv_transpose1d(latent, self.kernel.to(latent.dtype), stride=self.dim)
        return wave[..., self.dim : -self.dim]


class EncodecCodec(nn.Module):
    """The 24 kHz EnCodec of `transformers`, frozen: continuous encoder output [B, 128, T] at 75 frames/s.

    The quantiser is skipped: the cascade works on the continuous embeddings the decoder reads.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        self.sample_rate = cfg.sampling_rate
        self.dim = cfg.hidden_size
        self.hop_length = int(math.prod(cfg.upsampling_ratios))

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def settings(self) -> dict:
        """What the latents depend on (the key of the latent cache)."""
        return dict(name="encodec", source=str(self.model.config._name_or_path), sample_rate=self.sample_rate,
                    dim=self.dim, weights=self.weights_fingerprint)

    @functools.cached_property
    def weights_fingerprint(self) -> str:
        """A hash of every weight: two EnCodec models (other weights, same folder name) never share a cache."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def num_frames(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.hop_length)

    def train(self, mode: bool = True) -> EncodecCodec:
        return super().train(False)  # frozen: always in eval mode

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        _check_wave(wave)
        return self.model.encoder(wave)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.dim() != 3 or latent.shape[1] != self.dim:
            raise ValueError(f"expected EnCodec latents of shape [B, {self.dim}, T], got {tuple(latent.shape)}")
        return self.model.decoder(latent)


class CodecUnavailable(RuntimeError):
    """The codec cannot be built here (missing weights or package); the message says how to fix it."""


ENCODEC_HELP = (
    "EnCodec weights were not found {where}. This project never downloads at run time. On a machine with internet:\n"
    "  pip install transformers\n"
    "  python -c \"from transformers import EncodecModel; "
    f"EncodecModel.from_pretrained('{ENCODEC_NAME}').save_pretrained('encodec_24khz')\"\n"
    "then copy the folder here and pass --codec_path encodec_24khz (or fill the Hugging Face cache, HF_HOME)."
)


def load_encodec(path: str | None = None) -> EncodecCodec:
    """EnCodec from a local folder or the local Hugging Face cache; one clear error if the weights are not there."""
    try:
        from transformers import EncodecModel
    except ImportError as err:
        raise CodecUnavailable("the encodec codec needs the optional package transformers: "
                           "pip install transformers") from err
    source = path or ENCODEC_NAME
    if path is not None and not os.path.isdir(path):
        raise CodecUnavailable(ENCODEC_HELP.format(where=f"at {path!r} (no such folder)"))
    try:
        model = EncodecModel.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise CodecUnavailable(ENCODEC_HELP.format(where=f"for {source!r} ({str(err).splitlines()[0]})")) from err
    return EncodecCodec(model)


def build_codec(name: str = "mdct", sample_rate: int = 24000, dim: int = 128, window: str = "sine",
                path: str | None = None) -> nn.Module:
    """The codec called `name`: 'mdct' (weight-free, default) or 'encodec' (local weights only)."""
    if name == "mdct":
        return MDCTCodec(sample_rate=sample_rate, dim=dim, window=window)
    if name == "encodec":
        if sample_rate != 24000:
            raise ValueError(f"the encodec codec runs at 24000 Hz, got sample_rate={sample_rate}")
        return load_encodec(path)
    raise ValueError(f"unknown codec {name!r}: expected one of {', '.join(CODECS)}")


class LatentNorm(nn.Module):
    """Per-channel mean and standard deviation of the latents, fitted on data, so the transformer sees unit scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, dim, 1))
        self.register_buffer("std", torch.ones(1, dim, 1))

    @torch.no_grad()
    def fit(self, total: torch.Tensor, total_sq: torch.Tensor, count: float) -> None:
        """Set the statistics from per-channel sums of x and x² over `count` cells (summed over ranks if need be)."""
        mean = total / count
        var = (total_sq / count - mean**2).clamp_min(0)
        std = var.sqrt()
        std = std.clamp_min(1e-4 * float(std.max()) + 1e-12)  # silent channels: no division by zero
        self.mean.copy_(mean.view(1, -1, 1))
        self.std.copy_(std.view(1, -1, 1))

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.mean) / self.std

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.std + self.mean


def latent_sums(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel sum of x and x² of a [B, D, T] batch, and its cell count per channel, in float64."""
    x = latent.detach().double()
    return x.sum(dim=(0, 2)), (x * x).sum(dim=(0, 2)), float(x.shape[0] * x.shape[2])
