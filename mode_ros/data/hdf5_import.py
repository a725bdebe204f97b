"""LIBERO / robomimic HDF5 -> our episode format (``mode-ros convert hdf5``).

Input layout: ``data/demo_N/obs/<key>`` and ``data/demo_N/actions``; the language instruction comes
from ``--language``, the demo attr ``language_instruction``, ``data.attrs["problem_info"]`` (LIBERO,
JSON with ``language_instruction``), or the file name (LIBERO names files after the task:
``pick_up_the_black_bowl_..._demo.hdf5``). LIBERO renders images upside-down: ``flip="vertical"``
(or ``"rot180"``) fixes them while copying. Frames are copied in blocks, never a whole episode.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .episodes import EpisodeWriter, attr_str, demo_sort_key

__all__ = ["import_hdf5", "DEFAULT_CAMERA_MAPS", "language_from_filename", "FLIPS"]

# known obs keys -> our camera slots (first map whose keys are all present wins)
DEFAULT_CAMERA_MAPS = [
    {"agentview_rgb": "static", "eye_in_hand_rgb": "gripper"},                 # LIBERO
    {"agentview_image": "static", "robot0_eye_in_hand_image": "gripper"},      # robomimic
    {"agentview_rgb": "static"},
    {"agentview_image": "static"},
]
FLIPS = ("none", "vertical", "horizontal", "rot180")
BLOCK = 64


def language_from_filename(path: str | os.PathLike) -> str:
    """LIBERO file name -> instruction: ``KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5`` -> 'turn on the stove'."""
    stem = Path(path).stem
    stem = re.sub(r"_demo$", "", stem)
    stem = re.sub(r"^([A-Z0-9_]+?_SCENE\d+_)", "", stem)  # LIBERO-90/10 scene prefix
    return stem.replace("_", " ").strip()


def _flip(block: np.ndarray, flip: str) -> np.ndarray:
    if flip == "vertical":
        return block[:, ::-1]
    if flip == "horizontal":
        return block[:, :, ::-1]
    if flip == "rot180":
        return block[:, ::-1, ::-1]
    return block


def _language(f, demo, path, override: str | None, from_filename: bool) -> str:
    if override:
        return override
    s = attr_str(demo.attrs.get("language_instruction"))
    if s:
        return s
    pi = f["data"].attrs.get("problem_info")
    if pi is not None:
        try:
            s = str(json.loads(attr_str(pi)).get("language_instruction", "")).strip()
        except (ValueError, AttributeError):
            s = ""
        if s:
            return s
    if from_filename:
        return language_from_filename(path)
    return ""


def import_hdf5(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                camera_map: Mapping[str, str] | None = None, state_keys: Sequence[str] = (),
                actions_key: str = "actions", language: str | None = None, language_from_file: bool = True,
                flip: str = "none", control_rate_hz: float | None = None, overwrite: bool = False,
                progress: bool = True, resize: tuple[int, int] | None = None) -> dict:
    """Convert LIBERO/robomimic files into one episode file. Returns a report dict.

    ``camera_map``: obs key -> camera slot (default: LIBERO/robomimic names -> static/gripper, else
    every 4-D uint8 obs key under its own name). ``state_keys``: obs keys copied as float32 state.
    """
    import h5py

    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {flip!r}")
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
    camera_map, rate = _inspect_first_file(inputs[0], camera_map, state_keys, control_rate_hz)
    cams = list(camera_map.values())
    if len(set(cams)) != len(cams):
        raise ValueError(f"camera map assigns one slot twice: {dict(camera_map)}")
    report = {"output": str(out), "inputs": [], "camera_map": dict(camera_map), "flip": flip,
              "control_rate_hz": rate, "episodes": 0, "frames": 0}
    bar = _progress_bar(progress)
    with EpisodeWriter(out, cams, (), control_rate_hz=rate, source="hdf5:" + ",".join(p.name for p in inputs),
                       state_keys=list(state_keys), overwrite=overwrite) as w:
        for path in inputs:
            irep = {"path": str(path), "demos": 0, "skipped": {}}
            report["inputs"].append(irep)
            with h5py.File(path, "r") as f:
                for dname in sorted(f["data"].keys(), key=demo_sort_key):
                    demo = f["data"][dname]
                    arrays = _demo_arrays(demo, actions_key, camera_map, state_keys, resize)
                    if isinstance(arrays, str):
                        irep["skipped"][dname] = arrays
                        continue
                    acts, shapes, states = arrays
                    T = acts.shape[0]
                    b = w.begin_episode(T, shapes, acts.shape[1], {k: v.shape[1] for k, v in states.items()})
                    b.set_arrays(acts, np.arange(T, dtype=np.float64) / rate, states)
                    for key, cam in camera_map.items():
                        _copy_frames(demo["obs"][key], T, flip, resize, lambda t, im, c=cam: b.set_image(c, t, im))
                    b.finish(_language(f, demo, path, language, language_from_file),
                             attrs={"source_file": str(path), "source_demo": dname})
                    irep["demos"] += 1
                    report["episodes"] += 1
                    report["frames"] += T
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()
    return report


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(desc="import", unit="demo", file=sys.stderr, leave=False)


def _inspect_first_file(path: Path, camera_map, state_keys, control_rate_hz) -> tuple[dict, float]:
    """The camera map (given, a known LIBERO/robomimic one, or every uint8 image key) checked against the first
    demo of the first file, and the control rate (given, the file's env_args, or 20 Hz)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path}: no 'data' group (not a robomimic/LIBERO file)")
        demos = sorted(f["data"].keys(), key=demo_sort_key)
        if not demos:
            raise ValueError(f"{path}: no demos under data/")
        obs = f["data"][demos[0]]["obs"] if "obs" in f["data"][demos[0]] else {}
        obs_keys = list(obs.keys())
        if camera_map is None:
            camera_map = next((m for m in DEFAULT_CAMERA_MAPS if all(k in obs_keys for k in m)), None)
            if camera_map is None:
                camera_map = {k: k for k in obs_keys if obs[k].ndim == 4 and obs[k].dtype == np.uint8}
        for what, keys in (("obs", camera_map), ("state", state_keys)):
            missing = [k for k in keys if k not in obs_keys]
            if missing:
                raise ValueError(f"{path}: {what} keys {missing} not found (has {obs_keys})")
        if not camera_map:
            raise ValueError(f"{path}: no image obs keys found (has {obs_keys}); pass --map key=camera")
        rate = control_rate_hz
        if rate is None:
            try:
                rate = float(json.loads(attr_str(f["data"].attrs.get("env_args")))["env_kwargs"]["control_freq"])
            except (TypeError, ValueError, KeyError):
                rate = 20.0  # LIBERO / robomimic default control frequency
    return dict(camera_map), rate


def _demo_arrays(demo, actions_key, camera_map, state_keys, resize):
    """(actions, image shapes per camera, state arrays) of one demo, or why it is skipped (a string)."""
    if actions_key not in demo or "obs" not in demo:
        return f"no {actions_key!r} or obs"
    acts = np.asarray(demo[actions_key][:], np.float32)
    if acts.ndim == 1:
        acts = acts[:, None]
    T = acts.shape[0]
    if not np.all(np.isfinite(acts)):
        return "non-finite actions"
    shapes = {}
    for key, cam in camera_map.items():
        ds = demo["obs"].get(key)
        if ds is None or ds.shape[0] != T or ds.ndim != 4 or ds.shape[3] != 3:
            return f"obs/{key} missing or not [T={T},H,W,3]"
        shapes[cam] = tuple(resize) if resize else ds.shape[1:3]
    states = {}
    for k in state_keys:
        if k not in demo["obs"] or demo["obs"][k].shape[0] != T:
            return f"obs/{k} missing or not {T} rows"
        v = np.asarray(demo["obs"][k][:], np.float32).reshape(T, -1)
        if not np.all(np.isfinite(v)):
            return f"non-finite values in obs/{k}"
        states[k] = v
    return acts, shapes, states


def _copy_frames(ds, T: int, flip: str, resize, put) -> None:
    """Every frame of an image dataset as uint8 (flipped, resized), block by block, handed to ``put(t, frame)``."""
    # float images in [0, 1] (some exporters write those) are scaled to 0..255; a plain cast would make
    # them black. Judged once per camera and demo.
    gain = 255.0 if ds.dtype.kind == "f" and float(np.nanmax(ds[:min(T, BLOCK)])) <= 1.0 else 1.0
    for s in range(0, T, BLOCK):
        block = _flip(ds[s:s + BLOCK], flip)
        if block.dtype != np.uint8:
            block = np.round(np.clip(np.nan_to_num(block * gain), 0, 255)).astype(np.uint8)
        if resize and block.shape[1:3] != tuple(resize):
            from PIL import Image

            block = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize(
                (resize[1], resize[0]), Image.BILINEAR)) for im in block])
        for i, frame in enumerate(block):
            put(s + i, frame)
