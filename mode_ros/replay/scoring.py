"""Scoring replayed ActionChunks against the actions recorded in the bag (ROS-free, streaming).

Alignment (docs/CONTRACTS.md): row ``r`` of a published chunk whose header stamp is ``t_obs`` and
whose ``first_index`` is ``f`` is the action for the control slot starting at
``t_obs + (f + r) * control_period``. It is compared with the recorded action *in effect* at that
time, exactly as the bag converter samples a training tick: per action source the latest message at
or before the slot time, at most that source's ``tolerance_s`` old; sources are concatenated in map
order. A slot without such a recording is not scored and is counted by reason
(``missing:<stream>``, ``stale:<stream>``, ``after_bag_end``).

Memory: recorded actions are kept for a sliding window of bag time (``window_s``); chunks are scored
as soon as the bag has been read past their last slot (+ the largest tolerance + a margin), then only
their per-tick summary (first action predicted / recorded) is kept for the plots.
"""
from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["ChunkRecord", "RecordedActions", "Scorer", "summarize", "write_plots"]

NS = 1_000_000_000


@dataclass
class ChunkRecord:
    """One ActionChunk as published (live) or as the emulated node would have published it (offline)."""
    stamp_ns: int                 # header stamp = observation stamp
    first_index: int
    period_ns: int
    actions: np.ndarray           # [n, A] float32 as published
    sequence: int = 0
    tick: int = 0
    goal: str = ""
    latency_s: float = float("nan")   # inference_latency field (wall seconds)
    tick_ns: int | None = None        # bag time of the control tick that published it (if known)
    recv_wall: float | None = None    # live: monotonic receive time
    obs_pub_wall: float | None = None  # live: monotonic time the replayer published the observation

    def slot_ns(self, row: int) -> int:
        return int(self.stamp_ns + (self.first_index + row) * self.period_ns)

    @classmethod
    def from_message(cls, msg, **extra) -> "ChunkRecord":
        """A deserialised ``mode_ros/msg/ActionChunk`` (rosbags or rclpy) as a record; ``extra`` sets the
        fields the message does not carry (tick_ns, recv_wall, obs_pub_wall). ValueError when its actions
        array does not hold chunk_size x action_dim values."""
        n, a = int(msg.chunk_size), int(msg.action_dim)
        acts = np.asarray(msg.actions, np.float32)
        if acts.size != n * a or n == 0:
            raise ValueError(f"ActionChunk has {acts.size} actions for chunk_size {n} x action_dim {a}")
        return cls(stamp_ns=int(msg.header.stamp.sec) * NS + int(msg.header.stamp.nanosec),
                   first_index=int(msg.first_index),
                   period_ns=int(msg.control_period.sec) * NS + int(msg.control_period.nanosec),
                   actions=acts.reshape(n, a), sequence=int(msg.sequence), tick=int(msg.tick), goal=str(msg.goal),
                   latency_s=int(msg.inference_latency.sec) + int(msg.inference_latency.nanosec) * 1e-9, **extra)


class _Series:
    """Recorded values of one action source, sorted by stamp, pruned from the front."""

    def __init__(self, name: str, tol_ns: int):
        self.name, self.tol_ns = name, int(tol_ns)
        self.t: list[int] = []
        self.v: list[np.ndarray] = []

    def add(self, t_ns: int, vec: np.ndarray) -> None:
        if not self.t or t_ns >= self.t[-1]:
            self.t.append(int(t_ns))
            self.v.append(vec)
        else:  # out of order stamp: keep sorted (rare)
            i = bisect.bisect_right(self.t, int(t_ns))
            self.t.insert(i, int(t_ns))
            self.v.insert(i, vec)

    def lookup(self, t_ns: int) -> tuple[np.ndarray | None, str]:
        i = bisect.bisect_right(self.t, int(t_ns)) - 1
        if i < 0:
            return None, f"missing:{self.name}"
        if t_ns - self.t[i] > self.tol_ns:
            return None, f"stale:{self.name}"
        return self.v[i], ""

    def prune(self, before_ns: int) -> None:
        """Drop values older than ``before_ns`` except the last one before it (it may still be in effect)."""
        i = bisect.bisect_left(self.t, int(before_ns)) - 1
        if i > 0:
            del self.t[:i]
            del self.v[:i]


