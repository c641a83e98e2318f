"""Process-group helpers of the trainer: the group's start and end, sums across ranks, every rank's RNG state, the
CPUs a rank may use, and the stop flag that SLURM's warning signals set, with the job's self-requeue. Standard
torch.distributed only."""
from __future__ import annotations

import datetime
import gc
import os
import shutil
import signal
import subprocess

import torch
import torch.distributed as dist


def is_main(rank: int) -> bool:
    return rank == 0


def start_process_group(backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    """`init_process_group`, with torch.distributed.nn imported first. DDP imports that module on first use, and
    its functions take the default group as an argument's default value: imported once the group exists, they keep
    it for the life of the process (torch 2.13), so that `destroy_process_group()` cannot free it."""
    import torch.distributed.nn  # noqa: F401

    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


def end_process_group() -> None:
    """Free the process group before the interpreter exits: collect what may still hold it (a finished trainer's DDP
    model, in a reference cycle), then destroy it, which joins Gloo's threads. A Gloo thread still alive when the
    interpreter exits can abort a finished process ("terminate called without an active exception") as it drops
    the tensors of the last collective, so that torchrun reports the job failed and other nodes wait for it."""
    gc.collect()
    dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def gather_rng_states(device: torch.device) -> list[dict]:
    """The torch RNG states of every rank (CPU, and CUDA where used), gathered on every rank."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM's warnings before a time limit or preemption)."""

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def close(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank was signalled."""
        if not dist.is_initialized():
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def cpus_per_rank() -> int:
    """The CPU cores this process may use: SLURM's --cpus-per-task when set, else the cores it is allowed to run on
    (its affinity, which a job's cgroup restricts) shared among the processes of this node."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1")
    return max(1, allowed // max(1, int(local.split("(")[0])))


def requeue_slurm_job(job_id: str) -> str:
    """Ask SLURM to put job `job_id` back in the queue (`scontrol requeue`); returns what happened, in words.
    A failure is reported, never raised: the checkpoint is written already and the user can resubmit."""
    if shutil.which("scontrol") is None:
        return f"could not requeue SLURM job {job_id}: scontrol is not on PATH; resubmit the script by hand"
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job_id}: {err}; resubmit the script by hand"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        return (f"could not requeue SLURM job {job_id}: scontrol exited with {result.returncode}"
                f"{': ' + detail[-1] if detail else ''}; resubmit the script by hand")
    return f"requeued SLURM job {job_id}: it resumes with --resume auto when it starts again"


def restore_rng_states(states: list[dict], rank: int, device: torch.device) -> bool:
    """Set this rank's torch RNG states from a checkpoint's `states` (one per rank), when it was saved by as many
    processes as run now; False (nothing restored) when it was not."""
    if len(states) != (dist.get_world_size() if dist.is_initialized() else 1):
        return False
    torch.set_rng_state(states[rank]["cpu"])
    if "cuda" in states[rank] and device.type == "cuda":
        torch.cuda.set_rng_state(states[rank]["cuda"], device)
    return True
