"""Faults refused at the door (issue 19), ROS-free: crafted images, broken checkpoints and normalisation,
non-finite weights, JointState conversion, parameter values, trainer/convert command errors and files.
Each test crafts the bad input, asserts the rejection (reason / message naming the file or key / exit
code). The node-level counterparts (counters, lifecycle, services) are in test_node_faults.py."""
from __future__ import annotations

import io
import json
import math
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mode_ros.data.images import (MAX_PIXELS, ImageDecodeError, compressed_size, decode_compressed, decode_image,
                                  encode_compressed, pixel_limit)
from mode_ros.model.policy import CheckpointError, MoDEPolicy
from mode_ros.ros.convert import InputRejected, joint_state_vector
from mode_ros.ros.params import ParameterError, unknown_parameters, validate

RNG = np.random.default_rng(0)


# ---- crafted images ----------------------------------------------------------------------------------
def jpeg_with_size(height: int, width: int, data_px: int = 16) -> bytes:
    """A real data_px x data_px JPEG whose frame header (SOF0) claims height x width."""
    b = bytearray(encode_compressed(RNG.integers(0, 255, (data_px, data_px, 3), dtype=np.uint8), "jpeg"))
    i = b.index(b"\xff\xc0")
    b[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(b)


def png_with_size(height: int, width: int, data_px: int = 16) -> bytes:
    """A real PNG whose IHDR (CRC fixed) claims height x width."""
    b = bytearray(encode_compressed(RNG.integers(0, 255, (data_px, data_px, 3), dtype=np.uint8), "png"))
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def pil_bytes(fmt: str) -> bytes:
    from PIL import Image

    bio = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(bio, format=fmt)
    return bio.getvalue()


@pytest.mark.parametrize("make", [jpeg_with_size, png_with_size])
def test_bomb_header_refused_fast_without_decoding(make):
    bomb = make(8000, 12000)   # 96 M pixels declared (issue: 3.9 s and +900 MB to decode)
    assert len(bomb) < 20_000
    limit = pixel_limit((32, 32))
    assert limit == 1920 * 1200
    decode_compressed("jpeg" if make is jpeg_with_size else "png", make(16, 16), max_pixels=limit)  # warm imports
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="12000x8000") as ei:
        decode_compressed("jpeg" if make is jpeg_with_size else "png", bomb, max_pixels=limit)
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ei.value.reason == "too_large"
    assert dt < 0.05, dt
    assert peak < 1_000_000, peak   # the image would be 288 MB
    # the same header under the default limit (no checkpoint) and from compressed_size (bag converter)
    with pytest.raises(ImageDecodeError) as ei:
        compressed_size("png" if make is png_with_size else "jpeg", bomb)
    assert ei.value.reason == "too_large" and 96_000_000 > MAX_PIXELS


def test_raw_image_above_limit_refused():
    with pytest.raises(ImageDecodeError, match="above the limit of 100") as ei:
        decode_image("mono8", 20, 20, 20, bytes(400), max_pixels=100)
    assert ei.value.reason == "too_large"
    assert decode_image("mono8", 10, 10, 10, bytes(100), max_pixels=100).shape == (10, 10, 3)


def test_pixel_limit_from_checkpoint_size():
    assert pixel_limit((224, 224)) == 64 * 224 * 224
    assert pixel_limit((32, 32), max_pixels=5000) == 5000
    assert pixel_limit(None) == MAX_PIXELS


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_only_the_named_codec_is_decoded(fmt):
    data = pil_bytes(fmt)
    with pytest.raises(ImageDecodeError) as ei:       # the format field names it: not supported
        decode_compressed(fmt.lower(), data)
    assert ei.value.reason == "unsupported_format"
    for named in ("jpeg", "png", ""):                  # claimed as jpeg/png (or unnamed): not decoded either
        with pytest.raises(ImageDecodeError, match="cannot decode") as ei:
            decode_compressed(named, data)
        assert ei.value.reason == "corrupt_compressed"
    png = encode_compressed(np.zeros((4, 4, 3), np.uint8), "png")
    with pytest.raises(ImageDecodeError, match="not JPEG data"):
        decode_compressed("jpeg", png)
    assert decode_compressed("", png).shape == (4, 4, 3)    # empty format: jpeg or png by the data


