"""The fast path changes no result, the latent cache, and bench.py's report."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SR, tiny_args

from audio_codec import MDCTCodec
from checkpoints import load_checkpoint
from config import upgrade
from fast_path import EagerOnFailure, compile_mode, first_step
from model_simple_transformer import SimpleTransformer, build_model
from pairs_dataset import CachedLatents, WavPairsDataset
from records import Conditions
from train_simple_ddp import parse_args
from train_simple_worker import Trainer, run


def train_losses(tmp_path, pairs_dir, *switches):
    # soft cell gates: with hard frame gates, float noise could tip a frame at the threshold and hide the comparison
    args = tiny_args(tmp_path, pairs_dir, "--use_creative_agent", "true", "--num_epochs", "2", "--dropout", "0",
                     "--agent_gates", "cell", *switches)
    assert run(0, 1, 0, args) == 0
    with open(tmp_path / "logs" / "run" / "metrics.jsonl") as f:
        return [(r["train_loss"], r["val_loss"], r["complementarity"]) for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pairs_dir):
    return train_losses(tmp_path_factory.mktemp("reference"), pairs_dir)


def test_fused_attention_matches_the_textbook_formula():
    """The fused kernels (scaled_dot_product_attention) give the textbook softmax(QK^T / sqrt(d)) V, forward and
    backward; bench.py --sdpa false times the textbook path."""
    torch.manual_seed(0)
    fused = SimpleTransformer(encoding_dim=16, nhead=2, num_layers=1, dropout=0.0, use_creative_agent=True)
    plain = SimpleTransformer(encoding_dim=16, nhead=2, num_layers=1, dropout=0.0, use_creative_agent=True,
                              use_sdpa=False)
    for stage in fused.stages:  # zero-initialised outputs would hide the attention
        torch.nn.init.normal_(stage.proj_out.weight, std=0.1)
    plain.load_state_dict(fused.state_dict())
    x, y = torch.randn(2, 16, 40), torch.randn(2, 16, 40)
    (a, _), (b, _) = fused(x, y), plain(x, y)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert p.grad is None or torch.allclose(p.grad, q.grad, atol=1e-5), name


@pytest.mark.parametrize("switch", [["--cache_latents"], ["--num_workers", "2"]])
def test_fast_path_switches_change_no_result(tmp_path, pairs_dir, reference, switch):
    losses = train_losses(tmp_path, pairs_dir, *switch)
    for got, want in zip(losses, reference, strict=True):
        assert got == pytest.approx(want, rel=5e-4, abs=1e-5)


COMMON = ["--batch_size", "3", "--balance_range", "0.5,0.5"]  # 3 divides the 9 training pairs: no batch dropped


@pytest.fixture(scope="module")
def eager_reference(tmp_path_factory, pairs_dir):
    return train_losses(tmp_path_factory.mktemp("eager"), pairs_dir, *COMMON)


def test_compile_changes_no_result(tmp_path, pairs_dir, eager_reference, capsys):
    """--compile graphs trains and validates alike (on a CPU, CUDA graphs compile as plain --compile does, so this
    covers both). Batches of 3 divide the 9 training pairs, so dropping the last batch changes nothing; an even
    balance keeps the farther-song term's max() from tipping on float noise. The first epoch's loss agrees to 1e-5;
    AdamW's first steps normalise tiny gradients to whole steps and so amplify rounding (eager against eager with
    the loss's STFTs batched differently drifts 6e-4 in 6 steps), hence the looser bound after it."""
    try:
        losses = train_losses(tmp_path / "compiled", pairs_dir, *COMMON, "--compile", "graphs")
    except Exception as err:  # no C++ toolchain for inductor on this machine
        pytest.skip(f"torch.compile is not usable here: {str(err).splitlines()[0][:200]}")
    assert "compiling (graphs); the next steps are fast" in capsys.readouterr().out
    assert losses[0][0] == pytest.approx(eager_reference[0][0], rel=1e-4)
    for got, want in zip(losses, eager_reference, strict=True):
        assert got == pytest.approx(want, rel=3e-3, abs=1e-4)


def test_compile_auto_means_graphs_on_a_gpu_and_eager_on_a_cpu():
    assert compile_mode("auto", torch.device("cpu")) == "none"
    assert compile_mode("auto", torch.device("cuda", 0)) == "graphs"
    assert compile_mode("default", torch.device("cpu")) == "default"
    given = ([], ["--compile"], ["--cuda_graphs"], ["--compile", "none"], ["--compile", "graphs"])
    assert [parse_args(argv).compile for argv in given] == ["auto", "default", "graphs", "none", "graphs"]
    # checkpoints from before the choice stored a switch
    assert [upgrade(saved).compile for saved in ({"compile": True, "cuda_graphs": True}, {"compile": True},
                                                 {"compile": False})] == ["graphs", "default", "none"]


