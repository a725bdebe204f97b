"""rosbag2 (.db3 / .mcap) -> episodes, ROS-free (``rosbags`` library only).

Two streaming passes per bag, so memory stays bounded by the small streams, never the images:

1. **scan**: read every mapped topic once; keep per stream only timestamps, small values (actions,
   state, instructions, markers) and image metadata (size, validity); count bad messages with
   reasons. Then split the bag into episode segments, lay a control-rate clock over each one and,
   for every tick, pick per stream the latest message at or before the tick within its tolerance
   (for actions: the command in effect). Ticks where a stream has no such message are dropped and
   counted by reason (``missing:<stream>``, ``stale:<stream>``), never filled.
2. **images**: read the camera topics again, decode only the frames picked in pass 1 and write
   each one into every tick that uses it. A frame that fails to decode drops its ticks
   (``bad_image:<camera>``) and is counted as a bad message.

Timestamps: ``time_source: header`` uses ``header.stamp`` and falls back to the bag's receive
time for messages without a header (String, arrays, Twist) or with a zero stamp; ``receive``
always uses the receive time. ActionChunk rows execute at ``stamp + (first_index + row) * dt``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .episodes import EpisodeWriter
from .images import ImageDecodeError, check_image, compressed_size, decode_compressed, decode_image
from .rosmsgs import ACTION_CHUNK_TYPE, make_typestore
from .topic_map import CameraSpec, SourceSpec, TopicMap, load_topic_map

__all__ = ["convert_bags", "BagWriter", "report_path_for", "format_report", "Stream", "BadMessage", "message_vector",
           "stream_name",
           "bag_typestore", "CAMERA_TYPES", "VECTOR_TYPES"]

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
STRING = "std_msgs/msg/String"
BOOL = "std_msgs/msg/Bool"
EMPTY = "std_msgs/msg/Empty"
JOINT_STATE = "sensor_msgs/msg/JointState"
TWIST_STAMPED = "geometry_msgs/msg/TwistStamped"
TWIST = "geometry_msgs/msg/Twist"
POSE_STAMPED = "geometry_msgs/msg/PoseStamped"
POSE = "geometry_msgs/msg/Pose"
F32MA = "std_msgs/msg/Float32MultiArray"
F64MA = "std_msgs/msg/Float64MultiArray"
F32 = "std_msgs/msg/Float32"
F64 = "std_msgs/msg/Float64"
VECTOR_TYPES = (JOINT_STATE, TWIST_STAMPED, TWIST, ACTION_CHUNK_TYPE, F32MA, F64MA, F32, F64, POSE_STAMPED, POSE)
CAMERA_TYPES = (IMAGE, COMPRESSED)
MARKER_TYPES = (STRING, BOOL, EMPTY)
END_WORDS = {"stop", "end", "done", "finish", "finished", "success", "failure", "fail", "abort", "reset"}


class BadMessage(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail or reason


def _short(t: str) -> str:
    return t.split("/")[-1]


# --------------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------------
class Stream:
    """Everything pass 1 keeps about one mapped stream of one bag."""

    def __init__(self, name: str, kind: str, topic: str, spec, tol_ns: int, time_source: str):
        self.name, self.kind, self.topic, self.spec = name, kind, topic, spec
        self.tol_ns, self.time_source = tol_ns, time_source
        self.msgtype = ""
        self.stamps: list[int] = []
        self.recv: list[int] = []
        self.dups: list[int] = []
        self.values: list[Any] = []
        self.bad: list[tuple[int, str, str]] = []      # (stamp, reason, detail)
        self.header_stamped = 0
        self.receive_stamped = 0
        self.offsets: list[int] = []                   # header stamp - receive time (ns)
        self.dim: int | None = getattr(spec, "dim", None)
        self.names: list[str] | None = list(spec.names) if getattr(spec, "names", None) else None
        self.size: tuple[int, int] | None = None       # cameras: first good frame size
        self._joint_idx: dict[tuple, np.ndarray] = {}
        self.out_of_order = 0

    def stamp(self, msg, recv: int, adjust_ns: int = 0) -> int:
        hdr = getattr(msg, "header", None)
        if self.time_source == "header" and hdr is not None:
            t = int(hdr.stamp.sec) * 1_000_000_000 + int(hdr.stamp.nanosec)
            if t > 0:
                self.header_stamped += 1
                self.offsets.append(t - recv)
                return t + adjust_ns
        self.receive_stamped += 1
        return recv

    def finalize(self) -> None:
        st = np.asarray(self.stamps, dtype=np.int64)
        if st.size > 1:
            self.out_of_order = int(np.count_nonzero(np.diff(st) < 0))
        order = np.argsort(st, kind="stable")
        self.stamps = st[order]
        self.recv = np.asarray(self.recv, dtype=np.int64)[order]
        self.dups = np.asarray(self.dups, dtype=np.int64)[order] if len(self.dups) else np.zeros(0, np.int64)
        if self.kind in ("action", "state"):
            d = self.dim or 0
            self.values = (np.stack([self.values[i] for i in order]).astype(np.float64) if len(order)
                           else np.zeros((0, d)))
        else:
            self.values = [self.values[i] for i in order]
        self.bad_stamps = np.asarray([b[0] for b in self.bad], dtype=np.int64)

    def time_source_used(self) -> str:
        if self.header_stamped and not self.receive_stamped:
            return "header"
        if self.receive_stamped and not self.header_stamped:
            return "receive"
        if not self.header_stamped and not self.receive_stamped:
            return "none"
        return f"mixed ({self.receive_stamped} receive-time fallbacks)"


def stream_name(kind: str, spec, index: int = 0, count: int = 1) -> str:
    """The name a stream has in reports: ``camera:<name>``, ``state:<key>``, ``action:<topic>`` (or
    ``action[i]:<topic>`` when the map lists several action sources)."""
    if kind == "camera":
        return f"camera:{spec.name}"
    if kind == "state":
        return f"state:{spec.key}"
    return f"action[{index}]:{spec.topic}" if count > 1 else f"action:{spec.topic}"


def message_vector(msg, msgtype: str, stream: Stream) -> tuple[np.ndarray, int, list[str] | None]:
    """-> (values, time adjustment ns, default names) for one vector message; raises BadMessage."""
    spec: SourceSpec = stream.spec
    if msgtype == JOINT_STATE:
        arr, names, adjust = *_joint_state_vector(msg, stream), 0
    elif msgtype == ACTION_CHUNK_TYPE:
        arr, names, adjust = _chunk_row(msg, spec.row)
    else:
        arr, names, adjust = *_fixed_vector(msg, msgtype), 0
    if spec.indices is not None:
        if max(spec.indices) >= arr.size:
            raise BadMessage("wrong_length", f"index {max(spec.indices)} out of range for {arr.size} values")
        arr = arr[spec.indices]
        names = [names[i] for i in spec.indices] if names else None
    if not np.all(np.isfinite(arr)):
        raise BadMessage("non_finite", f"NaN/Inf in {arr.tolist()}")
    if stream.dim is None:
        if arr.size == 0:
            raise BadMessage("wrong_length", "empty vector")
        stream.dim = int(arr.size)
    elif arr.size != stream.dim:
        raise BadMessage("wrong_length", f"{arr.size} values, expected {stream.dim}")
    if names is None:
        names = [f"{stream.topic.strip('/')}[{i}]" for i in range(arr.size)]
    return arr, adjust, names


def _joint_state_vector(msg, stream: Stream) -> tuple[np.ndarray, list[str]]:
    """The spec's field of a JointState, by the spec's joint names (any order in the message) or, without
    names, in message order (which must then stay the first message's)."""
    spec = stream.spec
    arr = np.asarray(getattr(msg, spec.field), dtype=np.float64)
    jnames = list(msg.name)
    if arr.size != len(jnames):
        raise BadMessage("wrong_length", f"JointState {spec.field} has {arr.size} values for {len(jnames)} names")
    if not spec.joints:
        if stream.names is not None and spec.indices is None and jnames != stream.names:
            raise BadMessage("joint_names_changed", f"JointState names {jnames} != first {stream.names}")
        return arr, jnames
    key = tuple(jnames)
    idx = stream._joint_idx.get(key)
    if idx is None:
        missing = [j for j in spec.joints if j not in jnames]
        if missing:
            raise BadMessage("missing_joint", f"joints {missing} not in JointState names {jnames}")
        idx = stream._joint_idx[key] = np.array([jnames.index(j) for j in spec.joints])
    return arr[idx], list(spec.joints)


def _chunk_row(msg, row: int) -> tuple[np.ndarray, list[str] | None, int]:
    """Row ``row`` of an ActionChunk, its names and when it executes after the header stamp (ns)."""
    n, a = int(msg.chunk_size), int(msg.action_dim)
    acts = np.asarray(msg.actions, dtype=np.float64)
    if n <= 0 or a <= 0 or acts.size != n * a:
        raise BadMessage("wrong_length", f"ActionChunk has {acts.size} values for chunk_size {n} x action_dim {a}")
    if row >= n:
        raise BadMessage("row_out_of_range", f"ActionChunk row {row} >= chunk_size {n}")
    period = int(msg.control_period.sec) * 1_000_000_000 + int(msg.control_period.nanosec)
    names = list(msg.action_names) if len(msg.action_names) == a else None
    return acts.reshape(n, a)[row], names, (int(msg.first_index) + row) * period


def _fixed_vector(msg, msgtype: str) -> tuple[np.ndarray, list[str] | None]:
    """Twist / Pose (named components) and Float32/64 (MultiArray) messages as vectors."""
    if msgtype in (TWIST_STAMPED, TWIST):
        tw = msg.twist if msgtype == TWIST_STAMPED else msg
        return (np.array([tw.linear.x, tw.linear.y, tw.linear.z, tw.angular.x, tw.angular.y, tw.angular.z]),
                ["linear.x", "linear.y", "linear.z", "angular.x", "angular.y", "angular.z"])
    if msgtype in (POSE_STAMPED, POSE):
        p = msg.pose if msgtype == POSE_STAMPED else msg
        return (np.array([p.position.x, p.position.y, p.position.z,
                          p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w]),
                ["x", "y", "z", "qx", "qy", "qz", "qw"])
    if msgtype in (F32MA, F64MA):
        return np.asarray(msg.data, dtype=np.float64), None
    if msgtype in (F32, F64):
        return np.array([float(msg.data)]), None
    raise BadMessage("unsupported_type", msgtype)   # filtered before


# --------------------------------------------------------------------------------------------
# the plan for one bag
# --------------------------------------------------------------------------------------------
@dataclass
class _EpisodePlan:
    segment: int
    a: int
    b: int
    ticks: np.ndarray | None = None            # int64 ns, candidate ticks
    keep: np.ndarray | None = None             # bool over candidate ticks
    sel: dict = field(default_factory=dict)    # stream name -> message index per candidate tick
    drops: Counter = field(default_factory=Counter)
    instruction: str | None = None
    skipped: str | None = None
    report: dict = field(default_factory=dict)


def _partition(points: Iterable[int]) -> list[tuple[int, int]]:
    lo, hi = -(2 ** 62), 2 ** 62
    pts = sorted(set(int(p) for p in points))
    edges = [lo] + pts + [hi]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _segments(tm: TopicMap, streams: dict[str, Stream], lang: tuple[np.ndarray, list[str]] | None,
              markers: tuple[np.ndarray, list] | None) -> list[tuple[int, int]]:
    points: list[int] = []
    if tm.split.by == "gap":
        topics = tm.split.gap_topics or [s.topic for s in tm.action]
        st = [s.stamps for s in streams.values() if s.topic in topics]
        if st:
            allst = np.sort(np.concatenate(st))
            if allst.size > 1:
                gap_ns = int(tm.split.gap_s * 1e9)
                brk = np.flatnonzero(np.diff(allst) > gap_ns)
                points.extend(allst[brk + 1].tolist())
    if lang is not None and tm.split_on_language_change and tm.language.instruction is None:
        stamps, texts = lang
        for i in range(1, len(texts)):
            if texts[i] != texts[i - 1]:
                points.append(int(stamps[i]))
        if len(texts):
            points.append(int(stamps[0]))
    segs = _partition(points)
    if tm.split.by == "topic":
        intervals = []
        if markers is not None:
            mst, vals = markers
            open_at = None
            for t, v in zip(mst.tolist(), vals):
                is_end = (v is False) or (isinstance(v, str) and v.strip().lower() in END_WORDS)
                if open_at is not None:
                    intervals.append((open_at, t))
                    open_at = None
                if not is_end:
                    open_at = t
            if open_at is not None:
                intervals.append((open_at, 2 ** 62))
        out = []
        for a, b in intervals:
            for s, e in segs:
                lo, hi = max(a, s), min(b, e)
                if lo < hi:
                    out.append((lo, hi))
        segs = out
    return segs


def _grid_start(start: int, end: int, period: float, streams: dict[str, Stream], required: list[str]) -> tuple[int, str | None]:
    """The first tick. Every stream is sampled at its latest message at or before a tick, so when the
    first action stream runs at the control rate, ticks that fall on its message times pick a command
    twice or skip one depending on timing jitter. In that case the grid moves to a quarter period after
    the commands' phase: one command per tick for jitter up to ±T/4, and the paired images are at most
    T/4 newer than the command. Returns (first tick, the stream it was aligned to or None)."""
    acts = [n for n in required if streams[n].kind == "action"]
    if not acts:
        return start, None
    st = streams[acts[0]].stamps
    st = st[(st >= start) & (st <= end)]
    if st.size < 3:
        return start, None
    if abs(float(np.median(np.diff(st))) - period) > 0.1 * period:
        return start, None             # a faster (or slower) command stream: sub-sampled, phase is moot
    ang = 2 * np.pi * (((st - start) % period) / period)
    phase = (np.arctan2(np.sin(ang).mean(), np.cos(ang).mean()) / (2 * np.pi)) % 1.0
    return start + int(round(((phase + 0.25) % 1.0) * period)), acts[0]


def _plan_episode(tm: TopicMap, seg_i: int, a: int, b: int, streams: dict[str, Stream],
                  required: list[str], lang: tuple[np.ndarray, list[str]] | None) -> _EpisodePlan:
    """The tick grid of segment [a, b) and, per stream and tick, the message in effect (or why none is)."""
    ep = _EpisodePlan(segment=seg_i, a=a, b=b)
    bounds = {n: (int(np.searchsorted(streams[n].stamps, a, "left")), int(np.searchsorted(streams[n].stamps, b, "left")))
              for n in required}
    ep.report["streams"] = {n: _stream_report(streams[n], *bounds[n], a, b) for n in required}
    if tm.language.instruction is None and lang is not None and len(lang[1]) and b <= int(lang[0][0]):
        ep.skipped = "before the first instruction message"
        return ep
    empty = [n for n, (lo, hi) in bounds.items() if hi <= lo]
    if empty:
        ep.skipped = "no messages on " + ", ".join(empty)
        return ep
    span = _tick_span(tm, b, streams, required, bounds)
    if span is None:
        ep.skipped = "streams do not overlap in time"
        return ep
    start, end, aligned = span
    if aligned is not None:
        ep.report["ticks_aligned_to"] = {"stream": aligned, "offset": "a quarter period after its messages"}
    period = 1e9 / tm.control_rate_hz
    n_ticks = int(np.floor((end - start) / period + 1e-9)) + 1
    ep.ticks = start + np.round(np.arange(n_ticks) * period).astype(np.int64)
    ep.keep = np.ones(n_ticks, dtype=bool)
    for name in required:
        _select(ep, name, streams[name], *bounds[name])
    ep.instruction = _instruction(tm, lang, ep.ticks)
    if ep.instruction is None:
        ep.skipped = "no instruction (no language message at or before the episode start)"
    return ep


def _stream_report(s: Stream, lo: int, hi: int, a: int, b: int) -> dict:
    """Messages, rate, largest gap and bad messages of one stream within the segment [a, b)."""
    st = s.stamps[lo:hi]
    gaps = np.diff(st) if st.size > 1 else np.zeros(0, np.int64)
    return {
        "topic": s.topic, "type": s.msgtype, "messages": int(st.size),
        "rate_hz": round(float((st.size - 1) / ((st[-1] - st[0]) / 1e9)), 3) if st.size > 1 and st[-1] > st[0] else None,
        "max_gap_s": round(float(gaps.max()) / 1e9, 4) if gaps.size else None,
        "tolerance_s": s.tol_ns / 1e9,
        "bad_messages": dict(Counter(r for (t, r, _d) in s.bad if a <= t < b)),
    }


def _tick_span(tm: TopicMap, b: int, streams: dict[str, Stream], required: list[str], bounds: dict):
    """(first tick, last tick bound, the stream the grid is aligned to or None) over the time every stream
    covers, or None when the streams do not overlap."""
    period = 1e9 / tm.control_rate_hz
    start = max(int(streams[n].stamps[bounds[n][0]]) for n in required)
    end = min(int(streams[n].stamps[bounds[n][1] - 1]) + streams[n].tol_ns for n in required)
    end = min(end, b - 1)
    if end < start:
        return None
    start, aligned = _grid_start(start, end, period, streams, required)
    if aligned is not None:   # and it ends at the tick after the last command (not holding it for more)
        st = streams[aligned].stamps
        end = min(end, int(st[np.searchsorted(st, end, "right") - 1]) + int(period // 2))
    return None if end < start else (start, end, aligned)


def _select(ep: _EpisodePlan, name: str, s: Stream, lo: int, hi: int) -> None:
    """Per tick, the stream's latest message at or before it (``ep.sel``); ticks where it has none, or only
    one older than its tolerance, are dropped and counted (``missing:``/``stale:``)."""
    st, ticks = s.stamps[lo:hi], ep.ticks
    rep = ep.report["streams"][name]   # what the common time span leaves out of the stream (not a drop: said here)
    rep["messages_before_first_tick"] = int(np.searchsorted(st, ticks[0], "left"))
    rep["messages_after_last_tick"] = int(st.size - np.searchsorted(st, ticks[-1], "right"))
    idx = np.searchsorted(st, ticks, "right") - 1
    missing = idx < 0
    stale = ~missing & (ticks - st[np.maximum(idx, 0)] > s.tol_ns)
    if missing.any():
        ep.drops[f"missing:{name}"] += int(missing.sum())
    if stale.any():
        ep.drops[f"stale:{name}"] += int(stale.sum())
    ep.keep &= ~(missing | stale)
    ep.sel[name] = idx + lo


def _instruction(tm: TopicMap, lang, ticks: np.ndarray) -> str | None:
    """The map's fixed instruction, else the language message in effect at the first tick (or, when episodes
    are not split on language changes, the first one within the episode)."""
    if tm.language.instruction is not None:
        return tm.language.instruction
    if lang is None or not len(lang[1]):
        return None
    lst, texts = lang
    i = int(np.searchsorted(lst, ticks[0], "right")) - 1
    if i < 0 and not tm.split_on_language_change:
        j = int(np.searchsorted(lst, ticks[0], "left"))
        i = j if j < len(texts) and lst[j] <= ticks[-1] else -1
    return texts[i] if i >= 0 else None


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------
def report_path_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".report.json")


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n=1): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, desc=desc, unit="msg", file=sys.stderr, leave=False, dynamic_ncols=True)


