"""The one chunk controller (mode_ros.control.controller) on a fake clock: what the policy node, offline
replay and sim eval all rely on (the node and offline replay drive this very class; see also the
late-serving / lockstep / rate-limit tests in test_ros_logic.py, which drive it through OfflineDriver)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from mode_ros.control.controller import ChunkController
from mode_ros.control.strategy import StrategyError, make_strategy
from mode_ros.control.virtual import VirtualTime
from mode_ros.ros.params import NodeParams

NS = 1_000_000_000
T, A = 10, 2
ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, t: float = 1.0):
        self.ns = int(t * NS)

    def __call__(self) -> int:
        return self.ns

    def at(self, t: float) -> "Clock":
        self.ns = int(round(t * NS))
        return self


class Policy:
    """Row i of each chunk is ``base + i`` (base = 100 * call number); records every call's kwargs."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, goal, state=None, seed=None, prefix=None):
        self.calls.append(dict(images=images, goal=goal, state=state, seed=seed, prefix=prefix))
        base = 100.0 * len(self.calls)
        return np.repeat((base + np.arange(T, dtype=np.float32))[:, None], A, axis=1)


def make(clock, cams=("cam",), state_dim=0, log=None, goal_check=None, **params):
    p = NodeParams.from_mapping({"checkpoint": "x", "control_rate_hz": 10.0, **params})
    return ChunkController(p, list(cams), state_dim, T, A, clock, log=log, goal_check=goal_check)


def run(ctl, clock, policy, t):
    """Feed a frame stamped t, tick at t, run a requested inference at once (zero latency)."""
    clock.at(t)
    ctl.on_image("cam", int(round(t * NS)), "img")
    res = ctl.tick()
    if res.request:
        ctl.infer(policy, lambda: 0.0)
    return res


def test_rows_follow_the_plan_and_a_new_chunk_is_requested_ahead():
    clock, pol = Clock(), Policy()
    ctl = make(clock, goal="go", replan_every=5)
    res = run(ctl, clock, pol, 1.0)
    assert res.output is None and res.key == "no_plan" and res.request          # first chunk requested
    rows = [run(ctl, clock, pol, 1.0 + k / 10).output for k in range(1, 6)]
    assert [r.actions[0, 0] for r in rows[:4]] == [101.0, 102.0, 103.0, 104.0]   # rows by time
    assert [r.first_index for r in rows[:4]] == [1, 2, 3, 4]
    assert len(pol.calls) == 2                      # the second chunk was requested one tick ahead of row 5
    assert rows[4].plan.sequence == 2 and rows[4].actions[0, 0] == 201.0   # replaced at row 5 of the first


def test_tick_grid_late_callback_missed_and_merged_ticks():
    clock = Clock()
    ctl = make(clock, goal="go")
    clock.at(1.25)                                   # scheduled at 1.0, runs 2.5 periods late
    assert ctl.tick(scheduled_ns=1 * NS).key == "no_image"
    assert ctl.last_tick_ns == int(1.2 * NS) and ctl.counters.get("missed_ticks") == 0   # first tick: none counted
    clock.at(1.55)
    ctl.tick(scheduled_ns=int(1.3 * NS))             # stands for 1.5: 1.3 and 1.4 were missed
    assert ctl.last_tick_ns == int(1.5 * NS) and ctl.counters.get("missed_ticks") == 2
    assert ctl.tick(scheduled_ns=int(1.5 * NS)).key == "merged"
    assert ctl.counters.get("late_ticks_merged") == 1


@pytest.mark.parametrize("params,feed,key", [
    ({"start_enabled": False, "goal": "go"}, True, "disabled"),
    ({}, True, "no_goal"),
    ({"goal": "go"}, False, "no_image"),
])
def test_gate(params, feed, key):
    clock = Clock()
    ctl = make(clock, **params)
    if feed:
        ctl.on_image("cam", clock(), "img")
    res = ctl.tick()
    assert res.output is None and res.key == key and ctl.counters.get(f"suppressed.{key}") == 1


