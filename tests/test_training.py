"""Pairs data, the trainer end to end, DDP on CPU, resume, the SLURM script."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT, SR, tiny_args

import train_simple_ddp
from checkpoints import load_checkpoint
from make_pairs import main as make_pairs_main
from pairs_dataset import WavPairsDataset
from train_simple_worker import run


def read_manifest(folder):
    with open(os.path.join(folder, "manifest.csv")) as f:
        return list(csv.DictReader(f))


def test_demo_pairs(tmp_path):
    out = tmp_path / "demo"
    assert make_pairs_main(["--demo", "--out", str(out)]) == 0
    rows = read_manifest(out)
    train = sorted(f for f in os.listdir(out / "train") if f.endswith(".wav"))
    assert len(train) == 2 * sum(r["split"] == "train" for r in rows) and len(os.listdir(out / "val")) > 0
    assert os.path.isfile(out / "train" / "beats.json") and all(float(r["tempo_bpm"]) > 0 for r in rows)
    info = sf.info(str(out / "train" / train[0]))
    assert info.samplerate == 24000 and info.frames == 48000
    assert not {r["song"] for r in rows if r["split"] == "train"} & {r["song"] for r in rows if r["split"] == "val"}
    first, second = (sf.read(str(out / "train" / "pair_0000_input.wav"))[0] for _ in range(2))
    assert np.array_equal(first, second)  # deterministic demo
    again = tmp_path / "demo2"
    make_pairs_main(["--demo", "--out", str(again)])
    assert np.array_equal(sf.read(str(again / "train" / "pair_0003_output.wav"))[0],
                          sf.read(str(out / "train" / "pair_0003_output.wav"))[0])


def test_pairs_from_folder(tmp_path, capsys):
    music = tmp_path / "music"
    (music / "album").mkdir(parents=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(3.2 * 44100)) / 44100
    for i in range(5):  # stereo 44.1 kHz songs of 3.2 s: 3 segments of 1 s -> 2 pairs each
        tone = np.sin(2 * np.pi * (220 + 110 * i) * t) * np.linspace(0.2, 0.6, len(t))
        sf.write(str(music / "album" / f"song{i}.flac"), np.stack([tone, 0.5 * tone], axis=1), 44100)
    sf.write(str(music / "short.wav"), 0.3 * rng.standard_normal(30000), 44100)
    sf.write(str(music / "silent.wav"), np.zeros(4 * 44100), 44100)
    (music / "broken.wav").write_bytes(b"RIFF not really a wav")
    out = tmp_path / "pairs"
    code = make_pairs_main(["--from_folder", str(music), "--out", str(out), "--segment_seconds", "1",
                            "--sample_rate", "16000", "--val_fraction", "0.4"])
    assert code == 0
    text = capsys.readouterr().out
    assert "songs read: 7" in text and "1 songs too short" in text and "3 silent pairs" in text
    assert "broken.wav" in text and "1 unreadable songs" in text
    rows = read_manifest(out)
    songs = {split: {r["song"] for r in rows if r["split"] == split} for split in ("train", "val")}
    assert len(songs["val"]) >= 1 and not songs["train"] & songs["val"]
    assert len(rows) == 10
    assert all(float(r["output_offset_s"]) - float(r["input_offset_s"]) == 1.0 for r in rows)
    info = sf.info(str(out / "train" / "pair_0000_input.wav"))
    assert info.samplerate == 16000 and info.frames == 16000 and info.channels == 1
    row = next(r for r in rows if r["split"] == "train" and r["pair"] == "pair_0001")
    song, _ = sf.read(row["song"])
    expected = song.mean(axis=1)[44100:88200]  # second segment, before resampling
    got, _ = sf.read(str(out / "train" / "pair_0001_input.wav"))
    assert abs(np.sqrt(np.mean(got**2)) - np.sqrt(np.mean(expected**2))) < 0.02


def test_matched_and_shuffled_targets(pairs_dir):
    folder = os.path.join(pairs_dir, "train")
    matched = WavPairsDataset(folder, SR, 4000)
    inp, tgt = (matched[2][k] for k in ("input", "target"))
    assert inp.shape == tgt.shape == (1, 4000) and "rhythm" not in matched[2]
    expected, _ = sf.read(matched.pairs[2][1], dtype="float32")
    np.testing.assert_allclose(tgt[0].numpy(), expected)
    shuffled = WavPairsDataset(folder, SR, 4000, shuffle_targets=True, seed=1)
    picks = [shuffled.target_index(i) for i in range(len(shuffled))]
    assert all(p != i for i, p in enumerate(picks))
    assert picks == [shuffled.target_index(i) for i in range(len(shuffled))]  # reproducible
    shuffled.set_epoch(1)
    assert picks != [shuffled.target_index(i) for i in range(len(shuffled))]  # fresh each epoch


def train(tmp_path, dataset, *extra):
    args = tiny_args(tmp_path, dataset, *extra)
    assert run(0, 1, 0, args) == 0
    return args


def read_metrics(tmp_path):
    with open(tmp_path / "logs" / "run" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("mode", [["--use_creative_agent", "true"], ["--mask_type", "none"],
                                  ["--mask_type", "temporal"], ["--mask_type", "frequency"],
                                  ["--mask_type", "energy"]])
def test_one_epoch_end_to_end(tmp_path, pairs_dir, capsys, mode):
    train(tmp_path, pairs_dir, *mode)
    out = capsys.readouterr().out
    agent = mode[0] == "--use_creative_agent"
    assert ("🎨 Creative Agent ENABLED" in out) == agent
    assert ("🎨 Creative Agent mask regularization loss: " in out) == agent
    assert "Epoch 1: Loss=" in out and "Complementarity=" in out and "Coverage=" in out
    record = read_metrics(tmp_path)[0]
    for key in ("epoch", "train_loss", "val_loss", "rms_in", "rms_tgt", "mask_reg_loss", "complementarity",
                "coverage", "balance", "lr", "seconds"):
        assert key in record
    assert np.isfinite(record["train_loss"]) and (record["mask_reg_loss"] is not None) == agent
    if mode[1] in ("temporal", "frequency", "energy"):
        assert record["coverage"] == pytest.approx(100.0)
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        assert (tmp_path / "ckpt" / "run" / name).is_file()
    logs = os.listdir(tmp_path / "logs" / "run")
    for name in ("training_curves.png", "arrangement_example.wav", "masks_example.png"):
        assert name in logs
    assert any(name.startswith("events.out.tfevents") for name in logs)


def test_resume_continues_epoch_count_and_saves_every(tmp_path, pairs_dir, capsys):
    train(tmp_path, pairs_dir, "--num_epochs", "1", "--save_every", "1")
    state = load_checkpoint(str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt"))
    assert state["epoch"] == 1 and state["config"]["segment_samples"] == 4000
    train(tmp_path, pairs_dir, "--num_epochs", "2", "--save_every", "1", "--resume", "auto")
    assert "Resumed from" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    assert load_checkpoint(str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt"))["epoch"] == 2
    assert (tmp_path / "ckpt" / "run" / "checkpoint_epoch_2.pt").is_file()


def test_missing_dataset_folder_says_how_to_make_one(tmp_path, capsys):
    args = tiny_args(tmp_path, str(tmp_path / "nothing"))
    assert run(0, 1, 0, args) == 2
    assert "make_pairs.py --from_folder" in capsys.readouterr().err


def test_default_dataset_is_generated(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import pairs_folder

    monkeypatch.setitem(pairs_folder.DEMO, "songs", 4)
    monkeypatch.setitem(pairs_folder.DEMO, "seconds", 2.0)
    monkeypatch.setitem(pairs_folder.DEMO, "segment_seconds", 0.5)
    args = train_simple_ddp.parse_args(["--sample_rate", str(SR), "--codec_dim", "32", "--num_layers", "1",
                                        "--nhead", "2", "--num_epochs", "1", "--run_name", "run"])
    assert run(0, 1, 0, args) == 0
    assert "generating the demo set" in capsys.readouterr().out
    assert (tmp_path / "dataset_wav_pairs" / "train" / "pair_0000_input.wav").is_file()


def test_two_processes_end_with_identical_weights_and_free_their_group(tmp_path, pairs_dir):
    argv = ["--dataset_folder", pairs_dir, "--sample_rate", str(SR), "--codec_dim", "32", "--num_layers", "1",
            "--nhead", "2", "--batch_size", "2", "--num_epochs", "1", "--checkpoint_dir", str(tmp_path / "c"),
            "--log_dir", str(tmp_path / "l"), "--run_name", "ddp", "--use_creative_agent", "true", "--device", "cpu"]
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ddp_probe.py"), str(tmp_path), *argv],
                   check=True, timeout=300)
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    saved = torch.load(tmp_path / "c" / "ddp" / "checkpoint_last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], w0[k]) for k in w0)  # the checkpoint holds the final weights
    # the process group is gone when run() returns: no Gloo thread is left to abort the interpreter's exit
    for rank in (0, 1) if os.path.isdir("/proc/self/task") else ():  # thread names: Linux only
        threads = (tmp_path / f"threads_rank{rank}.txt").read_text().split()
        assert not [name for name in threads if "gloo" in name or "tcpstore" in name], threads


def fake_srun(bin_dir):
    """A stand-in srun: starts SLURM_NTASKS copies of the command with SLURM_PROCID / SLURM_LOCALID set."""
    script = bin_dir / "srun"
    script.write_text("""#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!)
