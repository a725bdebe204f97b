"""What both replay modes share: options, checkpoint info, node parameters, the topic mapping, bag
messages decoded into events, the event/tick :func:`schedule` and the :class:`Session` of one bag.
See the package docstring (:mod:`mode_ros.replay`) for how a replay runs."""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mode_ros.data.topic_map import CameraSpec, TopicMap

__all__ = ["ReplayOptions", "ModelInfo", "ReplayError", "Session", "setup_session", "schedule", "Event", "Mapping",
           "resolve_mapping", "timer_period_ns", "node_fqn", "load_params_file", "default_params_file",
           "parse_value", "NS", "IMAGE", "COMPRESSED"]

NS = 1_000_000_000
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
STRING = "std_msgs/msg/String"


class ReplayError(Exception):
    """The replay cannot run at all (bad arguments, unreadable bag, node failed to start)."""


# ---- options ---------------------------------------------------------------------------------------
@dataclass
class ReplayOptions:
    bag: Path
    checkpoint: Path | None = None
    topics: str | None = None
    rate: float = 1.0
    out: Path | None = None
    offline: bool = False
    attach: bool = False
    node_name: str = "mode_policy"
    namespace: str = ""
    params_file: str | None = None
    params: dict = field(default_factory=dict)      # node parameter overrides
    goal: str | None = None                         # fixed goal instead of the bag's language
    gripper_dims: list | None = None
    gripper_thresholds: list | None = None
    latency: str = "calibrated"                     # offline: calibrated | measured | wall seconds per inference
    device: str | None = None
    progress: bool = True
    overwrite: bool = False
    storage: str | None = None                      # output bag: sqlite3 | mcap (default: the input's)
    start_timeout: float = 300.0
    duration: float | None = None                   # replay only the first N seconds of the bag
    drain_s: float = 5.0                            # live: how long to wait for the last chunks
    tick_settle_s: float = 0.015                    # live: wall pause after each tick before the next message
    score_chunks: Path | None = None                # score an ActionChunk bag recorded elsewhere (no policy run)
    policy: Any = None                              # offline, tests: a ready policy object instead of the checkpoint


@dataclass
class ModelInfo:
    """What replay needs to know about a checkpoint without loading the network."""
    camera_names: list
    state_dim: int
    chunk_size: int
    action_dim: int
    action_names: list
    gripper_dims: list
    action_offset: list | None = None    # normalisation centre (the gripper sign threshold)
    state_names: list = field(default_factory=list)   # the state's joint names, when the trainer recorded them

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "ModelInfo":
        from mode_ros.model.checkpoint import CheckpointError, checkpoint_config, resolve_checkpoint

        try:
            path = resolve_checkpoint(path)   # 'bundled' and folders, as every command
            cfg = checkpoint_config(path)
        except CheckpointError as exc:
            raise ReplayError(str(exc)) from None
        off = None
        normp = path / "normalization.json"
        if normp.is_file():
            try:
                off = list(json.loads(normp.read_text())["action"]["offset"])
            except (KeyError, ValueError, TypeError):
                off = None
        return cls(list(cfg.camera_names), int(cfg.state_dim), int(cfg.chunk_size), int(cfg.action_dim),
                   list(cfg.action_names), list(cfg.gripper_dims), off, list(cfg.state_names))


def timer_period_ns(control_rate_hz: float) -> int:
    """The node timer's period in ns, computed as rclpy does (``int(float(1/rate) * 1e9)``)."""
    return int(float(1.0 / control_rate_hz) * 1e9)


def node_fqn(name: str, namespace: str) -> str:
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    return f"{ns}/{name}"


# ---- parameters ------------------------------------------------------------------------------------
def load_params_file(path: str | os.PathLike | None, node_name: str) -> dict:
    """The ``ros__parameters`` of a ROS params YAML that apply to the node (``/**`` or its name)."""
    if not path:
        return {}
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    out: dict = {}
    for key, val in doc.items():
        k = str(key).strip("/")
        if k in ("**", "*") or k == node_name or k.endswith("/" + node_name):
            out.update((val or {}).get("ros__parameters", {}) or {})
    return out


