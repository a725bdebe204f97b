"""Driving the chunk controller in virtual time (bag time for offline replay, sim time for sim eval).

The caller owns the clock (:meth:`VirtualTime.set_clock`) and feeds the controller inputs and ticks.
An inference the controller asks for is computed at once (the policy call) and its result *lands*
``latency`` seconds of virtual time later (:meth:`VirtualTime.land`): until then the previous plan keeps
executing, as on a robot. With ``lockstep_inference`` the tick's own inference lands at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from mode_ros.control.controller import ChunkController, Output, Request

__all__ = ["VirtualTime", "Pending"]


@dataclass
class Pending:
    done_ns: int              # virtual time the result lands
    request: Request
    actions: object = None
    error: str = ""
    latency: float = 0.0      # seconds it counts for (expected latency, RTC's d)
    wall: float = 0.0         # seconds the call really took


class VirtualTime:
    """A virtual clock plus the one inference in flight. ``latency(wall_s) -> seconds`` models how long
    an inference takes (e.g. its wall time, a calibrated constant, or d control periods); it lands
    ``latency * rate`` seconds of virtual time after it was requested (``rate``: virtual seconds per
    second of the modelled latency, the bag replay's --rate)."""

    def __init__(self, start_ns: int = 0, rate: float = 1.0):
        self.clock_ns = int(start_ns)
        self.rate = float(rate)
        self.controller: ChunkController | None = None
        self.predict: Callable | None = None
        self.latency: Callable[[float], float] = lambda wall: wall
        self.pending: Pending | None = None
        self.walls: list[float] = []

    def attach(self, controller: ChunkController, predict: Callable | None,
               latency: Callable[[float], float] | None = None) -> "VirtualTime":
        self.controller, self.predict = controller, predict
        if latency is not None:
            self.latency = latency
        return self

    def clock(self) -> int:
        return self.clock_ns

    def set_clock(self, t_ns: int) -> None:
        """Virtual time moves forward only (a bag's messages arrive in receive order)."""
        if t_ns > self.clock_ns:
            self.clock_ns = int(t_ns)

    def reset_clock(self, t_ns: int) -> None:
        """A new episode/timeline (the controller sees a clock jump back and drops what it buffered)."""
        self.clock_ns = int(t_ns)
        self.pending = None

    def start(self) -> None:
        """The controller claimed an inference: compute it now; it lands after the modelled latency."""
        req = self.request()
        if req is None:
            return
        t0 = time.perf_counter()
        actions, error = None, ""
        try:
            actions = req.call(self.predict)
        except ValueError as exc:
            error = f"inference refused: {exc}"
        self.submit(req, actions, error, time.perf_counter() - t0)

    def request(self) -> Request | None:
        """The request of the inference the controller claimed (None: none can run now, it said why).
        With :meth:`submit`, a caller may compute several controllers' requests in one batch."""
        req = self.controller.prepare()
        return None if isinstance(req, str) else req

    def submit(self, req: Request, actions=None, error: str = "", wall: float = 0.0) -> None:
        """The result of ``req``, computed now in ``wall`` seconds: it lands after the modelled latency."""
        self.walls.append(wall)
        lockstep = self.controller.p.lockstep_inference
        latency = 0.0 if lockstep or error else float(self.latency(wall))
        done = self.clock_ns + int(round(latency * self.rate * 1e9))
        self.pending = Pending(done, req, actions, error, latency, wall)

    @property
    def claimed(self) -> bool:
        """The controller claimed an inference that has not started yet."""
        return self.controller.inflight and self.pending is None

    def land(self, upto_ns: int | None = None) -> Output | None:
        """The inference in flight lands if it is done by ``upto_ns`` (default: now), with the clock as
        it is; returns the late-served output of the unserved tick, if the plan serves one."""
        pend = self.pending
        limit = self.clock_ns if upto_ns is None else upto_ns
        if pend is None or pend.done_ns > limit:
            return None
        self.pending = None
        out = self.controller.finish(pend.request, pend.actions, pend.latency, pend.error, wall=pend.wall)
        if self.controller.retry_due():
            self.start()
        return out

    def kick(self, start: bool) -> None:
        """After an input: start the inference the controller claimed (``start`` True)."""
        if start:
            self.start()