def test_header_claiming_more_pixels_than_data_is_truncated():
    with pytest.raises(ImageDecodeError, match="2000x2000 pixels but its") as ei:   # issue: a grey frame
        decode_compressed("jpeg", jpeg_with_size(2000, 2000))
    assert ei.value.reason == "truncated"
    png = png_with_size(2000, 2000)
    with pytest.raises(ImageDecodeError, match="truncated") as ei:
        decode_compressed("png", png)
    assert ei.value.reason == "truncated"
    good = encode_compressed(RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8), "jpeg")
    assert decode_compressed("jpeg", good).shape == (48, 64, 3)
    with pytest.raises(ImageDecodeError, match="truncated") as ei:
        decode_compressed("jpeg", good[:len(good) * 2 // 3])
    assert ei.value.reason == "truncated"


# ---- checkpoints: normalisation, files, non-finite weights ------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    pol = MoDEPolicy.from_preset("tiny", seed=0, camera_names=[], state_dim=3, action_dim=4,
                                 vision={"arch": "none", "image_size": [32, 32], "random_shift_pad": [0]})
    pol.set_goal_embeddings({"open the drawer": torch.zeros(512)})
    return pol.save_pretrained(tmp_path_factory.mktemp("faults") / "ckpt")


def broken_copy(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_norm(fn):
    def edit(d):
        norm = json.loads((d / "normalization.json").read_text())
        fn(norm)
        (d / "normalization.json").write_text(json.dumps(norm))
    return edit


@pytest.mark.parametrize("name,edit,message", [
    ("missing", lambda d: (d / "normalization.json").unlink(), r"normalization.json: missing"),
    ("no_state", _edit_norm(lambda n: n.pop("state")), r"normalization.json: key 'state' missing"),
    ("no_action", _edit_norm(lambda n: n.pop("action")), r"normalization.json: key 'action' missing"),
    ("nan_offset", _edit_norm(lambda n: n["state"]["offset"].__setitem__(1, math.nan)),
     r"normalization.json: state.offset: non-finite value\(s\) in dimension\(s\) \[1\]"),
    ("inf_scale", _edit_norm(lambda n: n["action"]["scale"].__setitem__(0, math.inf)),
     r"normalization.json: action.scale: non-finite"),
    ("zero_scale", _edit_norm(lambda n: n["action"]["scale"].__setitem__(2, 0.0)), r"action.scale: must be > 0"),
    ("short", _edit_norm(lambda n: n["action"]["offset"].pop()), r"action.offset: has 3 values, the model needs 4"),
    ("not_json", lambda d: (d / "normalization.json").write_text("{"), r"normalization.json: not valid JSON"),
])
def test_normalisation_validated_at_load(ckpt_dir, tmp_path, name, edit, message):
    bad = broken_copy(ckpt_dir, tmp_path / name, edit)
    with pytest.raises(CheckpointError, match=message) as ei:
        MoDEPolicy.from_pretrained(bad)
    assert str(bad) in str(ei.value)


@pytest.mark.parametrize("fname,edit,message", [
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000]), "model.safetensors: "),
    ("goal_embeddings.safetensors", lambda p: p.write_bytes(b"\x10\x00"), "goal_embeddings.safetensors: "),
    ("config.yaml", lambda p: p.write_text("model: [unclosed\n"), "config.yaml: "),
    ("config.yaml", lambda p: p.write_text("modell: {}\n"), r"config.yaml: unknown config key\(s\): modell"),
])
def test_checkpoint_load_errors_name_the_file(ckpt_dir, tmp_path, fname, edit, message):
    bad = broken_copy(ckpt_dir, tmp_path / "c", lambda d: edit(d / fname))
    with pytest.raises(CheckpointError, match=message) as ei:
        MoDEPolicy.from_pretrained(bad)
    assert str(ei.value).startswith(str(bad / fname)) and "<unicode string>" not in str(ei.value)
    assert "\n" not in str(ei.value)


