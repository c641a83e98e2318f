"""`arrange.py`, `evaluate.py`, training curves and pictures."""
import csv
import os
import re
from dataclasses import replace
from urllib.parse import unquote

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SR

import arrange
import evaluate
import inference
import plot_training
from inference import Arranger, Request

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def song(path, seconds, sr, channels=1, freq=330.0):
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.4 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))
    sf.write(str(path), np.stack([tone] * channels, axis=1) if channels > 1 else tone, sr)
    return str(path)


@pytest.mark.parametrize("kind", ["agent", "temporal", "none"])
@pytest.mark.parametrize("in_s,in_sr,in_ch,tgt_s,tgt_sr", [(0.3, 8000, 1, 2.0, 8000),  # shorter than a segment
                                                          (3.7, 44100, 2, 1.1, 22050)])  # longer, stereo, rates
def test_arrange_any_length_rate_and_channels(tmp_path, checkpoints, kind, in_s, in_sr, in_ch, tgt_s, tgt_sr,
                                              capsys):
    a = song(tmp_path / "a.wav", in_s, in_sr, in_ch)
    b = song(tmp_path / "b.flac", tgt_s, tgt_sr, freq=220.0)
    out, plot = tmp_path / "out.wav", tmp_path / "masks.png"
    code = arrange.main(["--checkpoint", checkpoints[kind], "--input", a, "--target", b, "--output", str(out),
                         "--mask_plot", str(plot)])
    assert code == 0
    audio, sr = sf.read(str(out))
    assert sr == SR and len(audio) == round(in_s * SR)
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert is_png(plot)
    line = capsys.readouterr().out
    assert "complementarity" in line and "coverage" in line and "balance" in line
    share = float(re.search(r"input share (\d\.\d\d)", line).group(1))
    assert 0.0 <= share <= 1.0 and "temporal variation" in line


def windows_of(checkpoint: str, samples: int) -> Arranger:
    """A checkpoint's Arranger that arranges in windows of `samples`."""
    arranger = Arranger.load(checkpoint)
    return replace(arranger, config=replace(arranger.config, segment_samples=samples))


def test_arrange_hard_masks_are_complementary(checkpoints):
    x, y = torch.randn(3 * SR) * 0.1, torch.randn(SR) * 0.1
    _, (m_in, m_tgt), _, _ = inference.arrange_song(windows_of(checkpoints["agent"], 4000), Request(x, y, hard=True))
    torch.testing.assert_close(m_in + m_tgt, torch.ones_like(m_in))


def test_no_seam_at_window_boundaries(checkpoints):
    """The output's sample-to-sample jump where two windows meet is no larger than elsewhere."""
    arranger = windows_of(checkpoints["temporal"], 4000)
    codec = arranger.codec
    t = torch.arange(6 * SR) / SR
    x = 0.3 * torch.sin(2 * torch.pi * 200 * t)
    y = 0.3 * torch.sin(2 * torch.pi * 300 * t)
    out, _, _, sections = inference.arrange_song(arranger, Request(x, y))
    jumps = (out[1:] - out[:-1]).abs()
    plan = inference.plan_windows(sections, codec.hop_length, len(x), 4000, 1000)
    assert len(plan) > 2 and [kept for _, kept, _ in plan[1:]] == [end for _, _, end in plan[:-1]]  # they tile
    near_edge = torch.zeros(len(jumps), dtype=torch.bool)
    for _, kept, _ in plan[1:]:
        near_edge[kept - 300 : kept + 300] = True
    assert jumps[near_edge].max() <= 1.05 * jumps[~near_edge].max()


def test_windows_tile_the_song_on_section_starts():
    sections = torch.arange(1000) // 37  # sections of 37 frames
    plan = inference.plan_windows(sections, 8, 8000, 2000, 240)
    assert plan[0][1] == 0 and plan[-1][2] == 8000
    for begin, kept, end in plan:
        assert begin <= kept - 240 or begin == 0
        assert end <= begin + 2000 and (end == 8000 or end % (37 * 8) == 0)  # cut only where a section starts


