"""Train the cascade transformer with the creative agent, a fixed mask or no masking, on 1 to N processes.

  python train_simple_ddp.py --dataset_folder dataset_wav_pairs --use_creative_agent true --num_epochs 10 --world_size 1
  python train_simple_ddp.py --mask_type temporal --world_size 4          # 4 processes on this machine
  torchrun --nproc_per_node 4 train_simple_ddp.py ...                    # or srun: joins the job from the environment

The default dataset folder is filled with the synthetic demo set when it does not exist.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

from audio_codec import CODECS
from checkpoints import str2bool
from fixed_masks import MASK_TYPES
from pairs_dataset import SILENCE_DB


def head_counts(counts: list[int]) -> int | list[int]:
    """--nhead as the model and the checkpoints take it: one count as an int (as checkpoints have always stored
    it), one count per stage as a list."""
    return counts[0] if len(counts) == 1 else counts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_folder", default="dataset_wav_pairs", help="pairs folder with train/ and val/")
    g.add_argument("--shuffle_targets", type=str2bool, default=False,
                   help="pair each training input with a random other target (default false: continuations)")
    g.add_argument("--align_targets", type=str2bool, default=False,
                   help="with --shuffle_targets: lay each drawn target on its input's grid first (tempo, beats, key, "
                        "loudness), as arrange.py lays two songs (default false; not with --cache_latents)")
    g.add_argument("--segment_seconds", type=float, default=None, help="segment length (default: the files' length)")
    g.add_argument("--sample_rate", type=int, default=24000, help="sample rate of the pairs and codec (24000)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="data loader workers per rank (default: 4 on GPU, 0 on CPU where they would steal cores)")
    g.add_argument("--skip_bad_files", action="store_true", help="warn about bad files and train on the rest")
    g.add_argument("--silence_db", type=float, default=SILENCE_DB,
                   help=f"a file whose RMS level is below this is silent: refused, or skipped with --skip_bad_files "
                        f"(default {SILENCE_DB:g} dBFS)")
    g = p.add_argument_group("masks")
    g.add_argument("--use_creative_agent", type=str2bool, default=False, help="learn the masks (default false)")
    g.add_argument("--mask_reg_weight", type=float, default=0.1, help="weight of the agent's mask regularisation")
    g.add_argument("--balance_loss_weight", type=float, default=0.0,
                   help="extra weight on the agent's balance term (default 0: already in the regularisation)")
    g.add_argument("--adversarial_weight", type=float, default=0.0,
                   help="weight of a style discriminator's verdict on the output (default 0: off)")
    g.add_argument("--agent", default="attention", choices=("attention", "compositional"),
                   help="attention (default): the agent masks each song; compositional: it splits each song into "
                        "rhythm, harmony and timbre and takes each component from one song or the other")
    g.add_argument("--agent_gates", default="frame", choices=("frame", "cell"),
                   help="what the agent decides: which song each frame comes from (frame, default) or each "
                        "channel x frame cell (cell)")
    g.add_argument("--agent_block_frames", type=count, default=32, metavar="N",
                   help="with frame gates, decide once per block of N frames, so the songs switch only at block "
                        "edges (default 32; 0: every frame, from scores smoothed over 16 frames)")
    g.add_argument("--section_beats", type=count, default=2, metavar="N",
                   help="the agent (frame gates) and the temporal rule decide once per section of N beats of the "
                        "input's beat grid, so the songs switch only on the beat (default 2; 0: fixed blocks of "
                        "--agent_block_frames / --temporal_segment_frames frames, as before); songs without a "
                        "pulse fall back to those blocks")
    g.add_argument("--balance_range", type=share_range, default=(0.2, 0.8), metavar="LO,HI",
                   help="train the agent for any wanted input share: each example draws one from LO..HI, and "
                        "arrange.py/evaluate.py --balance choose it later (default 0.2,0.8; 0.5,0.5: always even)")
    g.add_argument("--agent_scales", type=frame_scales, default=(1,), metavar="S1,S2,...",
                   help="time scales in frames at which the agent attends, fused by summation (default 1; for "
                        "example 1,4,16 adds attention between means of 4 and of 16 frames)")
    g.add_argument("--hard_masks", type=str2bool, default=False,
                   help="train the agent's decisions with Gumbel noise, straight-through 0/1 (default false)")
    g.add_argument("--gumbel_tau_start", type=float, default=1.0, help="Gumbel temperature at the first step (1.0)")
    g.add_argument("--gumbel_tau_end", type=float, default=0.1,
                   help="Gumbel temperature at the last step, reached geometrically (default 0.1)")
    g.add_argument("--style_weight", type=float, default=0.0,
                   help="W > 0: a style reference conditions the agent and the cascade (arrange.py "
                        "--style_reference); trained on the target of another pair in half of the examples, with "
                        "W x the distance between the output's and the reference's per-channel level and spread "
                        "(default 0: off)")
    g.add_argument("--mask_type", default="none", choices=MASK_TYPES, help="fixed mask when the agent is off")
    g.add_argument("--temporal_segment_frames", type=int, default=32, help="frames per temporal-mask segment")
    g.add_argument("--frequency_split", type=float, default=0.5, help="share of channels the input keeps")
    g = p.add_argument_group("model")
    g.add_argument("--codec", default="mdct", choices=CODECS, help="frozen codec (default mdct, weight-free)")
    g.add_argument("--codec_path", default=None, help="local folder of the EnCodec weights")
    g.add_argument("--codec_dim", type=int, default=128, help="MDCT bins D (default 128, as EnCodec)")
    g.add_argument("--num_transformer_layers", type=int, default=2, help="cascade stages (default 2)")
    g.add_argument("--num_layers", type=int, default=6, help="transformer layers per stage (default 6)")
    g.add_argument("--nhead", type=int, nargs="+", default=[4], metavar="N",
                   help="attention heads, for every stage or one count per stage (default 4: head dims 64 and 96 "
                        "at the default widths, fast on GPUs)")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--anti_cheating", type=float, default=0.0, help="relative noise on the target of later stages")
    g = p.add_argument_group("loss weights (against input and target)")
    for kind, default in (("wave", 1.0), ("stft", 1.0), ("mel", 0.0)):
        for source in ("input", "target"):
            g.add_argument(f"--{kind}_{source}_weight", type=float, default=default)
    g.add_argument("--far_lsd_weight", type=float, default=1.0,
                   help="weight of the log-spectral distance to the farther of the two songs (default 1): "
                        "an arrangement must stay close to both, which copying one song cannot do")
    g = p.add_argument_group("optimisation")
    g.add_argument("--num_epochs", "--epochs", type=int, default=10, help="epochs (default 10)")
    g.add_argument("--batch_size", type=int, default=4, help="pairs per process and step (default 4)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--warmup_steps", type=int, default=0, help="steps of linear warm-up (default 0)")
    g.add_argument("--lr_schedule", default="constant", choices=("constant", "cosine"),
                   help="after warm-up: constant (default; runs can be extended) or cosine decay to 10%% over "
                        "--num_epochs")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (default 1.0)")
    g.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="stop after this many non-finite steps in a row (each is skipped)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    g.add_argument("--amp", default="bf16", choices=("bf16", "none"), help="bf16 autocast on CUDA (default bf16)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="with --compile: CUDA graphs (mode reduce-overhead) to save kernel launches on GPUs")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode the pairs once into a memory-mapped cache (SPLIT/.latent_cache), skipping the encoder")
    g.add_argument("--sdpa", type=str2bool, default=True, help="fused scaled_dot_product_attention (default true)")
    g = p.add_argument_group("processes, outputs")
    g.add_argument("--world_size", type=int, default=1, help="processes to spawn on this machine (default 1)")
    g.add_argument("--collective_timeout", type=float, default=600.0,
                   help="seconds before a collective gives up when a process died (default 600)")
    g.add_argument("--checkpoint_dir", default="checkpoints")
    g.add_argument("--log_dir", default="logs")
    g.add_argument("--run_name", default=None, help="default: a timestamped name")
    g.add_argument("--save_every", type=int, default=0, help="also keep checkpoint_epoch_N.pt every N epochs")
    g.add_argument("--requeue", type=str2bool, default=True,
                   help="under SLURM, a run stopped by SIGUSR1/SIGTERM before its last epoch requeues its own job "
                        "(scontrol requeue) after saving; the requeued job continues with --resume auto (default true)")
    g.add_argument("--prepare_only", action="store_true",
                   help="check every file and fill the latent cache of both splits (implies --cache_latents), then "
                        "exit without training; on N processes each encodes its share")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint; auto: this run's (or the newest run's) checkpoint_last.pt")
    args = p.parse_args(argv)
    if len(args.nhead) not in (1, args.num_transformer_layers):
        p.error(f"--nhead takes 1 or {args.num_transformer_layers} counts (one per stage), got {len(args.nhead)}")
    args.nhead = head_counts(args.nhead)
    args.run_name_given = args.run_name
    mode = "agent" if args.use_creative_agent else args.mask_type
    args.run_name = args.run_name or f"{mode}_{time.strftime('%Y%m%d_%H%M%S')}"
    args.segment_samples = round(args.segment_seconds * args.sample_rate) if args.segment_seconds else None
    args.cache_latents = args.cache_latents or args.prepare_only
    args.compile = args.compile or args.cuda_graphs
    if args.align_targets and args.cache_latents:
        p.error("--align_targets changes the targets every epoch, so their latents cannot be cached: drop "
                "--cache_latents (or --prepare_only)")
    return args


def share_range(text: str) -> tuple[float, float]:
    """'LO,HI' with 0 < LO <= HI < 1 -> (LO, HI)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI such as 0.2,0.8, got {text!r}") from None
    if not 0 < lo <= hi < 1:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI < 1, got {text!r}")
    return lo, hi


