"""Trainer: over-fitting, exact resume, DDP (gloo, 2 ranks) equivalence, exported checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mode_ros.data.episodes import EpisodeWriter
from mode_ros.model.policy import MoDEPolicy
from mode_ros.train.config import TrainConfig
from mode_ros.train.trainer import Trainer


def write_episodes(path: Path, n_eps=2, T=12, cams=("static",), size=16, state=True, seed=0):
    rng = np.random.default_rng(seed)
    goals = ["open the drawer", "push the button"]
    with EpisodeWriter(path, list(cams), ["x", "y", "gripper"], control_rate_hz=10.0,
                       state_keys=["proprio"] if state else ()) as w:
        for e in range(n_eps):
            t = np.arange(T)[:, None]
            acts = np.concatenate([np.sin(t / 3 + e) * 0.05, np.cos(t / 4 + e) * 0.02,
                                   np.where(t < T // 2, 1.0, -1.0)], axis=1).astype(np.float32)
            imgs = {c: rng.integers(0, 255, (T, size, size, 3), dtype=np.uint8) for c in cams}
            st = {"proprio": rng.normal(size=(T, 4)).astype(np.float32)} if state else None
            w.add_episode(acts, imgs, goals[e % 2], states=st)
    return path


def tiny_cfg(tmp_path, data, steps=20, batch=8, cams=None, **optim):
    d = {"out_dir": str(tmp_path / "run"), "seed": 3, "preset": "tiny",
         "policy": {"model": {"attn_pdrop": 0.0, "mlp_pdrop": 0.0}, "vision": {"image_size": [16, 16]},
                    "gripper_dims": [2]},
         "data": {"paths": [str(data)], "state_keys": ["proprio"]},
         "optim": {"steps": steps, "batch_size": batch, "lr": 1e-3, "warmup_frac": 0.1, "hold_frac": 0.2, **optim},
         "ckpt_every": 0, "log_every": 5, "device": "cpu"}
    if cams is not None:
        d["data"]["cameras"] = cams
    return TrainConfig.from_dict(d)


def test_config_errors_name_the_key(tmp_path):
    from mode_ros.model.config import ConfigError
    with pytest.raises(ConfigError, match="optim.stepz"):
        TrainConfig.from_dict({"data": {"paths": ["x"]}, "optim": {"stepz": 3}})
    with pytest.raises(ConfigError, match="policy.model.n_layerz"):
        TrainConfig.from_dict({"data": {"paths": ["x"]}, "policy": {"model": {"n_layerz": 3}}})


def test_overfit_state_only_and_reproduce_chunks(tmp_path):
    data = write_episodes(tmp_path / "ep.hdf5", n_eps=2, T=12)
    cfg = tiny_cfg(tmp_path, data, steps=400, batch=32, cams=[], ema="none", load_balance_weight=0.0, lr=3e-3)
    tr = Trainer(cfg, quiet=True)
    tr.train()
    first = np.mean(tr.losses[:10])
    last = np.mean(tr.losses[-10:])
    assert last < first / 10, (first, last)
    pol = MoDEPolicy.from_pretrained(tmp_path / "run" / "export")
    assert pol.camera_names == [] and pol.state_dim == 4 and pol.known_goals == ["open the drawer", "push the button"]
    # the state model the node's predict_state uses, fitted on the same episodes (random states: all held)
    assert pol.state_model is not None and pol.state_model.state_dim == 4 and pol.state_model.action_dim == 3
    assert pol.state_model.report["transitions"] == 2 * (12 - 2)
    from mode_ros.data.episodes import EpisodeReader
    errs = []
    with EpisodeReader(data) as r:
        for ep in r:
            st = ep.state("proprio")
            for t in (0, 1):
                pred = pol.predict_chunk([], ep.language, state=st[t], seed=0)
                errs.append(np.abs(pred[:, :2] - ep.actions[t:t + 10, :2]).max())
                assert np.array_equal(pred[:, 2], ep.actions[t:t + 10, 2])  # gripper sign (binarised)
    # memorised within 20% of the action range (0.1 / 0.04)
    assert max(errs) < 0.02, errs
    assert (tmp_path / "run" / "export" / "expert_usage.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == 400


def test_resume_is_exact(tmp_path):
    data = write_episodes(tmp_path / "ep.hdf5", n_eps=2, T=10)
    a = Trainer(tiny_cfg(tmp_path / "a", data, steps=8, batch=4), quiet=True)
    a.train()
    b = Trainer(tiny_cfg(tmp_path / "b", data, steps=8, batch=4), quiet=True)
    b.train(4)
    b2 = Trainer(tiny_cfg(tmp_path / "b", data, steps=8, batch=4), quiet=True)
    assert b2.resume() and b2.step == 4
    b2.train()
    assert np.allclose(a.losses, b2.losses, atol=1e-6, rtol=0), (a.losses, b2.losses)
    for (k, v), v2 in zip(a.policy.state_dict().items(), b2.policy.state_dict().values()):
        assert torch.allclose(v.float(), v2.float(), atol=1e-6), k


def test_resume_refuses_data_whose_normalisation_changed(tmp_path):
    """The statistics are refitted from the data at start-up: resuming after the data changed would
    go on training (and export) against another scale, so it is refused with the reason."""
    data = write_episodes(tmp_path / "ep.hdf5", n_eps=2, T=10)
    Trainer(tiny_cfg(tmp_path / "a", data, steps=2, batch=4), quiet=True).train()
    other = write_episodes(tmp_path / "ep2.hdf5", n_eps=2, T=10, seed=5)
    b = Trainer(tiny_cfg(tmp_path / "a", other, steps=4, batch=4), quiet=True)
    with pytest.raises(RuntimeError, match="normalisation fitted on the current data differs"):
        b.resume()
    assert Trainer(tiny_cfg(tmp_path / "a", data, steps=4, batch=4), quiet=True).resume()


DDP_SCRIPT = r"""
import sys, torch, json
from mode_ros.train.config import TrainConfig
from mode_ros.train.trainer import Trainer
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
tr = Trainer(cfg, quiet=True)
tr.train()
if tr.rank == 0:
    torch.save({k: v.clone() for k, v in tr.policy.state_dict().items()}, sys.argv[2])
torch.distributed.destroy_process_group()
"""


def test_ddp_gloo_two_ranks_match_single_process(tmp_path):
    data = write_episodes(tmp_path / "ep.hdf5", n_eps=2, T=10, state=True)
    # deterministic routing for the comparison: all experts selected (top_k = num_experts), no dropout
    d = {"out_dir": str(tmp_path / "ddp"), "seed": 1, "preset": "tiny",
         "policy": {"model": {"attn_pdrop": 0.0, "mlp_pdrop": 0.0, "goal_drop": 0.0, "top_k": 4}},
         "data": {"paths": [str(data)], "state_keys": ["proprio"], "cameras": []},
         "optim": {"steps": 3, "batch_size": 8, "lr": 1e-3, "ema": "none"}, "ckpt_every": 0, "device": "cpu"}
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    import mode_ros
    pkg_root = str(Path(mode_ros.__file__).resolve().parents[1])  # the mode_ros under test, installed or not
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000),
                        str(script), json.dumps(d), str(tmp_path / "ddp.pt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d["out_dir"] = str(tmp_path / "single")
    single = Trainer(TrainConfig.from_dict(d), quiet=True)
    single.train()
    ddp = torch.load(tmp_path / "ddp.pt")
    worst = max((single.policy.state_dict()[k].float() - v.float()).abs().max().item() for k, v in ddp.items())
    assert worst < 1e-5, worst
