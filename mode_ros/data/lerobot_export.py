"""Episode files or rosbag2 bags -> a LeRobot v3.0 dataset folder (``mode-ros export lerobot``).

Bags go through the bag converter (:func:`mode_ros.data.bag.convert_bags`, into a temporary episode
file) first. Mapping (the inverse of the importer's default guess): camera ``cam`` ->
``observation.images.cam`` (video, one mp4 per camera and file), state key ``k`` -> ``observation.k``
(``state`` -> ``observation.state``), actions -> ``action``, the instruction -> the task, the control
rate -> ``fps``. Frames get ``timestamp = frame_index / fps``; a dropped-tick jump in our timestamps
cannot be represented and is counted in the report (``timestamp_gaps``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .episodes import Episode, EpisodeReader
from .lerobot import (INDEX_FEATURES, TASKS_PATH, V3_DATA_PATH, V3_EPISODES_PATH, V3_VIDEO_PATH, VCODECS,
                      LeRobotError, VideoWriter, check_video_format, state_feature_key)

__all__ = ["export_lerobot", "format_export_report", "vector_stats", "histogram_stats", "QUANTILES",
           "EPISODE_SUFFIXES"]

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
EPISODE_SUFFIXES = (".hdf5", ".h5", ".hdf")
CHUNKS_SIZE = 1000
DATA_FILES_MB = 100
VIDEO_FILES_MB = 200


def vector_stats(x: np.ndarray) -> dict:
    """LeRobot stats of a [N, D] feature: min, max, mean, std, count [N], quantiles; each a [D] list."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    out.update({k: np.quantile(x, q, axis=0) for k, q in QUANTILES.items()})
    res = {k: v.tolist() for k, v in out.items()}
    res["count"] = [int(len(x))]
    return res


def histogram_stats(hist: np.ndarray, frames: int) -> dict:
    """LeRobot stats of an image feature from per-channel uint8 histograms [3, 256]: values in [0, 1],
    each stat of shape [3, 1, 1] (channel first), count [frames]."""
    v = np.arange(256) / 255.0
    n = hist.sum(1)
    mean = (hist * v).sum(1) / n
    std = np.sqrt(np.maximum((hist * v ** 2).sum(1) / n - mean ** 2, 0.0))
    cdf = np.cumsum(hist, 1) / n[:, None]
    out = {"min": np.array([v[np.flatnonzero(h)[0]] for h in hist]),
           "max": np.array([v[np.flatnonzero(h)[-1]] for h in hist]), "mean": mean, "std": std}
    out.update({k: np.array([v[np.searchsorted(c, q)] for c in cdf]) for k, q in QUANTILES.items()})
    res = {k: a.reshape(3, 1, 1).tolist() for k, a in out.items()}
    res["count"] = [int(frames)]
    return res


class _Rolling:
    """Chunk/file indices of one kind of file (data parquet or one camera's mp4s)."""

    def __init__(self):
        self.chunk, self.file = 0, 0

    def advance(self) -> None:
        self.file += 1
        if self.file == CHUNKS_SIZE:
            self.chunk, self.file = self.chunk + 1, 0


def _fps_value(fps: float) -> int | float:
    return int(fps) if float(fps).is_integer() else float(fps)


def _features(r: EpisodeReader, cams: dict[str, tuple[int, int]], fps: float, vcodec: str,
              pix_fmt: str) -> dict:
    feats = {}
    fps = _fps_value(fps)
    for cam, (h, w) in cams.items():
        feats["observation.images." + cam] = {
            "dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": h, "video.width": w, "video.codec": VCODECS[vcodec][1],
                     "video.pix_fmt": pix_fmt, "video.is_depth_map": False, "video.fps": fps, "video.channels": 3,
                     "has_audio": False}}
    first = r.episode(0)
    for k in r.state_keys:
        names = r.state_names.get(k) or None
        feats[state_feature_key(k)] = {"dtype": "float32", "shape": [int(first.state(k).shape[1])],
                                       "names": names}
    feats["action"] = {"dtype": "float32", "shape": [r.action_dim], "names": r.action_names or None}
    for k, dt in INDEX_FEATURES.items():
        feats[k] = {"dtype": dt, "shape": [1], "names": None}
    return feats


