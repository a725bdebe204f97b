"""Executing action chunks at the control rate (ROS-free; used by the one ChunkController).

Time convention: a chunk computed from an observation stamped ``t_obs`` has row ``i`` meant for the
control slot ``[t_obs + i*period, t_obs + (i+1)*period)``. At a control tick at time ``now`` the row
to execute is ``floor((now - t_obs) / period)``: with ``latency_compensation`` the rows overtaken by
inference latency (and camera delay) are skipped. Without it, a new chunk starts at its row 0 on
the first tick after it arrived and advances one row per tick, i.e. it is executed late. Either way a
step's ``first_index`` is the control slot of the tick counted from the observation, so that
``stamp + first_index * period`` is the tick's time (the ActionChunk contract); ``row`` is the row of
the model's chunk executed there (equal to ``first_index`` with latency compensation).

Re-planning: the current chunk is executed up to row ``replan_every`` (1 … chunk_size, 0 =
chunk_size); the next one is requested early by the expected inference latency (plus one tick of
margin) so that it is ready by then. A chunk that arrives early waits as ``pending`` and replaces the
current plan at the tick where the current plan reaches row ``replan_every`` (or runs out); one that
arrives late starts at once. With ``temporal_ensembling`` every chunk is used as soon as it arrives and
every chunk that still covers a slot contributes to it with ACT-style weights ``exp(-m*i)`` (i = 0 for
the oldest).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Plan", "Step", "ChunkExecutor", "observation_seed", "tick_window"]

_EPS = 1e-6  # slots are computed from float seconds: forgive rounding right at a slot boundary
# ... in seconds too: at wall-clock times (~1.7e9 s) a double resolves only ~2.4e-7 s, so stamps and
# ticks exactly on the grid can land a hair before a slot boundary; 1 µs is far below any period
_EPS_S = 1e-6


def observation_seed(seed: int, stamp_ns: int) -> int | None:
    """The sampler seed for the inference on the observation stamped ``stamp_ns`` (None for seed < 0:
    random). A function of the observation, not of how many inferences ran, so a live node and the
    offline emulation draw the same noise for the same observation, and every observation draws its own:
    one noise for every inference makes the policy deterministic in its inputs, and closed loop it can
    then repeat one wrong action (the bundled MT10 checkpoint, 2 held-out episodes each of reach and
    peg-insert-side: 1 of 4 solved with one seed for every call, 4 of 4 with a seed per observation).
    A splitmix64 mix of (seed, stamp), reduced to 31 bits."""
    if seed < 0:
        return None
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(stamp_ns)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFF


def tick_window(t: float, period: float) -> tuple[float, float]:
    """lockstep_inference: an observation stamped in ``(lo, hi]`` is the observation of the tick at ``t``
    (within half a period of it: a lockstep simulator stamps it at the tick; the half period absorbs
    nanosecond drift between its clock and the node's timer grid)."""
    return t - 0.5 * period, t + 0.5 * period


@dataclass
class Plan:
    actions: np.ndarray      # [chunk_size, action_dim] in robot units
    obs_time: float          # seconds (node clock): row 0's slot = the observation's stamp + lead periods
    ready_time: float        # seconds (node clock) when the chunk became available
    sequence: int = 0        # number of the inference that produced it
    goal: str = ""
    latency: float = 0.0     # seconds the inference took
    start_tick: int = 0      # executor tick counter when adopted (for latency_compensation=False)
    stamp: object = None     # the observation's original stamp (e.g. builtin_interfaces/Time), untouched
    lead: int = 0            # periods from the observation to row 0 (the state was predicted that far)


@dataclass
class Step:
    actions: np.ndarray      # [n, action_dim]: row 0 is the action for this tick
    first_index: int         # control periods from the newest plan's observation to this tick
    plan: Plan               # the newest plan (its obs_time is the header stamp)
    n_ensembled: int = 1     # how many chunks contributed to row 0
    row: int = -1            # row of the newest plan's chunk executed at this tick (-1: = first_index)


class ChunkExecutor:
    def __init__(self, chunk_size: int, action_dim: int, period: float, replan_every: int = 0,
                 latency_compensation: bool = True, temporal_ensembling: bool = False,
                 ensembling_decay: float = 0.01):
        if chunk_size < 1 or action_dim < 1:
            raise ValueError(f"chunk_size and action_dim must be >= 1, got {chunk_size}, {action_dim}")
        if not period > 0:
            raise ValueError(f"period must be > 0, got {period}")
        if not 0 <= replan_every <= chunk_size:
            raise ValueError(f"replan_every must be in [0, {chunk_size}], got {replan_every}")
        self.chunk_size = int(chunk_size)
        self.action_dim = int(action_dim)
        self.period = float(period)
        self.replan_every = int(replan_every) or self.chunk_size
        self.latency_compensation = bool(latency_compensation)
        self.temporal_ensembling = bool(temporal_ensembling)
        self.ensembling_decay = float(ensembling_decay)
        self.plans: list[Plan] = []
        self.pending: Plan | None = None
        self.ticks = 0

    # ---- plan management ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop every plan (goal change, stale input, disable)."""
        self.plans.clear()
        self.pending = None

    def add(self, plan: Plan, now: float | None = None) -> None:
        """A new chunk: used at once (no plan yet, ensembling, or the current plan is due for
        replacement at ``now``), else kept as ``pending`` until the current plan reaches replan_every."""
        a = np.asarray(plan.actions)
        if a.shape != (self.chunk_size, self.action_dim):
            raise ValueError(f"chunk has shape {a.shape}, expected ({self.chunk_size}, {self.action_dim})")
        cur = self.newest
        if self.temporal_ensembling or cur is None or (now is not None and self._due(cur, now)):
            self._adopt(plan)
        else:
            self.pending = plan

    def _adopt(self, plan: Plan) -> None:
        plan.start_tick = self.ticks
        self.pending = None
        if self.temporal_ensembling:
            self.plans.append(plan)
            del self.plans[:-self.chunk_size]  # more than chunk_size plans never overlap one slot
        else:
            self.plans = [plan]

    def _due(self, plan: Plan, now: float) -> bool:
        return self.row_index(plan, now) >= self.replan_every

    def chunk_due(self, now: float) -> bool:
        """True when the tick at ``now`` needs a new chunk: no plan, or the newest plan reached
        ``replan_every`` (or ran out) and no pending chunk replaces it (lockstep inference waits for it)."""
        p = self.newest
        if self.pending is not None and (p is None or self._due(p, now)):
            return False
        return p is None or self._due(p, now)

    @property
    def newest(self) -> Plan | None:
        return self.plans[-1] if self.plans else None

    def slot_index(self, plan: Plan, now: float) -> int:
        """Control periods from the plan's observation to ``now`` (floored; 0 for an observation stamped
        after ``now``, which a camera clock running a little ahead can give)."""
        return max(0, math.floor((now - plan.obs_time + _EPS_S) / self.period + _EPS))

    def row_index(self, plan: Plan, now: float) -> int:
        """The plan's row for the tick at ``now``."""
        if self.latency_compensation:
            return self.slot_index(plan, now)
        return self.ticks - plan.start_tick

    def remaining(self, now: float) -> int:
        """Rows of the newest plan still ahead (0 when none)."""
        p = self.newest
        return 0 if p is None else max(0, self.chunk_size - self.row_index(p, now))

    # ---- per tick ------------------------------------------------------------------------------------
    def needs_replan(self, now: float, expected_latency: float = 0.0) -> bool:
        """True when a new chunk should be requested now so that it is ready at row ``replan_every``
        (``expected_latency``: seconds an inference is expected to take; one tick of margin is added)."""
        if self.pending is not None:
            return False
        p = self.newest
        if p is None:
            return True
        lead = math.ceil(max(0.0, expected_latency) / self.period - _EPS) + 1
        return self.row_index(p, now) + lead >= self.replan_every

    def step(self, now: float) -> Step | None:
        """The actions for the tick at ``now`` (None: no plan covers it), then advance one tick."""
        try:
            return self._step(now)
        finally:
            self.ticks += 1

    def restep(self, now: float) -> Step | None:
        """Step the tick just stepped once more (it went unserved, and a plan has arrived since):
        the tick counter is not advanced twice, so without latency compensation the late plan
        starts at row 0 for that tick and at row 1 on the next one."""
        self.ticks = max(0, self.ticks - 1)
        for p in self.plans:              # adopted after that tick was stepped: it starts at that tick
            p.start_tick = min(p.start_tick, self.ticks)
        return self.step(now)

    def _step(self, now: float) -> Step | None:
        p = self.newest
        if self.pending is not None and (p is None or self._due(p, now)):
            self._adopt(self.pending)
            p = self.newest
        if p is None:
            return None
        k = self.row_index(p, now)
        if k >= self.chunk_size:
            self.plans.clear()
            return None
        rows = np.array(p.actions[k:], dtype=np.float64)
        n_ens = 1
        if self.temporal_ensembling and len(self.plans) > 1:
            idx = [self.row_index(q, now) for q in self.plans]
            # plans that no longer cover this tick are done
            keep = [i for i, j in enumerate(idx) if j < self.chunk_size]
            self.plans = [self.plans[i] for i in keep]
            idx = [idx[i] for i in keep]
            for r in range(rows.shape[0]):
                acc = np.zeros(self.action_dim)
                wsum = 0.0
                n = 0
                for q, j in zip(self.plans, idx):  # oldest first: weight exp(-m * n)
                    if j + r < self.chunk_size:
                        w = math.exp(-self.ensembling_decay * n)
                        acc += w * np.asarray(q.actions[j + r], dtype=np.float64)
                        wsum += w
                        n += 1
                rows[r] = acc / wsum
                if r == 0:
                    n_ens = n
        return Step(actions=rows, first_index=self.slot_index(p, now) + p.lead, plan=p, n_ensembled=n_ens, row=k)
