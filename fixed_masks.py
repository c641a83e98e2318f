"""Rule-based masks, the baselines the creative agent must beat. Each returns (input_mask, target_mask), [B, D, T].

- none:      both masks are 1 (the plain sum of both songs, no masking)
- temporal:  alternating time segments of `segment_frames` frames: input, target, input, ...
- frequency: channels below `split` * D from the input, the rest from the target
- energy:    each cell goes to the source with more energy there, softly: m_in = e_in / (e_in + e_tgt)
The complementary ones (all but none) sum to 1 everywhere.
"""
from __future__ import annotations

import torch

MASK_TYPES = ("none", "temporal", "frequency", "energy")


def temporal_masks(x: torch.Tensor, segment_frames: int = 32):
    b, d, t = x.shape
    segment = (torch.arange(t, device=x.device) // max(1, segment_frames)) % 2
    input_mask = (segment == 0).to(x.dtype).expand(b, d, t)
    return input_mask, 1.0 - input_mask


def frequency_masks(x: torch.Tensor, split: float = 0.5):
    b, d, t = x.shape
    input_mask = (torch.arange(d, device=x.device) < round(split * d)).to(x.dtype)[None, :, None].expand(b, d, t)
    return input_mask, 1.0 - input_mask


def energy_masks(encoded_input: torch.Tensor, encoded_target: torch.Tensor, eps: float = 1e-8):
    e_in, e_tgt = encoded_input.square(), encoded_target.square()
    input_mask = (e_in + 0.5 * eps) / (e_in + e_tgt + eps)
    return input_mask, 1.0 - input_mask


def make_fixed_masks(mask_type: str, encoded_input: torch.Tensor, encoded_target: torch.Tensor,
                     segment_frames: int = 32, split: float = 0.5):
    """The (input_mask, target_mask) of rule `mask_type` for latents [B, D, T]."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask type {mask_type!r}: expected one of {', '.join(MASK_TYPES)}")
    if encoded_input.shape != encoded_target.shape or encoded_input.dim() != 3:
        raise ValueError(f"expected two latents of the same shape [B, D, T], got {tuple(encoded_input.shape)} "
                         f"and {tuple(encoded_target.shape)}")
    if mask_type == "none":
        ones = torch.ones_like(encoded_input)
        return ones, ones
    if mask_type == "temporal":
        return temporal_masks(encoded_input, segment_frames)
    if mask_type == "frequency":
        return frequency_masks(encoded_input, split)
    return energy_masks(encoded_input.detach(), encoded_target.detach())
