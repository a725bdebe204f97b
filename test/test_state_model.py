"""predict_state: the state model (mode_ros.model.state_model) and the chunk controller rolling the state
forward over the inference delay (mode_ros.control.controller), on a fake clock."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mode_ros.control.controller import ChunkController
from mode_ros.control.virtual import VirtualTime
from mode_ros.model.state_model import STATE_MODEL_FILE, StateModel, StateModelError, load_state_model
from mode_ros.ros.params import NodeParams

NS = 1_000_000_000
T, A = 10, 2


def robot(s, s_prev, a):
    """A robot the linear model can represent: positions 0, 1 move by 0.5 a + 0.3 of the last motion;
    value 2 is fixed per run (a goal)."""
    return np.array([s[0] + 0.5 * a[0] + 0.3 * (s[0] - s_prev[0]), s[1] + 0.5 * a[1] + 0.3 * (s[1] - s_prev[1]), s[2]])


def runs(n=12, length=30, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        acts = rng.uniform(-1, 1, (length, A))
        s = [np.r_[rng.normal(size=2), rng.normal()]]
        s.append(robot(s[0], s[0], acts[0]))
        for t in range(1, length - 1):
            s.append(robot(s[t], s[t - 1], acts[t]))
        out.append((np.array(s), acts))
    return out


def test_state_model_fits_a_linear_robot_and_holds_what_never_changes():
    data = runs()
    m = StateModel.fit(data, horizon=5)
    assert m.predicted.tolist() == [True, True, False]                 # the fixed value is held
    assert m.report["transitions"] == sum(len(s) - 2 for s, _ in data)
    assert m.report["heldout_runs"] == 2 and m.report["error_ratio"][2] is None
    s, a = runs(n=1, seed=1)[0]
    pred = m.predict(s[3], s[2], a[3:8])                                # 5 ticks ahead
    np.testing.assert_allclose(pred, s[8], atol=1e-5)
    assert np.abs(s[8] - s[3])[:2].min() > 0.05                         # holding the state would be wrong
    np.testing.assert_array_equal(m.predict(s[3], s[2], np.zeros((0, A))), s[3].astype(np.float32))
    np.testing.assert_allclose(m.predict(s[3], s[2], a[3:8] * 50), m.predict(s[3], s[2], np.sign(a[3:8])),
                               atol=1e-6)                               # rows clipped to the actions seen
    with pytest.raises(StateModelError, match="no episodes"):
        StateModel.fit([])


def test_state_model_file_round_trips_and_a_bad_one_is_named(tmp_path):
    m = StateModel.fit(runs())
    m.save(tmp_path)
    back = load_state_model(tmp_path, 3, A)
    np.testing.assert_array_equal(back.weights, m.weights)
    assert back.predicted.tolist() == m.predicted.tolist() and back.report == m.report
    (tmp_path / "empty").mkdir()
    assert load_state_model(tmp_path / "empty", 3, A) is None                # a checkpoint without one
    with pytest.raises(StateModelError, match=f"{STATE_MODEL_FILE}: state model for state_dim 3"):
        load_state_model(tmp_path, 4, A)
    d = m.to_dict()
    d["weights"] = d["weights"][:-1]
    (tmp_path / STATE_MODEL_FILE).write_text(json.dumps(d))
    with pytest.raises(StateModelError, match="do not fit state_dim 3"):
        load_state_model(tmp_path, 3, A)
    (tmp_path / STATE_MODEL_FILE).write_text("{")
    with pytest.raises(StateModelError, match=STATE_MODEL_FILE):
        load_state_model(tmp_path, 3, A)


class Policy:
    """Row i of each chunk is ``base + i`` (base = 100 * call number); records every call's kwargs."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, goal, state=None, seed=None, prefix=None):
        self.calls.append(dict(state=state, prefix=prefix))
        base = 100.0 * len(self.calls)
        return np.repeat((base + np.arange(T, dtype=np.float32))[:, None], A, axis=1) / 1000.0


