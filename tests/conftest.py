"""Shared fixtures: a tiny pairs folder and the arguments of a tiny, fast training run."""
import csv
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from beats import Pulse  # noqa: E402
from pairs_dataset import pair_grid  # noqa: E402
from pairs_folder import Cutting, make_pairs, make_song, synth_song  # noqa: E402
from train_simple_ddp import parse_args  # noqa: E402

SR = 8000
SEGMENT_SECONDS = 0.5


def tiny_pairs(folder: str, songs: int = 4, seconds: float = 2.0) -> str:
    """Synthetic songs at 8 kHz cut into 0.5 s pairs: a pairs folder that trains in seconds. Its beats.json holds
    the songs' true grids, so what the training tests measure does not hang on a tracker hearing 2 s songs."""
    loaders = [(f"song_{i}", lambda i=i: synth_song(100 + i, seconds, SR)) for i in range(songs)]
    make_pairs(loaders, folder, Cutting(SEGMENT_SECONDS, SR, val_fraction=0.25), progress=False)
    with open(os.path.join(folder, "manifest.csv")) as f:
        rows = list(csv.DictReader(f))
    for split in ("train", "val"):
        grids = {}
        for row in (r for r in rows if r["split"] == split):
            truth = make_song(100 + int(row["song"].split("_")[1]), seconds, SR)
            pulse = Pulse(60.0 / float(np.median(np.diff(truth.beats))), truth.beats, truth.downbeats, 4, 1.0)
            start = float(row["input_offset_s"])
            grids[row["pair"]] = pair_grid(pulse, start, start + SEGMENT_SECONDS, start + 2 * SEGMENT_SECONDS,
                                           (truth.key, False))
        with open(os.path.join(folder, split, "beats.json"), "w") as f:
            json.dump(grids, f)
    return folder


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> str:
    return tiny_pairs(str(tmp_path_factory.mktemp("pairs")))


def tiny_args(tmp_path, dataset: str, *extra: str):
    """Arguments of a tiny model (D=32, 1 layer per stage) writing into tmp_path."""
    return parse_args([
        "--dataset_folder", dataset, "--sample_rate", str(SR), "--codec_dim", "32", "--num_layers", "1",
        "--nhead", "2", "--batch_size", "4", "--num_epochs", "1", "--checkpoint_dir", str(tmp_path / "ckpt"),
        "--log_dir", str(tmp_path / "logs"), "--run_name", "run", "--device", "cpu", *extra])


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, pairs_dir):
    """Three small trained checkpoints: creative agent, temporal masks, no masks."""
    from train_simple_worker import run

    paths = {}
    for name, mode in (("agent", ["--use_creative_agent", "true"]), ("temporal", ["--mask_type", "temporal"]),
                       ("none", ["--mask_type", "none"])):
        tmp = tmp_path_factory.mktemp(name)
        assert run(0, 1, 0, tiny_args(tmp, pairs_dir, *mode)) == 0
        paths[name] = str(tmp / "ckpt" / "run" / "checkpoint_best.pt")
        paths[name + "_logs"] = str(tmp / "logs" / "run")
    return paths
