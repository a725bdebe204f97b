"""ONNX export of the whole chunk (mode_ros.export.onnx) and its onnxruntime backend: the exported
chunk equals the PyTorch cached sampler's, the graph has no router and exactly 2 expert MLPs per layer
per step, and a corrupt or mismatched export is refused with a clear error."""
from __future__ import annotations

import json
import shutil
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
    assert meta["steps"] == TINY_STEPS and [i["name"] for i in meta["inputs"]] == ["images", "goal", "noise"]
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
