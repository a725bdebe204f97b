"""onnxruntime backend: run a policy's chunks through its ONNX export (``mode-ros export onnx``).

    chunk = attach_onnx(policy, "export_dir/", checkpoint="ckpt/")   # checks, then policy.backend = chunk
    actions = policy.predict_chunk(images, "open the drawer", state)   # same API, same inputs and noise

The policy keeps its own input handling (image checks and resizing, the goal text encoder, state
checks, the seeded noise); the exported graph replaces only the tensor computation of the chunk,
normalisation and de-normalisation included. Loading refuses, with ``OnnxExportError`` naming the
file, an export that is unreadable, was changed after export, or belongs to another checkpoint or
layout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .onnx import FORMAT, META_FILE, MODEL_FILE, PREFIX_INPUTS, OnnxExportError, file_sha256, policy_layout, weights_sha256

_ORT_TYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    if not (path / MODEL_FILE).is_file() or not meta_path.is_file():
        raise OnnxExportError(f"{path}: not an ONNX export (needs {MODEL_FILE} and {META_FILE}; "
                              "write one with `mode-ros export onnx`)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise OnnxExportError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OnnxExportError(f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    return meta


def _check_signature(path: Path, meta: dict, session) -> None:
    """The session's inputs/outputs are the ones the metadata describes (names, ranks, types, sizes)."""
    got = {i.name: i for i in session.get_inputs() + session.get_outputs()}
    for spec in meta["inputs"] + meta["outputs"]:
        arg = got.get(spec["name"])
        if arg is None:
            raise OnnxExportError(f"{path / MODEL_FILE}: has no {spec['name']!r} (inputs/outputs: {sorted(got)})")
        dims = [d if isinstance(d, int) else "batch" for d in arg.shape]
        if dims != spec["shape"] or arg.type != _ORT_TYPES.get(spec["dtype"], arg.type):
            raise OnnxExportError(f"{path / MODEL_FILE}: {spec['name']} is {arg.type} {arg.shape}, "
                                  f"{META_FILE} says {spec['dtype']} {spec['shape']}")
    extra = sorted({i.name for i in session.get_inputs()} - {s["name"] for s in meta["inputs"]})
    if extra:
        raise OnnxExportError(f"{path / MODEL_FILE}: inputs {extra} not in {META_FILE}")


