"""A run's configuration: one typed record that train_simple_ddp.py's command line fills, every checkpoint stores
(as a plain dict) and `upgrade` completes for checkpoints of older versions.

Each field is one flag of the same name, with its default and help beside it: a flag goes from the command line to
this record to the code that reads `config.NAME`.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field, fields

from audio_codec import CODECS
from fixed_masks import MASK_TYPES
from layers import BASS_HZ
from losses import DEFAULT_LOSS_WEIGHTS

COMPILE_CHOICES = ("auto", "graphs", "default", "none")  # --compile: what auto means depends on the device
SILENCE_DB = -60.0  # RMS level (dBFS) below which a song or segment is silent: the usual silence-detection level


def str2bool(value: str) -> bool:
    """A command line's true/false (also 1/0, yes/no, on/off): how every CLI spells a switch."""
    if value.lower() in ("true", "1", "yes", "y", "on"):
        return True
    if value.lower() in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def share_range(text: str) -> tuple[float, float]:
    """'LO,HI' with 0 < LO <= HI < 1 -> (LO, HI)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI such as 0.2,0.8, got {text!r}") from None
    if not 0 < lo <= hi < 1:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI < 1, got {text!r}")
    return lo, hi


def frame_scales(text: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16): distinct positive frame counts, 1 among them."""
    try:
        scales = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame counts such as 1,4,16, got {text!r}") from None
    if 1 not in scales or min(scales) < 1 or len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError(f"expected distinct positive frame counts including 1, got {text!r}")
    return scales


