"""Running one replay: options checked, parameters merged, the mode chosen (offline, live or
score-only), the report written (``OUT/report.json`` + plots) and summarised for the terminal."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from mode_ros.data.topic_map import TopicMapError, load_topic_map
from mode_ros.model.checkpoint import resolve_checkpoint
from mode_ros.ros.params import PARAMS, NodeParams, ParameterError
from mode_ros.replay.session import (NS, ModelInfo, ReplayError, ReplayOptions, Session, auto_topic_map,
                                     default_params_file, load_params_file, node_fqn, setup_session)

__all__ = ["run_replay", "finish_report", "format_summary", "run_score_only"]


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
    from mode_ros.replay.bag_stream import BagReadError, BagStream

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
    unknown = sorted(set(values) - {"use_sim_time"} - {p.name for p in PARAMS})
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
    model = None
    if opts.policy is not None:
        pol = opts.policy
        cfg = getattr(pol, "config", None)
        model = ModelInfo(list(pol.camera_names), int(pol.state_dim), int(pol.chunk_size), int(pol.action_dim),
                          list(pol.action_names), list(getattr(cfg, "gripper_dims", []) or []), None,
                          list(getattr(cfg, "state_names", []) or []))
    elif ckpt:
        model = ModelInfo.from_checkpoint(ckpt)
        values["checkpoint"] = str(resolve_checkpoint(ckpt).resolve())   # the node may run elsewhere
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
        from mode_ros.replay.offline import run_offline as run
    else:
        from mode_ros.replay.live import run_live as run
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
    from mode_ros.replay.bag_stream import BagReadError, BagStream

    opts = sess.opts
    if sess.model is None:
        raise ReplayError("--score needs --checkpoint (for the action/chunk sizes and gripper dims)")
    setup_session(sess)
    try:
        cb = BagStream(opts.score_chunks).open()
    except BagReadError as exc:
        raise ReplayError(f"--score: {exc}") from None
    try:
        topic = _chunk_topic(cb, opts)
        sess.problems += [f"chunks bag: {p}" for p in cb.problems]
        records = _chunk_records(cb, topic, sess.problems)
        nxt = next(records, None)
        scorer = sess.scorer
        t_run = time.perf_counter()
        for ev in sess.events():
            while nxt is not None and nxt.tick_ns <= ev.t:   # the chunks recorded up to this message
                scorer.add(nxt)
                sess.ticks.published += 1
                nxt = next(records, None)
            if ev.kind == "action" and scorer.rec is not None:
                scorer.rec.add(ev.source, ev.stamp_ns, ev.vec)
            scorer.advance(ev.t)
        for rec in ([nxt] if nxt is not None else []) + list(records):
            scorer.add(rec)
            sess.ticks.published += 1
        scorer.finish(sess.last_ns)
        sess.extra["run_wall_s"] = time.perf_counter() - t_run
        sess.extra["score_only"] = {"chunks_bag": str(opts.score_chunks), "topic": topic}
        sess.notes.append("score-only: ticks without output are unknown (only the recorded chunks are)")
        sess.ticks = None
    finally:
        cb.close()


def _chunk_topic(cb, opts: ReplayOptions) -> str:
    """The chunks bag's ActionChunk topic: the node's own when present, else the only one."""
    from mode_ros.data.rosmsgs import ACTION_CHUNK_TYPE

    topics = [t for t, ti in cb.topics.items() if ti.msgtype == ACTION_CHUNK_TYPE]
    want = node_fqn(opts.node_name, opts.namespace) + "/action_chunk"
    if want in topics:
        return want
    if len(topics) != 1:
        raise ReplayError(f"--score: need exactly one {ACTION_CHUNK_TYPE} topic in {opts.score_chunks}, found "
                          f"{topics or 'none'}")
    return topics[0]


def _chunk_records(cb, topic: str, problems: list[str]):
    """The recorded chunks as ChunkRecords (tick_ns = bag time), in bag order; an undecodable or malformed
    message is a problem and is skipped."""
    from mode_ros.replay.scoring import ChunkRecord

    for _tp, mt, t, raw in cb.messages([topic]):
        try:
            msg = cb.typestore.deserialize_cdr(raw, mt)
        except Exception:  # noqa: BLE001 - a corrupt message is reported, the rest is scored
            problems.append(f"chunks bag: undecodable ActionChunk at t={t}")
            continue
        try:
            yield ChunkRecord.from_message(msg, tick_ns=t)
        except ValueError as exc:
            problems.append(f"chunks bag: at t={t}: {exc}: not scored")


def finish_report(sess: Session) -> dict:
    """The replay's report (report.json in OUT) with its plots; every problem met on the way is in it."""
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
    rep = _report(sess, scores)
    rep.update(sess.extra)
    plots = _plots(sess, rep["mode"])
    rep["outputs"] = {"report": str(sess.out / "report.json"),
                      "chunks_bag": str(sess.out / "chunks") if (sess.out / "chunks").exists() else None,
                      "plots": plots}
    if (sess.out / "node.log").exists():
        rep["outputs"]["node_log"] = str(sess.out / "node.log")
    (sess.out / "report.json").write_text(json.dumps(_jsonable(rep), indent=1))
    return rep


def _report(sess: Session, scores: dict) -> dict:
    opts, dec = sess.opts, sess.decoder
    wall = time.perf_counter() - sess.t_start
    run_wall = sess.extra.pop("run_wall_s", wall)
    bag_s = ((sess.last_ns - sess.first_ns) / NS) if sess.first_ns is not None else 0.0
    return {
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
        "node_params": {k: sess.params_values.get(k) for k in REPORTED_PARAMS},
        "messages": {"read": sess.messages_read,
                     "per_topic": dict(dec.counts) if dec else {},
                     "bad": dict(dec.bad) if dec else {},
                     "bad_examples": dict(dec.bad_examples) if dec else {}},
        "timing": {"wall_s": round(wall, 3), "replay_wall_s": round(run_wall, 3), "bag_seconds": round(bag_s, 3),
                   "messages_per_s": round(sess.messages_read / run_wall, 1) if run_wall > 0 else None,
                   "bag_seconds_per_wall_second": round(bag_s / run_wall, 3) if run_wall > 0 else None},
        "ticks": sess.ticks.report() if sess.ticks is not None else None,
        "scores": scores,
    }


# the node parameters a replay report shows
REPORTED_PARAMS = ("control_rate_hz", "replan_every", "execution_strategy", "predict_state", "latency_compensation",
                   "temporal_ensembling", "max_observation_age", "camera_sync_tolerance", "action_lower_bounds",
                   "action_upper_bounds", "max_action_delta", "seed", "device")


def _plots(sess: Session, mode: str) -> list[str]:
    """The scorer's plots. They are a convenience: a failure is a note of the report (which stays ok when
    the replay and its scores are), never fatal."""
    from mode_ros.replay import scoring

    if sess.scorer is None:
        return []
    try:
        return scoring.write_plots(sess.scorer, sess.out, sess.first_ns or 0,
                                   title=f"({Path(sess.opts.bag).name}, {mode})")
    except Exception as exc:  # noqa: BLE001 - plots are a convenience, never fatal
        sess.notes.append(f"plots failed: {type(exc).__name__}: {exc}")
        return []


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