def test_non_finite_weights_fail_the_warmup(ckpt_dir):
    pol = MoDEPolicy.from_pretrained(ckpt_dir)
    assert np.isfinite(pol.warmup(runs=1))
    with torch.no_grad():
        pol.denoiser.out.weight[0, 0] = float("nan")
    pol.invalidate()
    with pytest.raises(CheckpointError, match=r"model.safetensors: the warm-up chunk is not finite; 1 of \d+ "
                                              r"weights are NaN/Inf"):
        pol.warmup(runs=1)


# ---- JointState -> state vector ------------------------------------------------------------------------------
def js(names, position, velocity=()):
    return SimpleNamespace(name=list(names), position=list(position), velocity=list(velocity))


def test_joint_state_vector_selects_and_rejects():
    vec, by_name = joint_state_vector(js(["a", "b", "c"], [1, 2, 3]), "position", 2, ["c", "a"])
    assert by_name and vec.tolist() == [3.0, 1.0] and vec.dtype == np.float32
    vec, by_name = joint_state_vector(js(["a", "b"], [1, 2], [5, 6]), "position_velocity", 4)
    assert not by_name and vec.tolist() == [1, 2, 5, 6]
    # recorded names the message lacks: message order (the node logs it once)
    vec, by_name = joint_state_vector(js(["x", "y"], [1, 2]), "position", 2, ["a", "b"], select_optional=True)
    assert not by_name and vec.tolist() == [1, 2]
    cases = [
        (js(["a", "b", "c", "d"], [1, 2, 3, 4, 5, 6]), "position", 3, (), "length_mismatch", "4 names but 6"),
        (js(["a", "b", "a"], [1, 2, 3]), "position", 3, (), "duplicate_names", r"duplicated joint names \['a'\]"),
        (js(["a", "b", "a"], [1, 2, 3]), "position", 2, ["a", "b"], "duplicate_names", "duplicated"),
        (js(["a", "b"], [1, 2]), "position", 2, ["a", "z"], "missing_joint", r"joint missing: \['z'\] not in"),
        (js(["a", "b"], [1, 2], []), "position_velocity", 4, (), "length_mismatch", "0 velocity values"),
        (js(["a"], [1]), "position", 3, (), "too_few_values", "needs 3"),
        (js(["a", "b"], [1, math.nan]), "position", 2, (), "non_finite", "NaN or Inf"),
        (js(["a", "b"], [1, 1e39]), "position", 2, (), "non_finite", "beyond float32"),
    ]
    for msg, field, dim, sel, reason, text in cases:
        with pytest.raises(InputRejected, match=text) as ei:
            joint_state_vector(msg, field, dim, sel)
        assert ei.value.reason == reason, (msg, ei.value)


# ---- parameter values ----------------------------------------------------------------------------------------
def test_parameter_types_and_unknown_names():
    assert validate("control_rate_hz", 30) == 30.0 and isinstance(validate("control_rate_hz", 30), float)
    assert validate("action_lower_bounds", [-1, 0]) == [-1.0, 0.0]
    for value in ("fast", "0,2"):
        with pytest.raises(ParameterError, match=r"^max_observation_age: expected double, got"):
            validate("max_observation_age", value)
    lines = unknown_parameters(["chekpoint", "control_rate_hz", "use_sim_time", "zzzz"],
                               ["checkpoint", "control_rate_hz", "use_sim_time"])
    assert lines == ["unknown parameter 'chekpoint' given to the node, ignored; did you mean 'checkpoint'?",
                     "unknown parameter 'zzzz' given to the node, ignored"]


# ---- trainer: divergence, broken inputs, files ---------------------------------------------------------------
def write_episodes(path: Path, n_eps=2, T=12) -> Path:
    from mode_ros.data.episodes import EpisodeWriter

    with EpisodeWriter(path, [], ["x", "y"], control_rate_hz=10.0, state_keys=["proprio"]) as w:
        for e in range(n_eps):
            t = np.arange(T)[:, None]
            acts = np.concatenate([np.sin(t / 3 + e), np.cos(t / 4 + e)], axis=1).astype(np.float32) * 0.1
            w.add_episode(acts, {}, "open the drawer", states={"proprio": RNG.normal(size=(T, 3)).astype(np.float32)})
    return path


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    return write_episodes(tmp_path_factory.mktemp("episodes") / "ep.hdf5")


