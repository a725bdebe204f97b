"""Execution strategies: how consecutive action chunks are executed, behind one interface.

A strategy makes the :class:`~mode_ros.control.execution.ChunkExecutor` (which row runs at each tick,
when the next chunk is requested, when a new chunk replaces the current one) and says what an
inference request carries besides the observation (:meth:`ExecutionStrategy.prefix`):

* ``open_loop``   — whole chunks, a new one requested so that it is ready when the current one ends;
* ``replan``      — re-plan every ``replan_every`` rows; rows overtaken by the inference latency are
  skipped (``latency_compensation``); the new chunk is planned without knowing what runs meanwhile;
* ``ensemble``    — temporal ensembling (ACT): every chunk is used at once and all chunks covering a
  tick are averaged with weights ``exp(-m * i)``;
* ``rtc_replace`` / ``rtc_guidance`` — real-time chunking: as ``replan``, and the request carries the
  current plan's rows aligned to the new chunk's rows (row j of the new chunk is the slot of its
  observation + j) as a :class:`~mode_ros.model.inpainting.ChunkPrefix` whose ``fixed`` rows ``d`` are
  the rows that will run before the new chunk takes over (estimated from the expected inference
  latency); the sampler inpaints them (replacement at every step, or guidance of the denoised estimate).
"""
from __future__ import annotations

import math

import numpy as np

from mode_ros.control.execution import ChunkExecutor, Plan

__all__ = ["STRATEGIES", "ExecutionStrategy", "OpenLoop", "Replan", "TemporalEnsembling", "RealTimeChunking",
           "make_strategy", "StrategyError", "rows_before"]

STRATEGIES = ("open_loop", "replan", "ensemble", "rtc_replace", "rtc_guidance")
# rtc soft-overlap rows held past the plan's end: 1 met the switch-smoothness and steps targets at d = 5 on
# the bundled MT10 checkpoint (docs/measurements/rtc/ep20); 0 and 2 are measured there too
DEFAULT_HOLD_ROWS = 1
DEFAULT_DECAY = "exp"     # rtc_decay: weights of the overlap rows (mode_ros.model.inpainting.DECAYS)
_EPS = 1e-6


class StrategyError(ValueError):
    """A strategy name or setting that cannot be used (the message names it)."""


class ExecutionStrategy:
    """Base: re-plan every ``replan_every`` rows (0 = the chunk size), no prefix."""
    name = "replan"
    temporal_ensembling = False

    def __init__(self, replan_every: int = 0, latency_compensation: bool = True, ensembling_decay: float = 0.01):
        self.replan_every = int(replan_every)
        self.latency_compensation = bool(latency_compensation)
        self.ensembling_decay = float(ensembling_decay)

    def executor(self, chunk_size: int, action_dim: int, period: float) -> ChunkExecutor:
        return ChunkExecutor(chunk_size, action_dim, period, self.replan_every, self.latency_compensation,
                             self.temporal_ensembling, self.ensembling_decay)

    def prefix(self, executor: ChunkExecutor, obs_time: float, land_time: float):
        """What a request for a chunk observed at ``obs_time`` and expected to land at ``land_time``
        carries: None here (see :class:`RealTimeChunking`)."""
        return None

    def describe(self) -> str:
        return self.name


class OpenLoop(ExecutionStrategy):
    name = "open_loop"

    def __init__(self, latency_compensation: bool = True, **_ignored):
        super().__init__(0, latency_compensation)


class Replan(ExecutionStrategy):
    name = "replan"


class TemporalEnsembling(ExecutionStrategy):
    name = "ensemble"
    temporal_ensembling = True


class RealTimeChunking(ExecutionStrategy):
    """Re-plan every k rows, the new chunk inpainted over the rows of the current plan it overlaps.

    ``hold_rows``: when fewer than this many rows of the current plan are left after the ``d`` frozen
    ones (e.g. d = 5 with 10-row chunks re-planned every 5: the plan ends exactly where the new chunk
    takes over), the plan's last row is held for the missing rows, so the rows right after the switch
    are still pulled (with decaying weight) toward where the robot is, not planned from scratch.
    ``decay``: the weights of the overlap rows after the frozen ones (``inpainting.prefix_weights``):
    "exp" (Black et al.), "linear", or "hard" (only the d frozen rows are imposed: the choice for a
    prefix-trained checkpoint, which continues its given rows itself)."""

    def __init__(self, method: str, replan_every: int = 0, latency_compensation: bool = True,
                 hold_rows: int = DEFAULT_HOLD_ROWS, decay: str = DEFAULT_DECAY, **_ignored):
        if not latency_compensation:
            raise StrategyError(f"execution_strategy rtc_{method}: needs latency_compensation true (the "
                                "prefix aligns rows by time)")
        if hold_rows < 0:
            raise StrategyError(f"rtc hold_rows: expected >= 0, got {hold_rows}")
        from mode_ros.model.inpainting import DECAYS
        if decay not in DECAYS:
            raise StrategyError(f"rtc_decay: {decay!r} is not one of {', '.join(DECAYS)}")
        super().__init__(replan_every, True)
        self.method = method
        self.name = f"rtc_{method}"
        self.hold_rows = int(hold_rows)
        self.decay = decay
        self.last_d: int | None = None

    def prefix(self, executor: ChunkExecutor, obs_time: float, land_time: float):
        plan: Plan | None = executor.newest
        if plan is None:
            self.last_d = None
            return None
        off = executor.slot_index(plan, obs_time)   # the plan's row for the new chunk's row 0
        rows = plan.actions[off:]
        if rows.shape[0] == 0:
            self.last_d = None
            return None
        d = rows_before(obs_time, land_time, executor.period)
        d = max(d, executor.replan_every - off)      # an early chunk waits until the plan reaches row k
        d = min(max(d, 0), rows.shape[0])
        self.last_d = d
        rows = hold_last_row(rows, min(d + self.hold_rows, executor.chunk_size))
        from mode_ros.model.inpainting import ChunkPrefix

        return ChunkPrefix(actions=rows, fixed=int(d), method=self.method, decay=self.decay)


def hold_last_row(rows: np.ndarray, n: int) -> np.ndarray:
    """``rows`` (m, A) extended to ``n`` rows by repeating its last row (unchanged when m >= n)."""
    if rows.shape[0] >= n:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], n - rows.shape[0], axis=0)], axis=0)


def rows_before(obs_time: float, land_time: float, period: float) -> int:
    """Rows of a chunk observed at ``obs_time`` whose ticks come before it lands at ``land_time`` (a
    result landing exactly on a tick is used at that tick)."""
    return max(0, math.ceil((land_time - obs_time) / period - _EPS))


def make_strategy(name: str, replan_every: int = 0, latency_compensation: bool = True,
                  ensembling_decay: float = 0.01, rtc_hold_rows: int = DEFAULT_HOLD_ROWS,
                  rtc_decay: str = DEFAULT_DECAY) -> ExecutionStrategy:
    """The strategy called ``name`` (one of :data:`STRATEGIES`)."""
    kw = dict(replan_every=replan_every, latency_compensation=latency_compensation,
              ensembling_decay=ensembling_decay)
    if name == "open_loop":
        return OpenLoop(latency_compensation)
    if name == "replan":
        return Replan(**kw)
    if name == "ensemble":
        return TemporalEnsembling(**kw)
    if name in ("rtc_replace", "rtc_guidance"):
        return RealTimeChunking(name[4:], replan_every, latency_compensation, rtc_hold_rows, rtc_decay)
    raise StrategyError(f"execution_strategy: {name!r} is not one of {', '.join(STRATEGIES)}")
