"""The one on-disk episode format: robomimic/LIBERO-style HDF5 (see docs/DATA.md).

::

    data/                                attrs: camera_names, action_names, state_keys, control_rate_hz,
                                                source, total, format ("mode_ros.episodes/1")
    data/demo_N/                         attrs: language_instruction, num_samples, (free attrs)
    data/demo_N/actions                  float32 [T, A]
    data/demo_N/timestamps               float64 [T]  seconds (control-clock ticks)
    data/demo_N/obs/<camera>             uint8   [T, H, W, 3]  RGB, chunks (1, H, W, 3), gzip
    data/demo_N/obs/<state_key>          float32 [T, S]

Reading is lazy: :class:`EpisodeReader` opens the file once; :meth:`Episode.image` reads one
chunk (= one frame) of one camera. LIBERO/robomimic files without our attrs can be read too
(cameras = 4-D uint8 obs keys, language from ``problem_info``), though ``mode-ros convert hdf5``
is the supported path for those.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["FORMAT", "EpisodeWriter", "EpisodeBuilder", "EpisodeReader", "Episode", "demo_sort_key"]

FORMAT = "mode_ros.episodes/1"


def demo_sort_key(name: str):
    """demo_2 < demo_10 (numeric order, as robomimic does)."""
    m = re.search(r"(\d+)$", name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def _str_list(values: Iterable[str]) -> np.ndarray:
    import h5py

    return np.array([str(v) for v in values], dtype=h5py.string_dtype())


def _read_str_list(attr) -> list[str]:
    if attr is None:
        return []
    if isinstance(attr, (str, bytes)):
        s = attr.decode() if isinstance(attr, bytes) else attr
        try:  # JSON list stored as a string
            v = json.loads(s)
            if isinstance(v, list):
                return [str(x) for x in v]
        except ValueError:
            pass
        return [s] if s else []
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(attr).reshape(-1)]


def attr_str(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v.item()
        return v.decode() if isinstance(v, bytes) else str(v)
    return str(v)


class _ChunkCompressor:
    """Compresses one-frame chunks with zlib (= HDF5's gzip/deflate filter) on a thread pool (zlib
    releases the GIL) and writes them with ``write_direct_chunk``, in submission order."""

    def __init__(self, level: int, workers: int):
        self.level = level
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="mode_ros_gzip")
        self.pending: deque = deque()
        self.max_pending = 4 * max(1, workers)

    def put(self, ds, rows, image: np.ndarray) -> None:
        img = np.ascontiguousarray(image, dtype=np.uint8)
        if img.shape != ds.shape[1:]:
            raise ValueError(f"frame shape {img.shape} != dataset frame shape {ds.shape[1:]}")
        fut = self.pool.submit(zlib.compress, memoryview(img).cast("B"), self.level)
        self.pending.append((ds, rows, fut, img))
        while len(self.pending) > self.max_pending:
            self._write_one()

    def _write_one(self) -> None:
        ds, rows, fut, _img = self.pending.popleft()
        data = fut.result()
        zeros = (0,) * (len(ds.shape) - 1)
        for r in rows:
            ds.id.write_direct_chunk((int(r),) + zeros, data)

    def flush(self) -> None:
        while self.pending:
            self._write_one()

    def close(self) -> None:
        self.flush()
        self.pool.shutdown()


class EpisodeBuilder:
    """Streams one episode into the file: datasets are created with a known maximum length and
    filled frame by frame (:meth:`set_image`), then :meth:`finish` trims them to the kept length."""

    def __init__(self, writer: "EpisodeWriter", name: str, length: int,
                 image_shapes: Mapping[str, tuple[int, int]], action_dim: int,
                 state_dims: Mapping[str, int] | None = None):
        self.writer, self.name, self.length = writer, name, int(length)
        g = writer._data.create_group(name)
        self.group = g
        obs = g.create_group("obs")
        self._images = {}
        for cam, (h, w) in image_shapes.items():
            self._images[cam] = obs.create_dataset(
                cam, shape=(self.length, h, w, 3), maxshape=(None, h, w, 3), dtype=np.uint8,
                chunks=(1, h, w, 3), **writer._compression)
        self._actions = g.create_dataset("actions", shape=(self.length, action_dim),
                                         maxshape=(None, action_dim), dtype=np.float32)
        self._timestamps = g.create_dataset("timestamps", shape=(self.length,), maxshape=(None,),
                                            dtype=np.float64)
        self._states = {k: obs.create_dataset(k, shape=(self.length, d), maxshape=(None, d), dtype=np.float32)
                        for k, d in (state_dims or {}).items()}

    def set_image(self, camera: str, index, image: np.ndarray) -> None:
        """Write one frame (or the same frame at several indices: pass a list/array of indices).
        With gzip the frame is compressed once on the writer's thread pool (call :meth:`flush` or
        :meth:`finish` before reading it back)."""
        ds = self._images[camera]
        comp = self.writer._compressor
        if comp is not None:
            comp.put(ds, np.atleast_1d(np.asarray(index)).reshape(-1), image)
            return
        if np.ndim(index) == 0:
            ds[int(index)] = image
        else:
            for i in np.asarray(index).reshape(-1):
                ds[int(i)] = image

    def flush(self) -> None:
        if self.writer._compressor is not None:
            self.writer._compressor.flush()

    def get_image(self, camera: str, index: int) -> np.ndarray:
        self.flush()
        return self._images[camera][int(index)]

    def set_arrays(self, actions: np.ndarray, timestamps: np.ndarray,
                   states: Mapping[str, np.ndarray] | None = None) -> None:
        self._actions[:] = np.asarray(actions, np.float32)
        self._timestamps[:] = np.asarray(timestamps, np.float64)
        for k, v in (states or {}).items():
            self._states[k][:] = np.asarray(v, np.float32)

    def discard(self) -> None:
        """Remove the partly written episode (its number is reused when it was the last one)."""
        self.flush()
        del self.writer._data[self.name]
        if self.writer._next == int(self.name.rsplit("_", 1)[1]) + 1:
            self.writer._next -= 1

    def finish(self, language: str, keep: np.ndarray | None = None, attrs: Mapping | None = None) -> str:
        """Close the episode. ``keep`` (bool [length]) removes frames (e.g. ticks whose image turned
        out undecodable) by compacting the datasets in place."""
        self.flush()
        n = self.length
        if keep is not None:
            keep = np.asarray(keep, bool)
            idx = np.flatnonzero(keep)
            if idx.size != n:
                for ds in [self._actions, self._timestamps, *self._states.values()]:
                    vals = ds[:]
                    ds[: idx.size] = vals[idx]
                for ds in self._images.values():
                    for j, i in enumerate(idx):
                        if j != i:
                            ds[j] = ds[int(i)]
                n = int(idx.size)
                for ds in [self._actions, self._timestamps, *self._states.values(), *self._images.values()]:
                    ds.resize(n, axis=0)
        g = self.group
        g.attrs["language_instruction"] = str(language)
        g.attrs["num_samples"] = n
        for k, v in (attrs or {}).items():
            g.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
        self.length = n
        self.writer._total += n
        self.writer._data.attrs["total"] = self.writer._total
        return self.name


class EpisodeWriter:
    """Writes episodes in our HDF5 layout. Use as a context manager.

    ``mode="w"`` creates (fails if the file exists unless ``overwrite``); ``mode="a"`` appends
    episodes to an existing file with the same cameras/action names.
    """

    def __init__(self, path: str | os.PathLike, camera_names: Sequence[str], action_names: Sequence[str] = (),
                 *, control_rate_hz: float | None = None, source: str = "", state_keys: Sequence[str] = (),
                 state_names: Mapping[str, Sequence[str]] | None = None, mode: str = "w",
                 overwrite: bool = False, compression: str | None = "gzip", compression_opts: int | None = 4,
                 threads: int | None = None):
        import h5py

        self.path = Path(path)
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        if mode == "w" and self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists (pass overwrite=True / --overwrite)")
        self._compression = {}
        if compression:
            self._compression["compression"] = compression
            if compression == "gzip" and compression_opts is not None:
                self._compression["compression_opts"] = int(compression_opts)
        self._compressor = None
        if compression == "gzip":
            level = 4 if compression_opts is None else int(compression_opts)
            self._compressor = _ChunkCompressor(level, threads or min(8, os.cpu_count() or 1))
        self._file = h5py.File(self.path, "w" if mode == "w" else "a")
        data = self._file.require_group("data")
        self._data = data
        if mode == "w" or "camera_names" not in data.attrs:
            data.attrs["format"] = FORMAT
            data.attrs["camera_names"] = _str_list(camera_names)
            data.attrs["action_names"] = _str_list(action_names)
            data.attrs["state_keys"] = _str_list(state_keys)
            data.attrs["state_names"] = json.dumps({k: list(v) for k, v in (state_names or {}).items()})
            data.attrs["control_rate_hz"] = float(control_rate_hz) if control_rate_hz else 0.0
            data.attrs["source"] = str(source)
            data.attrs["total"] = 0
        else:
            have = _read_str_list(data.attrs.get("camera_names"))
            if have != list(camera_names):
                raise ValueError(f"{self.path}: appending cameras {list(camera_names)} to a file with {have}")
        self.camera_names = list(camera_names)
        self._total = int(data.attrs.get("total", 0))
        existing = [demo_sort_key(k)[1] for k in data.keys() if demo_sort_key(k)[0] == 0]
        self._next = (max(existing) + 1) if existing else 0

    def attr(self, key: str, default=None):
        """A file-level attribute as stored (``set_attr`` writes them)."""
        return self._data.attrs.get(key, default)

    def set_attr(self, key: str, value) -> None:
        self._data.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value

    def begin_episode(self, length: int, image_shapes: Mapping[str, tuple[int, int]], action_dim: int,
                      state_dims: Mapping[str, int] | None = None) -> EpisodeBuilder:
        missing = [c for c in self.camera_names if c not in image_shapes]
        if missing:
            raise ValueError(f"episode lacks cameras {missing}")
        name = f"demo_{self._next}"
        self._next += 1
        return EpisodeBuilder(self, name, length, {c: tuple(image_shapes[c]) for c in self.camera_names},
                              action_dim, state_dims)

    def add_episode(self, actions: np.ndarray, images: Mapping[str, np.ndarray], language: str,
                    timestamps: np.ndarray | None = None, states: Mapping[str, np.ndarray] | None = None,
                    attrs: Mapping | None = None) -> str:
        """Write a whole in-memory episode (images: camera -> uint8 [T,H,W,3])."""
        actions = np.asarray(actions, np.float32)
        if actions.ndim != 2:
            raise ValueError(f"actions must be [T, A], got shape {actions.shape}")
        T = actions.shape[0]
        shapes = {}
        for cam in self.camera_names:
            if cam not in images:
                raise ValueError(f"episode lacks camera {cam!r}")
            im = np.asarray(images[cam])
            if im.dtype != np.uint8 or im.ndim != 4 or im.shape[0] != T or im.shape[3] != 3:
                raise ValueError(f"camera {cam!r}: expected uint8 [{T},H,W,3], got {im.dtype} {im.shape}")
            shapes[cam] = im.shape[1:3]
        if timestamps is None:
            rate = float(self._data.attrs.get("control_rate_hz", 0.0)) or 1.0
            timestamps = np.arange(T, dtype=np.float64) / rate
        states = dict(states or {})
        b = self.begin_episode(T, shapes, actions.shape[1], {k: np.asarray(v).shape[1] for k, v in states.items()})
        b.set_arrays(actions, timestamps, states)
        for cam in self.camera_names:
            for t, frame in enumerate(np.asarray(images[cam])):
                b.set_image(cam, t, frame)
        return b.finish(language, attrs=attrs)

    def close(self) -> None:
        if self._compressor is not None:
            self._compressor.close()
            self._compressor = None
        if self._file:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Episode:
    """Lazy view on one demo group. Small arrays (actions, timestamps, state) are read on first use;
    images are read frame by frame."""

    def __init__(self, reader: "EpisodeReader", name: str):
        self.reader, self.name = reader, name
        self._g = reader._data[name]
        self.length = int(self._g["actions"].shape[0])
        self._actions = None

    def __len__(self) -> int:
        return self.length

    @property
    def language(self) -> str:
        s = attr_str(self._g.attrs.get("language_instruction"))
        return s or self.reader.default_language

    @property
    def actions(self) -> np.ndarray:
        if self._actions is None:
            self._actions = np.asarray(self._g["actions"][:], np.float32)
        return self._actions

    @property
    def timestamps(self) -> np.ndarray | None:
        """Seconds, or None when the file has none (LIBERO/robomimic)."""
        return np.asarray(self._g["timestamps"][:], np.float64) if "timestamps" in self._g else None

    def has_obs(self, key: str) -> bool:
        """Whether the episode stores an observation (state vector or camera) under ``key``."""
        return key in self._g["obs"]

    def state(self, key: str) -> np.ndarray:
        return np.asarray(self._g["obs"][key][:], np.float32).reshape(self.length, -1)

    def image(self, camera: str, t: int) -> np.ndarray:
        """One frame HxWx3 uint8 (reads one chunk)."""
        return self._g["obs"][camera][int(t)]

    def images(self, camera: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._g["obs"][camera][start:stop]

    def image_shape(self, camera: str) -> tuple[int, int]:
        return tuple(self._g["obs"][camera].shape[1:3])

    @property
    def attrs(self) -> dict:
        return {k: attr_str(v) if isinstance(v, (bytes, str)) else v for k, v in self._g.attrs.items()}


class EpisodeReader:
    """Read-only access to an episode file. Opens the file lazily (also after a fork, so it is safe
    in DataLoader workers)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"episode file {self.path} does not exist")
        self._file = None
        self._pid = None
        data = self._data
        names = sorted([k for k in data.keys() if "actions" in data[k]], key=demo_sort_key)
        # our writer marks an episode complete (num_samples) in EpisodeBuilder.finish: a group without it
        # in one of our files was cut short (a crash while converting) and is not training data
        ours = "camera_names" in data.attrs
        self.incomplete_episodes = [k for k in names if ours and "num_samples" not in data[k].attrs]
        if self.incomplete_episodes:
            import warnings
            warnings.warn(f"{self.path}: skipping {len(self.incomplete_episodes)} unfinished episode(s) "
                          f"{self.incomplete_episodes[:5]} (the conversion that wrote them did not complete)")
            names = [k for k in names if k not in self.incomplete_episodes]
        if not names:
            raise ValueError(f"{self.path}: no episodes (data/demo_N/actions) found")
        self.episode_names = names
        attrs = data.attrs
        cams = _read_str_list(attrs.get("camera_names"))
        first = data[names[0]]
        obs_keys = list(first["obs"].keys()) if "obs" in first else []
        if not cams:  # a LIBERO/robomimic file: cameras are the 4-D uint8 obs keys
            cams = [k for k in obs_keys if first["obs"][k].ndim == 4 and first["obs"][k].dtype == np.uint8]
        self.camera_names = cams
        self.action_names = _read_str_list(attrs.get("action_names"))
        self.state_keys = _read_str_list(attrs.get("state_keys")) or [
            k for k in obs_keys if k not in cams and first["obs"][k].ndim <= 2]
        try:
            self.state_names = json.loads(attr_str(attrs.get("state_names")) or "{}")
        except ValueError:
            self.state_names = {}
        self.control_rate_hz = float(attrs.get("control_rate_hz", 0.0) or 0.0)
        self.source = attr_str(attrs.get("source"))
        self.action_dim = int(first["actions"].shape[1])
        self.default_language = ""
        pi = attrs.get("problem_info")
        if pi is not None:
            try:
                self.default_language = str(json.loads(attr_str(pi)).get("language_instruction", ""))
            except (ValueError, AttributeError):
                pass

    @property
    def _data(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file["data"]

    def __len__(self) -> int:
        return len(self.episode_names)

    def episode(self, i: int | str) -> Episode:
        name = i if isinstance(i, str) else self.episode_names[i]
        return Episode(self, name)

    def __iter__(self):
        for n in self.episode_names:
            yield self.episode(n)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # picklable for DataLoader workers: reopen in the child
        d = dict(self.__dict__)
        d["_file"] = None
        d["_pid"] = None
        return d
