"""ONNX export of the whole chunk (mode_ros.export.onnx) and its onnxruntime backend: the exported
chunk equals the PyTorch cached sampler's, the graph has no router and exactly 2 expert MLPs per layer
per step, and a corrupt or mismatched export is refused with a clear error."""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import mode_ros  # noqa: E402
from mode_ros.export.onnx import (META_FILE, MODEL_FILE, TOLERANCE, OnnxExportError, example_inputs,  # noqa: E402
                                  export_onnx, file_sha256, graph_summary)
from mode_ros.export.onnx_runtime import OnnxChunk, attach_onnx  # noqa: E402
from mode_ros.model.policy import MoDEPolicy  # noqa: E402

MT10 = Path(mode_ros.__file__).resolve().parent / "assets" / "metaworld_mt10"
TINY_STEPS = 3


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """The tiny preset (two cameras, 2 layers, 4 experts) exported at 3 steps, fp32, dynamic batch."""
    policy = MoDEPolicy.from_preset("tiny", seed=1).eval()
    out = tmp_path_factory.mktemp("tiny_onnx")
    meta = export_onnx(policy, out, steps=TINY_STEPS, batch=1, dynamic_batch=True)
    return policy, out, meta


@pytest.fixture(scope="module")
def mt10_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt10_onnx")
    meta = export_onnx(MoDEPolicy.from_pretrained(MT10), out, checkpoint=MT10)
    return out, meta