def frame_scales(text: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16): distinct positive frame counts, 1 among them."""
    try:
        scales = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame counts such as 1,4,16, got {text!r}") from None
    if 1 not in scales or min(scales) < 1 or len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError(f"expected distinct positive frame counts including 1, got {text!r}")
    return scales


def count(text: str) -> int:
    """A whole number >= 0 (of frames or beats)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 such as 32, got {text!r}")
    return int(text)


def environment_ranks() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or SLURM's environment, or None outside such a job."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cpu_threads() -> None:
    """One compute thread per CPU this rank may use (its affinity or SLURM's --cpus-per-task, shared among the
    node's processes), for torch and for the OpenMP of anything it starts."""
    from distributed import cpus_per_rank

    threads = cpus_per_rank()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def worker(index: int, world_size: int, args) -> None:
    """Entry of a spawned process: rank = local rank = index."""
    from train_simple_worker import run

    use_cpu_threads()
    code = run(index, world_size, index, args)
    if code:
        sys.exit(code)


def spawn(args) -> int:
    """Start --world_size processes here; forward SIGTERM/SIGUSR1 to them; fail fast when one of them fails."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ["LOCAL_WORLD_SIZE"] = str(args.world_size)  # the spawned processes share this machine's CPUs
    context = mp.start_processes(worker, args=(args.world_size, args), nprocs=args.world_size, join=False,
                                 start_method="spawn")

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as err:
        print(f"error: process {err.error_index} exited with code {err.exit_code}; all processes stopped",
              file=sys.stderr)
        return err.exit_code if err.exit_code and err.exit_code > 0 else 1
    except mp.ProcessRaisedException as err:
        print(f"error: process {err.error_index} failed:\n{err}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from train_simple_worker import run

    joined = environment_ranks()
    if joined is not None:
        rank, world_size, local_rank = joined
        if world_size != args.world_size and args.world_size != 1:
            print(f"note: the job has {world_size} processes; --world_size {args.world_size} is ignored")
        args.world_size = world_size
        if not torch.cuda.is_available() or args.device == "cpu":
            os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE") or str(world_size))
            use_cpu_threads()
        return run(rank, world_size, local_rank, args)
    if args.world_size > 1:
        return spawn(args)
    return run(0, 1, 0, args)


if __name__ == "__main__":
    sys.exit(main())
