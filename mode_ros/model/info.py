"""Parameter and FLOP accounting (``mode-ros info``), following MODE_SPEC §7/§8 conventions."""
from __future__ import annotations

import torch

from .config import PolicyConfig
from .denoiser import MoDEDenoiser, count_matmul_flops


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


def policy_counts(cfg: PolicyConfig, include_text: bool = True) -> dict:
    """Build the model on the meta device (no memory, instant) and count."""
    from .encoders import build_vision_encoder

    with torch.device("meta"):
        net = MoDEDenoiser(cfg.model, cfg.action_dim, cfg.chunk_size, cfg.n_cameras, cfg.state_dim)
        enc = build_vision_encoder(cfg.vision.arch) if cfg.vision.arch != "none" else None
    out = {"transformer": denoiser_counts(net)}
    if enc is not None:
        film = sum(p.numel() for n, p in enc.named_parameters() if n.startswith("film"))
        out["vision_per_camera"] = {"total": _n(enc), "film_generators": film, "without_film": _n(enc) - film}
        out["vision_all_cameras"] = _n(enc) * cfg.n_cameras
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
    }
    t = out["transformer"]
    out["bytes_per_step"] = {"bf16": 2 * t["executed_cached"], "fp32": 4 * t["executed_cached"]}
    out["tokens"] = net.n_tokens
    return out


def text_tower_params(arch: str) -> int | None:
    try:
        import open_clip
        from open_clip.model import CLIPTextCfg, _build_text_tower
    except ImportError:
        return None
    with torch.device("meta"):
        if arch == "tiny":
            m = _build_text_tower(512, CLIPTextCfg(width=64, heads=2, layers=1))
            return _n(m)
        clip = open_clip.create_model(arch, pretrained=None, load_weights=False, device="meta")
    names = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    return sum(p.numel() for n, p in clip.named_parameters() if n.startswith(names))


def format_table(name: str, c: dict) -> str:
    t = c["transformer"]
    M = lambda v: f"{v / 1e6:10.3f} M" if v is not None else "         n/a"  # noqa: E731
    G = lambda v: f"{v / 1e9:10.3f} GF"  # noqa: E731
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
        ("matmul FLOPs / step, cached", G(c["flops_per_step"]["cached"]["total"])),
        ("matmul FLOPs / step, uncached", G(c["flops_per_step"]["uncached_router_per_sample"])),
        ("matmul FLOPs / step, dense (all experts)", G(c["flops_per_step"]["dense_all_experts"])),
        ("weight bytes / step, cached bf16", f"{c['bytes_per_step']['bf16'] / 1e6:10.1f} MB"),
    ]
    w = max(len(r[0]) for r in rows)
    return "\n".join([f"{name}  (tokens per step: {c['tokens']})"] + [f"  {a:<{w}}  {b}" for a, b in rows])