def count(text: str) -> int:
    """A whole number >= 0 (of frames or beats)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 such as 32, got {text!r}")
    return int(text)


def head_counts(counts: list[int]) -> int | list[int]:
    """--nhead as the model and the checkpoints take it: one count as an int (as checkpoints have always stored
    it), one count per stage as a list."""
    return counts[0] if len(counts) == 1 else counts


def flag(default, group: str, help: str = "", shapes_model: bool = False, **argparse_options):
    """A field that is also a command-line flag of the same name, in `group` of --help; `shapes_model`: it shapes
    the model (model_simple_transformer.model_options), so a resumed run may not change it (MODEL_KEYS)."""
    return field(default=default, metadata=dict(group=group, help=help, shapes_model=shapes_model,
                                                **argparse_options))


def loss_weight(name: str, help: str):
    """The flag of a loss weight, with its default from losses.DEFAULT_LOSS_WEIGHTS, their one home."""
    default = DEFAULT_LOSS_WEIGHTS[name]
    return flag(default, "loss", f"{help} (default {default:g})", type=float)


def derived(default=None, shapes_model: bool = False):
    """A field the run fills in itself (not a flag), stored in checkpoints."""
    return field(default=default, metadata=dict(group=None, shapes_model=shapes_model))


@dataclass
class Config:
    # ---- data
    dataset_folder: str = flag("dataset_wav_pairs", "data", "pairs folder with train/ and val/ (default "
                               "dataset_wav_pairs: the synthetic demo set, generated when missing)")
    shuffle_targets: bool = flag(False, "data", "pair each training input with a random other target (default "
                                 "false: continuations)", type=str2bool)
    align_targets: bool = flag(False, "data", "with --shuffle_targets: lay each drawn target on its input's grid "
                               "first (tempo, beats, key, loudness), as arrange.py lays two songs (default false; "
                               "not with --cache_latents)", type=str2bool)
    segment_seconds: float | None = flag(None, "data", "segment length (default: the files' length)", type=float)
    sample_rate: int = flag(24000, "data", "sample rate of the pairs and codec (default 24000)", type=int,
                            shapes_model=True)
    num_workers: int | None = flag(None, "data", "data-loader workers per rank (default: the CPUs of the rank "
                                   "minus one on GPU, 0 on CPU where they would take cores from the model)", type=int)
    skip_bad_files: bool = flag(False, "data", "warn about bad files and train on the rest", action="store_true")
    silence_db: float = flag(SILENCE_DB, "data", "a file whose RMS level is below this is silent: refused, or "
                             f"skipped with --skip_bad_files (default {SILENCE_DB:g} dBFS)", type=float)
    # ---- masks: one choice, the agent (--agent KIND or --use_creative_agent true) or a rule (--mask_type)
    use_creative_agent: bool = flag(False, "masks", "learn the masks with the attention agent (default false)",
                                    type=str2bool, shapes_model=True)
    agent: str = flag("attention", "masks", "learn the masks with this agent (implies --use_creative_agent true): "
                      "attention masks each song (one song at a time); layered decides per section which song gives "
                      "the rhythm and which the harmony (both heard at once; MDCT codec); compositional splits each "
                      "song into rhythm, harmony and timbre by learned filters",
                      choices=("attention", "layered", "compositional"), shapes_model=True)
    mask_type: str = flag("none", "masks", "the rule-based masks of a run without the agent (default none; layers: "
                          "the input's rhythm under the target's harmony, MDCT codec)", choices=MASK_TYPES,
                          shapes_model=True)
    bass_hz: float = flag(BASS_HZ, "masks", "layering (--agent layered, --mask_type layers): the rhythm layer is "
                          f"the drums and all below this frequency, the bass (default {BASS_HZ:g} Hz; 0: the drums "
                          "alone)", type=float, shapes_model=True)
    layer_guide: float = flag(3.0, "masks", "the layering agent (--agent layered) leans this far (in units of the "
                              "spread of its own scores; 0: not at all) to the way round that the songs' audio "
                              "prefers: where their notes agree, the one in which both are heard at once; where they "
                              "clash, the one in which one song covers the other (default 3)", type=float,
                              shapes_model=True)
    mask_reg_weight: float = flag(0.1, "masks", "weight of the agent's mask regularisation (default 0.1)",
                                  type=float)
    balance_loss_weight: float = flag(0.0, "masks", "extra weight on the regularisation's area-share term "
                                      "(default 0: it is already in the regularisation)", type=float)
    adversarial_weight: float = flag(0.0, "masks", "weight of a discriminator's verdict on the output (default 0: "
                                     "off)", type=float)
    agent_gates: str = flag("frame", "masks", "what the agent decides: which song each frame comes from (frame, "
                            "default) or each channel x frame cell (cell)", choices=("frame", "cell"),
                            shapes_model=True)
    agent_block_frames: int = flag(32, "masks", "with frame gates and no beat grid, decide once per block of N "
                                   "frames (default 32; 0: every frame, from scores smoothed over 16 frames)",
                                   type=count, metavar="N", shapes_model=True)
    section_beats: int = flag(2, "masks", "the agent (frame gates) and the temporal rule decide once per section "
                              "of N beats of the input's beat grid, so the songs switch only on the beat (default "
                              "2; 0: fixed blocks of --agent_block_frames / --temporal_segment_frames frames); "
                              "songs without a pulse fall back to those blocks", type=count, metavar="N",
                              shapes_model=True)
    section_bars: int = flag(0, "masks", "... or once per section of N bars of the input, so the songs switch only "
                             "on its bar lines; songs whose bars are not known fall back to --section_beats "
                             "(default 0: beats, since a 2 s training segment holds one or two bars, too few "
                             "sections to learn from; 1 for segments of 4 s or more)", type=count, metavar="N",
                             shapes_model=True)
    balance_range: tuple = flag((0.2, 0.8), "masks", "train the agent for any wanted input share: each example "
                                "draws one from LO..HI, and arrange.py/evaluate.py --balance choose it later "
                                "(default 0.2,0.8; 0.5,0.5: always even)", type=share_range, metavar="LO,HI")
    agent_scales: tuple = flag((1,), "masks", "time scales in frames at which the agent attends, fused by "
                               "summation (default 1; for example 1,4,16 adds attention between means of 4 and of "
                               "16 frames)", type=frame_scales, metavar="S1,S2,...", shapes_model=True)
    hard_masks: bool = flag(False, "masks", "train the agent's decisions with Gumbel noise, straight-through 0/1 "
                            "(default false)", type=str2bool)
    gumbel_tau_start: float = flag(1.0, "masks", "Gumbel temperature at the first step (default 1.0)", type=float)
    gumbel_tau_end: float = flag(0.1, "masks", "Gumbel temperature at the last step, reached geometrically "
                                 "(default 0.1)", type=float)
    style_weight: float = flag(0.0, "masks", "W > 0: a style reference conditions the agent and the cascade "
                               "(arrange.py --style_reference); trained on the target of another pair in half of "
                               "the examples, with W x the distance between the output's and the reference's "
                               "per-channel level and spread (default 0: off)", type=float, shapes_model=True)
    temporal_segment_frames: int = flag(32, "masks", "frames per section of the temporal rule where there is no "
                                        "beat grid (default 32)", type=int, shapes_model=True)
    frequency_split: float = flag(0.5, "masks", "share of channels the input keeps under the frequency rule "
                                  "(default 0.5)", type=float, shapes_model=True)
    # ---- model
    codec: str = flag("mdct", "model", "frozen codec (default mdct, weight-free)", choices=CODECS, shapes_model=True)
    codec_path: str | None = flag(None, "model", "local folder of the EnCodec weights")
    codec_dim: int = flag(128, "model", "MDCT bins D (default 128, as EnCodec; EnCodec's is its own)", type=int,
                          shapes_model=True)
    num_stages: int = flag(2, "model", "cascade stages (default 2; also spelt --num_transformer_layers)", type=int,
                           aliases=("--num_transformer_layers",), shapes_model=True)
    num_layers: int = flag(6, "model", "transformer layers per stage (default 6)", type=int, shapes_model=True)
    nhead: int | list = flag(0, "model", "attention heads, for every stage or one count per stage (default 0: heads "
                             "of dimension 128, 2 and 3 at the default widths 256 and 384, the fastest on GPUs; the "
                             "seed's model had 8)", type=int, nargs="+", metavar="N", shapes_model=True)
    dropout: float = flag(0.1, "model", "dropout on the residual paths (default 0.1)", type=float, shapes_model=True)
    anti_cheating: float = flag(0.0, "model", "relative noise on the target that later stages see (default 0)",
                                type=float, shapes_model=True)
    # ---- loss weights: against the input and the target
    wave_input_weight: float = loss_weight("wave_input", "RMS waveform distance to the input")
    wave_target_weight: float = loss_weight("wave_target", "RMS waveform distance to the target")
    stft_input_weight: float = loss_weight("stft_input", "multi-resolution STFT distance to the input")
    stft_target_weight: float = loss_weight("stft_target", "multi-resolution STFT distance to the target")
    mel_input_weight: float = loss_weight("mel_input", "log-mel distance to the input")
    mel_target_weight: float = loss_weight("mel_target", "log-mel distance to the target")
    far_lsd_weight: float = loss_weight("far_lsd", "weight of the log-spectral distance to the farther of the two "
                                        "songs: an arrangement must stay close to both, which copying one song "
                                        "cannot do")
    # ---- optimisation
    num_epochs: int = flag(10, "optimisation", "epochs (default 10; also spelt --epochs)", type=int,
                           aliases=("--epochs",))
    batch_size: int = flag(4, "optimisation", "pairs per process and step (default 4)", type=int)
    lr: float = flag(1e-4, "optimisation", "AdamW learning rate (default 1e-4)", type=float)
    weight_decay: float = flag(0.01, "optimisation", "AdamW weight decay (default 0.01)", type=float)
    warmup_steps: int = flag(0, "optimisation", "steps of linear warm-up (default 0)", type=int)
    lr_schedule: str = flag("constant", "optimisation", "after warm-up: constant (default; runs can be extended) "
                            "or cosine decay to 10%% over --num_epochs", choices=("constant", "cosine"))
    grad_clip: float = flag(1.0, "optimisation", "gradient norm clip (default 1.0)", type=float)
    max_nonfinite_steps: int = flag(20, "optimisation", "stop after this many non-finite steps in a row (each is "
                                    "skipped; default 20)", type=int)
    seed: int = flag(0, "optimisation", "seed of the weights, the data order and the draws (default 0)", type=int)
    # ---- speed
    device: str = flag("auto", "speed", "auto: cuda when available", choices=("auto", "cpu", "cuda"))
    amp: str = flag("bf16", "speed", "bf16 autocast on CUDA (default bf16)", choices=("bf16", "none"))
    compile: str = flag("auto", "speed", "torch.compile the model and the loss: auto (default) = graphs on a GPU, "
                        "none on a CPU; graphs = with CUDA graphs (mode reduce-overhead); default = torch.compile's "
                        "default mode (a bare --compile); none = eager. If compiling fails, training says why in one "
                        "line and goes on eagerly", choices=COMPILE_CHOICES, nargs="?", const="default")
    cuda_graphs: bool = flag(False, "speed", "the same as --compile graphs (kept for old command lines)",
                             action="store_true")
    sdpa: bool = flag(True, "speed", "fused scaled_dot_product_attention (default true; false: the textbook "
                      "formula, to check the fused kernels against)", type=str2bool)
    cache_latents: bool = flag(False, "speed", "encode the pairs once into a memory-mapped cache "
                               "(SPLIT/.latent_cache), skipping the encoder", action="store_true")
    # ---- processes, outputs
    world_size: int = flag(1, "run", "processes to spawn on this machine (default 1)", type=int)
    collective_timeout: float = flag(600.0, "run", "seconds before a collective gives up when a process died "
                                     "(default 600)", type=float)
    checkpoint_dir: str = flag("checkpoints", "run", "folder of the runs' checkpoints (default checkpoints)")
    log_dir: str = flag("logs", "run", "folder of the runs' logs (default logs)")
    run_name: str | None = flag(None, "run", "default: the masks and a time stamp, e.g. agent_20260101_120000")
    save_every: int = flag(0, "run", "also keep checkpoint_epoch_N.pt every N epochs (default 0: never)", type=int)
    requeue: bool = flag(True, "run", "under SLURM, a run stopped by SIGUSR1/SIGTERM before its last epoch requeues "
                         "its own job (scontrol requeue) after saving; the requeued job continues with --resume "
                         "auto (default true)", type=str2bool)
    prepare_only: bool = flag(False, "run", "check every file and fill the latent cache of both splits (implies "
                              "--cache_latents), then exit without training; on N processes each encodes its "
                              "share", action="store_true")
    resume: str | None = flag(None, "run", "continue from a checkpoint; auto: this run's (or the newest run's) "
                              "checkpoint_last.pt", metavar="PATH|auto")
    # ---- filled in by the run
    run_name_given: str | None = derived()  # --run_name as typed (--resume auto looks for it)
    segment_samples: int | None = derived()  # the pairs' length in samples
    fade_frames: int = derived(0, shapes_model=True)  # frames over which a switch between the songs ramps

    @property
    def masks(self) -> str:
        """What decides the masks: 'agent' or the rule's name (run names, banners)."""
        return "agent" if self.use_creative_agent else self.mask_type

    def to_dict(self) -> dict:
        """As checkpoints store it: plain values only, readable by torch.load(weights_only=True)."""
        return asdict(self)


