"""onnxruntime-specific rewrites of an exported chunk, made when a session is created.

The exported file stays standard ONNX at opset 17 (the onnx checker passes, TensorRT parses it). For
onnxruntime the denoiser's small per-token ops cost more in per-node overhead than in arithmetic (the
metaworld preset: ~2600 nodes after onnxruntime's own optimisations for ~7 ms), so ``ort_model``
hands onnxruntime a graph with fewer, larger nodes:

* every RMSNorm (``ReduceL2 -> Mul(d^-1/2) -> Clip(eps) -> Div -> Mul(g)``, the reference's clamped
  RMS) becomes one ``SimplifiedLayerNormalization`` with epsilon eps² inside the square root: equal to
  the clamp wherever rms >> eps, and 0 -> 0 like it;
* every causal attention (per-head RMSNorm of Q and K in (B, H, T, Dh), the scale on both, the causal
  mask added before the softmax, then the head merge) becomes the per-head norms on (B, T, H, Dh) and
  one ``com.microsoft.MultiHeadAttention`` (unidirectional);
* matrix products keep their bias as a separate ``Add`` (``MatMulAddFusion`` off: its Gemm needs two
  Reshapes around it for 3-D activations).

The graph is first constant-folded by onnxruntime itself (basic level) so the patterns are found on
folded constants. Numerics: the chunk is checked against PyTorch within the export tolerance
(``verify_export``, tests). A pattern that does not match is left as it is.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

DISABLED = ["MatMulAddFusion"]                       # the final session
_FOLD_DISABLED = ["TransposeOptimizer", "MatMulAddFusion"]   # the folding pass: keep the patterns plain


class _Graph:
    """Producers, consumers and constant values of a graph, for matching."""

    def __init__(self, graph):
        from onnx import numpy_helper
        self.g = graph
        self.const = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.prod = {o: n for n in graph.node for o in n.output}
        self.users = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.users[i].append(n)

    def node(self, name: str, op: str):
        n = self.prod.get(name)
        return n if n is not None and n.op_type == op else None

    def only_user(self, name: str, op: str):
        us = self.users.get(name, [])
        return us[0] if len(us) == 1 and us[0].op_type == op else None

    def split_const(self, node):
        """(the non-constant input, the constant value) of a binary node with one constant input."""
        a, b = node.input
        if b in self.const and a not in self.const:
            return a, self.const[b]
        if a in self.const and b not in self.const:
            return b, self.const[a]
        return None, None


def _attr(node, name, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def fold(model_bytes: bytes):
    """onnxruntime's basic-level pass (constant folding, eliminations) over ``model_bytes``; the
    transpose optimiser and MatMul+Add fusion are off so the patterns stay as exported."""
    import onnx
    import onnxruntime as ort

    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix="mode_ros_fold_")
    os.close(fd)
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = tmp
        ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"], disabled_optimizers=_FOLD_DISABLED)
        return onnx.load(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _rms_match(G: _Graph, div):
    """(x, gain name, eps, output name, matched nodes) for an RMSNorm ending in ``div`` -> Mul(g)."""
    x, den = div.input
    clip = G.node(den, "Clip")
    if clip is None or len(clip.input) < 2 or clip.input[1] not in G.const or (len(clip.input) > 2 and clip.input[2]):
        return None
    mul = G.node(clip.input[0], "Mul")
    if mul is None:
        return None
    red_out, scale = G.split_const(mul)
    red = G.node(red_out, "ReduceL2") if red_out else None
    if red is None or red.input[0] != x or _attr(red, "keepdims", 1) != 1 or list(_attr(red, "axes", [])) != [-1]:
        return None
    gm = G.only_user(div.output[0], "Mul")
    if gm is None:
        return None
    gname = gm.input[0] if gm.input[1] == div.output[0] else gm.input[1]
    gain = G.const.get(gname)
    if gain is None or gain.ndim != 1 or abs(float(np.ravel(scale)[0]) ** 2 * gain.shape[0] - 1) > 1e-5:
        return None
    if any(len(G.users[o]) != 1 for o in (red.output[0], mul.output[0], clip.output[0])):
        return None
    return x, gname, float(np.ravel(G.const[clip.input[1]])[0]), gm.output[0], (red, mul, clip, div, gm)


def fuse_rms_norms(model) -> int:
    """Replace each clamped RMSNorm by one SimplifiedLayerNormalization (eps² inside the root)."""
    from onnx import helper
    G = _Graph(model.graph)
    drop, new = set(), {}
    for div in [n for n in model.graph.node if n.op_type == "Div"]:
        m = _rms_match(G, div)
        if m is None:
            continue
        x, gname, eps, out, nodes = m
        new[id(nodes[-1])] = [helper.make_node("SimplifiedLayerNormalization", [x, gname], [out],
                                               name=f"rms_norm_{len(new)}", axis=-1, epsilon=eps * eps, stash_type=1)]
        drop.update(id(n) for n in nodes[:-1])
    _splice(model, new, drop)
    return len(new)


def _splice(model, new: dict, drop: set) -> None:
    """Put the nodes ``new[id(node)]`` (a list) in place of each such node, drop the nodes in ``drop``,
    order the graph topologically, declare the com.microsoft domain where it is used, and prune."""
    from onnx import helper
    if not new:
        return
    flat = []
    for n in model.graph.node:
        if id(n) not in drop:
            flat.extend(new.get(id(n), [n]))
    del model.graph.node[:]
    model.graph.node.extend(_toposort(flat))
    if any(n.domain == "com.microsoft" for n in flat) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    prune(model)


def _perm(G: _Graph, name: str, perm: list[int]):
    n = G.node(name, "Transpose")
    return n if n is not None and list(_attr(n, "perm", [])) == perm else None


def _causal(mask: np.ndarray, t: int) -> bool:
    """Whether ``mask`` broadcasts to the (t, t) additive causal mask (0 on and below the diagonal,
    -inf or below -1e4 above)."""
    try:
        m = np.broadcast_to(mask, mask.shape[:-2] + (t, t))[..., :, :].reshape(-1, t, t)
    except ValueError:
        return False
    upper = np.triu(np.ones((t, t), bool), 1)
    return bool(np.all(m[:, ~upper] == 0) and np.all(m[:, upper] < -1e4))


def _attention_match(G: _Graph, soft):
    """The pieces of one causal attention ending in ``soft`` (see the module docstring), or None."""
    if _attr(soft, "axis", -1) not in (-1, 3):
        return None
    add = G.node(soft.input[0], "Add")
    mm = None
    if add is not None:
        scores, mask = G.split_const(add)
        mm = G.node(scores, "MatMul") if scores else None
    if mm is None:
        return None
    qs, ks = (G.node(i, "Mul") for i in mm.input)
    if qs is None or ks is None:
        return None
    (qn_name, s_q), (knt_name, s_k) = G.split_const(qs), G.split_const(ks)
    if qn_name is None or knt_name is None or np.size(s_q) != 1 or np.size(s_k) != 1:
        return None
    qn, knt = G.node(qn_name, "SimplifiedLayerNormalization"), _perm(G, knt_name, [0, 1, 3, 2])
    kn = G.node(knt.input[0], "SimplifiedLayerNormalization") if knt is not None else None
    if qn is None or kn is None:
        return None
    qt, kt = _perm(G, qn.input[0], [0, 2, 1, 3]), _perm(G, kn.input[0], [0, 2, 1, 3])
    av = G.only_user(soft.output[0], "MatMul")
    vt = _perm(G, av.input[1], [0, 2, 1, 3]) if av is not None and av.input[0] == soft.output[0] else None
    ot = G.only_user(av.output[0], "Transpose") if vt is not None else None
    out = G.only_user(ot.output[0], "Reshape") if ot is not None and list(_attr(ot, "perm", [])) == [0, 2, 1, 3] else None
    if qt is None or kt is None or out is None:
        return None
    qr, kr, vr = (G.node(n.input[0], "Reshape") for n in (qt, kt, vt))
    vb = G.node(vr.input[0], "Add") if vr is not None else None
    width = G.split_const(vb)[1] if vb is not None else None     # the value projection's bias: (D,)
    gain = G.const.get(qn.input[1])
    if qr is None or kr is None or width is None or gain is None or width.ndim != 1 or gain.ndim != 1:
        return None
    d, dh = width.shape[0], gain.shape[0]
    if d % dh or mask.ndim < 2 or mask.shape[-1] != mask.shape[-2] or not _causal(mask, mask.shape[-1]):
        return None
    return {"q4": qr.output[0], "k4": kr.output[0], "v3": vr.input[0], "gq": qn.input[1], "gk": kn.input[1],
            "eps_q": _attr(qn, "epsilon"), "eps_k": _attr(kn, "epsilon"), "heads": d // dh,
            "scale": float(np.ravel(s_q)[0]) * float(np.ravel(s_k)[0]), "out": out}


def fuse_attention(model) -> int:
    """Replace each causal attention with per-head Q/K norms by the norms on (B, T, H, Dh) and one
    com.microsoft.MultiHeadAttention (unidirectional); the dead nodes are removed."""
    from onnx import helper
    from onnx import numpy_helper
    G = _Graph(model.graph)
    new = {}
    merge = "mha_merge_heads"   # (B, T, H, Dh) -> (B, T, H*Dh), batch and tokens copied (allowzero 0)
    for soft in [n for n in model.graph.node if n.op_type == "Softmax"]:
        m = _attention_match(G, soft)
        if m is None:
            continue
        k = len(new)
        nodes = []
        for x, g, eps in (("q", m["gq"], m["eps_q"]), ("k", m["gk"], m["eps_k"])):
            nodes.append(helper.make_node("SimplifiedLayerNormalization", [m[f"{x}4"], g], [f"mha{k}_{x}n4"],
                                          name=f"mha{k}_{x}_norm", axis=-1, epsilon=float(eps), stash_type=1))
            nodes.append(helper.make_node("Reshape", [f"mha{k}_{x}n4", merge], [f"mha{k}_{x}n3"],
                                          name=f"mha{k}_{x}_merge"))
        nodes.append(helper.make_node("MultiHeadAttention", [f"mha{k}_qn3", f"mha{k}_kn3", m["v3"]], [m["out"].output[0]],
                                      name=f"mha{k}", domain="com.microsoft", num_heads=m["heads"],
                                      scale=m["scale"], unidirectional=1))
        new[id(m["out"])] = nodes
    if new:
        model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), merge))
    _splice(model, new, set())
    return len(new)


def prune(model) -> int:
    """Drop nodes and initializers no graph output depends on. Returns the nodes dropped."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    dropped = len(g.node) - len(keep)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return dropped


