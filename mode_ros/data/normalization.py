"""Per-dimension normalisation of actions and proprioceptive state to about [-1, 1].

``mode="minmax"`` maps [min, max] -> [-1, 1]; ``mode="quantile"`` maps [q01, q99] -> [-1, 1]
(robust to outliers; values beyond the quantiles land slightly outside [-1, 1] unless ``clip``).
A constant dimension (range below ``eps``) maps to 0 and back to its constant value, never
dividing by zero. Works on NumPy arrays and torch tensors (any device), over the last axis.

JSON layout (``normalization.json`` in a checkpoint)::

    {"action": {"kind": "action", "mode": "minmax", "clip": false, "names": [...],
                "stats": {"min": [...], "max": [...], "q01": [...], "q99": [...],
                          "mean": [...], "std": [...], "count": N}},
     "state":  {...} | null}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Stats", "compute_stats", "Normalizer", "ActionNormalizer", "StateNormalizer",
           "save_normalization", "load_normalization", "NormalizationError", "load_checkpoint_normalization"]

MODES = ("minmax", "quantile")


@dataclass
class Stats:
    """Per-dimension statistics of a [N, D] array."""
    min: list[float]
    max: list[float]
    q01: list[float]
    q99: list[float]
    mean: list[float]
    std: list[float]
    count: int = 0

    @property
    def dim(self) -> int:
        return len(self.min)

    def to_dict(self) -> dict:
        return {"min": self.min, "max": self.max, "q01": self.q01, "q99": self.q99,
                "mean": self.mean, "std": self.std, "count": int(self.count)}

    @classmethod
    def from_dict(cls, d: dict) -> "Stats":
        keys = ("min", "max", "q01", "q99", "mean", "std")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"normalisation stats lack keys {missing}")
        dims = {k: len(d[k]) for k in keys}
        if len(set(dims.values())) != 1:
            raise ValueError(f"normalisation stats have inconsistent lengths {dims}")
        return cls(**{k: [float(x) for x in d[k]] for k in keys}, count=int(d.get("count", 0)))


def compute_stats(arrays: np.ndarray | Iterable[np.ndarray]) -> Stats:
    """Stats over rows of one [N, D] array or of several [T_i, D] arrays (e.g. all episodes)."""
    if isinstance(arrays, np.ndarray):
        x = arrays
    else:
        parts = [np.asarray(a, np.float64) for a in arrays]
        if not parts:
            raise ValueError("compute_stats: no data")
        x = np.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=0)
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] == 0:
        raise ValueError("compute_stats: no rows")
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.all(np.isfinite(x), axis=0)).tolist()
        raise ValueError(f"compute_stats: non-finite values in dimensions {bad}")
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    return Stats(min=x.min(0).tolist(), max=x.max(0).tolist(), q01=q01.tolist(), q99=q99.tolist(),
                 mean=x.mean(0).tolist(), std=x.std(0).tolist(), count=int(x.shape[0]))


@dataclass
class Normalizer:
    stats: Stats
    mode: str = "minmax"
    clip: bool = False
    names: list[str] = field(default_factory=list)
    eps: float = 1e-6
    kind: str = "generic"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"normalisation mode must be one of {MODES}, got {self.mode!r}")
        if self.names and len(self.names) != self.stats.dim:
            raise ValueError(f"{len(self.names)} names for {self.stats.dim} dimensions")
        lo, hi = (self.stats.min, self.stats.max) if self.mode == "minmax" else (self.stats.q01, self.stats.q99)
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        # quantile mode: a dimension whose 1–99 % range is flat but whose values are not (a gripper that
        # closes in under 1 % of the rows) takes its min/max range instead of being treated as constant
        mlo, mhi = np.asarray(self.stats.min, np.float64), np.asarray(self.stats.max, np.float64)
        narrow = (hi - lo) / 2.0 < self.eps
        lo, hi = np.where(narrow, mlo, lo), np.where(narrow, mhi, hi)
        half = (hi - lo) / 2.0
        self.constant = half < self.eps                    # bool [D]
        self.center = np.where(self.constant, np.asarray(self.stats.mean), (hi + lo) / 2.0)
        self.scale = np.where(self.constant, 1.0, half)    # never zero
        self._torch_cache = {}

    @classmethod
    def fit(cls, data, mode: str = "minmax", clip: bool = False, names: Sequence[str] = ()) -> "Normalizer":
        return cls(compute_stats(data), mode=mode, clip=clip, names=list(names))

    @property
    def dim(self) -> int:
        return self.stats.dim

    def _params(self, x):
        if isinstance(x, np.ndarray) or np.isscalar(x):
            return self.center, self.scale, self.constant
        import torch

        key = (x.device, x.dtype)
        if key not in self._torch_cache:
            dt = x.dtype if x.is_floating_point() else torch.float32
            self._torch_cache[key] = tuple(torch.as_tensor(a, dtype=dt if a.dtype != bool else torch.bool,
                                                           device=x.device)
                                           for a in (self.center, self.scale, self.constant))
        return self._torch_cache[key]

    def _check(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.kind} normaliser expects last dim {self.dim}, got shape {tuple(x.shape)}")

    def normalize(self, x):
        """Robot units -> about [-1, 1] (constant dims -> 0)."""
        is_np = not type(x).__module__.startswith("torch")
        if is_np:
            x = np.asarray(x, np.float32)
        self._check(x)
        c, s, const = self._params(x)
        y = (x - c) / s
        if is_np:
            y = np.where(const, 0.0, y).astype(np.float32)
            return np.clip(y, -1.0, 1.0) if self.clip else y
        y = y.masked_fill(const, 0.0)
        return y.clamp(-1.0, 1.0) if self.clip else y

    def denormalize(self, y):
        """About [-1, 1] -> robot units (constant dims -> their constant value)."""
        is_np = not type(y).__module__.startswith("torch")
        if is_np:
            y = np.asarray(y, np.float32)
        self._check(y)
        c, s, const = self._params(y)
        x = y * s + c
        if is_np:
            return np.where(const, c, x).astype(np.float32)
        return x.where(~const, c.expand_as(x))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "mode": self.mode, "clip": bool(self.clip), "names": list(self.names),
                "eps": self.eps, "stats": self.stats.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        unknown = set(d) - {"kind", "mode", "clip", "names", "eps", "stats"}
        if unknown:
            raise ValueError(f"unknown normaliser keys {sorted(unknown)}")
        return cls(Stats.from_dict(d["stats"]), mode=d.get("mode", "minmax"), clip=bool(d.get("clip", False)),
                   names=list(d.get("names", [])), eps=float(d.get("eps", 1e-6)))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Normalizer":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class ActionNormalizer(Normalizer):
    kind: str = "action"


@dataclass
class StateNormalizer(Normalizer):
    kind: str = "state"


def save_normalization(path: str | os.PathLike, action: Normalizer, state: Normalizer | None = None) -> None:
    """Write ``{"action": ..., "state": ...}`` (the checkpoint's normalization.json), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"action": action.to_dict(), "state": state.to_dict() if state else None}, indent=1))
    os.replace(tmp, path)


def load_normalization(path: str | os.PathLike) -> tuple[ActionNormalizer, StateNormalizer | None]:
    d = json.loads(Path(path).read_text())
    if "action" not in d:
        raise ValueError(f"{path}: no 'action' entry")
    act = ActionNormalizer.from_dict(d["action"])
    st = StateNormalizer.from_dict(d["state"]) if d.get("state") else None
    return act, st


class NormalizationError(ValueError):
    """A checkpoint's normalisation file is missing or invalid; the message names the file and key."""


def _check_affine(entry, dim: int, where: str) -> None:
    if not isinstance(entry, dict):
        raise NormalizationError(f"{where}: expected a mapping with offset and scale, got {type(entry).__name__}")
    for key in ("offset", "scale") + (("constant",) if "constant" in entry else ()):
        vals = entry.get(key)
        if not isinstance(vals, list):
            raise NormalizationError(f"{where}.{key}: missing or not a list")
        if len(vals) != dim:
            raise NormalizationError(f"{where}.{key}: has {len(vals)} values, the model needs {dim}")
        if key == "constant":
            continue
        try:
            arr = np.asarray(vals, np.float64)
        except (TypeError, ValueError):
            raise NormalizationError(f"{where}.{key}: not a list of numbers") from None
        bad = np.flatnonzero(~np.isfinite(arr)).tolist()
        if bad:
            raise NormalizationError(f"{where}.{key}: non-finite value(s) in dimension(s) {bad}")
        if key == "scale" and np.any(arr <= 0):
            raise NormalizationError(f"{where}.scale: must be > 0, dimension(s) "
                                     f"{np.flatnonzero(arr <= 0).tolist()} are not")


def load_checkpoint_normalization(path: str | os.PathLike, action_dim: int, state_dim: int) -> dict:
    """Read and validate a checkpoint's ``normalization.json`` (affine ``offset``/``scale`` per key):
    ``action`` always, ``state`` when ``state_dim > 0``; every value finite, every scale > 0, lengths
    equal to the model's dims. Returns ``{"action": {...}, "state": {...} | None}``; anything else
    raises :class:`NormalizationError` naming the file and the key (a checkpoint without its
    statistics would otherwise run in normalised units as if they were robot units)."""
    path = Path(path)
    if not path.is_file():
        raise NormalizationError(f"{path}: missing (the checkpoint's action/state statistics; without them "
                                 "actions would be published in normalised units)")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NormalizationError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise NormalizationError(f"{path}: expected a mapping with 'action' (and 'state'), got {type(d).__name__}")
    if d.get("action") is None:
        raise NormalizationError(f"{path}: key 'action' missing")
    _check_affine(d["action"], action_dim, f"{path}: action")
    if state_dim > 0:
        if d.get("state") is None:
            raise NormalizationError(f"{path}: key 'state' missing (the model takes a state of {state_dim} values)")
        _check_affine(d["state"], state_dim, f"{path}: state")
    elif d.get("state") is not None:
        raise NormalizationError(f"{path}: key 'state' given but the model takes no state (state_dim 0)")
    return {"action": d["action"], "state": d.get("state") if state_dim > 0 else None}
