"""rosbag2 -> episodes: bags written here with rosbags (sqlite3 and mcap), converted, and checked
against an independent re-computation of the resampling rule."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from mode_ros.data.bag import BagWriter, convert_bags, report_path_for
from mode_ros.data.episodes import EpisodeReader
from mode_ros.data.images import encode_compressed, encode_image
from mode_ros.data.topic_map import TopicMapError, load_topic_map

S = 1_000_000_000
H, W = 6, 8
T0 = 100 * S  # bag start (ns)


def frame(k: int, cam: int) -> np.ndarray:
    """A frame whose pixels identify (camera, message index k); distinct values per channel."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = k % 256
    img[..., 1] = (3 * k + 7 * cam) % 256
    img[..., 2] = (255 - k) % 256
    img[0, 0] = (cam, cam, cam)
    return img


def mono_frame(k: int) -> np.ndarray:
    return np.full((H, W, 3), (5 * k) % 256, np.uint8)


def ns(t: float) -> int:
    return T0 + int(round(t * S))


class Rec:
    """Writes a bag and remembers (stamp, value) per stream for the expected-result computation."""

    def __init__(self, path, storage):
        self.w = BagWriter(path, storage)
        self.T = self.w.types
        self.truth: dict[str, list] = {}

    def __enter__(self):
        self.w.__enter__()
        return self

    def __exit__(self, *e):
        self.w.__exit__(*e)

    def keep(self, name, stamp, value):
        self.truth.setdefault(name, []).append((stamp, value))

    def image(self, topic, t_stamp, t_recv, img, encoding="rgb8", pad=0, corrupt=False):
        e = encode_image(img, encoding, pad=pad)
        data = np.frombuffer(e.data, np.uint8)
        if corrupt:
            data = data[: len(data) // 2]
        m = self.T["sensor_msgs/msg/Image"](header=self.w.header(t_stamp, "cam"), height=e.height, width=e.width,
                                            encoding=e.encoding, is_bigendian=0, step=e.step, data=data)
        self.w.write(topic, "sensor_msgs/msg/Image", m, t_recv)

    def compressed(self, topic, t_stamp, t_recv, payload: bytes, fmt="png"):
        m = self.T["sensor_msgs/msg/CompressedImage"](header=self.w.header(t_stamp, "cam"), format=fmt,
                                                      data=np.frombuffer(payload, np.uint8))
        self.w.write(topic, "sensor_msgs/msg/CompressedImage", m, t_recv)

    def string(self, topic, t_recv, text):
        self.w.write(topic, "std_msgs/msg/String", self.T["std_msgs/msg/String"](data=text), t_recv)

    def joint_state(self, topic, t_stamp, t_recv, names, pos, vel=None):
        m = self.T["sensor_msgs/msg/JointState"](header=self.w.header(t_stamp), name=list(names),
                                                 position=np.asarray(pos, np.float64),
                                                 velocity=np.asarray(vel if vel is not None else [], np.float64),
                                                 effort=np.zeros(0))
        self.w.write(topic, "sensor_msgs/msg/JointState", m, t_recv)

    def f32array(self, topic, t_recv, values):
        T = self.T
        layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
        m = T["std_msgs/msg/Float32MultiArray"](layout=layout, data=np.asarray(values, np.float32))
        self.w.write(topic, "std_msgs/msg/Float32MultiArray", m, t_recv)

    def twist(self, topic, t_stamp, t_recv, v6):
        T = self.T
        V = T["geometry_msgs/msg/Vector3"]
        m = T["geometry_msgs/msg/TwistStamped"](header=self.w.header(t_stamp), twist=T["geometry_msgs/msg/Twist"](
            linear=V(x=v6[0], y=v6[1], z=v6[2]), angular=V(x=v6[3], y=v6[4], z=v6[5])))
        self.w.write(topic, "geometry_msgs/msg/TwistStamped", m, t_recv)

    def chunk(self, topic, t_stamp, t_recv, actions, first_index=0, period_ns=S // 10):
        T = self.T
        n, a = actions.shape
        m = T["mode_ros/msg/ActionChunk"](
            header=self.w.header(t_stamp), control_period=T["builtin_interfaces/msg/Duration"](sec=0, nanosec=period_ns),
            chunk_size=n, action_dim=a, action_names=[], actions=actions.astype(np.float32).reshape(-1),
            first_index=first_index, sequence=1, tick=1, goal="g",
            inference_latency=T["builtin_interfaces/msg/Duration"](sec=0, nanosec=0))
        self.w.write(topic, "mode_ros/msg/ActionChunk", m, t_recv)


def expected(ticks_start, n_max, streams, tol, rate=10.0):
    """Independent (loop) re-implementation of the rule: per tick, per stream, the latest message
    at or before the tick, at most `tol` old; else the tick is dropped with a reason."""
    keep, picks, drops = [], {k: [] for k in streams}, {}
    for i in range(n_max):
        t = ticks_start + int(round(i * S / rate))
        ok = True
        chosen = {}
        for name, msgs in streams.items():
            cands = [(st, v) for (st, v) in msgs if st <= t]
            if not cands:
                drops[f"missing:{name}"] = drops.get(f"missing:{name}", 0) + 1
                ok = False
                continue
            st, v = max(cands, key=lambda x: x[0])
            if t - st > tol[name]:
                drops[f"stale:{name}"] = drops.get(f"stale:{name}", 0) + 1
                ok = False
                continue
            chosen[name] = v
        if ok:
            keep.append(t)
            for k in streams:
                picks[k].append(chosen[k])
    return keep, picks, drops


def write_main_bag(path, storage, rng):
    """~4 s: static Image rgb8 with row padding at 20 Hz, gripper CompressedImage PNG at 15 Hz,
    mono8 'side' Image at 12 Hz, JointState actions at 30 Hz (jittered header stamps, joint order
    shuffled), Float32MultiArray gripper at 25 Hz (no header -> receive time), language String.
    Injected faults: a static-camera gap of 0.5 s, an undecodable compressed frame (garbage), a
    truncated PNG (valid header, decodes badly in pass 2), a short raw image, a NaN action."""
    r = Rec(path, storage)
    static, grip, side, acts, grips, state = [], [], [], [], [], []
    with r:
        r.string("/goal", ns(-0.5), "stack the red block")
        for k in range(80):                         # 20 Hz, 0.00 .. 3.95
            t = k * 0.05
            if 2.0 < t < 2.5:                       # camera gap (frames 2.05..2.45 missing)
                continue
            st = ns(t) + int(rng.integers(-2, 3)) * 1_000_000
            if k == 10:                             # short raw image -> bad in pass 1
                r.image("/cam/static", st, st + 5_000_000, frame(k, 0), "rgb8", pad=4, corrupt=True)
                continue
            r.image("/cam/static", st, st + 5_000_000, frame(k, 0), "rgb8", pad=4)
            static.append((st, frame(k, 0)))
        for k in range(60):                         # 15 Hz
            st = ns(k / 15) + int(rng.integers(-2, 3)) * 1_000_000
            if k == 20:                             # garbage -> bad in pass 1, previous frame used if fresh
                r.compressed("/cam/grip/compressed", st, st + 3_000_000, b"definitely not an image")
                continue
            png = encode_compressed(frame(k, 1), "png")
            if k == 40:                             # truncated PNG -> pass 2 decode error
                png = png[: len(png) - 30]
            r.compressed("/cam/grip/compressed", st, st + 3_000_000, png)
            grip.append((st, "BAD" if k == 40 else frame(k, 1)))
        for k in range(48):                         # 12 Hz mono8
            st = ns(k / 12)
            r.image("/cam/side", st, st + 1_000_000, mono_frame(k), "mono8")
            side.append((st, mono_frame(k)))
        names = ["j2", "j0", "j1", "extra"]
        for k in range(120):                        # 30 Hz JointState
            st = ns(k / 30) + int(rng.integers(-3, 4)) * 1_000_000
            pos = {"j0": k * 0.01, "j1": -k * 0.02, "j2": 0.5, "extra": 9.0}
            if k == 50:
                pos["j1"] = float("nan")
            r.joint_state("/arm/command", st, st + 2_000_000, names, [pos[n] for n in names])
            if k != 50:
                acts.append((st, np.array([pos["j0"], pos["j1"], pos["j2"]])))
                state.append((st, np.array([pos["j0"], pos["j1"]])))
        for k in range(100):                        # 25 Hz Float32MultiArray (receive time)
            rt = ns(k / 25 + 0.004)
            r.f32array("/gripper/command", rt, [float(k % 2), 7.0])
            grips.append((rt, np.array([float(k % 2)], np.float32)))
    return {"camera:static": static, "camera:gripper": grip, "camera:side": side,
            "action[0]:/arm/command": acts, "action[1]:/gripper/command": grips, "state:joint_pos": state}


TOPICS = {
    "control_rate_hz": 10,
    "tolerance_s": 0.1,
    "cameras": {"static": {"topic": "/cam/static"}, "gripper": "/cam/grip/compressed",
                "side": {"topic": "/cam/side", "tolerance_s": 0.12}},
    "language": {"topic": "/goal"},
    "action": [{"topic": "/arm/command", "field": "position", "joints": ["j0", "j1", "j2"], "tolerance_s": 0.05},
               {"topic": "/gripper/command", "indices": [0], "tolerance_s": 0.05}],
    "state": [{"topic": "/arm/command", "joints": ["j0", "j1"], "key": "joint_pos", "tolerance_s": 0.05}],
}


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_resampling_matches_written(tmp_path, storage):
    rng = np.random.default_rng(0)
    truth = write_main_bag(tmp_path / "bag", storage, rng)
    out = tmp_path / "ep.hdf5"
    rep = convert_bags([tmp_path / "bag"], TOPICS, out, progress=False)
    assert report_path_for(out).exists()
    assert json.loads(report_path_for(out).read_text())["totals"]["episodes"] == 1
    (ep_rep,) = rep["bags"][0]["episodes"]
    assert ep_rep["episode"] == "demo_0" and ep_rep["instruction"] == "stack the red block"

    # independent expectation
    tol = {"camera:static": 0.1 * S, "camera:gripper": 0.1 * S, "camera:side": 0.12 * S,
           "action[0]:/arm/command": 0.05 * S, "action[1]:/gripper/command": 0.05 * S,
           "state:joint_pos": 0.05 * S}
    start = max(v[0][0] for v in truth.values())
    end = min(v[-1][0] + tol[k] for k, v in truth.items())
    n = int(np.floor((end - start) / (S / 10) + 1e-9)) + 1
    keep, picks, drops = expected(start, n, truth, tol)
    # ticks whose picked gripper frame is the truncated PNG are dropped in pass 2
    bad_png = [i for i, v in enumerate(picks["camera:gripper"]) if isinstance(v, str)]
    assert len(bad_png) >= 1
    drops["bad_image:gripper"] = len(bad_png)
    keep = [t for i, t in enumerate(keep) if i not in bad_png]
    picks = {k: [v for i, v in enumerate(vs) if i not in bad_png] for k, vs in picks.items()}

    assert ep_rep["candidate_ticks"] == n
    assert ep_rep["dropped"] == drops
    assert ep_rep["ticks"] == len(keep) and ep_rep["dropped_ticks"] == n - len(keep)
    assert drops.get("stale:camera:static", 0) >= 3   # the 0.5 s gap > 0.1 s tolerance
    streams = ep_rep["streams"]
    assert streams["camera:static"]["bad_messages"] == {"data_too_short": 1}
    assert streams["camera:gripper"]["bad_messages"] == {"corrupt_compressed": 1, "truncated": 1}
    assert streams["action[0]:/arm/command"]["bad_messages"] == {"non_finite": 1}
    assert streams["action[1]:/gripper/command"]["time_source"] == "receive"
    assert streams["camera:static"]["time_source"] == "header"
    assert 0.45 <= streams["camera:static"]["max_gap_s"] <= 0.6
    assert abs(streams["action[0]:/arm/command"]["rate_hz"] - 30) < 1.5

    with EpisodeReader(out) as rd:
        assert rd.camera_names == ["static", "gripper", "side"]
        assert rd.action_names == ["j0", "j1", "j2", "gripper/command[0]"]
        assert rd.state_keys == ["joint_pos"]
        assert rd.control_rate_hz == 10
        ep = rd.episode(0)
        assert ep.length == len(keep)
        np.testing.assert_array_equal(np.round(ep.timestamps * 1e9).astype(np.int64), keep)
        exp_act = np.concatenate([np.stack(picks["action[0]:/arm/command"]),
                                  np.stack(picks["action[1]:/gripper/command"])], axis=1)
        np.testing.assert_allclose(ep.actions, exp_act.astype(np.float32), rtol=0, atol=1e-7)
        np.testing.assert_allclose(ep.state("joint_pos"), np.stack(picks["state:joint_pos"]).astype(np.float32),
                                   atol=1e-7)
        for cam in ("static", "gripper", "side"):
            imgs = ep.images(cam)
            np.testing.assert_array_equal(imgs, np.stack(picks[f"camera:{cam}"]))
        assert ep.language == "stack the red block"
    with h5py.File(out) as f:
        ds = f["data/demo_0/obs/static"]
        assert ds.chunks == (1, H, W, 3) and ds.compression == "gzip"


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bag_split_by_gap_twist_and_fixed_instruction(tmp_path, storage):
    """TwistStamped actions stop for 2 s in the middle -> two episodes; bgr8/rgba8/bgra8 cameras."""
    r = Rec(tmp_path / "bag", storage)
    twists = []
    with r:
        for k in range(100):                         # 20 Hz bgr8 + rgba8 frames, 0..4.95 s
            st = ns(k * 0.05)
            r.image("/cam/a", st, st, frame(k, 0), "bgr8")
            r.image("/cam/b", st, st, frame(k, 2), "bgra8" if k % 2 else "rgba8")
        for k in range(40):                          # 10 Hz twist, 0..1.9 and 3.0..4.9 (gap 1.1 s)
            t = k * 0.1 if k < 20 else 3.0 + (k - 20) * 0.1
            v = [k * 0.1, 0, 0, 0, 0, -k * 0.1]
            r.twist("/cmd", ns(t) + 1_000_000, ns(t) + 2_000_000, v)
            twists.append((ns(t) + 1_000_000, v))
    topics = {"control_rate_hz": 10, "tolerance_s": 0.06,
              "cameras": {"a": "/cam/a", "b": "/cam/b"},
              "language": {"instruction": "wipe the table"},
              "action": {"topic": "/cmd", "tolerance_s": 0.15},
              "split": {"by": "gap", "gap_s": 0.5}}
    rep = convert_bags([tmp_path / "bag"], topics, tmp_path / "o.hdf5", progress=False)
    eps = [e for e in rep["bags"][0]["episodes"] if e["episode"]]
    assert len(eps) == 2
    with EpisodeReader(tmp_path / "o.hdf5") as rd:
        assert len(rd) == 2
        e0, e1 = rd.episode(0), rd.episode(1)
        assert e0.language == e1.language == "wipe the table"
        assert rd.action_names[:2] == ["linear.x", "linear.y"]
        # episode 0 covers the first twist block, episode 1 the second; each tick's action is the
        # twist in effect (latest at or before the tick)
        for ep in (e0, e1):
            for t, a in zip(np.round(ep.timestamps * 1e9).astype(np.int64), ep.actions):
                st, v = max((x for x in twists if x[0] <= t), key=lambda x: x[0])
                assert t - st <= 0.15 * S
                np.testing.assert_allclose(a, np.asarray(v, np.float32))
        assert e0.timestamps[-1] < (ns(2.0) + 0.15 * S) / 1e9 and e1.timestamps[0] >= ns(3.0) / 1e9
        # camera frames: latest at or before each tick; bgr8/rgba8/bgra8 decoded to the written RGB
        for ep in (e0, e1):
            ts = np.round(ep.timestamps * 1e9).astype(np.int64)
            k = (ts - T0) // (S // 20)
            np.testing.assert_array_equal(ep.images("a"), np.stack([frame(int(i), 0) for i in k]))
            np.testing.assert_array_equal(ep.images("b"), np.stack([frame(int(i), 2) for i in k]))


def test_commands_at_the_control_rate_are_taken_once_each(tmp_path):
    """Teleop commands published at the control rate (10 Hz, ±3 ms jitter), starting after the camera:
    the tick grid must not sit on the commands' times (timing jitter would then pick some command
    twice and skip another). Every command appears exactly once, in order; the camera frames before
    the first tick are reported, not silently cut."""
    rng = np.random.default_rng(3)
    r = Rec(tmp_path / "bag", "sqlite3")
    with r:
        for k in range(90):                            # 30 Hz camera from 0 s
            st = ns(k / 30)
            r.image("/cam", st, st, frame(k, 0), "rgb8")
        for k in range(20):                            # 10 Hz commands from 1.0 s, value = k
            st = ns(1.0 + k / 10) + int(rng.integers(-3, 4)) * 1_000_000
            r.twist("/cmd", st, st + 1_000_000, [float(k), 0, 0, 0, 0, 0])
    topics = {"control_rate_hz": 10, "tolerance_s": 0.15, "cameras": {"c": "/cam"},
              "language": {"instruction": "go"}, "action": {"topic": "/cmd"}}
    rep = convert_bags([tmp_path / "bag"], topics, tmp_path / "o.hdf5", progress=False)
    (ep_rep,) = [e for e in rep["bags"][0]["episodes"] if e["episode"]]
    assert ep_rep["ticks_aligned_to"]["stream"] == "action:/cmd"
    assert ep_rep["streams"]["camera:c"]["messages_before_first_tick"] >= 30
    with EpisodeReader(tmp_path / "o.hdf5") as rd:
        xs = rd.episode(0).actions[:, 0]
    np.testing.assert_array_equal(xs, np.arange(len(xs), dtype=np.float32))
    assert len(xs) >= 19


def test_state_joints_in_another_order_in_a_later_bag_are_refused(tmp_path):
    """The state's joint names come from the message when the map names none: a later bag whose
    JointState lists them in another order would be stored permuted under the first bag's names."""
    topics = {"control_rate_hz": 10, "tolerance_s": 0.15, "cameras": {"c": "/cam"},
              "language": {"instruction": "go"}, "action": {"topic": "/cmd"}, "state": [{"topic": "/js", "key": "q"}]}
    for i, names in enumerate((["a", "b", "c"], ["c", "b", "a"])):
        r = Rec(tmp_path / f"bag{i}", "sqlite3")
        with r:
            for k in range(30):
                st = ns(k / 30)
                r.image("/cam", st, st, frame(k, 0), "rgb8")
                r.joint_state("/js", st, st, names, [1.0, 2.0, 3.0])
                r.twist("/cmd", st, st, [float(k), 0, 0, 0, 0, 0])
    rep = convert_bags([tmp_path / "bag0", tmp_path / "bag1"], topics, tmp_path / "o.hdf5", progress=False)
    assert "error" not in rep["bags"][0]
    assert "state names/dims" in rep["bags"][1]["error"] and "['c', 'b', 'a']" in rep["bags"][1]["error"]
    with EpisodeReader(tmp_path / "o.hdf5") as rd:
        assert len(rd) == 1


def test_bag_actionchunk_markers_and_resize(tmp_path):
    """ActionChunk (row 0, executed at stamp + first_index*dt), episodes by Bool markers, JPEG
    camera resized at conversion, a .db3 file passed directly."""
    r = Rec(tmp_path / "bag", "sqlite3")
    with r:
        T = r.T
        r.w.write("/episode", "std_msgs/msg/Bool", T["std_msgs/msg/Bool"](data=True), ns(0.0))
        r.w.write("/episode", "std_msgs/msg/Bool", T["std_msgs/msg/Bool"](data=False), ns(1.52))
        r.w.write("/episode", "std_msgs/msg/Bool", T["std_msgs/msg/Bool"](data=True), ns(2.0))
        r.w.write("/episode", "std_msgs/msg/Bool", T["std_msgs/msg/Bool"](data=False), ns(3.02))
        r.string("/goal", ns(-0.1), "open the drawer")
        for k in range(70):
            st = ns(k * 0.05)
            img = np.zeros((16, 20, 3), np.uint8)
            img[:] = (k * 3) % 256
            r.compressed("/cam/jpg", st, st, encode_compressed(img, "jpeg", quality=98), "rgb8; jpeg compressed bgr8")
        for k in range(35):                              # chunk stamped 0.2 s before it executes
            obs_t = ns(k * 0.1 - 0.2)
            acts = np.stack([np.full(3, k + i / 10) for i in range(5)])
            r.chunk("/mode_policy/action_chunk", obs_t, ns(k * 0.1), acts, first_index=2)
    db3 = next((tmp_path / "bag").glob("*.db3"))
    topics = {"control_rate_hz": 10, "tolerance_s": 0.06,
              "cameras": {"static": {"topic": "/cam/jpg", "resize": [8, 10]}},
              "language": {"topic": "/goal"},
              "action": {"topic": "/mode_policy/action_chunk", "tolerance_s": 0.11},
              "split": {"by": "topic", "topic": "/episode"}}
    rep = convert_bags([db3], topics, tmp_path / "o.hdf5", progress=False)
    eps = [e for e in rep["bags"][0]["episodes"] if e["episode"]]
    assert len(eps) == 2, rep
    with EpisodeReader(tmp_path / "o.hdf5") as rd:
        e0 = rd.episode(0)
        assert e0.image_shape("static") == (8, 10)
        assert 0.0 <= e0.timestamps[0] - ns(0) / 1e9 < 0.1 and e0.timestamps[-1] <= ns(1.52) / 1e9
        # row 0 of chunk k executes at obs_t + 2*dt = k*0.1 -> tick at k*0.1 gets action k
        ks = np.round((e0.timestamps - T0 / 1e9) / 0.1).astype(int)
        np.testing.assert_allclose(e0.actions[:, 0], ks.astype(np.float32), atol=1e-5)
        assert abs(int(e0.image("static", 3).mean()) - (int(round(e0.timestamps[3] * 20 - T0 / S * 20)) * 3 % 256)) <= 3
        assert e0.language == "open the drawer"


def test_bag_missing_topic_and_bad_map(tmp_path):
    r = Rec(tmp_path / "bag", "mcap")
    with r:
        r.string("/goal", ns(0), "x")
    rep = convert_bags([tmp_path / "bag"], {**TOPICS}, tmp_path / "o.hdf5", progress=False)
    assert "not in bag" in rep["bags"][0]["error"] and rep["totals"]["episodes"] == 0
    with pytest.raises(TopicMapError, match="cameras.static.resise"):
        load_topic_map({**TOPICS, "cameras": {"static": {"topic": "/a", "resise": [1, 2]}}})
    with pytest.raises(TopicMapError, match="control_rate_hz"):
        load_topic_map({k: v for k, v in TOPICS.items() if k != "control_rate_hz"})
    with pytest.raises(TopicMapError, match="split.gap_s"):
        load_topic_map({**TOPICS, "split": {"by": "gap"}})


def test_cli_convert_bag(tmp_path, capsys):
    import yaml

    from mode_ros.cli import main

    rng = np.random.default_rng(1)
    write_main_bag(tmp_path / "bag", "mcap", rng)
    (tmp_path / "map.yaml").write_text(yaml.safe_dump(TOPICS))
    rc = main(["convert", "bag", str(tmp_path / "bag"), "--topics", str(tmp_path / "map.yaml"),
               "--out", str(tmp_path / "e.hdf5"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "demo_0" in out and "stale:camera:static" in out
    rc = main(["convert", "bag", str(tmp_path / "bag"), "--topics", str(tmp_path / "map.yaml"),
               "--out", str(tmp_path / "e.hdf5"), "--quiet"])
    assert rc == 2  # exists, no --overwrite


def test_example_topic_map_loads():
    from pathlib import Path

    tm = load_topic_map(Path(__file__).resolve().parents[1] / "config" / "bag_topics.example.yaml")
    assert tm.cameras and tm.action


def test_action_chunk_msg_copy_matches_source():
    from pathlib import Path

    from mode_ros.data.rosmsgs import ACTION_CHUNK_MSG

    src = Path(__file__).resolve().parents[1] / "msg" / "ActionChunk.msg"
    assert ACTION_CHUNK_MSG == src.read_text()


def test_state_only_topic_map_converts_without_cameras(tmp_path):
    """A robot without cameras (a state-only policy, e.g. `sim record --cameras ""`): the topic map may
    list no camera when it has a state; the episodes hold actions and state, no image datasets. With
    neither a camera nor a state the map is refused by name."""
    rng = np.random.default_rng(0)
    write_main_bag(tmp_path / "bag", "mcap", rng)
    out = tmp_path / "state.hdf5"
    rep = convert_bags([tmp_path / "bag"], {**TOPICS, "cameras": {}}, out, progress=False)
    (ep_rep,) = rep["bags"][0]["episodes"]
    assert ep_rep["ticks"] >= 10 and not any(k.startswith("camera:") for k in ep_rep["streams"])
    with EpisodeReader(out) as rd:
        assert rd.camera_names == [] and rd.state_keys == ["joint_pos"]
        ep = rd.episode(0)
        assert ep.actions.shape == (ep_rep["ticks"], 4) and ep.state("joint_pos").shape == (ep_rep["ticks"], 2)
    with pytest.raises(TopicMapError, match="at least one camera is required when there is no state"):
        load_topic_map({**{k: v for k, v in TOPICS.items() if k != "state"}, "cameras": {}})