def default_params_file() -> str | None:
    """config/policy.yaml: the installed share (colcon) or the source tree; None if neither exists."""
    try:
        from ament_index_python.packages import get_package_share_directory

        p = Path(get_package_share_directory("mode_ros")) / "config" / "policy.yaml"
        if p.is_file():
            return str(p)
    except Exception:  # noqa: BLE001 - no ament index (pip install): fall back to the source tree
        pass
    p = Path(__file__).resolve().parents[2] / "config" / "policy.yaml"
    return str(p) if p.is_file() else None


def parse_value(text: str) -> Any:
    """``-p name=value`` value: YAML scalars/lists (``0.5``, ``true``, ``[1, 2]``, ``.inf``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# ---- topic mapping ----------------------------------------------------------------------------------
@dataclass
class Mapping:
    """Which bag topic feeds which role, plus the problems found (named)."""
    cameras: dict = field(default_factory=dict)        # model camera -> CameraSpec (present in the bag)
    camera_types: dict = field(default_factory=dict)   # model camera -> msgtype in the bag
    goal_topic: str | None = None
    static_goal: str | None = None
    state_streams: list = field(default_factory=list)  # data.bag.Stream objects (kind "state")
    action_streams: list = field(default_factory=list)  # data.bag.Stream objects (kind "action")
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    transport: str = "raw"                             # what the node is fed: raw | compressed

    def topics(self) -> set:
        t = {c.topic for c in self.cameras.values()}
        if self.goal_topic:
            t.add(self.goal_topic)
        t |= {s.topic for s in self.state_streams}
        t |= {s.topic for s in self.action_streams}
        return t

    def describe(self) -> dict:
        return {"cameras": {c: {"topic": s.topic, "type": self.camera_types.get(c)} for c, s in self.cameras.items()},
                "goal": {"topic": self.goal_topic} if self.goal_topic else {"fixed": self.static_goal},
                "state": [s.topic for s in self.state_streams],
                "action": [{"name": s.name, "topic": s.topic, "type": s.msgtype, "tolerance_s": s.tol_ns / NS}
                           for s in self.action_streams],
                "image_transport": self.transport}


def auto_topic_map(bag_topics: dict, model: ModelInfo) -> dict:
    """A topic map guessed from the bag for the checkpoint's cameras (``.../image_<cam>[/compressed]``
    or ``.../<cam>/image_raw``), a String ``.../goal`` and one action topic (``.../action``,
    ``.../action_chunk`` or ``.../joint_command``). Raises ReplayError when ambiguous."""
    def pick(cands, what):
        if len(cands) == 1:
            return cands[0]
        raise ReplayError(f"no --topics map given and {what} is " + ("ambiguous: " + ", ".join(cands) if cands
                          else "not found") + " in the bag; write a topic map (config/bag_topics.example.yaml)")

    cams = {}
    for c in model.camera_names:
        cands = [t for t, ti in bag_topics.items() if ti.msgtype in (IMAGE, COMPRESSED)
                 and (t.endswith(f"image_{c}") or t.endswith(f"image_{c}/compressed") or f"/{c}/image" in t)]
        cams[c] = {"topic": pick(sorted(cands), f"the topic of camera {c!r}")}
    goals = sorted(t for t, ti in bag_topics.items() if ti.msgtype == STRING and t.endswith("goal"))
    acts = sorted(t for t, ti in bag_topics.items()
                  if t.rsplit("/", 1)[-1] in ("action", "action_chunk", "joint_command", "actions"))
    d = {"control_rate_hz": 10.0, "cameras": cams, "action": {"topic": pick(acts, "the action topic")}}
    if goals:
        d["language"] = {"topic": pick(goals, "the goal topic")}
    return d


def resolve_mapping(tm: TopicMap, bag_topics: dict, model: ModelInfo, goal_override: str | None,
                    image_transport: str | None = None) -> Mapping:
    """What of the bag the replay feeds the node (cameras, goal, state) and scores against (actions); what is
    missing or of the wrong type is a problem or a note of the returned Mapping, never an exception."""
    m = Mapping()
    _map_cameras(m, tm, bag_topics, model)
    if image_transport:
        m.transport = image_transport
    else:
        types = set(m.camera_types.values())
        m.transport = "compressed" if types and types == {COMPRESSED} else "raw"
    if m.transport == "raw" and COMPRESSED in m.camera_types.values():
        m.notes.append("cameras are mixed raw/compressed: compressed ones are decoded (mode_ros.data.images) "
                       "and published as rgb8 Image, so the node runs with image_transport: raw")
    _map_goal(m, tm, bag_topics, goal_override)
    acts, missing = _vector_streams(tm, bag_topics, "action")
    if missing:
        m.problems.append("; ".join(missing) + ": nothing to score against (the replay still runs and reports "
                          "outputs, latency and ticks)")
    else:
        m.action_streams = acts
    if model.state_dim > 0:
        st, missing = _vector_streams(tm, bag_topics, "state")
        if not tm.state:
            m.problems.append(f"the checkpoint takes a state of {model.state_dim} values but the topic map has no "
                              "state: the node gets no joint_states and cannot publish")
        elif missing:
            m.problems.append("; ".join(missing) + ": the node gets no joint_states and cannot publish")
        else:
            m.state_streams = st
    return m


def _map_cameras(m: Mapping, tm: TopicMap, bag_topics: dict, model: ModelInfo) -> None:
    from mode_ros.data.bag import CAMERA_TYPES

    avail = ", ".join(f"{t} [{ti.msgtype.split('/')[-1]}]" for t, ti in sorted(bag_topics.items()))
    by_name = {c.name: c for c in tm.cameras}
    for cam in model.camera_names:
        spec: CameraSpec | None = by_name.get(cam)
        ti = bag_topics.get(spec.topic) if spec is not None else None
        if spec is None:
            m.problems.append(f"camera {cam!r} of the checkpoint is not in the topic map (map cameras: "
                              f"{sorted(by_name)}): the node gets no {cam!r} image and cannot publish")
        elif ti is None:
            m.problems.append(f"camera {cam!r} topic {spec.topic!r} is not in the bag: the node gets no {cam!r} "
                              f"image and cannot publish (bag topics: {avail})")
        elif ti.msgtype not in CAMERA_TYPES:
            m.problems.append(f"camera {cam!r} topic {spec.topic!r} has type {ti.msgtype}, expected Image or "
                              "CompressedImage: not replayed")
        else:
            m.cameras[cam] = spec
            m.camera_types[cam] = ti.msgtype
    extra = sorted(set(by_name) - set(model.camera_names))
    if extra:
        m.notes.append(f"map cameras {extra} are not cameras of the checkpoint {model.camera_names}: ignored")


def _map_goal(m: Mapping, tm: TopicMap, bag_topics: dict, goal_override: str | None) -> None:
    """The goal: --goal, the map's fixed instruction, or its language topic in the bag."""
    if goal_override is not None:
        m.static_goal = goal_override
    elif tm.language.instruction is not None:
        m.static_goal = tm.language.instruction
    elif tm.language.topic:
        ti = bag_topics.get(tm.language.topic)
        if ti is None:
            m.problems.append(f"language topic {tm.language.topic!r} is not in the bag: the node gets no goal "
                              "(pass --goal TEXT)")
        elif ti.msgtype != STRING:
            m.problems.append(f"language topic {tm.language.topic!r} has type {ti.msgtype}, expected String")
        else:
            m.goal_topic = tm.language.topic
    else:
        m.problems.append("the topic map has no language (topic or instruction) and no --goal was given: the "
                          "node gets no goal")


