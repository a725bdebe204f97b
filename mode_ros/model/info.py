"""What ``mode-ros info`` shows: a policy's I/O contract (cameras, state, action, chunk, steps, and for a
checkpoint its goals, normalisation, control rate and training record) and parameter / FLOP accounting
following MODE_SPEC §7/§8 conventions. Nothing is loaded or initialised: the networks are built on the
meta device, the CLIP text tower only as a shape (so no "random weights" warning)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.normalization import load_checkpoint_normalization
from .checkpoint import GOALS_FILE, NORM_FILE, TRAINING_FILE, checkpoint_config, resolve_checkpoint
from .config import PolicyConfig
from .denoiser import MoDEDenoiser, count_matmul_flops
from .state_model import load_state_model

_FLOPS_SCOPE = ("per chunk = denoiser (cached routing) x sampling steps + one vision-encoder pass per camera; "
                "the CLIP text tower is not included (it runs once per new goal, cached goals skip it)")


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def denoiser_counts(net: MoDEDenoiser) -> dict:
    cfg = net.cfg
    total = _n(net)
    experts_total = sum(_n(b.moe) for b in net.blocks)
    per_expert = experts_total // (cfg.n_layers * cfg.num_experts)
    idle = cfg.n_layers * (cfg.num_experts - cfg.top_k) * per_expert
    routers = sum(_n(b.router) for b in net.blocks)
    unused = _n(net.gripper_embed)
    active = total - idle                              # "paper-style": all but the idle experts
    executed_uncached = active - unused                # what an uncached step reads
    executed_cached = executed_uncached - routers      # router not run (routing table)
    return {"total": total, "experts": experts_total, "per_expert": per_expert, "routers": routers,
            "attention": sum(_n(b.attn) for b in net.blocks), "unused_gripper_embed": unused,
            "active_with_router": active, "executed_uncached": executed_uncached,
            "executed_cached": executed_cached}


def vision_flops(encoder, image_size) -> int:
    """FLOPs (2 per multiply-add) of one camera image through a FiLM-ResNet, counted by torch's
    FlopCounterMode on the meta device (convolutions and linear layers; no memory, no weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = image_size
    encoder.eval()   # inference (BatchNorm with running statistics, as in a chunk call)
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        encoder(torch.empty(1, 3, h, w), torch.empty(1, 512))
    return int(counter.get_total_flops())


def policy_counts(cfg: PolicyConfig, include_text: bool = True) -> dict:
    """Build the model on the meta device (no memory, instant) and count."""
    from .encoders import build_vision_encoder

    with torch.device("meta"):
        net = MoDEDenoiser(cfg.model, cfg.action_dim, cfg.chunk_size, cfg.n_cameras, cfg.state_dim)
        enc = build_vision_encoder(cfg.vision.arch) if cfg.vision.arch != "none" else None
    out = {"transformer": denoiser_counts(net)}
    per_image = 0
    if enc is not None:
        film = sum(p.numel() for n, p in enc.named_parameters() if n.startswith("film"))
        out["vision_per_camera"] = {"total": _n(enc), "film_generators": film, "without_film": _n(enc) - film}
        out["vision_all_cameras"] = _n(enc) * cfg.n_cameras
        per_image = vision_flops(enc, cfg.vision.image_size)
    else:
        out["vision_per_camera"] = {"total": 0, "film_generators": 0, "without_film": 0}
        out["vision_all_cameras"] = 0
    if include_text:
        out["text_tower"] = text_tower_params(cfg.text.arch)
    flops_cached = count_matmul_flops(net, cached=True)
    out["flops_per_step"] = {
        "cached": flops_cached,
        "uncached_router_per_sample": count_matmul_flops(net, cached=False)["total"],
        "dense_all_experts": count_matmul_flops(net, cached=True, dense=True)["total"],
        "scope": "matmuls of one denoiser call (transformer only: no vision or text encoder)",
    }
    steps = cfg.diffusion.num_steps
    out["flops_per_chunk"] = {
        "denoiser": steps * flops_cached["total"], "steps": steps,
        "vision_encoders": per_image * cfg.n_cameras, "vision_per_image": per_image,
        "image_size": list(cfg.vision.image_size) if enc is not None else None,
        "total": steps * flops_cached["total"] + per_image * cfg.n_cameras,
        "includes_vision_encoders": True, "includes_text_tower": False, "scope": _FLOPS_SCOPE,
    }
    t = out["transformer"]
    out["bytes_per_step"] = {"bf16": 2 * t["executed_cached"], "fp32": 4 * t["executed_cached"]}
    out["tokens"] = net.n_tokens
    return out


def text_tower_params(arch: str) -> int | None:
    """Parameters of the CLIP text tower ``arch`` (None without open_clip or for an unknown name),
    built as a shape only: open_clip's model config, text tower alone, meta device."""
    try:
        import open_clip
        from open_clip.model import CLIPTextCfg, _build_text_tower
    except ImportError:
        return None
    if arch == "tiny":
        embed_dim, text_cfg = 512, CLIPTextCfg(width=64, heads=2, layers=1)
    else:
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            return None
        embed_dim, text_cfg = model_cfg["embed_dim"], CLIPTextCfg(**model_cfg["text_cfg"])
    with torch.device("meta"):
        return _n(_build_text_tower(embed_dim, text_cfg))


# ---- the I/O contract ------------------------------------------------------------------------------
def describe(cfg: PolicyConfig, checkpoint: str | Path | None = None) -> dict:
    """What a user inspects before running a policy: cameras and image size, state, action (size,
    names, bounds, gripper dims), chunk and sampling steps; for a checkpoint also the known goals,
    the normalisation, the control rate and the training steps (None where it does not record them)."""
    d = {"cameras": {"names": list(cfg.camera_names), "encoder": cfg.vision.arch,
                     "image_size": list(cfg.vision.image_size) if cfg.camera_names else None},
         "state": {"dim": cfg.state_dim, "names": list(cfg.state_names)},
         "action": {"dim": cfg.action_dim, "names": list(cfg.action_names), "gripper_dims": list(cfg.gripper_dims),
                    "bounds": None},
         "chunk_size": cfg.chunk_size,
         "sampling": {"steps": cfg.diffusion.num_steps, "sampler": cfg.diffusion.sampler,
                      "schedule": cfg.diffusion.schedule},
         "text_encoder": {"arch": cfg.text.arch, "weights": cfg.text.weights,
                          "random_init_seed": cfg.text.random_init_seed}}
    if checkpoint is None:
        return d
    path = resolve_checkpoint(checkpoint)
    norm = load_checkpoint_normalization(path / NORM_FILE, cfg.action_dim, cfg.state_dim)   # as loading does
    d["checkpoint"] = str(path)
    d["normalization"] = {k: _norm_entry(norm[k]) for k in ("action", "state") if norm[k]}
    d["action"]["bounds"] = _bounds(norm["action"])
    d["goals"] = _known_goals(path / GOALS_FILE)
    training = _training_record(path)
    d["control_rate_hz"] = training.get("control_rate_hz")
    d["training"] = training
    d["state_model"] = _state_model(path, cfg) if cfg.state_dim else None
    return d


def _state_model(path: Path, cfg: PolicyConfig) -> dict | None:
    """What the checkpoint's state_model.json predicts (the node's predict_state), None without one."""
    m = load_state_model(path, cfg.state_dim, cfg.action_dim)
    return None if m is None else {"predicted": int(m.predicted.sum()), "of": m.state_dim,
                                   "transitions": m.report.get("transitions"), "horizon": m.report.get("horizon")}


def checkpoint_info(spec: str | Path, include_text: bool = True) -> dict:
    """``describe`` + ``policy_counts`` of the checkpoint ``spec`` names (a folder or 'bundled')."""
    cfg = checkpoint_config(spec)
    return {**describe(cfg, spec), "counts": policy_counts(cfg, include_text)}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _norm_entry(e: dict) -> dict:
    data = e.get("data") or {}
    return {"mode": data.get("mode", "affine"), "offset": e.get("offset"), "scale": e.get("scale"),
            "constant_dims": [i for i, c in enumerate(e.get("constant") or []) if c]}


def _bounds(e: dict) -> dict:
    """Per-dimension action range: the training data's min/max when recorded, else offset ± scale."""
    stats = (e.get("data") or {}).get("stats") or {}
    if "min" in stats and "max" in stats:
        return {"low": stats["min"], "high": stats["max"], "source": "training data min/max"}
    lo = [o - s for o, s in zip(e["offset"], e["scale"])]
    hi = [o + s for o, s in zip(e["offset"], e["scale"])]
    return {"low": lo, "high": hi, "source": "normalisation offset +- scale"}


def _known_goals(path: Path) -> list:
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:   # the header only
        return list(json.loads((f.metadata() or {}).get("goals", "[]")))


def _training_record(path: Path) -> dict:
    """The checkpoint's training.json, else the steps of the run summary beside a training's OUT/export."""
    rec = _read_json(path / TRAINING_FILE)
    if rec:
        return {**rec, "source": str(path / TRAINING_FILE)}
    summary = path.parent / "train_summary.json"   # a training run's OUT/export
    if path.name == "export" and summary.is_file():
        s = _read_json(summary)
        return {"steps": s.get("steps"), "final_loss": s.get("final_loss"), "source": str(summary)}
    return {}


# ---- tables ----------------------------------------------------------------------------------------
def _names(names: list, dim: int) -> str:
    if not names:
        return f"{dim} values (names not recorded)"
    shown = ", ".join(str(n) for n in names[:12]) + (", …" if len(names) > 12 else "")
    return f"{dim} values: {shown}"


def _num(v: float) -> str:
    return f"{v:.4g}"


def format_contract(d: dict) -> str:
    """The I/O contract of ``describe`` as a plain two-column table."""
    cams, act = d["cameras"], d["action"]
    rows = []
    if "checkpoint" in d:
        rows.append(("checkpoint", d["checkpoint"]))
    if cams["names"]:
        h, w = cams["image_size"]
        rows.append(("cameras", f"{', '.join(cams['names'])} ({cams['encoder']}, images resized to {h}x{w} px "
                                f"(HxW), one encoder per camera)"))
    else:
        rows.append(("cameras", "none (state + language policy)"))
    rows.append(("state", _names(d["state"]["names"], d["state"]["dim"]) if d["state"]["dim"] else "none"))
    rows.append(("action", _names(act["names"], act["dim"])))
    if act["bounds"]:
        b = act["bounds"]
        names = act["names"] or [str(i) for i in range(act["dim"])]
        rows.append(("  bounds", "; ".join(f"{n} [{_num(lo)}, {_num(hi)}]" for n, lo, hi in
                                           zip(names, b["low"], b["high"])) + f" ({b['source']})"))
    rows.append(("  gripper dims", ", ".join(map(str, act["gripper_dims"])) + " (binarised by sign)"
                 if act["gripper_dims"] else "none"))
    s = d["sampling"]
    rows.append(("chunk", f"{d['chunk_size']} actions per inference"))
    rows.append(("sampling steps", f"{s['steps']} ({s['sampler']}, {s['schedule']} noise schedule)"))
    if "checkpoint" in d:
        rate = d.get("control_rate_hz")
        rows.append(("control rate", f"{_num(rate)} Hz (of the training data)" if rate else
                     "not recorded (set the node's control_rate_hz to the training data's rate)"))
        rows.append(("known goals", _goals(d)))
        for key, n in d["normalization"].items():
            extra = f", constant dims {n['constant_dims']}" if n["constant_dims"] else ""
            rows.append((f"normalisation {key}", f"{n['mode']} (offset/scale per dim{extra})"))
        if d["state"]["dim"]:
            m = d.get("state_model")
            rows.append(("state model", f"{m['predicted']} of {m['of']} state values predicted over the inference "
                                        f"delay (predict_state; fitted on {m['transitions']} transitions)" if m else
                         "none (predict_state has no effect; `mode-ros fit-state-model` fits one)"))
        t = d["training"]
        rows.append(("training steps", f"{t['steps']} ({t['source']})" if t.get("steps") is not None
                     else "not recorded"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {a:<{w}}  {b}" for a, b in rows)


def _goals(d: dict) -> str:
    goals, te = d["goals"], d["text_encoder"]
    if te["weights"]:
        other = f"other goals: embedded by CLIP {te['arch']} ({te['weights']})"
    elif te["random_init_seed"] is not None:
        other = f"other goals: embedded by a randomly initialised {te['arch']} text tower (demo/test only)"
    else:
        other = "other goals are refused (no CLIP text weights)"
    if not goals:
        return f"none cached; {other}"
    shown = "; ".join(repr(g) for g in goals[:10]) + (f"; … ({len(goals)} in all)" if len(goals) > 10 else "")
    return f"{len(goals)}: {shown}. {other}"


def format_table(name: str, c: dict) -> str:
    t = c["transformer"]
    M = lambda v: f"{v / 1e6:10.3f} M" if v is not None else "         n/a"  # noqa: E731
    G = lambda v: f"{v / 1e9:10.3f} GF"  # noqa: E731
    fc = c["flops_per_chunk"]
    rows = [
        ("transformer total", M(t["total"])),
        ("  experts (all)", M(t["experts"])),
        ("  routers", M(t["routers"])),
        ("  attention", M(t["attention"])),
        ("  unused gripper_embed", M(t["unused_gripper_embed"])),
        ("transformer active (with router)", M(t["active_with_router"])),
        ("executed per step, uncached", M(t["executed_uncached"])),
        ("executed per step, cached", M(t["executed_cached"])),
        ("vision encoder per camera", M(c["vision_per_camera"]["total"])),
        ("  FiLM generators", M(c["vision_per_camera"]["film_generators"])),
        ("vision encoders, all cameras", M(c["vision_all_cameras"])),
        ("CLIP text tower (frozen)", M(c.get("text_tower"))),
        ("transformer matmul FLOPs / step, cached", G(c["flops_per_step"]["cached"]["total"])),
        ("transformer matmul FLOPs / step, uncached", G(c["flops_per_step"]["uncached_router_per_sample"])),
        ("transformer matmul FLOPs / step, dense", G(c["flops_per_step"]["dense_all_experts"])),
        (f"FLOPs / chunk: transformer x {fc['steps']} steps", G(fc["denoiser"])),
        ("FLOPs / chunk: vision encoders", G(fc["vision_encoders"])),
        ("FLOPs / chunk: total (no text tower)", G(fc["total"])),
        ("weight bytes / step, cached bf16", f"{c['bytes_per_step']['bf16'] / 1e6:10.1f} MB"),
    ]
    w = max(len(r[0]) for r in rows)
    return "\n".join([f"{name}  (tokens per step: {c['tokens']})"] + [f"  {a:<{w}}  {b}" for a, b in rows]
                     + [f"  (FLOPs: 2 per multiply-add; {_FLOPS_SCOPE})"])
