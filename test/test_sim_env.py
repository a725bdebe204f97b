"""Meta-World wrapper: layouts, reset/step/render, camera orientation, state, scripted experts."""
from __future__ import annotations

import pytest

import mode_ros.sim  # noqa: F401  (selects the headless GL backend before MuJoCo is imported)

pytest.importorskip("metaworld", reason="Meta-World not installed (pip install metaworld==3.1.1)")

import numpy as np  # noqa: E402

from mode_ros.sim import metaworld_env as mw  # noqa: E402


@pytest.fixture(scope="module")
def reach():
    sim = mw.MetaWorldSim("reach-v3", cameras=["corner", "gripperPOV"], image_size=32)
    yield sim
    sim.close()


def test_mt10_tasks_and_instructions():
    assert len(mw.MT10) == 10 and all(t.endswith("-v3") for t in mw.MT10)
    assert len(set(mw.MT10_TASKS.values())) == 10  # one distinct instruction per task
    assert mw.resolve_tasks("reach,push-v3") == ["reach-v3", "push-v3"]
    assert mw.resolve_tasks("all") == mw.MT10
    with pytest.raises(ValueError, match="unknown task"):
        mw.resolve_tasks("fly")
    assert mw.task_for_instruction(mw.instruction_for("door-open-v3")) == "door-open-v3"
    assert mw.camera_for("static") == "corner" and mw.camera_for("gripper") == "gripperPOV"
    assert mw.camera_topic_name("gripperPOV") == "gripper_pov"


def test_reset_step_render_shapes(reach):
    obs = reach.reset("train", 0, 0)
    assert set(obs.images) == {"corner", "gripperPOV"}
    for img in obs.images.values():
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 1
    assert obs.state.shape == (mw.STATE_DIM,) and obs.state.dtype == np.float32
    assert obs.raw.shape == (39,)
    np.testing.assert_allclose(obs.state[18:21], obs.raw[36:39], rtol=1e-6)  # goal
    res = reach.step(np.array([1.0, 0.0, 0.0, 5.0]))  # out-of-range action is clipped, not an error
    assert res.obs.step == 1 and reach.steps == 1 and not res.done
    assert res.obs.state[0] > obs.state[0]  # moved in +x
    with pytest.raises(ValueError):
        reach.step(np.zeros(3))


def test_reset_is_deterministic_and_layouts_differ(reach):
    a = reach.reset("train", 0, 3, render=False).raw
    b = reach.reset("train", 0, 3, render=False).raw
    np.testing.assert_array_equal(a, b)
    c = reach.reset("train", 0, 4, render=False).raw
    assert np.abs(a[36:39] - c[36:39]).max() > 1e-3  # another goal


def test_corner_camera_is_rotated_upright():
    """The corner camera's frame has its image-up axis pointing down in the world: the raw render is
    upside down. Our output puts a painted object where the 180-degree-rotated projection says."""
    import mujoco
    size = 64
    sim = mw.MetaWorldSim("reach-v3", cameras=["corner"], image_size=size)
    try:
        sim.reset("train", 0, 0, render=False)
        m, d = sim.env.model, sim.env.data
        body = m.body("obj").id
        geoms = np.where(m.geom_bodyid == body)[0]
        m.geom_rgba[geoms] = [0, 1, 0, 1]
        m.geom_matid[geoms] = -1
        mujoco.mj_forward(m, d)
        img = sim.render()["corner"]
        cam = m.camera("corner").id
        R, p = d.cam_xmat[cam].reshape(3, 3), d.cam_xpos[cam]
        assert R[2, 1] < -0.5  # camera "up" points down in the world -> raw image upside down
        pc = R.T @ (d.xpos[body] - p)
        f = (size / 2) / np.tan(np.deg2rad(m.cam_fovy[cam]) / 2)
        row_raw = size / 2 - f * pc[1] / (-pc[2])
        col_raw = size / 2 + f * pc[0] / (-pc[2])
        green = (img[..., 1] > 180) & (img[..., 0] < 90) & (img[..., 2] < 90)
        ys, xs = np.nonzero(green)
        assert len(ys) > 0
        assert abs(ys.mean() - (size - row_raw)) < 2.5 and abs(xs.mean() - (size - col_raw)) < 2.5
        assert ys.mean() > size / 2  # the object on the table lies in the lower half once upright
    finally:
        sim.close()


def test_state_is_enough_for_the_expert(reach):
    obs = reach.reset("train", 0, 0, render=False)
    ex = mw.ScriptedExpert("reach-v3")
    np.testing.assert_allclose(ex.act(obs.raw), ex.act_from_state(obs.state), atol=1e-5)


def test_expert_succeeds_on_reach():
    sim = mw.MetaWorldSim("reach-v3", cameras=[], image_size=32)
    try:
        for i in range(2):
            ep = mw.run_expert_episode(sim, mw.ScriptedExpert("reach-v3", noise=0.1,
                                                              rng=np.random.default_rng(i)),
                                       mw.layout("reach-v3", "train", 0, i), render=False)
            assert ep["success"] and ep["steps"] < mw.MAX_EPISODE_STEPS
            assert ep["actions"].shape == (ep["steps"], 4) and np.abs(ep["actions"]).max() <= 1.0
    finally:
        sim.close()


def test_layout_split_addressing_and_heldout_layouts_differ():
    tr = mw.layout("push-v3", "train", 0, 51)
    assert (tr.mt1_seed, tr.mt1_index) == (1, 1)
    ev = mw.layout("push-v3", "eval", 0, 0)
    assert ev.mt1_seed == mw.SPLIT_BASE["eval"]
    # the largest training MT1 seed stays below the first evaluation MT1 seed
    last = mw.layout("push-v3", "train", mw.SPLIT_BASE["eval"] // mw.SEED_STRIDE - 1,
                     mw.SEED_STRIDE * mw.LAYOUTS_PER_SEED - 1)
    assert last.mt1_seed < ev.mt1_seed
    train = np.stack([mw.layout_vector(mw.layout("push-v3", "train", 0, i)) for i in range(50)])
    held = np.stack([mw.layout_vector(mw.layout("push-v3", "eval", 0, i)) for i in range(50)])
    dist = np.linalg.norm(train[:, None, :] - held[None, :, :], axis=-1)
    assert dist.min() > 1e-3, "a held-out layout repeats a training layout"
    with pytest.raises(ValueError):
        mw.layout("push-v3", "test", 0, 0)


def test_rendering_then_importing_triton_does_not_crash(tmp_path):
    """Regression: Mesa's llvmpipe (EGL on a CPU) loads the system libLLVM globally; Triton's private
    LLVM loaded after it (torchvision -> torch._dynamo -> triton) segfaulted the process. The renderer
    preloads libtriton before the first GL context. Run in a fresh interpreter: a crash would kill
    this one."""
    import subprocess
    import sys
    import textwrap
    pytest.importorskip("torchvision")
    code = textwrap.dedent("""
        import mode_ros.sim
        from mode_ros.sim.metaworld_env import MetaWorldSim
        s = MetaWorldSim("reach-v3", cameras=["corner"], image_size=16)
        s.reset()
        s.step([0, 0, 0, 0])
        s.close()
        import torchvision, torch  # imports triton (through torch._dynamo) after the GL context
        s = MetaWorldSim("reach-v3", cameras=["corner"], image_size=16)
        s.reset()
        assert s.render()["corner"].shape == (16, 16, 3)
        s.close()
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