def _projection(G: _Graph, mm):
    """(weight name, bias name, Add node) of ``MatMul(x, W) + b`` with constant 2-D W and 1-D b, or None."""
    w = mm.input[1]
    if w not in G.const or G.const[w].ndim != 2 or mm.input[0] in G.const:
        return None
    add = G.only_user(mm.output[0], "Add")
    if add is None:
        return None
    other, bias = G.split_const(add)
    b = add.input[0] if add.input[1] == mm.output[0] else add.input[1]
    if other != mm.output[0] or bias is None or bias.shape != (G.const[w].shape[1],):
        return None
    return w, b, add


def fuse_projections(model, keep_apart: str = ".moe.expert") -> int:
    """Biased projections of one input (attention's Q, K and V) as one MatMul + Add + Split over the
    concatenated weights (one concatenation per set of weights, shared by every step). Weights whose
    name contains ``keep_apart`` (the experts) are not concatenated: that would copy them."""
    from onnx import helper, numpy_helper
    G = _Graph(model.graph)
    groups = defaultdict(list)
    for mm in model.graph.node:
        if mm.op_type == "MatMul":
            p = _projection(G, mm)
            if p is not None and keep_apart not in p[0]:
                groups[mm.input[0]].append((mm, *p))
    new, drop, made = {}, set(), {}
    for x, projs in groups.items():
        if len(projs) < 2:
            continue
        key = tuple(p[1] for p in projs) + tuple(p[2] for p in projs)
        if key not in made:
            k = len(made)
            w = np.concatenate([G.const[p[1]] for p in projs], axis=1)
            b = np.concatenate([G.const[p[2]] for p in projs])
            made[key] = (f"proj{k}_w", f"proj{k}_b")
            model.graph.initializer.extend([numpy_helper.from_array(w, made[key][0]),
                                            numpy_helper.from_array(b, made[key][1])])
        wn, bn = made[key]
        j = len(new)
        sizes = np.array([G.const[p[1]].shape[1] for p in projs], np.int64)
        model.graph.initializer.append(numpy_helper.from_array(sizes, f"proj_split{j}"))
        last = projs[-1][3]   # the Adds come after their MatMuls; the Split goes where the last Add was
        new[id(last)] = [helper.make_node("MatMul", [x, wn], [f"proj{j}_mm"], name=f"proj{j}_matmul"),
                         helper.make_node("Add", [f"proj{j}_mm", bn], [f"proj{j}_add"], name=f"proj{j}_bias"),
                         helper.make_node("Split", [f"proj{j}_add", f"proj_split{j}"], [p[3].output[0] for p in projs],
                                          name=f"proj{j}_split", axis=-1)]
        drop.update(id(n) for p in projs for n in (p[0], p[3]) if n is not last)
    _splice(model, new, drop)
    return len(new)


