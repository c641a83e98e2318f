"""Training-step throughput: model FLOP/s and utilisation (MFU) against the device's peak, end-to-end overhead,
and whether the data loader keeps up.

  python bench.py --device cpu --json
  python bench.py --device cuda --batch_size 8 --seconds 16 --codec encodec --compile none   # eager, to compare
  python bench.py --scan                     # step time and peak memory for 2, 4, 8, 16 and 32 s segments
  python bench.py --arrange A.wav B.wav [--checkpoint C]   # arrange.py's time part by part (no songs: synthetic)

Model step: forward + backward + AdamW step of SimpleTransformer at the default configuration on random latents at
the codec's frame rate, median over timed steps after warm-up; FLOPs counted by torch's FlopCounterMode.
Peak: on CPU the fp32 throughput of the best of the model's own matmul shapes and a 2048 cube, sampled for 0.3 s
between the timed steps, since a shared VM's or a hot laptop's speed drifts from second to second: MFU is the median
over steps of each step's FLOP/s against the mean of the samples on either side of it, and `mfu_vs_best_peak` the
conservative figure against the best sample of the run; on GPU the datasheet's dense bf16 figure.
End-to-end: the trainer's step from waveforms (codec, model, decoder, losses); decoder + loss: that part alone.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from unittest.mock import patch

import torch
from torch.utils.flop_counter import FlopCounterMode

from audio_codec import LatentNorm, MDCTCodec
from beats import switch_fade_frames
from config import Config, add_training_flags, head_counts, str2bool
from fast_path import compile_mode, compiled, keep_freed_memory
from listening import layer_guide
from model_simple_transformer import build_model
from objective import Objective, optimizer_step

# the training flags bench.py takes as train_simple_ddp.py declares them (its batch size, workers and agent
# switch have defaults of their own, and its --codec encodec has random weights)
TRAINING_FLAGS = ("device", "agent", "nhead", "compile", "cuda_graphs", "amp", "sdpa")
# dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s (without sparsity)
GPU_PEAK_BF16 = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                 "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}


def register_cpu_attention_flops() -> None:
    """FlopCounterMode counts the CUDA attention kernels but not the CPU flash kernel; count it the same way."""
    from torch.utils import flop_counter as fc

    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is None or forward.default in fc.flop_registry:
        return

    @fc.register_flop_formula(forward)
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    @fc.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)


def gpu_peak(name: str) -> tuple[float, str]:
    for key, tflops in GPU_PEAK_BF16.items():
        if key.lower() in name.lower():
            return tflops, f"{key} datasheet dense bf16"
    return float("nan"), f"unknown GPU {name!r}: no datasheet peak"


def matmul_shapes(model: torch.nn.Module, rows: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's own matrix products at `rows` = batch x frames (each stage's attention input,
    MLP up and down), and a 2048 cube, which a CPU's BLAS runs near its best."""
    widths = sorted({stage.proj_in.out_features for stage in model.stages})
    return [(2048, 2048, 2048)] + [(rows, k, n) for w in widths for k, n in ((w, 3 * w), (w, 4 * w), (4 * w, w))]


def cpu_peak(shapes: list[tuple[int, int, int]], seconds: float = 0.3) -> tuple[float, tuple[int, int, int]]:
    """Measured fp32 matmul throughput of this CPU in TFLOP/s, the best of repeated products of each shape
    (`seconds` shared among them), and the shape that gave it."""
    best = (0.0, shapes[0])
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        fastest, end = float("inf"), time.perf_counter() + seconds / len(shapes)
        while time.perf_counter() < end:
            start = time.perf_counter()
            a @ b
            fastest = min(fastest, time.perf_counter() - start)
        best = max(best, (2 * m * k * n / fastest / 1e12, (m, k, n)))
    return best


