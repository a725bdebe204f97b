"""ONNX export of one whole action chunk: encoders, context tokens, the cached denoising steps with
their experts baked in, EDM scalings, DDIM updates and (de-)normalisation, as one static graph.

MoDE routes on sigma alone, so the experts of every step are fixed once the schedule is: the export
traces what ``MoDEPolicy.sample_normalized`` runs with the cached sampler (the routing table's
expert indices are Python ints, the loop is unrolled) and the graph has no router and no top-k. The
expert weights of the graph are the selected experts only, each (layer, expert) stored once and
named ``denoiser.blocks.L.moe.expertE.w1|b1|w2`` so they can be counted (``graph_summary``).

Inputs (batch B fixed at export, or a dynamic axis): ``images`` (B, C, 3, H, W) uint8 at the checkpoint's image size
(cameras in ``camera_names`` order; only with cameras), ``goal`` (B, 512) float32 goal embedding
(the text encoder stays in PyTorch), ``state`` (B, S) float32 in robot units (only with a state),
``noise`` (B, K, A) float32 standard normal, and for real-time chunking by replacement
(``rtc_replace``; ``prefix=False`` leaves them out) ``prefix_normalized`` (B, K, A) float32, the
previous plan in normalised units, and ``prefix_weights`` (B, K) float32, the soft mask W
(``mode_ros.model.inpainting``): at every step the known rows replace the sample over W exactly as
``PrefixGuide`` does in PyTorch; W = 0 gives the plain sampler bit for bit. Outputs: ``actions`` (B, K, A) in robot units (gripper
dimensions binarised, constant dimensions at their recorded value, as ``MoDEPolicy.postprocess``)
and ``actions_normalized`` (B, K, A).

The TorchScript-based exporter is used: ``torch.export`` (the dynamo exporter) cannot trace the
cached sampler, whose cache key reads parameter data pointers.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODEL_FILE, META_FILE = "model.onnx", "export.json"
PREFIX_INPUTS = ("prefix_normalized", "prefix_weights")   # real-time chunking by replacement
FORMAT = "mode_ros.onnx_chunk/1"
OPSET = 17            # onnxruntime CPU/CUDA; TensorRT >= 8.6 parses every op used here (Trilu included)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# largest normalised difference of onnxruntime (CPU) from PyTorch at the same dtype on the same inputs
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


class OnnxExportError(ValueError):
    """An export cannot be made, or an exported model cannot be used with this policy."""


def _affine_tensors(norm, dim: int):
    """offset, scale, constant mask of a policy's ``Affine`` (identity when there is none)."""
    if norm is None:
        return torch.zeros(dim), torch.ones(dim), torch.zeros(dim, dtype=torch.bool)
    return (torch.as_tensor(norm.offset).float(), torch.as_tensor(norm.scale).float(),
            torch.as_tensor(norm.constant).bool())


class ChunkModule(nn.Module):
    """(images, goal, state, noise) -> (actions in robot units, normalised actions): the policy's own
    cached sampler between the same normalisation the numpy API applies."""

    def __init__(self, policy, prefix: bool = True):
        super().__init__()
        self.policy = policy
        self.prefix = bool(prefix)
        c = policy.config
        self.has_images, self.has_state = bool(c.camera_names), c.state_dim > 0
        for prefix, norm, dim in (("a", policy.action_norm, c.action_dim), ("s", policy.state_norm, c.state_dim)):
            off, sc, const = _affine_tensors(norm, dim)
            self.register_buffer(f"{prefix}_off", off, persistent=False)
            self.register_buffer(f"{prefix}_scale", sc, persistent=False)
            self.register_buffer(f"{prefix}_const", const, persistent=False)
        grip = torch.zeros(c.action_dim, dtype=torch.bool)
        grip[list(c.gripper_dims)] = True
        self.register_buffer("gripper", grip, persistent=False)

    def input_names(self) -> list[str]:
        return ((["images"] if self.has_images else []) + ["goal"] + (["state"] if self.has_state else []) + ["noise"]
                + (list(PREFIX_INPUTS) if self.prefix else []))

    def forward(self, *inputs):
        named = dict(zip(self.input_names(), inputs))
        st = named.get("state")
        if st is not None:
            st = torch.where(self.s_const, torch.zeros_like(st), (st - self.s_off) / self.s_scale)
        guide = None
        if self.prefix:   # the policy's own replacement step, traced (rtc_replace)
            from ..model.inpainting import PrefixGuide
            guide = PrefixGuide("replace", named["prefix_normalized"], named["prefix_weights"], named["noise"],
                                self.policy.sampler.schedule().to(named["noise"].device),
                                self.policy.config.diffusion.sigma_data,
                                clean=self.policy.config.diffusion.prefix_trained)
        a = self.policy.sample_normalized(named.get("images"), named["goal"], st, named["noise"], cached=True,
                                          guide=guide).float()
        b = torch.where(self.gripper, torch.where(a >= 0, torch.ones_like(a), -torch.ones_like(a)), a)
        robot = torch.where(self.a_const, self.a_off.expand_as(b), b * self.a_scale + self.a_off)
        return robot, a