def bag_typestore(connections) -> Any:
    """Stock Kilted types + ActionChunk, overridden by definitions embedded in the bag for types the
    store lacks or whose hash differs (so bags from other distros and custom types decode)."""
    from rosbags.interfaces import MessageDefinitionFormat

    base = make_typestore()
    extra = {}
    for c in connections:
        md = getattr(c, "msgdef", None)
        if md is None or md.format != MessageDefinitionFormat.MSG or not md.data:
            continue
        known = c.msgtype in base.fielddefs
        if known and c.digest and c.digest.startswith("RIHS01_"):
            try:
                if base.hash_rihs01(c.msgtype) == c.digest:
                    continue
            except Exception:  # noqa: BLE001
                pass
        elif known:
            continue
        extra[c.msgtype] = md.data
    if not extra:
        return base
    try:
        return make_typestore(extra)
    except Exception:  # noqa: BLE001 - fall back to the stock definitions
        return base


def _open_reader(path: Path):
    from rosbags.rosbag2 import Reader

    return Reader(path)


def convert_bags(bags: Sequence[str | os.PathLike], topic_map: TopicMap | str | os.PathLike | dict,
                 out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
                 write_report: bool = True, compression_opts: int = 4) -> dict:
    """Convert rosbag2 bags (directories, ``.db3`` or ``.mcap`` files) into one episode file.

    Returns the report dict (also written as JSON beside ``out`` unless ``write_report=False``).
    """
    tm = topic_map if isinstance(topic_map, TopicMap) else load_topic_map(topic_map)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite)")
    t0 = time.perf_counter()
    report: dict = {"output": str(out), "control_rate_hz": tm.control_rate_hz, "time_source": tm.time_source,
                    "tolerance_s": tm.tolerance_s, "split": tm.split.by, "bags": []}
    state_keys = [s.key for s in tm.state]
    writer = None
    total_msgs = 0
    try:
        for bag in bags:
            bag = Path(bag)
            brep = {"path": str(bag), "episodes": []}
            report["bags"].append(brep)
            try:
                nmsg, writer = _convert_one(bag, tm, out, writer, overwrite, progress, brep, state_keys,
                                            compression_opts)
                total_msgs += nmsg
            except _BagError as exc:
                brep["error"] = str(exc)
                if progress:
                    print(f"mode-ros convert: skipping {bag}: {exc}", file=sys.stderr)
    finally:
        if writer is not None:
            writer.close()
    eps = [e for b in report["bags"] for e in b["episodes"]]
    written = [e for e in eps if e.get("episode")]
    dt = time.perf_counter() - t0
    report["totals"] = {
        "episodes": len(written),
        "skipped_segments": len(eps) - len(written),
        "ticks": int(sum(e["ticks"] for e in written)),
        "dropped_ticks": int(sum(e.get("dropped_ticks", 0) for e in written)),
        "bad_messages": int(sum(sum(s["bad_messages"].values()) for e in eps for s in e.get("streams", {}).values())),
        "bags_with_errors": sum(1 for b in report["bags"] if b.get("error")),
        "messages_read": total_msgs,
        "elapsed_s": round(dt, 3),
        "messages_per_s": round(total_msgs / dt, 1) if dt > 0 else None,
    }
    if write_report:
        rp = report_path_for(out)
        rp.write_text(json.dumps(report, indent=1))
        report["report_path"] = str(rp)
    return report


