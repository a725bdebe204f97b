"""Triton kernels for the fused sampler at small batch (few rows, weight-bandwidth bound).

A cached MoDE step at batch 1 multiplies ~14 token rows by ~237 M weights; the time goes to
reading weights and to the number of kernels (each costs 1–2 µs even inside a CUDA graph). These
kernels cut both, per layer and step:

* ``qkv_attention``: the per-head RMSNorm of q and k, the causal softmax attention and the
  (b, t, d) output layout in ONE kernel, reading the QKV GEMM's output or its split-K partials
  (the PyTorch formulation takes 4–6 kernels: norms, transposes, two batched GEMMs, softmax, a copy);
* ``swiglu_up``: the up-projection of the selected experts with the weight widening (int8 / fp8 /
  bf16), row scales, bias, SwiGLU and the gate weights in the epilogue: one kernel, writes only the
  gated hidden state;
* ``linear_partials``: split-K ``x @ w.T`` (optional row scales) writing fp32 partial sums, finished
  by the kernel that consumes them (attention, ``add_rms``) or by a sum that Inductor fuses with the
  residual add. Deterministic (no atomics), so a chunk is reproducible bit for bit;
* ``add_rms``: residual add of a projection's partials + RMSNorm (+ the noise token) in one kernel;
* ``layer_chain``: all layers of a step as seven of these kernels per layer, nothing in between.

Optionally (``set_pdl``, sm_90+) every kernel is launched with programmatic dependent launch: it waits
for its predecessor on the device (``griddepcontrol.wait``) instead of behind its launch, and the GEMMs
first prefetch their weights into L2, so launch gaps overlap useful weight traffic.

Every kernel accumulates in fp32 and takes fp32, bf16 or fp16 activations; fp32 products use IEEE
precision (no TF32). They run on CUDA and, for tests, on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported). Block sizes are shape heuristics for an
H100-class GPU, not autotuned; ``scripts/gpu_measure.py`` times each kernel against PyTorch over a
sweep of launch configurations (``bench.kernel_variants``) and whole chunks with them
(``bench.step_variants``) before any of this becomes a default.
"""
from __future__ import annotations

import math
import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; without it the "triton" options report why
    import triton
    import triton.language as tl
    IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure means "not available", with the reason
    triton = tl = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"   # read once: Triton reads it at import too
# set by ``triton_aot.compile_only``: CPU tensors stand for a GPU's (launches compile, nothing runs);
# {"sms": the target's SM count} while active
COMPILE_ONLY: dict = {}


def interpreted() -> bool:
    return _INTERPRET