done
code=0
for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
exit $code
""")
    script.chmod(0o755)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "scontrol").chmod(0o755)


def test_slurm_script_syntax():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "submit_creative_agent.sh")], check=True)


def slurm_job(tmp_path, **env):
    """A job folder holding the project's scripts, and the environment of a stand-in SLURM job running there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_srun(bin_dir)
    work = tmp_path / "work"
    work.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            os.symlink(os.path.join(ROOT, name), work / name)
    python_dir = os.path.dirname(sys.executable)  # the suite's Python, whether or not its environment is active
    environment = dict(os.environ, PATH=f"{bin_dir}:{python_dir}:{os.environ['PATH']}", PYTHON=sys.executable,
                       SLURM_SUBMIT_DIR=str(work), SLURM_CPUS_PER_TASK="1", **env)
    environment.pop("RANK", None)
    return work, environment


def test_slurm_script_runs_two_cpu_processes(tmp_path, pairs_dir):
    work, env = slurm_job(tmp_path, SLURM_NTASKS="2", SLURM_JOB_ID="4242", DATASET=pairs_dir, EPOCHS="1",
                          EXTRA_ARGS=f"--sample_rate {SR} --codec_dim 32 --num_layers 1 --nhead 2 --device cpu")
    result = subprocess.run(["bash", os.path.join(ROOT, "submit_creative_agent.sh")], env=env, cwd=work,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 process" not in result.stdout and "2 process(es)" in result.stdout
    state = load_checkpoint(str(work / "checkpoints" / "creative_agent" / "checkpoint_last.pt"))
    assert state["world_size"] == 2 and state["config"]["anti_cheating"] == 0.1
    assert state["config"]["batch_size"] == 8


def test_encodec_training_from_a_local_folder(tmp_path, capsys):
    """The EnCodec path end to end, with randomly initialised weights of the real architecture saved locally."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")
    torch.manual_seed(0)
    weights = tmp_path / "encodec_24khz"
    transformers.EncodecModel(transformers.EncodecConfig()).save_pretrained(str(weights))
    from pairs_folder import Cutting, make_pairs, synth_song

    songs = [(f"s{i}", lambda i=i: synth_song(i, 1.5, 24000)) for i in range(3)]
    make_pairs(songs, str(tmp_path / "pairs"), Cutting(0.5, 24000, val_fraction=0.34), progress=False)
    args = train_simple_ddp.parse_args([
        "--dataset_folder", str(tmp_path / "pairs"), "--codec", "encodec", "--codec_path", str(weights),
        "--num_layers", "1", "--nhead", "2", "--num_epochs", "1", "--checkpoint_dir", str(tmp_path / "c"),
        "--log_dir", str(tmp_path / "l"), "--run_name", "run", "--use_creative_agent", "true", "--device", "cpu"])
    assert run(0, 1, 0, args) == 0
    assert "codec encodec (D=128)" in capsys.readouterr().out
    state = load_checkpoint(str(tmp_path / "c" / "run" / "checkpoint_last.pt"))
    assert state["config"]["codec_path"] == str(weights)


def test_encodec_without_weights_is_one_clear_error(tmp_path, pairs_dir, capsys):
    pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")
    args = tiny_args(tmp_path, pairs_dir, "--codec", "encodec", "--codec_path", str(tmp_path / "missing"),
                     "--sample_rate", "24000")
    assert run(0, 1, 0, args) == 2
    err = capsys.readouterr().err
    assert "EnCodec weights were not found" in err and "--codec_path" in err


@pytest.mark.parametrize("script", ["train_simple_ddp.py", "make_pairs.py", "arrange.py", "evaluate.py",
                                    "plot_training.py", "bench.py", "creative_agent.py"])
def test_every_command_has_help(script):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "usage:" in result.stdout


def test_adversarial_training_trains_the_discriminator(tmp_path, pairs_dir):
    train(tmp_path, pairs_dir, "--use_creative_agent", "true", "--adversarial_weight", "0.1", "--num_epochs", "2",
          "--save_every", "1")
    records = read_metrics(tmp_path)
    assert all(np.isfinite(r["adv_gen_loss"]) and np.isfinite(r["adv_disc_loss"]) for r in records)
    first, second = (load_checkpoint(str(tmp_path / "ckpt" / "run" / f"checkpoint_epoch_{e}.pt")) for e in (1, 2))
    assert any(not torch.equal(first["discriminator"][k], v) for k, v in second["discriminator"].items())
    assert "disc_optimizer" in second
    args = tiny_args(tmp_path, pairs_dir, "--use_creative_agent", "true", "--num_epochs", "3", "--resume", "auto")
    assert run(0, 1, 0, args) == 2  # resuming without the adversarial loss is refused with a message