def _vector_streams(tm: TopicMap, bag_topics: dict, kind: str) -> tuple[list, list[str]]:
    """The action (or state) streams of the map that the bag has with a vector type, and what is missing."""
    from mode_ros.data.bag import VECTOR_TYPES, Stream, stream_name

    sources = tm.action if kind == "action" else tm.state
    out, missing = [], []
    for i, src in enumerate(sources):
        ti = bag_topics.get(src.topic)
        if ti is None:
            missing.append(f"{kind} topic {src.topic!r} is not in the bag")
        elif ti.msgtype not in VECTOR_TYPES:
            missing.append(f"{kind} topic {src.topic!r} has type {ti.msgtype} (not an action/state type)")
        else:
            s = Stream(stream_name(kind, src, i, len(sources)), kind, src.topic, src, tm.tol_ns(src),
                       tm.time_source_of(src))
            s.msgtype = ti.msgtype
            out.append(s)
    return out, missing


# ---- events ----------------------------------------------------------------------------------------
@dataclass
class Event:
    t: int                   # bag receive time (ns)
    kind: str                # camera | goal | state | action
    topic: str = ""
    msgtype: str = ""
    raw: bytes | None = None
    cam: str = ""
    stamp_ns: int = 0        # header stamp as the node will see it (0 = zero stamp)
    msg: Any = None          # deserialized typestore message (cameras)
    text: str = ""
    vec: np.ndarray | None = None
    source: int = -1
    rewritten: bool = False  # live: the message must be re-serialized (stamp rewritten / decoded)