class _BagError(Exception):
    pass


def _convert_one(bag: Path, tm: TopicMap, out: Path, writer, overwrite: bool, progress: bool, brep: dict,
                 state_keys: list[str], compression_opts: int):
    from rosbags.rosbag2 import ReaderError

    try:
        reader = _open_reader(bag)
        reader.open()
    except (ReaderError, FileNotFoundError, OSError, ValueError) as exc:
        raise _BagError(f"cannot open bag: {exc}") from None
    try:
        return _convert_open(bag, reader, tm, out, writer, overwrite, progress, brep, state_keys, compression_opts)
    finally:
        reader.close()


def _convert_open(bag, reader, tm: TopicMap, out, writer, overwrite, progress, brep, state_keys, compression_opts):
    conv = _BagConversion(bag, reader, tm, progress, brep)
    conv.scan()
    plans = conv.plan()
    live = [p for p in plans if p.skipped is None]
    if live:
        writer = conv.check_or_open_writer(writer, out, overwrite, state_keys, compression_opts)
        builders, wanted = conv.begin_episodes(live, writer)
        try:   # on any error the unfinished episodes are removed, so the file never holds a half-written one
            keep_rows, bad_frames = conv.decode_frames(live, builders, wanted)
        except BaseException:
            for bld in reversed(builders):   # last first: their numbers are reused
                bld.discard()
            raise
        conv.finish_episodes(live, builders, keep_rows, bad_frames)
    conv.report(plans)
    return conv.nmsg, writer


