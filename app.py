"""A web page to arrange two songs: upload them (or give paths on the server), choose, listen, download.

  pip install -r requirements-app.txt && python app.py          # no checkpoint: the rules, on the beat
  python app.py --checkpoint checkpoints/RUN/checkpoint_best.pt
  python app.py --checkpoints_dir checkpoints                    # choose among the runs in the page

then open http://127.0.0.1:7860. Without a trained checkpoint the page offers three rules that need no training: the
songs switch every few bars of the input; or in phrases, the target's best-fitting part for every other phrase of
the input, with a bar-long cross-fade into each (its plan is shown in the summary); or the input's rhythm plays
under the target's harmony. Either way the
target is first laid on the input's grid (tempo, bars, key, loudness; beats.py), as arrange.py does. One job runs
at a time; the others wait in a queue. Everything the page writes stays in one temporary folder, removed at exit.
"""
from __future__ import annotations

import argparse
import atexit
import glob
import os
import shutil
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass

import torch

from audio_codec import CodecUnavailable
from beats import AlignmentError
from checkpoints import CheckpointError
from config import str2bool
from inference import Arranger, AudioInputError, Request, load_audio, save_wave, summary_line

RULES = {"Rule: switch songs every few bars (no training)": "temporal",
         "Rule: phrases, the best-fitting part of the target for every other one (no training)": "mashability",
         "Rule: the input's rhythm under the target's harmony (no training)": "layers"}
MIN_SECONDS = 1.0  # shorter excerpts hold too few beats to arrange
EXPECTED = (AudioInputError, CheckpointError, CodecUnavailable, AlignmentError, ValueError)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a checkpoint of train_simple_ddp.py to offer first")
    p.add_argument("--checkpoints_dir", default=None,
                   help="offer every checkpoint_best.pt / checkpoint_last.pt under this folder")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--max_seconds", type=float, default=120.0,
                   help="the longest excerpt of a song that is arranged, in seconds (default 120)")
    p.add_argument("--max_upload_mb", type=float, default=50.0, help="the largest upload, in MB (default 50)")
    p.add_argument("--queue_size", type=int, default=16, help="jobs that may wait for the one running (default 16)")
    p.add_argument("--server_paths", type=str2bool, default=None,
                   help="let the page read songs and checkpoints by their path on this machine (default: true when "
                        "serving this machine only, false when --host serves the network)")
    args = p.parse_args(argv)
    if args.server_paths is None:
        args.server_paths = args.host in ("127.0.0.1", "localhost", "::1")
    if args.max_seconds < MIN_SECONDS:
        p.error(f"--max_seconds must be at least {MIN_SECONDS:g}")
    for name in ("checkpoint", "checkpoints_dir"):
        path = getattr(args, name)
        if path and not os.path.exists(path):
            p.error(f"--{name} {path}: does not exist")
    return args


def find_checkpoints(checkpoint: str | None, folder: str | None) -> list[str]:
    """The checkpoints the page offers: `checkpoint`, then each run's best and last checkpoints under `folder`."""
    found = [checkpoint] if checkpoint else []
    if folder:
        for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
            found += sorted(glob.glob(os.path.join(folder, "**", name), recursive=True))
    return list(dict.fromkeys(found))


@dataclass
class Song:
    """One song as the page gives it: an uploaded file or a path on the server, and the excerpt to use (s)."""
    upload: str | None
    path: str
    start: float = 0.0
    seconds: float = 30.0

    def load(self, name: str, sample_rate: int, max_seconds: float, server_paths: bool = True) -> torch.Tensor:
        """The excerpt [S] at `sample_rate`; AudioInputError (naming the `name` song) for what cannot be used."""
        source = self.upload or (self.path or "").strip()
        if not source:
            hint = " or give its path on the server" if server_paths else ""
            raise AudioInputError(f"{name}: upload a song{hint}")
        if not self.upload and not server_paths:
            raise AudioInputError(f"{name}: this page reads no paths on the server (app.py --server_paths true); "
                                  f"upload the song")
        if self.start < 0 or not MIN_SECONDS <= self.seconds <= max_seconds:
            raise AudioInputError(f"{name}: the excerpt must start at 0 s or later and last {MIN_SECONDS:g} to "
                                  f"{max_seconds:g} s (got {self.start:g} s for {self.seconds:g} s)")
        label = os.path.basename(source) if self.upload else source
        try:
            audio = load_audio(source, sample_rate, start=self.start, seconds=self.seconds)
        except AudioInputError as err:
            raise AudioInputError(f"{name} song, {str(err).replace(source, label)}") from None
        if len(audio) < MIN_SECONDS * sample_rate:
            raise AudioInputError(f"{name} song, {label}: {len(audio) / sample_rate:.2f} s of audio from "
                                  f"{self.start:g} s on, too short to arrange (at least {MIN_SECONDS:g} s)")
        return audio