def drive(model, ticks=12, latency=0.5, states=None, **params):
    """A state-only controller at 10 Hz, replan every 5, inferences taking ``latency`` s of virtual time;
    the state at tick k is ``states(k)``. Returns (controller, policy calls, outputs by tick)."""
    vt = VirtualTime(start_ns=1 * NS)
    pol = Policy()
    p = NodeParams.from_mapping({"checkpoint": "x", "control_rate_hz": 10.0, "goal": "go", "replan_every": 5,
                                 **params})
    ctl = ChunkController(p, [], 3, T, A, vt.clock, initial_latency=latency, state_model=model)
    vt.attach(ctl, pol, latency=lambda wall: latency)
    states = states or (lambda k: np.array([0.1 * k, -0.05 * k, 1.0]))
    outs = []
    for k in range(ticks):
        t = NS + k * NS // 10
        o = vt.land(t)
        vt.set_clock(t)
        if states(k) is not None:
            ctl.on_state(t, states(k))
        res = ctl.tick()
        if res.request:
            vt.start()
        outs.append(res.output or o)
    return ctl, pol.calls, outs


def test_predict_state_rolls_the_state_over_the_delay_and_the_chunk_starts_where_it_lands():
    """d = 5: the chunk requested at tick 5 (when the first lands) is planned from the state at tick 5
    rolled forward over the first chunk's rows 5..9 (the ticks 5..9 it executes meanwhile), and runs
    from its own row 0 at tick 10; ActionChunk.first_index still counts from the observation (5 + row)."""
    model = StateModel.fit(runs())
    ctl, calls, outs = drive(model)
    first, second = calls[0], calls[1]
    np.testing.assert_array_equal(first["state"], np.float32([0, 0, 1]))     # no plan yet: as observed
    s5, s4 = np.array([0.5, -0.25, 1.0]), np.array([0.4, -0.2, 1.0])
    rows = np.repeat((100 + np.arange(5, 10, dtype=np.float32))[:, None], A, axis=1) / 1000.0
    np.testing.assert_allclose(second["state"], model.predict(s5, s4, rows), atol=1e-6)
    assert not np.allclose(second["state"], s5.astype(np.float32))
    at10 = outs[10]
    assert at10.plan.sequence == 2 and at10.plan.lead == 5
    assert at10.actions[0, 0] == pytest.approx(0.2)                          # row 0 of the second chunk
    assert at10.first_index == 5 and at10.plan.stamp == NS + 5 * NS // 10   # periods from its observation
    diag = ctl.diagnostics()
    assert diag["predict_state"] == "on" and diag["predicted_ticks"] == 5
    # without it: the second chunk executes from its row 5 at tick 10, on the state as observed
    _, calls_off, outs_off = drive(model, predict_state="never")
    np.testing.assert_array_equal(calls_off[1]["state"], s5.astype(np.float32))
    assert outs_off[10].actions[0, 0] == pytest.approx(0.205) and outs_off[10].first_index == 5


def test_predict_state_is_skipped_with_a_reason_without_the_state_one_period_before():
    """The model steps one control period: with states two periods apart there is no previous state,
    so the chunk is planned from the state as observed (counted, logged once per rate-limit key)."""
    model = StateModel.fit(runs())
    ctl, calls, _ = drive(model, states=lambda k: np.array([0.1 * k, 0.0, 1.0]) if k % 5 == 0 else None)
    np.testing.assert_array_equal(calls[1]["state"], np.float32([0.5, 0.0, 1.0]))
    assert ctl.counters.get("state_prediction_skipped") >= 1
    assert ctl.diagnostics()["predicted_ticks"] == 0


