"""LeRobot dataset layouts (v2.0/v2.1 and v3.0), shared by the importer and the exporter.

A dataset folder (docs/DATA.md "LeRobot"):

* ``meta/info.json``: ``codebase_version``, ``fps``, ``features`` (key -> dtype, shape, names, info),
  ``data_path``/``video_path`` templates, totals;
* v3.0: ``meta/tasks.parquet`` (task string -> ``task_index``), ``meta/episodes/chunk-*/file-*.parquet``
  (one row per episode: ``length``, ``data/chunk_index``, ``data/file_index``, ``dataset_from_index``,
  ``videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}``, ``stats/<key>/<stat>``),
  ``data/chunk-*/file-*.parquet`` and ``videos/<key>/chunk-*/file-*.mp4`` holding many episodes each;
* v2.x: ``meta/episodes.jsonl``, ``meta/tasks.jsonl``, one parquet per episode and one mp4 per
  episode and camera, paths from the templates with ``episode_chunk = episode_index // chunks_size``.

Videos are read and written with PyAV (FFmpeg bundled in the wheel: H.264, AV1 via libdav1d/SVT-AV1).
Nothing here imports pyarrow or av at module level.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["LeRobotError", "LeRobotMap", "load_lerobot_map", "guess_map", "feature_names", "VERSIONS",
           "INDEX_FEATURES", "V3_DATA_PATH", "V3_VIDEO_PATH", "V3_EPISODES_PATH", "TASKS_PATH",
           "vector_column", "VideoFrames", "VideoWriter", "VCODECS", "camera_slot", "state_feature_key",
           "state_key_of", "read_json", "PIX_FMTS", "check_video_format"]

VERSIONS = ("v2.0", "v2.1", "v3.0")
#: per-frame bookkeeping columns every LeRobot dataset has (dtype, shape [1], names null)
INDEX_FEATURES = {"timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64",
                  "task_index": "int64"}
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
TASKS_PATH = "meta/tasks.parquet"
#: --vcodec -> (FFmpeg encoder, the name info.json records)
VCODECS = {"h264": ("libx264", "h264"), "av1": ("libsvtav1", "av1")}
PIX_FMTS = ("yuv420p", "yuv444p")
IMAGE_PREFIX = "observation.images."


class LeRobotError(ValueError):
    """A LeRobot dataset, key map or export request cannot be used; the message names the file and key."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LeRobotError(f"{path}: missing (not a LeRobot dataset folder?)") from None
    except ValueError as exc:
        raise LeRobotError(f"{path}: invalid JSON: {exc}") from None


# --------------------------------------------------------------------------------------------
# key map: LeRobot feature keys -> camera slots, state keys, action
# --------------------------------------------------------------------------------------------
@dataclass
class LeRobotMap:
    """``cameras``: image/video key -> camera slot (order = model order); ``state``: float key -> state
    key in the episode file; ``action``: float keys concatenated into the action; ``instruction``: a fixed
    language goal instead of the per-frame task strings."""
    cameras: dict[str, str] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    action: list[str] = field(default_factory=lambda: ["action"])
    instruction: str | None = None


def camera_slot(key: str) -> str:
    """``observation.images.top`` -> ``top``; ``observation.image`` -> ``image``."""
    if key.startswith(IMAGE_PREFIX):
        return key[len(IMAGE_PREFIX):]
    return key.rsplit(".", 1)[-1]


def state_key_of(key: str) -> str:
    """``observation.state`` -> ``state``; ``observation.environment_state`` -> ``environment_state``."""
    return key[len("observation."):] if key.startswith("observation.") else key


def state_feature_key(state_key: str) -> str:
    """The inverse of :func:`state_key_of` (``state`` -> ``observation.state``)."""
    return "observation." + state_key


def guess_map(features: dict) -> LeRobotMap:
    """Every image/video feature is a camera (slot = last part of its key), every other numeric
    ``observation.<k>`` a state with key ``<k>`` (``observation.state`` -> ``state``), ``action`` the
    action. Features left out (e.g. ``next.reward``) are listed in the report as not imported."""
    cams = {k: camera_slot(k) for k, ft in features.items() if ft.get("dtype") in ("image", "video")}
    state = {k: state_key_of(k) for k, ft in features.items()
             if k.startswith("observation.") and k not in cams and ft.get("dtype") not in ("string", "bool")}
    return LeRobotMap(cameras=cams, state=state, action=["action"])