@dataclass
class Job:
    """What the page asks for: two songs, the approach (a rule or a checkpoint) and its settings."""
    song: Song
    other: Song
    approach: str
    section_bars: int = 1  # the rules' sections (4 beats a bar where a song's bars are not known)
    balance: float = 0.5
    match_key: bool = True
    style_upload: str | None = None
    style_strength: float = 0.5

    @classmethod
    def from_page(cls, values: tuple) -> Job:
        """The job of the page's values, one per input component in the order build_page lists them: each song's
        upload, path, start and length, then the approach, bars per section, input share, key switch, style
        reference and style strength."""
        songs, (approach, bars, balance, key, style, strength) = (values[:4], values[4:8]), values[8:]
        song, other = (Song(upload, path, start or 0, seconds or 30) for upload, path, start, seconds in songs)
        return cls(song, other, approach, int(bars), float(balance), bool(key), style, float(strength))


class Studio:
    """What the page arranges with: the approaches on offer, the arrangers loaded so far, its working folder."""

    def __init__(self, checkpoints: list[str], folder: str, max_seconds: float = 120.0, server_paths: bool = True):
        self.checkpoints, self.folder, self.max_seconds = checkpoints, folder, max_seconds
        self.server_paths = server_paths  # may songs and checkpoints be read by a path the page gives?
        self.loaded: dict[tuple, Arranger] = {}
        self.jobs = 0

    @property
    def approaches(self) -> list[str]:
        return self.checkpoints + list(RULES)

    def arranger(self, approach: str, section_bars: int) -> Arranger:
        """The rule or checkpoint `approach`, loaded once (a checkpoint again when its file changes)."""
        if approach in RULES:
            key = (RULES[approach], int(section_bars))
        else:
            if approach not in self.checkpoints and not self.server_paths:
                raise CheckpointError(f"{approach}: not one of the offered checkpoints (app.py --server_paths true "
                                      f"reads any path)")
            if not os.path.isfile(approach):
                raise CheckpointError(f"{approach}: no such checkpoint on the server")
            key = (approach, os.path.getmtime(approach))
        if key not in self.loaded:
            self.loaded = {k: v for k, v in self.loaded.items() if k[0] != key[0]}  # a changed file: drop the old
            rule = approach in RULES
            self.loaded[key] = (Arranger.rule(key[0], section_beats=4 * key[1], section_bars=key[1]) if rule
                                else Arranger.load(approach))
        return self.loaded[key]

    def new_job_folder(self) -> str:
        """A fresh folder for one job's files; the jobs before it (served already) are removed."""
        jobs = os.path.join(self.folder, "jobs")
        shutil.rmtree(jobs, ignore_errors=True)
        self.jobs += 1
        path = os.path.join(jobs, str(self.jobs))
        os.makedirs(path)
        return path

    def arrange(self, job: Job, progress=lambda fraction, desc="": None) -> tuple[str, str, str, str, str]:
        """(arrangement WAV, mask picture PNG, summary, input excerpt WAV, aligned target WAV), written into a new
        job folder. Raises one of EXPECTED with a message for the page where the input cannot be used."""
        progress(0.05, desc="loading")
        arranger = self.arranger(job.approach, job.section_bars)
        arranger.check_balance(job.balance)
        sr = arranger.sample_rate
        song = job.song.load("input", sr, self.max_seconds, self.server_paths)
        other = job.other.load("target", sr, self.max_seconds, self.server_paths)
        style = None
        if job.style_upload:
            if arranger.model.style_encoder is None:
                raise CheckpointError("a style reference needs a checkpoint trained with --style_weight > 0")
            style = arranger.style_latent(Song(job.style_upload, "").load("style reference", sr, self.max_seconds))
        progress(0.2, desc="aligning the target to the input and arranging")
        result = arranger.arrange(Request(song, other, job.balance, match_key=job.match_key, style=style,
                                          style_strength=job.style_strength,
                                          attention=arranger.model.use_creative_agent))
        progress(0.8, desc="writing the audio and the picture")
        folder = self.new_job_folder()
        waves = dict(arrangement=result.output, input=song, target_aligned=result.target)
        wav = {name: os.path.join(folder, f"{name}.wav") for name in waves}
        for name, wave in waves.items():
            save_wave(wav[name], wave, sr)
        picture = os.path.join(folder, "masks.png")
        arranger.picture(picture, result, title=job.approach if job.approach in RULES else
                         os.path.basename(os.path.dirname(job.approach)))
        lines = [f"note: {note}" for note in result.notes()]
        lines += [f"aligned target: {result.alignment.line()}"] if result.alignment is not None else []
        lines += [result.plan.table()] if result.plan is not None else []
        lines.append(summary_line("arrangement", result, sr, job.balance))
        return wav["arrangement"], picture, "\n".join(lines), wav["input"], wav["target_aligned"]

    def warm_up(self) -> None:
        """Arrange two short synthetic songs once, so the first visitor does not wait for the beat tracker's JIT."""
        from pairs_folder import synth_song

        arranger = self.arranger(next(iter(RULES)), 4)
        song, other = (torch.from_numpy(synth_song(seed, 4.0, arranger.sample_rate)) for seed in (1, 2))
        arranger.arrange(Request(song, other))


