"""The small-batch Triton kernels of the fused sampler (mode_ros.model.triton_kernels).

No GPU here: their arithmetic is checked under Triton's CPU interpreter (a subprocess with
TRITON_INTERPRET=1, which Triton reads at import), against the PyTorch formulation they replace;
their speed is measured by scripts/gpu_measure.py on a GPU."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interp():
    import mode_ros
    root = str(Path(mode_ros.__file__).resolve().parents[1])   # the package this test process imports
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    script = Path(__file__).with_name("triton_interp_checks.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_attention_kernel_matches_pytorch(interp):
    """q/k RMSNorm + causal attention + (b, t, d) layout in one kernel: fp32 to rounding, bf16 within
    ~1-2 bf16 ulps of the PyTorch bf16 formulation (which rounds differently), padded token and head
    sizes, and causal (a later token never changes an earlier row, bit for bit)."""
    for key in ("attn_fp32_t14_d64", "attn_fp32_t9_d48"):
        assert interp[key] < 1e-6, (key, interp[key])
    for key in ("attn_bf16_t14_d64", "attn_bf16_t9_d48"):
        assert interp[key] < 2e-2, (key, interp[key])
    for dt in ("fp32", "bf16"):
        assert interp[f"attn_{dt}_causal_prefix_equal"] and interp[f"attn_{dt}_causal_last_changed"]
    # reading the QKV projection's split-K partials (sum + bias in the kernel)
    for dt, tol, tdt in (("fp32", 1e-6, "torch.float32"), ("bf16", 2e-2, "torch.bfloat16")):
        r = interp[f"attn_{dt}_from_partials"]
        assert r["splits"] >= 2 and r["dtype"] == tdt and r["rel"] < tol, (dt, r)


def test_add_rms_kernel_matches_pytorch(interp):
    """Residual add of a projection's split-K partials + RMSNorm (+ noise token) in one kernel, rounded
    where the PyTorch formulation rounds: fp32 to rounding, bf16 within 1-2 ulps (the fp32 sum of the
    partials may round the other way: a different summation order)."""
    f, b = interp["add_rms_fp32"], interp["add_rms_bf16"]
    assert f["h"] < 1e-6 and f["y"] < 1e-6 and f["plain_y"] < 1e-6, f
    assert b["h"] < 1e-2 and b["y"] < 2e-2 and b["plain_y"] < 2e-2, b
    assert f["plain_h_is_base"] and b["plain_h_is_base"]


def test_step_in_and_step_out_kernels_match_pytorch(interp):
    """A step's token sequence + first norm (noise token, context, action embedding of x · c_in + pos)
    and its end (action head, EDM output scaling, DDIM update), each one kernel."""
    f, b = interp["step_in_out_fp32"], interp["step_in_out_bf16"]
    assert max(f.values()) < 1e-6, f
    assert max(b.values()) < 2e-2, b


def test_gemm_kernels_match_pytorch(interp):
    """Up-projection with SwiGLU and gates fused, for bf16/fp32 and int8/fp8 weights (widened in the
    kernel, row scales in the epilogue), and the deterministic split-K projection, on contiguous
    blocks and on strided views of stacked experts."""
    for quant in ("none", "int8", "fp8"):
        assert interp[f"swiglu_fp32_{quant}"] < 1e-6, (quant, interp[f"swiglu_fp32_{quant}"])
        assert interp[f"swiglu_bf16_{quant}"] < 1.5e-2, (quant, interp[f"swiglu_bf16_{quant}"])
    assert [interp[f"partials_split{s}"]["splits"] for s in (1, 3, None)] == [1, 3, 3]
    for s in (1, 3, None):
        assert interp[f"partials_split{s}"]["rel"] < 1e-6
    assert interp["linear_int8"] < 1e-6
    # on strided views of stacked experts (what the fused sampler hands them: no copies), the down
    # projection's K blocks straddling two experts; layouts they cannot read are refused
    v = interp["views"]
    assert v["up"] < 1e-6 and v["down"] < 1e-6 and v["down_int8"] < 1e-6 and v["down_splits"] == 2, v
    assert len(v["refused"]) == 2 and all("swiglu_up" in r for r in v["refused"]), v


def test_fused_sampler_with_triton_kernels_equals_cached_sampler(interp):
    """Whole chunks (tiny preset, batch 2, fp32): every combination of the Triton attention and GEMMs,
    including the all-Triton layer chain (both), gives the cached sampler's actions to fp32 rounding; int8 experts through the Triton kernels give
    what PyTorch's int8 path gives; the GPU script's variant harness runs the uncompiled variant."""
    for key in ("sampler_triton_torch_layer_none", "sampler_sdpa_triton_layer_none",
                "sampler_triton_triton_step_none"):
        assert interp[key] < 1e-5, (key, interp[key])
    assert 0 < interp["sampler_triton_triton_step_int8"] < 5e-3
    # the Triton GEMMs read the experts as views of the stacked weights (quantised once): no fused copy
    for key in ("sampler_sdpa_triton_layer_none", "sampler_triton_triton_step_none", "sampler_triton_triton_step_int8"):
        assert interp[key + "_expert_copies"] == 0, key
    assert interp["sampler_int8_triton_vs_torch"] < 1e-5
    # bf16 / fp16 denoiser: the all-Triton step is as close to PyTorch's fused step as that one is to
    # the cached sampler in the same dtype (rounding noise), and stays near the fp32 actions
    for dt in ("bf16", "fp16"):
        assert interp[f"sampler_{dt}_triton_vs_torch_fused"] < 3e-2, dt
        assert interp[f"sampler_{dt}_torch_fused_vs_cached"] < 3e-2, dt
        assert 0 < interp[f"sampler_{dt}_vs_fp32"] < 3e-2, dt
    # fp16 keeps 3 more mantissa bits than bf16: closer to fp32
    assert interp["sampler_fp16_vs_fp32"] < interp["sampler_bf16_vs_fp32"]
    cs = interp["compile_skipped"]
    assert cs["compile"] is False and cs["whole_step"] and "no PyTorch ops" in cs["reason"]
    row = interp["step_variant_row"]
    assert row["failed"] is None and row["same_routing_as_fp32"] and row["max_abs_diff_vs_fp32"] < 1e-5
    assert (row["attention"], row["gemm"], row["compile_mode"]) == ("triton", "triton", "eager")


def test_triton_options_need_cuda_outside_the_interpreter(caplog):
    """Without CUDA (and without the interpreter) the Triton options are refused with the reason by
    the sampler, and enable_fast falls back to the PyTorch kernels with that reason logged."""
    from mode_ros.model import triton_kernels as tk
    from mode_ros.model.bench import preset
    from mode_ros.model.fast import FusedSampler
    from mode_ros.model.policy import MoDEPolicy
    if tk.interpreted() or torch.cuda.is_available():
        pytest.skip("needs a CPU-only process without TRITON_INTERPRET")
    pol = MoDEPolicy(preset("tiny")).eval()
    with pytest.raises(ValueError, match="CUDA device"):
        FusedSampler(pol.sampler, attention="triton")
    with pytest.raises(ValueError, match="gemm"):
        FusedSampler(pol.sampler, gemm="cutlass")
    with pytest.raises(ValueError, match="gemm"):
        pol.enable_fast(fused=True, gemm="cutlass")
    with caplog.at_level(logging.WARNING):
        state = pol.enable_fast(fused=True, attention="triton", gemm="triton", logger=logging.getLogger("t"))
    assert state["fused"] and (state["attention"], state["gemm"]) == ("sdpa", "torch")
    assert "CUDA device" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        state = pol.enable_fast(fused=True, attention="triton", gemm="triton", pdl=True,
                                logger=logging.getLogger("t"))
    assert state["fused"] and not state["pdl"] and state["gemm"] == "torch"
    assert "pdl (programmatic dependent launch)" in caplog.text


def test_launch_configuration_tuning(interp):
    """With tuning on, building the sampler times the candidate launch configurations of every Triton
    GEMM shape of a batch-1 step (QKV, proj, down: split-K; up: SwiGLU), the first eager batch-2 chunk
    tunes its own shapes, each choice is one of the candidates or the heuristic ({}), and the actions
    are unchanged."""
    t = interp["tuning"]
    assert t["build_rows"] == [t["n_tokens"]] and t["chunk_rows"] == [t["n_tokens"], 2 * t["n_tokens"]]
    assert t["kinds"] == ["splitk", "up"] and t["n_keys_build"] == 4   # qkv, proj, down + up
    assert set(t["choices"]) <= {"{}", str({"bn": 64, "bk": 64}), str({"bn": 64, "bk": 64, "split": 2})}
    assert t["err"] < 1e-5


def test_kernel_sweep_harness(interp):
    """The GPU script's per-kernel sweep (bench.kernel_variants) runs every op of a layer-step, PyTorch
    and each Triton launch configuration, and the Triton outputs equal PyTorch's (fp32 weights; the
    int8 rows compare against PyTorch's int8 kernel, which rounds activations to bf16 on this CPU)."""
    rows = interp["kernel_rows"]
    assert not [r for r in rows if r["failed"]], [r for r in rows if r["failed"]]
    ops = {(r["op"], r["weight_quant"]) for r in rows}
    assert ops == {("qkv", "none"), ("proj", "none"), ("attention", "none"), ("up", "none"), ("down", "none"),
                   ("up", "int8"), ("down", "int8"), ("attn+partials", "none"), ("add+norm", "none")}
    for op, q in ops:
        rs = [r for r in rows if (r["op"], r["weight_quant"]) == (op, q)]
        assert [r["impl"] for r in rs].count("torch") == 1
        tri = [r for r in rs if r["impl"] == "triton"]
        assert len(tri) == (1 if op in ("attention", "attn+partials", "add+norm") else 2)
        assert all(r["median_us"] > 0 for r in rs)
        tol = 1e-5 if q == "none" else 0.1
        assert all(r["max_abs_diff_vs_torch"] < tol for r in tri), (op, q, tri)
    assert "best blocks" in interp["kernel_table"] and len(interp["kernel_table"].splitlines()) == 2 + len(ops)