def time_cpu_steps(step, peak, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds of each timed `step()` on CPU, and `steps` + 1 samples of `peak()`, the CPU's matmul peak (TFLOP/s):
    one before the first step and one after each, so that each step can be compared with what the CPU offered
    meanwhile."""
    for _ in range(warmup):
        step()
    samples, times = [peak()], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        samples.append(peak())
    return times, samples


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of `step()` over `steps` runs after `warmup` runs."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_codec_for_bench(name: str, device: torch.device):
    if name == "mdct":
        return MDCTCodec().to(device)
    from transformers import EncodecConfig, EncodecModel  # random weights: the speed is that of the real model

    from audio_codec import EncodecCodec

    return EncodecCodec(EncodecModel(EncodecConfig())).to(device)


def bench_config(args, codec, seconds: float) -> Config:
    """The training run whose step bench.py times: the trainer's flags as given, segments of `seconds`, sections of
    2 beats (the default), switches faded as the trainer fades them."""
    samples = int(seconds * codec.sample_rate)
    return Config(codec=args.codec, codec_dim=codec.dim, sample_rate=codec.sample_rate, device=args.device,
                  use_creative_agent=args.use_creative_agent, agent=args.agent, nhead=args.nhead, sdpa=args.sdpa,
                  compile=args.compile, amp=args.amp, batch_size=args.batch_size, segment_seconds=seconds,
                  segment_samples=samples, fade_frames=switch_fade_frames(codec.sample_rate / codec.hop_length))


class Bench:
    """One configuration: the trainer's model, objective and optimiser step, a codec and inputs on a device."""

    def __init__(self, args, seconds: float):
        self.device = torch.device(args.device)
        self.codec = build_codec_for_bench(args.codec, self.device)
        config = bench_config(args, self.codec, seconds)
        self.samples, self.frames = config.segment_samples, self.codec.num_frames(config.segment_samples)
        torch.manual_seed(0)
        self.model = build_model(config, self.codec.dim).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           fused=True)
        self.cuda_graphs, self.grad_clip = args.compile == "graphs", config.grad_clip
        say = lambda line: print(line, file=sys.stderr)  # noqa: E731  stdout is the report
        self.forward = compiled(self.model, args, say)
        self.amp = args.amp == "bf16" and self.device.type == "cuda"
        self.norm = LatentNorm(self.codec.dim).to(self.device)
        # the trainer's objective: encode, the model, decode and every loss term, the decoder and loss compiled
        self.objective = Objective(config, self.codec, self.norm, self.model, self.forward,
                                   compile_fn=lambda fn: compiled(fn, args, say))
        b = args.batch_size
        self.z = [torch.randn(b, self.codec.dim, self.frames, device=self.device) for _ in range(2)]
        # as in training: sections of 2 beats on a beat grid (120 BPM here), computed outside the compiled model
        beats = torch.arange(0.0, seconds, 0.5).expand(b, -1)
        sections = self.model.sections(beats, self.frames, self.codec.sample_rate / self.codec.hop_length)
        self.sections = sections.to(self.device) if sections is not None else None
        self.waves = [0.1 * torch.randn(b, 1, self.samples, device=self.device) for _ in range(2)]
        # the layering agent's guide (from the data, as in training): any values in [-1, 1] cost the model the same
        layered = args.use_creative_agent and args.agent == "layered"
        self.guide = 2 * torch.rand(b, self.frames, device=self.device) - 1 if layered else None
        self.batch = dict(input=self.waves[0], target=self.waves[1], beats=beats, bars=None, guide=self.guide)

    def model_loss(self, model=None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out, reg = (model or self.forward)(*self.z, sections=self.sections, guide=self.guide)
            loss = out.float().square().mean()
        return loss + 0.1 * reg if reg is not None else loss

    def e2e_loss(self) -> torch.Tensor:
        """The trainer's loss of a batch of waveforms (objective.Objective, as training runs it)."""
        return self.objective(self.batch, 0, training=True).loss

    def decoder_and_loss(self) -> None:
        """Forward and backward of the decoder with the reconstruction loss alone: most of what end-to-end adds."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        z_out = self.z[0].detach().requires_grad_(True)
        self.objective.compiled_decode_loss(z_out, *self.waves)[1].backward()

    def step(self, loss_fn) -> None:
        """The trainer's step (objective.optimizer_step) on the loss `loss_fn` gives."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer_step(self.optimizer, loss_fn(), self.grad_clip)

    def model_flops(self) -> float:
        register_cpu_attention_flops()
        with FlopCounterMode(display=False) as counter:  # on the eager model: the counter's hooks would
            self.model_loss(self.model).backward()  # otherwise break or bypass the compiled graph
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


def loader_pairs_per_s(batch_size: int, seconds: float, num_workers: int, sample_rate: int = 24000) -> float | None:
    """Pairs per second that the training data loader delivers from WAV files of `seconds` length; None where the
    data's packages (soundfile, librosa, ...: requirements.txt) are missing, as on a bare GPU image."""
    try:
        from pairs_dataset import Loading, WavPairsDataset, build_loader
        from pairs_folder import Cutting, make_pairs, synth_song
    except ImportError:
        return None

    with tempfile.TemporaryDirectory() as folder:
        songs = [(f"s{i}", lambda i=i: synth_song(i, seconds * 9, sample_rate)) for i in range(2)]
        make_pairs(songs, folder, Cutting(seconds, sample_rate), progress=False)
        dataset = WavPairsDataset(os.path.join(folder, "train"), sample_rate, int(seconds * sample_rate))
        loader, _ = build_loader(dataset, Loading(batch_size, workers=num_workers), True)
        for _ in loader:  # one untimed epoch starts the workers
            pass
        start = time.perf_counter()
        pairs = sum(batch["input"].shape[0] for epoch in range(2) for batch in loader)
        return pairs / (time.perf_counter() - start)


def profile_table(bench: Bench, loss_fn, steps: int = 3, rows: int = 25) -> str:
    """The kernels that take the most device time (CPU time on CPU) over `steps` steps of `loss_fn`, as
    torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            bench.step(loss_fn)
        sync(bench.device)
    key = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def attention_backends(args) -> list[dict]:
    """Forward + backward of one self-attention at each stage's width (default model, this batch and length) with
    each fused backend and head count: what --nhead costs, and which kernel torch picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype = torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32
    frames = MDCTCodec().num_frames(int(args.seconds * 24000))
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    rows = []
    for width in (256, 384):
        for nhead in (8, 4, 3, 2):
            if width % nhead:
                continue
            shape = (args.batch_size, nhead, frames, width // nhead)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            flops = 3 * 4 * args.batch_size * frames**2 * width  # forward 4 B T^2 C, backward twice that
            for name, backend in backends.items():
                def step(backend=backend, q=q, k=k, v=v):
                    with sdpa_kernel(backend) if backend is not None else nullcontext():
                        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
                try:
                    ms = time_steps(step, device, 2, args.steps) * 1e3
                except RuntimeError as err:  # this backend does not take this shape or device
                    rows.append(dict(width=width, nhead=nhead, backend=name, error=str(err).splitlines()[0][:80]))
                    continue
                rows.append(dict(width=width, nhead=nhead, head_dim=width // nhead, backend=name, ms=ms,
                                 tflops=flops / ms / 1e9))
    return rows


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak resident memory


def run(args) -> dict:
    device = torch.device(args.device)
    bench = Bench(args, args.seconds)
    flops = bench.model_flops()
    if device.type == "cuda":
        peak, peak_source = gpu_peak(torch.cuda.get_device_name(device))  # fp32 matmuls stay fp32, as in training
        step_s = time_steps(lambda: bench.step(bench.model_loss), device, args.warmup, args.steps)
        mfu, best_peak = flops / step_s / 1e12 / peak, peak
    else:
        shapes, winners = matmul_shapes(bench.model, args.batch_size * bench.frames), []

        def peak() -> float:
            tflops, shape = cpu_peak(shapes)
            winners.append(shape)
            return tflops

        times, samples = time_cpu_steps(lambda: bench.step(bench.model_loss), peak, args.warmup, args.steps)
        around = [(before + after) / 2 for before, after in itertools.pairwise(samples)]
        step_s, peak, best_peak = statistics.median(times), statistics.median(around), max(samples)
        mfu = statistics.median(flops / t / 1e12 / p for t, p in zip(times, around, strict=True))
        won = max(set(winners), key=winners.count)
        peak_source = (f"measured fp32 matmul around each step, median; each sample the best of {len(shapes)} "
                       f"shapes, the model's own and a 2048 cube; most often best: {'x'.join(map(str, won))}")
    e2e_s = time_steps(lambda: bench.step(bench.e2e_loss), device, args.warmup, args.steps)
    loss_s = time_steps(bench.decoder_and_loss, device, args.warmup, args.steps)
    achieved = flops / step_s / 1e12
    if args.profile:
        for name, loss_fn in (("model step", bench.model_loss), ("end-to-end step", bench.e2e_loss)):
            print(f"{name}:\n{profile_table(bench, loss_fn)}", file=sys.stderr)
    step_pairs = args.batch_size / e2e_s
    guide_s = None  # the layering agent's guide of a batch, which the data computes once for a pair of fixed songs
    if bench.guide is not None:
        guide = lambda: layer_guide(*bench.waves, bench.codec.sample_rate)  # noqa: E731
        guide_s = time_steps(guide, device, args.warmup, args.steps)
    loader = loader_pairs_per_s(args.batch_size, min(args.seconds, 4.0), args.num_workers)
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores,"
                f" {torch.get_num_threads()} threads)",
                config=dict(batch_size=args.batch_size, seconds=args.seconds, codec=args.codec, frames=bench.frames,
                            use_creative_agent=args.use_creative_agent, agent=args.agent,
                            nhead=[stage.blocks[0].nhead for stage in bench.model.stages],
                            amp=args.amp if device.type == "cuda" else "none", compile=args.compile,
                            sdpa=args.sdpa, num_workers=args.num_workers,
                            parameters=sum(p.numel() for p in bench.model.parameters())),
                step_ms=step_s * 1e3, e2e_step_ms=e2e_s * 1e3, decoder_loss_ms=loss_s * 1e3,
                ms_per_audio_s=step_s * 1e3 / (args.batch_size * args.seconds),
                frames_per_s=args.batch_size * bench.frames / step_s,
                model_tflop_per_step=flops / 1e12, achieved_tflops=achieved, peak_tflops=peak,
                peak_source=peak_source, mfu=mfu, best_peak_tflops=best_peak, mfu_vs_best_peak=achieved / best_peak,
                e2e_over_model=step_s / e2e_s,
                loader_pairs_per_s=loader, step_pairs_per_s=step_pairs, peak_mem_mb=peak_memory_mb(device),
                guide_ms=None if guide_s is None else guide_s * 1e3)


def scan(args) -> list[dict]:
    rows = []
    for seconds in (2, 4, 8, 16, 32):
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bench = Bench(args, seconds)
        step_s = time_steps(lambda b=bench: b.step(b.model_loss), device, 1, max(2, args.steps // 2))
        # on CPU the peak is the process's resident peak so far, so it only grows along the scan
        rows.append(dict(seconds=seconds, frames=bench.frames, step_ms=step_s * 1e3,
                         peak_mem_mb=peak_memory_mb(device)))
    return rows


ARRANGE_SECONDS = 136.0  # the synthetic pair's length when --arrange names no songs
WITHIN = "  in two threads: "  # a part of arrange.py's report, whose parts run at once
REPORT = "picture and figures, the files tracked afresh meanwhile (and the rest)"


@contextmanager
def clocked(parts: dict, name: str, owner, attribute: str):
    """Adds the wall time of every call of owner.attribute (a module's function or a class's method) to
    parts[name] while the block runs."""
    original = getattr(owner, attribute)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - start

    with patch.object(owner, attribute, timed):
        yield


def arrange_parts(songs: list[str], checkpoint: str | None, folder: str) -> dict[str, float]:
    """arrange.py run as a user runs it (a mask picture too) on songs [input, target], seconds per part, in the
    order they run (the parts named WITHIN run at once, within the report, so they add up to more than it). With no
    songs, two synthetic ones of ARRANGE_SECONDS at different tempos; with no checkpoint, the temporal rule."""
    import runpy

    import soundfile as sf

    import audio_codec
    import fixed_masks
    import inference
    import listening
    import model_simple_transformer
    from pairs_folder import make_song

    if not songs:
        songs = [os.path.join(folder, f"song_{seed}.wav") for seed in (1, 4)]
        for seed, path in zip((1, 4), songs, strict=True):
            sf.write(path, make_song(seed, ARRANGE_SECONDS, 24000).audio, 24000)
    parts: dict[str, float] = {}
    # arrange.py takes these names from the modules when it runs, so it calls them through the clocks
    hooks = [("start-up (checkpoint or rule)", inference.Arranger, "load"),
             ("start-up (checkpoint or rule)", inference.Arranger, "rule"),
             ("read the songs", inference, "load_audio"),
             ("analysis", inference, "prepare_songs"),
             ("beats and bars (both songs at once)", inference, "track_pulses"),
             ("alignment (stretch, key, loudness)", inference, "align"),
             ("windows", inference, "arrange_song"),
             ("model", model_simple_transformer.SimpleTransformer, "forward"),
             ("model", fixed_masks.RuleMix, "forward"),
             ("write the files", inference, "save_wave"),
             (f"{WITHIN}mask picture", inference.Arranger, "picture"),
             (f"{WITHIN}summary figures", inference, "summary_line"),
             (f"{WITHIN}bars tracked afresh (output, aligned target)", listening, "bars_heard")]
    hooks += [("codec", codec, method) for codec in (audio_codec.MDCTCodec, audio_codec.EncodecCodec)
              for method in ("encode", "decode")]
    source = ["--checkpoint", checkpoint] if checkpoint else ["--rule", "temporal"]
    argv = ["arrange.py", *source, "--input", songs[0], "--target", songs[1], "--output",
            os.path.join(folder, "out.wav"), "--mask_plot", os.path.join(folder, "masks.png")]
    with ExitStack() as stack:
        for name, owner, attribute in hooks:
            stack.enter_context(clocked(parts, name, owner, attribute))
        stack.enter_context(patch.object(sys, "argv", argv))
        start = time.perf_counter()
        try:  # a script, run as one (scripts import no scripts)
            runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "arrange.py"), run_name="__main__")
        except SystemExit as end:
            if end.code:
                raise SystemExit("bench: arrange.py failed (its error is above)") from None
        total = time.perf_counter() - start
    parts["key and loudness (two threads)"] = (parts.pop("analysis") - parts["beats and bars (both songs at once)"]
                                               - parts["alignment (stretch, key, loudness)"])
    parts["windows: the rest (cutting, cross-fades, fader)"] = (parts.pop("windows") - parts.get("model", 0.0)
                                                                 - parts.get("codec", 0.0))
    parts[REPORT] = total - sum(seconds for name, seconds in parts.items() if not name.startswith(WITHIN))
    parts["total"] = total
    order = ["start-up (checkpoint or rule)", "read the songs", "beats and bars (both songs at once)",
             "key and loudness (two threads)", "alignment (stretch, key, loudness)", "model", "codec",
             "windows: the rest (cutting, cross-fades, fader)", "write the files", REPORT]
    return {name: parts[name] for name in order + [name for name in parts if name not in order]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_flags(p, TRAINING_FLAGS)  # as train_simple_ddp.py declares them
    p.add_argument("--batch_size", type=int, default=None, help="default: 8 on GPU, 4 on CPU")
    p.add_argument("--seconds", type=float, default=None, help="segment length in seconds (default 16 GPU, 2 CPU)")
    p.add_argument("--codec", default="mdct", choices=("mdct", "encodec"),
                   help="mdct, or encodec with random weights (same speed as the real ones)")
    p.add_argument("--use_creative_agent", type=str2bool, default=True,
                   help="include the agent (default true, unlike training: the agent's cost is what is measured)")
    p.add_argument("--num_workers", type=int, default=None, help="loader workers (default 4 GPU, 0 CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument("--scan", action="store_true", help="step time and peak memory over 2-32 s segments")
    p.add_argument("--attention", action="store_true",
                   help="only time self-attention (forward + backward) per stage width, head count and backend")
    p.add_argument("--profile", action="store_true",
                   help="print the kernels that take the most time in the model and end-to-end steps (to stderr)")
    p.add_argument("--arrange", nargs="*", metavar="SONG",
                   help="only time arrange.py part by part on INPUT TARGET (no songs: two synthetic ones of "
                        f"{ARRANGE_SECONDS:g} s; the temporal rule unless --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="with --arrange: arrange with this checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.arrange is not None and len(args.arrange) not in (0, 2):
        p.error(f"--arrange takes no songs or two (input and target), got {len(args.arrange)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.compile = compile_mode("graphs" if args.cuda_graphs else args.compile, torch.device(args.device))
    args.nhead = head_counts(args.nhead)
    args.batch_size = args.batch_size or (8 if gpu else 4)
    args.seconds = args.seconds or (16.0 if gpu else 2.0)
    args.num_workers = args.num_workers if args.num_workers is not None else (4 if gpu else 0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # as every training process does
    if args.arrange is not None:
        with tempfile.TemporaryDirectory() as folder:
            parts = arrange_parts(args.arrange, args.checkpoint, folder)
        print(json.dumps(parts) if args.json else "arrange.py, part by part:\n" + "\n".join(
            f"  {name:<64} {seconds:7.2f} s {seconds / parts['total']:5.0%}" for name, seconds in parts.items()))
        return 0
    if args.attention:
        rows = attention_backends(args)
        for row in rows:
            print(json.dumps(row) if args.json else
                  f"  width {row['width']}, {row['nhead']} heads, {row['backend']:<9} " +
                  (f"{row['ms']:7.2f} ms {row['tflops']:7.2f} TFLOP/s" if "ms" in row else row["error"]))
        return 0
    result = run(args)
    if args.scan:
        result["scan"] = scan(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"device: {result['device']}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in result["config"].items()))
    rows = [("model step", f"{result['step_ms']:.1f} ms"), ("end-to-end step", f"{result['e2e_step_ms']:.1f} ms"),
            ("end-to-end / model throughput", f"{result['e2e_over_model']:.2f}"),
            ("decoder + loss, fwd + bwd", f"{result['decoder_loss_ms']:.1f} ms"),
            ("frames per second", f"{result['frames_per_s']:,.0f}"),
            ("model TFLOP per step", f"{result['model_tflop_per_step']:.3f}"),
            ("achieved TFLOP/s", f"{result['achieved_tflops']:.3f}"),
            ("peak TFLOP/s", f"{result['peak_tflops']:.3f} ({result['peak_source']})"),
            ("MFU", f"{result['mfu']:.2f}"),
            ("MFU against the best peak", f"{result['mfu_vs_best_peak']:.2f} "
                                          f"({result['best_peak_tflops']:.3f} TFLOP/s)"),
            ("model step per second of audio", f"{result['ms_per_audio_s']:.2f} ms"),
            ("loader pairs/s", "n/a (pip install -r requirements.txt)" if result["loader_pairs_per_s"] is None
             else f"{result['loader_pairs_per_s']:.1f}"),
            ("training step pairs/s", f"{result['step_pairs_per_s']:.1f}"),
            ("peak memory", f"{result['peak_mem_mb']:,.0f} MB")]
    if result["guide_ms"] is not None:
        rows.append(("layer guide of a batch (data)", f"{result['guide_ms']:.1f} ms, once per pair of fixed songs"))
    for name, value in rows:
        print(f"  {name:<32} {value}")
    for row in result.get("scan", []):
        print(f"  scan {row['seconds']:>4} s ({row['frames']} frames): {row['step_ms']:.1f} ms/step, "
              f"{row['peak_mem_mb']:,.0f} MB peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