class RecordedActions:
    """The recorded action (concatenation of the mapped action sources) in effect at any bag time."""

    def __init__(self, names: Sequence[str], tol_ns: Sequence[int]):
        self.series = [_Series(n, t) for n, t in zip(names, tol_ns)]
        self.max_tol_ns = max([int(t) for t in tol_ns] or [0])
        self.dims: list[int | None] = [None] * len(self.series)
        self.count = 0
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None
        # the recorded action sampled once per control period, for the plots
        self.trace_t: list[int] = []
        self.trace_v: list[np.ndarray] = []

    @property
    def dim(self) -> int | None:
        return None if any(d is None for d in self.dims) else int(sum(self.dims))

    def add(self, source: int, t_ns: int, vec: np.ndarray) -> None:
        vec = np.asarray(vec, dtype=np.float64)
        self.dims[source] = vec.size
        self.series[source].add(t_ns, vec)
        self.count += 1

    def lookup(self, t_ns: int) -> tuple[np.ndarray | None, str]:
        parts = []
        for s in self.series:
            v, why = s.lookup(t_ns)
            if v is None:
                return None, why
            parts.append(v)
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out, ""

    def sample_trace(self, t_ns: int) -> None:
        """Remember the recorded action at ``t_ns`` (one point per control tick) for the plots and the
        per-dimension range."""
        v, _ = self.lookup(t_ns)
        if v is None:
            return
        self.trace_t.append(int(t_ns))
        self.trace_v.append(v.astype(np.float32))
        self.lo = v.copy() if self.lo is None else np.minimum(self.lo, v)
        self.hi = v.copy() if self.hi is None else np.maximum(self.hi, v)

    def prune(self, before_ns: int) -> None:
        for s in self.series:
            s.prune(before_ns)


class _Acc:
    """Sum of |e|, e^2 and count per dimension (optionally per row)."""

    def __init__(self, a: int, rows: int = 1):
        self.abs = np.zeros((rows, a))
        self.sq = np.zeros((rows, a))
        self.n = np.zeros(rows, dtype=np.int64)

    def add(self, err: np.ndarray, row: int = 0) -> None:
        self.abs[row] += np.abs(err)
        self.sq[row] += err * err
        self.n[row] += 1

    def stats(self, row: int | None = None) -> dict:
        if row is None:
            a, s, n = self.abs.sum(0), self.sq.sum(0), int(self.n.sum())
        else:
            a, s, n = self.abs[row], self.sq[row], int(self.n[row])
        if n == 0:
            return {"n": 0, "mae": None, "rmse": None}
        mae = a / n
        rmse = np.sqrt(s / n)
        return {"n": n, "mae": mae.tolist(), "rmse": rmse.tolist(),
                "mae_mean": float(mae.mean()), "rmse_mean": float(np.sqrt((s / n).mean()))}


