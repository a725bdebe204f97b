"""Bag replay: run a checkpoint on recorded demonstrations and score what it would have done.

``mode-ros replay BAG --checkpoint CKPT [--topics map.yaml] [--rate 1.0] [--out DIR] [--offline]``

* **live** (default): starts the installed ``policy_node`` (``use_sim_time:=true``, parameters from
  ``config/policy.yaml`` + overrides) or attaches to a running one (``--attach``), publishes the bag's
  camera, goal (and state) messages on the node's topics with the recorded timing scaled by
  ``--rate`` and ``/clock`` from the bag's receive times, records every ``ActionChunk`` the node
  publishes and writes them to ``OUT/chunks`` (a rosbag2) beside ``OUT/report.json`` and plots.
* **offline** (``--offline``): the same messages go straight to ``MoDEPolicy`` through the same
  image decoding and the same chunk execution / safety / camera sync code as the node
  (:mod:`mode_ros.ros.replay_offline`), in bag time, without DDS.

Both modes see the same event sequence (:func:`schedule`): ``/clock`` jumps to half a control
period before the bag's first message (so the node's first, jump-triggered timer tick lands off the
grid), then the clock is set at every message time and at every multiple of the control period — the
node's timer ticks exactly there. A message recorded at or before a tick time is delivered before
that tick. The recorded actions (the topic map's ``action`` mapping, the same code as ``mode-ros
convert bag``) are never sent to the node: they are what the predictions are scored against
(:mod:`mode_ros.ros.scoring`).

The bag is streamed (:mod:`mode_ros.ros.replay_bag`): memory is bounded by the camera sync queues,
a short window of recorded actions and the chunks awaiting their recorded future, never by the bag
size. A truncated/corrupt bag is salvaged and scored as far as it is readable; a mapped topic
missing from the bag is reported by name and everything that does not need it still runs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mode_ros.data.topic_map import CameraSpec, TopicMap, TopicMapError, load_topic_map

__all__ = ["ReplayOptions", "ModelInfo", "ReplayError", "run_replay", "schedule", "Event", "Mapping",
           "resolve_mapping", "timer_period_ns"]

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
        import yaml

        from mode_ros.model.config import PolicyConfig

        path = Path(path)
        cfgp = path / "config.yaml"
        if not cfgp.is_file():
            raise ReplayError(f"checkpoint {path} is not a mode_ros checkpoint (no config.yaml)")
        cfg = PolicyConfig.from_dict(yaml.safe_load(cfgp.read_text()))
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
    state_streams: list = field(default_factory=list)  # converter _Stream objects (kind "state")
    action_streams: list = field(default_factory=list)  # converter _Stream objects (kind "action")
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
    from mode_ros.data.bag import CAMERA_TYPES, VECTOR_TYPES, _Stream

    m = Mapping()
    avail = ", ".join(f"{t} [{ti.msgtype.split('/')[-1]}]" for t, ti in sorted(bag_topics.items()))
    by_name = {c.name: c for c in tm.cameras}
    for cam in model.camera_names:
        spec: CameraSpec | None = by_name.get(cam)
        if spec is None:
            m.problems.append(f"camera {cam!r} of the checkpoint is not in the topic map (map cameras: "
                              f"{sorted(by_name)}): the node gets no {cam!r} image and cannot publish")
            continue
        ti = bag_topics.get(spec.topic)
        if ti is None:
            m.problems.append(f"camera {cam!r} topic {spec.topic!r} is not in the bag: the node gets no {cam!r} "
                              f"image and cannot publish (bag topics: {avail})")
            continue
        if ti.msgtype not in CAMERA_TYPES:
            m.problems.append(f"camera {cam!r} topic {spec.topic!r} has type {ti.msgtype}, expected Image or "
                              "CompressedImage: not replayed")
            continue
        m.cameras[cam] = spec
        m.camera_types[cam] = ti.msgtype
    extra = sorted(set(by_name) - set(model.camera_names))
    if extra:
        m.notes.append(f"map cameras {extra} are not cameras of the checkpoint {model.camera_names}: ignored")
    if image_transport:
        m.transport = image_transport
    else:
        types = set(m.camera_types.values())
        m.transport = "compressed" if types and types == {COMPRESSED} else "raw"
    if m.transport == "raw" and COMPRESSED in m.camera_types.values():
        m.notes.append("cameras are mixed raw/compressed: compressed ones are decoded (mode_ros.data.images) "
                       "and published as rgb8 Image, so the node runs with image_transport: raw")
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

    def streams(sources, kind):
        out, missing = [], []
        for i, src in enumerate(sources):
            if kind == "action":
                name = f"action[{i}]:{src.topic}" if len(sources) > 1 else f"action:{src.topic}"
            else:
                name = f"state:{src.key}"
            ti = bag_topics.get(src.topic)
            if ti is None:
                missing.append(f"{kind} topic {src.topic!r} is not in the bag")
                continue
            if ti.msgtype not in VECTOR_TYPES:
                missing.append(f"{kind} topic {src.topic!r} has type {ti.msgtype} (not an action/state type)")
                continue
            s = _Stream(name, kind, src.topic, src, tm.tol_ns(src), tm.time_source_of(src))
            s.msgtype = ti.msgtype
            out.append(s)
        return out, missing

    acts, missing = streams(tm.action, "action")
    if missing:
        m.problems.append("; ".join(missing) + ": nothing to score against (the replay still runs and reports "
                          "outputs, latency and ticks)")
    else:
        m.action_streams = acts
    if model.state_dim > 0:
        st, missing = streams(tm.state, "state")
        if not tm.state:
            m.problems.append(f"the checkpoint takes a state of {model.state_dim} values but the topic map has no "
                              "state: the node gets no joint_states and cannot publish")
        elif missing:
            m.problems.append("; ".join(missing) + ": the node gets no joint_states and cannot publish")
        else:
            m.state_streams = st
    return m


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
        from mode_ros.data.bag import _Bad, _vector

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
                    arr, adjust, names = _vector(msg, msgtype, s)
                except _Bad as exc:
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
    from mode_ros.ros.scoring import RecordedActions, Scorer, TickLog

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


def _prepare_out(opts: ReplayOptions) -> Path:
    out = Path(opts.out) if opts.out else Path("replay_out") / Path(opts.bag).name.replace(".", "_")
    if out.exists() and any(out.iterdir()):
        if not opts.overwrite:
            raise ReplayError(f"output folder {out} exists and is not empty (pass --overwrite)")
        for name in ("chunks", "report.json", "actions.png", "error_per_step.png", "latency.png", "node.log"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_replay(opts: ReplayOptions) -> dict:
    """Replay one bag; returns the report (also written to OUT/report.json). Raises ReplayError when
    nothing can run; problems that still allow a partial replay are listed in ``report["problems"]``."""
    from mode_ros.ros.replay_bag import BagReadError, BagStream

    if not opts.rate > 0:
        raise ReplayError(f"--rate must be > 0, got {opts.rate}")
    if opts.latency not in ("measured", "calibrated"):
        try:
            if float(opts.latency) < 0:
                raise ValueError
        except ValueError:
            raise ReplayError(f"--latency must be 'calibrated', 'measured' or seconds >= 0, got "
                              f"{opts.latency!r}") from None
    opts.out = _prepare_out(opts)
    # parameters: table defaults < params file < -p overrides
    pfile = opts.params_file or default_params_file()
    values = {k: v for k, v in load_params_file(pfile, opts.node_name).items()}
    values.update(opts.params)
    unknown = sorted(set(values) - {"use_sim_time"} - set(_param_names()))
    if unknown:
        raise ReplayError(f"unknown node parameter(s) {unknown}")
    values.pop("use_sim_time", None)
    ckpt = opts.checkpoint or values.get("checkpoint") or None
    if opts.device:
        values["device"] = opts.device
    try:
        bag = BagStream(opts.bag).open()
    except BagReadError as exc:
        _write_error_report(opts, str(exc))
        raise ReplayError(str(exc)) from None
    try:
        return _run_bag(opts, bag, values, ckpt)
    except ReplayError as exc:
        _write_error_report(opts, str(exc))
        raise
    except BaseException as exc:   # Ctrl-C, out of memory, a bug: say so in OUT, keep what was recorded
        _write_error_report(opts, f"replay stopped: {type(exc).__name__}: {exc} (the chunks published until "
                                  f"then are in {Path(opts.out) / 'chunks'})")
        raise
    finally:
        bag.close()


def _run_bag(opts: ReplayOptions, bag, values: dict, ckpt) -> dict:
    from mode_ros.ros.params import NodeParams, ParameterError

    model = None
    if opts.policy is not None:
        pol = opts.policy
        cfg = getattr(pol, "config", None)
        model = ModelInfo(list(pol.camera_names), int(pol.state_dim), int(pol.chunk_size), int(pol.action_dim),
                          list(pol.action_names), list(getattr(cfg, "gripper_dims", []) or []), None,
                          list(getattr(cfg, "state_names", []) or []))
    elif ckpt:
        model = ModelInfo.from_checkpoint(ckpt)
        values["checkpoint"] = str(Path(ckpt).resolve())
    elif not opts.attach:
        raise ReplayError("--checkpoint is required (or a params file / -p checkpoint=...)")
    # topic map
    if opts.topics:
        try:
            tm = load_topic_map(opts.topics)
        except TopicMapError as exc:
            raise ReplayError(f"topic map: {exc}") from None
        tm_source = str(opts.topics)
    else:
        if model is None:
            raise ReplayError("--topics is required when attaching without --checkpoint")
        tm = load_topic_map(auto_topic_map(bag.topics, model))
        tm_source = "auto"
    # the node runs at the map's control rate unless told otherwise
    if "control_rate_hz" not in opts.params:
        values["control_rate_hz"] = float(tm.control_rate_hz)
    try:
        NodeParams.from_mapping(values)
    except ParameterError as exc:
        raise ReplayError(f"node parameter {exc}") from None
    if opts.score_chunks:
        run = run_score_only
    elif opts.offline:
        from mode_ros.ros.replay_offline import run_offline as run
    else:
        from mode_ros.ros.replay_live import run_live as run
    sess = Session(opts, bag, model, tm, tm_source, values)
    try:
        run(sess)
    finally:
        sess.close_writer()   # an interrupted replay keeps the chunks recorded so far (sqlite commits on close)
    return finish_report(sess)


def run_score_only(sess: Session) -> None:
    """Score the ActionChunks of another bag (e.g. `ros2 bag record` of a node fed by `ros2 bag play
    --clock`) against this bag's recorded actions; no policy, no node. Ticks without output are not known
    here (only the published chunks are)."""
    from mode_ros.data.rosmsgs import ACTION_CHUNK_TYPE
    from mode_ros.ros.replay_bag import BagReadError, BagStream
    from mode_ros.ros.scoring import ChunkRecord

    opts = sess.opts
    if sess.model is None:
        raise ReplayError("--score needs --checkpoint (for the action/chunk sizes and gripper dims)")
    setup_session(sess)
    try:
        cb = BagStream(opts.score_chunks).open()
    except BagReadError as exc:
        raise ReplayError(f"--score: {exc}") from None
    try:
        topics = [t for t, ti in cb.topics.items() if ti.msgtype == ACTION_CHUNK_TYPE]
        want = node_fqn(opts.node_name, opts.namespace) + "/action_chunk"
        if want in topics:
            topics = [want]
        if len(topics) != 1:
            raise ReplayError(f"--score: need exactly one {ACTION_CHUNK_TYPE} topic in {opts.score_chunks}, found "
                              f"{topics or 'none'}")
        sess.problems += [f"chunks bag: {p}" for p in cb.problems]
        ts = cb.typestore
        chunks = cb.messages(topics)
        nxt = next(chunks, None)
        scorer = sess.scorer
        t_run = time.perf_counter()

        def feed(upto):
            nonlocal nxt
            while nxt is not None and (upto is None or nxt[2] <= upto):
                _tp, mt, t, raw = nxt
                nxt = next(chunks, None)
                try:
                    m = ts.deserialize_cdr(raw, mt)
                except Exception:  # noqa: BLE001
                    sess.problems.append(f"chunks bag: undecodable ActionChunk at t={t}")
                    continue
                n, a = int(m.chunk_size), int(m.action_dim)
                acts = np.asarray(m.actions, np.float32)
                if acts.size != n * a or n == 0:
                    sess.problems.append(f"chunks bag: ActionChunk at t={t} has {acts.size} actions for "
                                         f"chunk_size {n} x action_dim {a}: not scored")
                    continue
                scorer.add(ChunkRecord(
                    stamp_ns=int(m.header.stamp.sec) * NS + int(m.header.stamp.nanosec),
                    first_index=int(m.first_index),
                    period_ns=int(m.control_period.sec) * NS + int(m.control_period.nanosec),
                    actions=acts.reshape(n, a), sequence=int(m.sequence), tick=int(m.tick), goal=str(m.goal),
                    latency_s=int(m.inference_latency.sec) + int(m.inference_latency.nanosec) * 1e-9, tick_ns=t))
                sess.ticks.published += 1

        for ev in sess.events():
            feed(ev.t)
            if ev.kind == "action" and scorer.rec is not None:
                scorer.rec.add(ev.source, ev.stamp_ns, ev.vec)
            scorer.advance(ev.t)
        feed(None)
        scorer.finish(sess.last_ns)
        sess.extra["run_wall_s"] = time.perf_counter() - t_run
        sess.extra["score_only"] = {"chunks_bag": str(opts.score_chunks), "topic": topics[0]}
        sess.notes.append("score-only: ticks without output are unknown (only the recorded chunks are)")
        sess.ticks = None
    finally:
        cb.close()


def _param_names():
    from mode_ros.ros.params import PARAMS

    return [p.name for p in PARAMS]


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


def finish_report(sess: Session) -> dict:
    from mode_ros.ros.scoring import write_plots

    opts = sess.opts
    wall = time.perf_counter() - sess.t_start
    run_wall = sess.extra.pop("run_wall_s", wall)
    bag_s = ((sess.last_ns - sess.first_ns) / NS) if sess.first_ns is not None else 0.0
    for p in sess.bag.problems:
        if p not in sess.problems:
            sess.problems.append(p)
    if sess.scorer is not None and sess.mapping is not None and not (
            len(sess.model.action_names) == sess.model.action_dim):
        names = [n for s in sess.mapping.action_streams for n in (s.names or [])]
        if len(names) == sess.scorer.a:
            sess.scorer.names = names   # the checkpoint has no action names: the recorded ones
    scores = sess.scorer.report() if sess.scorer is not None else {}
    if scores.get("problem") and scores["problem"] not in sess.problems:
        sess.problems.append(scores["problem"])
    if sess.decoder is not None and sess.decoder.bad:
        sess.problems.append("undecodable messages: " + ", ".join(f"{k} x{v}" for k, v in sess.decoder.bad.items()))
    rep = {
        "bag": str(opts.bag),
        "mode": ("score-only" if opts.score_chunks else "offline" if opts.offline else
                 ("live (attached)" if opts.attach else "live")),
        "checkpoint": sess.params_values.get("checkpoint"),
        "topic_map": sess.tm_source,
        "rate": opts.rate,
        "ok": not sess.problems,
        "problems": sess.problems,
        "notes": sess.notes,
        "bag_info": {"storage": sess.bag.storage, "salvaged": sess.bag.salvaged,
                     "topics": {t: {"type": ti.msgtype, "count": ti.count} for t, ti in sorted(sess.bag.topics.items())}},
        "mapping": sess.mapping.describe() if sess.mapping else None,
        "node_params": {k: sess.params_values.get(k) for k in (
            "control_rate_hz", "replan_every", "latency_compensation", "temporal_ensembling",
            "max_observation_age", "camera_sync_tolerance", "action_lower_bounds", "action_upper_bounds",
            "max_action_delta", "seed", "device")},
        "messages": {"read": sess.messages_read,
                     "per_topic": dict(sess.decoder.counts) if sess.decoder else {},
                     "bad": dict(sess.decoder.bad) if sess.decoder else {},
                     "bad_examples": dict(sess.decoder.bad_examples) if sess.decoder else {}},
        "timing": {"wall_s": round(wall, 3), "replay_wall_s": round(run_wall, 3), "bag_seconds": round(bag_s, 3),
                   "messages_per_s": round(sess.messages_read / run_wall, 1) if run_wall > 0 else None,
                   "bag_seconds_per_wall_second": round(bag_s / run_wall, 3) if run_wall > 0 else None},
        "ticks": sess.ticks.report() if sess.ticks is not None else None,
        "scores": scores,
    }
    rep.update(sess.extra)
    plots = []
    if sess.scorer is not None:
        try:
            plots = write_plots(sess.scorer, sess.out, sess.first_ns or 0,
                                title=f"({Path(opts.bag).name}, {rep['mode']})")
        except Exception as exc:  # noqa: BLE001 - plots are a convenience, never fatal
            sess.problems.append(f"plots failed: {type(exc).__name__}: {exc}")
    rep["outputs"] = {"report": str(sess.out / "report.json"),
                      "chunks_bag": str(sess.out / "chunks") if (sess.out / "chunks").exists() else None,
                      "plots": plots}
    if (sess.out / "node.log").exists():
        rep["outputs"]["node_log"] = str(sess.out / "node.log")
    (sess.out / "report.json").write_text(json.dumps(_jsonable(rep), indent=1))
    return rep


def _write_error_report(opts: ReplayOptions, error: str) -> None:
    try:
        (Path(opts.out) / "report.json").write_text(json.dumps({"bag": str(opts.bag), "ok": False, "error": error,
                                                                 "problems": [error]}, indent=1))
    except OSError:
        pass


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def format_summary(rep: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{rep['bag']} ({rep['mode']}): " + ("ok" if rep.get("ok") else f"{len(rep.get('problems', []))} problem(s)")]
    for p in rep.get("problems", []):
        lines.append(f"  problem: {p}")
    if rep.get("error"):
        return "\n".join(lines)
    s = rep.get("scores") or {}
    fa, ch = s.get("first_action") or {}, s.get("chunk") or {}
    if fa.get("n"):
        lines.append(f"  first action: MAE {fa['mae_mean']:.4g}  RMSE {fa['rmse_mean']:.4g}  (n={fa['n']})")
    if ch.get("n"):
        lines.append(f"  whole chunk:  MAE {ch['mae_mean']:.4g}  RMSE {ch['rmse_mean']:.4g}  (n={ch['n']})")
    for name, g in ((s.get("gripper") or {}).get("first_action") or {}).items():
        if g.get("n"):
            lines.append(f"  gripper {name}: sign accuracy {g['sign_accuracy']:.3f} (n={g['n']})")
    lat = ((s.get("latency") or {}).get("inference_latency_s")) or None
    if lat:
        lines.append(f"  inference latency: median {lat['median'] * 1e3:.1f} ms, p99 {lat['p99'] * 1e3:.1f} ms "
                     f"({lat['n']} inferences)")
    t = rep.get("ticks") or {}
    if t:
        why = ", ".join(f"{k}={v}" for k, v in (t.get("without_output_by_reason") or {}).items()) or "-"
        lines.append(f"  ticks: {t.get('published')}/{t.get('expected')} published; without output: {why}")
    tm = rep.get("timing") or {}
    lines.append(f"  {rep['messages']['read']} messages, {tm.get('bag_seconds')} s of bag in {tm.get('replay_wall_s')} s "
                 f"({tm.get('messages_per_s')} msg/s)")
    lines.append(f"  report: {rep['outputs']['report']}")
    return "\n".join(lines)