def song_inputs(gr, name: str, server_paths: bool):
    """The page's inputs for one song: upload, or a path on the server (where allowed), and the excerpt."""
    with gr.Column():
        gr.Markdown(f"### {name} song")
        upload = gr.Audio(label=f"{name} song (wav, flac, ogg, mp3)", type="filepath", sources=["upload"],
                          elem_id=f"{name.lower()}_song")
        path = gr.Textbox(label="or its path on the server", placeholder="/path/to/song.flac", visible=server_paths)
        with gr.Row():
            start = gr.Number(label="start (s)", value=0, minimum=0)
            seconds = gr.Number(label="length (s)", value=30, minimum=MIN_SECONDS)
    return [upload, path, start, seconds]


def build_page(studio: Studio):
    """The gradio Blocks of the page; its one event, `arrange`, is also the API that gradio_client calls."""
    import gradio as gr

    def arrange(*page, progress=gr.Progress()):  # noqa: B008  gradio's convention
        try:
            return studio.arrange(Job.from_page(page), progress)
        except EXPECTED as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # the server keeps serving; the page says what went wrong
            traceback.print_exc()
            raise gr.Error(f"arranging failed: {type(err).__name__}: {err}", print_exception=False) from None

    with gr.Blocks(title="Creative Agent", analytics_enabled=False) as page:
        gr.Markdown("# Creative Agent: arrange two songs\nThe input song sets the grid: the target is laid on its "
                    "tempo, bars, key and loudness, then the two are arranged section by section.")
        with gr.Row():
            inputs = song_inputs(gr, "Input", studio.server_paths) + song_inputs(gr, "Target", studio.server_paths)
        with gr.Row():
            approach = gr.Dropdown(studio.approaches, value=studio.approaches[0], label="approach",
                                   allow_custom_value=studio.server_paths, scale=3,
                                   info="a trained checkpoint" + (" (or its path on the server)" * studio.server_paths)
                                   + ", or a rule that needs no training")
            bars = gr.Slider(1, 8, value=1, step=1, label="bars per section (rules)")
            balance = gr.Slider(0, 1, value=0.5, step=0.05, label="input share (agent checkpoints trained with "
                                "--balance_range)")
            match_key = gr.Checkbox(value=True, label="shift the target to the input's key")
        with gr.Accordion("style reference (checkpoints trained with --style_weight)", open=False):
            style = gr.Audio(label="style reference", type="filepath", sources=["upload"])
            strength = gr.Slider(0, 1, value=0.5, step=0.05, label="style strength")
        button = gr.Button("Arrange", variant="primary")
        output = gr.Audio(label="arrangement", type="filepath", buttons=["download"], interactive=False,
                          elem_id="arrangement")
        summary = gr.Textbox(label="what is heard", lines=4, interactive=False)
        picture = gr.Image(label="masks, beat grid and waveforms", type="filepath", interactive=False)
        with gr.Row():
            heard = [gr.Audio(label=label, type="filepath", buttons=["download"], interactive=False)
                     for label in ("input excerpt", "target, aligned to the input")]
        button.click(arrange, inputs + [approach, bars, balance, match_key, style, strength],
                     [output, picture, summary, *heard], api_name="arrange")
    return page


def working_folder() -> str:
    """The one folder the page writes into (gradio's uploads and cache too), removed at exit and on SIGTERM."""
    folder = tempfile.mkdtemp(prefix="creative_agent_app_")
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(folder, "gradio")  # read when gradio is imported
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = working_folder()
    studio = Studio(find_checkpoints(args.checkpoint, args.checkpoints_dir), folder, args.max_seconds,
                    args.server_paths)
    print(f"working folder {folder} (removed at exit); warming up the beat tracker ...", flush=True)
    studio.warm_up()
    page = build_page(studio)
    page.queue(default_concurrency_limit=1, max_size=args.queue_size)
    page.launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb:g}mb",
                show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
