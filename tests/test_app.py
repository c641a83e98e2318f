"""The web page. Arranging without training (the rules), the page's checks of what it is given, and the
real server in a subprocess: uploads through gradio_client, then the page in a headless Chromium."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT, SR

from app import EXPECTED, RULES, Job, Song, Studio, find_checkpoints
from inference import Arranger, Request
from pairs_folder import synth_song

TEMPORAL, MASHABILITY, LAYERS = list(RULES)


def write_song(path: str, seed: int, seconds: float = 6.0, sr: int = SR) -> str:
    sf.write(path, synth_song(seed, seconds, sr), sr)
    return path


def test_the_temporal_rule_switches_songs_on_the_beat_with_nothing_learned():
    arranger = Arranger.rule("temporal", sample_rate=SR, section_beats=2)
    assert sum(p.numel() for p in arranger.model.parameters()) == 0
    song, other = (torch.from_numpy(synth_song(seed, 6.0, SR)) for seed in (3, 8))
    result = arranger.arrange(Request(song, other))
    out, hop = result.output, arranger.codec.hop_length
    assert out.shape == song.shape and torch.isfinite(out).all() and out.abs().max() <= 1.0
    assert result.grid.has_pulse and len(result.grid.beats) >= 8
    decided = result.masks[0].mean(dim=0) > 0.5  # per frame: the input's section?
    switches = torch.nonzero(torch.diff(decided.int())).flatten() + 1
    starts = torch.nonzero(torch.diff(result.sections)).flatten() + 1
    assert len(switches) >= 4  # each one where a section starts, within its short cross-fade
    assert all((starts - f).abs().min() <= arranger.config.fade_frames for f in switches)
    # inside a section the output is the song that section belongs to (the MDCT reconstructs exactly)
    first, second = switches[0].item(), switches[1].item()
    middle = slice((first + 4) * hop, (second - 4) * hop)
    source = (result.target if decided[first] == 0 else song)[middle]  # the target as it entered: aligned
    chunks = lambda x: x[: len(x) // 64 * 64].view(-1, 64)  # noqa: E731  the fader's gain is smooth: per chunk
    assert torch.nn.functional.cosine_similarity(chunks(out[middle]), chunks(source), dim=1).min() > 0.999


def test_the_layers_rule_plays_both_songs_at_once():
    arranger = Arranger.rule("layers", sample_rate=SR)
    song, other = (torch.from_numpy(synth_song(seed, 4.0, SR)) for seed in (3, 8))
    result = arranger.arrange(Request(song, other, align=False))
    m_in, m_tgt = result.masks
    both = ((m_in > 0.2) & (m_tgt > 0.2)).float().mean(dim=0)  # per frame: channels where both songs sound
    assert (both > 0).float().mean() > 0.5 and torch.isfinite(result.output).all()


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("songs")
    good = [write_song(str(folder / "a.wav"), 3), write_song(str(folder / "b.flac"), 8)]
    (folder / "text.mp3").write_text("this is not audio\n")
    sf.write(folder / "silent.wav", np.zeros(3 * SR), SR)
    sf.write(folder / "blip.wav", synth_song(5, 0.1, SR), SR)
    (folder / "broken.pt").write_bytes(b"\x80\x02 not a checkpoint")
    return folder, good


@pytest.mark.parametrize("bad, message", [
    (dict(song=Song("text.mp3", "")), r"input song, text\.mp3: unreadable or not audio"),
    (dict(other=Song("silent.wav", "")), r"target song, silent\.wav: silent"),
    (dict(song=Song("blip.wav", "")), r"0\.10 s of audio .* too short"),
    (dict(other=Song(None, "")), r"target: upload a song or give its path"),
    (dict(song=Song("a.wav", "", 0, 500)), r"last 1 to 120 s"),
    (dict(song=Song("a.wav", "", 60)), r"holds no samples after 60 s"),
    (dict(approach="broken.pt"), r"broken\.pt"),
    (dict(balance=0.8), r"needs a creative-agent checkpoint"),
])
def test_the_page_says_what_is_wrong_with_its_input(songs, tmp_path, bad, message):
    folder, (a, b) = songs
    job = Job(Song(a, ""), Song(b, ""), TEMPORAL)
    for name, value in bad.items():
        if isinstance(value, Song) and value.upload:
            value.upload = str(folder / value.upload)
        setattr(job, name, str(folder / value) if name == "approach" else value)
    with pytest.raises(EXPECTED, match=message):
        Studio([], str(tmp_path)).arrange(job)
    assert os.listdir(tmp_path) == []  # nothing written for a refused job


def test_serving_the_network_reads_no_paths_on_the_server(songs, tmp_path):
    folder, (a, b) = songs
    studio = Studio([], str(tmp_path), server_paths=False)  # app.py --host 0.0.0.0
    with pytest.raises(EXPECTED, match="reads no paths on the server"):
        studio.arrange(Job(Song(a, ""), Song(None, b), TEMPORAL))  # the target by its path
    with pytest.raises(EXPECTED, match="not one of the offered checkpoints"):
        studio.arrange(Job(Song(a, ""), Song(b, ""), str(folder / "broken.pt")))


def test_the_page_offers_each_runs_checkpoints_then_the_rules(tmp_path):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        for name in ("checkpoint_best.pt", "checkpoint_last.pt", "checkpoint_epoch_3.pt"):
            (tmp_path / run / name).write_bytes(b"")
    given = str(tmp_path / "b" / "checkpoint_last.pt")
    found = find_checkpoints(given, str(tmp_path))
    assert found == [given] + [str(tmp_path / r / "checkpoint_best.pt") for r in "ab"] + [
        str(tmp_path / "a" / "checkpoint_last.pt")]  # the given one first, once; no epoch checkpoints
    assert Studio(found, str(tmp_path)).approaches == found + list(RULES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoints):
    """`python app.py --checkpoint` (a tiny agent) on a free port, from an empty folder; yields (url, process,
    its working folder, the folder it runs in)."""
    pytest.importorskip("gradio_client", reason="the web page's tests need pip install -r requirements-app.txt")
    cwd = tmp_path_factory.mktemp("app_cwd")
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--port", str(port), "--checkpoint",
                             checkpoints["agent"], "--max_seconds", "20", "--max_upload_mb", "1"], cwd=cwd,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    lines, deadline = [], time.time() + 120
    while time.time() < deadline and not any("Running on local URL" in line for line in lines):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
    if not any("Running on local URL" in line for line in lines):
        proc.kill()
        pytest.fail("app.py did not start:\n" + "".join(lines))
    working = re.search(r"working folder (\S+)", "".join(lines)).group(1)
    yield f"http://127.0.0.1:{port}", proc, working, cwd
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: the page removes its working folder
        proc.wait(timeout=30)


def ask(client, a, b, approach, seconds=4.0):
    from gradio_client import handle_file

    return client.predict(handle_file(a), "", 0, seconds, None, b, 0.5, seconds, approach, 1, 0.5, True, None, 0.5,
                          api_name="/arrange")


def test_server_arranges_uploads_refuses_bad_files_and_keeps_serving(server, songs, checkpoints, tmp_path):
    from gradio_client import Client

    url, proc, working, _ = server
    folder, (a, b) = songs
    client = Client(url, verbose=False, download_files=str(tmp_path))
    for approach, sr in ((TEMPORAL, 24000), (checkpoints["agent"], SR)):  # a rule (24 kHz), the tiny checkpoint
        wav, picture, summary, excerpt, aligned = ask(client, a, b, approach)
        audio, rate = sf.read(wav)
        assert rate == sr and len(audio) == round(4.0 * sr) and np.isfinite(audio).all()
        assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.01
        assert sf.info(aligned).frames == len(audio) and sf.info(excerpt).frames == len(audio)
        assert os.path.getsize(picture) > 10_000 and "input share" in summary and "on the beat" in summary
    with pytest.raises(Exception, match=r"text\.mp3: unreadable or not audio"):
        ask(client, str(folder / "text.mp3"), b, TEMPORAL)
    with pytest.raises(Exception, match="not a Creative Agent checkpoint|unreadable|broken"):
        ask(client, a, b, str(folder / "broken.pt"))
    with pytest.raises(Exception, match=r"last 1 to 20 s"):  # app.py --max_seconds 20
        ask(client, a, b, TEMPORAL, seconds=30.0)
    big = write_song(str(tmp_path / "big.wav"), 4, seconds=70.0)  # 1.1 MB: 16-bit samples at 8 kHz
    with pytest.raises(Exception, match=r"(?i)exceeds the maximum"):  # app.py --max_upload_mb 1
        ask(client, big, b, TEMPORAL)
    wav, *_ = ask(client, b, a, TEMPORAL, seconds=3.0)  # the next request still succeeds
    assert len(sf.read(wav)[0]) == round(3.0 * 24000) and proc.poll() is None


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not chromium(), reason="no Chromium here (Debian: apt-get install chromium)")
def test_the_page_in_a_headless_browser(server, songs, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    url, *_ = server
    _, (a, b) = songs
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--no-first-run", "--disable-sync"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=flags)
        page = browser.new_page()
        page.goto(url)
        page.locator("#input_song input[type=file]").set_input_files(a)
        page.locator("#target_song input[type=file]").set_input_files(b)
        page.get_by_label("length (s)").first.fill("4")
        page.get_by_label("length (s)").nth(1).fill("4")
        page.get_by_role("button", name="Arrange").click()
        arranged = page.locator("#arrangement audio[src]")
        arranged.wait_for(state="attached", timeout=60_000)
        page.screenshot(path=os.path.join(os.environ.get("APP_SCREENSHOT_DIR", str(tmp_path)), "app.png"),
                        full_page=True)
        assert arranged.get_attribute("src") and "arrangement.wav" in page.locator("#arrangement").inner_html()
        browser.close()


def test_server_removes_its_working_folder_at_exit(server):
    _, proc, working, cwd = server
    assert os.path.isdir(working)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert not os.path.exists(working) and os.listdir(cwd) == []
