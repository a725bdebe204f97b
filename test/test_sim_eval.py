"""Direct (no DDS) closed-loop evaluation: expert adapter, chunk execution, report, CLI."""
from __future__ import annotations

import json

import pytest

import mode_ros.sim  # noqa: F401  (headless GL backend before MuJoCo is imported)

pytest.importorskip("metaworld", reason="Meta-World not installed")

import numpy as np  # noqa: E402

from mode_ros.sim.evaluate import EvalConfig, ExpertPolicy, evaluate, format_table  # noqa: E402
from mode_ros.sim.metaworld_env import STATE_DIM, instruction_for  # noqa: E402


class ChunkProbe:
    """A fake MoDE policy: fixed chunk of out-of-range actions; records what it was given."""

    camera_names = ["static", "gripper"]
    chunk_size = 10
    action_dim = 4
    state_dim = STATE_DIM

    def __init__(self):
        self.calls = []

    def predict_chunk(self, images, goal_text, state=None, seed=None):
        self.calls.append((images, goal_text, state, seed))
        return np.tile(np.array([[3.0, 0.0, 0.0, -3.0]], np.float32), (self.chunk_size, 1))


def test_expert_adapter_succeeds_through_the_eval_loop(tmp_path):
    cfg = EvalConfig(tasks=["reach-v3"], episodes=2, seed=0, json_path=str(tmp_path / "r.json"),
                     gif_dir=str(tmp_path / "gif"), gif_size=32, image_size=32)
    report = evaluate(ExpertPolicy(), cfg, log=None, label="expert")
    r = report["tasks"]["reach-v3"]
    assert r["episodes"] == 2 and r["success_rate"] == 1.0 and report["mean_success"] == 1.0
    assert all(e["layout"]["split"] == "eval" for e in r["episode_results"])
    assert json.loads((tmp_path / "r.json").read_text())["mean_success"] == 1.0
    assert (tmp_path / "gif" / "reach-v3.gif").stat().st_size > 0
    assert "reach-v3" in format_table(report) and "mean (expert)" in format_table(report)


def test_chunks_are_replanned_and_clipped():
    probe = ChunkProbe()
    cfg = EvalConfig(tasks=["reach-v3"], episodes=2, max_steps=12, replan_every=4, image_size=24, batch=1)
    report = evaluate(probe, cfg, log=None)
    r = report["tasks"]["reach-v3"]
    assert r["success_rate"] == 0.0 and all(e["steps"] == 12 for e in r["episode_results"])
    assert len(probe.calls) == 2 * 3  # 12 steps / 4 rows per chunk, per episode
    images, goal, state, seed = probe.calls[0]
    assert goal == instruction_for("reach-v3")
    assert len(images) == 2 and all(im.shape == (24, 24, 3) and im.dtype == np.uint8 for im in images)
    assert state.shape == (STATE_DIM,)
    # the hand moved +x by the clipped action (1 cm per unit per step) and was not thrown out of range
    x0, x1 = probe.calls[0][2][0], probe.calls[1][2][0]
    assert 0.01 < x1 - x0 < 0.06


def test_cli_eval_expert(tmp_path, capsys):
    from mode_ros.cli import main
    rc = main(["sim", "eval", "--expert", "--tasks", "reach", "--episodes", "1",
               "--json", str(tmp_path / "e.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "e.json").read_text())
    assert list(rep["tasks"]) == ["reach-v3"] and rep["tasks"]["reach-v3"]["episodes"] == 1
    assert "mean (scripted expert)" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_fast(tmp_path, capsys):
    """A wrong checkpoint for `sim eval --ros` is refused before any process starts (the node would
    fail to configure and the evaluation wait minutes for its first chunk); wrong inputs elsewhere
    give one line naming the problem and exit code 2; a bench with nothing runnable here exits 1."""
    import time

    from mode_ros.cli import main
    t0 = time.monotonic()
    assert main(["sim", "eval", "--ros", "--checkpoint", str(tmp_path), "--tasks", "reach", "--episodes", "1"]) == 2
    assert time.monotonic() - t0 < 30 and "not a mode_ros checkpoint" in capsys.readouterr().err
    assert main(["bench", "--presets", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "Traceback" not in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["bench", "--presets", "tiny", "--paths", "graph", "--runs", "1", "--warmup", "0"]) == 1
    assert "skipped (CUDA graphs need a CUDA device)" in capsys.readouterr().err
