"""The creative agent: learns by cross-attention which channel x frame cells of each song go into the arrangement.

The seed's three classes: `AttentionMaskGenerator` looks at both latents and returns two soft masks in [0, 1] and
their regularisation loss (`mask_regularization`, here); `StyleDiscriminator` gives a latent a real/fake logit and a
style score (adversarial training); `CreativeAgent` combines both and applies the masks. The component agents decide
per component of the songs which song supplies it: `LayeredMaskGenerator` the rhythm and the harmony layers
(layers.py), `CompositionalMaskGenerator` rhythm, harmony and timbre from learned filters; `CreativeAgent` wraps any
of them. `python creative_agent.py` runs a self-test on random latents.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from fixed_masks import fade_switches
from layers import LAYERS, STEMS_ONLY_LAYERED, split_layers
from records import Conditions, Masks

# Weights of the agent's regularisation terms. The masks are pushed to be decided (complementarity), to give each
# song its wanted share of every example (area by mask area, share by energy), to keep the loud parts rather than
# the gaps (presence), to change over time (diversity) and to switch where the music changes rather than anywhere
# (switching). With the reconstruction's `far_lsd` term (closeness to the farther song) they decide which song is
# heard when. `layering` (the layered agent's: its layers from different songs, so both are heard at once) is off
# for the others. In the code, `balance` is the wanted input share (--balance), `share` this term only.
TERM_WEIGHTS = dict(complementarity=30.0, area=30.0, diversity=10.0, switching=10.0, presence=10.0, share=30.0,
                    layering=0.0)
# An agent that splits its sections at the wanted share (frame gates, the component agents) meets these by
# construction, as closely as its sections allow; what is left is set by the share drawn and the sections' lengths,
# which no learning moves (docs/results.md, "The mask regularisation"), so they weigh 0 there.
SPLIT_MEETS = ("area", "share", "diversity")


def default_term_weights(gates: str) -> dict[str, float]:
    """The default weight of each regularisation term for an agent with these gates ("frame" splits at the share)."""
    return {name: 0.0 if gates == "frame" and name in SPLIT_MEETS else w for name, w in TERM_WEIGHTS.items()}


@dataclass
class Evidence:
    """What the mask regularisation judges the masks by, each optional: `change` [B, T] in [0, 1], how much the
    music changes at each frame (novelty); `energy`, the two sources' energies [B, D, T]; `balance` [B, 1, 1], the
    wanted input share (default 0.5); `undecided`, where the masks are decided in the forward pass, the overlap
    p (1 - p) of the soft decisions that the straight-through estimator trains."""
    change: torch.Tensor | None = None
    energy: tuple | None = None
    balance: torch.Tensor | None = None
    undecided: torch.Tensor | None = None


def mask_regularization(input_mask: torch.Tensor, target_mask: torch.Tensor, evidence: Evidence | None = None,
                        weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted sum, unweighted terms) of: overlap -> 0 (decided cells, or the soft decisions' overlap where
    they are `undecided`), the wanted input share of the mask area in every example (area), masks that vary over
    time (diversity), few switches except where the music changes (switching) and, given the sources' energies,
    as much of the music kept as possible (presence: no gaps where one song is quiet) with the wanted share of what
    is kept for the input (share); with components as rows, their coming from different songs (layering)."""
    evidence = evidence or Evidence()
    change, energy, balance, undecided = evidence.change, evidence.energy, evidence.balance, evidence.undecided
    weights = {**TERM_WEIGHTS, **(weights or {})}
    b = (balance if balance is not None else torch.full((1, 1, 1), 0.5, device=input_mask.device)).view(-1)
    step = (input_mask[..., 1:] - input_mask[..., :-1]).abs().mean(dim=1)  # [B, T-1]
    calm = 1.0 - change[:, 1:] if change is not None else torch.ones_like(step)
    if energy is None:
        energy = (torch.ones_like(input_mask), torch.ones_like(target_mask))
    kept_in, kept_tgt = ((m * e).sum(dim=(1, 2)) for m, e in zip((input_mask, target_mask), energy, strict=True))
    total = sum(e.sum(dim=(1, 2)) for e in energy).clamp_min(1e-8)
    kept = (kept_in + kept_tgt).clamp_min(1e-8)
    terms = {
        "complementarity": (input_mask * target_mask).mean() if undecided is None else undecided,
        "area": (2 * ((1 - b) * input_mask.mean(dim=(1, 2)) - b * target_mask.mean(dim=(1, 2)))).square().mean(),
        "diversity": 0.5 - input_mask.std(dim=-1, unbiased=False).mean(),
        "switching": (step * calm).sum(dim=-1).mean() / 8.0,  # per 8 switches of the whole mask
        "presence": (1.0 - 2.0 * kept / total).mean(),  # 0 for an even split of equally loud songs
        "share": (2 * ((1 - b) * kept_in - b * kept_tgt) / kept).square().mean(),
        # rows are components (layers): 1 where all come from one song, 0 where they come from different songs
        "layering": 1.0 - (input_mask.amax(dim=1) - input_mask.amin(dim=1)).mean(),
    }
    return sum(weights[name] * value for name, value in terms.items()), terms


