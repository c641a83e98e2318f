"""The fast path's switches that are not the model's: compiling (--compile: auto, graphs, default, none; eager
where the compiler fails) and the memory allocator. The trainer and bench.py run through here, so bench.py times
what training runs, with torch alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch


def compile_mode(choice: str, device: torch.device) -> str:
    """What --compile CHOICE means on `device`: auto is CUDA graphs on a GPU (twice the eager speed, docs/
    performance.md) and eager on a CPU (where compiling takes minutes and saves little)."""
    return ("graphs" if device.type == "cuda" else "none") if choice == "auto" else choice


class EagerOnFailure:
    """A compiled function that, if compiling fails (an old driver, an op the compiler cannot take), says why in one
    line and calls the eager function from then on: training never stops for the compiler."""

    def __init__(self, compiled_fn, eager_fn, log):
        self.compiled_fn, self.eager_fn, self.log, self.failed = compiled_fn, eager_fn, log, False

    def give_up(self, err: Exception) -> None:
        if not self.failed:
            self.failed = True
            self.log(f"⚠️  torch.compile failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:160]}); "
                     f"going on eagerly (--compile none skips compiling)")

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled_fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001  whatever the compiler raises; an error of the code recurs below
                self.give_up(err)
        return self.eager_fn(*args, **kwargs)


def first_step(step, batch, compiled_fns):
    """`step(batch)`, once more eagerly if it fails while compiled: a backward that fails to compile fails in
    loss.backward(), outside the compiled functions (whose own failures they catch)."""
    try:
        return step(batch)
    except Exception as err:  # noqa: BLE001
        live = [f for f in compiled_fns if isinstance(f, EagerOnFailure) and not f.failed]
        if not live:
            raise
        for f in live:
            f.give_up(err)
        return step(batch)


def compiled(fn, config, log=print):
    """`fn` as training runs it, by --compile (resolved by compile_mode): eager, torch.compile'd, or with CUDA graphs
    (mode reduce-overhead), falling back to eager if compiling fails; bench.py times the same."""
    if config.compile in ("none", "auto"):
        return fn
    return EagerOnFailure(torch.compile(fn, mode="reduce-overhead" if config.compile == "graphs" else None), fn, log)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory of freed tensors for the next ones. Its adaptive defaults hand big freed
    blocks back to the kernel until the largest ones have been seen, so a step can fault the same few hundred MB in
    again: the trainer's first steps do, and bench.py's model step did every time (docs/performance.md). Blocks
    over 32 MiB are still handed back. False without glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, TypeError, AttributeError):  # no C library found, or one without mallopt (macOS, musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