def example_inputs(policy, batch: int = 1, seed: int = 0, prefix: bool = True) -> dict[str, torch.Tensor]:
    """Random inputs of the exported graph's signature (float32 / uint8, on the policy's device); the
    prefix of sample j (with ``prefix``) is random with j + 1 frozen rows and W over K - 2 rows, so a
    check covers the replacement path (sample 0 of a batch of one included)."""
    c, dev = policy.config, policy.device
    g = torch.Generator(device=dev).manual_seed(seed)
    out = {}
    if c.camera_names:
        h, w = c.vision.image_size
        out["images"] = torch.randint(0, 256, (batch, len(c.camera_names), 3, h, w), dtype=torch.uint8,
                                      device=dev, generator=g)
    out["goal"] = torch.randn(batch, 512, device=dev, generator=g)
    if c.state_dim:
        sn = policy.state_norm
        st = torch.randn(batch, c.state_dim, device=dev, generator=g)
        out["state"] = st if sn is None else st * torch.as_tensor(sn.scale, device=dev) + torch.as_tensor(sn.offset, device=dev)
    out["noise"] = torch.randn(batch, c.chunk_size, c.action_dim, device=dev, generator=g)
    if prefix:
        from ..model.inpainting import prefix_weights
        k = c.chunk_size
        out["prefix_normalized"] = torch.randn(batch, k, c.action_dim, device=dev, generator=g)
        out["prefix_weights"] = torch.stack([torch.from_numpy(prefix_weights(max(k - 2, 1), min(j + 1, max(k - 2, 1)), k))
                                             for j in range(batch)]).to(dev)
    return out


