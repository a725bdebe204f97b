"""``mode-ros export onnx CKPT --out DIR``: one ONNX model per action chunk (mode_ros.export.onnx).

Imported when the parser is built: nothing heavy at module level.
"""
from __future__ import annotations

import json


def register_export(sub) -> None:
    p = sub.add_parser(
        "onnx", help="export a checkpoint's whole action chunk as one ONNX model (onnxruntime / TensorRT)",
        description="Export one action chunk (image encoders, state/goal tokens, the N cached denoising "
                    "steps with their experts baked in, DDIM updates, de-normalisation) as DIR/model.onnx "
                    "plus DIR/export.json. Inputs: images (uint8, if the checkpoint has cameras), goal "
                    "embedding, state (robot units, if any), initial noise, and the previous plan with its "
                    "soft mask for real-time chunking by replacement; output: actions in robot units. "
                    "The export is checked with the ONNX checker and against the PyTorch cached sampler "
                    "with onnxruntime (exit 1 when they differ by more than the tolerance).")
    p.add_argument("checkpoint", help="mode_ros checkpoint folder, or 'bundled'")
    p.add_argument("--out", required=True, help="output directory (model.onnx, export.json)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps baked into the graph (default: the checkpoint's)")
    p.add_argument("--batch", type=int, default=1, help="batch size fixed in the graph (and of the verification)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="make the batch a dynamic axis (onnxruntime then takes ~10x longer to load the model)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="denoiser weights and compute (encoders stay fp32, as in PyTorch)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--no-prefix", dest="prefix", action="store_false",
                   help="leave out the real-time chunking inputs (prefix_normalized, prefix_weights: "
                        "execution_strategy rtc_replace runs in the graph; all-zero weights give the plain chunk)")
    p.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(a) -> int:
    from pathlib import Path

    from ..model.checkpoint import resolve_checkpoint
    from ..model.policy import MoDEPolicy
    from .onnx import OPSET, TOLERANCE, OnnxExportError, export_onnx

    try:
        checkpoint = resolve_checkpoint(a.checkpoint)   # a folder or 'bundled' (CheckpointError: a ValueError)
        policy = MoDEPolicy.from_pretrained(checkpoint)
        meta = export_onnx(policy, a.out, steps=a.steps, batch=a.batch, dtype=a.dtype, checkpoint=checkpoint,
                           opset=a.opset or OPSET, dynamic_batch=a.dynamic_batch, prefix=a.prefix)
    except (OnnxExportError, ValueError, FileNotFoundError) as exc:
        print(f"export onnx: {exc}")
        return 2
    v = meta["verify"]
    per_layer = {}
    for key, n in meta["graph"]["expert_matmuls"].get("w1", {}).items():
        layer = key.rsplit(".", 1)[0]
        per_layer[layer] = per_layer.get(layer, 0) + n
    print(json.dumps({"out": str(Path(a.out) / "model.onnx"), "steps": meta["steps"], "dtype": meta["dtype"],
                      "file_MB": round(meta["file_bytes"] / 1e6, 2), "export_s": round(meta["export_seconds"], 1),
                      "topk_nodes": meta["graph"]["topk"], "expert_up_projections_per_layer": per_layer,
                      "max_abs_diff_normalized": v["max_abs_diff_normalized"],
                      "max_abs_diff_normalized_rewritten": v["max_abs_diff_normalized_rewritten"],
                      "onnxruntime_rewrites": v["rewrites"]}, indent=1))
    tol = TOLERANCE[a.dtype]
    worst = max(v["max_abs_diff_normalized"], v["max_abs_diff_normalized_rewritten"])
    if not worst <= tol:   # NaN fails too
        print(f"export onnx: onnxruntime differs from PyTorch by {worst:.3g} (> {tol:g})")
        return 1
    return 0
