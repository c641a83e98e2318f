"""Rule-based masks, the baselines the creative agent must beat. Each returns (input_mask, target_mask), [B, D, T].

- none:      both masks are 1 (the plain sum of both songs, no masking)
- temporal:  alternating time segments: input, target, input, ... of `segment_frames` frames, or the sections of
             the beat grid where they are given (every N beats), each switch faded over `fade_frames` frames
- frequency: channels below `split` * D from the input, the rest from the target
- energy:    each cell goes to the source with more energy there, softly: m_in = e_in / (e_in + e_tgt)
- layers:    the input's rhythm under the target's harmony (layers.py): both songs at once, in layers
- mashability (RULES, arranging only): a plan's lead (phrases.py) phrase by phrase, the target's gain the
             equal-power partner of the input's (sqrt(1 - g^2)), the bass rows swapped on their own
The complementary ones (all but none and layers) sum to 1 everywhere. `RuleMix` arranges with a rule alone, nothing
learned: the web page's approach for a user without a trained checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from layers import STEMS_ONLY_LAYERED, harmony_mask
from records import Conditions, Mix

MASK_TYPES = ("none", "temporal", "frequency", "energy", "layers")  # what a model can be trained with
RULES = MASK_TYPES + ("mashability",)  # what arranges: the mashability rule renders a plan of whole songs


def fade_switches(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """A 0/1 mask [B, rows, T] whose every switch ramps linearly over the `frames` frames before it: a cross-fade
    between the songs instead of a cut, with the masks still summing to 1. It ends where the new section starts
    (on the beat, just before its attack), so the new song's attack comes in whole and the old one's is gone.
    0 or 1: no fade."""
    if frames <= 1:
        return mask
    return F.avg_pool1d(F.pad(mask, (0, frames - 1), mode="replicate"), frames, stride=1)


def temporal_masks(x: torch.Tensor, segment_frames: int = 32, sections: torch.Tensor | None = None,
                   fade_frames: int = 0):
    """Input in the even segments (or sections [B, T] of the beat grid), target in the odd ones."""
    b, d, t = x.shape
    segment = sections if sections is not None else torch.arange(t, device=x.device) // max(1, segment_frames)
    input_mask = fade_switches((segment % 2 == 0).to(x.dtype).view(-1, 1, t).expand(b, 1, t), fade_frames)
    input_mask = input_mask.expand(b, d, t)
    return input_mask, 1.0 - input_mask


def plan_masks(x: torch.Tensor, lead: torch.Tensor, bass: int = 0):
    """The masks of a plan's lead [B, 2, T] (the input's gain above the bass and in the `bass` lowest rows): the
    target's gain sqrt(1 - g^2), so that a cross-fade keeps the power of two unrelated songs."""
    in_bass = (torch.arange(x.shape[1], device=x.device) < bass)[None, :, None]
    lead = lead.to(device=x.device, dtype=x.dtype)
    input_mask = torch.where(in_bass, lead[:, 1:2], lead[:, 0:1]).expand_as(x)
    return input_mask, (1 - input_mask.square()).clamp_min(0).sqrt()


def frequency_masks(x: torch.Tensor, split: float = 0.5):
    b, d, t = x.shape
    input_mask = (torch.arange(d, device=x.device) < round(split * d)).to(x.dtype)[None, :, None].expand(b, d, t)
    return input_mask, 1.0 - input_mask


def energy_masks(encoded_input: torch.Tensor, encoded_target: torch.Tensor, eps: float = 1e-8):
    e_in, e_tgt = encoded_input.square(), encoded_target.square()
    input_mask = (e_in + 0.5 * eps) / (e_in + e_tgt + eps)
    return input_mask, 1.0 - input_mask


@dataclass(frozen=True)
class Rule:
    """A rule and its settings: `mask_type` (MASK_TYPES); the temporal rule's `segment_frames` per section where
    there is no beat grid and the `fade_frames` its switches ramp over; the frequency rule's `split` (the share of
    channels the input keeps); the layers rule's `bass`, the lowest rows, which it counts as rhythm (layers.py)."""
    mask_type: str = "none"
    segment_frames: int = 32
    split: float = 0.5
    fade_frames: int = 0
    bass: int = 0

    def __post_init__(self):
        if self.mask_type not in RULES:
            raise ValueError(f"unknown mask type {self.mask_type!r}: expected one of {', '.join(RULES)}")