def train_yaml(tmp_path: Path, data: Path, **optim) -> Path:
    import yaml

    cfg = {"out_dir": str(tmp_path / "run"), "seed": 1, "preset": "tiny", "device": "cpu", "ckpt_every": 0,
           "data": {"paths": [str(data)], "cameras": [], "state_keys": ["proprio"]},
           "optim": {"steps": 3, "batch_size": 4, "ema": "none", **optim}}
    p = tmp_path / "train.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_cli(argv, capsys) -> tuple[int, str]:
    from mode_ros.cli import main

    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines()   # the trainer's progress (tqdm, [train] lines) aside
             if ln.strip() and not ln.startswith(("[train]", "train:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_stops_on_non_finite_loss_and_exports_nothing(tmp_path, episodes, capsys):
    cfg = train_yaml(tmp_path, episodes, lr=1e6, steps=40, warmup_frac=0.0, hold_frac=1.0)
    rc, err = run_cli(["train", "--config", str(cfg)], capsys)
    assert rc == 1, err
    line = one_line(err)
    assert "training stopped at step" in line and "non-finite" in line or "is nan" in line, line
    assert not (tmp_path / "run" / "export").exists() and not (tmp_path / "run" / "train_state.pt").exists()


def test_trainer_refuses_to_save_non_finite_weights(tmp_path, episodes):
    from mode_ros.train.cli import load_config
    from mode_ros.train.trainer import Trainer, TrainingError

    tr = Trainer(load_config(str(train_yaml(tmp_path, episodes)), []), quiet=True)
    with torch.no_grad():
        next(tr.policy.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingError, match=r"step 0: 1 weight tensor\(s\) are non-finite") as ei:
        tr.save_checkpoint()
    assert ei.value.exit_code == 1 and not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("kind", ["corrupt", "empty", "dataless"])
def test_train_bad_hdf5_one_line_exit_2(tmp_path, capsys, kind):
    bad = tmp_path / f"{kind}.hdf5"
    if kind == "corrupt":
        bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(RNG.integers(0, 255, 2000, dtype=np.uint8)))
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        import h5py

        with h5py.File(bad, "w") as f:
            f.create_group("other")
    rc, err = run_cli(["train", "--config", str(train_yaml(tmp_path, bad))], capsys)
    assert rc == 2 and str(bad) in one_line(err), err


@pytest.mark.parametrize("where", ["config", "set", "set_path"])
def test_train_invalid_yaml_names_the_file_or_override(tmp_path, episodes, capsys, where):
    cfg = train_yaml(tmp_path, episodes)
    extra = []
    if where == "config":
        cfg.write_text(cfg.read_text() + "optim: {steps: [\n")
    elif where == "set":
        extra = ["--set", "optim.steps=[1,"]
    else:
        extra = ["--set", "seed.x=1"]
    rc, err = run_cli(["train", "--config", str(cfg), *extra], capsys)
    line = one_line(err)
    assert rc == 2, err
    assert (str(cfg) in line and "invalid YAML" in line) if where == "config" else ("--set" in line), line


def test_train_out_dir_is_a_file(tmp_path, episodes, capsys):
    cfg = train_yaml(tmp_path, episodes)
    (tmp_path / "run").write_text("not a folder")
    rc, err = run_cli(["train", "--config", str(cfg)], capsys)
    assert rc == 2 and f"out_dir {tmp_path / 'run'}: exists and is not a folder" in one_line(err)


def test_train_resume_files(tmp_path, episodes, capsys):
    cfg = str(train_yaml(tmp_path, episodes))
    state = tmp_path / "run" / "train_state.pt"
    rc, err = run_cli(["train", "--config", cfg, "--resume"], capsys)      # nothing to resume: refused
    assert rc == 2 and f"{state} does not exist, nothing to resume" in one_line(err)
    rc, err = run_cli(["train", "--config", cfg, "--resume-or-start", "--steps", "2"], capsys)
    assert rc == 0 and "STARTING FROM STEP 0" in err and state.is_file()
    # a kill -9 during the export leaves save_pretrained's temp folder: the next save removes it
    stale = tmp_path / "run" / ".tmp_ckpt_dead"
    (stale / "sub").mkdir(parents=True)
    good = state.read_bytes()
    rc, err = run_cli(["train", "--config", cfg, "--resume"], capsys)
    assert rc == 0 and "resumed from" in err and not stale.exists()
    assert torch.load(state, weights_only=False)["step"] == 3
    for content in (b"", good[:len(good) // 2], b"garbage" * 10):            # empty, truncated, corrupt
        state.write_bytes(content)
        rc, err = run_cli(["train", "--config", cfg, "--resume"], capsys)
        assert rc == 2 and one_line(err).startswith(f"mode-ros train: {state}: cannot resume from it"), err


def test_convert_out_existing_directory_one_line(tmp_path, episodes, capsys):
    out = tmp_path / "out_dir"
    out.mkdir()
    for argv in (["convert", "hdf5", str(episodes), "--out", str(out)],
                 ["convert", "bag", str(tmp_path), "--topics", "x.yaml", "--out", str(out)]):
        rc, err = run_cli(argv, capsys)
        assert rc == 2 and f"{out} is a directory" in one_line(err), err


# ---- replay: problems named, exit codes --------------------------------------------------------------------
@pytest.fixture(scope="module")
def replay_bag(tmp_path_factory):
    import yaml

    import replay_helpers as RH

    d = tmp_path_factory.mktemp("replay")
    bag = RH.write_bag(d / "bag", "sqlite3", seconds=1.5)
    (d / "map.yaml").write_text(yaml.safe_dump(RH.TOPIC_MAP))
    return bag, d / "map.yaml"


def init_ckpt(out: Path, state_dim: int) -> Path:
    from mode_ros.cli import main

    assert main(["init", "--preset", "tiny", "--out", str(out), "--cameras", "static,gripper", "--action-dim", "3",
                 "--state-dim", str(state_dim), "--goals", "open the drawer"]) == 0
    return out


def test_replay_checkpoint_state_not_fitting_the_bag_is_a_problem(replay_bag, tmp_path, capsys):
    bag, topics = replay_bag
    ck = init_ckpt(tmp_path / "ck4", state_dim=4)       # the bag's state has 3 joints
    capsys.readouterr()
    rc, _ = run_cli(["replay", str(bag), "--checkpoint", str(ck), "--topics", str(topics), "--offline", "--out",
                     str(tmp_path / "out"), "-p", "torch_threads=1", "-p", "warmup=false", "--quiet"], capsys)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rc == 1 and not rep["ok"]
    assert any(p.startswith("all ") and "joint_states messages were rejected (the checkpoint's state_dim is 4"
               in p for p in rep["problems"]), rep["problems"]


def test_replay_usage_and_checkpoint_file_errors(replay_bag, tmp_path, capsys):
    bag, topics = replay_bag
    from mode_ros.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["replay", str(bag), "--duration", "-3"])
    assert ei.value.code == 2 and "--duration: must be > 0, got -3" in capsys.readouterr().err
    ck = init_ckpt(tmp_path / "ck", state_dim=3)
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])    # truncated
    capsys.readouterr()
    rc, err = run_cli(["replay", str(bag), "--checkpoint", str(ck), "--topics", str(topics), "--offline",
                       "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert rc == 2 and str(weights) in one_line(err), err


def test_offline_replay_leaves_the_callers_thread_count(replay_bag, tmp_path, capsys):
    """-p torch_threads=N applies to the replay only: an in-process caller keeps its torch thread count
    (it changed the numerics of later in-process computations: the lockstep-equals-direct digest)."""
    import torch

    bag, topics = replay_bag
    ck = init_ckpt(tmp_path / "ck", state_dim=3)
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    capsys.readouterr()
    run_cli(["replay", str(bag), "--checkpoint", str(ck), "--topics", str(topics), "--offline", "--out",
             str(tmp_path / "out"), "-p", f"torch_threads={want}", "-p", "warmup=false", "--quiet"], capsys)
    assert (tmp_path / "out" / "report.json").exists()
    assert torch.get_num_threads() == before
