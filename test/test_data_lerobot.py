"""LeRobot datasets in (v2.1, v3.0) and out (v3.0): mode_ros.data.lerobot*.

The datasets are written here with pyarrow and PyAV directly (not with our exporter), following the
LeRobot v3.0 / v2.1 layouts (docs/DATA.md "LeRobot"). Codec tolerance: H.264 yuv420p of the smooth test
scenes; fixture videos (crf 10) decode within mean |error| 3 and max 24 grey levels of the source
frames, exported ones (default crf 18) within mean 4 and max 40 (measured: mean 2.4-2.6, max 16-20,
mostly the RGB -> limited-range 4:2:0 YUV -> RGB round trip, not the compression); AV1 (SVT-AV1 encode,
libdav1d decode) is held to the same tolerance.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

from mode_ros.data.episodes import EpisodeReader, EpisodeWriter  # noqa: E402
from mode_ros.data.lerobot import LeRobotError, load_lerobot_map  # noqa: E402
from mode_ros.data.lerobot_export import export_lerobot  # noqa: E402
from mode_ros.data.lerobot_import import import_lerobot  # noqa: E402

FPS = 10
H, W = 24, 32
TASKS = ["pick up the cube", "open the drawer"]
VIDEO_KEY = "observation.images.top"
IMAGE_KEY = "observation.images.wrist"
FIXTURE_TOL = (3.0, 24)      # mean, max |decoded - source| for the fixture videos (crf 10)
EXPORT_TOL = (4.0, 40)       # the same for videos our exporter wrote (crf 18)


def scene(t: int, k: int) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    rgb = [60 + 120 * xx / W + 4 * t, 50 + 100 * yy / H + 20 * k, 128 + 60 * np.sin((xx + yy + 2 * t) / 6)]
    return np.clip(np.stack(rgb, -1), 0, 255).astype(np.uint8)


def make_episodes(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [{"action": rng.normal(size=(n, 4)).astype(np.float32), "state": rng.normal(size=(n, 3)).astype(np.float32),
             "video": np.stack([scene(t + 10 * e, 0) for t in range(n)]),
             "image": np.stack([scene(t + 10 * e, 1) for t in range(n)]), "task": e % 2}
            for e, n in enumerate(lengths)]


def write_mp4(path: Path, frames, fps=FPS):
    from fractions import Fraction

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt, s.time_base = W, H, "yuv420p", Fraction(1, fps)
        s.options = {"crf": "10"}
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def png(img) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def data_table(eps, first_episode: int, first_index: int):
    act = np.concatenate([e["action"] for e in eps])
    st = np.concatenate([e["state"] for e in eps])
    n = [len(e["action"]) for e in eps]
    fi = np.concatenate([np.arange(k) for k in n])
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({
        "action": pa.FixedSizeListArray.from_arrays(pa.array(act.reshape(-1)), 4),
        "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(st.reshape(-1)), 3),
        IMAGE_KEY: pa.array([{"bytes": png(im), "path": None} for e in eps for im in e["image"]], img_type),
        "timestamp": pa.array((fi / FPS).astype(np.float32)),
        "frame_index": pa.array(fi.astype(np.int64)),
        "episode_index": pa.array(np.repeat(np.arange(first_episode, first_episode + len(eps)), n).astype(np.int64)),
        "index": pa.array(first_index + np.arange(sum(n), dtype=np.int64)),
        "task_index": pa.array(np.repeat([e["task"] for e in eps], n).astype(np.int64)),
    })


def features(version: str):
    vinfo = {"video.height": H, "video.width": W, "video.codec": "h264", "video.pix_fmt": "yuv420p",
             "video.is_depth_map": False, "video.fps": FPS, "video.channels": 3, "has_audio": False}
    return {
        VIDEO_KEY: {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"], "info": vinfo},
        IMAGE_KEY: {"dtype": "image", "shape": [3, H, W], "names": ["channels", "height", "width"]},
        "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": [4], "names": {"motors": ["m0", "m1", "m2", "grip"]}
                   if version == "v2.1" else ["m0", "m1", "m2", "grip"]},
        **{k: {"dtype": dt, "shape": [1], "names": None} for k, dt in
           (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"),
            ("task_index", "int64"))},
    }


def write_v3(root: Path, eps, per_file=2):
    """Data: ``per_file`` episodes per parquet; video: every episode in one mp4 (from/to timestamps)."""
    rows, start, idx = [], 0, 0
    for j in range(0, len(eps), per_file):
        part = eps[j:j + per_file]
        path = root / f"data/chunk-000/file-{j // per_file:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(data_table(part, j, idx), path)
        for k, e in enumerate(part):
            n = len(e["action"])
            rows.append({"episode_index": j + k, "tasks": [TASKS[e["task"]]], "length": n,
                         "data/chunk_index": 0, "data/file_index": j // per_file,
                         "dataset_from_index": idx, "dataset_to_index": idx + n,
                         f"videos/{VIDEO_KEY}/chunk_index": 0, f"videos/{VIDEO_KEY}/file_index": 0,
                         f"videos/{VIDEO_KEY}/from_timestamp": start / FPS,
                         f"videos/{VIDEO_KEY}/to_timestamp": (start + n) / FPS,
                         "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            start, idx = start + n, idx + n
    write_mp4(root / f"videos/{VIDEO_KEY}/chunk-000/file-000.mp4", np.concatenate([e["video"] for e in eps]))
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": pa.array([0, 1], pa.int64()), "task": TASKS}), root / "meta/tasks.parquet")
    info = {"codebase_version": "v3.0", "robot_type": None, "total_episodes": len(eps), "total_frames": idx,
            "total_tasks": 2, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "fps": FPS, "splits": {"train": f"0:{len(eps)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": features("v3.0")}
    (root / "meta/info.json").write_text(json.dumps(info))
    return root


def write_v21(root: Path, eps, short_video: int | None = None):
    (root / "meta").mkdir(parents=True)
    idx = 0
    lines = []
    for i, e in enumerate(eps):
        path = root / f"data/chunk-000/episode_{i:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(data_table([e], i, idx), path)
        frames = e["video"][:-2] if i == short_video else e["video"]
        write_mp4(root / f"videos/chunk-000/{VIDEO_KEY}/episode_{i:06d}.mp4", frames)
        lines.append(json.dumps({"episode_index": i, "tasks": [TASKS[e["task"]]], "length": len(e["action"])}))
        idx += len(e["action"])
    (root / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
    (root / "meta/tasks.jsonl").write_text("\n".join(json.dumps({"task_index": i, "task": t})
                                                    for i, t in enumerate(TASKS)) + "\n")
    info = {"codebase_version": "v2.1", "robot_type": None, "total_episodes": len(eps), "total_frames": idx,
            "total_tasks": 2, "total_videos": len(eps), "total_chunks": 1, "chunks_size": 1000, "fps": FPS,
            "splits": {"train": f"0:{len(eps)}"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": features("v2.1")}
    (root / "meta/info.json").write_text(json.dumps(info))
    return root


def assert_close_frames(got: np.ndarray, want: np.ndarray, tol):
    d = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert got.shape == want.shape
    assert d.mean() <= tol[0] and d.max() <= tol[1], (d.mean(), d.max())


def check_imported(path: Path, eps, exact_image=True):
    r = EpisodeReader(path)
    assert r.camera_names == ["top", "wrist"]
    assert r.action_names == ["m0", "m1", "m2", "grip"]
    assert r.state_keys == ["state"] and r.state_names == {"state": ["x", "y", "z"]}
    assert r.control_rate_hz == FPS and len(r) == len(eps)
    for i, e in enumerate(eps):
        ep = r.episode(i)
        np.testing.assert_array_equal(ep.actions, e["action"])
        np.testing.assert_array_equal(ep.state("state"), e["state"])
        np.testing.assert_allclose(ep.timestamps, np.arange(len(e["action"])) / FPS, atol=1e-6)
        assert ep.language == TASKS[e["task"]]
        assert_close_frames(ep.images("top"), e["video"], FIXTURE_TOL)
        np.testing.assert_array_equal(ep.images("wrist"), e["image"])   # PNG in the parquet: lossless
    r.close()


def test_import_v3_several_episodes_per_file(tmp_path):
    eps = make_episodes([6, 4, 5, 3, 7])
    ds = write_v3(tmp_path / "ds", eps, per_file=2)
    rep = import_lerobot([ds], tmp_path / "out.hdf5", progress=False)
    t = rep["totals"]
    assert (t["episodes_in"], t["episodes"], t["frames_in"], t["frames"], t["skipped"]) == (5, 5, 25, 25, 0)
    assert rep["datasets"][0]["unused_features"] == []
    check_imported(tmp_path / "out.hdf5", eps)


def test_import_v21_one_file_per_episode(tmp_path):
    eps = make_episodes([5, 8, 4], seed=1)
    ds = write_v21(tmp_path / "ds", eps)
    rep = import_lerobot([ds], tmp_path / "out.hdf5", progress=False)
    assert rep["datasets"][0]["version"] == "v2.1" and rep["totals"]["frames"] == 17
    check_imported(tmp_path / "out.hdf5", eps)


def test_key_map_selects_and_renames(tmp_path):
    eps = make_episodes([4, 3])
    ds = write_v3(tmp_path / "ds", eps)
    (tmp_path / "map.yaml").write_text(f"cameras: {{{VIDEO_KEY}: static}}\naction: [action, observation.state]\n"
                                       "state: {}\ninstruction: do it\n")
    rep = import_lerobot([ds], tmp_path / "out.hdf5", key_map=tmp_path / "map.yaml", progress=False)
    assert rep["datasets"][0]["unused_features"] == [IMAGE_KEY]
    r = EpisodeReader(tmp_path / "out.hdf5")
    assert r.camera_names == ["static"] and r.state_keys == [] and r.action_dim == 7
    assert r.action_names == ["m0", "m1", "m2", "grip", "x", "y", "z"]
    np.testing.assert_array_equal(r.episode(1).actions, np.concatenate([eps[1]["action"], eps[1]["state"]], 1))
    assert r.episode(0).language == "do it"
    from mode_ros.cli import main

    assert main(["convert", "lerobot", str(ds), "--out", str(tmp_path / "cli.hdf5"), "--quiet",
                 "--map", str(tmp_path / "map.yaml"), "--instruction", "do that"]) == 0
    r = EpisodeReader(tmp_path / "cli.hdf5")
    assert r.camera_names == ["static"] and [e.language for e in r] == ["do that", "do that"]
    with pytest.raises(LeRobotError, match=r"unknown key\(s\) \['camera'\]"):
        load_lerobot_map({"camera": {}})


def write_episode_file(path: Path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    with EpisodeWriter(path, ["static", "gripper"], ["dx", "dy", "grip"], control_rate_hz=FPS,
                       state_keys=["state"], state_names={"state": ["q0", "q1"]}) as w:
        for e, n in enumerate(lengths):
            w.add_episode(rng.normal(size=(n, 3)), {"static": np.stack([scene(t, e) for t in range(n)]),
                                                    "gripper": np.stack([scene(t + 9, e + 2) for t in range(n)])},
                          TASKS[e % 2], states={"state": rng.normal(size=(n, 2))})


def test_export_metadata_follows_v3_layout(tmp_path):
    write_episode_file(tmp_path / "ep.hdf5", [5, 7, 4])
    rep = export_lerobot([tmp_path / "ep.hdf5"], tmp_path / "ds", progress=False)
    assert (rep["episodes_in"], rep["episodes"], rep["frames_in"], rep["frames"]) == (3, 3, 16, 16)
    ds = tmp_path / "ds"
    info = json.loads((ds / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 16, 2)
    assert info["splits"] == {"train": "0:3"} and info["chunks_size"] == 1000 and info["robot_type"] is None
    assert (info["data_files_size_in_mb"], info["video_files_size_in_mb"]) == (100, 200)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    f = info["features"]
    assert f["observation.images.static"]["dtype"] == "video" and f["observation.images.static"]["shape"] == [H, W, 3]
    assert f["observation.images.static"]["names"] == ["height", "width", "channels"]
    vi = f["observation.images.gripper"]["info"]
    assert (vi["video.height"], vi["video.width"], vi["video.codec"], vi["video.pix_fmt"], vi["video.fps"]) == \
        (H, W, "h264", "yuv420p", FPS)
    assert f["action"] == {"dtype": "float32", "shape": [3], "names": ["dx", "dy", "grip"]}
    assert f["observation.state"] == {"dtype": "float32", "shape": [2], "names": ["q0", "q1"]}
    for k, dt in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"),
                  ("task_index", "int64")):
        assert f[k] == {"dtype": dt, "shape": [1], "names": None}
    # data parquet: every episode in one file, LeRobot column types
    data = pq.read_table(ds / "data/chunk-000/file-000.parquet")
    assert data.schema.field("action").type == pa.list_(pa.float32(), 3)
    assert data.schema.field("timestamp").type == pa.float32() and data.schema.field("index").type == pa.int64()
    assert data.column("index").to_pylist() == list(range(16))
    assert data.column("frame_index").to_pylist() == [*range(5), *range(7), *range(4)]
    np.testing.assert_allclose(data.column("timestamp").to_numpy(), np.r_[np.arange(5), np.arange(7), np.arange(4)] / FPS)
    # tasks: the task strings index task_index
    tasks = pq.read_table(ds / "meta/tasks.parquet")
    assert dict(zip(tasks.column("task").to_pylist(), tasks.column("task_index").to_pylist())) == {TASKS[0]: 0, TASKS[1]: 1}
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    # episodes: lengths, offsets into the shared data file and video files, per-episode stats
    e = pq.read_table(ds / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [x["length"] for x in e] == [5, 7, 4] and [x["tasks"] for x in e] == [[TASKS[0]], [TASKS[1]], [TASKS[0]]]
    assert [(x["dataset_from_index"], x["dataset_to_index"]) for x in e] == [(0, 5), (5, 12), (12, 16)]
    key = "videos/observation.images.static"
    assert [(x[f"{key}/from_timestamp"], x[f"{key}/to_timestamp"]) for x in e] == [(0.0, 0.5), (0.5, 1.2), (1.2, 1.6)]
    assert all(x[f"{key}/file_index"] == 0 and x["data/file_index"] == 0 for x in e)
    assert all(x["meta/episodes/chunk_index"] == 0 and x["meta/episodes/file_index"] == 0 for x in e)
    assert {f"stats/observation.images.static/{s}" for s in ("min", "max", "mean", "std", "count", "q01", "q99")} \
        <= set(e[0])
    assert (ds / "videos/observation.images.gripper/chunk-000/file-000.mp4").exists()
    # stats: numpy values of what was written
    r = EpisodeReader(tmp_path / "ep.hdf5")
    acts = np.concatenate([ep.actions for ep in r])
    stats = json.loads((ds / "meta/stats.json").read_text())
    for s, fn in (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std)):
        np.testing.assert_allclose(stats["action"][s], fn(acts, 0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["action"]["q50"], np.quantile(acts, 0.5, 0), rtol=1e-6)
    assert stats["action"]["count"] == [16] and stats["episode_index"]["max"] == [2]
    np.testing.assert_allclose(e[1]["stats/action/mean"], r.episode(1).actions.mean(0), rtol=1e-5)
    frames = np.concatenate([ep.images("static") for ep in r]).astype(np.float64) / 255
    img = stats["observation.images.static"]
    assert np.array(img["mean"]).shape == (3, 1, 1) and img["count"] == [16]
    np.testing.assert_allclose(np.array(img["mean"]).reshape(3), frames.mean((0, 1, 2)), atol=1e-9)
    np.testing.assert_allclose(np.array(img["std"]).reshape(3), frames.std((0, 1, 2)), atol=1e-9)
    np.testing.assert_allclose(np.array(img["max"]).reshape(3), frames.max((0, 1, 2)))


@pytest.mark.parametrize("vcodec", ["h264", "av1"])
def test_export_import_roundtrip_and_cli(tmp_path, vcodec):
    from mode_ros.cli import main

    write_episode_file(tmp_path / "ep.hdf5", [6, 9])
    export = ["export", "lerobot", str(tmp_path / "ep.hdf5"), "--out", str(tmp_path / "ds"), "--quiet",
              "--vcodec", vcodec]
    assert main(export) == 0
    assert main(export) == 2          # exists: refused without --overwrite
    info = json.loads((tmp_path / "ds/meta/info.json").read_text())
    assert info["features"]["observation.images.static"]["info"]["video.codec"] == vcodec
    with av.open(str(tmp_path / "ds/videos/observation.images.static/chunk-000/file-000.mp4")) as c:
        assert c.streams.video[0].codec_context.name in ({"h264": "h264", "av1": "libdav1d"}[vcodec], vcodec)
    assert main(["convert", "lerobot", str(tmp_path / "ds"), "--out", str(tmp_path / "back.hdf5"), "--quiet"]) == 0
    rep = json.loads((tmp_path / "back.report.json").read_text())
    assert rep["totals"]["frames"] == 15 and rep["totals"]["episodes"] == 2
    a, b = EpisodeReader(tmp_path / "ep.hdf5"), EpisodeReader(tmp_path / "back.hdf5")
    assert b.camera_names == a.camera_names and b.action_names == a.action_names
    assert b.state_keys == a.state_keys and b.state_names == a.state_names and b.control_rate_hz == FPS
    for ea, eb in zip(a, b):
        np.testing.assert_array_equal(eb.actions, ea.actions)
        np.testing.assert_array_equal(eb.state("state"), ea.state("state"))
        assert eb.language == ea.language
        for c in a.camera_names:
            assert_close_frames(eb.images(c), ea.images(c), EXPORT_TOL)


def test_export_from_bag_through_the_bag_converter(tmp_path):
    from mode_ros.data.bag import convert_bags
    from mode_ros.data.synthetic import SYNTHETIC_TOPIC_MAP, write_synthetic_bag

    write_synthetic_bag(tmp_path / "bag", seconds=1.5, size=(32, 48), wrist_size=(16, 24))
    rep = export_lerobot([tmp_path / "bag"], tmp_path / "ds", topic_map=SYNTHETIC_TOPIC_MAP, progress=False)
    direct = convert_bags([tmp_path / "bag"], SYNTHETIC_TOPIC_MAP, tmp_path / "direct.hdf5", progress=False)
    assert rep["bags"]["ticks"] == direct["totals"]["ticks"] == rep["frames"] > 0
    import_lerobot([tmp_path / "ds"], tmp_path / "back.hdf5", progress=False)
    a, b = EpisodeReader(tmp_path / "direct.hdf5"), EpisodeReader(tmp_path / "back.hdf5")
    assert b.camera_names == ["static", "gripper"] and b.state_keys == ["joint_states"]
    np.testing.assert_array_equal(b.episode(0).actions, a.episode(0).actions)
    np.testing.assert_array_equal(b.episode(0).state("joint_states"), a.episode(0).state("joint_states"))
    assert b.episode(0).language == a.episode(0).language
    with pytest.raises(LeRobotError, match="need a topic map"):
        export_lerobot([tmp_path / "bag"], tmp_path / "ds2", progress=False)


def test_unknown_version_and_missing_feature(tmp_path):
    ds = write_v3(tmp_path / "ds", make_episodes([3]))
    info = json.loads((ds / "meta/info.json").read_text())
    with pytest.raises(LeRobotError, match=r"observation\.images\.side.*cameras in the key map.*missing"):
        import_lerobot([ds], tmp_path / "a.hdf5", key_map={"cameras": {"observation.images.side": "side"}},
                       progress=False)
    (ds / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(LeRobotError, match=r"info\.json: codebase_version 'v1\.6' is not supported"):
        import_lerobot([ds], tmp_path / "b.hdf5", progress=False)
    # a feature info.json lists but the data file lacks
    feats = {**info["features"], "observation.velocity": {"dtype": "float32", "shape": [2], "names": None}}
    (ds / "meta/info.json").write_text(json.dumps({**info, "features": feats}))
    with pytest.raises(LeRobotError, match=r"file-000\.parquet: feature column\(s\) \['observation\.velocity'\] missing"):
        import_lerobot([ds], tmp_path / "c.hdf5", key_map={"state": {"observation.velocity": "vel"}}, progress=False)


def test_short_video_is_skipped_with_file_and_key(tmp_path):
    eps = make_episodes([5, 6, 4])
    ds = write_v21(tmp_path / "ds", eps, short_video=1)
    rep = import_lerobot([ds], tmp_path / "out.hdf5", progress=False)
    t = rep["totals"]
    assert (t["episodes_in"], t["episodes"], t["frames_in"], t["frames"]) == (3, 2, 15, 9)
    why = rep["datasets"][0]["skipped"]["episode_1"]
    assert "episode_000001.mp4" in why and VIDEO_KEY in why and "shorter than the frame index" in why
    assert "needs frame 4" in why and "ends at frame 3" in why
    r = EpisodeReader(tmp_path / "out.hdf5")
    assert len(r) == 2 and r.incomplete_episodes == []
    np.testing.assert_array_equal(r.episode(1).actions, eps[2]["action"])


def test_fps_mismatch(tmp_path):
    ds = write_v3(tmp_path / "ds", make_episodes([3, 3]))
    info = json.loads((ds / "meta/info.json").read_text())
    (ds / "meta/info.json").write_text(json.dumps({**info, "fps": 20}))
    with pytest.raises(LeRobotError, match=r"observation\.images\.top.*video\.fps 10.*fps is 20.*mismatched fps"):
        import_lerobot([ds], tmp_path / "a.hdf5", progress=False)
    feats = json.loads(json.dumps(info["features"]))
    del feats[VIDEO_KEY]["info"]["video.fps"]
    (ds / "meta/info.json").write_text(json.dumps({**info, "fps": 20, "features": feats}))
    with pytest.raises(LeRobotError, match=r"file-000\.mp4: video of feature 'observation\.images\.top' runs at 10 fps"):
        import_lerobot([ds], tmp_path / "b.hdf5", progress=False)
    import h5py

    with h5py.File(tmp_path / "b.hdf5", "r") as f:   # the episode begun before the video was opened is removed
        assert list(f["data"].keys()) == []
    other = write_v21(tmp_path / "other", make_episodes([3]))
    info2 = json.loads((other / "meta/info.json").read_text())
    (other / "meta/info.json").write_text(json.dumps({**info2, "fps": 20}))
    (ds / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(LeRobotError, match=r"other/meta/info\.json: fps 20 differs .* fps 10"):
        import_lerobot([ds, other], tmp_path / "c.hdf5", key_map={"cameras": {IMAGE_KEY: "wrist"}}, progress=False)


def test_non_finite_values_are_skipped_with_reason(tmp_path):
    eps = make_episodes([4, 5, 3])
    eps[1]["action"][2, 1] = np.nan
    ds = write_v3(tmp_path / "ds", eps, per_file=3)
    rep = import_lerobot([ds], tmp_path / "out.hdf5", progress=False)
    assert rep["datasets"][0]["skipped"] == {
        "episode_1": f"non-finite values in 'action' at frame 2 ({ds / 'data/chunk-000/file-000.parquet'})"}
    assert (rep["totals"]["episodes"], rep["totals"]["frames"]) == (2, 7)
    # the exporter skips such an episode the same way
    write_episode_file(tmp_path / "ep.hdf5", [3, 4])
    import h5py

    with h5py.File(tmp_path / "ep.hdf5", "a") as f:
        f["data/demo_0/obs/state"][1, 0] = np.inf
    rep = export_lerobot([tmp_path / "ep.hdf5"], tmp_path / "ds2", progress=False)
    assert rep["skipped"] == {f"{tmp_path / 'ep.hdf5'}:demo_0": f"{tmp_path / 'ep.hdf5'}:demo_0: non-finite values "
                                                                 "in state at frame 1"}
    assert (rep["episodes"], rep["frames"]) == (1, 4)
    shutil.rmtree(tmp_path / "ds2")