def _runs_here(dev: torch.device) -> bool:
    return dev.type == "cuda" or (dev.type == "cpu" and (_INTERPRET or bool(COMPILE_ONLY)))


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why these kernels cannot run on ``device`` (None: they can)."""
    if triton is None:
        return f"triton is not importable ({IMPORT_ERROR})"
    dev = torch.device(device)
    if _runs_here(dev):
        return None
    return (f"the triton kernels need a CUDA device (got {dev.type}; on the CPU only under Triton's "
            "interpreter, TRITON_INTERPRET=1)")


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(1, n)))))


def _f32dot(x: torch.Tensor) -> bool:
    """Products in fp32 (IEEE, no TF32) for fp32 activations; bf16/fp16 use the tensor cores with
    fp32 accumulation. Under the interpreter the operands are always widened first: its bf16 dot is
    wrong, and bf16·bf16 products are exact in fp32, so the result is the same function."""
    return x.dtype == torch.float32 or (interpreted() and not COMPILE_ONLY)


if triton is not None:
    try:   # grid dependency control (programmatic dependent launch, sm_90+): Triton >= 3.2
        from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch, gdc_wait as _gdc_wait
    except ImportError:  # pragma: no cover - older Triton: PDL unavailable
        _gdc_launch = _gdc_wait = None

    @triton.jit
    def _pdl_enter(PDL: tl.constexpr):
        """With programmatic dependent launch this kernel may start while the previous one in the stream
        still runs: wait here until it has finished (its writes visible), then let the next kernel
        launch, so one kernel's launch and set-up overlap the previous one's work. Every read of an
        activation and every write comes after this point; only index arithmetic precedes it."""
        if PDL:
            _gdc_wait()
            _gdc_launch()

    @triton.jit
    def _prefetch_l2(ptrs):
        """Ask for the 128-byte lines at ``ptrs`` to be brought into L2 (no registers written, no fault)."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _prefetch_rows(w, rows, k_lo, k_hi, K):
        """Prefetch into L2 the weights ``w[rows, k_lo:k_hi]`` (rows of length K), one 128-byte line per step."""
        LINE: tl.constexpr = 1024 // w.dtype.element_ty.primitive_bitwidth   # elements per 128 bytes
        for k0 in range(k_lo, k_hi, LINE):
            _prefetch_l2(w + rows.to(tl.int64) * K + k0)

    @triton.jit
    def _prefetch_expert_cols(w, rows, k_lo, k_hi, EXPERT_K, EXPERT_E):
        """``_prefetch_rows`` for experts' (N, EXPERT_K) weights EXPERT_E elements apart read as one
        (N, k·EXPERT_K) matrix: its columns k_lo:k_hi of ``rows``."""
        LINE: tl.constexpr = 1024 // w.dtype.element_ty.primitive_bitwidth
        for k0 in range(k_lo, k_hi, LINE):
            ex = k0 // EXPERT_K
            _prefetch_l2(w + ex.to(tl.int64) * EXPERT_E + rows.to(tl.int64) * EXPERT_K + (k0 - ex * EXPERT_K))

    @triton.jit
    def _tile(pid_m, pid_n, M, N, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Row and column indices of a BM x BN output tile, the BK strip offsets, and the bound masks."""
        m = pid_m * BM + tl.arange(0, BM)
        n = pid_n * BN + tl.arange(0, BN)
        return m, n, tl.arange(0, BK), m < M, n < N

    @triton.jit
    def _dot_nt(a, b, F32DOT: tl.constexpr):
        """a @ b.T with fp32 accumulation: both widened to fp32 with IEEE products (F32DOT), else
        b (int8 / fp8 / bf16) widened in registers to a's dtype for the tensor cores."""
        if F32DOT:
            r = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            r = tl.dot(a, tl.trans(b.to(a.dtype)))
        return r

    @triton.jit
    def _qkv_attention_kernel(qkv, bias, qg, kg, out, S, B, T, D, HD, eps, scale,
                              BT: tl.constexpr, BD: tl.constexpr, F32DOT: tl.constexpr,
                              PARTIALS: tl.constexpr, PDL: tl.constexpr):
        _pdl_enter(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        t = tl.arange(0, BT)
        d = tl.arange(0, BD)
        tm = t < T
        dm = d < HD
        m2 = tm[:, None] & dm[None, :]
        row = qkv + b * T * 3 * D + t[:, None] * (3 * D) + h * HD + d[None, :]
        if PARTIALS:
            # qkv holds S fp32 split-K partial sums of the projection: finish it here (sum + bias,
            # rounded to the model dtype as the projection's output would be)
            q = tl.zeros((BT, BD), dtype=tl.float32)
            k = tl.zeros((BT, BD), dtype=tl.float32)
            v32 = tl.zeros((BT, BD), dtype=tl.float32)
            for s in range(S):
                r = row + s * B * T * 3 * D
                q += tl.load(r, mask=m2, other=0.0)
                k += tl.load(r + D, mask=m2, other=0.0)
                v32 += tl.load(r + 2 * D, mask=m2, other=0.0)
            bq = bias + h * HD + d
            q = (q + tl.load(bq, mask=dm, other=0.0).to(tl.float32)[None, :]).to(out.dtype.element_ty).to(tl.float32)
            k = (k + tl.load(bq + D, mask=dm, other=0.0).to(tl.float32)[None, :]).to(out.dtype.element_ty).to(tl.float32)
            v = (v32 + tl.load(bq + 2 * D, mask=dm, other=0.0).to(tl.float32)[None, :]).to(out.dtype.element_ty)
        else:
            v = tl.load(row + 2 * D, mask=m2, other=0.0)
            q = tl.load(row, mask=m2, other=0.0).to(tl.float32)
            k = tl.load(row + D, mask=m2, other=0.0).to(tl.float32)
        gq = tl.load(qg + d, mask=dm, other=0.0).to(tl.float32)
        gk = tl.load(kg + d, mask=dm, other=0.0).to(tl.float32)
        # RMSNorm per head (rms clamped at eps, as the model's), rounded to the model dtype like the
        # PyTorch formulation, then the products in fp32
        rq = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1) / HD), eps)
        rk = tl.maximum(tl.sqrt(tl.sum(k * k, axis=1) / HD), eps)
        q = (gq[None, :] * (q / rq[:, None])).to(v.dtype)
        k = (gk[None, :] * (k / rk[:, None])).to(v.dtype)
        s = _dot_nt(q, k, F32DOT) * scale
        causal = (t[None, :] <= t[:, None]) & tm[None, :]
        s = tl.where(causal, s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        if F32DOT:
            o = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            o = tl.dot(p.to(v.dtype), v)
        dst = out + b * T * D + t[:, None] * D + h * HD + d[None, :]
        tl.store(dst, o.to(out.dtype.element_ty), mask=m2)

    @triton.jit
    def _swiglu_up_kernel(x, w, scale, bias, gates, out, M, K, H, NE, ROWS_E,
                          HAS_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          F32DOT: tl.constexpr, PDL: tl.constexpr):
        e = tl.program_id(1)
        pid_m = tl.program_id(2)
        m, n, kk, mm, nm = _tile(pid_m, tl.program_id(0), M, H, BM, BN, BK)
        rv = e * ROWS_E + n         # expert e's rows: [v (H rows), g (H rows)], ROWS_E rows after e - 1's
        rg = rv + H
        if PDL:
            # the weights do not depend on the previous kernel: start streaming them into L2 while it
            # finishes (one row block per program; the first row-block program of each M block only)
            if pid_m == 0:
                nc = tl.minimum(n, H - 1)
                _prefetch_rows(w, e * ROWS_E + nc, 0, K, K)
                _prefetch_rows(w, e * ROWS_E + H + nc, 0, K, K)
        _pdl_enter(PDL)
        acc_v = tl.zeros((BM, BN), dtype=tl.float32)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            km = (k0 + kk) < K
            a = tl.load(x + m[:, None] * K + k0 + kk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            wm = nm[:, None] & km[None, :]
            wv = tl.load(w + rv[:, None] * K + k0 + kk[None, :], mask=wm, other=0.0)
            wg = tl.load(w + rg[:, None] * K + k0 + kk[None, :], mask=wm, other=0.0)
            acc_v += _dot_nt(a, wv, F32DOT)
            acc_g += _dot_nt(a, wg, F32DOT)
        if HAS_SCALE:
            acc_v = acc_v * tl.load(scale + rv, mask=nm, other=0.0).to(tl.float32)[None, :]
            acc_g = acc_g * tl.load(scale + rg, mask=nm, other=0.0).to(tl.float32)[None, :]
        acc_v += tl.load(bias + rv, mask=nm, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(bias + rg, mask=nm, other=0.0).to(tl.float32)[None, :]
        gate = tl.load(gates + e).to(tl.float32)
        hid = acc_v * (acc_g * tl.sigmoid(acc_g)) * gate
        dst = out + m[:, None] * (NE * H) + e * H + n[None, :]
        tl.store(dst, hid.to(out.dtype.element_ty), mask=mm[:, None] & nm[None, :])

    @triton.jit
    def _linear_partials_kernel(x, w, scale, out, M, N, K, K_SPLIT, EXPERT_K, EXPERT_E,
                                HAS_SCALE: tl.constexpr, EXPERTS: tl.constexpr, BM: tl.constexpr,
                                BN: tl.constexpr, BK: tl.constexpr, F32DOT: tl.constexpr, PDL: tl.constexpr):
        # EXPERTS: w is k experts' (N, EXPERT_K) down weights, EXPERT_E elements apart, read as one
        # (N, k·EXPERT_K) matrix (column c: expert c // EXPERT_K, its column c % EXPERT_K); else (N, K)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        m, n, kk, mm, nm = _tile(pid_m, tl.program_id(0), M, N, BM, BN, BK)
        k_lo = pid_s * K_SPLIT
        if PDL:
            if pid_m == 0:   # this program's weight strip into L2 while the previous kernel finishes
                if EXPERTS:
                    _prefetch_expert_cols(w, tl.minimum(n, N - 1), k_lo, tl.minimum(k_lo + K_SPLIT, K), EXPERT_K,
                                          EXPERT_E)
                else:
                    _prefetch_rows(w, tl.minimum(n, N - 1), k_lo, tl.minimum(k_lo + K_SPLIT, K), K)
        _pdl_enter(PDL)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_lo + K_SPLIT, BK):
            km = ((k0 + kk) < K) & ((k0 + kk) < k_lo + K_SPLIT)
            a = tl.load(x + m[:, None] * K + k0 + kk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            if EXPERTS:
                ex = (k0 + kk) // EXPERT_K
                cols = ex * EXPERT_E + (k0 + kk - ex * EXPERT_K)
                b = tl.load(w + n[:, None] * EXPERT_K + cols[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            else:
                b = tl.load(w + n[:, None] * K + k0 + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc += _dot_nt(a, b, F32DOT)
        if HAS_SCALE:
            acc = acc * tl.load(scale + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        dst = out + pid_s * M * N + m[:, None] * N + n[None, :]
        tl.store(dst, acc, mask=mm[:, None] & nm[None, :])

    @triton.jit
    def _add_rms_kernel(base, parts, g, c, h_out, y_out, S, M, D, eps,
                        BD: tl.constexpr, HAS_C: tl.constexpr, WRITE_H: tl.constexpr, PDL: tl.constexpr):
        _pdl_enter(PDL)
        r = tl.program_id(0)
        d = tl.arange(0, BD)
        dm = d < D
        x = tl.load(base + r * D + d, mask=dm, other=0.0)
        acc = tl.zeros((BD,), dtype=tl.float32)
        for s in range(S):
            acc += tl.load(parts + s * M * D + r * D + d, mask=dm, other=0.0)
        # as the PyTorch formulation rounds: the projection's output, then the residual sum, in x's dtype
        h = (x.to(tl.float32) + acc.to(x.dtype).to(tl.float32)).to(x.dtype)
        if WRITE_H:
            tl.store(h_out + r * D + d, h, mask=dm)
        hf = h.to(tl.float32)
        rms = tl.maximum(tl.sqrt(tl.sum(hf * hf, axis=0) / D), eps)
        y = (tl.load(g + d, mask=dm, other=0.0).to(tl.float32) * (hf / rms)).to(x.dtype)
        if HAS_C:
            y = (y.to(tl.float32) + tl.load(c + d, mask=dm, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(y_out + r * D + d, y, mask=dm)


    @triton.jit
    def _step_in_kernel(x, c_in, c, ctx, action_w, pos, g, h_out, u_out, T, P, K, A, D, eps,
                        BD: tl.constexpr, BA: tl.constexpr, PDL: tl.constexpr):
        _pdl_enter(PDL)
        # one row of a step's token sequence [noise token c, P context tokens, K action tokens]:
        # the row itself (h) and its first RMSNorm + c (u)
        r = tl.program_id(0)
        b = r // T
        j = r % T
        d = tl.arange(0, BD)
        dm = d < D
        ka = tl.arange(0, BA)
        am = ka < A
        dt = h_out.dtype.element_ty
        is_c = j == 0
        is_ctx = (j >= 1) & (j <= P)
        is_act = j > P
        a = j - 1 - P
        cv = tl.load(c + d, mask=dm, other=0.0).to(tl.float32)
        hx = tl.load(ctx + b * P * D + (j - 1) * D + d, mask=dm & is_ctx, other=0.0).to(tl.float32)
        # action token: (x · c_in) rounded to the model dtype, times the embedding (K = A, tiny), + pos
        xv = tl.load(x + b * K * A + a * A + ka, mask=am & is_act, other=0.0).to(tl.float32)
        ain = (xv * tl.load(c_in).to(tl.float32)).to(dt).to(tl.float32)
        w = tl.load(action_w + d[:, None] * A + ka[None, :], mask=dm[:, None] & am[None, :] & is_act,
                    other=0.0).to(tl.float32)
        emb = tl.sum(w * ain[None, :], axis=1).to(dt).to(tl.float32)
        ha = (emb + tl.load(pos + a * D + d, mask=dm & is_act, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        h = tl.where(is_c, cv, tl.where(is_ctx, hx, ha))
        tl.store(h_out + r * D + d, h.to(dt), mask=dm)
        rms = tl.maximum(tl.sqrt(tl.sum(h * h, axis=0) / D), eps)
        u = (tl.load(g + d, mask=dm, other=0.0).to(tl.float32) * (h / rms)).to(dt)
        u = (u.to(tl.float32) + cv).to(dt)
        tl.store(u_out + r * D + d, u, mask=dm)

    @triton.jit
    def _step_out_kernel(y, out_w, out_b, x, c_skip, c_out, ratio, x_out, T, K, A, D,
                         BR: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
        _pdl_enter(PDL)
        # the action head on the last K rows of one batch row, the EDM output scaling and the DDIM update
        b = tl.program_id(0)
        rows = tl.arange(0, BR)
        rm = rows < K
        ka = tl.arange(0, BA)
        am = ka < A
        acc = tl.zeros((BR, BA), dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            dm = dd < D
            yv = tl.load(y + b * T * D + (T - K + rows)[:, None] * D + dd[None, :], mask=rm[:, None] & dm[None, :],
                         other=0.0).to(tl.float32)
            wv = tl.load(out_w + ka[:, None] * D + dd[None, :], mask=am[:, None] & dm[None, :], other=0.0).to(tl.float32)
            acc += _dot_nt(yv, wv, True)
        f = acc + tl.load(out_b + ka, mask=am, other=0.0).to(tl.float32)[None, :]
        f = f.to(y.dtype.element_ty).to(tl.float32)     # the head's output in the model dtype, then fp32
        m2 = rm[:, None] & am[None, :]
        xv = tl.load(x + b * K * A + rows[:, None] * A + ka[None, :], mask=m2, other=0.0)
        den = tl.load(c_skip).to(tl.float32) * xv + tl.load(c_out).to(tl.float32) * f
        xn = den + tl.load(ratio).to(tl.float32) * (xv - den)
        tl.store(x_out + b * K * A + rows[:, None] * A + ka[None, :], xn, mask=m2)


# --- programmatic dependent launch ----------------------------------------------------------------
# A chunk is ~580 launches of small kernels; between two of them the GPU idles for the launch and the
# ramp-up of the next grid. With PDL (sm_90+) every kernel of this module is launched with CUDA's
# programmatic-stream-serialization attribute and begins with ``_pdl_enter``: it is scheduled while the
# previous kernel still runs and waits on the device (griddepcontrol.wait) instead of behind a launch.
# Captured into a CUDA graph the dependencies become programmatic edges. Off by default; the interpreter
# never uses it (it cannot run the inline PTX).
_PDL = {"on": False}


def pdl_unavailable_reason(device: torch.device | str) -> str | None:
    """Why programmatic dependent launch cannot be used on ``device`` (None: it can)."""
    reason = unavailable_reason(device)
    if reason is not None:
        return reason
    if _gdc_wait is None:
        return f"this Triton ({triton.__version__}) has no grid dependency control"
    dev = torch.device(device)
    if dev.type == "cuda":
        major, _ = torch.cuda.get_device_capability(dev)
        if major < 9:
            return f"programmatic dependent launch needs sm_90 or newer (this GPU is sm_{major}x)"
        return None
    if COMPILE_ONLY:
        return None if COMPILE_ONLY.get("arch", 0) >= 90 else "programmatic dependent launch needs sm_90+"
    return "programmatic dependent launch runs on CUDA only (not under the interpreter)"


def set_pdl(enabled: bool) -> None:
    """Launch every kernel of this module with programmatic dependent launch (see above), or not."""
    _PDL["on"] = bool(enabled)


def pdl_enabled() -> bool:
    return _PDL["on"] and not _INTERPRET


def _pdl_args() -> dict:
    return {"PDL": True, "launch_pdl": True} if pdl_enabled() else {"PDL": False}


def _check(x: torch.Tensor, name: str) -> None:
    if triton is None or not _runs_here(x.device):
        raise RuntimeError(f"{name}: {unavailable_reason(x.device)}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: the activations must be contiguous")


def qkv_attention(qkv: torch.Tensor, qg: torch.Tensor, kg: torch.Tensor, n_heads: int, eps: float,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal attention of the (b, t, 3d) output of a QKV projection with per-head RMSNorm of q and k
    (gains ``qg``/``kg`` of length d / n_heads); returns (b, t, d), heads side by side, ready for the
    output projection. One program per (batch row, head).

    ``qkv`` may instead be the fp32 split-K partials (S, b, t, 3d) of ``linear_partials``: the kernel
    then finishes the projection itself (sum, ``bias``, rounding to ``out_dtype``), one kernel less."""
    _check(qkv, "qkv_attention")
    partials = qkv.dim() == 4
    if partials and (out_dtype is None or qkv.dtype != torch.float32):
        raise ValueError("qkv_attention: fp32 partials (S, b, t, 3d) need out_dtype")
    if not partials and bias is not None:
        raise ValueError("qkv_attention: bias goes with partials (the projection's output has it)")
    s, b, t, d3 = qkv.shape if partials else (1, *qkv.shape)
    d = d3 // 3
    hd = d // n_heads
    dt = out_dtype if partials else qkv.dtype
    out = torch.empty(b, t, d, dtype=dt, device=qkv.device)
    _qkv_attention_kernel[(b, n_heads)](qkv, bias if bias is not None else qg, qg, kg, out, s, b, t, d, hd, eps,
                                        hd ** -0.5, BT=_pow2(t), BD=_pow2(hd), F32DOT=_f32dot(out),
                                        PARTIALS=partials, **_pdl_args())
    return out


def add_rms(base: torch.Tensor, partials: torch.Tensor | None, g: torch.Tensor, eps: float,
            c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm between two GEMMs, in one kernel (one program per row):
    ``h = base + partials.sum(0)`` (fp32 split-K partials of a projection, rounded to base's dtype as
    its output would be; None: ``h = base``) and ``y = g · h / rms(h)`` (+ ``c``, a vector of width d
    shared by every row: the noise token added before the attention). Returns (h, y)."""
    _check(base, "add_rms")
    d = base.shape[-1]
    m = base.numel() // d
    if partials is not None and (partials.dtype != torch.float32 or partials.shape[1:] != base.shape):
        raise ValueError("add_rms: partials must be fp32 (S, *base.shape)")
    if c is not None and c.numel() != d:
        raise ValueError(f"add_rms: c must hold one vector of width {d} (shared by all rows)")
    y = torch.empty_like(base)
    h = torch.empty_like(base) if partials is not None else base
    _add_rms_kernel[(m,)](base, partials if partials is not None else base, g, c if c is not None else g, h, y,
                          0 if partials is None else partials.shape[0], m, d, eps, BD=_pow2(d),
                          HAS_C=c is not None, WRITE_H=partials is not None, **_pdl_args())
    return h, y


def step_in(x: torch.Tensor, c_in: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor, action_w: torch.Tensor,
            pos: torch.Tensor, g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's token sequence in one kernel: [noise token ``c``, the context tokens ``ctx`` (b, P, d),
    the action tokens ``(x · c_in) @ action_w.T + pos`` for the noisy actions x (b, K, A)], and its first
    RMSNorm (gain ``g``) + c. Returns (h, u), both (b, 1 + P + K, d) in ctx's dtype."""
    _check(ctx, "step_in")
    b, p, d = ctx.shape
    k, a = x.shape[1], x.shape[2]
    if c.numel() != d or action_w.shape != (d, a) or pos.shape[-2:] != (k, d):
        raise ValueError("step_in: c (d), action_w (d, A) and pos (…, K, d) must match ctx and x")
    t = 1 + p + k
    h = torch.empty(b, t, d, dtype=ctx.dtype, device=ctx.device)
    u = torch.empty_like(h)
    _step_in_kernel[(b * t,)](x.contiguous(), c_in, c, ctx, action_w, pos, g, h, u, t, p, k, a, d, eps,
                              BD=_pow2(d), BA=_pow2(a, 2), **_pdl_args())
    return h, u


def step_out(y: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor, x: torch.Tensor, c_skip: torch.Tensor,
             c_out: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The end of a step in one kernel: the action head on the last K rows of ``y`` (b, T, d, already
    normed), ``D = c_skip · x + c_out · head`` and the DDIM update ``D + ratio · (x − D)``; fp32 (b, K, A)."""
    _check(y, "step_out")
    b, t, d = y.shape
    k, a = x.shape[1], x.shape[2]
    xn = torch.empty(b, k, a, dtype=torch.float32, device=y.device)
    _step_out_kernel[(b,)](y, out_w, out_b, x.float().contiguous(), c_skip, c_out, ratio, xn, t, k, a, d,
                           BR=_pow2(k), BA=_pow2(a), BD=128 if d >= 128 else _pow2(d), **_pdl_args())
    return xn


def layer_chain(h: torch.Tensor, c: torch.Tensor, layers, lnf_g: torch.Tensor, n_heads: int, eps: float,
                reference_residual: bool, u: torch.Tensor | None = None) -> torch.Tensor:
    """All transformer layers of one denoising step as a chain of these kernels only, seven per layer
    (norm · QKV partials · attention · proj partials · add+norm · up+SwiGLU · down partials), no
    PyTorch op in between, so it needs no torch.compile to be lean. ``layers``: per layer (ln1_g, wqkv,
    bqkv, qg, kg, wproj, ln2_g, w1f, b1f, w2f, gates, w1s, w2s) as in ``fast.fused_step``; ``c`` the noise
    token (width d); ``u``: the first norm of h when already computed (``step_in``). Returns the final
    RMSNorm (``lnf_g``) of every row of the last layer's output."""
    if u is None:
        _, u = add_rms(h, None, layers[0][0], eps, c)
    y = None
    for i, L in enumerate(layers):
        _, wqkv, bqkv, qg, kg, wproj, ln2_g, w1f, b1f, w2f, gates, w1s, w2s = L
        a = qkv_attention(linear_partials(u, wqkv), qg, kg, n_heads, eps, bias=bqkv, out_dtype=h.dtype)
        h, y = add_rms(h, linear_partials(a, wproj), ln2_g, eps)
        down = linear_partials(swiglu_up(y, w1f, w1s, b1f, gates), w2f, w2s)
        last = i == len(layers) - 1
        h, u = add_rms(y if reference_residual else h, down, lnf_g if last else layers[i + 1][0], eps,
                       None if last else c)
    return u


_SMS: dict[int, int] = {}


def prepare(device: torch.device | str) -> None:
    """Read the device's SM count once, outside any graph capture or torch.compile trace (the block
    heuristics use it). Raises RuntimeError with the reason when the kernels cannot run there."""
    dev = torch.device(device)
    reason = unavailable_reason(dev)
    if reason is not None:
        raise RuntimeError(reason)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count


BLOCK_KEYS = ("bm", "bn", "bk", "split", "num_warps", "num_stages")


def _blocks(m: int, n_out: int, k: int, device: torch.device, blocks: dict | None = None) -> dict:
    """Launch configuration of a small-M weight-streaming GEMM: BM x BN output tiles over BK-wide
    strips of weight rows, and a K split giving enough programs to cover every SM about twice.
    ``blocks`` overrides any of ``BLOCK_KEYS`` (what ``bench.kernel_variants`` sweeps)."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 32 if n_out <= 4096 else 64
    bk = 128 if k >= 128 else _pow2(k)
    cfg = {"bm": bm, "bn": bn, "bk": bk, "split": None, "num_warps": 4, "num_stages": 3}
    if blocks:
        unknown = set(blocks) - set(BLOCK_KEYS)
        if unknown:
            raise ValueError(f"blocks: unknown keys {sorted(unknown)} (known: {BLOCK_KEYS})")
        cfg.update({key: v for key, v in blocks.items() if v is not None})
    if cfg["split"] is None:
        sms = (_SMS.get(device.index or 0, 132) if device.type == "cuda"
               else COMPILE_ONLY.get("sms", 8))
        tiles = math.ceil(n_out / cfg["bn"]) * math.ceil(m / cfg["bm"])
        cfg["split"] = max(1, min(math.ceil(2 * sms / tiles), math.ceil(k / cfg["bk"]), 16))
    return cfg


# --- launch-configuration tuning ------------------------------------------------------------------
# The block heuristic above is a guess for an H100; with tuning on, the first eager call of a GEMM
# for a new (kernel, rows, shape, dtypes) times these candidates (and the heuristic) on the real
# device and keeps the fastest for every later call, including inside the CUDA graph (tuning never
# runs while a graph is captured or torch.compile traces: those use what was tuned, or the heuristic).
TUNE_CANDIDATES = {
    # (bn 128, bk 256) is left out: its pipeline needs 273 KiB of shared memory in bf16 at batch 1, over
    # an H100's 227 KiB per block (every candidate compiled for sm_90: ``mode-ros bench --aot``). Those
    # that fit at batch 1 but not at larger batches (BM 64: up 64×256, 128×128) fail to launch there
    # and are skipped by ``_choose`` (a few seconds of compiling, once: Triton caches binaries on disk).
    "up": [{"bn": bn, "bk": bk} for bn in (32, 64, 128) for bk in (64, 128, 256) if bn * bk < 128 * 256],
    "splitk": [{"bn": bn, "bk": bk, "split": sp} for bn in (32, 64) for bk in (128, 256) for sp in (None, 4, 8)],
}
_TUNED: dict[tuple, dict] = {}
_TUNING = {"enabled": False, "runs": 20}


def set_tuning(enabled: bool, runs: int | None = None) -> None:
    """Switch launch-configuration tuning on or off (``FusedSampler`` turns it on for its Triton GEMMs
    on CUDA); ``runs``: timed launches per candidate (None: keep)."""
    _TUNING["enabled"] = bool(enabled)
    if runs is not None:
        _TUNING["runs"] = max(1, int(runs))


def tuned() -> dict[tuple, dict]:
    """The configurations chosen so far: {(kernel, rows, n, k, weight dtype, activation dtype): blocks}."""
    return dict(_TUNED)


def _may_tune(x: torch.Tensor) -> bool:
    if not _TUNING["enabled"] or torch.compiler.is_compiling() or COMPILE_ONLY:
        return False
    if x.device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return _INTERPRET


def _time_launch(fn, device: torch.device, runs: int) -> float:
    fn()                                   # compiles this configuration
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(runs):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / runs
    import time
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t0) / runs


def _choose(kind: str, key: tuple, launch, device: torch.device) -> dict | None:
    """The tuned blocks for ``key`` (tuning now if allowed), else None (heuristic)."""
    if key in _TUNED:
        return _TUNED[key]
    best, best_t = None, float("inf")
    for cand in [None, *TUNE_CANDIDATES[kind]]:
        try:
            t = _time_launch(lambda: launch(cand), device, _TUNING["runs"])
        except Exception:  # noqa: BLE001 - a configuration the device cannot run is simply not chosen
            continue
        if t < best_t:
            best, best_t = cand, t
    _TUNED[key] = best or {}
    return _TUNED[key]


def swiglu_up(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor,
              gates: torch.Tensor, blocks: dict | None = None) -> torch.Tensor:
    """``gate_e · v_e · silu(g_e)`` for the selected experts, from x (…, K) and their up weights ``w``:
    (n_e, 2H, K) views of the layer's stacked experts (no copy; experts any fixed number of rows apart)
    or one (n_e · 2H, K) block; per expert e the rows [v (H), g (H)], stored in the activation dtype or
    as int8 / fp8 with one ``scale`` per row; ``bias`` and ``scale`` laid out like w's rows ((n_e, 2H)
    or (n_e · 2H,)), ``gates`` (n_e,). Returns (…, n_e · H) in x's dtype. Equals ``fast.fused_layer``'s
    qlinear + SwiGLU + gates, with one rounding at the end."""
    _check(x, "swiglu_up")
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    ne = gates.shape[0]
    h = w.shape[:-1].numel() // (2 * ne)
    rows_e = _expert_rows(w, (bias, scale), 2 * h, k)
    out = torch.empty(m, ne * h, dtype=x.dtype, device=x.device)
    if blocks is None:
        key = ("up", m, ne * h, k, w.dtype, x.dtype, scale is not None)
        if key in _TUNED:
            blocks = _TUNED[key]
        elif _may_tune(x):
            blocks = _choose("up", key, lambda bl: swiglu_up(x, w, scale, bias, gates, bl or {}), x.device)
    cfg = _blocks(m, h, k, x.device, blocks)
    grid = (triton.cdiv(h, cfg["bn"]), ne, triton.cdiv(m, cfg["bm"]))
    _swiglu_up_kernel[grid](x2, w, scale if scale is not None else bias, bias, gates, out, m, k, h, ne, rows_e,
                            HAS_SCALE=scale is not None, BM=cfg["bm"], BN=cfg["bn"], BK=cfg["bk"],
                            F32DOT=_f32dot(x), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                            **_pdl_args())
    return out.view(*lead, ne * h)


def _expert_rows(w: torch.Tensor, rows_like: tuple, two_h: int, k: int) -> int:
    """Rows from one expert's up weights to the next in ``w`` ((n_e, 2H, K) view or (n_e · 2H, K)
    block), checking that the per-row tensors ``rows_like`` (bias, scale) step the same way."""
    if w.dim() == 2:
        if not w.is_contiguous():
            raise ValueError(f"swiglu_up: expert block {tuple(w.shape)} is not contiguous")
        rows_e = two_h
    elif w.dim() == 3 and w.stride()[1:] == (k, 1) and w.stride(0) % k == 0:
        rows_e = w.stride(0) // k
    else:
        raise ValueError(f"swiglu_up: expert weights {tuple(w.shape)} (strides {w.stride()}) are not row-major "
                         "experts a whole number of rows apart")
    rows = tuple(w.shape[:-1])   # (n_e, 2H) or (n_e · 2H,)
    for t in rows_like:
        if t is not None and (tuple(t.shape) != rows or t.stride(-1) != 1 or (t.dim() == 2 and t.stride(0) != rows_e)):
            raise ValueError(f"swiglu_up: bias/scale {tuple(t.shape)} (strides {t.stride()}) do not follow the "
                             f"weights' rows ({rows_e} rows per expert)")
    return rows_e


def linear_partials(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
                    blocks: dict | None = None) -> torch.Tensor:
    """Split-K partial sums of ``x @ w.T`` (times the row ``scale`` of a quantised ``w``): fp32
    (split, …, N). ``.sum(0)`` gives the product; under torch.compile that sum fuses into the
    consumer (residual add, bias, cast). ``w`` (N, K), or the selected experts' down weights as (n_e,
    N, H) views of the layer's stacked experts, read as their (N, n_e · H) concatenation without a
    copy (``scale`` then (N,) or its (n_e, N) expansion: one row scale shared by the experts)."""
    _check(x, "linear_partials")
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    experts = w.dim() == 3
    if experts:
        if w.stride()[1:] != (w.shape[2], 1) or w.shape[0] * w.shape[2] != k:
            raise ValueError(f"linear_partials: expert weights {tuple(w.shape)} (strides {w.stride()}) do not "
                             f"make a ({w.shape[1]}, {k}) matrix of row-major experts")
        if scale is not None and scale.dim() == 2:
            if scale.stride(0) != 0 and not bool((scale == scale[:1]).all()):
                raise ValueError("linear_partials: the experts' row scales differ (one shared scale per row)")
            scale = scale[0]
    m, n = x2.shape[0], w.shape[-2]
    if blocks is None:
        key = ("splitk", m, n, k, w.dtype, x.dtype, scale is not None)
        if key in _TUNED:
            blocks = _TUNED[key]
        elif _may_tune(x):
            blocks = _choose("splitk", key, lambda bl: linear_partials(x, w, scale, bl or {}), x.device)
    cfg = _blocks(m, n, k, x.device, blocks)
    bk = cfg["bk"]
    k_split = triton.cdiv(triton.cdiv(k, max(1, int(cfg["split"]))), bk) * bk
    split = triton.cdiv(k, k_split)
    out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg["bn"]), split, triton.cdiv(m, cfg["bm"]))
    _linear_partials_kernel[grid](x2, w, scale if scale is not None else w, out, m, n, k, k_split,
                                  w.shape[2] if experts else k, w.stride(0) if experts else 0,
                                  HAS_SCALE=scale is not None, EXPERTS=experts, BM=cfg["bm"], BN=cfg["bn"], BK=bk,
                                  F32DOT=_f32dot(x), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                  **_pdl_args())
    return out.view(split, *lead, n)


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, blocks: dict | None = None) -> torch.Tensor:
    """``F.linear`` (with row scales for quantised weights) through ``linear_partials``; x's dtype."""
    y = linear_partials(x, w, scale, blocks=blocks).sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
