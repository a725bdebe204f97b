"""Compile the fused sampler's Triton kernels for a GPU without one (ahead of time), and read the binaries.

``compile_only(arch)`` makes every launch of a Triton kernel compile it for CUDA ``sm_<arch>`` with
Triton's own compiler (its wheel carries ``ptxas``) and record the binary instead of running it; CPU
tensors stand in for the GPU's (same shapes, dtypes and alignment, so the same specialisations), and
the block heuristics assume the target's SM count. Nothing is executed and nothing is written to the
outputs, so the numbers the sampler computes are meaningless inside it; what it gives is:

* that every kernel a real step launches (and every launch configuration the on-device tuning tries)
  compiles for the target with the installed Triton, before any GPU time is spent;
* per binary, from ``cuobjdump``: registers, spilled bytes (local memory), shared memory, and the
  global-memory loads by width (16-byte vector loads stream weights at full speed; 1-byte loads of
  int8 weights would not), with the occupancy these allow.

``mode-ros bench --aot`` prints it as JSON + a table. Used by the tests on this CPU-only machine and
by ``scripts/gpu_measure.py`` nowhere (there the kernels simply run)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter

import torch

from . import triton_kernels as tk

# CUDA limits per SM on sm_80/86/89/90 (registers, bytes of shared memory a block may use, threads, blocks)
SM_LIMITS = {90: (65536, 227 * 1024, 2048, 32), 89: (65536, 99 * 1024, 1536, 24),
             86: (65536, 99 * 1024, 1536, 16), 80: (65536, 163 * 1024, 2048, 32)}
DEFAULT_SMS = {90: 132, 89: 128, 86: 84, 80: 108}


class _TargetDriver:
    """The part of Triton's driver interface a warm-up launch uses, answering for a GPU target."""

    def __init__(self, arch: int, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, warp_size)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    @staticmethod
    def is_active():
        return True


class Recorder:
    """The launches made under ``compile_only``: one dict per launch, in order."""

    def __init__(self):
        self.launches: list[dict] = []

    def distinct(self) -> list[dict]:
        """One launch per compiled binary (the first), in order of first use."""
        seen, out = set(), []
        for r in self.launches:
            if id(r["kernel"]) not in seen:
                seen.add(id(r["kernel"]))
                out.append(r)
        return out


def unavailable_reason() -> str | None:
    if tk.triton is None:
        return f"triton is not importable ({tk.IMPORT_ERROR})"
    if tk.interpreted():
        return "compiling for a GPU needs a process without TRITON_INTERPRET=1"
    return None


