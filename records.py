"""The records of one forward: what the model (or a rule) is asked besides the two latents (`Conditions`), what an
agent decides (`Masks`) and what the forward gives back (`Mix`; fixed_masks.Mixer: what a model and a rule share).
A forward keeps nothing on its modules: whatever a metric, a picture or the loss needs comes back in these, so a
compiled forward (CUDA graphs) leaves no output behind and one call's results never leak into the next.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditions:
    """Per-call options of a forward, all optional.

    `hard`: 0/1 complementary masks; `balance`: the agent's wanted input share, a number or one per example [B]
    (None: 0.5); `style_reference` [B, D, T'] and `style_strength`: a song whose style the arrangement takes
    (models built with style_dim > 0; all zeros means none); `sections` [B, T] (int64): each frame's section of the
    input's beat grid, decided once each; `rhythm`: the input's and the target's rhythm-stem latents for the layering
    agent (either one None); `guide` [B, T]: which way round the layering agent should layer the songs;
    `attention`: return the agent's input -> target attention map (for pictures: it costs an explicit softmax);
    `lead` [B, 2, T]: the input's gain above the bass and in the bass as a plan leads (phrases.lead_gains), which
    the mashability rule applies."""
    hard: bool = False
    balance: float | torch.Tensor | None = None
    style_reference: torch.Tensor | None = None
    style_strength: float = 0.0
    sections: torch.Tensor | None = None
    rhythm: tuple | None = None
    guide: torch.Tensor | None = None
    attention: bool = False
    lead: torch.Tensor | None = None


@dataclass
class Masks:
    """What an agent decides: the (input, target) masks [B, D, T] (or gates [B, components, T]), their weighted
    regularisation and its unweighted terms, and the attention map [B, T, T] where it was asked for.
    `input_mask, target_mask, reg_loss = generator(x, y)` unpacks (and indexes) it as the seed's generator's tuple."""
    input: torch.Tensor
    target: torch.Tensor
    reg: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.input, self.target, self.reg))

    def __getitem__(self, index):
        return tuple(self)[index]


@dataclass
class Mix:
    """What a forward gives: the output latent [B, D, T], the mask regularisation (None without an agent), the
    masks [B, D, T] that were applied (detached, for metrics and pictures), the regularisation's terms and the
    attention map where it was asked for. `encoded_output, mask_reg_loss = model(x, y)` unpacks (and indexes) it as
    the seed's model's tuple."""
    output: torch.Tensor
    reg: torch.Tensor | None
    masks: tuple[torch.Tensor, torch.Tensor]
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.output, self.reg))

    def __getitem__(self, index):
        return tuple(self)[index]