class Decoder:
    """Raw bag messages -> replay events (one message may feed several roles)."""

    def __init__(self, mapping: Mapping, typestore):
        self.m = mapping
        self.ts = typestore
        self.by_topic: dict[str, list] = {}
        for cam, spec in mapping.cameras.items():
            self.by_topic.setdefault(spec.topic, []).append(("camera", cam, spec))
        if mapping.goal_topic:
            self.by_topic.setdefault(mapping.goal_topic, []).append(("goal", None, None))
        for i, s in enumerate(mapping.state_streams):
            self.by_topic.setdefault(s.topic, []).append(("state", i, s))
        for i, s in enumerate(mapping.action_streams):
            self.by_topic.setdefault(s.topic, []).append(("action", i, s))
        self.bad: Counter = Counter()
        self.bad_examples: dict[str, str] = {}
        self.state_dims: list = [None] * len(mapping.state_streams)
        self.state_vec: list = [None] * len(mapping.state_streams)
        self.counts: Counter = Counter()

    def _bad(self, topic: str, reason: str, detail: str) -> None:
        self.bad[f"{topic}:{reason}"] += 1
        self.bad_examples.setdefault(topic, detail[:200])

    def decode(self, topic: str, msgtype: str, t: int, raw) -> list[Event]:
        from mode_ros.data.bag import BadMessage, message_vector

        roles = self.by_topic.get(topic)
        if not roles:
            return []
        self.counts[topic] += 1
        try:
            msg = self.ts.deserialize_cdr(raw, msgtype)
        except Exception as exc:  # noqa: BLE001 - a corrupt message is counted, not fatal
            self._bad(topic, "undeserializable", str(exc))
            return []
        out = []
        for kind, key, spec in roles:
            if kind == "camera":
                ts = spec.time_source or self.m_time_source
                hdr = msg.header.stamp
                st = int(hdr.sec) * NS + int(hdr.nanosec)
                ev = Event(t, "camera", topic, msgtype, raw, cam=key, msg=msg)
                if ts == "receive":
                    ev.stamp_ns, ev.rewritten = t, True
                else:
                    ev.stamp_ns = st
                if self.m.transport == "raw" and msgtype == COMPRESSED:
                    ev.rewritten = True
                out.append(ev)
            elif kind == "goal":
                out.append(Event(t, "goal", topic, msgtype, raw, text=str(msg.data)))
            else:
                s = spec
                n_hdr = s.header_stamped
                st = s.stamp(msg, t)
                try:
                    arr, adjust, names = message_vector(msg, msgtype, s)
                except BadMessage as exc:
                    self._bad(topic, exc.reason, exc.detail)
                    continue
                if s.names is None:
                    s.names = names
                if adjust and s.header_stamped > n_hdr:
                    st += adjust
                if kind == "action":
                    out.append(Event(t, "action", topic, msgtype, stamp_ns=st, vec=arr, source=key))
                else:
                    self.state_vec[key] = (st, arr)
                    if all(v is not None for v in self.state_vec):
                        vec = np.concatenate([v[1] for v in self.state_vec])
                        stamp = min(v[0] for v in self.state_vec)
                        out.append(Event(t, "state", topic, msgtype, stamp_ns=stamp, vec=vec))
        return out

    m_time_source = "header"


def schedule(events: Iterator[Event], period_ns: int, end_ns: int | None = None) -> Iterator[tuple]:
    """Merge bag events with the node's control ticks, in the order the live node sees them:

    ("clock", t)  /clock is set to t   ·  ("event", ev)  a message arrives  ·  ("tick", t)  timer fires

    The clock first jumps to half a period before the first grid point at or before the first message
    (the node's timer fires once on that jump), then follows every multiple of the period (a tick
    each) and every message time in between; messages at or before a grid time precede its tick.
    """
    P = int(period_ns)
    clock = None
    next_g = None
    for ev in events:
        t = int(ev.t)
        if clock is None:
            k0 = t // P
            c0 = k0 * P - P // 2
            clock = c0
            next_g = k0 * P
            yield ("clock", c0)
            yield ("tick", c0)
        while next_g < t:
            clock = next_g
            yield ("clock", next_g)
            yield ("tick", next_g)
            next_g += P
        if t > clock and t != next_g:
            clock = t
            yield ("clock", t)
        yield ("event", ev)
    if clock is None:
        return
    last = end_ns if end_ns is not None else clock
    while next_g <= last:
        yield ("clock", next_g)
        yield ("tick", next_g)
        next_g += P