def _toposort(nodes: list) -> list:
    """Nodes in an order where every input is produced before it is read (stable otherwise)."""
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output}
    done, out, seen = set(), [], set()

    def visit(i):
        if i in done:
            return
        stack = [(i, False)]
        while stack:
            k, expanded = stack.pop()
            if k in done:
                continue
            if expanded:
                done.add(k)
                out.append(nodes[k])
                continue
            if k in seen:
                continue
            seen.add(k)
            stack.append((k, True))
            for name in reversed(nodes[k].input):
                p = produced_by.get(name)
                if p is not None and p not in done:
                    stack.append((p, False))
    for i in range(len(nodes)):
        visit(i)
    return out


def fuse_skip_norms(model) -> int:
    """A residual sum feeding an RMSNorm (``SimplifiedLayerNormalization(a + b)``) as one
    com.microsoft.SkipSimplifiedLayerNormalization, which also returns the sum where it is read
    elsewhere (the next residual)."""
    from onnx import helper
    G = _Graph(model.graph)
    new, drop = {}, set()
    for sln in model.graph.node:
        if sln.op_type != "SimplifiedLayerNormalization" or _attr(sln, "axis", -1) != -1:
            continue
        add = G.node(sln.input[0], "Add")
        if add is None or any(i in G.const for i in add.input) or id(add) in drop:
            continue
        others = [u for u in G.users[add.output[0]] if u is not sln]
        outs = [sln.output[0]] + (["", "", add.output[0]] if others else [])
        new[id(sln)] = [helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], sln.input[1]],
                                         outs, name=f"skip_rms_norm_{len(new)}", domain="com.microsoft",
                                         epsilon=float(_attr(sln, "epsilon")))]
        drop.add(id(add))
    _splice(model, new, drop)
    return len(new)