def weights_sha256(policy) -> str:
    """Identity of a policy's weights: sha256 over its state dict in float32 (name order)."""
    h = hashlib.sha256()
    for name, v in sorted(policy.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _trace(module: ChunkModule, inputs: dict, path: Path, opset: int, fold: bool, dynamic_batch: bool) -> None:
    names = module.input_names()
    axes = {n: {0: "batch"} for n in names + ["actions", "actions_normalized"]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # TracerWarnings of the unrolled loop; the result is checked numerically
        torch.onnx.export(module, tuple(inputs[n] for n in names), str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=["actions", "actions_normalized"],
                          dynamic_axes=axes, do_constant_folding=fold)


def _name_experts(model, policy, dtype: torch.dtype) -> int:
    """Give the folded expert weights their names (matched by content: w1/w2 are stored transposed for
    MatMul). Returns how many initializers were named."""
    from onnx import numpy_helper

    wanted = {}
    for l, blk in enumerate(policy.denoiser.blocks):
        moe = blk.moe
        for e in range(moe.num_experts):
            for part, t in (("w1", moe.w1[e].t()), ("b1", moe.b1[e]), ("w2", moe.w2[e].t())):
                arr = t.detach().to("cpu", dtype).contiguous().numpy()
                wanted[(arr.shape, arr.tobytes())] = f"denoiser.blocks.{l}.moe.expert{e}.{part}"
    renamed = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        new = wanted.get((arr.shape, arr.tobytes()))
        if new is not None and new not in renamed.values():
            renamed[init.name] = new
            init.name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    return len(renamed)


def graph_summary(model) -> dict:
    """Op counts and the expert MLPs of an exported chunk: per layer, how many MatMuls read each
    expert's up- (w1) and down-projection (w2) (through Identity and Cast)."""
    alias = {}
    for node in model.graph.node:
        if node.op_type in ("Identity", "Cast"):   # a cast (fp16 exports) reads the same weight
            alias[node.output[0]] = node.input[0]

    def source(name):
        while name in alias:
            name = alias[name]
        return name
    ops: dict[str, int] = {}
    uses: dict[str, dict[str, int]] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input:
                src = source(name)
                if ".moe.expert" in src and src.endswith((".w1", ".w2")):
                    layer, part = src.split(".moe.")[0], src.rsplit(".", 1)[1]
                    key = f"{layer}.{src.split('.moe.')[1].split('.')[0]}"
                    uses.setdefault(part, {})
                    uses[part][key] = uses[part].get(key, 0) + 1
    stored = sorted({i.name for i in model.graph.initializer if ".moe.expert" in i.name})
    return {"ops": ops, "topk": ops.get("TopK", 0), "expert_matmuls": uses, "stored_expert_tensors": stored,
            "parameters": int(sum(int(np.prod(i.dims)) for i in model.graph.initializer))}


def _describe(module: ChunkModule, inputs: dict, outputs: tuple, dynamic_batch: bool) -> tuple[list, list]:
    def spec(name, t):
        return {"name": name, "shape": ["batch" if dynamic_batch else t.shape[0], *t.shape[1:]],
                "dtype": str(t.dtype).replace("torch.", "")}
    ins = [spec(n, inputs[n]) for n in module.input_names()]
    return ins, [spec(n, t) for n, t in zip(("actions", "actions_normalized"), outputs)]


def _identity(policy, checkpoint: str | Path | None) -> dict:
    ident = {"weights_sha256": weights_sha256(policy), "path": None, "model_sha256": None}
    if checkpoint is not None:
        from ..model.policy import WEIGHTS_FILE
        ident["path"] = str(Path(checkpoint).resolve())
        ident["model_sha256"] = file_sha256(Path(checkpoint) / WEIGHTS_FILE)
    return ident


def policy_layout(policy) -> dict:
    c = policy.config
    return {"camera_names": list(c.camera_names), "image_size": list(c.vision.image_size) if c.camera_names else None,
            "state_dim": c.state_dim, "action_dim": c.action_dim, "chunk_size": c.chunk_size,
            "action_names": list(c.action_names), "n_layers": c.model.n_layers, "top_k": c.model.top_k}


def export_onnx(policy, out: str | Path, steps: int | None = None, batch: int = 1, dtype: str = "fp32",
                checkpoint: str | Path | None = None, opset: int = OPSET, verify: bool = True,
                dynamic_batch: bool = False, prefix: bool = True) -> dict:
    """Write ``out/model.onnx`` (one chunk of ``policy``) and ``out/export.json`` (inputs, outputs,
    steps, schedule, routing, dtype, checkpoint identity, graph summary, sizes and the verification
    against the PyTorch cached sampler on ``batch`` random inputs). The batch size is ``batch``, fixed
    in the graph (all shapes static: onnxruntime loads it ~10x faster, TensorRT needs no profile), or
    a dynamic axis with ``dynamic_batch``. Sets the policy's steps and dtype as asked and turns its
    fused sampler off. Returns the metadata."""
    import onnx

    if dtype not in DTYPES:
        raise OnnxExportError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    if batch < 1:
        raise OnnxExportError(f"batch: must be >= 1, got {batch}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policy.eval()
    identity = _identity(policy, checkpoint)   # of the weights as loaded (float32), before any cast
    if steps is not None:
        policy.set_num_steps(steps)
    policy.to_device(str(policy.device), DTYPES[dtype])
    policy.fused = None   # the traced path is the plain cached sampler (one expert view per selection)
    table = policy.sampler.ensure()
    module = ChunkModule(policy, prefix=prefix).to(policy.device).eval()
    inputs = example_inputs(policy, batch, prefix=prefix)
    t0 = time.perf_counter()
    with torch.no_grad():
        expected = module(*(inputs[n] for n in module.input_names()))
        # the exporter's constant folding widens half weights to float on the CPU: fold fp16 ourselves
        _trace(module, inputs, out / MODEL_FILE, opset, fold=dtype == "fp32", dynamic_batch=dynamic_batch)
    model = onnx.load(str(out / MODEL_FILE))
    if dtype != "fp32":
        fold_weight_slices(model)
    named = _name_experts(model, policy, DTYPES[dtype])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out / MODEL_FILE))
    seconds = time.perf_counter() - t0
    ins, outs = _describe(module, inputs, expected, dynamic_batch)
    summary = graph_summary(model)
    meta = {"format": FORMAT, "dtype": dtype, "steps": policy.num_steps, "opset": opset, "prefix": bool(prefix),
            "batch": "dynamic" if dynamic_batch else batch,
            "sigmas": [float(s) for s in table.sigmas.cpu()], "routing": [[list(e) for e in s] for s in table.indices],
            "inputs": ins, "outputs": outs, "policy": policy_layout(policy), "checkpoint": identity,
            "onnx_sha256": file_sha256(out / MODEL_FILE), "file_bytes": (out / MODEL_FILE).stat().st_size,
            "export_seconds": seconds, "named_expert_tensors": named,
            "graph": {k: summary[k] for k in ("topk", "parameters", "expert_matmuls")},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__}}
    if verify:
        meta["verify"] = verify_export(out, inputs, expected, dtype)
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def verify_export(out: str | Path, inputs: dict, expected: tuple, dtype: str = "fp32") -> dict:
    """Largest differences of onnxruntime (CPU) from the PyTorch outputs on the same inputs, for the
    file as it is and for the graph the backend runs (rewritten for onnxruntime, ``ort_graph``)."""
    from .ort_graph import session

    res = {"batch": int(inputs["goal"].shape[0]), "provider": "CPUExecutionProvider"}
    for suffix, rewrite in (("", False), ("_rewritten", True)):
        sess, stats = session(Path(out) / MODEL_FILE, rewrite=rewrite, dtype=dtype)
        feeds = {i.name: inputs[i.name].cpu().numpy() for i in sess.get_inputs()}
        got = sess.run(["actions", "actions_normalized"], feeds)
        res[f"max_abs_diff_robot{suffix}"] = float(np.abs(got[0] - expected[0].cpu().numpy()).max())
        res[f"max_abs_diff_normalized{suffix}"] = float(np.abs(got[1] - expected[1].cpu().numpy()).max())
    res["rewrites"] = stats
    return res


