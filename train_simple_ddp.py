"""Train the cascade transformer with the creative agent, a fixed mask or no masking, on 1 to N processes.

  python train_simple_ddp.py --dataset_folder dataset_wav_pairs --use_creative_agent true --num_epochs 10 --world_size 1
  python train_simple_ddp.py --mask_type temporal --world_size 4          # 4 processes on this machine
  torchrun --nproc_per_node 4 train_simple_ddp.py ...                    # or srun: joins the job from the environment

The default dataset folder is filled with the synthetic demo set when it does not exist. Every flag is a field of
config.Config, where its default and help live.
"""
from __future__ import annotations

import os
import signal
import socket
import sys

import torch
import torch.multiprocessing as mp

from config import Config, parse_args


def slurm_port(job_id: str) -> int:
    """The master's port of a SLURM job: from its id, so jobs sharing a node get different ports (ids closer than
    40000 apart)."""
    return 20000 + int(job_id or 0) % 40000


def environment_ranks() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or SLURM's environment, or None outside such a job."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
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


def worker(index: int, world_size: int, config: Config) -> None:
    """Entry of a spawned process: rank = local rank = index."""
    from train_simple_worker import run

    use_cpu_threads()
    code = run(index, world_size, index, config)
    if code:
        sys.exit(code)


def spawn(config) -> int:
    """Start --world_size processes here; forward SIGTERM/SIGUSR1 to them; fail fast when one of them fails."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ["LOCAL_WORLD_SIZE"] = str(config.world_size)  # the spawned processes share this machine's CPUs
    context = mp.start_processes(worker, args=(config.world_size, config), nprocs=config.world_size, join=False,
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
    config = parse_args(argv, __doc__)
    from train_simple_worker import run

    joined = environment_ranks()
    if joined is not None:
        rank, world_size, local_rank = joined
        if world_size != config.world_size and config.world_size != 1:
            print(f"note: the job has {world_size} processes; --world_size {config.world_size} is ignored")
        config.world_size = world_size
        if not torch.cuda.is_available() or config.device == "cpu":
            os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE") or str(world_size))
            use_cpu_threads()
        return run(rank, world_size, local_rank, config)
    if config.world_size > 1:
        return spawn(config)
    return run(0, 1, 0, config)


if __name__ == "__main__":
    sys.exit(main())
