"""Normalisation, the window dataset and the random-shift augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mode_ros.data.dataset import EpisodeWindowDataset, contiguous_run_ends, random_shift
from mode_ros.data.episodes import EpisodeWriter
from mode_ros.data.normalization import (
    ActionNormalizer,
    StateNormalizer,
    compute_stats,
    load_normalization,
    save_normalization,
)


def test_normalizer_round_trip_and_constant_dims(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([rng.uniform(-3, 5, 200), np.full(200, 2.5), rng.normal(0, 1e-3, 200)], axis=1).astype(np.float32)
    for mode in ("minmax", "quantile"):
        n = ActionNormalizer(compute_stats(x), mode=mode, names=["a", "const", "small"])
        y = n.normalize(x)
        assert np.all(np.isfinite(y)) and np.all(y[:, 1] == 0)
        if mode == "minmax":
            assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
            np.testing.assert_allclose(y[:, 0].min(), -1, atol=1e-6)
            np.testing.assert_allclose(y[:, 0].max(), 1, atol=1e-6)
        else:
            assert np.mean(np.abs(y[:, 0]) <= 1) >= 0.97
        np.testing.assert_allclose(n.denormalize(y), x, rtol=1e-5, atol=1e-5)
        # torch, same numbers
        yt = n.normalize(torch.from_numpy(x))
        np.testing.assert_allclose(yt.numpy(), y, atol=1e-6)
        np.testing.assert_allclose(n.denormalize(yt).numpy(), x, rtol=1e-5, atol=1e-5)
    # quantile mode: a gripper closed in 0.8 % of the rows has a flat 1-99 % range but is not constant;
    # it falls back to its min/max, so +1 survives the round trip (treated as constant it came back -0.98)
    g = np.full((1000, 1), -1.0, np.float32)
    g[::125] = 1.0
    n = ActionNormalizer(compute_stats(g), mode="quantile", names=["gripper"])
    assert not n.constant.any()
    np.testing.assert_allclose(n.normalize(g)[[0, 1], 0], [1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(n.denormalize(n.normalize(g)), g, atol=1e-6)
    # clip
    n = ActionNormalizer(compute_stats(x), mode="quantile", clip=True)
    assert np.abs(n.normalize(x * 3)).max() <= 1
    # JSON round trip
    st = StateNormalizer.fit(x[:, :2], mode="minmax")
    save_normalization(tmp_path / "normalization.json", n, st)
    a2, s2 = load_normalization(tmp_path / "normalization.json")
    np.testing.assert_allclose(a2.normalize(x), n.normalize(x))
    np.testing.assert_allclose(s2.denormalize(s2.normalize(x[:, :2])), x[:, :2], atol=1e-5)
    assert a2.kind == "action" and s2.kind == "state"
    with pytest.raises(ValueError, match="last dim 3"):
        n.normalize(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        compute_stats(np.array([[np.nan]]))


def _file(path, lengths, langs, timestamps=None, hw=(10, 12), state_names=None):
    rng = np.random.default_rng(0)
    eps = []
    with EpisodeWriter(path, ["static", "gripper"], ["x", "y"], control_rate_hz=10, state_keys=["q"],
                       state_names=state_names) as w:
        for i, (T, lang) in enumerate(zip(lengths, langs)):
            a = np.stack([np.arange(T) + 100 * i, -np.arange(T)], 1).astype(np.float32)
            im = {"static": rng.integers(0, 256, (T, *hw, 3), dtype=np.uint8),
                  "gripper": rng.integers(0, 256, (T, 6, 6, 3), dtype=np.uint8)}
            ts = None if timestamps is None else timestamps[i]
            w.add_episode(a, im, lang, timestamps=ts, states={"q": a * 0.5})
            eps.append((a, im))
    return eps


def test_dataset_windows_and_end_padding(tmp_path):
    p = tmp_path / "d.hdf5"
    eps = _file(p, [4, 12], ["b task", "a task"])
    ds = EpisodeWindowDataset(p, image_size={"static": (16, 16), "gripper": 8}, chunk_size=10, state_keys=["q"])
    assert len(ds) == 16 and ds.instructions == ["a task", "b task"] and ds.state_dim == 2
    s = ds[2]  # episode 0, frame 2: actions 2, 3, then the last action repeated
    assert s["episode"] == 0 and s["frame"] == 2
    den = ds.action_normalizer.denormalize(s["actions"].numpy())
    np.testing.assert_allclose(den[:, 0], [2, 3] + [3] * 8, atol=1e-4)
    assert s["action_mask"].tolist() == [True, True] + [False] * 8
    assert s["goal_index"].item() == 1 and s["instruction"] == "b task"
    assert s["images"]["static"].shape == (3, 16, 16) and s["images"]["static"].dtype == torch.uint8
    assert s["images"]["gripper"].shape == (3, 8, 8)
    assert s["state"].shape == (2,)
    s = ds[4 + 1]  # episode 1 frame 1: full window
    np.testing.assert_allclose(ds.action_normalizer.denormalize(s["actions"].numpy())[:, 0], np.arange(1, 11) + 100,
                               atol=1e-3)
    assert bool(s["action_mask"].all())
    assert float(s["actions"].abs().max()) <= 1 + 1e-6
    # native size: the image is the stored frame, CHW
    ds2 = EpisodeWindowDataset(p, image_size=None, chunk_size=3, action_normalizer=ds.action_normalizer)
    np.testing.assert_array_equal(ds2[0]["images"]["static"].permute(1, 2, 0).numpy(), eps[0][1]["static"][0])
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    assert batch["actions"].shape == (3, 10, 2) and batch["images"]["static"].shape == (3, 3, 16, 16)
    assert batch["instruction"] == ["b task"] * 3


def test_dataset_state_names_from_the_files(tmp_path):
    """The state's value names come from the files (the converter writes the joint names); files that name
    a key's values differently are refused, and an unnamed file leaves the names unknown."""
    a, b, c, d = (tmp_path / f"{n}.hdf5" for n in "abcd")
    _file(a, [3], ["t"], state_names={"q": ["elbow", "wrist"]})
    _file(b, [3], ["t"], state_names={"q": ["elbow", "wrist"]})
    _file(c, [3], ["t"], state_names={"q": ["wrist", "elbow"]})
    _file(d, [3], ["t"])
    assert EpisodeWindowDataset([a, b], image_size=None, state_keys=["q"]).state_names == ["elbow", "wrist"]
    with pytest.raises(ValueError, match=r"state key 'q'.*c\.hdf5 names its values \['wrist', 'elbow'\]"):
        EpisodeWindowDataset([a, c], image_size=None, state_keys=["q"])
    assert EpisodeWindowDataset([a, d], image_size=None, state_keys=["q"]).state_names == []
    assert EpisodeWindowDataset([a], image_size=None).state_names == []       # no state