# A setting's meaning in runs made before it existed, where that differs from today's default.
LEGACY = dict(agent_gates="cell", agent_scales=(1,), balance_range=(0.5, 0.5), agent_block_frames=0,
              section_beats=0, section_bars=0, far_lsd_weight=0.0, bass_hz=0.0, layer_guide=0.0)
RENAMED = {"num_transformer_layers": "num_stages"}  # old name in checkpoints -> field


def upgrade(saved: dict) -> Config:
    """The configuration a checkpoint was trained with: its stored values under today's names, the LEGACY meaning
    of settings it predates, today's defaults for the rest; keys no longer used are dropped."""
    values = {**LEGACY, **{RENAMED.get(k, k): v for k, v in saved.items()}}
    if isinstance(values.get("compile"), bool):  # before --compile took a choice: a switch, with --cuda_graphs
        values["compile"] = ("graphs" if values.get("cuda_graphs") else "default") if values["compile"] else "none"
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in known})


# the settings that shape the model, as their fields declare it: a resumed run must have the same
MODEL_KEYS = tuple(f.name for f in fields(Config) if f.metadata["shapes_model"])


GROUP_TITLES = dict(masks="masks: the agent (--agent KIND or --use_creative_agent true) or a rule (--mask_type)",
                    loss="loss weights (against the input and the target)", run="processes, outputs")


