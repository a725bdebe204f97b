"""The YAML topic map of ``mode-ros convert bag`` (typed, validated on load; see
config/bag_topics.example.yaml and docs/DATA.md)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TopicMapError", "CameraSpec", "SourceSpec", "LanguageSpec", "SplitSpec", "TopicMap", "load_topic_map"]


class TopicMapError(ValueError):
    """A topic map key is unknown, missing or has a bad value; the message names the key."""


TIME_SOURCES = ("header", "receive")
SPLIT_MODES = ("bag", "topic", "gap")
FIELDS = ("position", "velocity", "effort")


@dataclass
class CameraSpec:
    name: str
    topic: str
    resize: tuple[int, int] | None = None     # [height, width] at conversion time
    tolerance_s: float | None = None          # max age of the frame used for a tick
    time_source: str | None = None
    scale16: float | None = None              # mono16/16UC1: clip to [0, scale16] before 8-bit


@dataclass
class SourceSpec:
    """One action or state source. Type-specific options: JointState ``field``/``joints``; arrays
    ``indices``; ActionChunk ``row``; all: ``dim`` (expected length after selection), ``names``."""
    topic: str
    field: str = "position"
    joints: list[str] | None = None
    indices: list[int] | None = None
    dim: int | None = None
    names: list[str] | None = None
    row: int = 0
    tolerance_s: float | None = None          # state: max age; action: how long a command stays in effect
    time_source: str | None = None
    key: str = "state"                       # state only: obs/<key> in the episode file


@dataclass
class LanguageSpec:
    topic: str | None = None                  # std_msgs/String
    instruction: str | None = None            # fixed instruction (wins when both are given)


@dataclass
class SplitSpec:
    by: str = "bag"                           # bag | topic | gap
    topic: str | None = None                  # by: topic (std_msgs/String, Bool or Empty markers)
    gap_s: float | None = None                # by: gap
    gap_topics: list[str] | None = None       # streams whose silence splits (default: the action topics)


@dataclass
class TopicMap:
    control_rate_hz: float
    cameras: list[CameraSpec]
    action: list[SourceSpec]
    language: LanguageSpec = field(default_factory=LanguageSpec)
    state: list[SourceSpec] = field(default_factory=list)
    time_source: str = "header"
    tolerance_s: float = 0.1
    split: SplitSpec = field(default_factory=SplitSpec)
    split_on_language_change: bool = True
    min_ticks: int = 1

    def tol_ns(self, spec) -> int:
        t = spec.tolerance_s if getattr(spec, "tolerance_s", None) is not None else self.tolerance_s
        return int(round(float(t) * 1e9))

    def time_source_of(self, spec) -> str:
        return getattr(spec, "time_source", None) or self.time_source


def _keys(d: Any, cls, where: str, extra: tuple[str, ...] = ()) -> dict:
    if not isinstance(d, dict):
        raise TopicMapError(f"{where}: expected a mapping, got {type(d).__name__}")
    allowed = {f.name for f in fields(cls)} | set(extra)
    unknown = sorted(set(d) - allowed)
    if unknown:
        prefix = "" if where == "topic map" else where + "."
        raise TopicMapError(f"unknown key(s) {[prefix + str(k) for k in unknown]} (allowed in {where}: {sorted(allowed)})")
    return d


def _num(v, where: str, positive: bool = True, allow_none: bool = False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TopicMapError(f"{where}: expected a number, got {v!r}")
    if positive and not v > 0:
        raise TopicMapError(f"{where}: must be > 0, got {v!r}")
    return float(v)


def _str(v, where: str, allow_none: bool = False):
    if v is None and allow_none:
        return None
    if not isinstance(v, str) or not v:
        raise TopicMapError(f"{where}: expected a non-empty string, got {v!r}")
    return v


def _strlist(v, where: str):
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TopicMapError(f"{where}: expected a list of strings, got {v!r}")
    return list(v)


def _time_source(v, where):
    if v is None:
        return None
    if v not in TIME_SOURCES:
        raise TopicMapError(f"{where}: must be one of {TIME_SOURCES}, got {v!r}")
    return v


def _camera(name: str, d: Any, where: str) -> CameraSpec:
    if isinstance(d, str):
        d = {"topic": d}
    d = _keys(d, CameraSpec, where)
    if "topic" not in d:
        raise TopicMapError(f"{where}.topic: missing")
    resize = d.get("resize")
    if resize is not None:
        if isinstance(resize, int) and not isinstance(resize, bool):
            resize = [resize, resize]
        if (not isinstance(resize, list) or len(resize) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in resize)):
            raise TopicMapError(f"{where}.resize: expected [height, width] positive ints, got {d.get('resize')!r}")
        resize = (int(resize[0]), int(resize[1]))
    return CameraSpec(name=_str(d.get("name", name), f"{where}.name"), topic=_str(d["topic"], f"{where}.topic"),
                      resize=resize, tolerance_s=_num(d.get("tolerance_s"), f"{where}.tolerance_s", allow_none=True),
                      time_source=_time_source(d.get("time_source"), f"{where}.time_source"),
                      scale16=_num(d.get("scale16"), f"{where}.scale16", allow_none=True))


def _source(d: Any, where: str, is_state: bool) -> SourceSpec:
    if isinstance(d, str):
        d = {"topic": d}
    d = _keys(d, SourceSpec, where)
    if not is_state and "key" in d:
        raise TopicMapError(f"{where}.key: only state sources have a key")
    if "topic" not in d:
        raise TopicMapError(f"{where}.topic: missing")
    fld = d.get("field", "position")
    if fld not in FIELDS:
        raise TopicMapError(f"{where}.field: must be one of {FIELDS}, got {fld!r}")
    idx = d.get("indices")
    if idx is not None and (not isinstance(idx, list) or not all(isinstance(i, int) and i >= 0 for i in idx)):
        raise TopicMapError(f"{where}.indices: expected a list of non-negative ints, got {idx!r}")
    dim = d.get("dim")
    if dim is not None and (not isinstance(dim, int) or dim <= 0):
        raise TopicMapError(f"{where}.dim: expected a positive int, got {dim!r}")
    row = d.get("row", 0)
    if not isinstance(row, int) or row < 0:
        raise TopicMapError(f"{where}.row: expected a non-negative int, got {row!r}")
    spec = SourceSpec(topic=_str(d["topic"], f"{where}.topic"), field=fld,
                      joints=_strlist(d.get("joints"), f"{where}.joints"), indices=idx, dim=dim,
                      names=_strlist(d.get("names"), f"{where}.names"), row=row,
                      tolerance_s=_num(d.get("tolerance_s"), f"{where}.tolerance_s", allow_none=True),
                      time_source=_time_source(d.get("time_source"), f"{where}.time_source"),
                      key=_str(d.get("key", "state"), f"{where}.key"))
    return spec


def _sources(v: Any, where: str, is_state: bool) -> list[SourceSpec]:
    if v is None:
        return []
    items = v if isinstance(v, list) else [v]
    return [_source(x, f"{where}[{i}]" if isinstance(v, list) else where, is_state) for i, x in enumerate(items)]


def load_topic_map(src: str | os.PathLike | dict) -> TopicMap:
    """Load and validate a topic map from a YAML file or a dict. Errors name the offending key."""
    d = _keys(_read_yaml(src) or {}, TopicMap, "topic map")
    for req in ("control_rate_hz", "cameras", "action"):
        if req not in d:
            raise TopicMapError(f"topic map: missing required key {req!r}")
    cams = _cameras(d["cameras"])
    names = [c.name for c in cams]
    action = _sources(d["action"], "action", False)
    if not action:
        raise TopicMapError("action: at least one action source is required")
    state = _sources(d.get("state"), "state", True)
    if not cams and not state:
        raise TopicMapError("cameras: at least one camera is required when there is no state (a policy needs "
                            "images or a state vector)")
    keys = [s.key for s in state]
    if len(set(keys)) != len(keys):
        raise TopicMapError(f"state: each source needs a distinct 'key', got {keys}")
    if set(keys) & set(names):
        raise TopicMapError(f"state keys {sorted(set(keys) & set(names))} collide with camera names")
    lang, split = _language(d.get("language")), _split(d.get("split"))
    min_ticks = d.get("min_ticks", 1)
    if not isinstance(min_ticks, int) or min_ticks < 1:
        raise TopicMapError(f"min_ticks: expected an int >= 1, got {min_ticks!r}")
    slc = d.get("split_on_language_change", True)
    if not isinstance(slc, bool):
        raise TopicMapError(f"split_on_language_change: expected true/false, got {slc!r}")
    return TopicMap(control_rate_hz=_num(d["control_rate_hz"], "control_rate_hz"), cameras=cams, action=action,
                    language=lang, state=state,
                    time_source=_time_source(d.get("time_source", "header"), "time_source"),
                    tolerance_s=_num(d.get("tolerance_s", 0.1), "tolerance_s"), split=split,
                    split_on_language_change=slc, min_ticks=min_ticks)


def _read_yaml(src: str | os.PathLike | dict):
    if isinstance(src, dict):
        return src
    import yaml

    path = Path(src)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TopicMapError(f"topic map {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise TopicMapError(f"topic map {path}: invalid YAML: {exc}") from None


def _cameras(raw) -> list[CameraSpec]:
    """``cameras``: a mapping name -> spec (or topic), or a list of specs with a ``name``; names unique."""
    if isinstance(raw, dict):
        cams = [_camera(str(k), v, f"cameras.{k}") for k, v in raw.items()]
    elif isinstance(raw, list):
        cams = []
        for i, v in enumerate(raw):
            if not isinstance(v, dict) or "name" not in v:
                raise TopicMapError(f"cameras[{i}]: list entries need 'name' and 'topic'")
            cams.append(_camera(v["name"], v, f"cameras[{i}]"))
    else:
        raise TopicMapError("cameras: expected a mapping camera_name -> {topic: ...}")
    names = [c.name for c in cams]
    if len(set(names)) != len(names):
        raise TopicMapError(f"cameras: duplicate camera names {names}")
    return cams


def _language(raw) -> LanguageSpec:
    """``language``: a fixed instruction (a string, or ``instruction:``) or a String ``topic:``."""
    raw = raw or {}
    if isinstance(raw, str):
        raw = {"instruction": raw}
    raw = _keys(raw, LanguageSpec, "language")
    return LanguageSpec(topic=_str(raw.get("topic"), "language.topic", allow_none=True),
                        instruction=_str(raw.get("instruction"), "language.instruction", allow_none=True))


def _split(raw) -> SplitSpec:
    """``split``: how a bag becomes episodes (a mode name, or by / topic / gap_s / gap_topics)."""
    raw = raw or {}
    if isinstance(raw, str):
        raw = {"by": raw}
    raw = _keys(raw, SplitSpec, "split")
    split = SplitSpec(by=raw.get("by", "bag"), topic=_str(raw.get("topic"), "split.topic", allow_none=True),
                      gap_s=_num(raw.get("gap_s"), "split.gap_s", allow_none=True),
                      gap_topics=_strlist(raw.get("gap_topics"), "split.gap_topics"))
    if split.by not in SPLIT_MODES:
        raise TopicMapError(f"split.by: must be one of {SPLIT_MODES}, got {split.by!r}")
    if split.by == "topic" and not split.topic:
        raise TopicMapError("split.topic: required when split.by is 'topic'")
    if split.by == "gap" and not split.gap_s:
        raise TopicMapError("split.gap_s: required when split.by is 'gap'")
    return split
