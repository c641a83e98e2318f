"""The training objective in one place: what an arrangement is scored on, with every term and its weight.

- reconstruction: the decoded output against both songs (losses.py: waveform, spectral, the farther song);
- the agent's mask regularisation (creative_agent.mask_regularization; the agent evaluates it in its forward, where
  the masks, the music's novelty and the songs' energies are at hand, and the model hands it back as `mask_reg_loss`);
- style: the distance of the output's per-channel statistics to a style reference's (--style_weight);
- adversarial: the seed's StyleDiscriminator on latents, trained by its own optimiser (--adversarial_weight).

The trainer asks `Objective` for the loss of a batch and its detached terms. Of the model it imports the agent's
discriminator and term weights only.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from creative_agent import StyleDiscriminator, default_term_weights
from listening import distances_and_share, on_frames
from losses import mask_metrics, reconstruction_loss, rms_loss, temporal_variation
from records import Conditions


def style_statistics(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard deviation) over time of each channel of [B, D, T]: the level and movement of each band."""
    latent = latent.float()
    return latent.mean(dim=-1), latent.std(dim=-1, unbiased=False)


def style_distance(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[B]: mean absolute difference of the two latents' style statistics (per-channel mean and spread)."""
    (m_out, s_out), (m_ref, s_ref) = style_statistics(output), style_statistics(reference)
    return (m_out - m_ref).abs().mean(dim=-1) + (s_out - s_ref).abs().mean(dim=-1)


@dataclass
class Scored:
    """One batch through the objective: the loss, its detached terms, the waveforms [B, 1, S] of the output, the
    input and the target, and the (input, target) masks [B, D, T] that were applied (detached)."""
    loss: torch.Tensor
    terms: dict
    output: torch.Tensor
    input: torch.Tensor
    target: torch.Tensor
    masks: tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def figures(scored: Scored) -> dict[str, float]:
    """A scored batch's means, as training's validation and evaluate.py both report them: `loss`, the
    reconstruction loss without the mask regularisation; the RMS distance to each song; what is heard
    (listening.distances_and_share: the log-spectral distance to each song and to the farther one, the input's
    share); the masks' temporal variation and area figures (losses.mask_metrics)."""
    out, inp, tgt, (m_in, m_tgt) = scored.output, scored.input, scored.target, scored.masks
    heard = distances_and_share(out, inp, tgt)
    return dict(loss=float(scored.terms["recon_loss"]), rms_in=float(rms_loss(out, inp)),
                rms_tgt=float(rms_loss(out, tgt)), **{k: float(v.mean()) for k, v in heard.items()},
                temporal_variation=float(temporal_variation(m_in).mean()), **mask_metrics(m_in, m_tgt))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> torch.Tensor:
    """The trainer's step after the loss: backward, the gradients clipped to norm `clip`, and an AdamW step that
    leaves everything as it was where the loss or the gradients are not finite. Returns that verdict (a device
    tensor: no host sync). bench.py times this same step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # a non-finite loss on any rank makes the all-reduced gradients non-finite on all ranks
    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    step_if_finite(optimizer, finite)
    return finite


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """`optimizer.step()` that leaves weights and moments as they are where `finite` is False, decided on the device
    with no host sync: the fused AdamW kernels take the flag as `found_inf`, the way torch.amp.GradScaler passes it."""
    optimizer.found_inf = (~finite).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def agent_term_weights(config) -> dict[str, float]:
    """The agent's term weights that differ from its defaults (creative_agent.default_term_weights), by term name:
    --balance_loss_weight W adds W x the area term to the training loss, folded into the agent's own weight of it
    (loss = mask_reg_weight x regularisation), so the model needs to hand back nothing but its regularisation."""
    if not config.balance_loss_weight or not config.use_creative_agent:
        return {}
    if config.mask_reg_weight <= 0:
        raise ValueError("--balance_loss_weight needs --mask_reg_weight > 0 (it weighs a term of the regularisation)")
    gates = config.agent_gates if config.agent == "attention" else "frame"
    return {"area": default_term_weights(gates)["area"] + config.balance_loss_weight / config.mask_reg_weight}


def loss_weights(config) -> dict[str, float]:
    """The reconstruction loss weights of a run's configuration, by losses.py's names."""
    c = config
    return dict(wave_input=c.wave_input_weight, wave_target=c.wave_target_weight, stft_input=c.stft_input_weight,
                stft_target=c.stft_target_weight, mel_input=c.mel_input_weight, mel_target=c.mel_target_weight,
                far_lsd=c.far_lsd_weight)


class Objective:
    """The loss of one batch: encode both songs, run the model, decode, and add up the weighted terms.

    `forward` is the model as training runs it (DDP-wrapped, compiled); `model` is the bare module, for
    validation; `compile_fn` compiles the loss. It runs on the device of the latent statistics `norm`. The random
    draws (each example's wanted input share, whether it gets a style reference) are a function of (seed, rank,
    step) alone, so data loading, compilation and resuming never change them.
    """

    def __init__(self, config, codec, norm, model, forward, compile_fn=None):
        self.config, self.codec, self.norm, self.model, self.forward = config, codec, norm, model, forward
        self.device, self.weights = norm.mean.device, loss_weights(config)
        device, self.rank = self.device, torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.frame_rate = codec.sample_rate / codec.hop_length
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.amp == "bf16"
                    else nullcontext())
        self.compiled_decode_loss = compile_fn(self.decode_loss) if compile_fn else self.decode_loss
        self.disc = self.disc_ddp = self.disc_optimizer = None
        if config.adversarial_weight > 0:  # trained by its own step on detached latents (see discriminator_step)
            self.disc = StyleDiscriminator(codec.dim).to(device)
            self.disc_ddp = (DDP(self.disc, device_ids=[device.index] if device.type == "cuda" else None,
                                 find_unused_parameters=True) if torch.distributed.is_initialized() else self.disc)
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=config.lr, betas=(0.5, 0.999),
                                                    fused=True)
        self.fake_real = None

    def __call__(self, batch: dict[str, torch.Tensor], step: int, training: bool) -> Scored:
        """A batch scored (pairs_dataset: the waveforms, the input's beats, the cached latents and the rhythm stems
        where there are). Training runs the compiled model and loss where --compile is set."""
        inp, tgt = (batch[k].to(self.device, non_blocking=True) for k in ("input", "target"))
        with torch.no_grad():
            latents = (batch["latents"].to(self.device, non_blocking=True).unbind(1) if "latents" in batch
                       else (self.codec.encode(inp), self.codec.encode(tgt)))
            z_in, z_tgt = (self.norm.normalize(z) for z in latents)
            rhythm = None  # the layers from a separator's stems, on the normalised latents' scale (inference too)
            if "rhythm" in batch:
                stems = batch["rhythm"].to(self.device, non_blocking=True)
                rhythm = tuple(self.codec.encode(stems[:, k]) / self.norm.std for k in range(2))
        balance = self.draw_balance(inp.shape[0], step) if training else None
        source = reference = None
        if training and self.config.style_weight > 0:  # the target of the batch's previous pair, for half of them
            source, present = z_tgt.roll(1, dims=0), (self.draws(z_tgt.shape[0], step, 1) < 0.5).float()
            reference = source * present[:, None, None]  # all zeros: no reference
        sections = self.model.sections(batch["beats"], z_in.shape[-1], self.frame_rate, batch.get("bars"))
        if sections is not None:
            sections = sections.to(self.device, non_blocking=True)
        guide = batch.get("guide")  # the layering agent's, from the data (pairs_dataset)
        if guide is not None:
            guide = on_frames(guide.to(self.device, non_blocking=True), z_in.shape[-1])
        asked = Conditions(balance=balance, style_reference=reference, sections=sections, rhythm=rhythm, guide=guide)
        with self.amp:
            mix = (self.forward if training else self.model)(z_in, z_tgt, asked)
        z_out, reg = mix.output, mix.reg
        out, loss, terms = (self.compiled_decode_loss if training else self.decode_loss)(z_out, inp, tgt, balance)
        terms["recon_loss"] = loss.detach()
        if source is not None:  # examples without a reference add nothing
            style = (style_distance(z_out.float(), source) * present).mean()
            loss = loss + self.config.style_weight * style
            terms["style_loss"] = style.detach()
        if reg is not None:
            loss = loss + self.config.mask_reg_weight * reg
            terms["mask_reg_loss"] = reg.detach()
        if self.disc is not None:
            loss = loss + self.config.adversarial_weight * self.generator_loss(z_out.float(), z_tgt, terms)
        with torch.no_grad():
            terms["rms_in"], terms["rms_tgt"] = rms_loss(out, inp), rms_loss(out, tgt)
        return Scored(loss, terms, out.detach(), inp, tgt, mix.masks)

    def decode_loss(self, z_out: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor, balance=None):
        """Decode the output latents and score the waveform against both songs: (output, loss, terms)."""
        out = self.codec.decode(self.norm.denormalize(z_out.float()))[..., : inp.shape[-1]]
        loss, terms = reconstruction_loss(out, inp, tgt, self.config.sample_rate, self.weights, balance)
        return out, loss, terms

    def draws(self, batch: int, step: int, stream: int) -> torch.Tensor:
        """`batch` uniform numbers in [0, 1) on the device, a function of (seed, rank, step, stream) alone."""
        seed = ((self.config.seed * 4099 + self.rank) * 1_000_003 + step) * 7 + stream
        return torch.rand(batch, generator=torch.Generator().manual_seed(seed)).to(self.device, non_blocking=True)

    def draw_balance(self, batch: int, step: int) -> torch.Tensor | None:
        """The agent's wanted input share for each training example, uniform in --balance_range (None: even)."""
        lo, hi = self.config.balance_range
        if not self.config.use_creative_agent or lo == hi == 0.5:
            return None
        return lo + (hi - lo) * self.draws(batch, step, 0)

    def anneal_gumbel(self, step: int, total_steps: int) -> None:
        """--hard_masks: the Gumbel temperature of this step, geometric from --gumbel_tau_start to --gumbel_tau_end
        (set in place on the agent, so a compiled model is not recompiled)."""
        c = self.config
        progress = min(1.0, step / max(1, total_steps - 1))
        self.model.creative_agent.mask_generator.tau.fill_(c.gumbel_tau_start * (c.gumbel_tau_end
                                                                                 / c.gumbel_tau_start) ** progress)

    def generator_loss(self, fake: torch.Tensor, real: torch.Tensor, terms: dict) -> torch.Tensor:
        """The discriminator's verdict on the output latents as a loss for the model (the discriminator is frozen
        here); keeps (fake, real) for the discriminator's own step."""
        self.disc.requires_grad_(False)
        logit, _ = self.disc(fake)
        self.disc.requires_grad_(True)
        gen_loss = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
        terms["adv_gen_loss"] = gen_loss.detach()
        self.fake_real = (fake.detach(), real)
        return gen_loss

    def discriminator_step(self, terms: dict) -> None:
        """One AdamW step of the discriminator: real target latents -> 1, the model's output latents -> 0."""
        if self.disc is None:
            return
        fake, real = self.fake_real
        logits, _ = self.disc_ddp(torch.cat([real, fake]))  # one forward: DDP wants one per backward
        labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)]).to(logits)
        disc_loss = F.binary_cross_entropy_with_logits(logits, labels)
        self.disc_optimizer.zero_grad(set_to_none=True)
        disc_loss.backward()
        step_if_finite(self.disc_optimizer, torch.isfinite(disc_loss))
        terms["adv_disc_loss"] = disc_loss.detach()

    def state_dict(self) -> dict:
        """The discriminator and its optimiser, as checkpoints have always stored them (nothing without one)."""
        if self.disc is None:
            return {}
        return dict(discriminator=self.disc.state_dict(), disc_optimizer=self.disc_optimizer.state_dict())

    def load_state_dict(self, state: dict) -> None:
        if self.disc is not None:
            self.disc.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
