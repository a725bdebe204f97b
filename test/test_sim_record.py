"""`mode-ros sim record`: expert demos written as readable rosbag2 with the documented topics/stamps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import mode_ros.sim  # noqa: F401  (headless GL backend before MuJoCo is imported)

pytest.importorskip("metaworld", reason="Meta-World not installed")
pytest.importorskip("rosbags")

import numpy as np  # noqa: E402

from mode_ros.sim import topics as T  # noqa: E402
from mode_ros.sim.metaworld_env import ACTION_NAMES, STATE_NAMES, instruction_for  # noqa: E402
from mode_ros.sim.record import RecordConfig, record, topic_map_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec")
    summary = record(RecordConfig(out=str(out), tasks=["reach-v3"], episodes_per_task=1, seed=0,
                                  image_size=24, noise=0.05, control_rate_hz=20.0), log=lambda s: None)
    return out, summary


def _read(bag: Path):
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore
    ts = get_typestore(Stores.ROS2_KILTED)
    with Reader(bag) as r:
        conns = {c.topic: c.msgtype for c in r.connections}
        msgs = [(c.topic, t, ts.deserialize_cdr(raw, c.msgtype)) for c, t, raw in r.messages()]
        qos = {c.topic: c.ext.offered_qos_profiles for c in r.connections}
    return conns, msgs, qos


def test_summary_and_layout(recorded):
    out, summary = recorded
    s = summary["tasks"]["reach-v3"]
    assert s["recorded"] == 1 and s["successes"] >= 1 and s["expert_success_rate"] > 0
    assert json.loads((out / "record_summary.json").read_text())["total"]["recorded"] == 1
    bags = sorted((out / "reach-v3").iterdir())
    assert len(bags) == 1 and (bags[0] / "metadata.yaml").exists()
    assert (out / "metaworld_topics.yaml").read_text() == topic_map_yaml(["corner", "gripperPOV"], 20.0)


def test_bag_topics_types_and_stamps(recorded):
    out, summary = recorded
    bag = out / summary["tasks"]["reach-v3"]["bags"][0]
    conns, msgs, qos = _read(bag)
    cams = {T.image_topic("corner"), T.image_topic("gripperPOV")}
    assert cams == {"/metaworld/corner/image_raw", "/metaworld/gripper_pov/image_raw"}
    assert conns == {**{c: T.IMAGE_TYPE for c in cams}, T.STATE_TOPIC: T.STATE_TYPE,
                     T.ACTION_TOPIC: T.ACTION_TYPE, T.GOAL_TOPIC: T.STRING_TYPE, T.EPISODE_TOPIC: T.STRING_TYPE}
    by = {}
    for topic, t, m in msgs:
        by.setdefault(topic, []).append((t, m))
    steps = summary["tasks"]["reach-v3"]["recorded_steps"]
    assert steps > 5
    for topic in (*cams, T.STATE_TOPIC, T.ACTION_TOPIC):
        assert len(by[topic]) == steps, topic
    # goal: once, the instruction, offered latched
    (t_goal, goal), = by[T.GOAL_TOPIC]
    assert goal.data == instruction_for("reach-v3")
    assert qos[T.GOAL_TOPIC] and qos[T.GOAL_TOPIC][0].durability.name == "TRANSIENT_LOCAL"
    # stamps: sim time, 1.0 s + k / 20 Hz, header stamp == bag time, same for every topic of a tick
    expect = [1_000_000_000 + k * 50_000_000 for k in range(steps)]
    assert t_goal == expect[0]
    for topic in (*cams, T.STATE_TOPIC):
        stamps = [m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec for _, m in by[topic]]
        assert stamps == expect == [t for t, _ in by[topic]], topic
    assert [t for t, _ in by[T.ACTION_TOPIC]] == expect
    img = by[T.image_topic("corner")][0][1]
    assert (img.height, img.width, img.encoding, img.step) == (24, 24, "rgb8", 72)
    assert img.header.frame_id == "corner_optical_frame"
    arr = np.asarray(img.data, np.uint8).reshape(24, 24, 3)
    assert arr.std() > 1
    js = by[T.STATE_TOPIC][0][1]
    assert list(js.name) == STATE_NAMES and len(js.position) == len(STATE_NAMES)
    act = np.stack([np.asarray(m.data) for _, m in by[T.ACTION_TOPIC]])
    assert act.shape == (steps, len(ACTION_NAMES)) and act.dtype == np.float32 and np.abs(act).max() <= 1
    # the state follows the actions: the hand moves between ticks
    pos = np.stack([np.asarray(m.position) for _, m in by[T.STATE_TOPIC]])
    assert np.abs(pos[-1, :3] - pos[0, :3]).max() > 0.01
    ev = [json.loads(m.data) for _, m in by[T.EPISODE_TOPIC]]
    assert [e["event"] for e in ev] == ["start", "end"] and ev[1]["success"] is True
    assert ev[0]["layout"]["split"] == "train" and ev[0]["task"] == "reach-v3"


def test_shipped_topic_map_matches_recorder():
    shipped = (ROOT / "config" / "metaworld_topics.yaml").read_text()
    assert shipped == topic_map_yaml()


def test_failed_episodes_are_not_written(tmp_path):
    summary = record(RecordConfig(out=str(tmp_path), tasks=["push-v3"], episodes_per_task=1, image_size=16,
                                  cameras=["corner"], max_steps=3, max_attempts=2, storage="sqlite3"),
                     log=lambda s: None)
    s = summary["tasks"]["push-v3"]
    assert (s["attempts"], s["successes"], s["recorded"]) == (2, 0, 0)
    assert not (tmp_path / "push-v3").exists()


def test_recorded_bag_converts_to_the_same_episode(recorded, tmp_path):
    """The project's bag converter, driven by the recorder's topic map, yields the recorded episode."""
    bag_mod = pytest.importorskip("mode_ros.data.bag")
    out, summary = recorded
    bag = out / summary["tasks"]["reach-v3"]["bags"][0]
    rep = bag_mod.convert_bags([bag], out / "metaworld_topics.yaml", tmp_path / "ep.hdf5", progress=False)
    assert rep["totals"]["episodes"] == 1 and rep["totals"]["dropped_ticks"] == 0
    _, msgs, _ = _read(bag)
    actions = np.stack([np.asarray(m.data) for topic, _, m in msgs if topic == T.ACTION_TOPIC])
    states = np.stack([np.asarray(m.position) for topic, _, m in msgs if topic == T.STATE_TOPIC])
    import h5py
    with h5py.File(tmp_path / "ep.hdf5") as f:
        demo = f["data"][sorted(f["data"])[0]]
        np.testing.assert_allclose(demo["actions"][:], actions, rtol=1e-6)
        np.testing.assert_allclose(demo["obs"]["state"][:], states, rtol=1e-6)
        assert demo["obs"]["static"].shape == (len(actions), 24, 24, 3)
        assert demo.attrs["language_instruction"] == instruction_for("reach-v3")
        assert float(f["data"].attrs["control_rate_hz"]) == 20.0
