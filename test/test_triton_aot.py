"""The Triton kernels compiled for an H100 (sm_90) on this CPU-only machine (mode_ros.model.triton_aot):
they must compile with the installed Triton, fit the SM, not spill, and stream weights with 16-byte loads."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from mode_ros.model import triton_aot as ta  # noqa: E402
from mode_ros.model import triton_kernels as tk  # noqa: E402
from mode_ros.model.config import preset  # noqa: E402

if ta.unavailable_reason() is not None:
    pytest.skip(ta.unavailable_reason(), allow_module_level=True)


def test_sass_load_widths_are_read_from_the_opcode():
    sass = """
        /*0100*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64] ;
        /*0110*/                   LDGDEPBAR ;
        /*0120*/                   LDG.E.U16 R7, desc[UR4][R8.64] ;
        /*0130*/                   LDG.E.64.CONSTANT R10, desc[UR4][R2.64] ;
        /*0140*/                   LDG.E R12, desc[UR4][R2.64] ;
        /*0150*/                   LDG.E.U8 R13, desc[UR4][R2.64] ;
    """
    got = sorted(f"{op}.{ta._load_bytes(m)}B" for op, m in ta._LOAD.findall(sass))
    assert got == ["LDG.1B", "LDG.2B", "LDG.4B", "LDG.8B", "LDGSTS.16B"]


def test_compile_only_restores_the_cpu_state():
    from triton.runtime.jit import JITFunction
    run = JITFunction.run
    x = torch.zeros(3, 64)
    with ta.compile_only(90) as rec:
        assert tk.unavailable_reason("cpu") is None
        parts = tk.linear_partials(x, torch.zeros(32, 64))
        assert len(rec.launches) == 1 and parts.shape[1:] == (3, 32)
        with pytest.raises(RuntimeError, match="already active"):
            with ta.compile_only(90):
                pass
    assert JITFunction.run is run and not tk.COMPILE_ONLY
    assert "CUDA device" in tk.unavailable_reason("cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        tk.linear_partials(x, torch.zeros(32, 64))


@pytest.fixture(scope="module")
def tiny_rows():
    return {q: ta.step_binaries("tiny", "bf16", q, batch=2, candidates=False) for q in ("none", "int8")}


def test_every_kernel_of_a_chunk_compiles_for_sm90_without_spills(tiny_rows):
    layers = preset("tiny").model.n_layers
    for q, rows in tiny_rows.items():
        assert rows and not [r for r in rows if "failed" in r], q
        per_kernel = {}
        for r in rows:
            per_kernel[r["kernel_name"]] = per_kernel.get(r["kernel_name"], 0) + r["launches_per_chunk"]
            assert r["arch"] == "sm_90" and r["spill_bytes"] == 0, r
            assert r["blocks_per_sm"] >= 1 and 0 < r["regs"] <= 255, r
        steps = per_kernel["step_in"]
        assert steps == per_kernel["step_out"] == 10
        # seven kernels per layer and step: 3 split-K GEMMs, attention, 2 add+norm, up-projection
        assert per_kernel == {"step_in": steps, "step_out": steps, "linear_partials": 3 * layers * steps,
                              "qkv_attention": layers * steps, "add_rms": 2 * layers * steps,
                              "swiglu_up": layers * steps}, q
        # the chunk's batch: attention has one program per (batch row, head)
        att = next(r for r in rows if r["kernel_name"] == "qkv_attention")
        assert att["grid"] == (2, preset("tiny").model.n_heads)


def test_weights_stream_through_16_byte_loads(tiny_rows):
    for q, rows in tiny_rows.items():
        for r in rows:
            if r["kernel_name"] in ("linear_partials", "swiglu_up"):
                # bf16 and int8 weights alike go through the pipelined cp.async copies, all 16 bytes
                # wide; the few plain loads are the epilogue's (bias, scales, gates: once per program)
                copies = {k: n for k, n in r["global_loads"].items() if k.startswith("LDGSTS")}
                assert copies and set(copies) == {"LDGSTS.16B"}, (q, r)
                assert "LDG.1B" not in r["global_loads"], (q, r)   # int8 never read byte by byte


def test_tuning_candidates_fit_an_h100():
    # the largest up-projection candidate in bf16 at the paper's width must fit 227 KiB of shared memory
    x = torch.zeros(14, 1024, dtype=torch.bfloat16)
    w = torch.zeros(2 * 2 * 4096, 1024, dtype=torch.bfloat16)
    biggest = max(tk.TUNE_CANDIDATES["up"], key=lambda c: c["bn"] * c["bk"])
    with ta.compile_only(90) as rec:
        tk.swiglu_up(x, w, None, torch.zeros(w.shape[0], dtype=torch.bfloat16),
                     torch.ones(2, dtype=torch.bfloat16), dict(biggest))
        a = ta.analyse(rec.launches[-1]["kernel"], 90)
    assert a["shared_bytes"] <= ta.SM_LIMITS[90][1] and a["blocks_per_sm"] >= 1, a


def test_pdl_kernels_wait_on_the_device_and_prefetch_their_weights(tiny_rows):
    """With programmatic dependent launch every kernel of the chain is launched with the attribute and
    starts with griddepcontrol.wait (so it may be scheduled early and still reads only finished
    results); the GEMMs first ask for their weight strip in L2. Same launches, no spills."""
    rows = ta.step_binaries("tiny", "bf16", "int8", batch=2, candidates=False, pdl=True)
    assert rows and not [r for r in rows if "failed" in r]
    plain = {r["kernel_name"]: r for r in tiny_rows["int8"]}
    for r in rows:
        assert r["pdl"] and r["launch_pdl"] and r["pdl_wait"] == 1 and r["spill_bytes"] == 0, r
        want_prefetch = r["kernel_name"] in ("linear_partials", "swiglu_up")
        assert (r["l2_prefetches"] > 0) == want_prefetch, r
    for r in tiny_rows["int8"]:
        assert not r["launch_pdl"] and r["pdl_wait"] == 0 and r["l2_prefetches"] == 0, r
    count = lambda rs: sorted((r["kernel_name"], r["launches_per_chunk"]) for r in rs)  # noqa: E731
    assert count(rows) == count(tiny_rows["int8"]) and set(plain) == {r["kernel_name"] for r in rows}
    assert not tk.pdl_enabled()                     # compile_only restored the launch option


def test_pdl_is_refused_where_it_cannot_run():
    from mode_ros.model.fast import FusedSampler
    from mode_ros.model.policy import MoDEPolicy
    pol = MoDEPolicy(preset("tiny")).eval()
    assert "CUDA" in tk.pdl_unavailable_reason("cpu")
    with pytest.raises(ValueError, match="CUDA device"):
        FusedSampler(pol.sampler, attention="triton", gemm="triton", pdl=True)
    with ta.compile_only(80):                        # an A100 has no grid dependency control
        with pytest.raises(ValueError, match="sm_90"):
            FusedSampler(pol.sampler, attention="triton", gemm="triton", pdl=True)
    with ta.compile_only(90):
        with pytest.raises(ValueError, match="all-Triton step"):
            FusedSampler(pol.sampler, attention="triton", gemm="torch", pdl=True)
        assert FusedSampler(pol.sampler, attention="triton", gemm="triton", pdl=True).pdl