def thread_candidates(budget: int | None) -> list[int]:
    """Intra-op thread counts tried within ``budget`` (default: the CPUs this process may use): the
    budget first, then 1, 2, 4… below it."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    budget = max(1, int(budget or cpus or 1))
    return [budget] + [t for t in (2 ** i for i in range(budget.bit_length())) if t < budget]


class OnnxChunk:
    """One exported chunk in an onnxruntime session: ``run`` takes the policy's tensors (images uint8,
    goal embedding, state in robot units as numpy, noise) and returns actions in robot units."""

    def __init__(self, path: Path, meta: dict, session, rewrites: dict | None = None):
        self.path, self.meta, self.session = path, meta, session
        self.rewrites = rewrites or {"rewritten": False}   # ort_graph.sessions' counts
        self.threads: dict = {"requested": None, "chosen": None}   # intra-op threads (``load``'s calibration)
        self.input_names = [s["name"] for s in meta["inputs"]]
        self.steps = int(meta["steps"])

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, device: str = "cpu",
             rewrite: bool = True, calibrate: bool = False) -> "OnnxChunk":
        """Read and check ``path`` (an export directory). ``threads``: onnxruntime's intra-op threads
        (default: its own choice); ``device`` "cuda" uses the CUDA provider when installed; ``rewrite``:
        hand onnxruntime the graph with fused norms, attention and projections (``ort_graph``);
        ``calibrate`` (CPU): ``threads`` (default: the CPUs this process may use) is a budget, and the
        session keeps the count of 1, 2, 4… up to it that runs a chunk fastest here (``calibrate_threads``)."""
        from .ort_graph import sessions

        path = Path(path)
        meta = _read_meta(path)
        digest = file_sha256(path / MODEL_FILE)
        if digest != meta.get("onnx_sha256"):
            raise OnnxExportError(f"{path / MODEL_FILE}: sha256 {digest[:12]}… differs from the one recorded in "
                                  f"{META_FILE} ({str(meta.get('onnx_sha256'))[:12]}…): the file was changed or replaced")
        calibrate = calibrate and not device.startswith("cuda")
        counts = thread_candidates(threads) if calibrate else [threads]
        try:
            found, rewrites = sessions(path / MODEL_FILE, counts, device, rewrite, meta.get("dtype", "fp32"))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable models
            raise OnnxExportError(f"{path / MODEL_FILE}: onnxruntime cannot load it ({type(exc).__name__}: "
                                  f"{str(exc).strip()[:300]})") from None
        for sess in found:
            _check_signature(path, meta, sess)
        chunk = cls(path, meta, found[0], rewrites)
        chunk.threads = {"requested": threads, "chosen": threads}
        if len(found) > 1:
            chunk.calibrate_threads(dict(zip(counts, found)))
        return chunk

    def calibrate_threads(self, candidates: dict, rounds: int = 4, block: int = 4, margin: float = 0.1) -> None:
        """Keep the session of ``candidates`` ({intra-op threads: session}) with the fewest threads whose
        median time per chunk is within ``margin`` of the fastest, on fixed random inputs of the export's
        shapes, timed in ``rounds`` of ``block`` calls each in turn (after one untimed call). A thread
        must earn its core: on a small graph the pool's hand-offs between tiny nodes can cost more than
        a second core gains (metaworld preset, 2 cores: 1 thread 4–6 ms, 2 threads 3–8 ms), and a
        spinning pool slows whatever else runs on the robot's CPU."""
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in self.meta["inputs"]:
            shape = [1 if d == "batch" else d for d in spec["shape"]]
            feeds[spec["name"]] = (rng.integers(0, 256, shape, dtype=np.uint8) if spec["dtype"] == "uint8"
                                   else rng.standard_normal(shape).astype(np.float32))
        if "prefix_weights" in feeds:
            feeds["prefix_weights"][:] = 0.0
        import torch

        from ..model.bench import time_in_rounds   # the bench's own round-robin timing
        fns = {t: (lambda s=sess: s.run(["actions"], feeds)) for t, sess in candidates.items()}
        ms, _ = time_in_rounds(fns, torch.device("cpu"), runs=rounds * block, warmup=1, log=lambda m: None,
                               block=block)
        med = {t: float(np.median(sum(v, []))) for t, v in ms.items()}
        best = min(t for t in med if med[t] <= (1.0 + margin) * min(med.values()))
        self.session = candidates[best]
        self.threads = {"requested": self.threads["requested"], "chosen": best,
                        "median_ms": {str(t): round(v, 3) for t, v in med.items()}}

    def check_policy(self, policy, checkpoint: str | Path | None = None) -> None:
        """Refuse an export of another checkpoint or layout. With ``checkpoint`` (the directory the
        policy was loaded from) the weights file's sha256 is compared, otherwise the policy's weights."""
        want, got = self.meta["policy"], policy_layout(policy)
        diff = [f"{k}: export {want.get(k)!r}, policy {v!r}" for k, v in got.items() if want.get(k) != v]
        if diff:
            raise OnnxExportError(f"{self.path}: exported for another layout ({'; '.join(diff)})")
        ident = self.meta["checkpoint"]
        if checkpoint is not None and ident.get("model_sha256"):
            from ..model.policy import WEIGHTS_FILE
            same = file_sha256(Path(checkpoint) / WEIGHTS_FILE) == ident["model_sha256"]
            what = f"checkpoint {checkpoint}"
        else:
            same = weights_sha256(policy) == ident["weights_sha256"]
            what = "the policy's weights (float32)"
        if not same:
            raise OnnxExportError(f"{self.path}: exported from another checkpoint ({ident.get('path') or 'weights'} "
                                  f"sha256 differs from {what})")

    @property
    def has_prefix(self) -> bool:
        """Whether the graph takes a replacement prefix (``export_onnx(prefix=True)``, the default)."""
        return all(n in self.input_names for n in PREFIX_INPUTS)

    def takes(self, guide) -> bool:
        """Whether this export computes a chunk with ``guide`` (a ``PrefixGuide``): replacement only,
        and only when the graph has the prefix inputs; guidance needs PyTorch's autograd."""
        return guide is None or (guide.method == "replace" and self.has_prefix)

    def run_all(self, images, goal, state, noise, guide=None) -> tuple[np.ndarray, np.ndarray]:
        """(actions in robot units, normalised actions), each (B, K, A) float32. ``guide``: a
        replacement ``PrefixGuide`` (its known rows and W become the prefix inputs; None: W = 0)."""
        if not self.takes(guide):
            raise OnnxExportError(f"{self.path}: cannot sample with a {guide.method} prefix "
                                  + ("(replacement only)" if self.has_prefix else "(exported without prefix inputs)"))
        given = {"images": images, "goal": goal, "state": state, "noise": noise}
        if self.has_prefix:
            noise_np = noise.detach().cpu().numpy() if hasattr(noise, "detach") else np.asarray(noise)
            given["prefix_normalized"] = (np.zeros_like(noise_np, np.float32) if guide is None else guide.known)
            given["prefix_weights"] = (np.zeros(noise_np.shape[:2], np.float32) if guide is None
                                       else guide.w.squeeze(-1))
        feeds = {}
        for name in self.input_names:
            v = given[name]
            if v is None:
                raise OnnxExportError(f"{self.path}: input {name!r} is required")
            v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            feeds[name] = np.ascontiguousarray(v, dtype=np.uint8 if name == "images" else np.float32)
        batch = self.meta.get("batch", "dynamic")
        if batch != "dynamic" and feeds["goal"].shape[0] != batch:
            raise OnnxExportError(f"{self.path}: exported for batch {batch}, called with {feeds['goal'].shape[0]} "
                                  "(export with --batch N or --dynamic-batch)")
        robot, norm = self.session.run(["actions", "actions_normalized"], feeds)
        return robot, norm

    def run(self, images, goal, state, noise, guide=None) -> np.ndarray:
        return self.run_all(images, goal, state, noise, guide)[0]


def attach_onnx(policy, path: str | Path, checkpoint: str | Path | None = None, threads: int | None = None,
                logger=None, calibrate: bool = False) -> OnnxChunk:
    """Load the export at ``path``, check it against ``policy`` and make it the policy's backend
    (``policy.backend``). The policy's sampler takes the export's number of steps (its PyTorch path
    and diagnostics then describe the same chunk). ``MoDEPolicy.release_torch_weights`` afterwards
    frees the PyTorch copy (``mode_ros.export.deploy`` decides when). ``threads`` / ``calibrate``: as
    ``OnnxChunk.load``. Raises ``OnnxExportError``."""
    chunk = OnnxChunk.load(path, threads=threads, device=str(policy.device), calibrate=calibrate)
    chunk.check_policy(policy, checkpoint)
    if policy.num_steps != chunk.steps:
        if logger:
            logger.info("onnx export %s has %d steps; the policy had %d: using %d", path, chunk.steps,
                        policy.num_steps, chunk.steps)
        policy.set_num_steps(chunk.steps)
    policy.backend = chunk
    return chunk