@pytest.mark.parametrize("params, model, status", [
    ({}, None, "off (the checkpoint has no state model)"),
    ({"predict_state": "never"}, "fit", "off (predict_state never)"),
    ({"lockstep_inference": True}, "fit", "off (lockstep_inference)"),
])
def test_predict_state_off_leaves_the_observed_state(params, model, status):
    ctl, calls, _ = drive(StateModel.fit(runs()) if model else None, **params)
    assert ctl.diagnostics()["predict_state"] == status
    fed = {tuple(np.float32([0.1 * k, -0.05 * k, 1.0])) for k in range(12)}
    assert len(calls) >= 2 and all(tuple(c["state"]) in fed for c in calls)        # states as observed
    assert ctl.last_lead == 0


def test_a_checkpoint_carries_its_state_model_and_a_broken_one_is_named(tmp_path):
    """save_pretrained writes state_model.json; from_pretrained loads it (the node and sim eval hand it to
    the controller); a file that does not fit the checkpoint is a CheckpointError naming it."""
    import torch

    from mode_ros.model.checkpoint import CheckpointError
    from mode_ros.model.policy import MoDEPolicy

    policy = MoDEPolicy.from_preset("tiny", seed=2, camera_names=[], state_dim=3, action_dim=A,
                                    vision={"arch": "none", "image_size": [32, 32], "random_shift_pad": [0]}).eval()
    policy.set_goal_embeddings({"go": torch.randn(512)})
    assert policy.state_model is None
    policy.state_model = StateModel.fit(runs())
    policy.save_pretrained(tmp_path / "ck")
    back = MoDEPolicy.from_pretrained(tmp_path / "ck")
    np.testing.assert_array_equal(back.state_model.weights, policy.state_model.weights)
    d = back.state_model.to_dict()
    d["action_dim"], d["weights"] = 3, d["weights"] + [[0.0] * 3]   # a model for another action size
    d["action_low"], d["action_high"] = d["action_low"] + [-1.0], d["action_high"] + [1.0]
    (tmp_path / "ck" / STATE_MODEL_FILE).write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=f"{STATE_MODEL_FILE}: state model for state_dim 3, action_dim 3"):
        MoDEPolicy.from_pretrained(tmp_path / "ck")


def _tiny_state_checkpoint(path):
    import torch

    from mode_ros.model.policy import MoDEPolicy
    policy = MoDEPolicy.from_preset("tiny", seed=2, camera_names=[], state_dim=3, action_dim=A,
                                    vision={"arch": "none", "image_size": [32, 32], "random_shift_pad": [0]}).eval()
    policy.set_goal_embeddings({"go": torch.randn(512)})
    return policy.save_pretrained(path)