# ---- running ---------------------------------------------------------------------------------------
def _progress(total: int | None, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total or None, desc=desc, unit="msg", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5, leave=False)
        except ImportError:  # pragma: no cover
            pass

    class _Null:
        def update(self, n=1):
            pass

        def close(self):
            pass

        def set_postfix_str(self, s):
            pass
    return _Null()


class Session:
    """Everything both modes share for one bag: options, model, params, mapping, reader, scorer, outputs."""

    def __init__(self, opts: ReplayOptions, bag, model: ModelInfo | None, tm: TopicMap, tm_source: str,
                 params_values: dict):
        from mode_ros.ros.params import NodeParams

        self.opts, self.bag, self.model, self.tm, self.tm_source = opts, bag, model, tm, tm_source
        self.params_values = params_values
        self.p = NodeParams.from_mapping(params_values)
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.t_start = time.perf_counter()
        self.mapping: Mapping | None = None
        self.decoder: Decoder | None = None
        self.scorer = None
        self.ticks = None
        self.out: Path = opts.out
        self.writer = None
        self.messages_read = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.extra: dict = {}

    # events from the bag, with progress and the --duration limit
    def events(self) -> Iterator[Event]:
        topics = self.mapping.topics()
        total = self.bag.total(topics)
        bar = _progress(total, f"replay {Path(self.opts.bag).name}", self.opts.progress)
        limit = None
        try:
            for topic, msgtype, t, raw in self.bag.messages(topics):
                if self.first_ns is None:
                    self.first_ns = t
                    if self.opts.duration is not None:
                        limit = t + int(self.opts.duration * NS)
                if limit is not None and t > limit:
                    break
                self.messages_read += 1
                self.last_ns = t if self.last_ns is None else max(self.last_ns, t)
                bar.update(1)
                yield from self.decoder.decode(topic, msgtype, t, raw)
        finally:
            bar.close()

    def open_writer(self):
        from mode_ros.data.bag import BagWriter

        storage = self.opts.storage or self.bag.storage or "sqlite3"
        self.writer = BagWriter(self.out / "chunks", storage)
        self.writer.__enter__()
        return self.writer

    def close_writer(self):
        """Finish OUT/chunks (idempotent; also on an error path, so what was recorded stays readable)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.__exit__(None, None, None)


def _make_scorer(sess: Session):
    from mode_ros.replay.scoring import RecordedActions, Scorer, TickLog

    m, model, opts = sess.mapping, sess.model, sess.opts
    rec = None
    if m.action_streams:
        rec = RecordedActions([s.name for s in m.action_streams], [s.tol_ns for s in m.action_streams])
    gd = opts.gripper_dims if opts.gripper_dims is not None else list(model.gripper_dims)
    if opts.gripper_thresholds is not None:
        thr = list(opts.gripper_thresholds)
        if len(thr) == 1:
            thr = thr * len(gd)
        if len(thr) != len(gd):
            raise ReplayError(f"--gripper-thresholds has {len(thr)} values for {len(gd)} gripper dims")
    else:
        off = model.action_offset
        thr = [float(off[g]) if off is not None and g < len(off) else 0.0 for g in gd]
    names = model.action_names
    if len(names) != model.action_dim and m.action_streams:
        names = []
    window = max(10.0, 3.0 * (model.chunk_size / sess.p.control_rate_hz + sess.p.max_observation_age))
    sess.scorer = Scorer(rec, model.action_dim, model.chunk_size, names, gd, thr, window_s=window)
    sess.ticks = TickLog()


def setup_session(sess: Session) -> None:
    """Mapping, decoder, scorer (after the model info is known)."""
    img_tr = sess.params_values.get("image_transport") if sess.opts.attach else None
    sess.mapping = resolve_mapping(sess.tm, sess.bag.topics, sess.model, sess.opts.goal, img_tr)
    sess.problems += sess.bag.problems
    sess.problems += sess.mapping.problems
    sess.notes += sess.mapping.notes
    sess.decoder = Decoder(sess.mapping, sess.bag.typestore)
    sess.decoder.m_time_source = sess.tm.time_source
    _make_scorer(sess)
