"""`SimpleTransformer`: the cascade that turns the masked latents of two songs into the latent of an arrangement.

Masks come from the creative agent (learned), a fixed rule (fixed_masks.py) or nothing. With one stage the cascade
maps the input alone; with two or more, stage 0 reads input ⊕ target and stage k reads input ⊕ out(k-1) ⊕ target.
Each stage is a pre-norm transformer encoder whose zero-initialised output is added to a residual path (the masked
mix for stage 0, the previous output after), so the untrained model plays the masked mix and any depth trains stably.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from beats import SectionUnit, batch_section_ids
from creative_agent import (
    GENERATOR_OPTIONS,
    TERM_WEIGHTS,
    AgentOptions,
    CreativeAgent,
    check_latent_pair,
    unknown_options,
)
from fixed_masks import Rule, make_fixed_masks
from layers import STEMS_ONLY_LAYERED, bass_rows
from listening import layer_guide, on_frames
from objective import agent_term_weights, style_statistics
from records import Conditions, Masks, Mix

if TYPE_CHECKING:
    from config import Config


def sinusoidal_positions(length: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed sinusoidal position codes [length, dim] (no parameters, any length)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(length, dim, device=device)
    codes[:, 0::2] = torch.sin(pos * freq)
    codes[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return codes.to(dtype) if dtype is not None else codes


class Block(nn.Module):
    """Pre-norm transformer layer: self-attention through scaled_dot_product_attention, then a GELU MLP (4x)."""

    def __init__(self, width: int, nhead: int, dropout: float, use_sdpa: bool = True):
        super().__init__()
        if width % nhead:
            raise ValueError(f"stage width {width} must be divisible by nhead={nhead}")
        self.nhead, self.use_sdpa = nhead, use_sdpa
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.nhead, c // self.nhead).permute(2, 0, 3, 1, 4)
        # no dropout on the attention weights: it would force the slow unfused path (dropout acts on the residuals)
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # the textbook formula, kept to check the fused kernels against
            y = torch.softmax(q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5), dim=-1) @ v
        return y.transpose(1, 2).reshape(b, t, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.proj(self.attend(self.norm1(x))))
        return x + self.drop(self.mlp(self.norm2(x)))


class StyleEncoder(nn.Module):
    """A song's style as a vector [B, style_dim]: its latent's per-channel mean and spread over time, mapped by a
    small bias-free MLP. An all-zero latent (no reference) gives the zero vector, which changes nothing."""

    def __init__(self, encoding_dim: int, style_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * encoding_dim, style_dim, bias=False), nn.GELU(),
                                 nn.Linear(style_dim, style_dim, bias=False))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(style_statistics(latent), dim=-1))


MAX_STYLE_GAIN = 10.0  # restyle raises a channel by at most 20 dB: a band that is silent here stays silent


def restyle(latent: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """`latent` [B, D, T] moved by `strength` (0: unchanged, 1: all the way) towards the per-channel level and spread
    of `reference` [B, D, T']: adaptive instance normalisation (AdaIN, Huang and Belongie 2017) with its
    content-style trade-off. In a spectral codec's latent the spread of a channel is the loudness of its band, so
    the arrangement keeps what is played when and takes the reference's spectral balance. An all-zero reference
    (no reference) moves nothing."""
    (m, s), (m_ref, s_ref) = style_statistics(latent), style_statistics(reference)
    gain = (s_ref / s.clamp_min(1e-8)).clamp(max=MAX_STYLE_GAIN)
    styled = (latent.float() - m[..., None]) * gain[..., None] + m_ref[..., None]
    present = (s_ref.amax(dim=-1) > 0).float()[:, None, None]
    return latent + (strength * present * (styled - latent.float())).to(latent.dtype)


@dataclass(frozen=True)
class ModelOptions:
    """What a SimpleTransformer is, one record: the cascade (`num_stages` of `num_layers` layers, `nhead` heads for
    every stage or one count per stage, 0: heads of HEAD_DIM dimensions; `stage_widths`, default the stages' input
    widths; `dropout`, `anti_cheating` noise on what later stages see of the target, `use_sdpa` fused attention),
    a style vector of `style_dim` (0: none), and the masks: the creative `agent` (creative_agent.AGENTS; None: the
    `rule`'s masks) with its attention's width and heads and its AgentOptions. The rule's fade and bass rows are the
    agent's too. `section_beats` / `section_bars`: where the input's grid is known, the masks are decided once per
    section of that many beats or bars (0 and 0: fixed blocks of frames). build_model derives it from a
    run's Config; the seed's keyword constructor builds it from its keywords."""
    encoding_dim: int = 128
    nhead: int | list[int] = 0
    num_layers: int = 6
    num_stages: int = 2
    stage_widths: list[int] | None = None
    dropout: float = 0.1
    anti_cheating: float = 0.0
    use_sdpa: bool = True
    style_dim: int = 0
    rule: Rule = field(default_factory=Rule)
    agent: str | None = None
    agent_hidden_dim: int = 256
    agent_heads: int = 4
    agent_options: AgentOptions = field(default_factory=AgentOptions)
    section_beats: int = 0
    section_bars: int = 0


class Stage(nn.Module):
    """One cascade stage: [B, T, in_channels] -> correction [B, T, encoding_dim] (zero at initialisation), `width`
    wide with `nhead` heads, its depth, dropout, attention kernel and style input as the model's `options`."""

    def __init__(self, in_channels: int, width: int, nhead: int, options: ModelOptions):
        super().__init__()
        self.proj_in = nn.Linear(in_channels, width)
        self.style = nn.Linear(options.style_dim, width, bias=False) if options.style_dim else None
        self.blocks = nn.ModuleList(Block(width, nhead, options.dropout, options.use_sdpa)
                                    for _ in range(options.num_layers))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, options.encoding_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj_in(x)
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device, h.dtype)
        if style is not None:  # only models built with style_dim > 0 compute one
            h = h + self.style(style.to(h.dtype))[:, None]
        for block in self.blocks:
            h = block(h)
        return self.proj_out(self.norm(h))


HEAD_DIM = 128  # nhead 0: heads of this dimension, the fastest of the fused attention kernels (docs/performance.md)


def heads_of_dim(width: int, head_dim: int) -> int:
    """The head count closest to `width` / `head_dim` (at least 1) that divides `width`: 2 for 256, 3 for 384."""
    heads = max(1, round(width / head_dim))
    while width % heads:
        heads -= 1
    return heads


def stage_count(num_stages: int | None, num_transformer_layers: int | None) -> int:
    """The cascade's stage count from either spelling (`num_transformer_layers` is the seed's), 2 by default."""
    if num_stages is not None and num_transformer_layers is not None and num_stages != num_transformer_layers:
        raise ValueError(f"num_stages={num_stages} and num_transformer_layers={num_transformer_layers} name the same "
                         f"thing, the cascade's stage count: give one of them")
    return next((n for n in (num_stages, num_transformer_layers) if n is not None), 2)


class SimpleTransformer(nn.Module):
    """`encoded_output, mask_reg_loss = model(encoded_input, encoded_target)` on normalised latents [B, D, T].

    The forward gives a records.Mix, which unpacks so: `mask_reg_loss` is None without the creative agent, and the
    record also holds the (input, target) masks, detached, for metrics and pictures, the regularisation's terms
    and the agent's attention where it was asked for. Nothing is kept on the modules.
    `nhead` is one head count for every stage or one per stage; 0 means heads of HEAD_DIM dimensions.
    """

    def __init__(self, encoding_dim: int = 128, nhead: int | list[int] = 0, num_layers: int = 6,
                 num_stages: int | None = None, dropout: float = 0.1, anti_cheating: float = 0.0,
                 use_creative_agent: bool = False, mask_type: str = "none", stage_widths: list[int] | None = None,
                 agent_hidden_dim: int = 256, agent_heads: int = 4,
                 temporal_segment_frames: int = 32, frequency_split: float = 0.5, use_sdpa: bool = True,
                 style_dim: int = 0, fade_frames: int = 0, bass: int = 0, num_transformer_layers: int | None = None,
                 options: ModelOptions | None = None, **agent_options):
        """The seed's keywords, or the same as one record, `options` (ModelOptions)."""
        super().__init__()
        if options is None:
            agent_keywords = ("agent", *(o for o in GENERATOR_OPTIONS if o not in self.keywords()))
            if unknown := unknown_options(agent_options, agent_keywords):
                raise ValueError(f"SimpleTransformer got unknown keyword(s) {', '.join(unknown)}. It takes "
                                 f"{', '.join(self.keywords())}; for the creative agent {', '.join(agent_keywords)}; "
                                 f"and NAME_weight for NAME in {', '.join(TERM_WEIGHTS)}")
            agent = agent_options.pop("agent", "attention") if use_creative_agent else None
            options = ModelOptions(
                encoding_dim, nhead, num_layers, stage_count(num_stages, num_transformer_layers), stage_widths, dropout,
                anti_cheating, use_sdpa, style_dim, Rule(mask_type, temporal_segment_frames, frequency_split,
                                                         fade_frames, bass),
                agent, agent_hidden_dim, agent_heads, AgentOptions.of(fade_frames=fade_frames, bass=bass,
                                                                      **agent_options))
        self.build(options)

    def build(self, options: ModelOptions) -> None:
        """The stages, the agent and the style encoder that `options` describe."""
        if options.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {options.num_stages}")
        d, num_stages, nhead = options.encoding_dim, options.num_stages, options.nhead
        in_channels = [d] if num_stages == 1 else [2 * d] + [3 * d] * (num_stages - 1)
        widths = options.stage_widths or in_channels
        if len(widths) != num_stages:
            raise ValueError(f"stage_widths needs {num_stages} entries, got {len(widths)}")
        heads = [nhead] * num_stages if isinstance(nhead, int) else list(nhead)
        if len(heads) != num_stages:
            raise ValueError(f"nhead needs 1 or {num_stages} entries, got {len(heads)}")
        heads = [h or heads_of_dim(w, HEAD_DIM) for h, w in zip(heads, widths, strict=True)]
        self.encoding_dim, self.anti_cheating = d, options.anti_cheating
        self.rule = options.rule  # the masks without an agent
        self.section_beats = options.section_beats  # decisions per section of this many beats of the input
        self.section_bars = options.section_bars  # ... or of this many bars, where the input's bars are known
        self.stages = nn.ModuleList(Stage(c, w, h, options) for c, w, h in zip(in_channels, widths, heads, strict=True))
        self.creative_agent = (CreativeAgent(d, options.agent_hidden_dim, options.agent_heads, options.agent,
                                             options.style_dim, discriminator=False, options=options.agent_options)
                               if options.agent is not None else None)
        # a style reference conditions every stage and the agent (style_dim > 0)
        self.style_encoder = StyleEncoder(d, options.style_dim) if options.style_dim else None

    @classmethod
    def keywords(cls) -> list[str]:
        """The constructor's named keywords (the agent's options aside)."""
        return [name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]

    @property
    def use_creative_agent(self) -> bool:
        return self.creative_agent is not None

    def sections(self, beats: torch.Tensor | None, frames: int, frame_rate: float,
                 bars: torch.Tensor | None = None) -> torch.Tensor | None:
        """Each frame's section [B, frames] of the input's beat grid `beats` [B, K] (seconds, NaN-padded) and bars
        [B, 2] (beats.bar_anchor): sections of `section_bars` bars, or of `section_beats` beats where the bars are
        not known, fixed blocks for an example without a pulse, and the agent's fixed blocks of
        frames for a model trained to decide in blocks; None where no beats are given or the model has no sections.
        Computed here, outside a compiled forward: inductor miscompiles the agent's own block index (torch 2.13 on
        CPU, the index of its scatter is garbage), and a graph input is safe."""
        generator = self.creative_agent.mask_generator if self.creative_agent is not None else None
        if beats is None:
            return None
        if self.section_beats <= 0 and self.section_bars <= 0:
            if generator is None or generator.gates != "frame" or generator.block_frames <= 0:
                return None
            return (torch.arange(frames) // generator.block_frames).expand(len(beats), -1)
        block = generator.block_frames if generator is not None else self.rule.segment_frames
        return batch_section_ids(beats, bars, frames, frame_rate,
                                 SectionUnit.of(self.section_beats, self.section_bars, block))

    def guide_from_audio(self, input_wave: torch.Tensor, target_wave: torch.Tensor, sample_rate: int,
              frames: int) -> torch.Tensor | None:
        """The layering agent's guide [B, frames] from the songs' audio [B, 1, S] (listening.layer_guide), None for
        a model that takes none; computed outside a compiled forward, as `sections` are."""
        if self.creative_agent is None or not self.creative_agent.mask_generator.guide_weight:
            return None
        return on_frames(layer_guide(input_wave, target_wave, sample_rate), frames)

    def masked_sources(self, encoded_input: torch.Tensor, encoded_target: torch.Tensor, conditions: Conditions,
                       style: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Masks]:
        """(masked input, masked target, the Masks applied, detached, with the agent's regularisation)."""
        if conditions.rhythm is not None and self.creative_agent is None:
            raise ValueError(STEMS_ONLY_LAYERED)
        if self.creative_agent is not None:
            (masked_in, masked_tgt), masks = self.creative_agent(encoded_input, encoded_target, conditions, style)
            return masked_in, masked_tgt, masks
        m_in, m_tgt = make_fixed_masks(self.rule, encoded_input, encoded_target, conditions.sections)
        masks = Masks(m_in.detach(), m_tgt.detach())
        if self.rule.mask_type == "none":
            return encoded_input, encoded_target, masks
        return encoded_input * m_in, encoded_target * m_tgt, masks

    def forward(self, encoded_input: torch.Tensor, encoded_target: torch.Tensor, conditions: Conditions | None = None,
                **asked) -> Mix:
        """The arrangement's latent under `conditions` (records.Conditions, or the same as keywords, `asked`):
        `balance` (creative agent only), the wanted input share, a number or one per example [B] (default 0.5);
        `style_reference` (models built with style_dim > 0), the latent [B, D, T'] of a song whose style the
        arrangement should take, any length (all zeros, or None, means no reference): it conditions the agent and
        every stage, and `style_strength` > 0 also moves the output that far towards its statistics (restyle);
        `sections` [B, T] (int64), the section of the input's beat grid that each frame belongs to (beats.py): the
        agent's frame gates and the temporal rule decide once per section (None: fixed blocks of frames);
        `rhythm` (the layering agent), the normalised-scale latents of the input's and the target's rhythm stems
        (drums and bass from a separator such as Demucs), the layers instead of harmonic-percussive separation
        (either one None keeps the separation for that song); `guide` [B, T] (the layering agent), which way round
        to layer the songs, from their audio (`guide_from_audio`); `hard`, 0/1 masks; `attention`, the agent's
        attention map in the result."""
        check_latent_pair(encoded_input, encoded_target, self.encoding_dim)
        conditions = conditions or Conditions(**asked)
        style_reference, style = conditions.style_reference, None
        if style_reference is not None:
            if self.style_encoder is None:
                raise ValueError("this model was built without style conditioning (style_dim=0)")
            style = self.style_encoder(style_reference)
        masked_in, masked_tgt, masks = self.masked_sources(encoded_input, encoded_target, conditions, style)
        x, y = masked_in.transpose(1, 2), masked_tgt.transpose(1, 2)  # [B, T, D]
        if len(self.stages) == 1:
            out = x + self.stages[0](x, style)
        else:
            out = x + y + self.stages[0](torch.cat([x, y], dim=-1), style)
        for stage in self.stages[1:]:
            seen = y
            if self.training and self.anti_cheating > 0:
                seen = y + self.anti_cheating * y.detach().std() * torch.randn_like(y)
            out = out + stage(torch.cat([x, out, seen], dim=-1), style)
        out = out.transpose(1, 2)
        if style is not None and conditions.style_strength > 0:
            out = restyle(out, style_reference, conditions.style_strength)
        return Mix(out, masks.reg, (masks.input, masks.target), masks.terms, masks.attention)


STYLE_DIM = 64  # the style vector of models trained with --style_weight > 0


def model_options(config: Config, codec_dim: int) -> ModelOptions:
    """The model that a run's configuration describes, over a codec of `codec_dim` channels (the flags that shape
    it are declared so in config.py: MODEL_KEYS)."""
    c = config
    bass = bass_rows(c.sample_rate / 2 / codec_dim, c.bass_hz)
    agent = AgentOptions(c.agent_gates, scales=tuple(c.agent_scales), hard_masks=c.hard_masks,
                         block_frames=c.agent_block_frames, fade_frames=c.fade_frames, bass=bass,
                         guide_weight=c.layer_guide, weights=agent_term_weights(c))
    return ModelOptions(codec_dim, c.nhead, c.num_layers, c.num_stages, dropout=c.dropout,
                        anti_cheating=c.anti_cheating, use_sdpa=c.sdpa,
                        style_dim=STYLE_DIM if c.style_weight > 0 else 0,
                        rule=Rule(c.mask_type, c.temporal_segment_frames, c.frequency_split, c.fade_frames, bass),
                        agent=c.agent if c.use_creative_agent else None, agent_options=agent,
                        section_beats=c.section_beats, section_bars=c.section_bars)


def build_model(config: Config, codec_dim: int) -> SimpleTransformer:
    """The SimpleTransformer that a run's configuration describes."""
    return SimpleTransformer(options=model_options(config, codec_dim))
