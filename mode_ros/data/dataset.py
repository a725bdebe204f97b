"""Training windows: 1 observation + ``chunk_size`` future actions (MODE_SPEC §6), and the DrQ-v2
random-shift augmentation (§5.3).

A window starting at frame t of an episode holds
  * ``images``: camera -> uint8 [3, h, w] (resized to the configured size, antialiased),
  * ``actions``: float32 [chunk_size, A], normalised, actions t .. t+chunk_size-1; past the end of
    the episode (or of a contiguous run, when converted bag ticks were dropped and the timestamps
    jump) the last action is repeated, and ``action_mask`` (bool [chunk_size]) is False there,
  * ``state`` (optional): float32 [S], normalised, the chosen state keys concatenated,
  * ``instruction`` (str) and ``goal_index`` (int64) into ``dataset.instructions`` (sorted unique
    instructions, so the trainer can embed each one once).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .episodes import EpisodeReader
from .normalization import ActionNormalizer, StateNormalizer, compute_stats

__all__ = ["EpisodeWindowDataset", "random_shift", "resize_uint8", "contiguous_run_ends"]


def resize_uint8(img_chw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [C,H,W] or [N,C,H,W] -> uint8 resized to ``size`` (bilinear, antialiased); no-op if equal."""
    if tuple(img_chw.shape[-2:]) == tuple(size):
        return img_chw
    squeeze = img_chw.dim() == 3
    x = img_chw[None] if squeeze else img_chw
    y = F.interpolate(x.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y[0] if squeeze else y


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ-v2 random shift: replicate-pad by ``pad`` pixels, then crop back to H×W at a random integer
    offset in [0, 2·pad] per sample (so the content moves by at most ``pad`` pixels in each axis).

    ``images``: [N, C, H, W] (or [C, H, W]) uint8 or float, on any device; returns the same shape,
    dtype and device. Implemented as two index gathers with clamped indices (identical to replicate
    padding followed by the crop, exact integer shift, no interpolation).
    """
    if pad <= 0:
        return images
    squeeze = images.dim() == 3
    x = images[None] if squeeze else images
    if x.dim() != 4:
        raise ValueError(f"random_shift expects [N,C,H,W] or [C,H,W], got shape {tuple(images.shape)}")
    n, c, h, w = x.shape
    dev = x.device
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator,
                           device=generator.device if generator is not None else dev).to(dev)
    rows = (torch.arange(h, device=dev)[None, :] + shifts[:, :1] - pad).clamp_(0, h - 1)  # [N, H]
    cols = (torch.arange(w, device=dev)[None, :] + shifts[:, 1:] - pad).clamp_(0, w - 1)  # [N, W]
    y = torch.gather(x, 2, rows[:, None, :, None].expand(n, c, h, w))
    y = torch.gather(y, 3, cols[:, None, None, :].expand(n, c, h, w))
    return y[0] if squeeze else y


def contiguous_run_ends(timestamps: np.ndarray | None, length: int, control_rate_hz: float) -> np.ndarray:
    """For each frame, the index of the last frame of its contiguous run: frames are contiguous when
    consecutive timestamps differ by < 1.5 control periods (all one run without timestamps/rate)."""
    ends = np.full(length, length - 1, dtype=np.int64)
    if timestamps is None or not control_rate_hz or length < 2:
        return ends
    gaps = np.flatnonzero(np.diff(timestamps) > 1.5 / control_rate_hz)  # frame i is last before a gap
    if gaps.size == 0:
        return ends
    starts = np.concatenate([[0], gaps + 1])
    stops = np.concatenate([gaps, [length - 1]])
    for s, e in zip(starts, stops):
        ends[s:e + 1] = e
    return ends


def _size_map(camera_names: Sequence[str], image_size) -> dict[str, tuple[int, int] | None]:
    if image_size is None:
        return {c: None for c in camera_names}
    if isinstance(image_size, Mapping):
        unknown = set(image_size) - set(camera_names)
        if unknown:
            raise ValueError(f"image_size names unknown cameras {sorted(unknown)} (cameras: {list(camera_names)})")
        return {c: _hw(image_size.get(c)) for c in camera_names}
    return {c: _hw(image_size) for c in camera_names}


def _hw(v) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"image size must be an int or [height, width], got {v}")
    return v


class EpisodeWindowDataset(torch.utils.data.Dataset):
    """Windows over one or more episode files (our layout, see :mod:`mode_ros.data.episodes`).

    Args:
        paths: one path or a list of HDF5 episode files (same cameras and action dim).
        camera_names: cameras to return, in model order (default: the file's order).
        image_size: int, (h, w), a dict camera -> size, or None (native size).
        chunk_size: future actions per window (10).
        state_keys: obs keys concatenated into ``state`` (default none).
        action_normalizer / state_normalizer: given (e.g. from a checkpoint) or fitted on this data
            with ``normalization`` ("minmax" | "quantile").
        instructions: fix the goal-index order (e.g. a checkpoint's list); new instructions are
            appended, sorted.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 camera_names: Sequence[str] | None = None, image_size=224, chunk_size: int = 10,
                 state_keys: Sequence[str] = (), action_normalizer: ActionNormalizer | None = None,
                 state_normalizer: StateNormalizer | None = None, normalization: str = "minmax",
                 instructions: Sequence[str] | None = None):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.readers = [EpisodeReader(p) for p in paths]
        r0 = self.readers[0]
        self.camera_names = list(camera_names) if camera_names else list(r0.camera_names)
        for r in self.readers:
            missing = [c for c in self.camera_names if c not in r.camera_names]
            if missing:
                raise ValueError(f"{r.path}: cameras {missing} not in file (has {r.camera_names})")
            if r.action_dim != r0.action_dim:
                raise ValueError(f"{r.path}: action dim {r.action_dim} != {r0.action_dim} of {r0.path}")
        self.image_sizes = _size_map(self.camera_names, image_size)
        self.chunk_size = int(chunk_size)
        self.state_keys = list(state_keys)
        self.action_dim = r0.action_dim
        self.action_names = list(r0.action_names)

        # small per-episode arrays live in memory; images stay on disk
        self._episodes = []  # (reader index, episode name, actions, state|None, run_ends, goal)
        langs = []
        for ri, r in enumerate(self.readers):
            for ep in r:
                st = None
                if self.state_keys:
                    missing = [k for k in self.state_keys if not ep.has_obs(k)]
                    if missing:
                        raise ValueError(f"{r.path}:{ep.name}: state keys {missing} not found")
                    st = np.concatenate([ep.state(k) for k in self.state_keys], axis=1)
                lang = ep.language
                langs.append(lang)
                ends = contiguous_run_ends(ep.timestamps, ep.length, r.control_rate_hz)
                self._episodes.append((ri, ep.name, ep.actions, st, ends, lang))
        known = list(instructions or [])
        self.instructions = known + sorted(set(langs) - set(known))
        goal_of = {s: i for i, s in enumerate(self.instructions)}
        self._goal = [goal_of[e[5]] for e in self._episodes]
        self.state_dim = int(self._episodes[0][3].shape[1]) if self.state_keys else 0
        self.state_names = self._state_names()

        if action_normalizer is None:
            action_normalizer = ActionNormalizer(compute_stats([e[2] for e in self._episodes]),
                                                 mode=normalization, names=self.action_names)
        if action_normalizer.dim != self.action_dim:
            raise ValueError(f"action normaliser has {action_normalizer.dim} dims, data has {self.action_dim}")
        self.action_normalizer = action_normalizer
        if self.state_keys and state_normalizer is None:
            state_normalizer = StateNormalizer(compute_stats([e[3] for e in self._episodes]), mode=normalization)
        if state_normalizer is not None and self.state_keys and state_normalizer.dim != self.state_dim:
            raise ValueError(f"state normaliser has {state_normalizer.dim} dims, data has {self.state_dim}")
        self.state_normalizer = state_normalizer if self.state_keys else None
        # normalise once
        self._norm_actions = [self.action_normalizer.normalize(e[2]) for e in self._episodes]
        self._norm_states = [self.state_normalizer.normalize(e[3]) if e[3] is not None else None
                             for e in self._episodes]
        lengths = np.array([len(e[2]) for e in self._episodes], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])

    def _state_names(self) -> list[str]:
        """The state's value names, in order (the files' ``state_names`` of each state key), or [] when
        a file does not name them all. Files that name one key differently are refused: their values
        would be mixed up under one normalisation."""
        out: list[str] = []
        for k in self.state_keys:
            known = [(r.path, list(r.state_names.get(k) or [])) for r in self.readers]
            named = [(p, n) for p, n in known if n]
            for p, n in named[1:]:
                if n != named[0][1]:
                    raise ValueError(f"state key {k!r}: {p} names its values {n}, {named[0][0]} names them "
                                     f"{named[0][1]}")
            if len(named) != len(known):
                return []
            out += named[0][1]
        return out if len(out) == self.state_dim else []

    def state_action_runs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(states (T, S), actions (T, A)) of every contiguous run of every episode, in robot units (what
        :meth:`mode_ros.model.state_model.StateModel.fit` takes); [] without state keys."""
        runs = []
        for _, _, acts, st, ends, _ in self._episodes:
            start = 0
            while st is not None and start < len(acts):
                end = int(ends[start]) + 1
                runs.append((st[start:end], acts[start:end]))
                start = end
        return runs

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    def locate(self, index: int) -> tuple[int, int]:
        """Window index -> (episode index, frame)."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        e = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return e, int(index - self._offsets[e])

    def __getitem__(self, index: int) -> dict:
        e, t = self.locate(int(index))
        ri, name, _, _, ends, lang = self._episodes[e]
        end = int(ends[t])
        idx = t + np.arange(self.chunk_size)
        mask = idx <= end
        idx = np.minimum(idx, end)
        ep = self.readers[ri].episode(name)
        images = {}
        for cam in self.camera_names:
            img = torch.from_numpy(np.ascontiguousarray(ep.image(cam, t))).permute(2, 0, 1)
            size = self.image_sizes[cam]
            images[cam] = resize_uint8(img, size).contiguous() if size else img.contiguous()
        out = {
            "images": images,
            "actions": torch.from_numpy(self._norm_actions[e][idx]),
            "action_mask": torch.from_numpy(mask),
            "goal_index": torch.tensor(self._goal[e], dtype=torch.int64),
            "instruction": lang,
            "episode": e,
            "frame": t,
        }
        if self._norm_states[e] is not None:
            out["state"] = torch.from_numpy(self._norm_states[e][t])
        return out
