"""One rank's training: build everything, then the loop (`train_epoch`, `validate`, checkpoints, logs).

`run(rank, world_size, local_rank, config)` is called by train_simple_ddp.py once per process. What is optimised
lives in objective.py, the data in pairs_dataset.py, the logs in run_log.py and the example in inference.py.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from itertools import islice

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from audio_codec import CodecUnavailable, LatentNorm, build_codec, latent_sums
from beats import bar_of, known_pulse, switch_fade_frames
from checkpoints import (
    PROJECT,
    CheckpointError,
    check_same_model,
    find_resume_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from config import Config
from distributed import (
    StopFlag,
    all_reduce_sum,
    end_process_group,
    gather_rng_states,
    is_main,
    requeue_slurm_job,
    restore_rng_states,
    start_process_group,
)
from fast_path import compile_mode, compiled, first_step, keep_freed_memory
from inference import Arranger, write_example
from listening import IN_TIME_KEYS, LAYER_KEYS, heard_in_time_and_layers
from model_simple_transformer import build_model
from objective import Objective, Scored, figures, optimizer_step
from pairs_dataset import BadDataError, TrainingData
from run_log import RunLog

DEFAULT_DATASET = "dataset_wav_pairs"
IN_TIME_PAIRS = 64  # validation pairs per rank whose arrangement is measured in time (beat tracking is not free)
SYNC_EVERY = 10  # training steps between the host's reads of device values (progress bar, non-finite run, signals)
VALIDATION_KEYS = ("loss", "rms_in", "rms_tgt", "lsd_in_db", "lsd_tgt_db", "input_share", "temporal_variation",
                   "complementarity", "coverage", "balance", "mask_reg_loss")


class TrainingError(RuntimeError):
    """Training cannot go on (for example too many non-finite steps in a row)."""


class Trainer:
    """One rank's run: data, codec, model, objective, optimiser and logs. Rank 0 prints and writes."""

    def __init__(self, rank: int, world_size: int, local_rank: int, config: Config):
        self.rank, self.world_size, self.main = rank, world_size, is_main(rank)
        self.config = c = replace(config)  # this run's copy: the data, codec and resume fill in some fields
        use_cuda = torch.cuda.is_available() and c.device != "cpu"
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        c.compile = compile_mode(c.compile, self.device)
        self.codec = build_codec(c.codec, c.sample_rate, c.codec_dim, path=c.codec_path).to(self.device)
        c.codec_dim, frame_rate = self.codec.dim, self.codec.sample_rate / self.codec.hop_length
        c.fade_frames = switch_fade_frames(frame_rate) if c.section_beats > 0 else 0
        self.data = TrainingData(c, self.codec, self.device, rank, world_size, self.log)
        torch.manual_seed(c.seed)  # identical initial weights on every rank
        self.model = build_model(c, self.codec.dim).to(self.device)
        self.norm = LatentNorm(self.codec.dim).to(self.device)
        self.ddp = (DDP(self.model, device_ids=[self.device.index] if use_cuda else None,
                        gradient_as_bucket_view=True, find_unused_parameters=False) if world_size > 1 else self.model)
        self.objective = Objective(c, self.codec, self.norm, self.model, compiled(self.ddp, c, self.log),
                                   compile_fn=lambda fn: compiled(fn, c, self.log))
        torch.manual_seed(c.seed + rank)  # then different dropout and noise on each rank
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay, fused=True)
        self.total_steps = max(1, c.num_epochs * len(self.data.train_loader))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, c.warmup_steps, c.lr_schedule))
        self.epoch, self.batch_in_epoch, self.step, self.best_val = 0, 0, 0, math.inf
        self.first_step = True  # this process's first: the console says what it cost (compiling) and the agent's term
        self.nonfinite_in_row = torch.zeros((), dtype=torch.long, device=self.device)
        self.stop, self.stopped = StopFlag(), False
        self.ckpt_dir = os.path.join(c.checkpoint_dir, c.run_name)
        self.run_log = RunLog(os.path.join(c.log_dir, c.run_name), self.log)

    def close(self) -> None:
        """Release what outlives training: the signal handlers, the log writer and the loaders' worker processes.
        Dropping the loaders stops their workers now. Left to the interpreter's exit, some torch releases wait 5 s
        for each persistent worker of a loader with pinned memory (pytorch/pytorch#81794): minutes on a GPU node."""
        self.stop.close()
        self.run_log.close()
        self.data.close()

    def log(self, message: str) -> None:
        if self.main:
            tqdm.write(message)

    # ---------------------------------------------------- training

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict:
        """One optimiser step; its detached terms, with `finite`: False when the loss or the gradients were not
        finite, and then no weight changed. That is decided on the device, so the step never waits for it."""
        c = self.config
        self.ddp.train()
        if c.compile == "graphs":  # the outputs of the last step are dead: CUDA graphs may reuse their memory
            torch.compiler.cudagraph_mark_step_begin()
        if c.hard_masks and c.use_creative_agent:
            self.objective.anneal_gumbel(self.step, self.total_steps)
        scored = self.objective(batch, self.step, training=True)
        loss, terms = scored.loss, scored.terms
        finite = optimizer_step(self.optimizer, loss, c.grad_clip)
        self.scheduler.step()
        self.objective.discriminator_step(terms)
        self.step += 1
        self.nonfinite_in_row = torch.where(finite, 0, self.nonfinite_in_row + 1)
        terms.update(loss=loss.detach(), finite=finite)
        return terms

    def check_nonfinite(self) -> None:
        """Stop after --max_nonfinite_steps skipped steps in a row (read from the device every few steps)."""
        in_row, limit = int(self.nonfinite_in_row), self.config.max_nonfinite_steps
        if in_row >= limit:
            raise TrainingError(f"{in_row} non-finite steps in a row (the limit is --max_nonfinite_steps {limit}); "
                                f"stopping. The last good checkpoint is "
                                f"{os.path.join(self.ckpt_dir, 'checkpoint_last.pt')}")

    def train_epoch(self) -> dict:
        """Train one epoch (resuming mid-epoch if a signal stopped the last run); returns rank-averaged means."""
        self.data.set_epoch(self.epoch)
        loader = self.data.train_loader
        sums: dict[str, torch.Tensor] = {}  # on the device: the host reads them every SYNC_EVERY steps
        count = 0
        bar = tqdm(islice(loader, self.batch_in_epoch, None), total=len(loader), initial=self.batch_in_epoch,
                   desc=f"Epoch {self.epoch + 1}/{self.config.num_epochs}", disable=not self.main, leave=False,
                   dynamic_ncols=True)
        for count, batch in enumerate(bar, 1):
            started, compiled_fns = time.perf_counter(), (self.objective.forward, self.objective.compiled_decode_loss)
            terms = first_step(self.train_step, batch, compiled_fns) if self.first_step else self.train_step(batch)
            self.batch_in_epoch += 1
            if self.first_step:
                self.first_step = False
                eager = self.config.compile == "none" or any(getattr(f, "failed", False) for f in compiled_fns)
                for line in first_step_lines(self.config, terms, time.perf_counter() - started, self.step, eager):
                    self.log(line)
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
        sums, count, masks, timing = [0.0] * len(VALIDATION_KEYS), 0, [], []
        for batch in self.data.val_loader:
            scored = self.objective(batch, self.step, training=False)
            out, inp, tgt, (m_in, _) = scored.output, scored.input, scored.target, scored.masks
            values = batch_values(scored)
            sums = [s + v * len(out) for s, v in zip(sums, values, strict=True)]
            count += len(out)
            waves = [w[:, 0].float().cpu().numpy() for w in (out, inp, tgt)]
            timing += [heard_in_time_and_layers(o, i, t, beats.numpy(), self.config.sample_rate, bar_of(bars))
                       for o, i, t, beats, bars in islice(zip(*waves, batch["beats"], batch["bars"], strict=True),
                                                          IN_TIME_PAIRS - len(timing))]
            m = m_in.float()
            masks = [m.sum(0), m.square().sum(0)] if not masks else [masks[0] + m.sum(0), masks[1] + m.square().sum(0)]
        reduced = all_reduce_sum(sums + [count], self.device)
        result = {k: v / max(reduced[-1], 1.0) for k, v in zip(VALIDATION_KEYS, reduced, strict=False)}
        result["mask_variability"] = mask_variability_across_ranks(masks, reduced[-1])
        keys = IN_TIME_KEYS + LAYER_KEYS
        totals = all_reduce_sum([v for k in keys for v in finite_sum(r[k] for r in timing)], self.device)
        for i, key in enumerate(keys):  # the mean of the finite values of every rank
            total, n = totals[2 * i : 2 * i + 2]
            result[key] = total / n if n else math.nan
        return result

    # ---------------------------------------------------- checkpoints

    def state(self) -> dict:
        return dict(project=PROJECT, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                    step=self.step, best_val=self.best_val, latent_norm=self.norm.state_dict(),
                    rng=gather_rng_states(self.device), nonfinite_in_row=int(self.nonfinite_in_row),
                    world_size=self.world_size, config=self.config.to_dict(), **self.objective.state_dict())

    def save(self, *names: str) -> None:
        state = self.state()  # a collective: every rank takes part, rank 0 writes
        if self.main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            for name in names:
                save_checkpoint(os.path.join(self.ckpt_dir, name), state)

    def restore(self, path: str) -> None:
        state = load_checkpoint(path)
        check_same_model(state["config"], self.config, path)
        load_model_state(self.model, state["model"], path)
        if ("discriminator" in state) != (self.objective.disc is not None):
            raise CheckpointError(f"checkpoint {path} was trained {'with' if 'discriminator' in state else 'without'}"
                                  f" the adversarial loss; resume it with the same --adversarial_weight setting")
        self.objective.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.norm.load_state_dict(state["latent_norm"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best_val = state["best_val"]
        self.nonfinite_in_row.fill_(state["nonfinite_in_row"])
        if not restore_rng_states(state["rng"], self.rank, self.device):
            self.log(f"⚠️  {path} was saved by {state['world_size']} process(es); RNG states are not restored")
        self.run_log.resume(self.epoch)
        self.log(f"↪️  Resumed from {path}: epoch {self.epoch}, step {self.step}"
                 + (f", {self.batch_in_epoch} batches into epoch {self.epoch + 1}" if self.batch_in_epoch else ""))

    # ---------------------------------------------------- the run

    def start(self) -> None:
        """Resume where --resume says, or start anew (fitting the latent statistics)."""
        c = self.config
        resume = find_resume_checkpoint(c.resume, c.checkpoint_dir, c.run_name_given) if c.resume else None
        if resume:
            self.ckpt_dir = os.path.dirname(resume)
            c.run_name = os.path.basename(self.ckpt_dir)
            self.run_log.folder = os.path.join(c.log_dir, c.run_name)
            self.restore(resume)
        else:
            if c.resume == "auto":
                self.log("No checkpoint to resume from: starting a new run")
            fit_latent_norm(self.norm, self.codec, self.data, self.device)

    def stop_here(self) -> int:
        """Save where the signal stopped training, requeue the SLURM job if wanted, and end this process's run."""
        self.save("checkpoint_last.pt")
        self.log(f"🛑 {self.stop.signal or 'stop signal'} received: saved checkpoint_last.pt at epoch "
                 f"{self.epoch + 1}, batch {self.batch_in_epoch}; continue with --resume auto")
        job = os.environ.get("SLURM_JOB_ID")
        if self.main and job and self.config.requeue:
            self.log(requeue_slurm_job(job))
        return 0

    def end_epoch(self, record: dict) -> None:
        """Checkpoints (last, best, every --save_every), the logs and the console line of a finished epoch."""
        best = record["val_loss"] < self.best_val
        self.best_val = min(self.best_val, record["val_loss"])
        names = ["checkpoint_last.pt"] + (["checkpoint_best.pt"] if best else [])
        if self.config.save_every and self.epoch % self.config.save_every == 0:
            names.append(f"checkpoint_epoch_{self.epoch}.pt")
        self.save(*names)
        if self.main:
            self.run_log.write(record)
            self.log(epoch_line(record))

    def example(self) -> None:
        """Arrange the first validation input with the target of another pair (laid on its grid, as arrange.py
        does) and write the WAV and a picture of its masks into the log folder."""
        val = self.data.val_set
        first, other = val[0], val[len(val) // 2]["target"][0]
        song, grid = first["input"], val.grids[0]
        pulse = known_pulse(first["beats"].numpy(), grid["input_bars"], grid["meter"])
        self.model.eval()
        arranger = Arranger(self.model.cpu(), self.codec.cpu(), self.norm.cpu(), self.config)
        try:
            write_example(arranger, song[0], other, self.run_log.folder, self.config.run_name, pulse)
        finally:
            self.model.to(self.device), self.norm.to(self.device), self.codec.to(self.device)

    def fit(self) -> int:
        self.start()
        for line in banner(self.config, self.data, self.model, self.codec.dim, self.world_size, self.device):
            self.log(line)
        while self.epoch < self.config.num_epochs:
            start = time.time()
            train = self.train_epoch()
            if self.stopped:
                return self.stop_here()
            val = self.validate()
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.end_epoch(epoch_record(self.epoch, self.step, train, val, self.scheduler.get_last_lr()[0],
                                        time.time() - start))
        if self.main:
            self.example()
            self.log(f"✅ Done. Checkpoints: {self.ckpt_dir}  Logs, curves and an example arrangement: "
                     f"{self.run_log.folder}")
        return 0


@torch.no_grad()
def fit_latent_norm(norm: LatentNorm, codec, data: TrainingData, device: torch.device, max_batches: int = 8) -> None:
    """Per-channel latent statistics from the first training batches of every rank."""
    total = total_sq = None
    count = 0.0
    data.train_sampler.set_epoch(0)
    for batch in islice(data.train_loader, max_batches):
        z = (batch["latents"].to(device).flatten(0, 1) if "latents" in batch
             else codec.encode(torch.cat([batch["input"], batch["target"]]).to(device)))
        s, sq, n = latent_sums(z)
        total, total_sq, count = (s, sq, n) if total is None else (total + s, total_sq + sq, count + n)
    stats = torch.cat([total, total_sq, torch.tensor([count], dtype=torch.float64, device=total.device)])
    if dist.is_initialized():
        dist.all_reduce(stats)
    norm.fit(stats[:codec.dim], stats[codec.dim:2 * codec.dim], float(stats[-1]))


def batch_values(scored: Scored) -> list[float]:
    """One validation batch's means (objective.figures, as evaluate.py reports them, and the agent's
    regularisation), in the order of VALIDATION_KEYS."""
    values = {**figures(scored), "mask_reg_loss": float(scored.terms.get("mask_reg_loss", math.nan))}
    return [values[k] for k in VALIDATION_KEYS]


def mask_variability_across_ranks(moments: list[torch.Tensor], count: float) -> float:
    """How much the input masks differ from pair to pair, from every rank's (sum, sum of squares) of them."""
    moments = torch.stack(moments).double()
    if dist.is_initialized():
        dist.all_reduce(moments)
    mean, mean_sq = moments / max(count, 1.0)
    return float((mean_sq - mean.square()).clamp_min(0).sqrt().mean())


def epoch_record(epoch: int, step: int, train: dict, val: dict, lr: float, seconds: float) -> dict:
    """The line of metrics.jsonl for one epoch: training means, validation figures, the learning rate and time."""
    record = dict(epoch=epoch, step=step, train_loss=train.get("loss", math.nan), val_loss=val["loss"],
                  **{k: val[k] for k in VALIDATION_KEYS[1:] + ("mask_variability",) + IN_TIME_KEYS + LAYER_KEYS},
                  train_mask_reg_loss=train.get("mask_reg_loss"),
                  lr=lr, seconds=seconds, skipped_steps=train["skipped_steps"])
    if not math.isfinite(record["mask_reg_loss"]):  # no agent, no regularisation
        record["mask_reg_loss"] = None
    record.update({k: train[k] for k in ("adv_gen_loss", "adv_disc_loss", "style_loss") if k in train})
    return record


def epoch_line(r: dict) -> str:
    """The console's summary of an epoch's record."""
    reg = (f"{r['mask_reg_loss']:.4f} (train {r['train_mask_reg_loss']:.4f})" if r["mask_reg_loss"] is not None
           else "n/a")
    return (f"Epoch {r['epoch']}: Loss={r['train_loss']:.4f}, Val={r['val_loss']:.4f}, rms_in={r['rms_in']:.4f}, "
            f"rms_tgt={r['rms_tgt']:.4f}, Mask reg={reg}, Complementarity={r['complementarity']:.1f}%, "
            f"Coverage={r['coverage']:.1f}%, Input share={r['input_share']:.2f}, "
            f"Temporal var={r['temporal_variation']:.2f}, Switches/s={r['switches_per_s']:.2f}, "
            f"On beat={r['on_beat']:.0%} (chance {r['on_beat_chance']:.0%}), Both heard={r['both_heard']:.0%}"
            + (f", skipped {r['skipped_steps']} non-finite step(s)" if r["skipped_steps"] else ""))


def banner(c: Config, data: TrainingData, model, codec_dim: int, world_size: int, device: torch.device) -> list[str]:
    """The console's first lines: what masks, what data, what model, on what, compiled how."""
    n_params = sum(p.numel() for p in model.parameters())
    graphs = "torch.compile with CUDA graphs" if device.type == "cuda" else "torch.compile, mode reduce-overhead"
    how = dict(graphs=graphs, default="torch.compile", none="eager")[c.compile]
    layers = ("" if not (c.use_creative_agent and c.agent == "layered") else
              ", layers from the pairs' stems (drums + bass)" if data.train_set.stems else
              f", layers by harmonic-percussive separation and the bass below {c.bass_hz:g} Hz")
    masks = "🎨 Creative Agent ENABLED" if c.use_creative_agent else f"Creative Agent disabled, masking: {c.mask_type}"
    return [masks + layers,
            f"Run {c.run_name}: {len(data.train_set)} train / {len(data.val_set)} val pairs, "
            f"{data.segment_samples / c.sample_rate:.2f} s segments, codec {c.codec} (D={codec_dim}), "
            f"{n_params / 1e6:.2f}M parameters, {world_size} process(es) on {device.type} ({how}), "
            f"{data.workers} data-loader worker(s) and {torch.get_num_threads()} thread(s) per process"]


def first_step_lines(c: Config, terms: dict, seconds: float, step: int, eager: bool) -> list[str]:
    """After this process's first step: how long it took where it compiled, and the agent's term in a new run."""
    lines = [] if eager else [f"⚡ first step {seconds:.1f} s, compiling ({c.compile}); the next steps are fast"]
    if step == 1 and "mask_reg_loss" in terms:
        lines.append(f"🎨 Creative Agent mask regularization loss: {terms['mask_reg_loss'].item():.4f} "
                     f"(weight={c.mask_reg_weight})")
    return lines


def finite_sum(values) -> tuple[float, int]:
    """(sum, count) of the finite values."""
    kept = [v for v in values if math.isfinite(v)]
    return float(sum(kept)), len(kept)


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


def ensure_dataset(config, rank: int) -> None:
    """Generate the demo set into the default folder if it is missing (rank 0; the others wait at a barrier).

    Any other missing folder is an error, raised on every rank so that none waits for the others.
    """
    if os.path.isdir(os.path.join(config.dataset_folder, "train")):
        return
    if config.dataset_folder != DEFAULT_DATASET:
        raise FileNotFoundError(
            f"dataset folder {config.dataset_folder} has no train/ folder. Make one with\n"
            f"  python make_pairs.py --from_folder YOUR_MUSIC --out {config.dataset_folder}\n"
            f"or the demo set with\n  python make_pairs.py --demo --out {config.dataset_folder}")
    if is_main(rank):
        from pairs_folder import make_demo

        print(f"🎵 {config.dataset_folder} not found: generating the demo set into it (synthetic songs, no download)")
        print(make_demo(config.dataset_folder, config.sample_rate, config.seed).report())


def run(rank: int, world_size: int, local_rank: int, config: Config) -> int:
    """Train on this process; returns the exit code (2 for bad data or a bad checkpoint)."""
    keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        start_process_group(backend, rank, world_size, config.collective_timeout)
    trainer = None
    try:
        ensure_dataset(config, rank)
        if dist.is_initialized():
            dist.barrier()
        trainer = Trainer(rank, world_size, local_rank, config)
        if config.prepare_only:
            data = trainer.data
            trainer.log(f"✅ Checked {len(data.train_set)} train and {len(data.val_set)} val pairs; their latent "
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