def test_stale_camera_and_future_and_zero_stamps():
    clock = Clock(10.0)
    ctl = make(clock, goal="go", max_observation_age=0.5)
    ctl.on_image("cam", int(9.0 * NS), "old")
    assert ctl.tick().key == "stale"
    ctl.on_image("cam", int(11.0 * NS), "future")                 # 1 s ahead > max_observation_age
    assert ctl.counters.get("rejected.image_cam.future_stamp") == 1
    clock.at(10.1)
    ctl.on_image("cam", 0, "zero")                                 # a zero stamp is the receive time
    assert ctl.buffers["cam"].latest_stamp() == pytest.approx(10.1)


def test_refused_goal_stops_output_with_one_log_line():
    clock, pol, logs = Clock(), Policy(), []
    ok = {"open the drawer"}

    def check(text):
        return None if text in ok else "not among the cached instructions: 'open the drawer'"
    ctl = make(clock, log=lambda lvl, key, msg: logs.append((lvl, msg)), goal_check=check, goal="open the drawer")
    run(ctl, clock, pol, 1.0)
    assert run(ctl, clock, pol, 1.1).output is not None
    problem, _ = ctl.set_goal("wave hello", "~/goal")
    assert "cached instructions" in problem
    assert ctl.diagnostics()["reason"].startswith("goal refused")   # at once, not only from the next tick on
    refusals = [m for lvl, m in logs if "refused" in m]
    assert len(refusals) == 1 and "wave hello" in refusals[0] and "'open the drawer'" in refusals[0]
    assert ctl.goal == "" and ctl.counters.get("rejected.goal") == 1
    res = run(ctl, clock, pol, 1.2)
    assert res.output is None and res.key == "no_goal" and not res.request
    diag = ctl.diagnostics()
    assert diag["goals_refused"] == 1 and diag["last_failure"].startswith("goal refused")
    assert ctl.set_goal("open the drawer")[0] == "" and ctl.goal == "open the drawer"
    assert ctl.last_failure == ""


def test_goal_change_and_clock_jump_drop_the_plan_and_the_running_inference():
    clock, pol = Clock(), Policy()
    ctl = make(clock, goal="a")
    run(ctl, clock, pol, 1.0)
    clock.at(1.1)
    ctl.on_image("cam", clock(), "img")
    ctl.inflight = True
    req = ctl.prepare()                                            # an inference is running ...
    ctl.set_goal("b")                                              # ... when the goal changes
    assert ctl.finish(req, pol(None, "a"), 0.01) is None and ctl.counters.get("dropped_results") == 1
    assert ctl.executor.newest is None
    run(ctl, clock, pol, 1.2)
    assert ctl.executor.newest is not None
    clock.at(0.5)                                                  # simulator reset: clock back 0.7 s
    ctl.tick()
    assert ctl.counters.get("clock_jumps_back") == 1
    assert ctl.executor.newest is None and len(ctl.buffers["cam"]) == 0


def test_state_only_checkpoint_sends_the_state():
    """No cameras: the observation is the state (the emulator once dropped it: 0 of 87 ticks)."""
    clock, pol = Clock(), Policy()
    ctl = make(clock, cams=(), state_dim=3, goal="go")
    assert ctl.tick().key == "no_state"
    assert ctl.on_state(clock(), [1.0, 2.0, 3.0])                  # the unserved tick claims an inference
    out = ctl.infer(pol, lambda: 0.0)
    assert out is not None and out.tick_ns == clock() and out.late   # served late, for that tick
    np.testing.assert_array_equal(pol.calls[0]["state"], np.float32([1, 2, 3]))
    assert pol.calls[0]["images"] == []


def test_safety_step_clips_and_rate_limits():
    clock, pol = Clock(), Policy()
    ctl = make(clock, goal="go", action_upper_bounds=[150.0], max_action_delta=[50.0])
    run(ctl, clock, pol, 1.0)
    out = run(ctl, clock, pol, 1.1).output
    assert out.actions.max() <= 150.0
    assert np.all(np.abs(np.diff(out.actions[:, 0])) <= 50.0 + 1e-4)