class Scorer:
    """Streams chunks in, scores them against :class:`RecordedActions` once the bag has passed them."""

    def __init__(self, recorded: RecordedActions | None, action_dim: int, chunk_size: int,
                 action_names: Sequence[str] = (), gripper_dims: Sequence[int] = (),
                 gripper_thresholds: Sequence[float] | None = None, margin_s: float = 1.0,
                 window_s: float = 10.0, max_overlays: int = 2000):
        self.rec = recorded
        self.a = int(action_dim)
        self.k = int(chunk_size)
        self.names = list(action_names) if len(action_names) == self.a else [f"a{i}" for i in range(self.a)]
        self.gripper_dims = [int(g) for g in gripper_dims]
        thr = list(gripper_thresholds) if gripper_thresholds is not None else [0.0] * len(self.gripper_dims)
        self.gripper_thr = [float(x) for x in thr]
        self.margin_ns = int(margin_s * NS)
        self.window_ns = int(window_s * NS)
        self.pending: deque[ChunkRecord] = deque()
        self.first = _Acc(self.a)
        self.chunk = _Acc(self.a)
        self.by_row = _Acc(self.a, self.k)        # row within the published message (0 = executed now)
        self.by_index = _Acc(self.a, self.k)      # first_index + row: periods since the observation (the
                                                  # position in the model's chunk, with latency compensation)
        self.grip_first = Counter()
        self.grip_chunk = Counter()
        self.unscored = Counter()
        self.unscored_first = Counter()
        self.n_chunks = 0
        self.sequences: dict[int, dict] = {}      # sequence -> {latency, first_index, e2e}
        self.first_index_hist = Counter()
        self.dim_mismatch: str | None = None
        # per tick, for the plots: slot time of row 0, predicted row 0, recorded row 0 (NaN if none)
        self.tick_t: list[int] = []
        self.tick_pred: list[np.ndarray] = []
        self.tick_rec: list[np.ndarray] = []
        self.overlays: list[tuple[int, int, np.ndarray]] = []   # first message of each sequence
        self.max_overlays = int(max_overlays)
        self.last_read_ns: int | None = None
        self._trace_pending: deque[int] = deque()

    # ---- input -----------------------------------------------------------------------------------
    def add(self, c: ChunkRecord) -> None:
        a = np.asarray(c.actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.a:
            self.unscored["bad_shape"] += int(a.shape[0]) if a.ndim == 2 else 1
            return
        self.n_chunks += 1
        c.actions = a
        seq = self.sequences.get(c.sequence)
        if seq is None:
            e2e = None
            if c.recv_wall is not None and c.obs_pub_wall is not None:
                e2e = c.recv_wall - c.obs_pub_wall
            self.sequences[c.sequence] = {"latency": c.latency_s, "first_index": c.first_index, "e2e": e2e}
            self.first_index_hist[int(c.first_index)] += 1
            if len(self.overlays) < self.max_overlays:
                self.overlays.append((c.slot_ns(0), c.period_ns, a.astype(np.float32)))
            if len(self.sequences) > 200_000:   # bounded: keep the stats of the newest ones
                for key in list(self.sequences)[:100_000]:
                    del self.sequences[key]
        self.pending.append(c)

    def trace_tick(self, t_ns: int) -> None:
        """A control tick at ``t_ns``: the recorded action there goes into the plots (sampled once the
        bag has been read far enough that every message stamped before it is in)."""
        if self.rec is not None:
            self._trace_pending.append(int(t_ns))

    def advance(self, read_ns: int) -> None:
        """The bag has been read up to ``read_ns``: score what is complete, prune old recordings."""
        self.last_read_ns = read_ns if self.last_read_ns is None else max(self.last_read_ns, read_ns)
        tol = self.rec.max_tol_ns if self.rec is not None else 0
        while self._trace_pending and self._trace_pending[0] + tol + self.margin_ns <= self.last_read_ns:
            self.rec.sample_trace(self._trace_pending.popleft())
        while self.pending:
            c = self.pending[0]
            last = c.slot_ns(c.actions.shape[0] - 1)
            if last + tol + self.margin_ns > self.last_read_ns:
                break
            self._score(self.pending.popleft(), ended=False)
        if self.rec is not None:
            oldest = min([c.stamp_ns for c in self.pending], default=self.last_read_ns)
            self.rec.prune(min(oldest, self.last_read_ns - self.window_ns) - tol)

    def finish(self, end_ns: int | None) -> None:
        """End of the bag: score everything still pending (slots after the end are counted as such)."""
        while self._trace_pending:
            self.rec.sample_trace(self._trace_pending.popleft())
        while self.pending:
            self._score(self.pending.popleft(), ended=True, end_ns=end_ns)

    # ---- scoring ---------------------------------------------------------------------------------
    def _score(self, c: ChunkRecord, ended: bool, end_ns: int | None = None) -> None:
        n = c.actions.shape[0]
        rec0 = np.full(self.a, np.nan, np.float32)
        for r in range(n):
            t = c.slot_ns(r)
            if self.rec is None:
                why = "no_recorded_actions"
                v = None
            elif self.dim_mismatch is not None:
                why, v = "dim_mismatch", None
            else:
                v, why = self.rec.lookup(t)
                if v is not None and v.size != self.a:
                    self.dim_mismatch = (f"the recorded action has {v.size} dimensions, the policy outputs {self.a}: "
                                         "check the action mapping of the topic map")
                    why, v = "dim_mismatch", None
                if v is None and ended and end_ns is not None and t > end_ns:
                    why = "after_bag_end"
            if v is None:
                self.unscored[why] += 1
                if r == 0:
                    self.unscored_first[why] += 1
                continue
            err = c.actions[r] - v
            self.chunk.add(err)
            row = min(r, self.k - 1)
            idx = min(c.first_index + r, self.k - 1)
            self.by_row.add(err, row)
            self.by_index.add(err, idx)
            self._gripper(self.grip_chunk, c.actions[r], v)
            if r == 0:
                self.first.add(err)
                self._gripper(self.grip_first, c.actions[r], v)
                rec0 = v.astype(np.float32)
        self.tick_t.append(c.slot_ns(0))
        self.tick_pred.append(c.actions[0].astype(np.float32))
        self.tick_rec.append(rec0)

    def _gripper(self, counter: Counter, pred: np.ndarray, rec: np.ndarray) -> None:
        for g, thr in zip(self.gripper_dims, self.gripper_thr):
            if 0 <= g < self.a:
                counter[(g, "n")] += 1
                counter[(g, "ok")] += int((pred[g] >= thr) == (rec[g] >= thr))

    # ---- report ----------------------------------------------------------------------------------
    def _grip_report(self, counter: Counter) -> dict:
        out = {}
        for g, thr in zip(self.gripper_dims, self.gripper_thr):
            n = counter[(g, "n")]
            out[self.names[g] if 0 <= g < self.a else str(g)] = {
                "dim": g, "threshold": thr, "n": n,
                "sign_accuracy": (counter[(g, "ok")] / n) if n else None}
        return out

    def report(self) -> dict:
        def per_dim(acc: _Acc) -> dict:
            s = acc.stats()
            if not s["n"]:
                return {"n": 0}
            d = {"n": s["n"], "mae_mean": s["mae_mean"], "rmse_mean": s["rmse_mean"],
                 "per_dim": {nm: {"mae": s["mae"][i], "rmse": s["rmse"][i]} for i, nm in enumerate(self.names)}}
            rng = self._range()
            if rng is not None:
                nm = [s["mae"][i] / rng[i] if rng[i] > 0 else None for i in range(self.a)]
                d["normalized_mae"] = {self.names[i]: nm[i] for i in range(self.a)}
            return d

        def rows(acc: _Acc) -> list:
            out = []
            for r in range(self.k):
                s = acc.stats(r)
                if s["n"]:
                    out.append({"step": r, "n": s["n"], "mae_mean": s["mae_mean"], "rmse_mean": s["rmse_mean"],
                                "mae": s["mae"], "rmse": s["rmse"]})
            return out

        lat = np.array([v["latency"] for v in self.sequences.values()
                        if v["latency"] is not None and math.isfinite(v["latency"])], dtype=np.float64)
        e2e = np.array([v["e2e"] for v in self.sequences.values() if v["e2e"] is not None], dtype=np.float64)
        rep = {
            "chunks_scored": self.n_chunks,
            "action_names": self.names,
            "first_action": per_dim(self.first),
            "chunk": per_dim(self.chunk),
            "per_step": rows(self.by_row),
            "per_model_index": rows(self.by_index),
            "gripper": {"first_action": self._grip_report(self.grip_first),
                        "chunk": self._grip_report(self.grip_chunk)},
            "unscored_rows": dict(self.unscored),
            "unscored_first_actions": dict(self.unscored_first),
            "recorded_range": None,
            "latency": {
                "inferences": len(self.sequences),
                "inference_latency_s": summarize(lat),
                "end_to_end_s": summarize(e2e) if e2e.size else None,
                "first_index_of_new_chunks": {str(k): v for k, v in sorted(self.first_index_hist.items())},
            },
        }
        if self.dim_mismatch:
            rep["problem"] = self.dim_mismatch
        rng = self._range()
        if rng is not None and self.rec is not None:
            rep["recorded_range"] = {self.names[i]: [float(self.rec.lo[i]), float(self.rec.hi[i])]
                                     for i in range(min(self.a, len(rng)))}
        return rep

    def _range(self) -> np.ndarray | None:
        if self.rec is None or self.rec.lo is None or self.rec.lo.size != self.a:
            return None
        return self.rec.hi - self.rec.lo


def summarize(x: np.ndarray | Sequence[float]) -> dict | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
            "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99)),
            "min": float(x.min()), "max": float(x.max())}