def build_parser(description: str) -> argparse.ArgumentParser:
    """train_simple_ddp.py's parser: one flag per field of Config, in groups."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for f in fields(Config):
        group = f.metadata["group"]
        if group is None:
            continue
        if group not in groups:
            groups[group] = parser.add_argument_group(GROUP_TITLES.get(group, group))
        add_flag(groups[group], f)
    return parser


def add_flag(parser, f) -> None:
    """The flag of Config field `f` (its help, type, choices and other spellings) on a parser or argument group."""
    options = {k: v for k, v in f.metadata.items() if k not in ("group", "shapes_model")}
    names = (f"--{f.name}", *options.pop("aliases", ()))
    default = [f.default] if options.get("nargs") == "+" else f.default
    parser.add_argument(*names, dest=f.name, default=default, **options)


def add_training_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """The training flags `names`, declared as train_simple_ddp.py declares them, on another tool's parser."""
    by_name = {f.name: f for f in fields(Config)}
    for name in names:
        add_flag(parser, by_name[name])


def parse_args(argv=None, description: str = "") -> Config:
    """The Config of a training run from its command line, checked, with the derived fields filled in."""
    parser = build_parser(description)
    argv = sys.argv[1:] if argv is None else argv
    agent_given = any(a == "--agent" or a.startswith("--agent=") for a in argv)
    config = Config(**vars(parser.parse_args(argv)))
    if len(config.nhead) not in (1, config.num_stages):
        parser.error(f"--nhead takes 1 or {config.num_stages} counts (one per stage), got {len(config.nhead)}")
    config.nhead = head_counts(config.nhead)
    config.use_creative_agent = config.use_creative_agent or agent_given
    if config.use_creative_agent and config.mask_type != "none":
        parser.error(f"--mask_type {config.mask_type} is a rule for runs without the agent: drop it, or drop "
                     f"--use_creative_agent / --agent")
    layering = config.masks == "layers" or config.use_creative_agent and config.agent == "layered"
    if layering and config.codec != "mdct":
        parser.error("layering splits the MDCT latent into rhythm and harmony: --agent layered and --mask_type "
                     "layers need --codec mdct")
    config.run_name_given = config.run_name
    config.run_name = config.run_name or f"{config.masks}_{time.strftime('%Y%m%d_%H%M%S')}"
    config.segment_samples = (round(config.segment_seconds * config.sample_rate) if config.segment_seconds
                              else None)
    config.cache_latents = config.cache_latents or config.prepare_only
    config.compile = "graphs" if config.cuda_graphs else config.compile
    if config.align_targets and config.cache_latents:
        parser.error("--align_targets changes the targets every epoch, so their latents cannot be cached: drop "
                     "--cache_latents (or --prepare_only)")
    return config
