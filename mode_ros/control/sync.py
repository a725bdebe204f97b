"""Matching images of several cameras into one observation by header stamp (ROS-free)."""
from __future__ import annotations

import bisect
import threading
from collections import deque
from typing import Any, Mapping, Sequence

__all__ = ["match_stamps", "StampBuffer", "has_observation_in"]


def _nearest(sorted_stamps: Sequence[float], t: float) -> int:
    i = bisect.bisect_left(sorted_stamps, t)
    if i == 0:
        return 0
    if i == len(sorted_stamps):
        return i - 1
    return i if sorted_stamps[i] - t < t - sorted_stamps[i - 1] else i - 1


def match_stamps(stamps: Mapping[str, Sequence[float]], tolerance: float,
                 reference: str | None = None) -> dict[str, int] | None:
    """Pick one entry per camera so that all stamps lie within ``tolerance`` of the reference camera's.

    ``stamps``: camera -> stamps in ascending order. Tries the reference camera's newest stamp first
    and goes back in time; returns camera -> index of the newest matching set, or None.
    """
    if not stamps or any(len(s) == 0 for s in stamps.values()):
        return None
    ref = reference if reference is not None else next(iter(stamps))
    ref_stamps = stamps[ref]
    for ri in range(len(ref_stamps) - 1, -1, -1):
        t = ref_stamps[ri]
        out = {ref: ri}
        for cam, s in stamps.items():
            if cam == ref:
                continue
            j = _nearest(s, t)
            if abs(s[j] - t) > tolerance + 1e-9:   # float seconds: exactly `tolerance` apart matches
                break
            out[cam] = j
        else:
            return out
    return None


class StampBuffer:
    """Recent (stamp, payload) entries of one camera, kept sorted by stamp (thread-safe). Each entry
    also remembers when it was received (``recv``, the receiver's clock), so that a control tick whose
    callback ran late can still judge its inputs as they were at its scheduled time."""

    def __init__(self, maxlen: int = 10):
        self._items: deque[tuple[float, Any, float | None]] = deque(maxlen=max(1, int(maxlen)))
        self._lock = threading.Lock()
        self.received = 0

    def add(self, stamp: float, payload: Any, recv: float | None = None, now: float | None = None) -> int:
        """Insert an entry (kept sorted by stamp). With ``now`` (the receiver's clock): an entry stamped
        at or before now supersedes kept entries stamped after now — a frame whose stamp ran ahead of the
        clock (a driver glitch) would otherwise stay "the newest" until the clock caught up with it.
        A camera whose stamps are all ahead (clock skew) is unaffected. Returns how many were dropped."""
        with self._lock:
            self.received += 1
            item = (stamp, payload, recv)
            dropped = 0
            if now is not None and stamp <= now and self._items and self._items[-1][0] > now:
                keep = [it for it in self._items if it[0] <= now]
                dropped = len(self._items) - len(keep)
                self._items.clear()
                self._items.extend(keep)
            if self._items and stamp < self._items[-1][0]:   # out of order: insert sorted
                items = sorted([*self._items, item], key=lambda x: x[0])
                self._items.clear()
                self._items.extend(items[-self._items.maxlen:])
            else:
                self._items.append(item)
            return dropped

    def snapshot(self) -> list[tuple[float, Any]]:
        with self._lock:
            return [(st, pl) for st, pl, _ in self._items]

    def latest_stamp(self, received_by: float | None = None) -> float | None:
        """Newest stamp; with ``received_by``, among the entries received by then (an entry without
        a receive time counts as received; if every kept entry came later, the oldest kept one)."""
        with self._lock:
            if not self._items:
                return None
            if received_by is None:
                return self._items[-1][0]
            for st, _, r in reversed(self._items):
                if r is None or r <= received_by:
                    return st
            return self._items[0][0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def has_observation_in(buffers: Mapping[str, "StampBuffer"], state_stamp: float | None, needs_state: bool,
                       lo: float, hi: float) -> bool:
    """Every camera has a frame, and (when needed) the state is, stamped in ``(lo, hi]`` (lockstep_inference:
    the observation of one tick, ``execution.tick_window``)."""
    if any(not any(lo < st <= hi for st, _ in b.snapshot()) for b in buffers.values()):
        return False
    return not needs_state or (state_stamp is not None and lo < state_stamp <= hi)