def test_a_failing_compiler_says_so_and_training_goes_on_eagerly(tmp_path, pairs_dir, eager_reference, monkeypatch,
                                                                  capsys):
    def broken_compile(fn, **options):  # what an old driver or an op inductor cannot take does at the first call
        def compiled_fn(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
        return compiled_fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    assert train_losses(tmp_path, pairs_dir, *COMMON, "--compile", "graphs") == eager_reference
    out = capsys.readouterr().out
    assert out.count("torch.compile failed (RuntimeError: InductorError: no working C++ compiler found); going on "
                     "eagerly") == 2  # the model, and the decoder with the losses
    assert "compiling (graphs)" not in out


def test_a_first_step_that_fails_while_compiled_is_taken_again_eagerly():
    """A backward that fails to compile fails in loss.backward(), outside the compiled functions."""
    said = []
    fn = EagerOnFailure(lambda x: x, lambda x: x, said.append)
    tries = []

    def step(batch):
        tries.append(fn.failed)
        if not fn.failed:
            raise RuntimeError("triton: no kernel for this GPU")
        return batch

    assert first_step(step, 7, (fn,)) == 7 and tries == [False, True] and "no kernel for this GPU" in said[0]

    def wrong(batch):
        raise ValueError("a shape error of the code itself")

    with pytest.raises(ValueError, match="code itself"):  # eager already: the error is not hidden
        first_step(wrong, 7, (fn,))


def test_compiled_training_drops_the_last_smaller_batch(tmp_path, pairs_dir):
    """One graph for every step: with --compile, 9 pairs in batches of 4 make 2 steps an epoch, not 3."""
    args = tiny_args(tmp_path, pairs_dir, "--compile", "--batch_size", "4")
    trainer = Trainer(0, 1, 0, args)
    assert len(trainer.data.train_loader) == 2 and len(trainer.data.val_loader) == 1
    eager = Trainer(0, 1, 0, tiny_args(tmp_path, pairs_dir, "--batch_size", "4"))
    assert len(eager.data.train_loader) == 3
    trainer.close()
    eager.close()


def test_a_compiled_forward_matches_eager_and_keeps_no_graph_output():
    """A compiled forward (traced as inductor would be, without its slow codegen) equals the eager one, with the
    agent's blocks given as the trainer gives them (model.sections: a graph input; torch 2.13's inductor
    miscompiles the index when the agent builds it inside, as `bench.py --compile graphs --seconds 0.5` showed on a
    CPU), and returns its masks and terms in its record, as the eager one does."""
    torch.manual_seed(0)
    model = SimpleTransformer(encoding_dim=16, nhead=2, num_layers=1, use_creative_agent=True, agent_hidden_dim=16,
                              dropout=0.0)
    x, y = torch.randn(2, 16, 80), torch.randn(2, 16, 80)
    sections = model.sections(torch.full((2, 4), float("nan")), 80, 100.0)  # a model trained in blocks of 32
    assert sections.shape == (2, 80) and sections.max().item() == 2
    try:
        compiled = torch.compile(model, backend="aot_eager")(x, y, Conditions(sections=sections))
    except Exception as err:  # no C++ toolchain for inductor on this machine
        pytest.skip(f"torch.compile is not usable here: {str(err).splitlines()[0][:200]}")
    out, reg = compiled
    (out.square().mean() + reg).backward()
    eager = model(x, y, sections=sections)
    assert torch.allclose(out, eager.output, atol=1e-4) and torch.allclose(reg, eager.reg, atol=1e-4)
    assert torch.equal(compiled.masks[0], eager.masks[0]) and set(compiled.terms) == set(eager.terms)
    assert eager.terms["area"].requires_grad and not compiled.masks[0].requires_grad
    eager = eager.output
    assert torch.equal(model(x, y).output, eager)  # the agent's own blocks are the same sections


def test_head_counts_per_stage_train_and_come_back_from_the_checkpoint(tmp_path, pairs_dir, capsys):
    assert run(0, 1, 0, tiny_args(tmp_path, pairs_dir, "--nhead", "2", "3")) == 0  # head dim 32 in both stages
    config = load_checkpoint(str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt"))["config"]
    assert [stage.blocks[0].nhead for stage in build_model(upgrade(config), 32).stages] == [2, 3]
    default = parse_args([])
    assert default.nhead == 0 and [stage.blocks[0].nhead for stage in build_model(default, 128).stages] == [2, 3]
    with pytest.raises(SystemExit):
        parse_args(["--nhead", "2", "3", "4"])
    assert "--nhead takes 1 or 2 counts (one per stage), got 3" in capsys.readouterr().err


def test_latent_cache_hit_and_misses(tmp_path, pairs_dir):
    import shutil

    folder = shutil.copytree(os.path.join(pairs_dir, "train"), tmp_path / "train",
                             ignore=shutil.ignore_patterns(".latent_cache"))
    codec = MDCTCodec(SR, 32)
    dataset = WavPairsDataset(str(folder), SR, 4000)
    path = CachedLatents.path_for(dataset, codec.settings)
    assert CachedLatents.build(dataset, codec, path, "cpu", progress=False)  # miss: encodes
    cached = CachedLatents(dataset, path)
    item = cached[1]
    for k, role in enumerate(("input", "target")):
        torch.testing.assert_close(item["latents"][k], codec.encode(item[role][None])[0])
    again = WavPairsDataset(str(folder), SR, 4000)
    assert CachedLatents.path_for(again, codec.settings) == path
    assert not CachedLatents.build(again, codec, path, "cpu", progress=False)  # hit: nothing to encode
    # a changed file: new key, a miss, and the new latents match the new audio
    time.sleep(0.01)
    data = (folder / "pair_0001_input.wav").read_bytes()
    (folder / "pair_0001_input.wav").write_bytes(data)
    changed = WavPairsDataset(str(folder), SR, 4000)
    new_path = CachedLatents.path_for(changed, codec.settings)
    assert new_path != path and CachedLatents.build(changed, codec, new_path, "cpu", progress=False)
    # another codec: another key, a miss
    other = MDCTCodec(SR, 32, window="kbd")
    assert CachedLatents.path_for(changed, other.settings) != new_path
    assert CachedLatents.build(changed, other, CachedLatents.path_for(changed, other.settings), "cpu",
                               progress=False)


def test_shuffled_targets_use_the_matching_cached_latent(tmp_path, pairs_dir):
    codec = MDCTCodec(SR, 32)
    dataset = WavPairsDataset(os.path.join(pairs_dir, "train"), SR, 4000, shuffle_targets=True)
    path = str(tmp_path / "cache.npy")
    CachedLatents.build(dataset, codec, path, "cpu", progress=False)
    item = CachedLatents(dataset, path)[0]
    torch.testing.assert_close(item["latents"][1], codec.encode(item["target"][None])[0])


def test_bench_json_report():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cpu", "--json",
                             "--steps", "1", "--warmup", "1", "--seconds", "0.5", "--batch_size", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("device", "config", "step_ms", "e2e_step_ms", "decoder_loss_ms", "frames_per_s", "model_tflop_per_step",
                "achieved_tflops", "peak_tflops", "mfu", "best_peak_tflops", "mfu_vs_best_peak", "loader_pairs_per_s",
                "step_pairs_per_s", "peak_mem_mb"):
        assert key in report
    assert report["model_tflop_per_step"] > 0 and 0 < report["mfu"] < 1.5
    # the MFU against the peak sampled around each step, and never below the one against the run's best sample
    assert report["best_peak_tflops"] >= report["peak_tflops"] > 0
    assert 0 < report["mfu_vs_best_peak"] <= report["mfu"]
    assert 0 < report["decoder_loss_ms"] < report["e2e_step_ms"]



def test_bench_times_arrange_part_by_part(tmp_path, monkeypatch):
    import bench

    monkeypatch.setattr(bench, "ARRANGE_SECONDS", 6.0)
    parts = bench.arrange_parts([], None, str(tmp_path))
    for part in ("start-up (checkpoint or rule)", "read the songs", "beats and bars (both songs at once)",
                 "alignment (stretch, key, loudness)", "model", "codec", bench.REPORT,
                 f"{bench.WITHIN}summary figures", f"{bench.WITHIN}bars tracked afresh (output, aligned target)"):
        assert parts[part] > 0, part
    whole = [seconds for name, seconds in parts.items() if not name.startswith(bench.WITHIN)]
    assert sum(whole) == pytest.approx(2 * parts["total"])  # the parts add up to the whole
    assert os.path.getsize(tmp_path / "out.wav") > 6 * 24000 and (tmp_path / "masks.png").exists()

FAULTS_PER_STEP = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from model_simple_transformer import SimpleTransformer
from fast_path import keep_freed_memory
torch.manual_seed(0)
model = SimpleTransformer(use_creative_agent=True)
optimizer = torch.optim.AdamW(model.parameters())
x, y = torch.randn(2, 2, 128, 188).unbind(0)

def faults_per_step(steps=3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        out, reg = model(x, y)
        (out.square().mean() + reg).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

faults_per_step()  # warm-up
default = faults_per_step()
print(keep_freed_memory(), default, faults_per_step(), faults_per_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_step_reuses_freed_memory_instead_of_faulting_it_in_again():
    """`keep_freed_memory` (called by every training process and by bench.py): the memory a step frees serves the
    next step, where glibc would hand it back to the kernel and fault it in again (minor page faults)."""
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP.format(root=ROOT)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    kept, default, *after = result.stdout.split()
    assert kept == "True"
    assert float(default) > 1000  # glibc's defaults: over 4 MB faulted in again every step
    assert float(after[-1]) < 0.25 * float(default)


def test_bench_imports_torch_alone_as_on_a_bare_gpu_image():
    """bench_gpu.sh runs where torch is the only package: bench.py imports none of the data or music packages."""
    blocked = ("soundfile", "soxr", "tqdm", "librosa", "pedalboard", "pyloudnorm", "madmom", "matplotlib")
    code = f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\nimport bench"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1000:]