def _next_dup(last_recv: dict, topic: str, recv: int) -> int:
    """How many earlier messages of ``topic`` share this receive time (identifies a message with ``recv``)."""
    lr = last_recv.get(topic)
    dup = lr[1] + 1 if lr is not None and lr[0] == recv else 0
    last_recv[topic] = (recv, dup)
    return dup


def _sorted_by_time(stamps: list[int], values: list) -> tuple[np.ndarray, list]:
    order = np.argsort(np.asarray(stamps, np.int64), kind="stable")
    return np.asarray(stamps, np.int64)[order], [values[i] for i in order]


class _BagConversion:
    """One open bag through the stages of the module docstring: streams and type checks, pass 1 (scan),
    episode plans, the writer, pass 2 (the picked frames), the report."""

    def __init__(self, bag: Path, reader, tm: TopicMap, progress: bool, brep: dict):
        self.bag, self.reader, self.tm, self.progress, self.brep = bag, reader, tm, progress, brep
        self.conns_by_topic: dict[str, list] = defaultdict(list)
        for c in reader.connections:
            self.conns_by_topic[c.topic].append(c)
        brep["storage"] = bag.suffix.lstrip(".") if bag.is_file() else "dir"
        brep["duration_s"] = round(reader.duration / 1e9, 3) if reader.message_count else 0.0
        self.lang_topic = tm.language.topic if tm.language.instruction is None else None
        self.marker_topic = tm.split.topic if tm.split.by == "topic" else None
        self.streams = self._make_streams({t: cs[0].msgtype for t, cs in self.conns_by_topic.items()})
        self.typestore = bag_typestore(reader.connections)
        self.by_topic: dict[str, list[Stream]] = defaultdict(list)
        for s in self.streams.values():
            self.by_topic[s.topic].append(s)
        self.cam_streams = {c.name: self.streams[stream_name("camera", c)] for c in tm.cameras}
        self.action_streams = [s for s in self.streams.values() if s.kind == "action"]
        self.state_streams = {s.spec.key: s for s in self.streams.values() if s.kind == "state"}
        self.nmsg, self.lang, self.markers, self.lang_bad = 0, None, None, Counter()
        self.frame_errors: dict[str, set] = {}   # stream name -> examples of pass-2 decode errors

    def _make_streams(self, types: dict[str, str]) -> dict[str, Stream]:
        """One Stream per mapped topic; every mapped topic must be in the bag with an accepted type."""
        tm, streams, problems = self.tm, {}, []

        def need(topic: str, allowed: tuple[str, ...], role: str) -> None:
            if topic not in types:
                problems.append(f"{role} topic {topic!r} not in bag")
            elif types[topic] not in allowed:
                problems.append(f"{role} topic {topic!r} has type {types[topic]}, expected one of "
                                f"{[_short(a) for a in allowed]}")

        def add(name: str, kind: str, spec, allowed: tuple[str, ...], role: str) -> None:
            need(spec.topic, allowed, role)
            streams[name] = Stream(name, kind, spec.topic, spec, tm.tol_ns(spec), tm.time_source_of(spec))

        for cam in tm.cameras:
            add(stream_name("camera", cam), "camera", cam, CAMERA_TYPES, f"camera {cam.name!r}")
        for i, src in enumerate(tm.action):
            add(stream_name("action", src, i, len(tm.action)), "action", src, VECTOR_TYPES, "action")
        for src in tm.state:
            add(stream_name("state", src), "state", src, VECTOR_TYPES, f"state {src.key!r}")
        if self.lang_topic:
            need(self.lang_topic, (STRING,), "language")
        elif tm.language.instruction is None:
            problems.append("no language: set language.topic or language.instruction in the topic map")
        if self.marker_topic:
            need(self.marker_topic, MARKER_TYPES, "split marker")
        if problems:
            avail = ", ".join(f"{t} [{_short(ty)}]" for t, ty in sorted(types.items()))
            raise _BagError("; ".join(problems) + f" (bag topics: {avail})")
        for s in streams.values():
            s.msgtype = types[s.topic]
        return streams

    def scan(self) -> None:
        """Pass 1: every mapped message once; streams keep stamps and small values, bad messages are counted."""
        lang_topic, marker_topic = self.lang_topic, self.marker_topic
        topics = set(self.by_topic) | {t for t in (lang_topic, marker_topic) if t}
        conns = [c for t in topics for c in self.conns_by_topic[t]]
        bar = _progress(sum(c.msgcount for c in conns), f"scan {self.bag.name}", self.progress)
        last_recv: dict[str, tuple[int, int]] = {}
        lang_st, lang_txt, mk_st, mk_val = [], [], [], []
        for conn, recv, raw in self.reader.messages(connections=conns):
            self.nmsg += 1
            if self.nmsg % 256 == 0:
                bar.update(256)
            topic = conn.topic
            dup = _next_dup(last_recv, topic, recv)
            try:
                msg = self.typestore.deserialize_cdr(raw, conn.msgtype)
            except Exception as exc:  # noqa: BLE001 - a corrupt message is counted, not fatal
                for s in self.by_topic.get(topic, ()):
                    s.bad.append((recv, "undeserializable", str(exc)[:200]))
                if topic == lang_topic:
                    self.lang_bad["undeserializable"] += 1
                continue
            if topic == lang_topic:
                text = str(msg.data).strip()
                if text:
                    lang_st.append(recv)
                    lang_txt.append(text)
                else:
                    self.lang_bad["empty_instruction"] += 1
            if topic == marker_topic:
                mk_st.append(recv)  # markers and instructions have no header: receive time
                mk_val.append(bool(msg.data) if conn.msgtype == BOOL
                              else (str(msg.data) if conn.msgtype == STRING else None))
            for s in self.by_topic.get(topic, ()):
                if s.kind == "camera":
                    _scan_camera(s, msg, conn.msgtype, recv, dup)
                else:
                    _scan_vector(s, msg, conn.msgtype, recv)
        bar.update(self.nmsg % 256)
        bar.close()
        for s in self.streams.values():
            s.finalize()
        self.lang = _sorted_by_time(lang_st, lang_txt) if lang_topic else None
        self.markers = _sorted_by_time(mk_st, mk_val) if marker_topic else None

    def plan(self) -> list[_EpisodePlan]:
        """Episode segments, each with its tick grid and the message every stream gives each tick."""
        tm, streams, plans = self.tm, self.streams, []
        for i, (a, b) in enumerate(_segments(tm, streams, self.lang, self.markers)):
            if not any(((s.stamps >= a) & (s.stamps < b)).any() for s in streams.values()):
                continue  # nothing at all in this segment (e.g. before the first marker)
            p = _plan_episode(tm, i, a, b, streams, list(streams), self.lang)
            if p.skipped is None and int(p.keep.sum()) < tm.min_ticks:
                p.skipped = f"{int(p.keep.sum())} ticks < min_ticks {tm.min_ticks}"
            plans.append(p)
        return plans

    def check_or_open_writer(self, writer, out, overwrite, state_keys, compression_opts) -> EpisodeWriter:
        """The episode file: opened for the first bag with episodes; later bags must match its names."""
        action_names = []
        for s in self.action_streams:
            action_names += s.names or [f"{s.topic.strip('/')}[{i}]" for i in range(s.dim or 0)]
        state_streams = self.state_streams
        now_state = {k: list(s.names or []) for k, s in state_streams.items()}
        dims = {k: s.dim for k, s in state_streams.items()}
        if writer is None:
            writer = EpisodeWriter(out, [c.name for c in self.tm.cameras], action_names,
                                   control_rate_hz=self.tm.control_rate_hz, source="rosbag2", state_keys=state_keys,
                                   state_names=now_state, overwrite=overwrite, compression_opts=compression_opts)
            writer.bag_state_dims = dims   # for the next bags' check
            return writer
        have = list(writer.attr("action_names"))
        if [str(x) for x in have] != action_names:
            raise _BagError(f"action names/dims {action_names} differ from the earlier bags' {have}")
        # the state too: a JointState with its joints in another order (or another count) would otherwise
        # be stored under the first bag's names, silently permuted
        have_state = json.loads(str(writer.attr("state_names", "{}")) or "{}")
        first_dims = getattr(writer, "bag_state_dims", dims)
        if have_state != now_state or dims != first_dims:
            raise _BagError(f"state names/dims {now_state} {dims} differ from the earlier bags' "
                            f"{have_state} {first_dims}")
        return writer

    def begin_episodes(self, live: list[_EpisodePlan], writer) -> tuple[list, dict]:
        """Write each planned episode's actions and state; list the frames pass 2 must decode, by message."""
        builders = []
        wanted: dict[tuple[str, int, int], list[tuple[int, str, np.ndarray]]] = defaultdict(list)
        shapes = {cname: s.spec.resize or s.size for cname, s in self.cam_streams.items()}
        for j, p in enumerate(live):
            kept = np.flatnonzero(p.keep)
            acts = np.concatenate([s.values[p.sel[s.name][kept]] for s in self.action_streams], axis=1)
            states = {k: s.values[p.sel[s.name][kept]] for k, s in self.state_streams.items()}
            b = writer.begin_episode(len(kept), shapes, acts.shape[1], {k: v.shape[1] for k, v in states.items()})
            builders.append(b)
            b.set_arrays(acts, p.ticks[kept] / 1e9, states)
            for cname, s in self.cam_streams.items():
                uniq, inv = np.unique(p.sel[s.name][kept], return_inverse=True)
                for u_i, m in enumerate(uniq):
                    wanted[(s.topic, int(s.recv[m]), int(s.dups[m]))].append((j, cname, np.flatnonzero(inv == u_i)))
        return builders, wanted

    def decode_frames(self, live, builders, wanted) -> tuple[list[np.ndarray], list[Counter]]:
        """Pass 2: decode the picked frames into every tick that uses them; a bad frame drops its ticks."""
        keep_rows = [np.ones(len(b.group["actions"]), bool) for b in builders]
        bad = [Counter() for _ in builders]
        if not wanted:
            return keep_rows, bad
        cam_topics = {s.topic for s in self.cam_streams.values()}
        conns = [c for t in cam_topics for c in self.conns_by_topic[t]]
        recvs = [k[1] for k in wanted]
        bar = _progress(len(wanted), f"images {self.bag.name}", self.progress)
        last_recv: dict[str, tuple[int, int]] = {}
        found = 0
        for conn, recv, raw in self.reader.messages(connections=conns, start=min(recvs), stop=max(recvs) + 1):
            users = wanted.get((conn.topic, recv, _next_dup(last_recv, conn.topic, recv)))
            if not users:
                continue
            found += 1
            bar.update(1)
            msg = self.typestore.deserialize_cdr(raw, conn.msgtype)
            for j, cname, rows in users:
                spec: CameraSpec = self.cam_streams[cname].spec
                try:
                    img = _decode(msg, conn.msgtype, spec)
                    want = spec.resize or self.cam_streams[cname].size
                    if img.shape[:2] != tuple(want):
                        raise ImageDecodeError(f"decoded size {img.shape[:2]} != {tuple(want)}", "size_changed")
                    builders[j].set_image(cname, rows, img)
                except ImageDecodeError as exc:
                    keep_rows[j][rows] = False
                    bad[j][(cname, exc.reason)] += 1
                    self.frame_errors.setdefault(f"camera:{cname}", set()).add(str(exc)[:200])
                    live[j].drops[f"bad_image:{cname}"] += len(rows)
        bar.close()
        if found != len(wanted):
            raise _BagError(f"pass 2 found {found} of {len(wanted)} picked frames (bag changed while reading?)")
        return keep_rows, bad

    def finish_episodes(self, live, builders, keep_rows, bad_frames) -> None:
        """Close each episode without its undecodable ticks, or discard it when too few are left."""
        min_ticks = self.tm.min_ticks
        for p, b, keep, bad in zip(live, builders, keep_rows, bad_frames):
            for (cname, reason), n in bad.items():
                br = p.report["streams"][f"camera:{cname}"]["bad_messages"]
                br[reason] = br.get(reason, 0) + n
            n_kept = int(keep.sum())
            if n_kept < min_ticks:
                b.discard()
                p.skipped = f"{n_kept} ticks < min_ticks {min_ticks} after undecodable frames"
                continue
            attrs = {"source_bag": str(self.bag), "segment": p.segment, "start_time_ns": int(p.ticks[0])}
            p.report["episode"] = b.finish(p.instruction, keep=keep, attrs=attrs)
            p.report["ticks"] = b.length

    def _episode_report(self, p: _EpisodePlan) -> dict:
        e = {"episode": p.report.get("episode"), "skipped": p.skipped, "segment": p.segment,
             "instruction": p.instruction}
        if p.ticks is not None:
            cand, kept = int(len(p.ticks)), int(p.report.get("ticks", 0))
            e.update({"start_s": round(p.ticks[0] / 1e9, 6), "end_s": round(p.ticks[-1] / 1e9, 6),
                      "candidate_ticks": cand, "ticks": kept if e["episode"] else 0,
                      "dropped_ticks": cand - kept if e["episode"] else cand,
                      "dropped": dict(sorted(p.drops.items()))})
        else:
            e["ticks"] = 0
        e["streams"] = p.report.get("streams", {})
        if "ticks_aligned_to" in p.report:
            e["ticks_aligned_to"] = p.report["ticks_aligned_to"]
        for name, srep in e["streams"].items():
            s = self.streams[name]
            srep["time_source"] = s.time_source_used()
            srep["out_of_order_stamps"] = s.out_of_order
            if s.offsets:
                srep["stamp_minus_receive_median_s"] = round(float(np.median(s.offsets)) / 1e9, 6)
        return e

    def report(self, plans: list[_EpisodePlan]) -> None:
        brep, streams = self.brep, self.streams.values()
        brep["episodes"].extend(self._episode_report(p) for p in plans)
        brep["language_bad_messages"] = dict(self.lang_bad)
        brep["messages"] = self.nmsg
        brep["bad_messages_outside_episodes"] = {
            s.name: int(sum(1 for (t, _r, _d) in s.bad if not any(p.a <= t < p.b for p in plans)))
            for s in streams if s.bad}
        examples = {s.name: sorted({d for (_t, _r, d) in s.bad} | self.frame_errors.get(s.name, set()))[:3]
                    for s in streams if s.bad or s.name in self.frame_errors}
        if examples:
            brep["bad_message_examples"] = examples


