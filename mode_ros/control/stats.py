"""Small statistics and log helpers for the node's diagnostics (ROS-free)."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Callable

import numpy as np

__all__ = ["WindowStats", "RateMeter", "RateLimitedLog", "Counters"]


class WindowStats:
    """The last ``window`` values (e.g. inference latencies in seconds) with median / percentiles."""

    def __init__(self, window: int = 200):
        self._v: deque[float] = deque(maxlen=max(1, int(window)))
        self._lock = threading.Lock()
        self.count = 0

    def add(self, x: float) -> None:
        with self._lock:
            self._v.append(float(x))
            self.count += 1

    def values(self) -> np.ndarray:
        with self._lock:
            return np.array(self._v, dtype=np.float64)

    def percentile(self, q: float) -> float:
        v = self.values()
        return float(np.percentile(v, q)) if v.size else float("nan")

    def median(self) -> float:
        return self.percentile(50.0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._v)


class RateMeter:
    """Achieved rate and period jitter from the times of the last ``window`` events."""

    def __init__(self, window: int = 200):
        self._t: deque[float] = deque(maxlen=max(2, int(window)))
        self._lock = threading.Lock()

    def tick(self, t: float) -> None:
        with self._lock:
            self._t.append(float(t))

    def reset(self) -> None:
        with self._lock:
            self._t.clear()

    def periods(self) -> np.ndarray:
        with self._lock:
            t = np.array(self._t, dtype=np.float64)
        return np.diff(t) if t.size > 1 else np.zeros(0)

    def rate(self) -> float:
        with self._lock:
            if len(self._t) < 2 or self._t[-1] <= self._t[0]:
                return 0.0
            return (len(self._t) - 1) / (self._t[-1] - self._t[0])

    def jitter(self) -> float:
        """Standard deviation of the period (seconds)."""
        p = self.periods()
        return float(p.std()) if p.size > 1 else 0.0


class RateLimitedLog:
    """At most one message per key per ``period`` seconds; reports how many were suppressed."""

    def __init__(self, period: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.period = float(period)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, key: str, emit: Callable[[str], None], message: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period:
                self._suppressed[key] += 1
                return False
            n = self._suppressed.pop(key, 0)
            self._last[key] = now
        emit(message + (f" ({n} similar suppressed)" if n else ""))
        return True


class Counters:
    """Thread-safe named counters."""

    def __init__(self):
        self._c: Counter = Counter()
        self._lock = threading.Lock()

    def inc(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def get(self, key: str) -> int:
        with self._lock:
            return self._c[key]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)

    def total(self, prefix: str) -> int:
        with self._lock:
            return sum(v for k, v in self._c.items() if k.startswith(prefix))
