"""One rank's training: build everything, `train_epoch`, `validate`, checkpoints, logs.

`run(rank, world_size, local_rank, args)` is called by train_simple_ddp.py once per process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from itertools import islice

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from audio_codec import CodecUnavailable, LatentNorm, build_codec, latent_sums
from beats import switch_fade_frames
from checkpoints import (
    MODEL_KEYS,
    PROJECT,
    CheckpointError,
    atomic_write,
    build_model,
    find_resume_checkpoint,
    load_checkpoint,
    load_model_state,
    loss_weights,
    save_checkpoint,
    setting,
)
from creative_agent import StyleDiscriminator
from distributed import (
    StopFlag,
    all_reduce_sum,
    cpus_per_rank,
    end_process_group,
    gather_rng_states,
    is_main,
    requeue_slurm_job,
    start_process_group,
)
from listening import IN_TIME_KEYS, distances_and_share, in_time
from losses import mask_metrics, reconstruction_loss, rms_loss, temporal_variation
from model_simple_transformer import style_distance
from pairs_dataset import (
    BadDataError,
    CachedLatents,
    WavPairsDataset,
    build_loader,
    infer_segment_samples,
    load_beat_grids,
    path_problem,
    scan_pairs,
)

DEFAULT_DATASET = "dataset_wav_pairs"
IN_TIME_PAIRS = 64  # validation pairs per rank whose arrangement is measured in time (beat tracking is not free)
SYNC_EVERY = 10  # training steps between the host's reads of device values (progress bar, non-finite run, signals)


class TrainingError(RuntimeError):
    """Training cannot go on (for example too many non-finite steps in a row)."""


# ---------------------------------------------------------------- the trainer

class Trainer:
    """Everything one rank needs to train: data, codec, model, optimiser, logs. Rank 0 prints and writes."""

    def __init__(self, rank: int, world_size: int, local_rank: int, args):
        self.rank, self.world_size, self.args = rank, world_size, args
        self.config = vars(args).copy()
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if use_cuda and args.amp == "bf16" else nullcontext())
        self.main = is_main(rank)
        self.codec = build_codec(args.codec, args.sample_rate, args.codec_dim, path=args.codec_path).to(self.device)
        self.config["codec_dim"] = self.codec.dim
        self.frame_rate = self.codec.sample_rate / self.codec.hop_length
        self.config["fade_frames"] = switch_fade_frames(self.frame_rate) if args.section_beats > 0 else 0
        self.build_data()
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        self.model = build_model(self.config, self.codec.dim).to(self.device)
        self.disc = StyleDiscriminator(self.codec.dim).to(self.device) if args.adversarial_weight > 0 else None
        torch.manual_seed(args.seed + rank)  # then different dropout and noise on each rank
        self.norm = LatentNorm(self.codec.dim).to(self.device)
        self.ddp = (DDP(self.model, device_ids=[self.device.index] if use_cuda else None,
                        gradient_as_bucket_view=True, find_unused_parameters=False)
                    if world_size > 1 else self.model)
        self.forward, self.compiled_decode_loss = compiled(self.ddp, args), compiled(self.decode_loss, args)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           fused=True)
        if self.disc is not None:  # trained by its own step on detached latents (see discriminator_step)
            self.disc_ddp = (DDP(self.disc, device_ids=[self.device.index] if use_cuda else None,
                                 find_unused_parameters=True) if world_size > 1 else self.disc)
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=args.lr, betas=(0.5, 0.999),
                                                    fused=True)
        total = max(1, args.num_epochs * len(self.train_loader))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, args.warmup_steps, args.lr_schedule))
        self.epoch, self.batch_in_epoch, self.step, self.best_val = 0, 0, 0, math.inf
        self.history: list[dict] = []
        self.nonfinite_in_row = torch.zeros((), dtype=torch.long, device=self.device)
        self.stop, self.stopped = StopFlag(), False
        self.ckpt_dir = os.path.join(args.checkpoint_dir, args.run_name)
        self.log_dir = os.path.join(args.log_dir, args.run_name)
        self.writer = None

    def close(self) -> None:
        """Release what outlives training: the signal handlers, the log writer and the loaders' worker processes.
        Dropping the loaders stops their workers now. Left to the interpreter's exit, some torch releases wait 5 s
        for each persistent worker of a loader with pinned memory (pytorch/pytorch#81794): minutes on a GPU node."""
        self.stop.close()
        if self.writer is not None:
            self.writer.close()
        self.train_loader = self.val_loader = None

    def log(self, message: str) -> None:
        if self.main:
            tqdm.write(message)

    # ---------------------------------------------------- data

    def build_data(self) -> None:
        a = self.args
        train_dir, val_dir = os.path.join(a.dataset_folder, "train"), os.path.join(a.dataset_folder, "val")
        segment = a.segment_samples or infer_segment_samples(train_dir)
        self.segment_samples = self.config["segment_samples"] = segment
        common = dict(sample_rate=a.sample_rate, segment_samples=segment, seed=a.seed, skip_bad_files=a.skip_bad_files)
        for folder in (train_dir, val_dir):
            if problem := path_problem(folder, "folder"):
                raise FileNotFoundError(f"pairs folder {folder}: {problem}")
        problems = []
        datasets = {}
        for split, folder, shuffle in (("train", train_dir, a.shuffle_targets), ("val", val_dir, False)):
            common["align_targets"] = shuffle and a.align_targets
            scan = [scan_pairs(folder, a.sample_rate, segment, True, a.silence_db) if self.main else None]
            if self.main:  # a folder from before beats.json gets its grids once, before any other rank reads them
                load_beat_grids(folder, scan[0][0], a.sample_rate, True)
            if dist.is_initialized():  # rank 0 reads every file once; the others take its verdict
                dist.broadcast_object_list(scan, src=0)
            try:
                datasets[split] = WavPairsDataset(folder, shuffle_targets=shuffle, scan=scan[0], **common)
            except BadDataError as err:
                problems += err.problems
                continue
            problems += datasets[split].problems
        if problems and not a.skip_bad_files:
            raise BadDataError(problems)
        if problems:
            self.log(f"⚠️  skipping {len(problems)} bad file(s):\n" + str(BadDataError(problems)).split("\n", 1)[1])
        for split, dataset in datasets.items():
            if len(dataset) == 0:
                raise BadDataError([(os.path.join(a.dataset_folder, split), "no usable pairs")])
        self.train_set, self.val_set = datasets["train"], datasets["val"]
        self.train_data, self.val_data = self.train_set, self.val_set
        if a.cache_latents:
            self.train_data, self.val_data = (self.cached(d) for d in (self.train_set, self.val_set))
        pin = self.device.type == "cuda"
        self.workers = workers = self.loader_workers()
        # a compiled step drops each epoch's last, smaller batch: one graph then serves every step
        drop_last = a.compile and len(self.train_data) // self.world_size > a.batch_size
        self.train_loader, self.train_sampler = build_loader(self.train_data, a.batch_size, self.world_size, self.rank,
                                                             True, a.seed, workers, pin, drop_last)
        self.val_loader, _ = build_loader(self.val_data, a.batch_size, self.world_size, self.rank, False, a.seed,
                                          workers, pin)

    def cached(self, dataset: WavPairsDataset) -> CachedLatents:
        """The dataset with its latents from the cache. A missing or stale cache is filled by every rank, each
        encoding its share of the pairs, and is complete and valid when this returns."""
        path = CachedLatents.path_for(dataset, self.codec.settings)
        missing = [not os.path.isfile(path)]  # rank 0 decides, so no rank can see the file appear half-way
        if dist.is_initialized():
            dist.broadcast_object_list(missing, src=0)
        if missing[0]:
            partial = path + ".partial.npy"
            if self.main:
                CachedLatents.allocate(partial, len(dataset), self.codec.dim,
                                       self.codec.num_frames(dataset.segment_samples))
            if dist.is_initialized():
                dist.barrier()
            CachedLatents.fill(dataset, self.codec, partial, self.device, self.rank, self.world_size, self.main)
            if dist.is_initialized():
                dist.barrier()
            if self.main:
                os.replace(partial, path)
                self.log(f"Latent cache written: {path}")
        if dist.is_initialized():
            dist.barrier()
        return CachedLatents(dataset, path)

    def loader_workers(self) -> int:
        """Data-loader workers of this rank: the CPUs it may use minus one for the training loop (none on CPU,
        where the workers would take cores from the model), never more than that."""
        spare = max(0, cpus_per_rank() - 1)
        wanted = self.args.num_workers
        if wanted is None:
            return spare if self.device.type == "cuda" else 0
        if wanted > spare:
            self.log(f"⚠️  --num_workers {wanted} is more than this rank's {cpus_per_rank()} CPU(s) allow: "
                     f"using {spare}")
        return min(wanted, spare)

    @torch.no_grad()
    def fit_latent_norm(self, max_batches: int = 8) -> None:
        """Per-channel latent statistics from the first training batches of every rank."""
        total = total_sq = None
        count = 0.0
        self.train_sampler.set_epoch(0)
        for batch in islice(self.train_loader, max_batches):
            batch = [x.to(self.device) for i, x in enumerate(batch) if i != 2]  # waves and latents, not the beats
            z = torch.cat(batch[2:]) if len(batch) == 4 else self.codec.encode(torch.cat(batch))
            s, sq, n = latent_sums(z)
            total, total_sq, count = (s, sq, n) if total is None else (total + s, total_sq + sq, count + n)
        stats = torch.cat([total, total_sq, torch.tensor([count], dtype=torch.float64, device=total.device)])
        if dist.is_initialized():
            dist.all_reduce(stats)
        d = self.codec.dim
        self.norm.fit(stats[:d], stats[d:2 * d], float(stats[-1]))

    # ---------------------------------------------------- one step

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.norm.normalize(self.codec.encode(wave))

    def compute_loss(self, batch: list[torch.Tensor], training: bool) -> tuple[torch.Tensor, dict, tuple]:
        """The training objective of one batch (waveforms, the input's beats, and cached latents if any), its
        detached parts and the waveforms (output, input, target). Training runs the compiled model and loss where
        --compile is set."""
        beats = batch[2]
        inp, tgt, *cached = (x.to(self.device, non_blocking=True) for i, x in enumerate(batch) if i != 2)
        if cached:
            z_in, z_tgt = (self.norm.normalize(z) for z in cached)
        else:
            z_in, z_tgt = self.encode(inp), self.encode(tgt)
        balance = self.draw_balance(inp.shape[0]) if training else None
        source = reference = None
        if training and self.args.style_weight > 0:  # the target of the batch's previous pair, for half of them
            source, present = z_tgt.roll(1, dims=0), self.draw_presence(z_tgt.shape[0])
            reference = source * present[:, None, None]  # all zeros: no reference
        sections = self.model.sections(beats, z_in.shape[-1], self.frame_rate)
        if sections is not None:
            sections = sections.to(self.device, non_blocking=True)
        with self.amp:
            z_out, reg = (self.forward if training else self.model)(z_in, z_tgt, balance=balance,
                                                                    style_reference=reference, sections=sections)
        out, loss, terms = (self.compiled_decode_loss if training else self.decode_loss)(z_out, inp, tgt, balance)
        terms["recon_loss"] = loss.detach()
        if source is not None:  # examples without a reference add nothing
            style = (style_distance(z_out.float(), source) * present).mean()
            loss = loss + self.args.style_weight * style
            terms["style_loss"] = style.detach()
        if reg is not None:
            loss = loss + self.args.mask_reg_weight * reg
            terms["mask_reg_loss"] = reg.detach()
        if self.disc is not None:
            loss = loss + self.args.adversarial_weight * self.generator_loss(z_out.float(), z_tgt, terms)
        with torch.no_grad():
            terms["rms_in"], terms["rms_tgt"] = rms_loss(out, inp), rms_loss(out, tgt)
        return loss, terms, (out.detach(), inp, tgt)

    def decode_loss(self, z_out: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor, balance=None):
        """Decode the output latents and score the waveform against both songs: (output, loss, terms)."""
        out = self.codec.decode(self.norm.denormalize(z_out.float()))[..., : inp.shape[-1]]
        loss, terms = reconstruction_loss(out, inp, tgt, self.args.sample_rate, loss_weights(self.config), balance)
        return out, loss, terms

    def draws(self, batch: int, stream: int) -> torch.Tensor:
        """`batch` uniform numbers in [0, 1) on the device, a function of (seed, rank, step, stream) alone: data
        loading, compilation and resuming never change them."""
        generator = torch.Generator().manual_seed(((self.args.seed * 4099 + self.rank) * 1_000_003 + self.step) * 7
                                                  + stream)
        return torch.rand(batch, generator=generator).to(self.device, non_blocking=True)

    def draw_presence(self, batch: int) -> torch.Tensor:
        """--style_weight: which training examples get a style reference (1) and which none (0), half and half."""
        return (self.draws(batch, 1) < 0.5).float()

    def draw_balance(self, batch: int) -> torch.Tensor | None:
        """The agent's wanted input share for each training example, uniform in --balance_range (None: even)."""
        lo, hi = self.args.balance_range
        if not self.args.use_creative_agent or lo == hi == 0.5:
            return None
        return lo + (hi - lo) * self.draws(batch, 0)

    def anneal_gumbel(self) -> None:
        """--hard_masks: the Gumbel temperature of this step, geometric from --gumbel_tau_start to --gumbel_tau_end."""
        a = self.args
        progress = min(1.0, self.step / max(1, a.num_epochs * len(self.train_loader) - 1))
        self.model.creative_agent.mask_generator.tau.fill_(a.gumbel_tau_start * (a.gumbel_tau_end
                                                                                 / a.gumbel_tau_start) ** progress)

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
        fake, real = self.fake_real
        logits, _ = self.disc_ddp(torch.cat([real, fake]))  # one forward: DDP wants one per backward
        labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)]).to(logits)
        disc_loss = F.binary_cross_entropy_with_logits(logits, labels)
        self.disc_optimizer.zero_grad(set_to_none=True)
        disc_loss.backward()
        step_if_finite(self.disc_optimizer, torch.isfinite(disc_loss))
        terms["adv_disc_loss"] = disc_loss.detach()

    def train_step(self, batch: list[torch.Tensor]) -> dict:
        """One optimiser step; its detached terms, with `finite`: False when the loss or the gradients were not
        finite, and then no weight changed. That is decided on the device, so the step never waits for it."""
        self.ddp.train()
        if self.args.cuda_graphs:  # the outputs of the last step are dead: CUDA graphs may reuse their memory
            torch.compiler.cudagraph_mark_step_begin()
        if self.args.hard_masks and self.args.use_creative_agent:
            self.anneal_gumbel()
        loss, terms, _ = self.compute_loss(batch, training=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # a non-finite loss on any rank makes the all-reduced gradients non-finite on all ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        step_if_finite(self.optimizer, finite)
        self.scheduler.step()
        if self.disc is not None:
            self.discriminator_step(terms)
        self.step += 1
        self.nonfinite_in_row = torch.where(finite, 0, self.nonfinite_in_row + 1)
        terms.update(loss=loss.detach(), finite=finite)
        return terms

    def check_nonfinite(self) -> None:
        """Stop after --max_nonfinite_steps skipped steps in a row (read from the device every few steps)."""
        in_row = int(self.nonfinite_in_row)
        if in_row >= self.args.max_nonfinite_steps:
            raise TrainingError(f"{in_row} non-finite steps in a row (the limit is --max_nonfinite_steps "
                                f"{self.args.max_nonfinite_steps}); stopping. The last good checkpoint is "
                                f"{os.path.join(self.ckpt_dir, 'checkpoint_last.pt')}")

    # ---------------------------------------------------- epochs

    def train_epoch(self) -> dict:
        """Train one epoch (resuming mid-epoch if a signal stopped the last run); returns rank-averaged means."""
        self.train_sampler.set_epoch(self.epoch)
        self.train_set.set_epoch(self.epoch)
        sums: dict[str, torch.Tensor] = {}  # on the device: the host reads them every SYNC_EVERY steps
        count = 0
        bar = tqdm(islice(self.train_loader, self.batch_in_epoch, None), total=len(self.train_loader),
                   initial=self.batch_in_epoch, desc=f"Epoch {self.epoch + 1}/{self.args.num_epochs}",
                   disable=not self.main, leave=False, dynamic_ncols=True)
        for count, batch in enumerate(bar, 1):
            terms = self.train_step(batch)
            self.batch_in_epoch += 1
            if self.step == 1 and "mask_reg_loss" in terms:
                self.log(f"🎨 Creative Agent mask regularization loss: {terms['mask_reg_loss'].item():.4f} "
                         f"(weight={self.args.mask_reg_weight})")
            finite = terms.pop("finite")
            for k, v in terms.items():  # a skipped step adds nothing to the means
                sums[k] = sums.get(k, 0) + torch.where(finite, v, torch.zeros_like(v))
            sums["steps"] = sums.get("steps", 0) + finite.float()
            if count % SYNC_EVERY == 1:
                self.check_nonfinite()
                bar.set_postfix(loss=f"{float(terms['loss']):.4f}")
            if (count % SYNC_EVERY == 1 or not dist.is_initialized()) and self.stop.agreed(self.device):
                self.stopped = True
                break
        self.check_nonfinite()
        keys = sorted(k for k in sums if k != "steps")
        reduced = all_reduce_sum([float(sums[k]) for k in keys] + [float(sums.get("steps", 0)), count], self.device)
        steps = reduced[-2]
        means = {k: v / max(steps, 1.0) for k, v in zip(keys, reduced, strict=False)}
        means["skipped_steps"] = int(reduced[-1] - steps)
        return means

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation over all ranks: the reconstruction loss (without the mask regularisation, as evaluate.py
        reports it), what a listener hears (input share, distances to both songs; in time, on the first
        IN_TIME_PAIRS pairs of each rank) and the mask metrics."""
        self.ddp.eval()
        names = ("loss", "rms_in", "rms_tgt", "lsd_in_db", "lsd_tgt_db", "input_share", "temporal_variation",
                 "complementarity", "coverage", "balance")
        sums = [0.0] * len(names)
        count = 0
        mask_sum = mask_sq = None  # of the input masks, for their variability from pair to pair
        timing = []
        for batch in self.val_loader:
            _, terms, (out, inp, tgt) = self.compute_loss(batch, training=False)
            m_in, m_tgt = self.model.last_masks
            heard_now = distances_and_share(out, inp, tgt)
            metrics = mask_metrics(m_in, m_tgt)
            b = batch[0].shape[0]
            values = [float(terms["recon_loss"]), float(terms["rms_in"]), float(terms["rms_tgt"]),
                      *(float(heard_now[k].mean()) for k in ("lsd_in_db", "lsd_tgt_db", "input_share")),
                      float(temporal_variation(m_in).mean()),
                      metrics["complementarity"], metrics["coverage"], metrics["balance"]]
            sums = [s + v * b for s, v in zip(sums, values, strict=True)]
            count += b
            waves = [w[:, 0].float().cpu().numpy() for w in (out, inp, tgt)]
            timing += [in_time(o, i, t, beats.numpy(), self.args.sample_rate)
                       for o, i, t, beats in islice(zip(*waves, batch[2], strict=True), IN_TIME_PAIRS - len(timing))]
            m = m_in.float()
            mask_sum = m.sum(0) if mask_sum is None else mask_sum + m.sum(0)
            mask_sq = m.square().sum(0) if mask_sq is None else mask_sq + m.square().sum(0)
        reduced = all_reduce_sum(sums + [count], self.device)
        result = {k: v / max(reduced[-1], 1.0) for k, v in zip(names, reduced, strict=False)}
        moments = torch.stack([mask_sum, mask_sq]).double()
        if dist.is_initialized():
            dist.all_reduce(moments)
        mean, mean_sq = moments / max(reduced[-1], 1.0)
        result["mask_variability"] = float((mean_sq - mean.square()).clamp_min(0).sqrt().mean())
        totals = all_reduce_sum([v for k in IN_TIME_KEYS for v in finite_sum(r[k] for r in timing)], self.device)
        for i, key in enumerate(IN_TIME_KEYS):  # the mean of the finite values of every rank
            total, n = totals[2 * i : 2 * i + 2]
            result[key] = total / n if n else math.nan
        return result

    # ---------------------------------------------------- checkpoints and logs

    def state(self) -> dict:
        state = dict(project=PROJECT, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                     step=self.step, best_val=self.best_val, latent_norm=self.norm.state_dict(),
                     rng=gather_rng_states(self.device), nonfinite_in_row=int(self.nonfinite_in_row),
                     world_size=self.world_size, config=self.config)
        if self.disc is not None:
            state.update(discriminator=self.disc.state_dict(), disc_optimizer=self.disc_optimizer.state_dict())
        return state

    def save(self, *names: str) -> None:
        state = self.state()  # a collective: every rank takes part, rank 0 writes
        if self.main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            for name in names:
                save_checkpoint(os.path.join(self.ckpt_dir, name), state)

    def restore(self, path: str) -> None:
        state = load_checkpoint(path)
        saved = state["config"]
        changed = [f"{k}={setting(saved, k)!r} (now {self.config.get(k)!r})" for k in MODEL_KEYS
                   if setting(saved, k) != self.config.get(k)]
        if changed:
            raise CheckpointError(f"checkpoint {path} was trained with another configuration: {', '.join(changed)}")
        load_model_state(self.model, state["model"], path)
        if ("discriminator" in state) != (self.disc is not None):
            raise CheckpointError(f"checkpoint {path} was trained {'with' if 'discriminator' in state else 'without'}"
                                  f" the adversarial loss; resume it with the same --adversarial_weight setting")
        if self.disc is not None:
            self.disc.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.norm.load_state_dict(state["latent_norm"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best_val = state["best_val"]
        self.nonfinite_in_row.fill_(state["nonfinite_in_row"])
        if state["world_size"] == self.world_size:
            rng = state["rng"][self.rank]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:
            self.log(f"⚠️  {path} was saved by {state['world_size']} process(es); RNG states are not restored")
        metrics = os.path.join(self.log_dir, "metrics.jsonl")
        if os.path.isfile(metrics):
            with open(metrics) as f:
                self.history = [r for r in map(json.loads, filter(str.strip, f)) if r["epoch"] <= self.epoch]
        self.log(f"↪️  Resumed from {path}: epoch {self.epoch}, step {self.step}"
                 + (f", {self.batch_in_epoch} batches into epoch {self.epoch + 1}" if self.batch_in_epoch else ""))

    def write_logs(self, record: dict) -> None:
        self.history.append(record)
        os.makedirs(self.log_dir, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write(os.path.join(self.log_dir, "metrics.jsonl"), lambda f: f.write(text.encode()))
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.log_dir)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()
        try:
            from plot_training import plot_runs

            plot_runs([self.log_dir], os.path.join(self.log_dir, "training_curves.png"))
        except Exception as err:  # a picture must never stop a training run
            self.log(f"⚠️  training_curves.png not written: {err}")

    def example(self) -> None:
        """Arrange the input of the first validation pair with the target of another (laid on its grid, as
        arrange.py does) and save the WAV and a picture of its masks, with the beat grid, in the log folder."""
        from arrange import arrange_song, plot_masks, prepare_songs, save_wave

        (song, _, beats), other = self.val_set[0], self.val_set[len(self.val_set) // 2][1][0]
        self.model.eval()
        grid, other, _ = prepare_songs(song[0], other, self.args.sample_rate, song_beats=beats.numpy())
        model, norm = self.model.cpu(), self.norm.cpu()
        try:
            out, masks, attention, sections = arrange_song(model, self.codec.cpu(), norm, song[0], other,
                                                           self.segment_samples, song_grid=grid,
                                                           keep_attention=self.model.use_creative_agent)
        finally:
            self.model.to(self.device), self.norm.to(self.device), self.codec.to(self.device)
        save_wave(os.path.join(self.log_dir, "arrangement_example.wav"), out, self.args.sample_rate)
        plot_masks(os.path.join(self.log_dir, "masks_example.png"), masks, song[0], other, out, self.args.sample_rate,
                   self.codec.hop_length, attention, title=self.args.run_name, beats=grid.beats, sections=sections)

    # ---------------------------------------------------- the run

    def banner(self) -> None:
        a = self.args
        if a.use_creative_agent:
            self.log("🎨 Creative Agent ENABLED")
        else:
            self.log(f"Creative Agent disabled, masking: {a.mask_type}")
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"Run {a.run_name}: {len(self.train_set)} train / {len(self.val_set)} val pairs, "
                 f"{self.segment_samples / a.sample_rate:.2f} s segments, codec {a.codec} (D={self.codec.dim}), "
                 f"{n_params / 1e6:.2f}M parameters, {self.world_size} process(es) on {self.device.type}, "
                 f"{self.workers} data-loader worker(s) and {torch.get_num_threads()} thread(s) per process")

    def fit(self) -> int:
        a = self.args
        resume = find_resume_checkpoint(a.resume, a.checkpoint_dir, a.run_name_given) if a.resume else None
        if resume:
            self.ckpt_dir, self.log_dir = os.path.dirname(resume), os.path.join(a.log_dir,
                                                                                 os.path.basename(os.path.dirname(resume)))
            self.args.run_name = self.config["run_name"] = os.path.basename(self.ckpt_dir)
            self.restore(resume)
        else:
            if a.resume == "auto":
                self.log("No checkpoint to resume from: starting a new run")
            self.fit_latent_norm()
        self.banner()
        while self.epoch < a.num_epochs:
            start = time.time()
            train = self.train_epoch()
            if self.stopped:
                self.save("checkpoint_last.pt")
                self.log(f"🛑 {self.stop.signal or 'stop signal'} received: saved checkpoint_last.pt at epoch "
                         f"{self.epoch + 1}, batch {self.batch_in_epoch}; continue with --resume auto")
                job = os.environ.get("SLURM_JOB_ID")
                if self.main and job and a.requeue:
                    self.log(requeue_slurm_job(job))
                return 0
            val = self.validate()
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            record = dict(epoch=self.epoch, step=self.step, train_loss=train.get("loss", math.nan),
                          val_loss=val["loss"], rms_in=val["rms_in"], rms_tgt=val["rms_tgt"],
                          mask_reg_loss=train.get("mask_reg_loss"), complementarity=val["complementarity"],
                          coverage=val["coverage"], balance=val["balance"], input_share=val["input_share"],
                          temporal_variation=val["temporal_variation"], mask_variability=val["mask_variability"],
                          lsd_in_db=val["lsd_in_db"], lsd_tgt_db=val["lsd_tgt_db"],
                          **{k: val[k] for k in IN_TIME_KEYS},
                          lr=self.scheduler.get_last_lr()[0], seconds=time.time() - start,
                          skipped_steps=train["skipped_steps"])
            record.update({k: train[k] for k in ("adv_gen_loss", "adv_disc_loss", "style_loss") if k in train})
            best = val["loss"] < self.best_val
            self.best_val = min(self.best_val, val["loss"])
            names = ["checkpoint_last.pt"] + (["checkpoint_best.pt"] if best else [])
            if a.save_every and self.epoch % a.save_every == 0:
                names.append(f"checkpoint_epoch_{self.epoch}.pt")
            self.save(*names)
            if self.main:
                self.write_logs(record)
                reg = f"{record['mask_reg_loss']:.4f}" if record["mask_reg_loss"] is not None else "n/a"
                self.log(f"Epoch {self.epoch}: Loss={record['train_loss']:.4f}, Val={val['loss']:.4f}, "
                         f"rms_in={val['rms_in']:.4f}, rms_tgt={val['rms_tgt']:.4f}, Mask reg={reg}, "
                         f"Complementarity={val['complementarity']:.1f}%, Coverage={val['coverage']:.1f}%, "
                         f"Input share={val['input_share']:.2f}, Temporal var={val['temporal_variation']:.2f}, "
                         f"Switches/s={val['switches_per_s']:.2f}, On beat={val['on_beat']:.0%} "
                         f"(chance {val['on_beat_chance']:.0%})"
                         + (f", skipped {train['skipped_steps']} non-finite step(s)" if train["skipped_steps"] else ""))
        if self.main:
            self.example()
            self.log(f"✅ Done. Checkpoints: {self.ckpt_dir}  Logs, curves and an example arrangement: {self.log_dir}")
        return 0


def compiled(fn, args):
    """`fn` as training runs it: compiled with --compile, and with CUDA graphs (mode reduce-overhead) with
    --cuda_graphs; bench.py times the same."""
    return torch.compile(fn, mode="reduce-overhead" if args.cuda_graphs else None) if args.compile else fn


def finite_sum(values) -> tuple[float, int]:
    """(sum, count) of the finite values."""
    kept = [v for v in values if math.isfinite(v)]
    return float(sum(kept)), len(kept)


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """`optimizer.step()` that leaves weights and moments as they are where `finite` is False, decided on the device
    with no host sync: the fused AdamW kernels take the flag as `found_inf`, the way torch.amp.GradScaler passes it."""
    optimizer.found_inf = (~finite).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def lr_factor(step: int, total: int, warmup: int, schedule: str = "constant") -> float:
    """Linear warm-up over `warmup` steps, then constant, or cosine decay to 10 % of the base rate at `total` steps.

    'constant' does not depend on --num_epochs, so a run can be extended with --resume and more epochs.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def ensure_dataset(args, rank: int) -> None:
    """Generate the demo set into the default folder if it is missing (rank 0; the others wait at a barrier).

    Any other missing folder is an error, raised on every rank so that none waits for the others.
    """
    if os.path.isdir(os.path.join(args.dataset_folder, "train")):
        return
    if args.dataset_folder != DEFAULT_DATASET:
        raise FileNotFoundError(
            f"dataset folder {args.dataset_folder} has no train/ folder. Make one with\n"
            f"  python make_pairs.py --from_folder YOUR_MUSIC --out {args.dataset_folder}\n"
            f"or the demo set with\n  python make_pairs.py --demo --out {args.dataset_folder}")
    if is_main(rank):
        from make_pairs import make_demo

        print(f"🎵 {args.dataset_folder} not found: generating the demo set into it (synthetic songs, no download)")
        print(make_demo(args.dataset_folder, args.sample_rate, args.seed).report())


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory of freed tensors for the next ones. Its adaptive defaults hand big freed
    blocks back to the kernel until the largest ones have been seen, so a step can fault the same few hundred MB in
    again: the trainer's first steps do, and bench.py's model step did every time (60,000 to 100,000 page faults,
    about 8 % of its time). Blocks over 32 MiB are still handed back. False without glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, TypeError, AttributeError):  # no C library found, or one without mallopt (macOS, musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def run(rank: int, world_size: int, local_rank: int, args) -> int:
    """Train on this process; returns the exit code (2 for bad data or a bad checkpoint)."""
    keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        start_process_group(backend, rank, world_size, args.collective_timeout)
    trainer = None
    try:
        ensure_dataset(args, rank)
        if dist.is_initialized():
            dist.barrier()
        trainer = Trainer(rank, world_size, local_rank, args)
        if args.prepare_only:
            trainer.log(f"✅ Checked {len(trainer.train_set)} train and {len(trainer.val_set)} val pairs; their latent "
                        f"caches are complete. Train with --cache_latents (no checkpoint was written).")
            return 0
        return trainer.fit()
    except (BadDataError, CheckpointError, CodecUnavailable, FileNotFoundError, TrainingError) as err:
        if is_main(rank):
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None  # its DDP model holds the process group
        if dist.is_initialized():
            end_process_group()