def _scan_camera(s: Stream, msg, msgtype: str, recv: int, dup: int) -> None:
    t = s.stamp(msg, recv)
    try:
        if msgtype == IMAGE:
            hw = check_image(msg.encoding, msg.height, msg.width, msg.step, len(msg.data))
        else:
            hw = compressed_size(msg.format, msg.data)
        if s.size is None:
            s.size = hw
        elif hw != s.size and s.spec.resize is None:
            raise ImageDecodeError(f"frame size {hw} != first frame size {s.size} (set resize: to convert)",
                                   "size_changed")
    except ImageDecodeError as exc:
        s.bad.append((t, exc.reason, str(exc)[:200]))
        return
    s.stamps.append(t)
    s.recv.append(recv)
    s.dups.append(dup)
    s.values.append(hw)


def _scan_vector(s: Stream, msg, msgtype: str, recv: int) -> None:
    n_hdr = s.header_stamped
    t = s.stamp(msg, recv)
    try:
        arr, adjust, names = message_vector(msg, msgtype, s)
    except BadMessage as exc:
        s.bad.append((t, exc.reason, exc.detail[:200]))
        return
    if s.names is None:
        s.names = names
    if adjust and s.header_stamped > n_hdr:  # ActionChunk row time, only on the header clock
        t += adjust
    s.stamps.append(t)
    s.recv.append(recv)
    s.values.append(arr)