def check_latent_pair(encoded_input: torch.Tensor, encoded_target: torch.Tensor, dim: int) -> None:
    """Raise one clear ValueError unless both latents are [B, dim, T] with the same shape."""
    for name, x in (("encoded_input", encoded_input), ("encoded_target", encoded_target)):
        if x.dim() != 3 or x.shape[1] != dim:
            raise ValueError(f"{name} must have shape [B, {dim}, T], got {tuple(x.shape)}")
    if encoded_input.shape != encoded_target.shape:
        raise ValueError(f"encoded_input and encoded_target must match in B, D and T, got "
                         f"{tuple(encoded_input.shape)} and {tuple(encoded_target.shape)}")


class CrossAttention(nn.Module):
    """Multi-head attention of `query` frames over `context` frames through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor, return_weights: bool = False):
        q, k, v = self._heads(self.q(query)), self._heads(self.k(context)), self._heads(self.v(context))
        weights = None
        if return_weights:  # explicit softmax, only when a picture of the attention is wanted
            weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            y = weights @ v
            weights = weights.mean(dim=1)  # [B, T_query, T_context], averaged over heads
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        b, h, t, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, h * d)), weights


def novelty(latent: torch.Tensor, smooth_frames: int = 9) -> torch.Tensor:
    """How much the music changes at each frame [B, T] in [0, 1]: the spectral flux of the smoothed latent
    magnitudes, scaled by its largest value in each example (1 where the music changes most)."""
    envelope = F.avg_pool1d(latent.abs().float(), smooth_frames, stride=1, padding=smooth_frames // 2,
                            count_include_pad=False)
    flux = F.pad((envelope[..., 1:] - envelope[..., :-1]).abs().mean(dim=1), (1, 0))
    return flux / flux.amax(dim=-1, keepdim=True).clamp_min(1e-8)


def frame_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How different two latents [B, D, T] sound at each frame [B, T]: the RMS over channels of the difference of
    their log magnitudes (a log-spectral distance in the codec's domain)."""
    diff = torch.log(x.detach().float().abs() + 1e-3) - torch.log(y.detach().float().abs() + 1e-3)
    return diff.square().mean(dim=1).sqrt()


def split_at(score: torch.Tensor, weight: torch.Tensor, balance: torch.Tensor) -> torch.Tensor:
    """Per example, row and frame, the threshold [B, rows, T] on `score` [B, rows, T] above which a frame is the
    input's: in order of score, each frame is the input's while the input's fraction of the total `weight` is still
    below `balance` [B, 1, 1] half-way through it, and then so is the first frame after those that still fits (a
    large frame is passed over for a smaller one that keeps the split even: with three sections, the best split).
    The threshold lies midway between the last score taken and the first one left, so that how decided the agent
    is (the soft decisions' overlap, `undecided`) can be learned at the boundary too.
    With the songs' frame distance as the weight and balance 0.5, the frames taken from the target are as far from
    the input as the frames taken from the input are from the target: the arrangement is as close to one song as
    to the other (in log-spectral distance), while the score decides which frames go where."""
    score = score.detach()
    order = score.argsort(dim=-1, descending=True)
    ranked, w = score.gather(-1, order), weight.gather(-1, order)
    total = w.sum(dim=-1, keepdim=True).clamp_min(1e-8)
    taken = (w.cumsum(dim=-1) - w / 2) / total < balance  # half-way through each frame: a prefix of the order
    count = taken.sum(dim=-1, keepdim=True).clamp(max=score.shape[-1] - 1)
    held = (w * taken).sum(dim=-1, keepdim=True) / total
    fits = ~taken & (w > 0) & (held + w / (2 * total) < balance)
    first = fits & (fits.cumsum(dim=-1) == 1)
    left, last = ranked.gather(-1, count), ranked.gather(-1, (count - 1).clamp_min(0))
    between = torch.where(count > 0, (left + last) / 2, left)  # midway: every decision has a margin either side
    threshold = torch.where(first, ranked - 1e-3, between)  # the one that fits: just above
    return torch.empty_like(score).scatter_(-1, order, threshold)


def as_balance(balance, batch: int, device) -> torch.Tensor:
    """The wanted input share of each example as [B, 1, 1]: from None (0.5), a number or a tensor [B]."""
    if balance is None:
        balance = 0.5
    if not torch.is_tensor(balance):
        balance = torch.full((batch,), float(balance), device=device)
    return balance.float().view(-1, 1, 1)


