"""The `mode-ros` command as a user meets it (issue 18): every option has a help text (no doubled
default), `info` shows a checkpoint's contract as a table (JSON with --json) without warnings, one
checkpoint resolver ('bundled' everywhere, clear errors), and the quick image recipe trains."""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from mode_ros.cli import build_parser, main
from mode_ros.model.checkpoint import CheckpointError, bundled_checkpoint, checkpoint_config, resolve_checkpoint

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "mode-ros"):
    """(name, parser) of ``parser`` and every nested subcommand parser."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prefix} {name}")


def test_every_option_of_every_subcommand_has_one_help_text():
    """Walks build_parser() (convert/export/sim nest further): every argument but -h has a non-empty
    help, and its rendered help (as the parser's formatter prints it, defaults included) mentions its
    default at most once — ArgumentDefaultsHelpFormatter plus a hand-written "(default: …)" doubles it."""
    parsers = dict(_subparsers(build_parser()))
    for cmd in ("info", "bench", "check-reference", "init", "import-reference", "train", "replay",
                "convert bag", "convert hdf5", "sim record", "sim eval", "export"):
        assert f"mode-ros {cmd}" in parsers, f"{cmd} missing: {sorted(parsers)}"
    missing, doubled = [], []
    for name, parser in parsers.items():
        formatter = parser.formatter_class(prog=parser.prog)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(label)
                continue
            rendered = formatter._expand_help(action)   # the text --help prints, %(default)s filled in
            if len(re.findall(r"default", rendered, re.IGNORECASE)) > 1:
                doubled.append(f"{label}: {rendered!r}")
    assert not missing, f"arguments without help: {missing}"
    assert not doubled, f"default mentioned twice: {doubled}"


def test_help_lists_presets_and_the_training_output_folder(capsys):
    from mode_ros.model.config import PRESETS

    parsers = dict(_subparsers(build_parser()))
    info = parsers["mode-ros info"].format_help()
    assert all(p in info for p in PRESETS), info
    train = parsers["mode-ros train"].format_help()
    for item in ("export/", "train_state.pt", "train_summary.json", "loss.png", "tb/"):
        assert item in train, item


def test_info_of_the_bundled_checkpoint_is_a_table_then_json(capsys, caplog):
    caplog.set_level(logging.DEBUG)
    assert main(["info", "--checkpoint", "bundled"]) == 0
    out, err = capsys.readouterr()
    rows = dict(m.groups() for m in re.finditer(r"^ {2,}(\S.*?) {2,}(.*)$", out, re.MULTILINE))
    assert rows["cameras"].startswith("none")
    assert rows["state"].startswith("21 values")
    assert rows["action"] == "4 values: dx, dy, dz, gripper"
    assert rows["bounds"].startswith("dx [-1, 1]; dy [-1, 1]")
    assert rows["chunk"].startswith("10 actions") and rows["sampling steps"].startswith("10 (ddim")
    assert rows["control rate"].startswith("20 Hz")
    assert rows["known goals"].startswith("10: 'close the drawer'") and "refused" in rows["known goals"]
    assert rows["normalisation action"].startswith("minmax")
    assert rows["training steps"].startswith("6000")
    assert "{" not in out                                    # no JSON without --json
    assert "FLOPs / chunk: total (no text tower)" in out and "text tower is not included" in out
    assert "random" not in err.lower() and not [r for r in caplog.records if "pretrained" in r.getMessage()]
    assert main(["info", "--checkpoint", "bundled", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)                  # JSON only
    assert d["checkpoint"] == str(bundled_checkpoint()) and len(d["goals"]) == 10
    assert d["state"]["dim"] == 21 and d["action"]["bounds"]["high"] == [1.0, 1.0, 1.0, 1.0]
    assert d["control_rate_hz"] == 20.0 and d["training"]["steps"] == 6000
    fc = d["counts"]["flops_per_chunk"]
    assert fc["includes_vision_encoders"] and not fc["includes_text_tower"] and fc["vision_encoders"] == 0
    assert fc["total"] == 10 * d["counts"]["flops_per_step"]["cached"]["total"]


def test_info_of_a_camera_checkpoint_counts_its_encoders(tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--goals", "open the drawer",
                 "--action-low=-1,-2,-3,-4,-5,-6,0", "--action-high=1,2,3,4,5,6,1"]) == 0
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(tmp_path / "ck"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cameras"] == {"names": ["static", "gripper"], "encoder": "film_resnet18", "image_size": [32, 32]}
    assert d["action"]["bounds"]["low"][:3] == [-1.0, -2.0, -3.0] and d["action"]["bounds"]["high"][6] == 1.0
    assert d["goals"] == ["open the drawer"] and d["control_rate_hz"] is None
    fc = d["counts"]["flops_per_chunk"]
    # ResNet-18 is 1.82 GMACs at 224x224 (+ the FiLM generators' 2 M multiply-adds): 3.63 GFLOPs at 2 per
    # MAC; at 32x32 about that scaled by the pixel count (+6 %: the FiLM and fc layers do not shrink)
    import torch
    from mode_ros.model.encoders import build_vision_encoder
    from mode_ros.model.info import vision_flops
    with torch.device("meta"):
        enc = build_vision_encoder("film_resnet18")
    assert vision_flops(enc, [224, 224]) == pytest.approx(3.63e9, rel=0.01)
    assert fc["vision_per_image"] == pytest.approx(3.63e9 * (32 * 32) / (224 * 224), rel=0.1)
    assert fc["vision_encoders"] == 2 * fc["vision_per_image"]
    assert main(["info", "--checkpoint", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "static, gripper (film_resnet18, images resized to 32x32 px" in out
    assert "randomly initialised tiny text tower" in out and "control rate" in out and "not recorded" in out


def test_one_checkpoint_resolver_with_clear_errors(tmp_path, capsys):
    assert resolve_checkpoint("bundled") == bundled_checkpoint() == resolve_checkpoint("metaworld_mt10")
    assert checkpoint_config("bundled").state_dim == 21
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "file.txt")
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.yaml").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no config.yaml\); it looks like a training output folder: "
                                              r"its checkpoint is .*run/export"):
        resolve_checkpoint(run)
    with pytest.raises(CheckpointError, match="config.yaml but no model.safetensors"):
        resolve_checkpoint(run / "export")
    from mode_ros.model import policy
    assert policy.CheckpointError is CheckpointError   # one error type for every checkpoint problem
    # the same resolver behind the commands: 'bundled' works where a folder does, a bad folder is exit 2
    from mode_ros.model.policy import MoDEPolicy
    from mode_ros.replay.session import ModelInfo, ReplayError
    assert MoDEPolicy.from_pretrained("bundled").known_goals[0] == "close the drawer"   # also the node's parameter
    assert ModelInfo.from_checkpoint("bundled").state_dim == 21
    with pytest.raises(ReplayError, match="not a mode_ros checkpoint"):
        ModelInfo.from_checkpoint(tmp_path)
    for argv in (["info", "--checkpoint", str(tmp_path)], ["bench", "--presets", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "not a mode_ros checkpoint" in err and "Traceback" not in err, argv


def write_episodes(path: Path, cams=("static", "gripper"), size=24, T=16, n_eps=2):
    from mode_ros.data.episodes import EpisodeWriter

    rng = np.random.default_rng(0)
    with EpisodeWriter(path, list(cams), ["x", "y", "gripper"], control_rate_hz=15.0) as w:
        for e in range(n_eps):
            t = np.arange(T)[:, None]
            acts = np.concatenate([np.sin(t / 3 + e) * 0.05, np.cos(t / 4 + e) * 0.02,
                                   np.where(t < T // 2, 1.0, -1.0)], axis=1).astype(np.float32)
            w.add_episode(acts, {c: rng.integers(0, 255, (T, size, size, 3), dtype=np.uint8) for c in cams},
                          ["open the drawer", "push the button"][e % 2])
    return path


@pytest.mark.parametrize("recipe", ["train_quick_images.yaml", "train_example.yaml"])
def test_recipes_train_a_camera_policy_from_the_cli(tmp_path, capsys, recipe):
    """The quick image recipe (and the example, which stopped on gripper_dims [6] for a 3-d action)
    load and train two steps on a small camera dataset through `mode-ros train`; the export records
    the steps and the data's control rate, and `mode-ros info` reads them back."""
    data = write_episodes(tmp_path / "eps.hdf5")
    out = tmp_path / "run"
    overrides = [f"data.paths=[{data}]", f"out_dir={out}", "optim.steps=2", "optim.batch_size=2", "device=cpu"]
    if recipe == "train_example.yaml":   # the small preset's 96 px ResNet and ViT-B-32 tower: keep it cheap
        overrides += ["preset=tiny", "policy.vision.image_size=[32,32]", "policy.text.arch=tiny"]
    argv = ["train", "--config", str(CONFIG_DIR / recipe)]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    rec = json.loads((out / "export" / "training.json").read_text())
    assert rec["steps"] == 2 and rec["control_rate_hz"] == 15.0 and rec["data"] == [str(data)]
    assert main(["info", "--checkpoint", str(out / "export"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cameras"]["names"] == ["static", "gripper"] and d["action"]["dim"] == 3
    assert d["control_rate_hz"] == 15.0 and d["training"]["steps"] == 2
    assert sorted(d["goals"]) == ["open the drawer", "push the button"]
    if recipe == "train_quick_images.yaml":
        assert d["cameras"]["image_size"] == [64, 64] and d["cameras"]["encoder"] == "film_resnet18"


def test_init_from_resolves_checkpoints_like_every_command(tmp_path, capsys):
    """The trainer's init_from takes what --checkpoint takes (a folder or 'bundled', the resolver's error
    otherwise); a file stays an authors'-layout checkpoint."""
    import torch

    from mode_ros.model.policy import MoDEPolicy
    from mode_ros.train.config import TrainConfig
    from mode_ros.train.trainer import Trainer

    data = write_episodes(tmp_path / "eps.hdf5", size=16)
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--action-dim", "3", "--seed", "7"]) == 0
    cfg = {"out_dir": str(tmp_path / "run"), "preset": "tiny", "policy": {"vision": {"image_size": [16, 16]}},
           "data": {"paths": [str(data)]}, "optim": {"steps": 1, "batch_size": 2}, "device": "cpu"}
    with pytest.raises(CheckpointError, match="not a mode_ros checkpoint"):
        Trainer(TrainConfig.from_dict({**cfg, "init_from": str(tmp_path)}), quiet=True)
    tr = Trainer(TrainConfig.from_dict({**cfg, "init_from": str(tmp_path / "ck")}), quiet=True)
    src = MoDEPolicy.from_pretrained(tmp_path / "ck")
    got, want = tr.policy.denoiser.blocks[0].attn.query.weight, src.denoiser.blocks[0].attn.query.weight
    assert torch.equal(got.detach().cpu(), want)
