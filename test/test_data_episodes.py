"""Episode HDF5 format (writer/reader, lazy frames) and the LIBERO/robomimic import."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from mode_ros.data.episodes import EpisodeReader, EpisodeWriter
from mode_ros.data.hdf5_import import import_hdf5, language_from_filename


def _episode(T, seed=0, hw=(6, 8)):
    r = np.random.default_rng(seed)
    return (r.normal(size=(T, 4)).astype(np.float32),
            {"static": r.integers(0, 256, (T, *hw, 3), dtype=np.uint8),
             "gripper": r.integers(0, 256, (T, 4, 4, 3), dtype=np.uint8)})


def test_write_read_round_trip_lazy(tmp_path):
    p = tmp_path / "e.hdf5"
    eps = [_episode(5, 0), _episode(3, 1)]
    with EpisodeWriter(p, ["static", "gripper"], ["a", "b", "c", "d"], control_rate_hz=10, source="test",
                       state_keys=["joint_states"]) as w:
        for i, (a, im) in enumerate(eps):
            w.add_episode(a, im, f"task {i}", states={"joint_states": a[:, :2] * 2})
    with pytest.raises(FileExistsError):
        EpisodeWriter(p, ["static"])
    with EpisodeReader(p) as rd:
        assert len(rd) == 2 and rd.camera_names == ["static", "gripper"]
        assert rd.action_names == ["a", "b", "c", "d"] and rd.control_rate_hz == 10 and rd.source == "test"
        assert rd.state_keys == ["joint_states"] and rd.action_dim == 4
        for i, ep in enumerate(rd):
            a, im = eps[i]
            assert ep.language == f"task {i}" and ep.length == len(a)
            np.testing.assert_array_equal(ep.actions, a)
            np.testing.assert_allclose(ep.timestamps, np.arange(len(a)) / 10)
            np.testing.assert_array_equal(ep.state("joint_states"), a[:, :2] * 2)
            np.testing.assert_array_equal(ep.image("static", 2), im["static"][2])
            np.testing.assert_array_equal(ep.images("gripper"), im["gripper"])
    with h5py.File(p) as f:
        d = f["data"]
        assert d.attrs["total"] == 8 and d["demo_1"].attrs["num_samples"] == 3
        ds = d["demo_0/obs/static"]
        assert ds.chunks == (1, 6, 8, 3) and ds.compression == "gzip" and ds.dtype == np.uint8
    # append mode continues numbering
    with EpisodeWriter(p, ["static", "gripper"], mode="a") as w:
        assert w.add_episode(*_episode(2, 3), "more") == "demo_2"
    assert len(EpisodeReader(p)) == 3


def test_reading_one_frame_reads_one_chunk(tmp_path):
    p = tmp_path / "big.hdf5"
    T = 50
    a = np.zeros((T, 2), np.float32)
    imgs = np.random.default_rng(0).integers(0, 256, (T, 32, 32, 3), dtype=np.uint8)  # incompressible
    with EpisodeWriter(p, ["static"]) as w:
        w.add_episode(a, {"static": imgs}, "x")
    rd = EpisodeReader(p)
    ds = rd._data["demo_0/obs/static"]
    # only the requested chunk is touched: the chunk grid is one frame, and reading frame 7 gives frame 7
    assert ds.chunks[0] == 1 and ds.id.get_num_chunks() == T
    np.testing.assert_array_equal(rd.episode(0).image("static", 7), imgs[7])


def test_builder_compaction_and_discard(tmp_path):
    p = tmp_path / "c.hdf5"
    with EpisodeWriter(p, ["cam"]) as w:
        b = w.begin_episode(5, {"cam": (2, 2)}, 1)
        b.set_arrays(np.arange(5, dtype=np.float32)[:, None], np.arange(5.0))
        for i in range(5):
            b.set_image("cam", i, np.full((2, 2, 3), i, np.uint8))
        b.finish("x", keep=np.array([1, 0, 1, 1, 0], bool))
        b2 = w.begin_episode(2, {"cam": (2, 2)}, 1)
        b2.discard()
        assert w.add_episode(np.zeros((1, 1)), {"cam": np.zeros((1, 2, 2, 3), np.uint8)}, "y") == "demo_1"
    ep = EpisodeReader(p).episode(0)
    assert ep.length == 3
    np.testing.assert_array_equal(ep.actions[:, 0], [0, 2, 3])
    np.testing.assert_array_equal(ep.images("cam")[:, 0, 0, 0], [0, 2, 3])


def test_unfinished_episode_is_not_read_as_training_data(tmp_path):
    """An episode begun but never finished (the conversion crashed while decoding its frames) has
    all-zero images and no instruction: the reader skips it, says so, and lists it."""
    p = tmp_path / "u.hdf5"
    with EpisodeWriter(p, ["cam"]) as w:
        w.add_episode(np.ones((3, 1)), {"cam": np.ones((3, 2, 2, 3), np.uint8)}, "done")
        b = w.begin_episode(4, {"cam": (2, 2)}, 1)
        b.set_arrays(np.arange(4, dtype=np.float32)[:, None], np.arange(4.0))   # no images, no finish
    with pytest.warns(UserWarning, match="unfinished episode"):
        rd = EpisodeReader(p)
    assert len(rd) == 1 and rd.incomplete_episodes == ["demo_1"] and rd.episode(0).language == "done"


def _libero_file(path, n_demos=2, T=7, with_problem_info=True):
    rng = np.random.default_rng(0)
    truth = []
    with h5py.File(path, "w") as f:
        d = f.create_group("data")
        if with_problem_info:
            d.attrs["problem_info"] = json.dumps({"language_instruction": "put the bowl on the plate",
                                                  "problem_name": "libero_tabletop_manipulation"})
        d.attrs["env_args"] = json.dumps({"env_name": "x", "env_kwargs": {"control_freq": 20}})
        for i in range(n_demos):
            g = d.create_group(f"demo_{i}")
            a = rng.uniform(-1, 1, (T, 7)).astype(np.float64)
            av = rng.integers(0, 256, (T, 8, 8, 3), dtype=np.uint8)
            eih = rng.integers(0, 256, (T, 8, 8, 3), dtype=np.uint8)
            js = rng.normal(size=(T, 7))
            g.create_dataset("actions", data=a)
            o = g.create_group("obs")
            o.create_dataset("agentview_rgb", data=av)
            o.create_dataset("eye_in_hand_rgb", data=eih)
            o.create_dataset("joint_states", data=js)
            o.create_dataset("gripper_states", data=rng.normal(size=(T, 2)))
            truth.append((a, av, eih, js))
    return truth


def test_libero_import_with_flip(tmp_path):
    src = tmp_path / "KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5"
    truth = _libero_file(src)
    out = tmp_path / "out.hdf5"
    rep = import_hdf5([src], out, state_keys=["joint_states"], flip="vertical", progress=False)
    assert rep["episodes"] == 2 and rep["camera_map"] == {"agentview_rgb": "static", "eye_in_hand_rgb": "gripper"}
    with EpisodeReader(out) as rd:
        assert rd.camera_names == ["static", "gripper"] and rd.control_rate_hz == 20
        for ep, (a, av, eih, js) in zip(rd, truth):
            assert ep.language == "put the bowl on the plate"
            np.testing.assert_allclose(ep.actions, a.astype(np.float32))
            np.testing.assert_array_equal(ep.images("static"), av[:, ::-1])
            np.testing.assert_array_equal(ep.images("gripper"), eih[:, ::-1])
            np.testing.assert_allclose(ep.state("joint_states"), js.astype(np.float32))


def test_import_float_images_and_non_finite_states(tmp_path):
    """Float images in [0, 1] are scaled to 0..255 (a cast would make them black); a demo whose state
    has NaN, or lacks the state key, is skipped with the reason instead of failing later in training."""
    src = tmp_path / "KITCHEN_SCENE1_open_the_drawer_demo.hdf5"
    truth = _libero_file(src, n_demos=3)
    with h5py.File(src, "a") as f:
        o = f["data/demo_0/obs"]
        av = o["agentview_rgb"][:]
        del o["agentview_rgb"]
        o.create_dataset("agentview_rgb", data=av.astype(np.float32) / 255.0)
        f["data/demo_1/obs/joint_states"][2, 3] = np.nan
        del f["data/demo_2/obs/joint_states"]
    out = tmp_path / "out.hdf5"
    rep = import_hdf5([src], out, state_keys=["joint_states"], progress=False)
    assert rep["episodes"] == 1
    assert rep["inputs"][0]["skipped"] == {"demo_1": "non-finite values in obs/joint_states",
                                           "demo_2": "obs/joint_states missing or not 7 rows"}
    with EpisodeReader(out) as rd:
        np.testing.assert_array_equal(rd.episode(0).images("static"), truth[0][1])


def test_import_map_language_from_filename_and_cli(tmp_path):
    from mode_ros.cli import main

    src = tmp_path / "LIVING_ROOM_SCENE2_pick_up_the_ketchup_demo.hdf5"
    truth = _libero_file(src, n_demos=1, with_problem_info=False)
    assert language_from_filename(src) == "pick up the ketchup"
    out = tmp_path / "o.hdf5"
    rc = main(["convert", "hdf5", str(src), "--out", str(out), "--map", "eye_in_hand_rgb=wrist", "--flip", "rot180",
               "--quiet"])
    assert rc == 0
    with EpisodeReader(out) as rd:
        assert rd.camera_names == ["wrist"]
        ep = rd.episode(0)
        assert ep.language == "pick up the ketchup"
        np.testing.assert_array_equal(ep.images("wrist"), truth[0][2][:, ::-1, ::-1])
    assert main(["convert", "hdf5", str(src), "--out", str(tmp_path / "x.hdf5"), "--map", "nope=a", "--quiet"]) == 2


def test_reader_reads_raw_libero_file(tmp_path):
    src = tmp_path / "raw.hdf5"
    _libero_file(src, n_demos=1)
    rd = EpisodeReader(src)
    assert set(rd.camera_names) == {"agentview_rgb", "eye_in_hand_rgb"}
    assert rd.episode(0).language == "put the bowl on the plate" and rd.episode(0).timestamps is None