@pytest.mark.parametrize("problem", ["missing", "unreadable", "silent", "foreign"])
def test_arrange_bad_input_is_one_clear_error(tmp_path, checkpoints, problem, capsys):
    good = song(tmp_path / "good.wav", 1.0, SR)
    bad = str(tmp_path / "bad.wav")
    ckpt = checkpoints["agent"]
    if problem == "unreadable":
        open(bad, "wb").write(b"this is not audio at all")
    elif problem == "silent":
        sf.write(bad, np.zeros(SR), SR)
    elif problem == "foreign":
        ckpt = str(tmp_path / "other.pt")
        torch.save({"state_dict": {}}, ckpt)
        bad = good
    out = tmp_path / "out.wav"
    code = arrange.main(["--checkpoint", ckpt, "--input", good, "--target", bad, "--output", str(out)])
    assert code == 2 and not out.exists()
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]
    err = capsys.readouterr().err
    assert err.startswith("error: ") and (os.path.basename(bad) in err or "other.pt" in err)


def test_evaluate_writes_report_table_audio_and_plots(tmp_path, checkpoints, pairs_dir):
    out = tmp_path / "eval"
    code = evaluate.main(["--checkpoints", f"agent={checkpoints['agent']}", f"temporal={checkpoints['temporal']}",
                          f"none={checkpoints['none']}", "--dataset_folder", pairs_dir, "--out", str(out),
                          "--num_examples", "2"])
    assert code == 0
    with open(out / "metrics.csv") as f:
        rows = {r["approach"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["agent", "temporal", "none"]
    for key in ("val_loss", "complementarity", "coverage", "balance", "lsd_in_db", "lsd_tgt_db",
                "lsd_max_db", "input_share", "rms_ratio", "temporal_variation", "mask_variability",
                "seconds_per_audio_minute"):
        assert all(np.isfinite(float(r[key])) for r in rows.values())
    assert float(rows["temporal"]["complementarity"]) >= 95.0  # decided, but for each switch's few frames of fade
    assert float(rows["none"]["complementarity"]) == pytest.approx(0.0)
    assert float(rows["temporal"]["mask_variability"]) == pytest.approx(0.0, abs=1e-6)
    assert float(rows["temporal"]["temporal_variation"]) == pytest.approx(0.5, abs=0.05)  # less the fades' ramps
    assert float(rows["none"]["temporal_variation"]) == pytest.approx(0.0)
    for r in rows.values():
        assert 0 <= float(r["input_share"]) <= 1
        assert float(r["lsd_max_db"]) == pytest.approx(max(float(r["lsd_in_db"]), float(r["lsd_tgt_db"])),
                                                       rel=0.5)
    report = (out / "report.md").read_text()
    assert "scores best" in report and "| agent |" in report
    audio = sorted(os.listdir(out / "audio"))
    for pair in ("pair_0000", "pair_0001"):
        for role in ("input", "target", "agent", "temporal", "none"):
            assert f"{pair}_{role}.wav" in audio
    plots = os.listdir(out / "plots")
    assert "comparison.png" in plots and "pair_0001_agent_masks.png" in plots
    assert all(is_png(out / "plots" / p) for p in plots)


def test_report_html_links_only_files_that_exist(tmp_path, checkpoints, pairs_dir):
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoints", f"agent={checkpoints['agent']}", f"none={checkpoints['none']}",
                          "--dataset_folder", pairs_dir, "--out", str(out), "--num_examples", "2"]) == 0
    page = (out / "report.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert links and not [link for link in links if "://" in link or link.startswith("/")]  # relative only
    missing = [link for link in links if not (out / unquote(link)).is_file()]
    assert not missing
    audio = re.findall(r'<audio controls[^>]*src="([^"]+)"', page)
    assert sorted(audio) == sorted(f"audio/pair_000{i}_{role}.wav" for i in (0, 1)
                                   for role in ("input", "target", "agent", "none"))
    assert page.count("<img") == 4 and "<table>" in page and "input_share" in page


def test_evaluate_bad_checkpoint_writes_nothing(tmp_path, checkpoints, pairs_dir, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(checkpoints["none"], "rb").read()[:1000])
    out = tmp_path / "eval"
    code = evaluate.main(["--checkpoints", f"agent={checkpoints['agent']}", f"broken={truncated}",
                          "--dataset_folder", pairs_dir, "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "truncated.pt" in capsys.readouterr().err


def test_training_curves_written_and_overlaid(tmp_path, checkpoints):
    assert is_png(os.path.join(checkpoints["agent_logs"], "training_curves.png"))
    out = tmp_path / "curves.png"
    assert plot_training.main([checkpoints["agent_logs"], checkpoints["none_logs"], "--out", str(out)]) == 0
    assert is_png(out)
    assert plot_training.main([str(tmp_path / "nope"), "--out", str(out)]) == 2