@contextlib.contextmanager
def compile_only(arch: int = 90, sms: int | None = None):
    """Inside: every Triton launch compiles for ``sm_<arch>`` (``sms`` multiprocessors for the block
    heuristics; default that of the arch's data-centre part) and is recorded, not run. Yields a
    ``Recorder``. Not re-entrant, not thread-safe (it swaps Triton's active driver)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    if tk.COMPILE_ONLY:
        raise RuntimeError("compile_only is already active")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    rec = Recorder()
    run = JITFunction.run
    used: list = []

    def compile_launch(fn, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        kernel = run(fn, *args, grid=grid, warmup=True, **kwargs)
        used.append(fn)
        consts = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        rec.launches.append({"kernel_name": fn.fn.__name__.strip("_").removesuffix("_kernel"),
                             "grid": tuple(int(g) for g in grid), "constexprs": consts,
                             "arg_dtypes": [str(a.dtype).replace("torch.", "") for a in args
                                            if isinstance(a, torch.Tensor)],
                             "compile_s": time.perf_counter() - t0, "kernel": kernel})
        return kernel

    saved_active, saved_pdl = driver._active, tk.pdl_enabled()
    driver.set_active(_TargetDriver(arch))
    JITFunction.run = compile_launch
    tk.COMPILE_ONLY.update({"sms": sms or DEFAULT_SMS.get(arch, 132), "arch": arch})
    try:
        yield rec
    finally:
        JITFunction.run = run
        driver._active = saved_active
        tk.COMPILE_ONLY.clear()
        tk.set_pdl(saved_pdl)
        for fn in used:      # their per-device caches were built for the stand-in target
            fn.device_caches.clear()


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv
    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (neither in Triton's wheel nor on PATH)")
    return found


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_LOAD = re.compile(r"\b(LDGSTS|LDG)(?![A-Z])((?:\.[A-Z0-9_]+)*)")   # not LDGDEPBAR


def _load_bytes(mods: str) -> int:
    parts = mods.split(".")
    for p in parts:
        if p in ("128", "64"):
            return int(p) // 8
        if p in ("U8", "S8"):
            return 1
        if p in ("U16", "S16"):
            return 2
    return 4


def analyse(kernel, arch: int = 90) -> dict:
    """Registers, spills, shared memory and global loads by width of one compiled kernel (from its
    cubin via cuobjdump), plus the blocks per SM these allow on ``arch``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], check=True, capture_output=True,
                              text=True).stdout
    m = _USAGE.search(usage)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {usage[:200]!r}")
    regs, stack, static_smem, local = map(int, m.groups())
    md = kernel.metadata
    smem = int(getattr(md, "shared", 0)) + static_smem
    warps = int(md.num_warps)
    loads = Counter()
    for op, mods in _LOAD.findall(sass):
        loads[f"{op}.{_load_bytes(mods)}B"] += 1
    ldg = {w: sum(n for k, n in loads.items() if k.endswith(f".{w}B")) for w in (1, 2, 4, 8, 16)}
    n_loads = sum(ldg.values())
    rmax, smax, tmax, bmax = SM_LIMITS.get(arch, SM_LIMITS[90])
    threads = 32 * warps
    blocks = min(bmax, tmax // threads, rmax // max(1, regs * threads),
                 smax // smem if smem else bmax)
    ptx = kernel.asm.get("ptx", "")
    return {"pdl_wait": ptx.count("griddepcontrol.wait"), "l2_prefetches": ptx.count("prefetch.global.L2"),
            "launch_pdl": bool(getattr(md, "launch_pdl", False)),
            "regs": regs, "spill_bytes": local, "stack_bytes": stack, "shared_bytes": smem,
            "num_warps": warps, "num_stages": int(getattr(md, "num_stages", 0)),
            "global_loads": dict(sorted(loads.items())), "vector16_load_fraction": (ldg[16] / n_loads) if n_loads else None,
            "blocks_per_sm": blocks, "sass_instructions": sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line))}