def _strmap(v: Any, where: str) -> dict[str, str]:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        v = {x: (camera_slot(x) if where == "cameras" else state_key_of(x)) for x in v}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) and x
                                          for k, x in v.items()):
        raise LeRobotError(f"{where}: expected a mapping LeRobot key -> name (or a list of keys), got {v!r}")
    if len(set(v.values())) != len(v):
        raise LeRobotError(f"{where}: two keys map to the same name: {v}")
    return dict(v)


def load_lerobot_map(src: str | os.PathLike | dict) -> LeRobotMap:
    """Load and validate a key map (YAML file or dict, see config/lerobot_map.example.yaml); unknown or
    malformed keys raise :class:`LeRobotError` naming the key."""
    where = "key map"
    if not isinstance(src, dict):
        import yaml

        where = f"key map {src}"
        try:
            src = yaml.safe_load(Path(src).read_text()) or {}
        except FileNotFoundError:
            raise LeRobotError(f"{where}: does not exist") from None
        except yaml.YAMLError as exc:
            raise LeRobotError(f"{where}: invalid YAML: {exc}") from None
    if not isinstance(src, dict):
        raise LeRobotError(f"{where}: expected a mapping, got {type(src).__name__}")
    allowed = {f.name for f in fields(LeRobotMap)}
    unknown = sorted(set(src) - allowed)
    if unknown:
        raise LeRobotError(f"{where}: unknown key(s) {unknown} (allowed: {sorted(allowed)})")
    m = LeRobotMap()
    if "cameras" in src:
        m.cameras = _strmap(src["cameras"] or {}, "cameras")
    if "state" in src:
        m.state = _strmap(src["state"] or {}, "state")
    if "action" in src:
        a = src["action"]
        a = [a] if isinstance(a, str) else a
        if not isinstance(a, list) or not a or not all(isinstance(x, str) for x in a):
            raise LeRobotError(f"{where}: action: expected a key or a non-empty list of keys, "
                               f"got {src['action']!r}")
        m.action = list(a)
    if src.get("instruction") is not None:
        if not isinstance(src["instruction"], str) or not src["instruction"].strip():
            raise LeRobotError(f"{where}: instruction: expected a non-empty string, "
                               f"got {src['instruction']!r}")
        m.instruction = src["instruction"]
    clash = set(m.cameras.values()) & set(m.state.values())
    if clash:
        raise LeRobotError(f"{where}: names {sorted(clash)} are both camera slots and state keys")
    return m


def feature_names(ft: dict) -> list[str]:
    """A feature's per-dimension names: a list, or a dict holding one list (v2.0 ``{"motors": [...]}``)."""
    names = ft.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return list(names)
    return []


# --------------------------------------------------------------------------------------------
# parquet
# --------------------------------------------------------------------------------------------
def vector_column(table, key: str, where: str) -> np.ndarray:
    """A list/fixed-size-list (or scalar) column as float64 [N, D]; ragged rows or nulls raise."""
    import pyarrow as pa

    col = table.column(key).combine_chunks()
    n = len(col)
    if col.null_count:
        raise LeRobotError(f"{where}: column {key!r} has {col.null_count} null rows")
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float64)
        if n and flat.size % n:
            raise LeRobotError(f"{where}: column {key!r} has rows of different lengths")
        return flat.reshape(n, -1 if n else 0)
    return np.asarray(col.to_numpy(zero_copy_only=False), np.float64).reshape(n, 1)