# ---- plots ----------------------------------------------------------------------------------------
def write_plots(scorer: Scorer, out_dir, t0_ns: int, title: str = "") -> list[str]:
    """actions.png (predicted vs recorded per dimension over bag time), error_per_step.png (MAE/RMSE per
    chunk step), latency.png (inference latency histogram). Returns the written paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, draw in (("actions.png", lambda: _plot_actions(plt, scorer, t0_ns, title)),
                       ("error_per_step.png", lambda: _plot_error_per_step(plt, scorer, title)),
                       ("latency.png", lambda: _plot_latency(plt, scorer))):
        fig = draw()
        if fig is None:
            continue
        fig.tight_layout()
        p = Path(out_dir) / name
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(str(p))
    return paths


def _plot_actions(plt, scorer: Scorer, t0_ns: int, title: str):
    """Per action dimension: the recorded action (black), every new chunk over its slots (thin blue) and
    the executed row 0 (red dots) over bag time."""
    a, rec = scorer.a, scorer.rec
    fig, axes = plt.subplots(a, 1, figsize=(11, 1.9 * a + 0.8), sharex=True, squeeze=False)
    tt = (np.asarray(scorer.tick_t, np.float64) - t0_ns) / NS
    pred = np.asarray(scorer.tick_pred, np.float32).reshape(-1, a)
    for i in range(a):
        ax = axes[i, 0]
        if rec is not None and rec.trace_t:
            rt = (np.asarray(rec.trace_t, np.float64) - t0_ns) / NS
            rv = np.asarray(rec.trace_v, np.float32)
            if rv.ndim == 2 and rv.shape[1] > i:
                ax.step(rt, rv[:, i], where="post", color="k", lw=1.2, label="recorded")
        for (s0, per, acts) in scorer.overlays:
            x = (s0 - t0_ns + np.arange(acts.shape[0]) * per) / NS
            ax.plot(x, acts[:, i], color="tab:blue", alpha=0.25, lw=0.8)
        if tt.size:
            ax.plot(tt, pred[:, i], ".", color="tab:red", ms=3, label="executed (row 0)")
        ax.set_ylabel(scorer.names[i], fontsize=8)
        ax.grid(alpha=0.3)
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("bag time (s); thin blue: each new chunk over its slots")
    fig.suptitle(f"predicted vs recorded actions {title}", fontsize=10)
    return fig


def _plot_error_per_step(plt, scorer: Scorer, title: str):
    """MAE / RMSE (and per-dimension MAE) by row of the published chunk and by periods since the observation."""
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    for j, (acc, label) in enumerate(((scorer.by_row, "row of the published chunk (0 = executed now)"),
                                      (scorer.by_index, "periods since the observation (first_index + row)"))):
        stats = [(r, s) for r, s in ((r, acc.stats(r)) for r in range(scorer.k)) if s["n"]]
        if stats:
            steps = [r for r, _ in stats]
            pdm = np.asarray([s["mae"] for _, s in stats])
            for i in range(scorer.a):
                ax[j].plot(steps, pdm[:, i], lw=0.8, alpha=0.6, label=scorer.names[i])
            ax[j].plot(steps, [s["mae_mean"] for _, s in stats], "k-o", lw=2, ms=3, label="MAE (mean of dims)")
            ax[j].plot(steps, [s["rmse_mean"] for _, s in stats], "k--", lw=1.5, label="RMSE (mean of dims)")
        ax[j].set_xlabel(label, fontsize=8)
        ax[j].set_ylabel("error (robot units)")
        ax[j].grid(alpha=0.3)
    if ax[0].get_legend_handles_labels()[0]:
        ax[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"error per chunk step {title}", fontsize=10)
    return fig


def _plot_latency(plt, scorer: Scorer):
    """Histogram of the inferences' latency, or None when no chunk reported one."""
    lat = np.array([v["latency"] for v in scorer.sequences.values()
                    if v["latency"] is not None and math.isfinite(v["latency"])]) * 1e3
    if not lat.size:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(lat, bins=min(50, max(5, lat.size // 3)), color="tab:green")
    ax.set_xlabel("inference latency (ms)")
    ax.set_ylabel("inferences")
    ax.set_title(f"median {np.median(lat):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms", fontsize=9)
    return fig


@dataclass
class TickLog:
    """Per-tick outcome counts (offline: exact, from the emulated node; live: published chunks plus the
    inferred reason of every tick that published nothing)."""
    expected: int = 0
    published: int = 0
    reasons: Counter = field(default_factory=Counter)
    details: Counter = field(default_factory=Counter)

    def report(self) -> dict[str, Any]:
        return {"expected": self.expected, "published": self.published,
                "without_output": max(0, self.expected - self.published),
                "without_output_by_reason": dict(self.reasons.most_common()),
                "reason_details": dict(self.details.most_common(20))}