def _tdt(dtype: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def step_binaries(name: str, dtype: str = "bf16", quant: str = "none", batch: int = 1, arch: int = 90,
                  sms: int | None = None, candidates: bool = True, log=None, pdl: bool = False) -> list[dict]:
    """Compile, for ``sm_<arch>``, every Triton kernel one chunk of ``name``'s all-Triton fused sampler
    launches at ``batch`` (its 10 steps through ``FusedSampler.sample``, random weights), and with
    ``candidates`` every launch configuration the on-device tuning would try for its GEMM shapes.
    One row per distinct binary: kernel, launch (grid, blocks, warps, stages), launches per chunk,
    compile seconds and ``analyse``'s figures; a configuration that does not compile is a row with
    ``failed``. ``pdl``: the kernels as launched with programmatic dependent launch."""
    from .config import preset
    from .fast import FusedSampler
    from .policy import MoDEPolicy

    tdt = _tdt(dtype)
    torch.manual_seed(0)
    pol = MoDEPolicy(preset(name)).eval()
    pol.to_device("cpu", tdt)
    c, net = pol.config, pol.denoiser
    mc = net.cfg
    rows: list[dict] = []
    with compile_only(arch, sms) as rec:
        fused = FusedSampler(pol.sampler, attention="triton", gemm="triton", weight_quant=quant, autotune=False,
                             pdl=pdl)
        fused.build()
        goal = torch.zeros(batch, mc.goal_dim, dtype=tdt)
        obs = (torch.zeros(batch, mc.obs_seq_len * net.n_cameras, mc.obs_dim, dtype=tdt)
               if net.n_cameras else None)
        state = torch.zeros(batch, c.state_dim, dtype=tdt) if c.state_dim else None
        x = torch.zeros(batch, c.chunk_size, c.action_dim)
        with torch.no_grad():
            fused.sample(x, goal, obs, state)
        chunk = list(rec.launches)
        per_binary = Counter(id(r["kernel"]) for r in chunk)
        for r in rec.distinct():
            rows.append({**r, "launches_per_chunk": per_binary[id(r["kernel"])], "role": "chunk"})
        if candidates:
            L = fused.layers[0]
            w1f, b1f, w2f, s1, s2 = next(e for k, e in fused.experts.items() if k[0] == 0)
            m = batch * net.n_tokens
            u = torch.zeros(m, L["wqkv"].shape[1], dtype=tdt)
            hid = torch.zeros(m, w1f.shape[:-1].numel() // 2, dtype=tdt)
            gates = torch.ones(mc.top_k, dtype=tdt)
            tries = [("splitk", lambda bl, w=L["wqkv"]: tk.linear_partials(u, w, None, bl)),
                     ("splitk", lambda bl, w=L["wproj"]: tk.linear_partials(u, w, None, bl)),
                     ("splitk", lambda bl: tk.linear_partials(hid, w2f, s2, bl)),
                     ("up", lambda bl: tk.swiglu_up(u, w1f, s1, b1f, gates, bl))]
            known = {id(r["kernel"]) for r in rows}
            for kind, launch in tries:
                for cand in tk.TUNE_CANDIDATES[kind]:
                    n0 = len(rec.launches)
                    try:
                        launch(dict(cand))
                    except Exception as exc:  # noqa: BLE001 - a failing configuration is a result
                        rows.append({"kernel_name": kind, "constexprs": dict(cand), "role": "tuning candidate",
                                     "failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                        continue
                    for r in rec.launches[n0:]:
                        if id(r["kernel"]) not in known:
                            known.add(id(r["kernel"]))
                            rows.append({**r, "launches_per_chunk": 0, "role": "tuning candidate"})
    out = []
    for r in rows:
        k = r.pop("kernel", None)
        row = {"preset": name, "dtype": dtype, "weight_quant": quant, "batch": batch, "arch": f"sm_{arch}",
               "pdl": pdl, **r}
        if k is not None:
            try:
                row.update(analyse(k, arch))
            except Exception as exc:  # noqa: BLE001
                row["failed"] = f"analyse: {type(exc).__name__}: {exc}"
        if log:
            log(_row_line(row))
        out.append(row)
    return out


def _blocks_text(r: dict) -> str:
    c = r.get("constexprs", {})
    keys = [k for k in ("BM", "BN", "BK", "BT", "BD", "BA", "BR") if k in c]
    s = " ".join(f"{k}={c[k]}" for k in keys)
    return s + (f" w{c['num_warps']}" if "num_warps" in c else "") + (f" s{c['num_stages']}" if "num_stages" in c else "")


def _row_line(r: dict) -> str:
    if "failed" in r:
        return f"{r['kernel_name']:<16} {_blocks_text(r):<34} FAILED {r['failed']}"
    v = r.get("vector16_load_fraction")
    return (f"{r['kernel_name']:<16} {_blocks_text(r):<34} grid={str(r.get('grid', '')):<14} "
            f"n={r.get('launches_per_chunk', 0):<4} regs={r['regs']:<4} spill={r['spill_bytes']:<5} "
            f"smem={r['shared_bytes'] // 1024:>4}K blk/SM={r['blocks_per_sm']:<3} "
            f"16B-loads={'-' if v is None else f'{v:.2f}'}")


def aot_table(rows: list[dict]) -> str:
    head = ("| preset | dtype | experts | batch | pdl | kernel | role | blocks | grid | launches/chunk | regs | spill B | "
            "smem KiB | blocks/SM | global loads by width | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['preset']} | {r['dtype']} | {r['weight_quant']} | {r['batch']} | {r.get('pdl', False)} | "
                         f"{r['kernel_name']} | {r['role']} | {_blocks_text(r)} | FAILED: {r['failed']} | | | | | | | |")
            continue
        loads = " ".join(f"{k}×{n}" for k, n in r["global_loads"].items())
        lines.append(f"| {r['preset']} | {r['dtype']} | {r['weight_quant']} | {r['batch']} | {r.get('pdl', False)} | "
                     f"{r['kernel_name']} | {r['role']} | {_blocks_text(r)} | {r['grid']} | {r['launches_per_chunk']} | {r['regs']} | "
                     f"{r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['blocks_per_sm']} | {loads} | "
                     f"{r['compile_s']:.2f} |")
    return "\n".join(lines)
