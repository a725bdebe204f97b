"""Safety gates on actions before they leave the node (ROS-free, shared with replay).

Order per chunk: reject if any value is non-finite (the whole chunk: a model that produced NaN is not
trusted), clip to per-dimension bounds, then limit the change between consecutive actions: row 0
relative to the action executed at the previous tick, row j relative to row j-1. Rate limiting moves
toward in-bound targets from an in-bound start, so the result stays within the bounds.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["ActionSafety", "NonFiniteActionError", "as_bounds"]


class NonFiniteActionError(ValueError):
    """The model output contains NaN or Inf."""


def as_bounds(values: Sequence[float] | None, n: int, fill: float, name: str) -> np.ndarray:
    """A per-dimension vector: None/empty -> ``fill``; length 1 -> broadcast; else exactly n values."""
    if values is None or len(values) == 0:
        return np.full(n, fill, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 1:
        return np.full(n, v[0])
    if v.size != n:
        raise ValueError(f"{name}: has {v.size} values, need 1 or {n}")
    return v


class ActionSafety:
    def __init__(self, action_dim: int, lower: Sequence[float] | None = None,
                 upper: Sequence[float] | None = None, max_delta: Sequence[float] | None = None):
        self.action_dim = int(action_dim)
        self.lower = as_bounds(lower, self.action_dim, -np.inf, "action_lower_bounds")
        self.upper = as_bounds(upper, self.action_dim, np.inf, "action_upper_bounds")
        self.max_delta = as_bounds(max_delta, self.action_dim, np.inf, "max_action_delta")
        if np.isnan(self.lower).any() or np.isnan(self.upper).any() or np.isnan(self.max_delta).any():
            raise ValueError("bounds and max_action_delta must not contain NaN")
        if (self.lower > self.upper).any():
            raise ValueError(f"lower bound > upper bound in dimension(s) {np.nonzero(self.lower > self.upper)[0].tolist()}")
        if (self.max_delta <= 0).any():
            raise ValueError("max_action_delta must be > 0 (inf = no limit)")
        self.rate_limited = bool(np.isfinite(self.max_delta).any())
        self.last: np.ndarray | None = None  # action executed at the previous tick

    def reset(self) -> None:
        """Forget the previous action: the rate limit restarts from the first new action. The node does
        this on activation and when disabled (~/enable false: the operator took over); a tick that
        publishes nothing (stale input, no goal) keeps it, so the first action after such a gap is
        limited relative to the last one the robot received."""
        self.last = None

    @staticmethod
    def check_finite(actions: np.ndarray) -> None:
        a = np.asarray(actions)
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise NonFiniteActionError(f"model output has {bad} non-finite value(s)")

    def apply(self, rows: np.ndarray, commit: bool = True) -> np.ndarray:
        """Clip + rate-limit ``rows`` [n, A]; returns float32. ``commit``: remember row 0 as executed."""
        a = np.asarray(rows, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.action_dim or a.shape[0] == 0:
            raise ValueError(f"actions must have shape [n>0, {self.action_dim}], got {a.shape}")
        self.check_finite(a)
        a = np.clip(a, self.lower, self.upper)
        if self.rate_limited:
            prev = self.last
            for i in range(a.shape[0]):
                if prev is not None:
                    a[i] = np.clip(a[i], prev - self.max_delta, prev + self.max_delta)
                prev = a[i]
            a = np.clip(a, self.lower, self.upper)  # no-op unless the previous action was out of bounds
        out = a.astype(np.float32)
        # float32 rounding may step just outside a bound: pull back in float32 space
        lo, hi = self.lower.astype(np.float32), self.upper.astype(np.float32)
        out = np.minimum(np.maximum(out, lo), hi)
        self.check_finite(out)
        if commit:
            self.last = out[0].astype(np.float64)
        return out


def output_gate(enabled: bool, goal: str, camera_stamps: dict, state_stamp: float | None, needs_state: bool,
                now: float, max_age: float) -> tuple[str, str] | None:
    """Why no action may be published at time ``now``: (reason key, message), or None.
    ``camera_stamps``: camera -> newest image stamp (None before the first image). Shared by the
    policy node and offline replay so both gate ticks identically."""
    if not enabled:
        return "disabled", "disabled (call ~/enable with data: true)"
    if not goal:
        return "no_goal", "no goal (publish one on ~/goal)"
    for cam, t in camera_stamps.items():
        if t is None:
            return "no_image", f"no image from camera {cam!r} yet"
        if now - t > max_age:
            return "stale", (f"camera {cam!r} is stale: last image {now - t:.3f} s old "
                             f"> max_observation_age {max_age:g} s")
    if needs_state:
        if state_stamp is None:
            return "no_state", "no joint_states yet"
        if now - state_stamp > max_age:
            return "stale", f"joint_states stale ({now - state_stamp:.3f} s old)"
    return None