def _decode(msg, msgtype: str, spec: CameraSpec) -> np.ndarray:
    if msgtype == IMAGE:
        img = decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                           is_bigendian=bool(msg.is_bigendian), scale16=spec.scale16)
    else:
        img = decode_compressed(msg.format, msg.data, scale16=spec.scale16)
    if spec.resize is not None and img.shape[:2] != tuple(spec.resize):
        from PIL import Image

        h, w = spec.resize
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    return img


def format_report(report: dict) -> str:
    """A short human-readable summary of a conversion report."""
    lines = []
    for b in report["bags"]:
        head = f"{b['path']}"
        if b.get("error"):
            lines.append(f"{head}: ERROR {b['error']}")
            continue
        lines.append(f"{head}: {b.get('messages', 0)} messages, {b.get('duration_s', 0)} s")
        for e in b["episodes"]:
            if e.get("episode"):
                drop = ", ".join(f"{k}={v}" for k, v in e.get("dropped", {}).items()) or "none"
                bad = {n: s["bad_messages"] for n, s in e["streams"].items() if s["bad_messages"]}
                lines.append(f"  {e['episode']}: {e['ticks']} ticks ({e['start_s']:.3f}..{e['end_s']:.3f} s), "
                             f"dropped {e['dropped_ticks']} [{drop}]" + (f", bad {bad}" if bad else "")
                             + f", instruction {e['instruction']!r}")
            else:
                lines.append(f"  segment {e['segment']}: skipped ({e['skipped']})")
    warned = set()
    for b in report["bags"]:
        for e in b["episodes"]:
            for name, s in e.get("streams", {}).items():
                off = s.get("stamp_minus_receive_median_s")
                if off is not None and abs(off) > 0.5 and name not in warned:
                    warned.add(name)
                    lines.append(f"warning: {name} header stamps are {off:+.3f} s from the receive time (clock "
                                 "mismatch?); streams without headers use the receive time -> consider "
                                 "time_source: receive")
    t = report["totals"]
    lines.append(f"total: {t['episodes']} episodes, {t['ticks']} ticks, {t['dropped_ticks']} dropped ticks, "
                 f"{t['bad_messages']} bad messages, {t['messages_read']} messages in {t['elapsed_s']} s "
                 f"({t['messages_per_s']} msg/s)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# writing bags (tests, simulators, replay)
# --------------------------------------------------------------------------------------------
class BagWriter:
    """Minimal rosbag2 writer (sqlite3 or mcap) over ``rosbags`` with our typestore.

    ``w.write(topic, msgtype, msg, t_ns)`` where ``msg`` is a typestore message object (build them
    with ``w.types[msgtype](...)``) or raw CDR bytes.
    """

    def __init__(self, path: str | os.PathLike, storage: str = "sqlite3"):
        from rosbags.rosbag2 import StoragePlugin, Writer

        plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}.get(storage)
        if plugin is None:
            raise ValueError(f"storage must be 'sqlite3' or 'mcap', got {storage!r}")
        self.typestore = make_typestore()
        self.types = self.typestore.types
        self._w = Writer(Path(path), version=9, storage_plugin=plugin)
        self._conns: dict[str, Any] = {}

    def __enter__(self):
        self._w.open()
        return self

    def __exit__(self, *exc):
        self._w.close()

    def write(self, topic: str, msgtype: str, msg, t_ns: int) -> None:
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._w.add_connection(topic, msgtype, typestore=self.typestore)
            self._conns[topic] = conn
        raw = msg if isinstance(msg, (bytes, bytearray, memoryview)) else self.typestore.serialize_cdr(msg, msgtype)
        self._w.write(conn, int(t_ns), raw)

    # message helpers -------------------------------------------------------------------------
    def header(self, t_ns: int, frame_id: str = ""):
        T = self.types
        return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](
            sec=int(t_ns // 1_000_000_000), nanosec=int(t_ns % 1_000_000_000)), frame_id=frame_id)