def make_fixed_masks(rule: Rule | str, encoded_input: torch.Tensor, encoded_target: torch.Tensor,
                     sections: torch.Tensor | None = None, lead: torch.Tensor | None = None):
    """The (input_mask, target_mask) of a rule (or a rule's name, with its default settings) for latents
    [B, D, T]; `sections` [B, T]: each frame's section of the beat grid (the temporal rule alternates per
    section); `lead` [B, 2, T]: a plan's (the mashability rule's masks)."""
    rule = Rule(rule) if isinstance(rule, str) else rule
    mask_type = rule.mask_type
    if encoded_input.shape != encoded_target.shape or encoded_input.dim() != 3:
        raise ValueError(f"expected two latents of the same shape [B, D, T], got {tuple(encoded_input.shape)} "
                         f"and {tuple(encoded_target.shape)}")
    if mask_type == "none":
        ones = torch.ones_like(encoded_input)
        return ones, ones
    if mask_type == "mashability":
        if lead is None:
            raise ValueError("the mashability rule renders a plan of whole songs (phrases.py): arrange with it "
                             "(arrange.py --rule mashability), it has no masks of its own")
        return plan_masks(encoded_input, lead, rule.bass)
    if mask_type == "temporal":
        return temporal_masks(encoded_input, rule.segment_frames, sections, rule.fade_frames)
    if mask_type == "frequency":
        return frequency_masks(encoded_input, rule.split)
    if mask_type == "layers":  # the seed system's intent: rhythm from the input, harmony from the target
        return 1.0 - harmony_mask(encoded_input, bass=rule.bass), harmony_mask(encoded_target, bass=rule.bass)
    return energy_masks(encoded_input.detach(), encoded_target.detach())


class RuleMix(nn.Module):
    """A rule's masks applied to both latents and summed, with nothing learned: `model(x, y, sections=...)` gives
    a records.Mix as SimpleTransformer does (no regularisation), so inference.arrange_song arranges with it. With
    the temporal rule on the beat grid and the songs aligned (beats.py), that is a beat-synchronous arrangement
    that a codec which reconstructs exactly (MDCT) renders without a trained model."""

    creative_agent = style_encoder = None
    use_creative_agent = False

    def __init__(self, rule: Rule | str, section_beats: int = 2, section_bars: int = 0):
        super().__init__()
        self.rule = Rule(rule) if isinstance(rule, str) else rule
        self.section_beats = section_beats  # the temporal rule switches every this many beats of the input
        self.section_bars = section_bars  # ... or bars, where the input's bars are known (as SimpleTransformer)

    def forward(self, encoded_input: torch.Tensor, encoded_target: torch.Tensor, conditions: Conditions | None = None,
                **asked) -> Mix:
        """The masked mix under `conditions` (records.Conditions, or the same as keywords): the rule reads its
        `sections` and a plan's `lead` only (and refuses stems: they are the layering agent's)."""
        conditions = conditions or Conditions(**asked)
        if conditions.rhythm is not None:
            raise ValueError(STEMS_ONLY_LAYERED)
        m_in, m_tgt = make_fixed_masks(self.rule, encoded_input, encoded_target, conditions.sections,
                                       conditions.lead)
        return Mix(encoded_input * m_in + encoded_target * m_tgt, None, (m_in, m_tgt))

    def guide_from_audio(self, *songs) -> None:
        """A rule takes no guide (SimpleTransformer.guide_from_audio)."""
        return None


@runtime_checkable
class Mixer(Protocol):
    """What the model (SimpleTransformer) and a rule (fixed_masks.RuleMix) share, all that arranging uses of
    either: the forward, the rule whose masks it applies without an agent, the sections it decides per (of
    `section_bars` bars, or `section_beats` beats), its agent and style encoder (None for a rule), and the layering
    agent's guide from the songs' audio (None where it takes none)."""
    rule: Rule
    section_beats: int
    section_bars: int
    creative_agent: torch.nn.Module | None
    style_encoder: torch.nn.Module | None

    @property
    def use_creative_agent(self) -> bool: ...

    def __call__(self, encoded_input: torch.Tensor, encoded_target: torch.Tensor,
                 conditions: Conditions | None = None) -> Mix: ...

    def guide_from_audio(self, input_wave: torch.Tensor, target_wave: torch.Tensor, sample_rate: int,
                         frames: int) -> torch.Tensor | None: ...