def ort_model(path: str | Path) -> tuple[bytes, dict]:
    """The exported chunk at ``path`` (model.onnx) folded and rewritten for onnxruntime: (serialized
    model, counts of the rewrites). The file itself is not changed."""
    model = fold(Path(path).read_bytes())
    before = len(model.graph.node)
    stats = {"nodes_folded": before, "rms_norms": fuse_rms_norms(model), "attentions": fuse_attention(model),
             "projections": fuse_projections(model), "skip_norms": fuse_skip_norms(model)}
    stats["nodes"] = len(model.graph.node)
    return model.SerializeToString(), stats


def sessions(model_path: str | Path, threads: list, device: str = "cpu", rewrite: bool = True,
             dtype: str = "fp32") -> tuple[list, dict]:
    """(one onnxruntime InferenceSession per entry of ``threads``, rewrite counts) for an exported chunk
    file, all over one rewritten model (``ort_model``) unless ``rewrite`` is False, the export is not
    fp32, or the rewrite fails (then the file as it is, the reason in the counts under "error").
    ``threads``: intra-op thread counts (None: onnxruntime's choice); ``device`` "cuda…" puts the CUDA
    provider first when it is installed."""
    stats: dict = {"rewritten": False}
    if rewrite and dtype != "fp32":
        stats["skipped"] = "fp16 export (onnxruntime inserts casts on the CPU; the patterns are fp32 only)"
    elif rewrite:
        try:
            data, counts = ort_model(model_path)
            return [_session(data, t, device, DISABLED) for t in threads], {"rewritten": True, **counts}
        except Exception as exc:  # noqa: BLE001 - any failure leaves the standard file, which is checked
            stats["error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    return [_session(str(model_path), t, device) for t in threads], stats


def session(model_path: str | Path, threads: int | None = None, device: str = "cpu", rewrite: bool = True,
            dtype: str = "fp32"):
    """(onnxruntime InferenceSession, rewrite counts): ``sessions`` with one thread count."""
    (sess,), stats = sessions(model_path, [threads], device, rewrite, dtype)
    return sess, stats


def _session(model, threads: int | None, device: str, disabled: list | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model, opts, providers=providers, disabled_optimizers=disabled)
