"""Checkpoints: writing (atomic), reading and checking them, and rebuilding the model and codec from one alone.

Imported by the trainer and the inference module; it imports the configuration, model, codec and objective.
"""
from __future__ import annotations

import glob
import os

import torch

from audio_codec import LatentNorm, build_codec
from config import MODEL_KEYS, Config, upgrade
from model_simple_transformer import build_model
from pairs_dataset import path_problem
from run_log import atomic_write

PROJECT = "creative_agent"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, from another project or another configuration."""


def balance_problem(config: Config, balance: float) -> str | None:
    """Why a checkpoint cannot arrange with the wanted input share `balance`, or None if it can."""
    if not 0.0 <= balance <= 1.0:
        return f"--balance must lie in 0..1, got {balance:g}"
    if balance == 0.5:
        return None
    if not config.use_creative_agent:
        return f"--balance {balance:g} needs a creative-agent checkpoint; this one uses {config.mask_type} masks"
    lo, hi = config.balance_range
    if lo == hi:
        return (f"--balance {balance:g}: this checkpoint was trained without the balance conditioning (always "
                f"{lo:g}); train with --balance_range LO,HI (the default, 0.2,0.8, does)")
    if not lo <= balance <= hi:
        return f"--balance {balance:g} is outside the range this checkpoint was trained for ({lo:g}..{hi:g})"
    return None


def save_checkpoint(path: str, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this project, or one CheckpointError that names the file and what is wrong."""
    if problem := path_problem(path):
        raise CheckpointError(f"checkpoint {path}: {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): "
                              f"{str(err).splitlines()[0][:200]}") from err
    if not isinstance(state, dict) or state.get("project") != PROJECT:
        raise CheckpointError(f"checkpoint {path} is not a Creative Agent checkpoint (no project={PROJECT!r} field)")
    return state


def model_from_checkpoint(state: dict, path: str = "checkpoint"):
    """(model, codec, latent_norm) rebuilt from a checkpoint alone, on CPU, in eval mode."""
    config = upgrade(state["config"])
    codec = build_codec(config.codec, config.sample_rate, config.codec_dim, path=config.codec_path)
    model = build_model(config, codec.dim)
    load_model_state(model, state["model"], path)
    norm = LatentNorm(codec.dim)
    norm.load_state_dict(state["latent_norm"])
    return model.eval(), codec.eval(), norm


def load_model_state(model: torch.nn.Module, weights: dict, path: str) -> None:
    """load_state_dict with one clear message when the checkpoint's configuration differs from the model's."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape {', '.join(shapes[:3])}" if shapes else ""]))
        raise CheckpointError(f"checkpoint {path} was saved for another model configuration ({detail})")
    model.load_state_dict(weights)


def find_resume_checkpoint(resume: str, checkpoint_dir: str, run_name: str | None) -> str | None:
    """The checkpoint that `--resume` names: a path, or 'auto' (this run's last, else the newest run's last)."""
    if resume != "auto":
        return resume
    if run_name:
        path = os.path.join(checkpoint_dir, run_name, "checkpoint_last.pt")
        return path if os.path.isfile(path) else None
    candidates = glob.glob(os.path.join(checkpoint_dir, "*", "checkpoint_last.pt"))
    return max(candidates, key=os.path.getmtime) if candidates else None


def check_same_model(saved: dict, config: Config, path: str) -> None:
    """CheckpointError unless the checkpoint's configuration `saved` builds the same model as `config`."""
    old = upgrade(saved)
    changed = [f"{k}={getattr(old, k)!r} (now {getattr(config, k)!r})" for k in MODEL_KEYS
               if getattr(old, k) != getattr(config, k)]
    if changed:
        raise CheckpointError(f"checkpoint {path} was trained with another configuration: {', '.join(changed)}")