def test_strategies_by_name():
    assert make_strategy("open_loop").executor(T, A, 0.1).replan_every == T
    assert make_strategy("ensemble", replan_every=1).executor(T, A, 0.1).temporal_ensembling
    with pytest.raises(StrategyError, match="execution_strategy"):
        make_strategy("magic")
    with pytest.raises(StrategyError, match="latency_compensation"):
        make_strategy("rtc_replace", latency_compensation=False)
    ctl = make(Clock(), goal="go", temporal_ensembling=True)
    assert ctl.strategy.name == "ensemble"


@pytest.mark.parametrize("method", ["replace", "guidance"])
def test_rtc_passes_the_previous_plan_aligned_to_the_new_chunk(method):
    """Replan every 5 with an inference taking 2 ticks: the request at row 2 of the running plan carries
    that plan's rows 2..9 as the new chunk's rows 0..7; 3 of them (rows 2, 3, 4, executed until the
    switch at row 5) are fixed. The estimated d is in the diagnostics."""
    vt = VirtualTime(start_ns=1 * NS)
    pol = Policy()
    p = NodeParams.from_mapping({"checkpoint": "x", "control_rate_hz": 10.0, "goal": "go", "replan_every": 5,
                                 "execution_strategy": f"rtc_{method}"})
    ctl = ChunkController(p, ["cam"], 0, T, A, vt.clock, initial_latency=0.2)
    vt.attach(ctl, pol, latency=lambda wall: 0.2)
    outs = []
    for k in range(8):
        t = NS + k * NS // 10
        o = vt.land(t)
        vt.set_clock(t)
        ctl.on_image("cam", t, "img")
        res = ctl.tick()
        if res.request:
            vt.start()
        outs.append(res.output or o)
    first, second = pol.calls[0], pol.calls[1]
    assert first["prefix"] is None                                 # no plan yet: the plain sampler
    pre = second["prefix"]
    assert pre.method == method and pre.fixed == 3
    np.testing.assert_array_equal(pre.actions[:, 0], np.arange(2, T, dtype=np.float32) + 100)
    diag = ctl.diagnostics()                                       # the last request's d
    assert diag["estimated_d"] == pol.calls[-1]["prefix"].fixed and diag["execution_strategy"] == f"rtc_{method}"
    switch = [o for o in outs if o is not None and o.plan.sequence == 2][0]
    assert switch.tick_ns == NS + 5 * NS // 10                     # at row 5 of the running plan
    assert switch.first_index == 3                                 # row 3 of the new chunk at the switch


def rtc_requests(params: dict, latency: float, ticks: int) -> list[dict]:
    """The policy calls of an rtc_replace controller (10 Hz, replan every 5, camera each tick) whose
    inferences take ``latency`` seconds of virtual time, over ``ticks`` ticks."""
    vt = VirtualTime(start_ns=1 * NS)
    pol = Policy()
    p = NodeParams.from_mapping({"checkpoint": "x", "control_rate_hz": 10.0, "goal": "go", "replan_every": 5,
                                 "execution_strategy": "rtc_replace", **params})
    ctl = ChunkController(p, ["cam"], 0, T, A, vt.clock, initial_latency=latency)
    vt.attach(ctl, pol, latency=lambda wall: latency)
    for k in range(ticks):
        t = NS + k * NS // 10
        vt.land(t)
        vt.set_clock(t)
        ctl.on_image("cam", t, "img")
        if ctl.tick().request:
            vt.start()
    return pol.calls