def _ort_chunk(out: Path, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    return OnnxChunk.load(out).run_all(inputs.get("images"), inputs["goal"], inputs.get("state"), inputs["noise"])


def test_tiny_with_cameras_equals_cached_sampler_at_another_batch(tiny_export):
    policy, out, meta = tiny_export
    assert meta["steps"] == TINY_STEPS and meta["prefix"]
    assert [i["name"] for i in meta["inputs"]] == ["images", "goal", "noise", "prefix_normalized", "prefix_weights"]
    x = example_inputs(policy, batch=3, seed=7)   # not the traced inputs, and another batch size
    robot, norm = _ort_chunk(out, x)
    with torch.no_grad():
        ref = policy.sample_normalized(x["images"], x["goal"], None, x["noise"], cached=True).float().numpy()
    assert norm.shape == (3, policy.chunk_size, policy.action_dim)
    assert np.abs(norm - ref).max() <= 1e-4
    np.testing.assert_allclose(robot, policy.postprocess(torch.from_numpy(norm)), atol=1e-6)


def test_graph_has_no_router_and_two_expert_mlps_per_layer_per_step(tiny_export):
    policy, out, meta = tiny_export
    s = graph_summary(onnx.load(str(out / MODEL_FILE)))
    assert s["topk"] == 0 and "Softmax" in s["ops"]   # softmax of attention only; no TopK anywhere
    table = policy.sampler.ensure()
    want = Counter(f"denoiser.blocks.{l}.expert{e}" for step in table.indices for l, sel in enumerate(step) for e in sel)
    for part in ("w1", "w2"):   # up- and down-projection: one MatMul each per selected expert
        uses = s["expert_matmuls"][part]
        assert Counter(uses) == want
        per_layer = Counter()
        for key, n in uses.items():
            per_layer[key.rsplit(".", 1)[0]] += n
        assert per_layer == {f"denoiser.blocks.{l}": 2 * TINY_STEPS for l in range(policy.config.model.n_layers)}
    # each selected (layer, expert) is stored once, unselected experts not at all
    assert len(s["stored_expert_tensors"]) == 3 * len(want)
    # the routing recorded in export.json is the one baked in
    assert json.loads((out / META_FILE).read_text())["routing"] == [[list(e) for e in s_] for s_ in table.indices]


def test_onnxruntime_gets_fused_norms_attention_and_projections_without_expert_copies(mt10_export, tmp_path):
    """The backend hands onnxruntime a rewritten graph (ort_graph): every RMSNorm one node, every
    attention one MultiHeadAttention, Q/K/V one projection, the experts untouched (no concatenated copy);
    its chunk stays within the fp32 tolerance of PyTorch (the export verifies both graphs). Static batch
    (the default); a dynamic-batch export keeps its shape-computed norms and attention as they are."""
    from mode_ros.export.ort_graph import ort_model
    tiny = MoDEPolicy.from_preset("tiny", seed=1).eval()
    tiny_meta = export_onnx(tiny, tmp_path, steps=TINY_STEPS)
    for (out, meta), layers in (((tmp_path, tiny_meta), 2), (mt10_export, 4)):
        steps = meta["steps"]
        v = meta["verify"]
        assert v["rewrites"]["rewritten"] and v["max_abs_diff_normalized_rewritten"] <= TOLERANCE["fp32"]
        data, counts = ort_model(Path(out) / MODEL_FILE)
        assert counts["attentions"] == layers * steps and counts["projections"] == layers * steps
        assert counts["rms_norms"] >= 4 * layers * steps and counts["nodes"] < counts["nodes_folded"] * 0.75
        model = onnx.load_from_string(data)
        ops = Counter(n.op_type for n in model.graph.node)
        assert ops["MultiHeadAttention"] == layers * steps and ops["Softmax"] == 0 and ops["ReduceL2"] == 0
        expert_bytes = sum(len(i.raw_data) for i in onnx.load(str(Path(out) / MODEL_FILE)).graph.initializer
                           if ".moe.expert" in i.name)
        assert sum(len(i.raw_data) for i in model.graph.initializer if ".moe.expert" in i.name) == expert_bytes
        fused = [i for i in model.graph.initializer if i.name.startswith("proj") and i.name.endswith("_w")]
        assert len(fused) == layers   # one Q/K/V concatenation per layer, shared by every step
    x = example_inputs(tiny, batch=1, seed=7)
    want = _ort_chunk(tmp_path, x)[1]
    plain = OnnxChunk.load(tmp_path, rewrite=False)
    assert plain.rewrites == {"rewritten": False}
    got = plain.run_all(x["images"], x["goal"], None, x["noise"])[1]
    assert np.abs(got - want).max() <= TOLERANCE["fp32"]


def test_mt10_checkpoint_backend_publishes_the_torch_chunks(mt10_export):
    out, meta = mt10_export
    assert meta["verify"]["max_abs_diff_normalized"] <= 1e-4
    policy = MoDEPolicy.from_pretrained(MT10)
    rng = np.random.default_rng(0)
    states = [rng.normal(size=policy.state_dim).astype(np.float32) for _ in range(3)]
    goals = policy.known_goals[:3]
    ref = [policy.predict_chunk(None, g, s, seed=11 + i) for i, (g, s) in enumerate(zip(goals, states))]
    attach_onnx(policy, out, checkpoint=MT10)
    got = [policy.predict_chunk(None, g, s, seed=11 + i) for i, (g, s) in enumerate(zip(goals, states))]
    for a, b in zip(ref, got):
        assert a.shape == (10, 4) and np.abs(a - b).max() <= 1e-4 * float(policy.action_norm.scale.max())
    assert not np.allclose(got[0], got[1])   # the inputs matter (not a constant graph)


def test_replacement_prefix_runs_in_the_graph(mt10_export):
    """rtc_replace on the onnx backend: the prefix is a graph input, the chunk equals PyTorch's
    replacement sampler (same noise) within the fp32 tolerance, the frozen rows are the previous plan
    exactly, and W = 0 (no prefix) is the plain chunk. Guidance stays in PyTorch."""
    from mode_ros.model.inpainting import ChunkPrefix
    out, meta = mt10_export
    assert meta["prefix"] and meta["verify"]["max_abs_diff_normalized"] <= 1e-4   # verified with a prefix
    torch_policy, onnx_policy = MoDEPolicy.from_pretrained(MT10), MoDEPolicy.from_pretrained(MT10)
    chunk = attach_onnx(onnx_policy, out, checkpoint=MT10)
    goal, st = torch_policy.known_goals[1], np.linspace(-0.3, 0.6, torch_policy.state_dim).astype(np.float32)
    prev = torch_policy.predict_chunk(None, goal, st, seed=1)
    pre = ChunkPrefix(prev[4:], fixed=3)
    want = torch_policy.predict_chunk(None, goal, st, seed=2, prefix=pre)
    got = onnx_policy.predict_chunk(None, goal, st, seed=2, prefix=pre)
    scale = float(torch_policy.action_norm.scale.max())
    assert np.abs(got - want).max() <= 1e-4 * scale
    np.testing.assert_array_equal(got[:3], prev[4:7])
    plain = onnx_policy.predict_chunk(None, goal, st, seed=2)
    assert np.abs(plain - torch_policy.predict_chunk(None, goal, st, seed=2)).max() <= 1e-4 * scale
    assert np.abs(got[3:6] - plain[3:6]).max() > 1e-3          # the overlap rows were pulled
    guided = ChunkPrefix(prev[4:], fixed=3, method="guidance")
    assert chunk.has_prefix and not chunk.takes(onnx_policy.chunk_guide([guided], torch.zeros(1, 10, 4)))


def test_prefix_trained_checkpoint_reads_its_prefix_clean_in_the_graph(tmp_path):
    """A prefix-trained policy (diffusion.prefix_prob > 0) gives its frozen rows clean at every step in
    the exported graph as in PyTorch: the export verifies (with a prefix) within the fp32 tolerance and
    the chunk differs from the same weights sampled as an inference-time-only replacement."""
    from mode_ros.model.inpainting import ChunkPrefix
    policy = MoDEPolicy.from_preset("tiny", seed=2, camera_names=[], state_dim=3,
                                    vision={"arch": "none", "image_size": [32, 32], "random_shift_pad": [0]}).eval()
    policy.set_goal_embeddings({"go": torch.randn(512)})
    policy.config.diffusion.prefix_prob, policy.config.diffusion.prefix_max_rows = 0.5, 5
    meta = export_onnx(policy, tmp_path, steps=3)
    assert meta["verify"]["max_abs_diff_normalized"] <= TOLERANCE["fp32"]
    st = np.array([0.2, -0.1, 0.4], np.float32)
    prev = policy.predict_chunk(None, "go", st, seed=1)
    pre = ChunkPrefix(prev[2:8], fixed=3)
    want = policy.predict_chunk(None, "go", st, seed=5, prefix=pre)
    attach_onnx(policy, tmp_path)
    got = policy.predict_chunk(None, "go", st, seed=5, prefix=pre)
    assert np.abs(got - want).max() <= 1e-4 * float(np.max(policy.action_norm.scale if policy.action_norm else 1.0))
    policy.backend = None
    policy.config.diffusion.prefix_prob = 0.0   # the same weights, inference-time replacement only
    assert np.abs(policy.predict_chunk(None, "go", st, seed=5, prefix=pre)[3:] - want[3:]).max() > 1e-3


def test_released_torch_weights_leave_one_copy_and_the_same_chunks(mt10_export):
    """MoDEPolicy.release_torch_weights after attach_onnx (the node without rtc_guidance): the denoiser's PyTorch
    weights are freed (meta device), the chunks are unchanged, warm-up works, and anything that would
    need the PyTorch weights says so instead of computing garbage."""
    from mode_ros.model.inpainting import ChunkPrefix
    out, _ = mt10_export
    policy = MoDEPolicy.from_pretrained(MT10)
    attach_onnx(policy, out, checkpoint=MT10)
    goal, st = policy.known_goals[0], np.linspace(-0.5, 0.5, policy.state_dim).astype(np.float32)
    ref = policy.predict_chunk(None, goal, st, seed=4)
    held = sum(p.numel() * p.element_size() for p in policy.denoiser.parameters())
    freed = policy.release_torch_weights()
    assert freed >= held > 0
    assert all(p.device.type == "meta" for p in policy.denoiser.parameters())
    assert policy.device.type == "cpu" and policy.dtype == torch.float32
    np.testing.assert_array_equal(policy.predict_chunk(None, goal, st, seed=4), ref)
    assert policy.warmup(runs=1) > 0
    with pytest.raises(RuntimeError, match="released for its OnnxChunk backend"):
        policy.sample_normalized(None, torch.zeros(1, 512), None, cached=True)
    policy.predict_chunk(None, goal, st, prefix=ChunkPrefix(ref[:3], fixed=2))   # replacement: in the graph
    with pytest.raises(RuntimeError, match="a guidance prefix needs PyTorch sampling"):
        policy.predict_chunk(None, goal, st, prefix=ChunkPrefix(ref[:3], fixed=2, method="guidance"))


def test_fp16_export_within_stated_tolerance(tmp_path):
    """fp16 denoiser weights (encoders fp32, as in PyTorch): within 1e-2 normalised of PyTorch's fp16
    cached sampler on the same inputs (``TOLERANCE``), and within 0.15 of the fp32 one (fp16 rounding
    itself, measured 0.08 at 10 steps on this checkpoint)."""
    policy = MoDEPolicy.from_pretrained(MT10, num_steps=3)
    x = example_inputs(policy, batch=2, seed=3)
    st = torch.from_numpy(policy.state_norm.normalize(x["state"].numpy()))
    with torch.no_grad():
        ref32 = policy.sample_normalized(None, x["goal"], st, x["noise"], cached=True).float().numpy()
    meta = export_onnx(policy, tmp_path, dtype="fp16", batch=2)
    assert meta["verify"]["max_abs_diff_normalized"] <= TOLERANCE["fp16"]
    s = graph_summary(onnx.load(str(tmp_path / MODEL_FILE)))
    assert s["topk"] == 0 and sum(s["expert_matmuls"]["w1"].values()) == 2 * 3 * 4
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in onnx.load(str(tmp_path / MODEL_FILE)).graph.initializer
               if ".moe.expert" in i.name)
    _, norm = _ort_chunk(tmp_path, x)
    assert np.abs(norm - ref32).max() <= 0.15
    rw = meta["verify"]["rewrites"]
    assert not rw["rewritten"] and "fp16" in rw["skipped"] and "error" not in rw   # fp32 graphs only