def test_fit_state_model_command_writes_the_checkpoints_model(tmp_path, capsys):
    """`mode-ros fit-state-model` (for a checkpoint trained before the trainer fitted one): episodes with the
    checkpoint's state layout -> state_model.json in the checkpoint and a per-value table; a state of
    another size is refused (exit 2) and nothing is written."""
    from mode_ros.cli import main
    from mode_ros.data.episodes import EpisodeWriter

    ck = _tiny_state_checkpoint(tmp_path / "ck")
    data = tmp_path / "ep.hdf5"
    with EpisodeWriter(data, [], ["x", "y"], control_rate_hz=10.0, state_keys=["pos", "extra"]) as w:
        for s, a in runs():
            w.add_episode(a.astype(np.float32), {}, "go",
                          states={"pos": s.astype(np.float32), "extra": s[:, :1].astype(np.float32)})
    assert main(["fit-state-model", "--checkpoint", str(ck), "--data", str(data), "--state-keys", "pos,extra"]) == 2
    assert "state_dim 4" in capsys.readouterr().err and not (ck / STATE_MODEL_FILE).exists()
    assert main(["fit-state-model", "--checkpoint", str(ck), "--data", str(data), "--state-keys", "pos"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"state\[0\]\s+yes", out) and re.search(r"state\[2\]\s+no\s+-", out)
    model = load_state_model(ck, 3, A)
    assert model.predicted.tolist() == [True, True, False]


def test_a_state_fresher_than_the_images_is_rolled_over_fewer_rows():
    """Images stamped one period before their tick (camera latency), joint states at the tick. The first
    chunk comes from the image stamped 0.9 s (its row j is for 0.9 + 0.1 j s) and lands at 1.5 s; the second
    is requested then, from the image stamped 1.4 s and the state of 1.5 s, and lands at 2.0 s. Its row 0 is
    for 2.0 s (6 periods after its image), but the state is rolled only over the rows run from 1.5 s on:
    the first chunk's rows 6..9 (its plan ends at row 9), not 5..9 as counting from the image would."""
    model = StateModel.fit(runs())
    vt = VirtualTime(start_ns=1 * NS)
    pol = Policy()
    p = NodeParams.from_mapping({"checkpoint": "x", "control_rate_hz": 10.0, "goal": "go", "replan_every": 5,
                                 "predict_state": "always"})     # auto: not for a camera policy
    ctl = ChunkController(p, ["cam"], 3, T, A, vt.clock, initial_latency=0.5, state_model=model)
    vt.attach(ctl, pol, latency=lambda wall: 0.5)
    for k in range(7):
        t = NS + k * NS // 10
        vt.land(t)
        vt.set_clock(t)
        ctl.on_image("cam", t - NS // 10, "img")
        ctl.on_state(t, np.array([0.1 * k, -0.05 * k, 1.0]))
        if ctl.tick().request:
            vt.start()
    rows = np.repeat((100 + np.arange(T, dtype=np.float32))[:, None], A, axis=1) / 1000.0
    s5, s4 = np.array([0.5, -0.25, 1.0]), np.array([0.4, -0.2, 1.0])
    np.testing.assert_allclose(pol.calls[1]["state"], model.predict(s5, s4, rows[6:10]), atol=1e-6)
    assert not np.allclose(pol.calls[1]["state"], model.predict(s5, s4, rows[5:10]), atol=1e-4)
    assert ctl.last_lead == 6 and ctl.diagnostics()["predicted_ticks"] == 6


def test_joint_states_faster_than_the_control_rate_give_the_state_one_period_back():
    """Joint states at 1 kHz, control at 10 Hz: the previous state for the model is the one 100 ms before
    the newest (not the one 1 ms before), and the controller keeps only the last two periods of them."""
    model = StateModel.fit(runs())
    clock = [NS]
    p = NodeParams.from_mapping({"checkpoint": "x", "control_rate_hz": 10.0, "goal": "go"})
    ctl = ChunkController(p, [], 3, T, A, lambda: clock[0], state_model=model)
    for i in range(1000):                                         # one second at 1 kHz: x = time in s
        clock[0] = NS + i * 1_000_000
        ctl.on_state(clock[0], [i / 1000, 0.0, 1.0])
    prev = ctl.state_before(ctl.state[0])
    assert prev[0] == pytest.approx(0.899) and len(ctl.state_history) <= 202


def test_auto_predicts_for_a_state_only_policy_and_not_for_a_camera_policy():
    """predict_state auto (the default): a camera policy's images cannot be rolled forward with its state
    (the MT6 image policy lost success with it: 0.858 -> 0.775 at d = 5), so auto leaves it off there."""
    model = StateModel.fit(runs())
    p = NodeParams.from_mapping({"checkpoint": "x", "control_rate_hz": 10.0})
    assert p.predict_state == "auto"
    clock = lambda: NS  # noqa: E731
    assert ChunkController(p, [], 3, T, A, clock, state_model=model).predict_state_status() == "on"
    cam = ChunkController(p, ["cam"], 3, T, A, clock, state_model=model).predict_state_status()
    assert cam.startswith("off (auto:")
    always = NodeParams.from_mapping({"checkpoint": "x", "control_rate_hz": 10.0, "predict_state": "always"})
    assert ChunkController(always, ["cam"], 3, T, A, clock, state_model=model).predict_state_status() == "on"
    with pytest.raises(Exception, match="predict_state"):
        NodeParams.from_mapping({"checkpoint": "x", "predict_state": "sometimes"})
