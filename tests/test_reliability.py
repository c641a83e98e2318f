"""Bad data, crash-safe checkpoints, exact resume, signals, non-finite steps, failing ranks."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT, SR, tiny_args

import checkpoints
import objective
from checkpoints import CheckpointError, load_checkpoint
from train_simple_worker import run


@pytest.fixture
def dataset(tmp_path, pairs_dir):
    """A private copy of the tiny pairs folder that a test may damage."""
    return shutil.copytree(pairs_dir, tmp_path / "pairs")


def damage(dataset):
    """Six kinds of bad file; returns {file name: words the error must say}."""
    train = dataset / "train"
    (train / "pair_0000_input.wav").write_bytes(b"definitely not audio")
    data = (train / "pair_0001_input.wav").read_bytes()
    (train / "pair_0001_input.wav").write_bytes(data[: len(data) // 3])  # truncated
    os.remove(train / "pair_0002_output.wav")
    sf.write(str(train / "pair_0003_input.wav"), np.zeros(4000), SR)
    sf.write(str(train / "pair_0004_input.wav"), 0.1 * np.ones(4000), 16000)
    sf.write(str(train / "pair_0005_output.wav"), np.full(4000, np.nan), SR, subtype="FLOAT")
    return {"pair_0000_input.wav": "unreadable", "pair_0001_input.wav": "short", "pair_0002_input.wav": "partner",
            "pair_0003_input.wav": "silent", "pair_0004_input.wav": "sample rate",
            "pair_0005_output.wav": "non-finite"}


def test_bad_files_refused_with_every_reason_and_nothing_written(tmp_path, dataset, capsys):
    expected = damage(dataset)
    args = tiny_args(tmp_path, str(dataset))
    assert run(0, 1, 0, args) == 2
    err = capsys.readouterr().err
    for name, words in expected.items():
        line = next(line for line in err.splitlines() if name in line)
        assert words in line, line
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def test_launcher_exit_code_for_bad_files(tmp_path, dataset):
    damage(dataset)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_simple_ddp.py"), "--dataset_folder",
                             str(dataset), "--sample_rate", str(SR), "--checkpoint_dir", str(tmp_path / "c")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "6 bad file(s)" in result.stderr


def test_skip_bad_files_warns_and_trains_on_the_rest(tmp_path, dataset, capsys):
    damage(dataset)
    assert run(0, 1, 0, tiny_args(tmp_path, str(dataset), "--skip_bad_files")) == 0
    out = capsys.readouterr().out
    assert "skipping 6 bad file(s)" in out and "pair_0003_input.wav: silent" in out
    state = load_checkpoint(str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt"))
    assert state["epoch"] == 1


def test_checkpoint_write_is_atomic_under_a_full_disk(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_last.pt")
    checkpoints.save_checkpoint(path, {"project": "creative_agent", "epoch": 1})

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(path, {"project": "creative_agent", "epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint_last.pt"]


@pytest.mark.parametrize("problem,words", [("truncated", "cannot be read"), ("foreign", "not a Creative Agent"),
                                           ("missing", "does not exist")])
def test_unloadable_checkpoints_name_file_and_problem(tmp_path, problem, words):
    path = tmp_path / "ckpt.pt"
    if problem == "truncated":
        torch.save({"project": "creative_agent", "model": {"w": torch.randn(1000)}}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif problem == "foreign":
        torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=words) as info:
        load_checkpoint(str(path))
    assert str(path) in str(info.value)


def test_resume_with_another_configuration_is_refused(tmp_path, pairs_dir, capsys):
    assert run(0, 1, 0, tiny_args(tmp_path, pairs_dir)) == 0
    args = tiny_args(tmp_path, pairs_dir, "--num_layers", "2", "--num_epochs", "2", "--resume", "auto")
    assert run(0, 1, 0, args) == 2
    err = capsys.readouterr().err
    assert "checkpoint_last.pt" in err and "num_layers=1" in err


def metrics(log_dir):
    with open(log_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_exact_resume(tmp_path, pairs_dir):
    extra = ["--use_creative_agent", "true", "--dropout", "0.1", "--anti_cheating", "0.1", "--shuffle_targets",
             "true", "--batch_size", "2"]
    one_go, split = tmp_path / "one", tmp_path / "split"
    assert run(0, 1, 0, tiny_args(one_go, pairs_dir, *extra, "--num_epochs", "4")) == 0
    assert run(0, 1, 0, tiny_args(split, pairs_dir, *extra, "--num_epochs", "2")) == 0
    assert run(0, 1, 0, tiny_args(split, pairs_dir, *extra, "--num_epochs", "4", "--resume", "auto")) == 0
    a = load_checkpoint(str(one_go / "ckpt" / "run" / "checkpoint_last.pt"))
    b = load_checkpoint(str(split / "ckpt" / "run" / "checkpoint_last.pt"))
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for key in a["model"]:
        assert (a["model"][key] - b["model"][key]).abs().max() <= 1e-6, key
    ma, mb = metrics(one_go / "logs" / "run"), metrics(split / "logs" / "run")
    assert [r["epoch"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma[2:], mb[2:], strict=True):
        for key in ("train_loss", "val_loss", "mask_reg_loss", "complementarity", "coverage", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), key


def start_training(tmp_path, dataset, *extra):
    cmd = [sys.executable, "-u", os.path.join(ROOT, "train_simple_ddp.py"), "--dataset_folder", str(dataset),
           "--sample_rate", str(SR), "--codec_dim", "32", "--num_layers", "1", "--nhead", "2", "--batch_size", "1",
           "--checkpoint_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l"), "--run_name", "run",
           "--device", "cpu", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for(process, text, timeout=120):
    """Read the process's output until `text` appears; returns everything read."""
    seen, end = "", time.time() + timeout
    while time.time() < end:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never appeared in:\n{seen[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_and_resume_continues(tmp_path, pairs_dir, sig):
    process = start_training(tmp_path, pairs_dir, "--num_epochs", "50")
    wait_for(process, "Epoch 1:")
    process.send_signal(sig)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert f"{sig.name} received" in out and "--resume auto" in out
    state = load_checkpoint(str(tmp_path / "c" / "run" / "checkpoint_last.pt"))
    assert 1 <= state["epoch"] < 50
    stopped_at = (state["epoch"], state["batch_in_epoch"], state["step"])
    args = tiny_args(tmp_path, pairs_dir, "--num_epochs", str(state["epoch"] + 1), "--resume", "auto",
                     "--batch_size", "1")
    args.checkpoint_dir, args.log_dir = str(tmp_path / "c"), str(tmp_path / "l")
    assert run(0, 1, 0, args) == 0
    after = load_checkpoint(str(tmp_path / "c" / "run" / "checkpoint_last.pt"))
    assert after["epoch"] == stopped_at[0] + 1 and after["step"] > stopped_at[2]


def poison_loss(monkeypatch, is_bad, value=float("nan")) -> dict:
    """Multiply the training loss by `value` at the training steps n (1, 2, ...) where is_bad(n); counts steps."""
    original = objective.reconstruction_loss
    calls = {"n": 0}

    def patched(*args, **kwargs):
        total, terms = original(*args, **kwargs)
        if args[0].requires_grad:  # training, not validation
            calls["n"] += 1
            if is_bad(calls["n"]):
                total = total * value
        return total, terms

    monkeypatch.setattr(objective, "reconstruction_loss", patched)
    return calls


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, pairs_dir, monkeypatch):
    calls = poison_loss(monkeypatch, lambda n: n % 3 == 0, float("inf"))
    assert run(0, 1, 0, tiny_args(tmp_path, pairs_dir, "--batch_size", "1")) == 0
    record = metrics(tmp_path / "logs" / "run")[0]
    assert record["skipped_steps"] == calls["n"] // 3 > 0
    assert np.isfinite(record["train_loss"])
    state = load_checkpoint(str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_too_many_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path, pairs_dir, monkeypatch, capsys):
    assert run(0, 1, 0, tiny_args(tmp_path, pairs_dir, "--batch_size", "1")) == 0
    good = load_checkpoint(str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt"))
    poison_loss(monkeypatch, lambda n: True)
    args = tiny_args(tmp_path, pairs_dir, "--batch_size", "1", "--num_epochs", "2", "--resume", "auto",
                     "--max_nonfinite_steps", "3")
    assert run(0, 1, 0, args) == 2
    assert re.search(r"\d+ non-finite steps in a row \(the limit is --max_nonfinite_steps 3\)", capsys.readouterr().err)
    kept = load_checkpoint(str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt"))
    assert kept["epoch"] == good["epoch"] == 1
    for key in good["model"]:
        assert torch.equal(kept["model"][key], good["model"][key])


def children(pid):
    """Spawned worker processes of `pid` (not the resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == pid and "spawn_main" in cmd:
            found.append(int(entry))
    return found


def test_killed_rank_stops_the_whole_run(tmp_path, pairs_dir):
    process = start_training(tmp_path, pairs_dir, "--num_epochs", "50", "--world_size", "2",
                             "--collective_timeout", "20")
    wait_for(process, "Epoch 1:", timeout=180)
    workers = children(process.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    out, _ = process.communicate(timeout=90)
    assert process.returncode != 0
    assert time.time() - start < 60
    assert "exited" in out or "failed" in out
    time.sleep(1)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read()]


def test_killed_rank_under_torchrun_style_environment_times_out(tmp_path, pairs_dir):
    """Without a launcher to notice, the surviving rank's collective fails within the timeout, never hangs."""
    port = str(__import__("train_simple_ddp").free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-u", os.path.join(ROOT, "train_simple_ddp.py"), "--dataset_folder", pairs_dir,
               "--sample_rate", str(SR), "--codec_dim", "32", "--num_layers", "1", "--nhead", "2",
               "--batch_size", "1", "--checkpoint_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l"),
               "--run_name", "run", "--device", "cpu", "--num_epochs", "50", "--collective_timeout", "15"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    wait_for(procs[0], "Epoch 1:", timeout=180)
    procs[1].kill()
    start = time.time()
    procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0 and time.time() - start < 90


def test_exact_resume_with_two_processes(tmp_path, pairs_dir):
    """RNG states of every process and the sampler's epoch come back: 2 + 2 epochs == 4 epochs, on 2 ranks."""
    def probe(folder, *extra):
        argv = ["--dataset_folder", pairs_dir, "--sample_rate", str(SR), "--codec_dim", "32", "--num_layers", "1",
                "--nhead", "2", "--batch_size", "2", "--checkpoint_dir", str(folder / "c"), "--log_dir",
                str(folder / "l"), "--run_name", "run", "--use_creative_agent", "true", "--dropout", "0.2",
                "--anti_cheating", "0.2", "--shuffle_targets", "true", "--device", "cpu", *extra]
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ddp_probe.py"), str(folder), *argv],
                       check=True, timeout=300, capture_output=True)

    one_go, split = tmp_path / "one", tmp_path / "split"
    for folder in (one_go, split):
        folder.mkdir()
    probe(one_go, "--num_epochs", "4")
    probe(split, "--num_epochs", "2")
    probe(split, "--num_epochs", "4", "--resume", "auto")
    for rank in (0, 1):
        a, b = (torch.load(f / f"weights_rank{rank}.pt") for f in (one_go, split))
        for key in a:
            assert (a[key] - b[key]).abs().max() <= 1e-6, (rank, key)