def test_corrupt_or_mismatched_export_is_refused_with_a_clear_error(tiny_export, mt10_export, tmp_path):
    tiny_policy, tiny_out, _ = tiny_export
    mt10_out, _ = mt10_export
    bad = tmp_path / "bad"
    shutil.copytree(mt10_out, bad)
    (bad / MODEL_FILE).write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(OnnxExportError, match=r"model.onnx: sha256 .* was changed or replaced"):
        OnnxChunk.load(bad)
    meta = json.loads((bad / META_FILE).read_text())
    meta["onnx_sha256"] = file_sha256(bad / MODEL_FILE)
    (bad / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(OnnxExportError, match=r"model.onnx: onnxruntime cannot load it"):
        OnnxChunk.load(bad)
    (bad / META_FILE).write_text("{")
    with pytest.raises(OnnxExportError, match=r"export.json: not valid JSON"):
        OnnxChunk.load(bad)
    with pytest.raises(OnnxExportError, match=r"not an ONNX export"):
        OnnxChunk.load(tmp_path)
    # an export of another checkpoint: other layout, or same layout with other weights
    mt10 = MoDEPolicy.from_pretrained(MT10)
    with pytest.raises(OnnxExportError, match=r"another layout \(camera_names: export \['static', 'gripper'\], policy \[\]"):
        attach_onnx(mt10, tiny_out)
    other = MoDEPolicy.from_preset("tiny", seed=2).eval()
    with pytest.raises(OnnxExportError, match=r"exported from another checkpoint"):
        attach_onnx(other, tiny_out)
    assert other.backend is None and tiny_policy.backend is None


@pytest.mark.ros
def test_node_with_onnx_backend_publishes_the_torch_chunks(tmp_path, ros_harness, start_node):
    """Two policy nodes on one checkpoint (tiny, two cameras, 3-d state, 3 steps), inference_backend
    torch and onnx, in lockstep sim time with seed 0 and the same observations: every chunk message
    carries the same actions (noise is drawn from (seed, stamp)); a corrupt export fails configure."""
    import yaml
    from rclpy.qos import qos_profile_sensor_data
    from rclpy.time import Time
    from ros_helpers import executable
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    from mode_ros.msg import ActionChunk
    from mode_ros.ros.policy_node import GOAL_QOS

    ckpt, goal_text = tmp_path / "ckpt", "open the drawer"
    policy = MoDEPolicy.from_preset("tiny", seed=3, state_dim=3).eval()
    policy.set_goal_embeddings({goal_text: torch.randn(512)})
    policy.save_pretrained(ckpt)
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["diffusion"]["num_steps"] = 3
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    export_onnx(MoDEPolicy.from_pretrained(ckpt), tmp_path / "onnx", checkpoint=ckpt)
    h, rate, names = ros_harness, 10.0, ("torch_policy", "onnx_policy")
    clock_pub = h.node.create_publisher(Clock, "/clock", 10)
    pubs = {n: ({c: h.node.create_publisher(Image, f"/{n}/image_{c}", qos_profile_sensor_data) for c in ("static", "gripper")},
                h.node.create_publisher(JointState, f"/{n}/joint_states", qos_profile_sensor_data),
                h.node.create_publisher(String, f"/{n}/goal", GOAL_QOS)) for n in names}
    chunks = {n: h.collect(ActionChunk, f"/{n}/action_chunk", 100) for n in names}
    for _, _, goal in pubs.values():
        goal.publish(String(data=goal_text))
    common = {"checkpoint": str(ckpt), "device": "cpu", "use_sim_time": True, "control_rate_hz": rate,
              "replan_every": 2, "lockstep_inference": True, "state_joint_names": ["j0", "j1", "j2"],
              "torch_threads": 1, "seed": 0}
    nodes = {"torch_policy": start_node(executable("policy_node"), name="torch_policy", params=common),
             "onnx_policy": start_node(executable("policy_node"), name="onnx_policy",
                                       params={**common, "inference_backend": "onnx", "onnx_model": str(tmp_path / "onnx")})}

    def observe(st, k):   # the same observation for a tick however often it is re-sent
        frame = np.random.default_rng(k).integers(0, 255, (24, 32, 3), dtype=np.uint8).tobytes()
        for cams, js_pub, _ in pubs.values():
            for p in cams.values():
                m = Image()
                m.header.stamp = st
                m.height, m.width, m.encoding, m.step, m.data = 24, 32, "rgb8", 32 * 3, frame
                p.publish(m)
            js = JointState()
            js.header.stamp = st
            js.name, js.position = ["j0", "j1", "j2"], [0.1 * k, -0.2, 0.3]
            js_pub.publish(js)

    def starts(n):   # chunk start stamp -> actions
        return {m.header.stamp.sec * 10**9 + m.header.stamp.nanosec: np.asarray(m.actions)
                for m in chunks[n].msgs() if m.first_index == 0}
    try:
        for k in range(6):
            t_ns = 3_000 * 10**9 + k * int(1e9 / rate)
            st = Time(nanoseconds=t_ns).to_msg()
            deadline, resend = time.monotonic() + (240 if k == 0 else 30), 0.0
            while not all(any(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec + m.first_index * int(1e9 / rate)
                              == t_ns for m in chunks[n].msgs()) for n in names):
                assert time.monotonic() < deadline, f"no message for tick {k}\n" + "\n".join(x.tail() for x in nodes.values())
                if time.monotonic() > resend:   # (again: the nodes may still be starting)
                    observe(st, k)
                    clock_pub.publish(Clock(clock=st))
                    resend = time.monotonic() + 1.0
                time.sleep(0.005)
    finally:
        h.drop(clock_pub, *chunks.values(), *(p for cams, js, g in pubs.values() for p in (*cams.values(), js, g)))
    a, b = starts("torch_policy"), starts("onnx_policy")
    assert sorted(a) == sorted(b) and len(a) >= 3, (sorted(a), sorted(b))
    for stamp in a:
        assert np.abs(a[stamp] - b[stamp]).max() <= 1e-4, stamp
    assert not np.allclose(*[a[s] for s in sorted(a)[:2]])
    out = nodes["onnx_policy"].output()
    assert "inference: onnxruntime" in out and "PyTorch weights released" in out
    # a corrupt export fails configure, naming the file
    (tmp_path / "onnx" / MODEL_FILE).write_bytes(b"not onnx")
    bad = start_node(executable("policy_node"), name="bad_onnx_policy",
                     params={**common, "inference_backend": "onnx", "onnx_model": str(tmp_path / "onnx")})
    bad.wait_for_output("configure failed", 120)
    assert "model.onnx: sha256" in bad.output() and h.lifecycle_state("/bad_onnx_policy") == "unconfigured"



def test_onnx_threads_are_calibrated_within_the_budget(mt10_export):
    """``calibrate``: the thread count is a budget; the session kept is the fewest threads within 10 % of
    the fastest count timed here (a deliberately slowed session is never kept), with the same chunk;
    the node's onnx_threads N > 0 fixes N, 0 calibrates, and the deploy line says which."""
    from mode_ros.export.deploy import load_policy
    from mode_ros.export.onnx_runtime import thread_candidates
    from mode_ros.ros.params import NodeParams
    out, _ = mt10_export
    assert thread_candidates(4) == [4, 1, 2] and thread_candidates(1) == [1] and thread_candidates(6) == [6, 1, 2, 4]
    x = example_inputs(MoDEPolicy.from_pretrained(MT10), batch=1, seed=3)
    plain = OnnxChunk.load(out, threads=1)
    chunk = OnnxChunk.load(out, threads=2, calibrate=True)
    th = chunk.threads
    assert set(th["median_ms"]) == {"1", "2"} and th["requested"] == 2
    assert th["chosen"] == min(int(t) for t, v in th["median_ms"].items() if v <= 1.1 * min(th["median_ms"].values()))
    assert chunk.session.get_session_options().intra_op_num_threads == th["chosen"]
    args = (None, x["goal"], x["state"], x["noise"])
    np.testing.assert_allclose(chunk.run_all(*args)[1], plain.run_all(*args)[1], atol=1e-6)

    class Slowed:   # a session that takes 20 ms longer per chunk
        def __init__(self, sess):
            self.sess = sess

        def run(self, *a):
            time.sleep(0.02)
            return self.sess.run(*a)
    fast = plain.session
    chunk.calibrate_threads({2: Slowed(fast), 1: fast}, rounds=2, block=2)
    assert chunk.threads["chosen"] == 1 and chunk.session is fast
    chunk.calibrate_threads({2: fast, 1: Slowed(fast)}, rounds=2, block=2)
    assert chunk.threads["chosen"] == 2 and chunk.session is fast
    base = {"checkpoint": str(MT10), "inference_backend": "onnx", "onnx_model": str(out), "torch_threads": 2}
    _, described = load_policy(NodeParams.from_mapping(base))
    assert "(calibrated, ms per chunk by threads: {'2':" in described
    policy, described = load_policy(NodeParams.from_mapping({**base, "onnx_threads": 1}))
    assert ", 1 thread;" in described and policy.backend.session.get_session_options().intra_op_num_threads == 1

def test_load_policy_applies_sampling_steps_and_refuses_a_mismatched_export(mt10_export):
    """mode_ros.export.deploy.load_policy (the node's and offline replay's set-up): sampling_steps sets
    the PyTorch sampler's steps; with the onnx backend it must equal the export's."""
    from mode_ros.export.deploy import DeployError, load_policy
    from mode_ros.ros.params import NodeParams
    out, meta = mt10_export
    policy, described = load_policy(NodeParams.from_mapping({"checkpoint": str(MT10), "sampling_steps": 3,
                                                             "torch_threads": 0}))
    assert policy.num_steps == 3 and len(policy.sampler.ensure().indices) == 3 and "3 steps" in described
    base = {"checkpoint": str(MT10), "inference_backend": "onnx", "onnx_model": str(out)}
    policy, described = load_policy(NodeParams.from_mapping(base))
    assert policy.backend is not None and policy.released_from and f"({meta['steps']} steps" in described
    with pytest.raises(DeployError, match=r"sampling_steps: 4, but the ONNX export .* has 10 steps"):
        load_policy(NodeParams.from_mapping({**base, "sampling_steps": 4}))
    with pytest.raises(DeployError, match="onnx_model: not set"):
        load_policy(NodeParams.from_mapping({**base, "onnx_model": ""}))
    kept, described = load_policy(NodeParams.from_mapping({**base, "execution_strategy": "rtc_guidance"}))
    assert kept.released_from is None and "PyTorch weights kept" in described