def _check_same(readers: list[EpisodeReader]) -> None:
    a = readers[0]
    for r in readers[1:]:
        for attr in ("camera_names", "state_keys", "action_dim", "control_rate_hz"):
            if getattr(r, attr) != getattr(a, attr):
                raise LeRobotError(f"{r.path}: {attr} {getattr(r, attr)!r} differs from {a.path}'s "
                                   f"{getattr(a, attr)!r} (one dataset has one layout)")


class _Exporter:
    """Streams episodes into the v3.0 files: the data parquet, one mp4 per camera, the episode rows."""

    def __init__(self, out: Path, reader: EpisodeReader, fps: float, vcodec: str, crf: int, pix_fmt: str):
        self.out, self.fps, self.vcodec, self.crf, self.pix_fmt = out, fps, vcodec, crf, pix_fmt
        self.cams = list(reader.camera_names)
        self.state_keys = list(reader.state_keys)
        self.hw = {c: reader.episode(0).image_shape(c) for c in self.cams}
        self.tasks: dict[str, int] = {}
        self.rows: dict[str, list] = {}
        self.episode_rows: list[dict] = []
        self.values: dict[str, list[np.ndarray]] = {}
        self.histograms = {c: np.zeros((3, 256), np.int64) for c in self.cams}   # whole-dataset image stats
        self.data_at, self.data_bytes, self.data_start = _Rolling(), 0, 0
        self.video_at = {c: _Rolling() for c in self.cams}
        self.videos: dict[str, VideoWriter] = {}
        self.frames = 0

    def _video(self, cam: str) -> VideoWriter:
        v = self.videos.get(cam)
        if v is not None and v.path.exists() and v.path.stat().st_size > VIDEO_FILES_MB * 2 ** 20:
            v.close()
            self.video_at[cam].advance()
            v = None
        if v is None:
            at = self.video_at[cam]
            path = self.out / V3_VIDEO_PATH.format(video_key="observation.images." + cam, chunk_index=at.chunk,
                                                   file_index=at.file)
            v = self.videos[cam] = VideoWriter(path, self.fps, *self.hw[cam], vcodec=self.vcodec, crf=self.crf,
                                                 pix_fmt=self.pix_fmt)
        return v

    def episode(self, ep: Episode, where: str) -> str | None:
        """Append one episode; returns the reason when it is skipped."""
        acts = ep.actions
        states = {k: ep.state(k) for k in self.state_keys}
        for k, v in {"actions": acts, **states}.items():
            bad = np.flatnonzero(~np.all(np.isfinite(v), axis=1))
            if bad.size:
                return f"{where}: non-finite values in {k} at frame {int(bad[0])}"
        for c in self.cams:
            if ep.image_shape(c) != self.hw[c]:
                return f"{where}: camera {c!r} is {ep.image_shape(c)}, the dataset's video is {self.hw[c]}"
        n, idx = ep.length, len(self.episode_rows)
        task = self.tasks.setdefault(ep.language, len(self.tasks))
        row = {"episode_index": idx, "tasks": [ep.language], "length": n}
        for c in self.cams:
            row.update(self._frames(ep, c))
        vec = {"action": acts, **{state_feature_key(k): v for k, v in states.items()}}
        cols = {**vec, "timestamp": (np.arange(n) / self.fps).astype(np.float32), "frame_index": np.arange(n),
                "episode_index": np.full(n, idx), "index": self.frames + np.arange(n),
                "task_index": np.full(n, task)}
        for k, v in cols.items():
            self.rows.setdefault(k, []).append(v)
            self.values.setdefault(k, []).append(v)
            row.update({f"stats/{k}/{s}": x for s, x in vector_stats(np.asarray(v).reshape(n, -1)).items()})
        row.update({"data/chunk_index": self.data_at.chunk, "data/file_index": self.data_at.file,
                    "dataset_from_index": self.frames, "dataset_to_index": self.frames + n})
        self.frames += n
        self.data_bytes += sum(np.asarray(v).nbytes for v in cols.values())
        self.episode_rows.append(row)
        if self.data_bytes > DATA_FILES_MB * 2 ** 20:
            self.flush_data()
        return None

    def _frames(self, ep: Episode, cam: str) -> dict:
        v = self._video(cam)
        start = v.frames
        hist = np.zeros((3, 256), np.int64)
        for s in range(0, ep.length, 64):
            block = ep.images(cam, s, s + 64)
            for img in block:
                v.add(img)
            for ch in range(3):
                hist[ch] += np.bincount(block[..., ch].reshape(-1), minlength=256)
        st = histogram_stats(hist, ep.length)
        self.histograms[cam] += hist
        key = "observation.images." + cam
        at = self.video_at[cam]
        out = {f"videos/{key}/chunk_index": at.chunk, f"videos/{key}/file_index": at.file,
               f"videos/{key}/from_timestamp": start / self.fps, f"videos/{key}/to_timestamp": v.frames / self.fps}
        out.update({f"stats/{key}/{s}": x for s, x in st.items()})
        return out

    def flush_data(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        arrays = {}
        for k, parts in self.rows.items():
            v = np.concatenate(parts)
            if v.ndim == 2:
                flat = pa.array(v.astype(np.float32).reshape(-1))
                arrays[k] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
            else:
                arrays[k] = pa.array(v.astype(np.float32 if k == "timestamp" else np.int64))
        path = self.out / V3_DATA_PATH.format(chunk_index=self.data_at.chunk, file_index=self.data_at.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(arrays), path)
        self.rows, self.data_bytes = {}, 0
        self.data_at.advance()

    def close(self) -> None:
        self.flush_data()
        for v in self.videos.values():
            v.close()
        self.videos = {}


def _write_tasks(out: Path, tasks: dict[str, int]) -> None:
    """tasks.parquet: column task_index with the task strings as the (pandas) index named ``task``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(tasks, key=tasks.get)
    columns = [{"name": n, "field_name": n, "pandas_type": pt, "numpy_type": nt, "metadata": None}
               for n, pt, nt in (("task_index", "int64", "int64"), ("task", "unicode", "object"))]
    pandas_meta = {"index_columns": ["task"], "column_indexes": [], "pandas_version": "2.2.0",
                   "creator": {"library": "pyarrow", "version": pa.__version__}, "columns": columns}
    t = pa.table({"task_index": pa.array([tasks[n] for n in names], pa.int64()),
                  "task": pa.array(names, pa.string())})
    t = t.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    pq.write_table(t, out / TASKS_PATH)


def _write_meta(ex: _Exporter, out: Path, feats: dict, fps: float, robot_type: str | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_eps = len(ex.episode_rows)
    for row in ex.episode_rows:
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
    path = out / V3_EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ex.episode_rows:
        pq.write_table(pa.Table.from_pylist(ex.episode_rows), path)
    _write_tasks(out, ex.tasks)
    stats = {k: vector_stats(np.concatenate(v).reshape(ex.frames, -1)) for k, v in ex.values.items()}
    if ex.frames:
        stats.update({"observation.images." + c: histogram_stats(h, ex.frames) for c, h in ex.histograms.items()})
    (out / "meta" / "stats.json").write_text(json.dumps(stats, indent=4))
    info = {"codebase_version": "v3.0", "robot_type": robot_type, "total_episodes": n_eps,
            "total_frames": ex.frames,
            "total_tasks": len(ex.tasks), "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": DATA_FILES_MB,
            "video_files_size_in_mb": VIDEO_FILES_MB, "fps": _fps_value(fps),
            "splits": {"train": f"0:{n_eps}"}, "data_path": V3_DATA_PATH,
            "video_path": V3_VIDEO_PATH if ex.cams else None, "features": feats}
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=4))


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
        if not (out / "meta" / "info.json").exists():
            raise LeRobotError(f"{out}: not a LeRobot dataset (no meta/info.json); refusing to replace it")
        shutil.rmtree(out)
    (out / "meta").mkdir(parents=True, exist_ok=True)


def _gaps(ep: Episode, rate: float) -> int:
    ts = ep.timestamps
    return int(np.sum(np.diff(ts) > 1.5 / rate)) if ts is not None and len(ts) > 1 and rate > 0 else 0


def export_lerobot(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, topic_map=None,
                   vcodec: str = "h264", crf: int = 18, pix_fmt: str = "yuv420p", overwrite: bool = False,
                   progress: bool = True, robot_type: str | None = None) -> dict:
    """Write episode files and/or bags (converted with ``topic_map``) as one LeRobot v3.0 dataset.
    Returns the report (episodes/frames in and out, skipped episodes with reasons, timestamp gaps)."""
    t0 = time.perf_counter()
    inputs = [Path(p) for p in inputs]
    files = [p for p in inputs if p.suffix.lower() in EPISODE_SUFFIXES]
    bags = [p for p in inputs if p.suffix.lower() not in EPISODE_SUFFIXES]
    check_video_format(vcodec, pix_fmt)
    if bags and topic_map is None:
        raise LeRobotError(f"bags {[str(b) for b in bags[:3]]} need a topic map (--topics MAP.yaml)")
    out = Path(out)
    _prepare_out(out, overwrite)
    report: dict = {"output": str(out), "vcodec": vcodec, "crf": crf, "pix_fmt": pix_fmt, "inputs": [],
                    "skipped": {}, "timestamp_gaps": {}}
    with tempfile.TemporaryDirectory(prefix="mode_ros_lerobot_") as tmp:
        if bags:
            from .bag import convert_bags

            conv = Path(tmp) / "bags.hdf5"
            brep = convert_bags(bags, topic_map, conv, progress=progress, write_report=False)
            report["bags"] = brep["totals"]
            report["bag_errors"] = {b["path"]: b["error"] for b in brep["bags"] if b.get("error")}
            if brep["totals"]["episodes"]:
                files.append(conv)
        if not files:
            raise LeRobotError("no episodes to export (no episode files, and the bags gave none)")
        _export_files(files, out, (vcodec, crf, pix_fmt), progress, robot_type, report)
    dt = time.perf_counter() - t0
    report["elapsed_s"] = round(dt, 3)
    report["frames_per_s"] = round(report["frames_in"] / dt, 1) if dt > 0 else None
    return report


def _export_files(files: list[Path], out: Path, video: tuple[str, int, str], progress: bool, robot_type,
                  report: dict) -> None:
    readers = [EpisodeReader(p) for p in files]
    try:
        _check_same(readers)
        r0 = readers[0]
        fps = r0.control_rate_hz
        if not fps > 0:
            raise LeRobotError(f"{r0.path}: no control_rate_hz (LeRobot needs fps)")
        ex = _Exporter(out, r0, fps, *video)
        feats = _features(r0, ex.hw, fps, video[0], video[2])
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(e) for r in readers for e in r), desc="lerobot export", unit="frame",
                       file=sys.stderr, leave=False, dynamic_ncols=True)
        report.update(episodes_in=0, frames_in=0)
        try:
            for r in readers:
                report["inputs"].append(str(r.path))
                for ep in r:
                    where = f"{r.path}:{ep.name}"
                    report["episodes_in"] += 1
                    report["frames_in"] += ep.length
                    why = ex.episode(ep, where)
                    if why:
                        report["skipped"][where] = why
                    elif _gaps(ep, fps):
                        report["timestamp_gaps"][where] = _gaps(ep, fps)
                    if bar is not None:
                        bar.update(ep.length)
        finally:
            ex.close()
            if bar is not None:
                bar.close()
        _write_meta(ex, out, feats, fps, robot_type)
        report.update(episodes=len(ex.episode_rows), frames=ex.frames, tasks=len(ex.tasks), fps=fps,
                      cameras={c: list(hw) for c, hw in ex.hw.items()}, features=sorted(feats))
    finally:
        for r in readers:
            r.close()


def format_export_report(rep: dict) -> str:
    lines = []
    if "bags" in rep:
        b = rep["bags"]
        lines.append(f"bags: {b['episodes']} episodes, {b['ticks']} ticks, {b['dropped_ticks']} dropped ticks")
        lines += [f"  bag error {p}: {e}" for p, e in rep.get("bag_errors", {}).items()]
    lines += [f"skipped {k}: {why}" for k, why in rep["skipped"].items()]
    for k, n in rep["timestamp_gaps"].items():
        lines.append(f"warning: {k} has {n} dropped-tick gap(s); LeRobot frames are contiguous (timestamp = "
                     "frame_index / fps)")
    lines.append(f"total: {rep['episodes']}/{rep['episodes_in']} episodes, {rep['frames']}/{rep['frames_in']} frames, "
                 f"{rep['tasks']} tasks -> {rep['output']} (LeRobot v3.0, {rep['vcodec']} {rep['pix_fmt']}) in "
                 f"{rep['elapsed_s']} s ({rep['frames_per_s']} frames/s)")
    return "\n".join(lines)
