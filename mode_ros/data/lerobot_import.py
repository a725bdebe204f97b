"""LeRobot dataset folders (v2.0/v2.1/v3.0) -> our episode file (``mode-ros convert lerobot``).

Per episode: the mapped float features become the actions and states (float32, exactly the parquet's
values), camera features are decoded from the parquet (``image``: PNG/JPEG bytes) or from the mp4s
(``video``: frame ``round((from_timestamp + timestamp) * fps)`` of the episode's file), the task of the
first frame is the language goal, ``fps`` the control rate, feature ``names`` the action/state names.
Episodes with non-finite values, missing rows or videos shorter than their frame index are skipped
and counted with the reason (file and key); nothing else is dropped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .episodes import EpisodeWriter
from .images import ImageDecodeError, decode_compressed
from .lerobot import (INDEX_FEATURES, TASKS_PATH, VERSIONS, LeRobotError, LeRobotMap, VideoFrames,
                      feature_names, guess_map, load_lerobot_map, read_json, vector_column)

__all__ = ["import_lerobot", "read_layout", "Layout", "EpisodeRef", "format_import_report"]


@dataclass
class EpisodeRef:
    index: int
    length: int
    data_file: Path
    videos: dict[str, tuple[Path, float]]     # video key -> (mp4, from_timestamp)


@dataclass
class Layout:
    root: Path
    version: str
    fps: float
    features: dict
    tasks: dict[int, str]
    episodes: list[EpisodeRef]


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise LeRobotError(f"{path}: missing") from None
    try:
        return [json.loads(x) for x in lines if x.strip()]
    except ValueError as exc:
        raise LeRobotError(f"{path}: invalid JSON line: {exc}") from None


def _read_parquet(path: Path, columns=None):
    import pyarrow.parquet as pq

    if not path.exists():
        raise LeRobotError(f"{path}: missing")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files/columns
        raise LeRobotError(f"{path}: cannot read: {exc}") from None


def _tasks_v3(root: Path) -> dict[int, str]:
    t = _read_parquet(root / TASKS_PATH)
    names = t.column_names
    text = next((c for c in ("task", "__index_level_0__") if c in names), None)
    if "task_index" not in names or text is None:
        raise LeRobotError(f"{root / TASKS_PATH}: expected columns task_index and task, has {names}")
    return {int(i): str(s) for i, s in zip(t.column("task_index").to_pylist(), t.column(text).to_pylist())}


def _episodes_v3(root: Path, info: dict, video_keys: list[str]) -> list[EpisodeRef]:
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise LeRobotError(f"{root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet "
                           "(episode metadata missing)")
    out = []
    import pyarrow.parquet as pq

    for f in files:
        t = _read_parquet(f, [c for c in pq.read_schema(f).names if not c.startswith("stats/")])
        cols = {c: t.column(c).to_pylist() for c in t.column_names}
        need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        need += [f"videos/{k}/{x}" for k in video_keys
                 for x in ("chunk_index", "file_index", "from_timestamp")]
        missing = [c for c in need if c not in cols]
        if missing:
            raise LeRobotError(f"{f}: missing column(s) {missing}")
        for i in range(t.num_rows):
            data = root / info["data_path"].format(chunk_index=cols["data/chunk_index"][i],
                                                   file_index=cols["data/file_index"][i])
            vids = {}
            for k in video_keys:
                c, f_i = cols[f"videos/{k}/chunk_index"][i], cols[f"videos/{k}/file_index"][i]
                vids[k] = (root / info["video_path"].format(video_key=k, chunk_index=c, file_index=f_i),
                           float(cols[f"videos/{k}/from_timestamp"][i]))
            out.append(EpisodeRef(int(cols["episode_index"][i]), int(cols["length"][i]), data, vids))
    return out


def _episodes_v2(root: Path, info: dict, video_keys: list[str]) -> list[EpisodeRef]:
    size = int(info.get("chunks_size") or 1000)
    out = []
    for e in _read_jsonl(root / "meta" / "episodes.jsonl"):
        i = int(e["episode_index"])
        data = root / info["data_path"].format(episode_chunk=i // size, episode_index=i)
        vids = {k: (root / info["video_path"].format(episode_chunk=i // size, video_key=k, episode_index=i),
                    0.0) for k in video_keys}
        out.append(EpisodeRef(i, int(e["length"]), data, vids))
    return out


def read_layout(root: str | os.PathLike) -> Layout:
    """Read the metadata of one dataset folder; unknown versions and missing files raise LeRobotError."""
    root = Path(root)
    info_path = root / "meta" / "info.json"
    info = read_json(info_path)
    version = str(info.get("codebase_version", ""))
    if version not in VERSIONS:
        raise LeRobotError(f"{info_path}: codebase_version {version!r} is not supported "
                           f"(supported: {list(VERSIONS)})")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise LeRobotError(f"{info_path}: missing key {key!r}")
    feats = info["features"]
    video_keys = [k for k, ft in feats.items() if ft.get("dtype") == "video"]
    if video_keys and not info.get("video_path"):
        raise LeRobotError(f"{info_path}: video features {video_keys} but no 'video_path'")
    if version == "v3.0":
        tasks, eps = _tasks_v3(root), _episodes_v3(root, info, video_keys)
    else:
        tasks = {int(t["task_index"]): str(t["task"]) for t in _read_jsonl(root / "meta" / "tasks.jsonl")}
        eps = _episodes_v2(root, info, video_keys)
    return Layout(root, version, float(info["fps"]), feats, tasks, eps)


def _image_hw(ft: dict, where: str) -> tuple[int, int]:
    info = ft.get("info") or ft.get("video_info") or {}
    if "video.height" in info and "video.width" in info:
        return int(info["video.height"]), int(info["video.width"])
    shape, names = list(ft.get("shape", [])), [str(n) for n in (ft.get("names") or [])]
    if len(shape) != 3:
        raise LeRobotError(f"{where}: image shape {shape} is not 3-D")
    channel_first = names[0].startswith("channel") if names else shape[0] in (1, 3) and shape[2] not in (1, 3)
    if channel_first:
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


def _check_features(layout: Layout, m: LeRobotMap) -> None:
    where = layout.root / "meta" / "info.json"
    feats = layout.features
    for role, keys, ok in (("cameras", m.cameras, ("image", "video")), ("state", m.state, None),
                           ("action", m.action, None)):
        for k in keys:
            if k not in feats:
                raise LeRobotError(f"{where}: feature {k!r} ({role} in the key map) is missing; the dataset has "
                                   f"{sorted(feats)}")
            dt = feats[k].get("dtype")
            if ok and dt not in ok or not ok and dt in ("image", "video", "string"):
                raise LeRobotError(f"{where}: feature {k!r} has dtype {dt!r}, not usable as {role}")
    for k, ft in feats.items():
        vfps = (ft.get("info") or {}).get("video.fps")
        if k in m.cameras and ft.get("dtype") == "video" and vfps and abs(float(vfps) - layout.fps) > 1e-6:
            raise LeRobotError(f"{where}: feature {k!r} has video.fps {vfps}, the dataset fps is {layout.fps:g} "
                               "(mismatched fps)")


class _Importer:
    """State of one import: the writer, the key map, open videos, the report."""

    def __init__(self, writer: EpisodeWriter, m: LeRobotMap, action_dim: int, bar):
        self.w, self.m, self.action_dim, self.bar = writer, m, action_dim, bar
        self.videos: dict[str, VideoFrames] = {}

    def video(self, key: str, path: Path, fps: float) -> VideoFrames:
        v = self.videos.get(key)
        if v is None or v.path != path:
            if v is not None:
                v.close()
            v = self.videos[key] = VideoFrames(path, fps, key)
        return v

    def close(self) -> None:
        for v in self.videos.values():
            v.close()

    def data_file(self, layout: Layout, path: Path, eps: list[EpisodeRef], drep: dict) -> None:
        m, feats = self.m, layout.features
        cams_in_parquet = [k for k in m.cameras if feats[k]["dtype"] == "image"]
        cols = ["episode_index", "timestamp", "task_index",
                *dict.fromkeys([*m.action, *m.state, *cams_in_parquet])]
        import pyarrow.parquet as pq

        if not path.exists():
            raise LeRobotError(f"{path}: data file missing")
        have = pq.read_schema(path).names
        missing = [c for c in cols if c not in have]
        if missing:
            raise LeRobotError(f"{path}: feature column(s) {missing} missing (missing feature)")
        table = _read_parquet(path, cols)
        vec = {k: vector_column(table, k, str(path)) for k in dict.fromkeys([*m.action, *m.state])}
        epi = np.asarray(table.column("episode_index").to_numpy(), np.int64)
        for ep in eps:
            rows = np.flatnonzero(epi == ep.index)
            why = self.episode(layout, ep, table, vec, rows, path)
            name = f"episode_{ep.index}"
            if why:
                drep["skipped"][name] = why
            else:
                drep["episodes"] += 1
                drep["frames"] += int(rows.size)
            if self.bar is not None:
                self.bar.update(ep.length)

    def episode(self, layout: Layout, ep: EpisodeRef, table, vec: dict, rows: np.ndarray,
                path: Path) -> str | None:
        """Write one episode; returns the reason when it is skipped."""
        m, fps = self.m, layout.fps
        if rows.size != ep.length or rows.size == 0:
            return f"{path} has {rows.size} rows of episode {ep.index}, its metadata says length {ep.length}"
        for k, v in vec.items():
            bad = np.flatnonzero(~np.all(np.isfinite(v[rows]), axis=1))
            if bad.size:
                return f"non-finite values in {k!r} at frame {int(bad[0])} ({path})"
        acts = np.concatenate([vec[k][rows] for k in m.action], axis=1)
        if acts.shape[1] != self.action_dim:
            return f"action has {acts.shape[1]} dims, the first dataset has {self.action_dim} ({path})"
        ts = np.asarray(table.column("timestamp").to_numpy(), np.float64)[rows]
        task_idx = int(table.column("task_index")[int(rows[0])].as_py())
        lang = m.instruction or layout.tasks.get(task_idx)
        if lang is None:
            return f"task_index {task_idx} is not in the dataset's tasks ({path})"
        shapes = {slot: _image_hw(layout.features[k], f"{layout.root}/meta/info.json: {k}")
                  for k, slot in m.cameras.items()}
        b = self.w.begin_episode(rows.size, shapes, acts.shape[1],
                                 {s: vec[k].shape[1] for k, s in m.state.items()})
        b.set_arrays(acts, ts, {s: vec[k][rows] for k, s in m.state.items()})
        for k, slot in m.cameras.items():
            try:
                if layout.features[k]["dtype"] == "image":
                    why = self._images(b, slot, table.column(k), rows, shapes[slot], k, path)
                else:
                    why = self._video(b, slot, ep, k, ts, fps, shapes[slot])
            except LeRobotError:     # a missing video or a wrong frame rate: stop, leaving no partial episode
                b.discard()
                raise
            if why:
                b.discard()
                return why
        tasks = {int(x) for x in np.asarray(table.column("task_index").to_numpy())[rows]}
        b.finish(lang, attrs={"source_dataset": str(layout.root), "source_episode": ep.index,
                              "lerobot_tasks": sorted(layout.tasks.get(t, str(t)) for t in tasks)})
        return None

    @staticmethod
    def _images(b, slot, col, rows, hw, key, path) -> str | None:
        for j, r in enumerate(rows):
            v = col[int(r)].as_py()
            data = v.get("bytes") if isinstance(v, dict) else v
            if not data:
                return f"{path}: image {key!r} frame {j} has no bytes"
            try:
                img = decode_compressed("", data)
            except ImageDecodeError as exc:
                return f"{path}: image {key!r} frame {j}: {exc}"
            if img.shape[:2] != hw:
                return f"{path}: image {key!r} frame {j} is {img.shape[:2]}, info.json says {hw}"
            b.set_image(slot, j, img)
        return None

    def _video(self, b, slot, ep: EpisodeRef, key, ts, fps, hw) -> str | None:
        path, start = ep.videos[key]
        v = self.video(key, path, fps)
        numbers = np.round((start + ts) * fps).astype(np.int64)
        for j, n in enumerate(numbers):
            img = v.get(int(n))
            if img is None and v.error:
                return f"{path}: video of {key!r}: {v.error}"
            if img is None:
                return (f"{path}: video of {key!r} is shorter than the frame index says: episode {ep.index} needs "
                        f"frame {int(n)} (from_timestamp {start:g} + {ts[j]:g} s), the file ends at frame "
                        f"{v.last_frame}")
            if img.shape[:2] != hw:
                return f"{path}: video of {key!r} frames are {img.shape[:2]}, info.json says {hw}"
            b.set_image(slot, j, img)
        return None


def _names(feats: dict, keys) -> list[str]:
    parts = [feature_names(feats[k]) for k in keys]
    return [n for p in parts for n in p] if all(parts) else []


def import_lerobot(datasets: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   key_map: LeRobotMap | str | os.PathLike | dict | None = None, instruction: str | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Convert LeRobot dataset folders into one episode file. Returns the report (frames and episodes
    in and out, skipped episodes with reasons, unused features). ``key_map`` None: :func:`guess_map` of
    the first dataset; ``instruction`` overrides the map's. Raises :class:`LeRobotError`."""
    t0 = time.perf_counter()
    layouts = [read_layout(d) for d in datasets]
    if not layouts:
        raise LeRobotError("no dataset folders given")
    first = layouts[0]
    m = key_map if isinstance(key_map, LeRobotMap) or key_map is None else load_lerobot_map(key_map)
    m = m or guess_map(first.features)
    if instruction:
        m = dataclasses.replace(m, instruction=instruction)
    if not m.cameras and not m.state and not m.action:
        raise LeRobotError(f"{first.root}: nothing to import")
    for lay in layouts:
        _check_features(lay, m)
        if abs(lay.fps - first.fps) > 1e-9:
            raise LeRobotError(f"{lay.root / 'meta/info.json'}: fps {lay.fps:g} differs from {first.root}'s fps "
                               f"{first.fps:g} (mismatched fps: one episode file has one control rate)")
    feats = first.features
    action_dim = sum(int(np.prod(feats[k].get("shape") or [1])) for k in m.action)
    report = {"output": str(out), "control_rate_hz": first.fps, "key_map": m.__dict__, "datasets": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(e.length for lay in layouts for e in lay.episodes), desc="lerobot import",
                   unit="frame", file=sys.stderr, leave=False, dynamic_ncols=True)
    with EpisodeWriter(out, list(m.cameras.values()), _names(feats, m.action), control_rate_hz=first.fps,
                       source="lerobot:" + ",".join(str(lay.root) for lay in layouts),
                       state_keys=list(m.state.values()), overwrite=overwrite,
                       state_names={s: feature_names(feats[k]) for k, s in m.state.items()}) as w:
        imp = _Importer(w, m, action_dim, bar)
        try:
            for lay in layouts:
                report["datasets"].append(_import_one(imp, lay))
        finally:
            imp.close()
            if bar is not None:
                bar.close()
    ds = report["datasets"]
    dt = time.perf_counter() - t0
    report["totals"] = {k: sum(d[k] for d in ds) for k in ("episodes_in", "frames_in", "episodes", "frames")}
    report["totals"].update(skipped=sum(len(d["skipped"]) for d in ds), elapsed_s=round(dt, 3),
                            frames_per_s=round(report["totals"]["frames_in"] / dt, 1) if dt > 0 else None)
    return report


