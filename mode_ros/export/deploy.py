"""The policy a node runs, built from the node's parameters: one function for the policy node and
offline replay (``mode-ros replay --offline -p inference_backend:=onnx …`` replays the deployed
configuration, not a PyTorch stand-in for it).

    policy, described = load_policy(params, log=logging.getLogger("x"))

What it applies, in order: the checkpoint on ``device`` / ``dtype``, ``torch_threads`` (the caller
restores it where it must), ``sampling_steps``, then either ``inference_backend onnx`` (the export in
``onnx_model``, checked against the checkpoint; the PyTorch denoiser weights are released unless the
execution strategy needs PyTorch for prefixed chunks) or the PyTorch fast paths (``fast_inference``,
``weight_quant``, ``gpu_kernels``; with quantised experts the full-precision ones are released unless
guidance needs them). ``params`` is a ``mode_ros.ros.params.NodeParams`` (plain data,
no ROS).
"""
from __future__ import annotations

import logging

_log = logging.getLogger(__name__)

_KERNELS = {"torch": {"attention": None, "gemm": "torch", "pdl": False},
            "triton": {"attention": "triton", "gemm": "triton", "pdl": False},
            "triton_pdl": {"attention": "triton", "gemm": "triton", "pdl": True}}


class DeployError(ValueError):
    """Parameters that cannot make a policy (the message names the parameter)."""


def load_policy(p, log=None):
    """(policy, one line describing how it computes chunks). ``log``: logging-style ``info`` /
    ``warning``."""
    import torch

    from ..model.policy import MoDEPolicy

    log = log or _log
    if p.torch_threads > 0:
        torch.set_num_threads(p.torch_threads)
    policy = MoDEPolicy.from_pretrained(p.checkpoint, device=p.device, dtype=None if p.dtype == "auto" else p.dtype)
    if p.sampling_steps:
        policy.set_num_steps(p.sampling_steps)
    if p.inference_backend == "onnx":
        return policy, _attach_onnx(policy, p, log)
    mode = p.fast_inference
    if mode == "auto":
        mode = "compiled" if policy.device.type == "cuda" else "off"
    kernels = p.gpu_kernels
    if kernels == "auto" and policy.device.type != "cuda":
        kernels = "torch"
    if mode == "off" and p.weight_quant == "none" and kernels == "torch":
        return policy, f"PyTorch cached sampler, {policy.num_steps} steps"
    base = {"fused": True, "compile": mode == "compiled", "graph": mode in ("compiled", "graph"),
            "weight_quant": p.weight_quant}
    if kernels == "auto":   # measure on this GPU, keep the fastest correct one
        names = list(_KERNELS)
        sel = policy.select_fast([{**base, **_KERNELS[n]} for n in names], logger=log)
        log.info("gpu_kernels auto: chosen %s", names[sel["chosen"]] if sel["chosen"] is not None
                 else "none (fast paths off)")
        active = sel["active"]
    else:
        active = policy.enable_fast(logger=log, **base, **_KERNELS[kernels])
    described = f"fast inference: {active}, {policy.num_steps} steps"
    if active.get("weight_quant", "none") != "none" and policy.fused is not None:
        described += "; " + _release_experts(policy, p, log)
    return policy, described


def _release_experts(policy, p, log) -> str:
    """Quantised experts compute every chunk: free the full-precision ones unless guidance needs them."""
    from ..control.controller import ChunkController

    if ChunkController.strategy_name(p) == "rtc_guidance":
        log.warning("execution_strategy rtc_guidance with weight_quant %s: guidance differentiates through the "
                    "full-precision experts, which are kept beside the quantised ones", p.weight_quant)
        return "full-precision experts kept (rtc_guidance)"
    return f"full-precision experts released, {policy.release_expert_weights() / 1e6:.1f} MB"


def _attach_onnx(policy, p, log) -> str:
    from ..control.controller import ChunkController
    from ..model.checkpoint import resolve_checkpoint
    from .onnx_runtime import attach_onnx

    if not p.onnx_model:
        raise DeployError("onnx_model: not set (the `mode-ros export onnx` folder inference_backend onnx runs)")
    steps, strategy = p.sampling_steps, ChunkController.strategy_name(p)
    chunk = attach_onnx(policy, p.onnx_model, checkpoint=resolve_checkpoint(p.checkpoint),
                        threads=p.onnx_threads or p.torch_threads or None, logger=log, calibrate=not p.onnx_threads)
    if steps and steps != chunk.steps:
        raise DeployError(f"sampling_steps: {steps}, but the ONNX export {p.onnx_model} has {chunk.steps} steps "
                          f"(export with --steps {steps}, or leave sampling_steps 0)")
    # the export samples plain and replacement-prefixed chunks; guidance (and any prefix for an export
    # without prefix inputs) needs PyTorch: only then are its weights kept beside onnxruntime's copy
    if strategy == "rtc_guidance" or (strategy == "rtc_replace" and not chunk.has_prefix):
        log.warning(f"execution_strategy {strategy} with inference_backend onnx: chunks with a prefix run in "
                    "PyTorch (its weights are kept)")
        held = "PyTorch weights kept"
    else:
        held = f"PyTorch weights released, {policy.release_torch_weights() / 1e6:.1f} MB"
    rw = chunk.rewrites
    if "error" in rw:   # the standard file still runs, only slower
        log.warning(f"onnxruntime graph rewrite failed, running {chunk.path} as exported: {rw['error']}")
    graph = f"graph rewritten, {rw['nodes']} nodes" if rw["rewritten"] else "graph as exported"
    th = chunk.threads
    threads = f"{th['chosen'] or 'default'} thread{'' if th['chosen'] == 1 else 's'}"
    if "median_ms" in th:
        threads += f" (calibrated, ms per chunk by threads: {th['median_ms']})"
    return (f"onnxruntime, {chunk.path} ({chunk.steps} steps, {chunk.meta['dtype']}, providers "
            f"{chunk.session.get_providers()}, {graph}, {threads}; {held})")


__all__ = ["load_policy", "DeployError"]