_FOLDABLE = ("Gather", "Transpose")   # not Cast: a widened copy of a half weight is not stored


def _fold_op(node, args: list[np.ndarray]) -> np.ndarray:
    from onnx import helper
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gather":
        return np.take(args[0], args[1], axis=attrs.get("axis", 0))
    return np.ascontiguousarray(np.transpose(args[0], attrs.get("perm")))


def fold_weight_slices(model) -> int:
    """Evaluate Gather / Transpose chains over initializers and constants (the expert views
    ``w1[e]`` and their transposes) into initializers, each distinct value stored once; drop what is
    no longer used. For exports traced without the exporter's constant folding (fp16 on CPU, where it
    widens half weights to float). Returns the number of nodes folded."""
    from onnx import numpy_helper

    g = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute[0].name == "value":
            const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    folded = []
    for n in g.node:
        if n.op_type in _FOLDABLE and all(i in const for i in n.input):
            const[n.output[0]] = _fold_op(n, [const[i] for i in n.input])
            folded.append(n)
    drop = {id(n) for n in folded}
    keep = [n for n in g.node if id(n) not in drop]
    needed = {i for n in keep for i in n.input} | {o.name for o in g.output}
    by_value, alias = {}, {}
    new_inits = []
    for n in folded:
        name = n.output[0]
        if name not in needed:
            continue
        arr = const[name]
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in by_value:
            by_value[key] = name
            new_inits.append(numpy_helper.from_array(arr, name))
        alias[name] = by_value[key]
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = alias.get(name, name)
    used = {i for n in keep for i in n.input}
    keep = [n for n in keep if n.op_type != "Constant" or n.output[0] in used]
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in used] + [i for i in new_inits if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    return len(folded)
