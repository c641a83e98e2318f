"""Several nodes (torchrun on 127.0.0.1, Gloo), self-requeue under SLURM, CPU allocation, pre-encoding."""
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SR, tiny_args, tiny_pairs
from test_reliability import start_training, wait_for

from audio_codec import build_codec
from checkpoints import load_checkpoint
from distributed import cpus_per_rank
from pairs_dataset import CachedLatents, WavPairsDataset
from train_simple_ddp import free_port
from train_simple_worker import run

TINY = ["--sample_rate", str(SR), "--codec_dim", "32", "--num_layers", "1", "--nhead", "2", "--batch_size", "2",
        "--num_epochs", "1", "--device", "cpu", "--use_creative_agent", "true", "--run_name", "run"]


def cli(dataset, out, *extra):
    return [os.path.join(ROOT, "train_simple_ddp.py"), "--dataset_folder", str(dataset), *TINY,
            "--checkpoint_dir", str(out / "c"), "--log_dir", str(out / "l"), *extra]


def one_cpu_each():
    """Both launches below then run one compute thread per process, so their sums are done in the same order."""
    return dict(os.environ, SLURM_CPUS_PER_TASK="1")


def test_two_torchrun_nodes_train_like_one_node_with_two_processes(tmp_path, pairs_dir):
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               *cli(pairs_dir, tmp_path / "nodes")], env=one_cpu_each(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outputs = [node.communicate(timeout=180)[0] for node in nodes]
    except subprocess.TimeoutExpired:  # a stuck rendezvous: stop both and show what each node printed
        for node in nodes:
            node.kill()
        outputs = [node.communicate()[0] for node in nodes]
        pytest.fail("the two nodes did not finish in 180 s:\n" + "\n".join(o[-3000:] for o in outputs))
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    single = subprocess.run([sys.executable, *cli(pairs_dir, tmp_path / "single", "--world_size", "2")],
                            env=one_cpu_each(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    a = load_checkpoint(str(tmp_path / "nodes" / "c" / "run" / "checkpoint_last.pt"))
    b = load_checkpoint(str(tmp_path / "single" / "c" / "run" / "checkpoint_last.pt"))
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] > 0
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert sorted(os.listdir(tmp_path / "nodes" / "c" / "run")) == ["checkpoint_best.pt", "checkpoint_last.pt"]


def fake_scontrol(bin_dir, code=0):
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> "{bin_dir}/calls"\n'
                                      + ('echo "scontrol: error: Invalid job id specified" >&2\n' if code else "")
                                      + f"exit {code}\n")
    (bin_dir / "scontrol").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="777")


@pytest.mark.parametrize("code", [0, 1])
def test_stopped_slurm_run_saves_then_requeues_its_job(tmp_path, pairs_dir, monkeypatch, code):
    for key, value in fake_scontrol(tmp_path / "bin", code).items():
        monkeypatch.setenv(key, value)
    process = start_training(tmp_path, pairs_dir, "--num_epochs", "50")
    wait_for(process, "Epoch 1:")
    process.send_signal(signal.SIGUSR1)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out  # a failing scontrol is reported, not fatal
    assert load_checkpoint(str(tmp_path / "c" / "run" / "checkpoint_last.pt"))["epoch"] >= 1
    assert (tmp_path / "bin" / "calls").read_text() == "requeue 777\n"
    if code == 0:
        assert "requeued SLURM job 777" in out
    else:
        assert "could not requeue SLURM job 777: scontrol exited with 1: scontrol: error: Invalid job id" in out


@pytest.mark.parametrize("extra", [[], ["--requeue", "false"]])
def test_no_requeue_when_finished_or_turned_off(tmp_path, pairs_dir, monkeypatch, extra):
    for key, value in fake_scontrol(tmp_path / "bin").items():
        monkeypatch.setenv(key, value)
    if extra:  # stopped by a signal, but the user turned requeueing off
        process = start_training(tmp_path, pairs_dir, "--num_epochs", "50", *extra)
        wait_for(process, "Epoch 1:")
        process.send_signal(signal.SIGUSR1)
    else:  # ran all its epochs
        process = start_training(tmp_path, pairs_dir, "--num_epochs", "1")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert not (tmp_path / "bin" / "calls").exists() and "SLURM job" not in out


