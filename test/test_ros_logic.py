"""Unit tests of the ROS-free logic behind the policy node (mode_ros.control.execution/safety/sync/stats/params)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mode_ros.control.execution import ChunkExecutor, Plan, observation_seed
from mode_ros.ros.params import PARAMS, NodeParams, ParameterError, render_yaml, state_selection, validate
from mode_ros.control.safety import ActionSafety, NonFiniteActionError
from mode_ros.control.stats import Counters, RateLimitedLog, RateMeter, WindowStats
from mode_ros.control.sync import StampBuffer, match_stamps

T, A, DT = 10, 3, 0.1


def chunk(base: float) -> np.ndarray:
    """Row i = base + i in every dimension (so the row index can be read back from the value)."""
    return np.repeat((base + np.arange(T, dtype=np.float64))[:, None], A, axis=1)


def plan(base, obs_time, seq=1):
    return Plan(actions=chunk(base), obs_time=obs_time, ready_time=obs_time, sequence=seq)


# ---- execution ------------------------------------------------------------------------------------------
def test_latency_compensation_skips_overtaken_rows():
    ex = ChunkExecutor(T, A, DT)
    ex.add(plan(0, obs_time=10.0))
    s = ex.step(10.25)            # 0.25 s after the observation: rows 0, 1 are overtaken
    assert s.first_index == 2 and s.actions[0, 0] == 2 and s.actions.shape == (T - 2, A)
    assert ex.step(10.35).first_index == 3
    assert ex.step(10.999).first_index == 9
    assert ex.step(11.0) is None  # exhausted
    assert ex.newest is None


def test_slot_boundary_rounding():
    ex = ChunkExecutor(T, A, DT)
    ex.add(plan(0, obs_time=0.0))
    assert ex.step(0.3).first_index == 3   # 0.3/0.1 = 2.9999999999999996 in floating point


def test_without_latency_compensation_rows_advance_per_tick():
    ex = ChunkExecutor(T, A, DT, latency_compensation=False)
    ex.step(0.0)                          # ticks without a plan
    ex.add(plan(0, obs_time=99.5))        # old observation (5 periods): still starts at row 0
    steps = [ex.step(100.0 + i * DT) for i in range(3)]
    assert [s.row for s in steps] == [0, 1, 2] and [s.actions[0, 0] for s in steps] == [0, 1, 2]
    # ... executed 5 periods late: first_index keeps stamp + first_index * period = the tick's time
    assert [s.first_index for s in steps] == [5, 6, 7]


def test_chunk_due_marks_the_ticks_that_start_a_chunk():
    """lockstep_inference asks chunk_due at every tick: due without a plan, at replan_every rows into
    the plan (not one tick early, as needs_replan's latency lead is), and never while a pending chunk
    is about to take over."""
    ex = ChunkExecutor(T, A, DT, replan_every=3)
    assert ex.chunk_due(1.0)
    ex.add(plan(0, obs_time=1.0), now=1.0)
    due = [ex.chunk_due(1.0 + k * DT) for k in range(5)]
    assert due == [False, False, False, True, True]       # 1.3 s = row 3 (float: 2.9999... rounds up)
    assert ex.needs_replan(1.2) and not ex.chunk_due(1.2)  # the asynchronous request comes a tick earlier
    ex.pending = plan(10, obs_time=1.25)
    assert not ex.chunk_due(1.3)


def test_observation_seed_is_a_function_of_the_observation():
    stamps = [1_000_000_000 + k * 50_000_000 for k in range(200)]
    seeds = [observation_seed(0, s) for s in stamps]
    assert seeds == [observation_seed(0, s) for s in stamps]        # repeatable
    assert len(set(seeds)) == len(seeds)                              # every observation its own noise
    assert all(0 <= x < 2 ** 31 for x in seeds)
    assert seeds != [observation_seed(1, s) for s in stamps]
    assert observation_seed(-1, stamps[0]) is None                    # random


def test_restep_serves_the_same_tick_once():
    """A tick stepped without a plan, then served late from a plan that arrived meanwhile: the tick
    counter is not advanced twice (without latency compensation the next tick gets row 1, not row 0)."""
    ex = ChunkExecutor(T, A, DT, latency_compensation=False)
    assert ex.step(1.0) is None
    ex.add(plan(0, obs_time=1.0))
    assert ex.restep(1.0).first_index == 0
    assert [ex.step(1.1).first_index, ex.step(1.2).first_index] == [1, 2]


class _ConstPolicy:
    """What the controller needs of MoDEPolicy: a chunk whose row i is i, every call counted."""
    camera_names, state_dim = ["cam"], 0

    def __init__(self):
        self.calls = 0

    def predict_chunk(self, images, goal, state=None, seed=None):
        self.calls += 1
        return chunk(0)


def _image_msg():
    from types import SimpleNamespace
    return SimpleNamespace(encoding="rgb8", height=2, width=2, step=6, data=bytes(12), is_bigendian=0)


@pytest.mark.parametrize("serve_late,image_at,served", [
    (True, 1.0, True),      # the image for the tick came just after the tick: served late, for that tick
    (True, 1.03, False),    # an image taken after the tick cannot serve it: the next tick uses it
    (False, 1.0, False),    # serve_late_ticks off: the tick stays empty
])
def test_unserved_tick_is_served_when_its_input_arrives(serve_late, image_at, served):
    """The controller (driven offline) does as PolicyNode._kick_unserved/_serve_unserved: a tick that published nothing
    for want of an image is published as soon as the image arrives and the inference lands, before
    the next tick (this is what a lockstep simulator waits for)."""
    from mode_ros.replay.offline import OfflineDriver
    NS = 1_000_000_000
    p = NodeParams.from_mapping({"checkpoint": "x", "goal": "go", "serve_late_ticks": serve_late,
                                 "control_rate_hz": 10.0})
    pol = _ConstPolicy()
    emu = OfflineDriver(p, ["cam"], 0, T, A, policy=pol, latency=0.01)
    emu.set_clock(1 * NS)
    rec, key, _ = emu.tick()
    assert rec is None and key == "no_image"
    emu.set_clock(int(1.005 * NS))
    from mode_ros.replay.offline import IMAGE
    emu.on_image("cam", int(image_at * NS), IMAGE, _image_msg())
    assert pol.calls == (1 if serve_late else 0)          # the arrival requested the inference
    emu.set_clock(int(1.02 * NS))
    rec = emu.land(emu.vt.clock_ns)
    if served:
        assert rec is not None and rec.tick_ns == 1 * NS and rec.first_index == 0
        assert rec.plan.stamp == 1 * NS and emu.ctl.counters.get("late_served") == 1
    else:
        assert rec is None
    emu.set_clock(int(1.1 * NS))
    nxt, key, _ = emu.tick()
    if serve_late:
        assert nxt is not None and nxt.first_index == (1 if image_at <= 1.0 else 0)
    else:
        assert nxt is None and key == "no_plan"   # requested at this tick, ready for the next


def test_offline_emulation_of_lockstep_inference():
    """The controller (driven offline) does as lockstep_inference: every replan_every-th tick is served from row 0 of an
    inference on that tick's own image (stamp = the tick); a due tick whose image is older than one
    period publishes nothing (the node would wait for it), and the next tick with its image starts anew."""
    from mode_ros.replay.offline import IMAGE, OfflineDriver
    NS = 1_000_000_000
    p = NodeParams.from_mapping({"checkpoint": "x", "goal": "go", "lockstep_inference": True,
                                 "control_rate_hz": 10.0, "replan_every": 3})
    pol = _ConstPolicy()
    emu = OfflineDriver(p, ["cam"], 0, T, A, policy=pol, latency=0.5)   # latency plays no part
    out = []

    def row(rec):
        return (rec.tick_ns - NS) * 10 // NS, (rec.plan.stamp - NS) * 10 // NS, rec.first_index, rec.actions[0, 0]

    for k in range(13):
        t = NS + k * NS // 10
        emu.set_clock(t)
        if k not in (6, 10):                        # tick 6's image is missing, tick 10's comes late
            emu.on_image("cam", t, IMAGE, _image_msg())
        if k == 8:                                  # a frame stamped after the tick is not its observation
            emu.on_image("cam", t + NS // 10, IMAGE, _image_msg())
        rec, key, _ = emu.tick()
        out.append(key if rec is None else row(rec))
        if k == 10:
            emu.set_clock(t + NS // 100)
            emu.on_image("cam", t, IMAGE, _image_msg())
            rec = emu.land(emu.vt.clock_ns)                    # served late, from its own observation, row 0
            out.append(row(rec))
    assert out == [(0, 0, 0, 0), (1, 0, 1, 1), (2, 0, 2, 2), (3, 3, 0, 0), (4, 3, 1, 1), (5, 3, 2, 2),
                   "lockstep_wait", (7, 7, 0, 0), (8, 7, 1, 1), (9, 7, 2, 2), "lockstep_wait", (10, 10, 0, 0),
                   (11, 10, 1, 1), (12, 10, 2, 2)]
    assert pol.calls == 4


def test_rate_limit_holds_across_ticks_that_publish_nothing():
    """A camera gap stops the output for a while; when it resumes, the first action is limited relative
    to the last one published, not a jump to the model's new output (The controller (driven offline) does as the node's
    _on_tick; the limiter forgets only on activate and ~/enable false)."""
    from mode_ros.replay.offline import IMAGE, OfflineDriver
    NS = 1_000_000_000

    class Pol:
        camera_names, state_dim, value = ["cam"], 0, 0.0

        def predict_chunk(self, images, goal, state=None, seed=None):
            return np.full((T, A), self.value, np.float32)

    p = NodeParams.from_mapping({"checkpoint": "x", "goal": "go", "control_rate_hz": 10.0, "replan_every": 1,
                                 "max_action_delta": [0.1], "max_observation_age": 0.5})
    pol = Pol()
    emu = OfflineDriver(p, ["cam"], 0, T, A, policy=pol, latency=0.0)
    out, keys = [], []
    for k in range(10, 40):                     # 1.0 .. 3.9 s: no images during [2.0, 3.0)
        t = k * NS // 10
        emu.set_clock(t)
        if k == 30:
            pol.value = 1.0                     # the model now wants a jump of 1.0
        if not 20 <= k < 30:
            emu.on_image("cam", t, IMAGE, _image_msg())
        rec, key, _ = emu.tick()
        keys.append(key)
        late = emu.land(emu.vt.clock_ns)
        for r in (rec, late):
            if r is not None:
                out.append((k, r.actions))
    assert "stale" in keys                      # the gap gated ticks
    before = [a for k, a in out if k < 20]
    after = [a for k, a in out if k >= 30]
    assert before and after and np.allclose(before[-1], 0.0)
    assert np.all(after[0][0] <= 0.1 + 1e-6)    # limited relative to the last action before the gap
    steps = np.diff(np.concatenate([before[-1][:1], after[0]]), axis=0)
    assert np.all(np.abs(steps) <= 0.1 + 1e-6)
    assert np.isclose(after[-1][-1], 1.0).all()  # and it still gets there


def test_replan_request_time_and_pending_switch():
    ex = ChunkExecutor(T, A, DT, replan_every=5)
    assert ex.needs_replan(0.0)
    ex.add(plan(0, obs_time=0.0))
    # expected latency 0.15 s -> 2 ticks lead + 1 margin: request once row 2 is reached
    assert not ex.needs_replan(0.15, 0.15)
    assert ex.needs_replan(0.25, 0.15)
    ex.add(plan(100, obs_time=0.25, seq=2), now=0.32)   # early: pending until row 5 of the old plan
    assert ex.pending is not None and not ex.needs_replan(0.32, 0.15)
    assert ex.step(0.45).actions[0, 0] == 4              # still the old plan (row 4)
    s = ex.step(0.55)                                     # old plan at row 5 -> switch
    assert s.plan.sequence == 2 and s.first_index == 3 and s.actions[0, 0] == 103


def test_late_chunk_is_used_at_once_and_default_replan_is_chunk_size():
    ex = ChunkExecutor(T, A, DT)
    assert ex.replan_every == T
    ex.add(plan(0, obs_time=0.0))
    ex.add(plan(100, obs_time=0.9, seq=2), now=1.05)      # old plan already exhausted at 1.05
    assert ex.pending is None and ex.step(1.05).actions[0, 0] == 101


def test_reset_discards_plans():
    ex = ChunkExecutor(T, A, DT, replan_every=2)
    ex.add(plan(0, 0.0))
    ex.add(plan(1, 0.0), now=0.0)
    ex.reset()
    assert ex.newest is None and ex.pending is None and ex.step(0.0) is None


def test_temporal_ensembling_weights_older_chunks_more():
    m = 0.5
    ex = ChunkExecutor(T, A, DT, replan_every=1, temporal_ensembling=True, ensembling_decay=m)
    ex.add(plan(0, 0.0))                 # covers slot 0.2 with row 2 -> value 2
    ex.add(plan(100, 0.1, seq=2))        # row 1 -> 101
    s = ex.step(0.2)
    w0, w1 = 1.0, math.exp(-m)
    assert s.n_ensembled == 2
    assert s.actions[0, 0] == pytest.approx((w0 * 2 + w1 * 101) / (w0 + w1))
    # row j of the output ensembles the slot now + j*dt (both plans cover up to row 9 of plan 1)
    assert s.actions[1, 0] == pytest.approx((w0 * 3 + w1 * 102) / (w0 + w1))
    assert s.actions[-1, 0] == pytest.approx(109)        # slot only covered by the newer chunk
    assert s.plan.sequence == 2 and s.first_index == 1


def test_executor_validates_arguments():
    with pytest.raises(ValueError):
        ChunkExecutor(T, A, DT, replan_every=T + 1)
    with pytest.raises(ValueError):
        ChunkExecutor(T, A, 0.0)
    ex = ChunkExecutor(T, A, DT)
    with pytest.raises(ValueError):
        ex.add(Plan(actions=np.zeros((T, A + 1)), obs_time=0, ready_time=0))


# ---- safety --------------------------------------------------------------------------------------------------
def test_clipping_and_rate_limit_stay_in_bounds():
    s = ActionSafety(2, lower=[-1.0, 0.0], upper=[1.0, 0.5], max_delta=[0.1])
    out = s.apply(np.array([[5.0, -3.0], [5.0, 5.0]]))
    np.testing.assert_allclose(out, [[1.0, 0.0], [1.0, 0.1]], atol=1e-7)  # no previous: row 0 unlimited
    out = s.apply(np.array([[-5.0, 0.5], [-5.0, 0.5]]))
    np.testing.assert_allclose(out, [[0.9, 0.1], [0.8, 0.2]], atol=1e-6)  # from the executed [1, 0]
    assert out.dtype == np.float32
    assert (out >= np.float32([-1.0, 0.0])).all() and (out <= np.float32([1.0, 0.5])).all()
    s.reset()
    np.testing.assert_allclose(s.apply(np.array([[-5.0, 0.0]])), [[-1.0, 0.0]])


def test_float32_rounding_never_leaves_bounds():
    lo, hi = 0.1, 0.30000000000000004
    s = ActionSafety(1, lower=[lo], upper=[hi])
    out = s.apply(np.array([[1.0], [-1.0]]))
    assert out.max() <= np.float32(hi) and out.min() >= np.float32(lo)


def test_non_finite_chunks_are_rejected_whole():
    s = ActionSafety(2)
    with pytest.raises(NonFiniteActionError):
        s.apply(np.array([[0.0, np.nan]]))
    with pytest.raises(NonFiniteActionError):
        s.apply(np.array([[np.inf, 0.0]]))
    assert s.last is None


def test_safety_argument_checks():
    with pytest.raises(ValueError, match="lower bound > upper"):
        ActionSafety(2, lower=[1.0], upper=[0.0])
    with pytest.raises(ValueError, match="max_action_delta"):
        ActionSafety(2, max_delta=[0.0])
    with pytest.raises(ValueError, match="need 1 or 2"):
        ActionSafety(2, lower=[0, 0, 0])


# ---- sync --------------------------------------------------------------------------------------------------------
def test_match_stamps_picks_newest_consistent_set():
    stamps = {"static": [1.00, 1.10, 1.20], "gripper": [1.01, 1.11, 1.35]}
    assert match_stamps(stamps, 0.02) == {"static": 1, "gripper": 1}
    assert match_stamps(stamps, 0.2) == {"static": 2, "gripper": 1}   # nearest, not newest
    assert match_stamps({"a": [1.0], "b": [2.0]}, 0.5) is None
    assert match_stamps({"a": [1.0], "b": []}, 0.5) is None
    assert match_stamps({"a": [3.0]}, 0.0) == {"a": 0}


def test_stamp_buffer_sorted_and_bounded():
    b = StampBuffer(3)
    for t in (1.0, 3.0, 2.0, 4.0):
        b.add(t, t)
    assert [s for s, _ in b.snapshot()] == [2.0, 3.0, 4.0]
    assert b.latest_stamp() == 4.0 and b.received == 4


def test_rows_follow_the_grid_at_wall_clock_times():
    """Stamps and ticks exactly on a 100 Hz grid at wall-clock magnitude (1.7e9 s, where a double
    resolves ~2.4e-7 s): every tick executes the next row, none is repeated or skipped."""
    NS = 1_000_000_000
    period_ns = NS // 100
    bad = 0
    for c in range(300):
        base = 1_700_000_000 * NS + c * 37 * period_ns
        ex = ChunkExecutor(T, A, period_ns / NS, replan_every=T)
        obs = (base // NS) + (base % NS) * 1e-9                     # as from a header stamp
        ex.add(Plan(actions=chunk(0), obs_time=obs, ready_time=obs, sequence=1), obs)
        rows = [ex.step((base + k * period_ns) * 1e-9).first_index for k in range(T)]
        bad += rows != list(range(T))
    assert bad == 0, f"{bad} of 300 chunks repeated or skipped a row"
    # cameras exactly camera_sync_tolerance apart belong together (float seconds at wall-clock times)
    t = 1_700_000_000.123456
    assert match_stamps({"a": [t], "b": [t + 0.02]}, 0.02) == {"a": 0, "b": 0}
    assert match_stamps({"a": [t], "b": [t + 0.0201]}, 0.02) is None


def test_a_frame_stamped_ahead_of_the_clock_does_not_stay_the_newest():
    """A driver glitch stamps one frame 0.4 s ahead: without care it stays the newest (and is used) until
    the clock passes its stamp. The next frame stamped on time supersedes it; a camera whose stamps are
    all a little ahead (clock skew) keeps every frame."""
    b = StampBuffer(10)
    assert b.add(10.00, "a", now=10.01) == 0
    assert b.add(10.43, "glitch", now=10.04) == 0          # ahead of the clock: kept for now
    assert b.add(10.06, "b", now=10.07) == 1               # an on-time frame arrives: the glitch goes
    assert [p for _, p in b.snapshot()] == ["a", "b"] and b.latest_stamp() == 10.06
    skew = StampBuffer(10)
    for k in range(5):                                      # every frame 20 ms ahead of the receiver
        assert skew.add(1.0 + 0.033 * k + 0.02, k, now=1.0 + 0.033 * k) == 0
    assert len(skew) == 5


# ---- stats ----------------------------------------------------------------------------------------------------------
def test_stamp_buffer_as_received_by():
    """A late tick judges freshness from the images it had received by its scheduled time."""
    b = StampBuffer(3)
    b.add(1.00, "a", recv=1.01)
    b.add(1.10, "b", recv=1.12)
    b.add(1.05, "late", recv=1.20)        # out of order: sorted by stamp, received last
    assert b.latest_stamp() == 1.10
    assert b.latest_stamp(received_by=1.11) == 1.00
    assert b.latest_stamp(received_by=1.15) == 1.10
    b.add(1.30, "c", recv=1.31)           # evicts 1.00
    assert b.latest_stamp(received_by=1.11) == 1.05    # nothing kept is that old: the oldest kept
    b.add(1.40, "d")                      # no receive time: counts as received
    assert b.latest_stamp(received_by=0.0) == 1.40 and len(b) == 3


def test_window_stats_and_rate_meter():
    w = WindowStats(100)
    for x in range(1, 101):
        w.add(x / 1000)
    assert w.median() == pytest.approx(0.0505)
    assert w.percentile(99) == pytest.approx(0.09901)
    r = RateMeter(50)
    for i in range(50):
        r.tick(i * 0.1 + (0.001 if i % 2 else 0.0))
    assert r.rate() == pytest.approx(10.0, rel=0.01)
    assert 0.0005 < r.jitter() < 0.0015


def test_rate_limited_log_counts_suppressed():
    t = [0.0]
    out = []
    log = RateLimitedLog(2.0, clock=lambda: t[0])
    assert log("a", out.append, "first")
    assert not log("a", out.append, "again")
    assert log("b", out.append, "other key")
    t[0] = 2.5
    assert log("a", out.append, "later")
    assert out == ["first", "other key", "later (1 similar suppressed)"]


def test_counters():
    c = Counters()
    c.inc("rejected.x")
    c.inc("rejected.y", 2)
    assert c.total("rejected.") == 3 and c.get("nope") == 0


# ---- params -------------------------------------------------------------------------------------------------------------
def test_every_parameter_documented_and_defaults_valid():
    for p in PARAMS:
        assert p.description and validate(p.name, p.default) == p.default
    assert NodeParams.from_mapping({}) == NodeParams()
    text = render_yaml()
    for p in PARAMS:
        assert f"    {p.name}: " in text


@pytest.mark.parametrize("name,value,match", [
    ("control_rate_hz", 0.0, "control_rate_hz: 0.0 is out of range"),
    ("control_rate_hz", "fast", "control_rate_hz: expected double"),
    ("replan_every", True, "replan_every: expected int"),
    ("device", "gpu0", "device: 'gpu0' does not match"),
    ("image_transport", "theora", "image_transport: 'theora' is not one of"),
    ("action_lower_bounds", [0.0, float("nan")], "action_lower_bounds: NaN"),
    ("max_observation_age", float("inf"), "max_observation_age: must be finite"),
    ("nonexistent", 1, "nonexistent: unknown parameter"),
])
def test_invalid_parameter_values_name_the_parameter(name, value, match):
    with pytest.raises(ParameterError, match=match):
        validate(name, value)


def test_cross_checks_against_the_checkpoint():
    p = NodeParams.from_mapping({"replan_every": 11})
    with pytest.raises(ParameterError, match="replan_every"):
        p.check_against_policy(10, 7)
    p = NodeParams.from_mapping({"action_lower_bounds": [0.0, 0.0]})
    with pytest.raises(ParameterError, match="action_lower_bounds: has 2 values"):
        p.check_against_policy(10, 7)
    p = NodeParams.from_mapping({"action_lower_bounds": [1.0], "action_upper_bounds": [0.0]})
    with pytest.raises(ParameterError, match="lower > upper"):
        p.check_against_policy(10, 7)
    NodeParams.from_mapping({"action_lower_bounds": [-1.0] * 7, "max_action_delta": [0.5]}).check_against_policy(10, 7)
    # an infinite bound on the wrong side: no finite action could ever be published
    for bounds in ({"action_lower_bounds": [math.inf]}, {"action_upper_bounds": [-math.inf]}):
        with pytest.raises(ParameterError, match="no finite action"):
            NodeParams.from_mapping(bounds).check_against_policy(10, 7)
    # the state: joint names must match state_dim (per field), position_velocity needs an even state_dim
    p = NodeParams.from_mapping({"state_joint_names": ["a", "b"]})
    p.check_against_policy(10, 7, 2)
    p.check_against_policy(10, 7, 0)                      # no state: the names are not used
    with pytest.raises(ParameterError, match="has 2 names.*needs 3"):
        p.check_against_policy(10, 7, 3)
    p = NodeParams.from_mapping({"state_joint_names": ["a", "b"], "state_field": "position_velocity"})
    p.check_against_policy(10, 7, 4)
    with pytest.raises(ParameterError, match="even state_dim"):
        p.check_against_policy(10, 7, 3)
    assert validate("state_joint_names", None) == [""]   # `[]` in a params file arrives as "not set"


def test_state_selection_param_then_checkpoint_names():
    ck = ["hand_x", "hand_y", "gripper"]
    assert state_selection([""], ck, "position", 3) == ck                 # unset: the checkpoint's names
    assert state_selection(["a", "b", "c"], ck, "position", 3) == ["a", "b", "c"]   # the parameter wins
    assert state_selection([""], [], "position", 3) == []                 # unnamed checkpoint: message order
    assert state_selection([""], ck[:2], "position", 3) == []             # names that do not fit: unused
    assert state_selection([""], ["a", "a", "b"], "position", 3) == []    # ambiguous names: unused
    assert state_selection([""], ck, "velocity", 3) == ck                 # one field: names per value
    assert state_selection([""], ck, "position_velocity", 6) == []        # two fields: not the converter's
    assert state_selection([""], ck, "position", 0) == []                 # no state


def test_ros_arg_value_round_trips_through_yaml():
    """``-p name:=value`` arguments of started nodes: rcl reads the value as YAML, so every value
    must come back as the same type (a goal with ':' stays a string, inf stays a float)."""
    import yaml

    from mode_ros.ros.processes import ros_arg_value
    cases = [True, False, 3, 0.25, float("inf"), -float("inf"), "open the drawer: now", "true", "",
             [0.5, -1.0], ["static", "gripper"], [1, 2]]
    for v in cases:
        got = yaml.safe_load(ros_arg_value(v))
        assert got == v and type(got) is type(v), (v, ros_arg_value(v), got)