def pool_frames(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, T, H] -> [B, ceil(T / scale), H]: means over groups of `scale` frames."""
    return F.avg_pool1d(x.transpose(1, 2), scale, ceil_mode=True).transpose(1, 2) if scale > 1 else x


def unpool_frames(x: torch.Tensor, scale: int, length: int) -> torch.Tensor:
    """The inverse of pool_frames in time: every pooled frame repeated `scale` times, cut to `length` frames."""
    return x.repeat_interleave(scale, dim=1)[:, :length] if scale > 1 else x


def pool_sections(score: torch.Tensor, distance: torch.Tensor, sections: torch.Tensor):
    """Per section of the music: the mean of `score` [B, rows, T], the sum of `distance` [B, 1, T] and whether the
    section has any frame, each [B, rows or 1, T] (section s in column s; `sections` [B, T] gives each frame's
    section). Sized by the frames, so its shapes never depend on the data (one compiled graph serves every batch)."""
    index = sections[:, None]
    counts = torch.zeros_like(distance).scatter_add_(-1, index, torch.ones_like(distance))
    summed = torch.zeros_like(score).scatter_add(-1, index.expand_as(score), score)
    distance = torch.zeros_like(distance).scatter_add_(-1, index, distance)
    return summed / counts.clamp_min(1), distance, counts > 0


def spread(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The standard deviation of `x` [B, rows, n] over its columns where `present` [B, 1, n], [B, rows, 1] (never
    below 1e-6)."""
    w = present.to(x.dtype)
    count = w.sum(dim=-1, keepdim=True).clamp_min(1)
    mean = (x * w).sum(dim=-1, keepdim=True) / count
    return ((x - mean).square() * w).sum(dim=-1, keepdim=True).div(count).sqrt().clamp_min(1e-6)


LEAN_SPREAD_FLOOR = 0.05  # a lean that hardly varies (sections' means of a guide in -1..1) moves the scores little
GATES = ("frame", "cell")
# Frame gates decide once per block of this many frames (0.17 s with the MDCT codec at 24 kHz). Every switch
# between the songs costs the decoded audio a transition, so fewer, longer sections sound cleaner.
BLOCK_FRAMES = 32


@dataclass(frozen=True)
class AgentOptions:
    """How an agent decides, one record for every agent (AttentionMaskGenerator says what each option does):
    `gates`, `gate_frames`, `scales`, `hard_masks`, `block_frames`, `fade_frames`; the layering agent's `bass` rows
    and `guide_weight` (how far the guide moves its decisions); `weights`, the regularisation terms' weights that
    differ from the defaults (TERM_WEIGHTS), by term name. Agents ignore the options they have no use for.
    `AgentOptions.of(**keywords)` builds one from the seed's keywords, the term weights spelt NAME_weight."""
    gates: str = "frame"
    gate_frames: int = 16
    scales: tuple[int, ...] = (1,)
    hard_masks: bool = False
    block_frames: int = BLOCK_FRAMES
    fade_frames: int = 0
    bass: int = 0
    guide_weight: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, **keywords) -> AgentOptions:
        """From keywords: the fields by name and NAME_weight for NAME in TERM_WEIGHTS; ValueError for any other."""
        if unknown := unknown_options(keywords, GENERATOR_OPTIONS):
            raise ValueError(f"unknown agent option(s) {', '.join(unknown)}: expected {', '.join(GENERATOR_OPTIONS)} "
                             f"or NAME_weight for NAME in {', '.join(TERM_WEIGHTS)}")
        weights = {name: keywords.pop(f"{name}_weight") for name in TERM_WEIGHTS if f"{name}_weight" in keywords}
        if "scales" in keywords:
            keywords["scales"] = tuple(keywords["scales"])
        return cls(**keywords, weights=weights)

    def check(self) -> None:
        """ValueError for options no agent can take."""
        if self.gates not in GATES:
            raise ValueError(f"unknown gates {self.gates!r}: expected one of {', '.join(GATES)}")
        if self.block_frames < 0:
            raise ValueError(f"block_frames must be >= 0, got {self.block_frames}")
        if not self.scales or len(set(self.scales)) != len(self.scales) or min(self.scales) < 1:
            raise ValueError(f"scales must be distinct positive frame counts, got {self.scales}")


# what an agent takes besides NAME_weight for NAME in TERM_WEIGHTS
GENERATOR_OPTIONS = tuple(f.name for f in fields(AgentOptions) if f.name != "weights")


