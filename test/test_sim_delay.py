"""sim eval with an injected inference delay (mode_ros.sim.evaluate.run_delay_episode): the node's chunk
controller in sim time, the previous chunk executing while an inference takes d ticks."""
from __future__ import annotations

import pytest

import mode_ros.sim  # noqa: F401  (headless GL backend before MuJoCo)

pytest.importorskip("metaworld", reason="Meta-World not installed (pip install metaworld==3.1.1)")

import numpy as np  # noqa: E402

from mode_ros.sim.evaluate import DelayEvalConfig, run_delay_episode  # noqa: E402


class ChunkIdPolicy:
    """State-only; every row of chunk n is the action (0.01 * n, 0, 0, 0): actions change only at switches.
    Records the prefix each call carried."""
    camera_names: list = []
    state_dim, chunk_size, action_dim = 21, 10, 4

    def __init__(self):
        self.prefixes = []

    def predict_chunk(self, images, goal, state=None, seed=None, prefix=None):
        assert state is not None and state.shape == (21,)
        self.prefixes.append(prefix)
        out = np.zeros((self.chunk_size, self.action_dim), np.float32)
        out[:, 0] = 0.01 * len(self.prefixes)
        return out


@pytest.mark.parametrize("strategy,d", [("replan", 0), ("replan", 2), ("rtc_replace", 3)])
def test_delay_episode_executes_the_previous_chunk_while_inference_runs(strategy, d):
    pol = ChunkIdPolicy()
    cfg = DelayEvalConfig(tasks=["reach-v3"], episodes=1, max_steps=30, replan_every=5)
    r = run_delay_episode(pol, "reach-v3", 0, strategy, d, cfg)
    assert r["steps"] == 30 and r["inference_failures"] == 0
    assert r["ticks_without_action"] == d          # the first chunk lands d ticks after the first tick
    assert r["switch_changes"] and np.allclose(r["switch_changes"], 0.01, atol=1e-6)
    assert r["inside_changes"] and np.allclose(r["inside_changes"], 0.0)
    if strategy.startswith("rtc"):
        assert pol.prefixes[0] is None and all(p is not None and p.fixed >= d for p in pol.prefixes[1:])
        assert r["estimated_d"] >= d
    else:
        assert all(p is None for p in pol.prefixes)