def _import_one(imp: _Importer, lay: Layout) -> dict:
    used = set(imp.m.cameras) | set(imp.m.state) | set(imp.m.action) | set(INDEX_FEATURES)
    drep = {"path": str(lay.root), "version": lay.version, "fps": lay.fps, "episodes_in": len(lay.episodes),
            "frames_in": sum(e.length for e in lay.episodes), "episodes": 0, "frames": 0, "skipped": {},
            "unused_features": sorted(k for k in lay.features if k not in used)}
    by_file: dict[Path, list[EpisodeRef]] = {}
    for e in lay.episodes:
        by_file.setdefault(e.data_file, []).append(e)
    for path, eps in by_file.items():
        imp.data_file(lay, path, eps, drep)
    return drep


def format_import_report(rep: dict) -> str:
    lines = []
    for d in rep["datasets"]:
        lines.append(f"{d['path']} ({d['version']}, {d['fps']:g} fps): {d['episodes']}/{d['episodes_in']} episodes, "
                     f"{d['frames']}/{d['frames_in']} frames")
        lines += [f"  skipped {k}: {why}" for k, why in d["skipped"].items()]
        if d["unused_features"]:
            lines.append(f"  not imported (not in the key map): {d['unused_features']}")
    t = rep["totals"]
    lines.append(f"total: {t['episodes']}/{t['episodes_in']} episodes, {t['frames']}/{t['frames_in']} frames -> "
                 f"{rep['output']} in {t['elapsed_s']} s ({t['frames_per_s']} frames/s), {t['skipped']} skipped")
    return "\n".join(lines)