@pytest.mark.parametrize("hold", [0, 2])
def test_rtc_holds_the_plans_last_row_when_the_plan_ends_at_the_switch(hold):
    """d = 5 with 10-row chunks re-planned every 5: each chunk lands with only its rows 5..9 left, so the
    next request's prefix is those 5 rows, all of them frozen. ``rtc_hold_rows`` more rows repeat the
    plan's last row (the soft overlap after the switch); 0 keeps the plan's own rows only."""
    pre = rtc_requests({"rtc_hold_rows": hold}, latency=0.5, ticks=12)[1]["prefix"]
    assert pre.fixed == 5 and pre.rows == 5 + hold
    np.testing.assert_array_equal(pre.actions[:, 0], [105, 106, 107, 108, 109] + [109] * hold)
    w = pre.weights(T)
    assert np.all(w[:5] == 1) and np.all(w[5 + hold:] == 0)
    assert (hold == 0) or (1 > w[5] > w[6] > 0)                    # decaying pull over the held rows


def test_rtc_decay_hard_imposes_only_the_frozen_rows():
    """rtc_decay hard (for a prefix-trained checkpoint): the request's prefix still carries the plan's
    overlapping rows, but only the d frozen ones have weight; an unknown decay is refused by name."""
    pre = rtc_requests({"rtc_decay": "hard"}, latency=0.2, ticks=8)[1]["prefix"]
    assert pre.decay == "hard" and pre.fixed == 3 and pre.rows == T - 2
    np.testing.assert_array_equal(pre.weights(T), [1, 1, 1] + [0] * (T - 3))
    with pytest.raises(StrategyError, match="rtc_decay: 'cosine'"):
        make_strategy("rtc_replace", rtc_decay="cosine")


def test_node_and_offline_replay_drive_the_one_controller():
    """No second copy: the node and offline replay use ChunkController and none of the pieces it owns."""
    owned = {"ChunkExecutor", "ActionSafety", "output_gate", "match_stamps", "StampBuffer", "has_observation_in"}
    for rel in ("mode_ros/ros/policy_node.py", "mode_ros/replay/offline.py", "mode_ros/replay/live.py",
                "mode_ros/sim/evaluate.py"):
        tree = ast.parse((ROOT / rel).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not names & owned, (rel, names & owned)
    node = (ROOT / "mode_ros/ros/policy_node.py").read_text()
    offline = (ROOT / "mode_ros/replay/offline.py").read_text()
    assert "ChunkController(" in node and "ChunkController(" in offline


def test_enable_disable_and_deactivate_drop_the_plan():
    """~/enable false: nothing is published, the plan and the rate limiter's memory are dropped; enabling
    again claims an inference for the waiting tick at once (lockstep: the tick the simulator waits on)."""
    clock, pol = Clock(), Policy()
    ctl = make(clock, goal="go", max_action_delta=[1000.0], lockstep_inference=True, replan_every=5)
    run(ctl, clock, pol, 1.0)
    assert ctl.executor.newest is not None and ctl.safety.last is not None
    assert ctl.set_enabled(False) is False
    assert ctl.executor.newest is None and ctl.safety.last is None
    res = run(ctl, clock, pol, 1.1)
    assert res.output is None and res.key == "disabled"
    assert ctl.set_enabled(True) is True                         # the waiting tick at 1.1 can be served now
    out = ctl.infer(pol, lambda: 0.0)
    assert out is not None and out.tick_ns == int(1.1 * NS) and out.first_index == 0
    ctl.set_active(False)
    assert ctl.executor.newest is None
    clock.at(1.2)
    assert ctl.tick().key == "inactive"


def test_rejected_total_counts_each_rejection_once():
    """The shell adds a per-reason counter (rejected.<kind>:<reason>) beside the controller's
    rejected.<kind>: the /diagnostics total counts the input once, not twice."""
    clock = Clock()
    ctl = make(clock, goal="go")
    for _ in range(3):
        ctl.reject_input("image_cam", "camera cam: image rejected: too large", "too_large")
    d = ctl.diagnostics()
    assert d["rejected.image_cam"] == 3 and d["rejected.image_cam:too_large"] == 3
    assert d["rejected"] == 3