def test_dataset_respects_timestamp_gaps(tmp_path):
    p = tmp_path / "g.hdf5"
    ts = np.array([0.0, 0.1, 0.2, 0.6, 0.7, 0.8])  # dropped ticks between 0.2 and 0.6
    _file(p, [6], ["t"], timestamps=[ts])
    np.testing.assert_array_equal(contiguous_run_ends(ts, 6, 10), [2, 2, 2, 5, 5, 5])
    ds = EpisodeWindowDataset(p, image_size=None, chunk_size=4)
    s = ds[1]
    assert s["action_mask"].tolist() == [True, True, False, False]
    np.testing.assert_allclose(ds.action_normalizer.denormalize(s["actions"].numpy())[:, 0], [1, 2, 2, 2], atol=1e-5)


def test_dataloader_workers(tmp_path):
    p = tmp_path / "w.hdf5"
    _file(p, [5, 5], ["a", "b"])
    ds = EpisodeWindowDataset(p, image_size=8, chunk_size=2)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    n = sum(b["actions"].shape[0] for b in dl)
    assert n == 10


def test_random_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 9 * 9, dtype=torch.float32).reshape(2, 3, 9, 9)
    for dtype in (torch.float32, torch.uint8):
        xi = (x % 251).to(dtype)
        y = random_shift(xi, 2, generator=g)
        assert y.shape == xi.shape and y.dtype == dtype
    # an image with a single bright pixel moves by at most pad in each axis
    pad = 3
    for _ in range(20):
        img = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
        img[:, 0, 8, 8] = 255
        y = random_shift(img, pad, generator=g)
        for b in range(4):
            (r, c), = torch.nonzero(y[b, 0] == 255).tolist()
            assert abs(r - 8) <= pad and abs(c - 8) <= pad
    # matches replicate-pad + crop exactly
    img = torch.rand(3, 2, 7, 7)
    g1 = torch.Generator().manual_seed(5)
    y = random_shift(img, 2, generator=g1)
    g2 = torch.Generator().manual_seed(5)
    sh = torch.randint(0, 5, (3, 2), generator=g2)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2), mode="replicate")
    for b in range(3):
        dy, dx = sh[b].tolist()
        torch.testing.assert_close(y[b], padded[b, :, dy:dy + 7, dx:dx + 7])
    assert random_shift(img, 0) is img
    assert random_shift(img[0], 1).shape == img[0].shape