class AttentionMaskGenerator(nn.Module):
    """Two complementary soft masks [B, D, T] in [0, 1], one per source, from cross-attention between the latents.

    Input frames query the target and target frames query the input (one attention module serves both
    directions, so each source is judged by the same rule); a head per source scores every channel x frame cell,
    and a softmax over the two scores gives the masks: each cell is shared out between the songs (the masks sum
    to 1), and how decided each share is, is what complementarity measures. `gates="frame"` (default) averages
    the scores over channels, so each frame is taken from one song or the other (an arrangement in time);
    `gates="cell"` decides every channel x frame cell on its own. With frame gates, the forward's `sections` (of
    the beat grid) are decided once each, every switch a fade of `fade_frames` frames that ends where its section
    starts; without them `block_frames` > 0 decides once per block of that many frames (a switch only at a block's
    edge), and 0 every frame from scores smoothed over `gate_frames` frames (checkpoints from before blocks).
    """

    LEAN: tuple[float, ...] = (1.0,)  # which way each row of frame scores leans with a `lean` (decisions)

    def __init__(self, encoding_dim: int, hidden_dim: int = 256, num_heads: int = 4,
                 options: AgentOptions | None = None, **keywords):
        """`options` (AgentOptions), or the same as the seed's keywords."""
        super().__init__()
        options = options or AgentOptions.of(**keywords)
        options.check()
        self.encoding_dim, self.gates, self.gate_frames = encoding_dim, options.gates, options.gate_frames
        self.scales, self.hard_masks, self.block_frames = options.scales, options.hard_masks, options.block_frames
        self.fade_frames = options.fade_frames
        self.guide_weight = 0.0  # how far the conditions' guide moves the scores (the layering agent's)
        self.weights = {name: options.weights.get(name, w) for name, w in default_term_weights(options.gates).items()}
        self.input_features = nn.Conv1d(encoding_dim, hidden_dim, kernel_size=3, padding=1)
        self.target_features = nn.Conv1d(encoding_dim, hidden_dim, kernel_size=3, padding=1)
        # one attention per time scale; the frame-level one keeps its name, so single-scale checkpoints still load
        self.attention = CrossAttention(hidden_dim, num_heads)
        self.coarse_attention = nn.ModuleDict({str(s): CrossAttention(hidden_dim, num_heads)
                                               for s in self.scales if s != 1})
        self.norm_input, self.norm_target = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.input_head = nn.Conv1d(hidden_dim, encoding_dim, kernel_size=1)
        self.target_head = nn.Conv1d(hidden_dim, encoding_dim, kernel_size=1)
        # Gumbel temperature of --hard_masks training; the trainer anneals it in place (no recompilation)
        self.register_buffer("tau", torch.ones(()), persistent=False)

    def _score(self, head: nn.Conv1d, norm: nn.LayerNorm, features: torch.Tensor, attended: torch.Tensor):
        return head(norm(features + attended).transpose(1, 2))

    def attend(self, query: torch.Tensor, context: torch.Tensor, keep: bool = False):
        """Sum over the time scales of what `query` frames find in `context`; scale s attends between means of s
        frames, so the coarse scales see sections and the frame scale sees notes. (features [B, T, H], weights)"""
        attended, weights = self.attention(query, context, return_weights=keep)
        for s, attention in self.coarse_attention.items():
            coarse, _ = attention(pool_frames(query, int(s)), pool_frames(context, int(s)))
            attended = attended + unpool_frames(coarse, int(s), query.shape[1])
        return attended, weights

    def forward(self, encoded_input: torch.Tensor, encoded_target: torch.Tensor, conditions: Conditions | None = None,
                shift: torch.Tensor | None = None, **asked) -> Masks:
        """The masks and their regularisation (Masks: `input_mask, target_mask, reg_loss = generator(x, y)`). Of the
        `conditions` (or the same as keywords, `asked`): `balance`, the wanted input share; `sections` [B, T], the
        section of the beat grid each frame belongs to (frame gates decide per section); `attention`, return the
        attention map. `shift` [B, hidden]: added to both songs' features (a style reference)."""
        check_latent_pair(encoded_input, encoded_target, self.encoding_dim)
        conditions = conditions or Conditions(**asked)
        balance = as_balance(conditions.balance, encoded_input.shape[0], encoded_input.device)
        d = encoded_input.shape[1]
        # with frame gates one decision per frame [B, 1, T] serves every channel
        input_mask, undecided, attention = self.decisions(encoded_input, encoded_target, balance, conditions, shift)
        input_mask = input_mask.expand(-1, d, -1)
        target_mask = 1.0 - input_mask
        change = torch.maximum(novelty(encoded_input), novelty(encoded_target))
        energy = (encoded_input.detach().float().square(), encoded_target.detach().float().square())
        reg, terms = self.regularization(input_mask, target_mask, Evidence(change, energy, balance, undecided))
        return Masks(input_mask, target_mask, reg, terms, attention)

    def frame_scores(self, score: torch.Tensor) -> torch.Tensor:
        """Frame gates: the channels' scores [B, D, T] as one score per frame [B, 1, T]."""
        return score.sum(dim=1, keepdim=True) / math.sqrt(score.shape[1])  # unit scale for independent channels

    def decisions(self, encoded_input: torch.Tensor, encoded_target: torch.Tensor, balance: torch.Tensor,
                  conditions: Conditions, shift: torch.Tensor | None = None):
        """(the input's gates [B, rows, T] in [0, 1] (the target's are 1 minus them), how undecided they are, the
        attention map or None): rows are the channels for cell gates, one for frame gates. Of the `conditions`:
        `sections` [B, T] (frame gates), which section of the music each frame belongs to (0, 1, ... in time order,
        from the beat grid), one decision per section, else per block; `guide` [B, T] in [-1, 1] (frame gates; the
        layering agent's, listening.layer_guide), where the decisions lean (`leaned`); `attention`, whether to
        return the attention map."""
        sections, lean = conditions.sections, conditions.guide
        f_in = F.gelu(self.input_features(encoded_input)).transpose(1, 2)  # [B, T, H]
        f_tgt = F.gelu(self.target_features(encoded_target)).transpose(1, 2)
        if shift is not None:
            f_in, f_tgt = f_in + shift[:, None].to(f_in.dtype), f_tgt + shift[:, None].to(f_tgt.dtype)
        # no position codes: a decision can only come from the music, never from where in the segment it is
        # (with positions the agent learns one fixed pattern, "first half input, then target", for every pair)
        a_in, weights = self.attend(f_in, f_tgt, keep=conditions.attention)
        a_tgt, _ = self.attend(f_tgt, f_in)
        score = (self._score(self.input_head, self.norm_input, f_in, a_in)
                 - self._score(self.target_head, self.norm_target, f_tgt, a_tgt)).float()
        frames = score.shape[-1]
        sectioned = self.gates == "frame" and (sections is not None or self.block_frames > 0)
        if self.gates == "frame":  # one decision per section (or smoothed frame) for all channels
            score, distance = self.frame_scores(score), frame_distance(encoded_input, encoded_target)[:, None]
            lean = lean[:, None].float() if lean is not None and self.guide_weight else None
            if sectioned:  # the section's mean score; its weight in the split is its frames' summed distance
                if sections is None:  # fixed blocks of frames
                    sections = (torch.arange(frames, device=score.device) // self.block_frames).expand(len(score), -1)
                lean = None if lean is None else pool_sections(lean, distance, sections)[0]
                score, distance, present = pool_sections(score, distance, sections)
            else:
                k = self.gate_frames | 1  # odd: centred
                score, distance, lean = (None if v is None else F.avg_pool1d(v, k, stride=1, padding=k // 2,
                                                                             count_include_pad=False)
                                         for v in (score, distance, lean))
                present = torch.ones_like(distance, dtype=torch.bool)
            if lean is not None:
                score = self.leaned(score, lean, present)
            score = score.masked_fill(~present, -1e4)  # sections that do not exist sort last in the split
            score = score - split_at(score, distance.expand_as(score), balance)  # [B, rows, T or sections]
        else:  # cells: the wanted share moves every cell's odds
            score = score + torch.logit(balance.clamp(1e-3, 1 - 1e-3))
        hard = self.gates == "frame"
        if self.hard_masks and self.training:  # Gumbel-softmax over the two sources, straight-through
            uniform = torch.rand_like(score).clamp(1e-6, 1 - 1e-6)
            score = (score + torch.log(uniform) - torch.log1p(-uniform)) / self.tau  # logistic = Gumbel - Gumbel
            hard = True
        input_mask = torch.sigmoid(score)  # = softmax over the two sources' scores
        undecided = (((input_mask * (1 - input_mask)) * present).sum()  # over the decisions that exist
                     / (present.sum() * input_mask.shape[1]).clamp_min(1)) if self.gates == "frame" else None
        if hard:  # decided frames or cells, with the soft mask's gradient
            input_mask = input_mask + ((input_mask > 0.5).to(input_mask.dtype) - input_mask).detach()
        if sectioned:  # every frame takes its section's decision, and a switch fades over a few frames
            input_mask = input_mask.gather(-1, sections[:, None].expand(-1, input_mask.shape[1], -1))
            input_mask = fade_switches(input_mask, self.fade_frames)
        return input_mask, undecided, None if weights is None else weights.detach()

    def leaned(self, score: torch.Tensor, lean: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Scores [B, rows, n] of sections (or frames) moved by a `lean` [B, 1, n] pooled alike, each row its LEAN
        way: `guide_weight` times the row's spread of scores per spread of the lean, over the `present` ones. So a
        weight of 1 moves the sections' order as much as the agent's own scores do, whatever their scale."""
        signs = score.new_tensor(self.LEAN)[:, None]
        lean = lean / spread(lean, present).clamp_min(LEAN_SPREAD_FLOOR)
        return score + self.guide_weight * spread(score.detach(), present) * signs * lean

    def regularization(self, input_mask: torch.Tensor, target_mask: torch.Tensor, evidence: Evidence | None = None):
        """(weighted sum, unweighted terms) of the mask regularisation with this agent's weights
        (mask_regularization)."""
        return mask_regularization(input_mask, target_mask, evidence, self.weights)


def smoothing_analyser(channels: int, frames: int) -> nn.Conv1d:
    """A learned depthwise filter over time that starts as the mean of `frames` frames."""
    conv = nn.Conv1d(channels, channels, frames, padding=frames // 2, groups=channels, bias=False)
    nn.init.constant_(conv.weight, 1.0 / frames)
    return conv


class ComponentMaskGenerator(AttentionMaskGenerator):
    """An agent that decides per component of the songs (COMPONENTS, which sum to the song) and section which song
    supplies it: frame gates [B, components, T], with the same rules as AttentionMaskGenerator's, the wanted share
    included. Subclasses say how a latent splits (`components`)."""

    COMPONENTS: tuple[str, ...] = ()

    def __init__(self, encoding_dim: int, hidden_dim: int = 256, num_heads: int = 4,
                 options: AgentOptions | None = None, **keywords):
        options = replace(options or AgentOptions.of(**keywords), gates="frame")  # per component and frame
        super().__init__(encoding_dim, hidden_dim, num_heads, options)
        rows = len(self.COMPONENTS)
        self.input_head = nn.Conv1d(hidden_dim, rows, kernel_size=1)
        self.target_head = nn.Conv1d(hidden_dim, rows, kernel_size=1)

    def components(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, D, T] -> [B, components, D, T], summing to the latent."""
        raise NotImplementedError

    def compose(self, latent: torch.Tensor, gates: torch.Tensor, parts: torch.Tensor | None = None) -> torch.Tensor:
        """The latent's components (`parts`, if known) weighted by its gates [B, components, T], summed: what this
        song gives the arrangement."""
        parts = self.components(latent) if parts is None else parts
        return (parts * gates[:, :, None]).sum(dim=1)

    def frame_scores(self, score: torch.Tensor) -> torch.Tensor:
        return score  # the heads give one score per component already

    def forward(self, encoded_input: torch.Tensor, encoded_target: torch.Tensor, conditions: Conditions | None = None,
                shift: torch.Tensor | None = None, parts: tuple | None = None, **asked) -> Masks:
        """(input gates, target gates) [B, components, T] with their regularisation (Masks), from the same
        `conditions` as AttentionMaskGenerator's, the `guide` leaning each component its LEAN way (`leaned`);
        `parts`: both songs' components where the caller has them already (they are not cheap: the layers'
        median filters)."""
        check_latent_pair(encoded_input, encoded_target, self.encoding_dim)
        conditions = conditions or Conditions(**asked)
        balance = as_balance(conditions.balance, encoded_input.shape[0], encoded_input.device)
        input_gates, undecided, attention = self.decisions(encoded_input, encoded_target, balance, conditions, shift)
        change = torch.maximum(novelty(encoded_input), novelty(encoded_target))
        parts = parts or (self.components(encoded_input), self.components(encoded_target))
        energy = tuple(p.detach().float().square().sum(dim=2) for p in parts)
        reg, terms = self.regularization(input_gates, 1.0 - input_gates, Evidence(change, energy, balance, undecided))
        return Masks(input_gates, 1.0 - input_gates, reg, terms, attention)


class LayeredMaskGenerator(ComponentMaskGenerator):
    """The layering agent: per section, which song supplies the rhythm and which the harmony (layers.py, by
    harmonic-percussive separation of the MDCT latent), so an arrangement can hold one song's rhythm under the
    other's harmony, both heard at once."""

    COMPONENTS = LAYERS
    LEAN = (1.0, -1.0)  # the guide's way round: the rhythm leans with it, the harmony against it
    LAYERING_WEIGHT = 30.0  # the reward for layers from different songs (why: docs/results.md, "Layered arrangements")

    def __init__(self, encoding_dim: int, hidden_dim: int = 256, num_heads: int = 4,
                 options: AgentOptions | None = None, **keywords):
        options = options or AgentOptions.of(**keywords)
        options = replace(options, weights={"layering": self.LAYERING_WEIGHT, **options.weights})
        super().__init__(encoding_dim, hidden_dim, num_heads, options)
        self.bass = options.bass  # the latent's lowest rows, which belong to the rhythm layer
        self.guide_weight = options.guide_weight  # how far it leans to the way round the audio prefers (in spreads)

    def frame_scores(self, score: torch.Tensor) -> torch.Tensor:
        """The harmony's score is its own minus the rhythm's: a section whose rhythm the input gives leans to the
        target's harmony, so the layers come from different songs unless the music says otherwise. With two
        independent scores both layers came from one song nearly always (docs/results.md, "Layered
        arrangements")."""
        return torch.stack([score[:, 0], score[:, 1] - score[:, 0]], dim=1)

    def components(self, latent: torch.Tensor) -> torch.Tensor:
        return split_layers(latent, self.bass)


class CompositionalMaskGenerator(ComponentMaskGenerator):
    """The compositional agent: each song is split into components, and each component of the arrangement comes
    from one song or the other, frame by frame, so it can take the rhythm of one song with the harmony of the other.

    Two learned depthwise analysers over time, medium (9 frames) and large (27 frames), split a latent z into
    rhythm = z - medium(z) (what changes within a few frames: onsets), harmony = medium(z) - large(z) (notes and
    chords) and timbre = large(z) (the slow spectral envelope). The three always sum to z. The attention decides a
    gate per component and frame, with the same rules as the frame gates, the wanted share included.
    """

    COMPONENTS = ("rhythm", "harmony", "timbre")

    def __init__(self, encoding_dim: int, hidden_dim: int = 256, num_heads: int = 4,
                 options: AgentOptions | None = None, **keywords):
        super().__init__(encoding_dim, hidden_dim, num_heads, options, **keywords)
        self.harmony_analyser = smoothing_analyser(encoding_dim, 9)
        self.timbre_analyser = smoothing_analyser(encoding_dim, 27)

    def components(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, D, T] -> rhythm, harmony, timbre [B, 3, D, T], which sum to the latent."""
        medium, large = self.harmony_analyser(latent), self.timbre_analyser(latent)
        return torch.stack([latent - medium, medium - large, large], dim=1)


AGENTS = {"attention": AttentionMaskGenerator, "compositional": CompositionalMaskGenerator,
          "layered": LayeredMaskGenerator}


class StyleDiscriminator(nn.Module):
    """The seed's discriminator, for adversarial training: a strided Conv1d encoder of a latent [B, D, T] ->
    (real/fake logit [B, 1], style score [B, 1]). objective.Objective trains one with its own optimiser."""

    def __init__(self, encoding_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.encoding_dim = encoding_dim
        half = hidden_dim // 2
        self.encoder = nn.Sequential(
            nn.Conv1d(encoding_dim, half, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv1d(half, hidden_dim, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2),
        )
        self.real_fake = nn.Linear(hidden_dim, 1)
        self.style = nn.Linear(2 * hidden_dim, 1)

    def forward(self, pattern: torch.Tensor):
        if pattern.dim() != 3 or pattern.shape[1] != self.encoding_dim:
            raise ValueError(f"pattern must have shape [B, {self.encoding_dim}, T], got {tuple(pattern.shape)}")
        if pattern.shape[-1] < 4:
            raise ValueError(f"pattern needs at least 4 frames, got {pattern.shape[-1]}")
        h = self.encoder(pattern)
        mean, std = h.mean(dim=-1), h.std(dim=-1)
        return self.real_fake(mean), self.style(torch.cat([mean, std], dim=-1))


def unknown_options(options, known: tuple[str, ...]) -> list[str]:
    """The keywords of `options` that are neither in `known` nor a term weight (NAME_weight), sorted."""
    return sorted(set(options) - set(known) - {f"{name}_weight" for name in TERM_WEIGHTS})


class CreativeAgent(nn.Module):
    """The seed's wrapper of both parts: `mask_generator` decides which parts of each song the arrangement uses and
    applies the masks; `discriminator` (a StyleDiscriminator, with `discriminator=True`, the default) judges latents
    for adversarial training. The cascade builds its agent without one: training's discriminator is trained by its
    own optimiser, outside the model's (objective.Objective), for the rules as well as the agent."""

    def __init__(self, encoding_dim: int, hidden_dim: int = 256, num_heads: int = 4, agent: str = "attention",
                 style_dim: int = 0, discriminator: bool = True, **generator_options):
        """`generator_options`: `options=AgentOptions(...)`, or its fields as keywords (AgentOptions.of)."""
        super().__init__()
        if agent not in AGENTS:
            raise ValueError(f"unknown agent {agent!r}: expected one of {', '.join(AGENTS)}")
        self.discriminator = StyleDiscriminator(encoding_dim, hidden_dim) if discriminator else None
        self.mask_generator = AGENTS[agent](encoding_dim, hidden_dim, num_heads, **generator_options)
        # a style reference's vector shifts the features that both songs are judged by (bias-free: none, no shift)
        self.style = nn.Linear(style_dim, hidden_dim, bias=False) if style_dim else None

    def forward(self, encoded_input: torch.Tensor, encoded_target: torch.Tensor, conditions: Conditions,
                style: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], Masks]:
        """((masked input, masked target), the Masks applied, detached) under `conditions` (records.Conditions:
        `hard` 0/1 masks, the wanted `balance`, `sections`, the layering agent's `rhythm` stems and `guide`,
        `attention`); `style`: a reference's style vector. A component agent's masks are one band of channels per
        component, holding its gate (component_bands), as the pictures draw them."""
        generator = self.mask_generator
        shift = self.style(style) if style is not None and self.style is not None else None
        components = isinstance(generator, ComponentMaskGenerator)
        if conditions.rhythm is not None and not isinstance(generator, LayeredMaskGenerator):
            raise ValueError(STEMS_ONLY_LAYERED)
        parts = None
        if components:
            given = conditions.rhythm or (None, None)
            parts = tuple(generator.components(z) if r is None else torch.stack([r, z - r], dim=1)
                          for z, r in zip((encoded_input, encoded_target), given, strict=True))
        decided = (generator(encoded_input, encoded_target, conditions, shift, parts) if components
                   else generator(encoded_input, encoded_target, conditions, shift))
        input_mask, target_mask = decided.input, decided.target
        if conditions.hard:
            input_mask = (input_mask >= target_mask).to(input_mask.dtype)
            target_mask = 1.0 - input_mask
        if components:
            masked = (generator.compose(encoded_input, input_mask, parts[0]),
                      generator.compose(encoded_target, target_mask, parts[1]))
            input_mask = component_bands(input_mask, encoded_input.shape[1])
            target_mask = 1.0 - input_mask
        else:
            masked = encoded_input * input_mask, encoded_target * target_mask
        return masked, replace(decided, input=input_mask.detach(), target=target_mask.detach())

    def generate_creative_masks(self, encoded_input: torch.Tensor, encoded_target: torch.Tensor, hard: bool = False,
                                style: torch.Tensor | None = None, **asked):
        """The seed's call: masked input, masked target and the mask regularisation loss; `hard`: 0/1 complementary
        masks; `style`: a reference's style vector; `asked`: the other records.Conditions by name."""
        (masked_in, masked_tgt), masks = self(encoded_input, encoded_target, Conditions(hard=hard, **asked), style)
        return masked_in, masked_tgt, masks.reg


def component_bands(gates: torch.Tensor, channels: int) -> torch.Tensor:
    """Gates [B, components, T] as a mask [B, channels, T]: component k fills the k-th band of channels."""
    return gates.repeat_interleave(-(-channels // gates.shape[1]), dim=1)[:, :channels]


def takes_stems(model) -> bool:
    """Whether a model's agent can take a separator's rhythm stems as its layers (the layering agent)."""
    return model.creative_agent is not None and isinstance(model.creative_agent.mask_generator, LayeredMaskGenerator)


def component_names(model) -> tuple[str, ...]:
    """The components a model's agent decides per band of its mask pictures, () where it masks channel x frame cells."""
    agent = model.creative_agent.mask_generator if model.creative_agent is not None else None
    return agent.COMPONENTS if isinstance(agent, ComponentMaskGenerator) else ()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def self_test(encoding_dim: int = 128, batch: int = 2, frames: int = 200) -> bool:
    """Build the agent on random latents, print its figures and return whether every check passed."""
    from losses import mask_metrics

    torch.manual_seed(0)
    agent = CreativeAgent(encoding_dim)
    x, y = torch.randn(batch, encoding_dim, frames), torch.randn(batch, encoding_dim, frames)
    print(f"Mask generator parameters: {count_parameters(agent.mask_generator):,}")
    print(f"Style discriminator parameters: {count_parameters(agent.discriminator):,}")
    print(f"Creative agent parameters: {count_parameters(agent):,}")
    input_mask, target_mask, reg_loss = agent.mask_generator(x, y)
    masked_x, masked_y, _ = agent.generate_creative_masks(x, y)
    metrics = mask_metrics(input_mask, target_mask)
    print(f"Mask shapes: {tuple(input_mask.shape)}, {tuple(target_mask.shape)}")
    print(f"Complementarity: {metrics['complementarity']:.1f}%")
    print(f"Coverage: {metrics['coverage']:.1f}%")
    print(f"Balance: {metrics['balance']:.3f}")
    print(f"Mask regularization loss: {reg_loss.item():.4f}")
    real_fake, style = agent.discriminator(masked_x + masked_y)
    print(f"Discriminator outputs: real/fake {tuple(real_fake.shape)}, style {tuple(style.shape)}")
    (reg_loss + masked_x.square().mean() + masked_y.square().mean() + real_fake.mean() + style.mean()).backward()
    missing = [n for n, p in agent.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    verdict = "yes" if not missing else "NO, missing: " + ", ".join(missing)
    print(f"Gradients reach every trainable parameter: {verdict}")
    checks = {
        "mask shape": input_mask.shape == x.shape and target_mask.shape == y.shape,
        "mask range": bool(((input_mask >= 0) & (input_mask <= 1) & (target_mask >= 0) & (target_mask <= 1)).all()),
        "finite loss": bool(torch.isfinite(reg_loss)),
        "gradients": not missing,
    }
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return all(checks.values())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Self-test of the creative agent on random latents: parameter "
                                     "counts, mask metrics, gradient flow. Exits non-zero if a check fails.")
    parser.add_argument("--encoding_dim", type=int, default=128, help="latent channels D (default 128)")
    parser.add_argument("--frames", type=int, default=200, help="latent frames T (default 200)")
    cli = parser.parse_args()
    sys.exit(0 if self_test(cli.encoding_dim, frames=cli.frames) else 1)