# --------------------------------------------------------------------------------------------
# video (PyAV)
# --------------------------------------------------------------------------------------------
class VideoFrames:
    """Sequential access to the frames of one mp4 by frame number ``round(pts_seconds * fps)``.
    :meth:`get` must be called with increasing numbers; a request behind the cursor seeks back."""

    def __init__(self, path: Path, fps: float, key: str):
        import av

        self.path, self.fps, self.key = Path(path), float(fps), key
        try:
            self._c = av.open(str(self.path))
        except (FileNotFoundError, av.error.FileNotFoundError):
            raise LeRobotError(f"{self.path}: video of feature {key!r} is missing") from None
        except av.error.FFmpegError as exc:
            raise LeRobotError(f"{self.path}: cannot open video of feature {key!r}: {exc}") from None
        self._s = self._c.streams.video[0]
        self._s.thread_type = "AUTO"
        rate = self._s.average_rate or self._s.guessed_rate
        if rate and abs(float(rate) - self.fps) > 0.01 * self.fps:
            self.close()
            raise LeRobotError(f"{self.path}: video of feature {key!r} runs at {float(rate):g} fps, the dataset's "
                               f"info.json says fps {self.fps:g} (mismatched fps)")
        self._it: Iterator | None = None
        self._cur: tuple[int, np.ndarray] | None = None
        self.last_frame = -1
        self.error: str | None = None

    def _restart(self, target: int) -> None:
        tb = self._s.time_base
        ts = int(max(0.0, (target - 2) / self.fps) / tb) if tb else 0
        self._c.seek(ts, stream=self._s, backward=True, any_frame=False)
        self._it = self._c.decode(self._s)
        self._cur = None

    def _next(self) -> tuple[int, np.ndarray] | None:
        import av

        try:
            for f in self._it:
                if f.pts is None:
                    continue
                n = int(round(float(f.pts * f.time_base) * self.fps))
                self.last_frame = max(self.last_frame, n)
                return n, f.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:   # corrupt data: the frames after it are unreadable
            self.error = f"decoding failed after frame {self.last_frame}: {exc}"
        return None

    def get(self, number: int) -> np.ndarray | None:
        """The frame with this number, or None when the file ends (or cannot be decoded, ``error``)
        before it."""
        if self._it is None or self._cur is None or number < self._cur[0]:
            self._restart(number)
            self._cur = self._next()
        while self._cur is not None and self._cur[0] < number:
            self._cur = self._next()
        if self._cur is None or self._cur[0] != number:
            return None
        return self._cur[1]

    def close(self) -> None:
        self._c.close()


def check_video_format(vcodec: str, pix_fmt: str) -> None:
    """h264 with yuv420p or yuv444p, av1 with yuv420p; anything else raises LeRobotError."""
    if vcodec not in VCODECS or pix_fmt not in PIX_FMTS or (vcodec == "av1" and pix_fmt != "yuv420p"):
        raise LeRobotError(f"unsupported video format {vcodec}/{pix_fmt} (h264 with {list(PIX_FMTS)}, "
                           "av1 with yuv420p)")


class VideoWriter:
    """One mp4 per camera and file: frames get consecutive pts on a 1/fps time base (so frame k is at
    k/fps s), H.264 (libx264) or AV1 (SVT-AV1), yuv420p (LeRobot's default) or yuv444p (full colour
    resolution: small saturated details of low-resolution renders survive)."""

    def __init__(self, path: Path, fps: float, height: int, width: int, vcodec: str = "h264", crf: int = 18,
                 pix_fmt: str = "yuv420p"):
        import av
        from fractions import Fraction

        check_video_format(vcodec, pix_fmt)
        if pix_fmt == "yuv420p" and (height % 2 or width % 2):
            raise LeRobotError(f"{path}: yuv420p video needs even frame sizes, got {width}x{height} "
                               "(use yuv444p)")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("SVT_LOG", "2")   # SVT-AV1: warnings and errors only (no per-file config dump)
        self._c = av.open(str(self.path), "w")
        rate = Fraction(fps).limit_denominator(1001)
        self._s = self._c.add_stream(VCODECS[vcodec][0], rate=rate)
        self._s.width, self._s.height, self._s.pix_fmt = width, height, pix_fmt
        self._s.time_base = 1 / rate
        self._s.options = ({"crf": str(crf), "preset": "veryfast"} if vcodec == "h264"
                           else {"crf": str(crf), "preset": "8"})
        self.frames = 0

    def add(self, rgb: np.ndarray) -> None:
        import av

        f = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, np.uint8), format="rgb24")
        f.pts = self.frames
        self.frames += 1
        for p in self._s.encode(f):
            self._c.mux(p)

    def close(self) -> None:
        for p in self._s.encode():
            self._c.mux(p)
        self._c.close()