def test_cpu_share_of_a_rank(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert cpus_per_rank() == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpus_per_rank() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cpus_per_rank() == 1


def test_loader_workers_never_exceed_the_allocation(tmp_path, pairs_dir, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert run(0, 1, 0, tiny_args(tmp_path, pairs_dir, "--num_workers", "6")) == 0
    out = capsys.readouterr().out
    assert "--num_workers 6 is more than this rank's 2 CPU(s) allow: using 1" in out
    assert "1 data-loader worker(s)" in out
    assert run(0, 1, 0, tiny_args(tmp_path / "b", pairs_dir)) == 0
    assert "0 data-loader worker(s)" in capsys.readouterr().out  # on CPU the cores compute


def test_a_finished_run_leaves_no_loader_worker_behind(tmp_path, pairs_dir, monkeypatch):
    """Workers left to the interpreter's exit can hold a GPU run for minutes (pytorch/pytorch#81794)."""
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    before = set(multiprocessing.active_children())
    assert run(0, 1, 0, tiny_args(tmp_path, pairs_dir, "--num_workers", "2")) == 0
    assert set(multiprocessing.active_children()) <= before


def test_prepare_only_fills_both_caches_on_two_processes(tmp_path):
    dataset = tiny_pairs(str(tmp_path / "pairs"))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, *cli(dataset, out, "--prepare_only", "--world_size", "2")],
                            capture_output=True, text=True, timeout=300, env=one_cpu_each())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "latent caches are complete" in result.stdout
    assert not (out / "c").exists() and not (out / "l").exists()  # no training, no checkpoint folder
    codec = build_codec("mdct", SR, 32)
    for split in ("train", "val"):
        data = WavPairsDataset(os.path.join(dataset, split), SR, SR // 2)
        path = CachedLatents.path_for(data, codec.settings)
        assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # complete: no partial file left
        reference = tmp_path / f"{split}_reference.npy"
        CachedLatents.build(data, codec, str(reference), "cpu", progress=False)
        np.testing.assert_allclose(np.load(path), np.load(reference), rtol=1e-6, atol=1e-6)
    second = subprocess.run([sys.executable, *cli(dataset, out, "--cache_latents")], capture_output=True, text=True,
                            timeout=300, env=one_cpu_each())
    assert second.returncode == 0 and "Latent cache written" not in second.stdout  # training reads them


def test_encodec_cache_key_includes_the_weights():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")
    from audio_codec import EncodecCodec

    config = transformers.EncodecConfig(hidden_size=16, num_filters=4, upsampling_ratios=[4, 4], codebook_dim=16)
    torch.manual_seed(0)
    a = EncodecCodec(transformers.EncodecModel(config))
    b = EncodecCodec(transformers.EncodecModel(config))
    same = EncodecCodec(transformers.EncodecModel(config))
    same.model.load_state_dict(a.model.state_dict())
    assert a.settings != b.settings and a.settings == same.settings


def test_slurm_script_prepare_mode_and_several_nodes(tmp_path, pairs_dir):
    from test_training import slurm_job

    dataset = shutil.copytree(pairs_dir, tmp_path / "pairs")
    work, env = slurm_job(tmp_path, SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_JOB_ID="4243", DATASET=str(dataset),
                          PREPARE="1", EXTRA_ARGS=f"--sample_rate {SR} --codec_dim 32 --num_layers 1 --nhead 2 "
                                                  "--device cpu")
    result = subprocess.run(["bash", os.path.join(ROOT, "submit_creative_agent.sh")], env=env, cwd=work,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 node(s), 2 task(s), master 127.0.0.1" in result.stdout
    import train_simple_ddp  # one port formula, the launcher's: the script sets none

    assert train_simple_ddp.slurm_port("4243") == 24243 and train_simple_ddp.slurm_port("64243") == 44243
    assert "MASTER_PORT=" not in open(os.path.join(ROOT, "submit_creative_agent.sh")).read()
    assert "latent caches are complete" in result.stdout and not (work / "checkpoints").exists()
    assert len(os.listdir(dataset / "train" / ".latent_cache")) == 1
    script = open(os.path.join(ROOT, "submit_creative_agent.sh")).read()
    assert "#SBATCH --requeue" in script and "--resume auto" in script
