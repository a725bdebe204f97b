"""Where a checkpoint argument points: the one resolver behind every ``--checkpoint`` of ``mode-ros``
(info, bench, replay, sim eval, export), ``MoDEPolicy.from_pretrained`` and so the node's
``checkpoint`` parameter.

A checkpoint is a folder holding ``config.yaml`` and ``model.safetensors`` (beside them
``normalization.json`` and ``goal_embeddings.safetensors``), as ``MoDEPolicy.save_pretrained`` and
the trainer (``OUT/export``) write it. ``bundled`` (or ``metaworld_mt10``) names the Meta-World MT10
checkpoint shipped inside the package. Light: no torch import, so inspecting a checkpoint is instant.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, PolicyConfig, preset

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "NORM_FILE", "GOALS_FILE", "TRAINING_FILE", "BUNDLED", "CheckpointError",
           "bundled_checkpoint", "resolve_checkpoint", "checkpoint_config", "config_for"]

CONFIG_FILE, WEIGHTS_FILE, NORM_FILE, GOALS_FILE = (
    "config.yaml", "model.safetensors", "normalization.json", "goal_embeddings.safetensors")
TRAINING_FILE = "training.json"   # optional record of the training: steps, the data's control rate

# names that resolve to a checkpoint shipped in mode_ros/assets
BUNDLED = {"bundled": "metaworld_mt10", "metaworld_mt10": "metaworld_mt10"}
_WHAT = (f"a mode_ros checkpoint is a folder with {CONFIG_FILE} and {WEIGHTS_FILE}, like a training run's "
         f"OUT/export; 'bundled' names the MT10 checkpoint shipped in the package")


class CheckpointError(ConfigError):
    """A checkpoint argument names no (complete) checkpoint folder, or a checkpoint file cannot be read
    or does not fit the model; the message starts with the folder or file."""


def bundled_checkpoint(name: str = "bundled") -> Path:
    """The folder of a checkpoint shipped inside the package (docs/SIM.md "Results")."""
    if name not in BUNDLED:
        raise CheckpointError(f"no bundled checkpoint {name!r}; known: {', '.join(BUNDLED)}")
    return Path(__file__).resolve().parents[1] / "assets" / BUNDLED[name]


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """The checkpoint folder ``spec`` names: a bundled name, or a folder (``~`` expanded). Raises
    CheckpointError saying what is wrong (nothing there, a file, a folder without config.yaml — with
    the hint when it is a training output folder —, no weights)."""
    text = str(spec).strip()
    if not text:
        raise CheckpointError(f"checkpoint: not set ({_WHAT})")
    if text in BUNDLED:
        return bundled_checkpoint(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {text}: no such folder ({_WHAT})")
    if path.is_file():
        raise CheckpointError(f"checkpoint {text} is a file, not a checkpoint folder (give the folder that "
                              f"holds {CONFIG_FILE} and {WEIGHTS_FILE}, e.g. {path.parent})")
    if not (path / CONFIG_FILE).is_file():
        hint = (f"; it looks like a training output folder: its checkpoint is {path / 'export'}"
                if (path / "export" / CONFIG_FILE).is_file() else f" ({_WHAT})")
        raise CheckpointError(f"{text} is not a mode_ros checkpoint (no {CONFIG_FILE}){hint}")
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{text} is not a complete mode_ros checkpoint: {CONFIG_FILE} but no {WEIGHTS_FILE}")
    return path


def checkpoint_config(spec: str | os.PathLike) -> PolicyConfig:
    """The validated PolicyConfig of a checkpoint (ConfigError names the file and the key)."""
    import yaml

    path = resolve_checkpoint(spec) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text())
        return PolicyConfig.from_dict(data)
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_for(name: str) -> PolicyConfig:
    """A preset's config, else the config of the checkpoint ``name`` names (for commands that take
    either, e.g. ``bench --presets small,bundled,runs/x/export``)."""
    try:
        return preset(name)
    except ConfigError as exc:
        if name in BUNDLED or Path(name).expanduser().exists():
            return checkpoint_config(name)
        raise ConfigError(f"{exc}; nor is {name!r} a checkpoint folder") from None
