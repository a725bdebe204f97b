"""Import (and export) of checkpoints in the authors' layout (MODE_SPEC appendix A), and the
fixture check behind ``mode-ros check-reference``.

Accepted key prefixes for the denoiser: none (bare ``MoDeDiT``), ``inner_model.`` (``GCDenoiser``),
``model.inner_model.`` (agent / Lightning / ``model_cleaned.safetensors``). Agent-level files may
also hold ``static_resnet.*`` / ``gripper_resnet.*`` (camera encoders in camera order) and
``language_goal.*`` (CLIP, not imported: the text tower is configured separately).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import DenoiserConfig

_DENOISER_PREFIXES = ("model.inner_model.", "inner_model.", "")
_EXPERT_RE = re.compile(r"^blocks\.(\d+)\.experts\.expert_(\d+)\.mlp\.(0\.project\.weight|0\.project\.bias|2\.weight)$")
_RENAMES = [
    (re.compile(r"^blocks\.(\d+)\.router\.router\.mlp\.0\.(weight|bias)$"), r"blocks.\1.router.fc1.\2"),
    (re.compile(r"^blocks\.(\d+)\.router\.router\.mlp\.3\.(weight|bias)$"), r"blocks.\1.router.fc2.\2"),
]
_EXPERT_TARGET = {"0.project.weight": "w1", "0.project.bias": "b1", "2.weight": "w2"}


def split_agent_state_dict(sd: dict) -> dict[str, dict]:
    """Group an agent-level state dict by component: denoiser, static_resnet, gripper_resnet, other."""
    groups: dict[str, dict] = {"denoiser": {}, "static_resnet": {}, "gripper_resnet": {}, "other": {}}
    for k, v in sd.items():
        if k.startswith("model.inner_model."):
            groups["denoiser"][k[len("model.inner_model."):]] = v
        elif k.startswith("inner_model."):
            groups["denoiser"][k[len("inner_model."):]] = v
        elif k.startswith("static_resnet."):
            groups["static_resnet"][k[len("static_resnet."):]] = v
        elif k.startswith("gripper_resnet."):
            groups["gripper_resnet"][k[len("gripper_resnet."):]] = v
        elif k.startswith(("pos_emb", "sigma_", "blocks.", "tok_emb", "goal_emb", "action_emb", "gripper_embed", "ln.", "out.")):
            groups["denoiser"][k] = v
        else:
            groups["other"][k] = v
    return groups


def convert_denoiser_state_dict(ref_sd: dict) -> dict:
    """Reference MoDeDiT keys (prefix already stripped) -> this package's MoDEDenoiser keys."""
    out, experts = {}, {}
    for k, v in ref_sd.items():
        m = _EXPERT_RE.match(k)
        if m:
            layer, e, part = int(m.group(1)), int(m.group(2)), _EXPERT_TARGET[m.group(3)]
            experts.setdefault((layer, part), {})[e] = v
            continue
        for pat, rep in _RENAMES:
            if pat.match(k):
                k = pat.sub(rep, k)
                break
        out[k] = v
    for (layer, part), per_e in experts.items():
        n = max(per_e) + 1
        missing = [e for e in range(n) if e not in per_e]
        if missing:
            raise KeyError(f"reference checkpoint: block {layer} lacks experts {missing} for {part}")
        out[f"blocks.{layer}.moe.{part}"] = torch.stack([per_e[e] for e in range(n)])
    return out


def export_denoiser_state_dict(sd: dict, prefix: str = "inner_model.") -> dict:
    """This package's MoDEDenoiser keys -> reference keys (inverse of convert_denoiser_state_dict)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.moe\.(w1|b1|w2)$", k)
        if m:
            layer, part = m.group(1), m.group(2)
            name = {"w1": "0.project.weight", "b1": "0.project.bias", "w2": "2.weight"}[part]
            for e in range(v.shape[0]):
                out[f"{prefix}blocks.{layer}.experts.expert_{e}.mlp.{name}"] = v[e]
            continue
        k2 = re.sub(r"^blocks\.(\d+)\.router\.fc1\.", r"blocks.\1.router.router.mlp.0.", k)
        k2 = re.sub(r"^blocks\.(\d+)\.router\.fc2\.", r"blocks.\1.router.router.mlp.3.", k2)
        out[prefix + k2] = v
    return out


def denoiser_config_from_reference(cfg: dict) -> tuple[DenoiserConfig, dict]:
    """Map a reference ``MoDeDiT`` constructor config to ours. Returns (config, io) where io has
    action_dim, chunk_size, state_dim. Refuses variants this package does not implement."""
    inner = cfg.get("inner_model", cfg)
    unsupported = []
    if inner.get("use_shared_expert"):
        unsupported.append("use_shared_expert=True (spec §2.4: caching breaks in the reference)")
    if not inner.get("cond_router", True):
        unsupported.append("cond_router=False")
    if inner.get("use_goal_in_routing"):
        unsupported.append("use_goal_in_routing=True")
    if not inner.get("router_normalize", True):
        unsupported.append("router_normalize=False")
    if not inner.get("use_noise_token_as_input", True):
        unsupported.append("use_noise_token_as_input=False")
    if inner.get("use_custom_attn_mask"):
        unsupported.append("use_custom_attn_mask=True")
    if not inner.get("linear_output", True):
        unsupported.append("linear_output=False")
    if unsupported:
        raise ValueError("reference config uses variants not supported: " + "; ".join(unsupported))
    dc = DenoiserConfig(
        embed_dim=int(inner["embed_dim"]), n_layers=int(inner["n_layers"]), n_heads=int(inner["n_heads"]),
        num_experts=int(inner.get("num_experts", 4)), top_k=int(inner.get("top_k", 2)),
        obs_dim=int(inner.get("obs_dim", 512)), goal_dim=int(inner.get("goal_dim", 512)),
        goal_seq_len=int(inner.get("goal_seq_len", 1)), obs_seq_len=int(inner.get("obs_seq_len", 1)),
        attn_pdrop=float(inner.get("attn_pdrop", 0.3)), mlp_pdrop=float(inner.get("mlp_pdrop", 0.1)),
        goal_drop=float(inner.get("goal_drop", 0.1)), keep_gripper_embed=True)
    io = {"action_dim": int(inner.get("action_dim", 7)), "chunk_size": int(inner.get("action_seq_len", 10)),
          "state_dim": 0}
    return dc, io


def load_fixture(fixture_dir: str | Path):
    """Load a fixture folder (config.json, weights.safetensors, cases.safetensors)."""
    from safetensors.torch import load_file

    d = Path(fixture_dir)
    for name in ("config.json", "weights.safetensors", "cases.safetensors"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"fixture folder {d} lacks {name}")
    cfg = json.loads((d / "config.json").read_text())
    return cfg, load_file(str(d / "weights.safetensors")), load_file(str(d / "cases.safetensors"))


def check_reference(fixture_dir: str | Path, tol: float = 1e-5, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[bool, list[dict]]:
    """Run every case of a fixture through this package's model. Returns (ok, rows)."""
    from .denoiser import EDMPrecond, MoDEDenoiser
    from .expert_cache import CachedSampler
    from .sampling import make_schedule, sample_ddim
    from .config import DiffusionConfig

    cfg, weights, cases = load_fixture(fixture_dir)
    dc, io = denoiser_config_from_reference(cfg)
    n_cams = int(cases["denoise.images"].shape[1]) if "denoise.images" in cases else 2
    net = MoDEDenoiser(dc, io["action_dim"], io["chunk_size"], n_cams).to(device, dtype).eval()
    sd = convert_denoiser_state_dict(split_agent_state_dict(weights)["denoiser"])
    net.load_state_dict(sd, strict=True)   # strict: a missing or unexpected key raises
    pre = EDMPrecond(float(cfg.get("sigma_data", 0.5)))
    dif = DiffusionConfig(sigma_data=float(cfg.get("sigma_data", 0.5)), sigma_min=float(cfg["sigma_min"]),
                          sigma_max=float(cfg["sigma_max"]), num_steps=int(cfg["num_sampling_steps"]),
                          schedule=str(cfg.get("noise_scheduler", "exponential")))
    c = {k: v.to(device) for k, v in cases.items()}
    cast = lambda t: t.to(dtype)  # noqa: E731
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        sig = cast(c["denoise.sigma"])
        cs, co, ci = pre.scalings(sig)
        got["denoise.c_skip"], got["denoise.c_out"], got["denoise.c_in"] = cs, co, ci
        got["denoise.noise_emb"] = net.noise_embedding(sig)
        x = cast(c["denoise.x"])
        got["denoise.F_input"] = x * ci.view(-1, 1, 1)
        imgs, goal = cast(c["denoise.images"]), cast(c["denoise.goal"])
        got["denoise.F"] = net(got["denoise.F_input"], sig, goal, imgs)
        got["denoise.D"] = pre.denoise(net, x, sig, goal, imgs)
        idx, gates, _ = net.routing(sig)
        got["denoise.routing_indices"], got["denoise.routing_gates"] = idx, gates
        sigmas = make_schedule(dif, dtype=dtype).to(device)
        got["sample.sigmas"] = sigmas
        s_imgs, s_goal, x_T = cast(c["sample.images"]), cast(c["sample.goal"]), cast(c["sample.x_T"])
        fn = lambda xx, s: pre.denoise(net, xx, s, s_goal, s_imgs)  # noqa: E731
        a, xs, ds = sample_ddim(fn, x_T, sigmas, return_trajectory=True)
        got["sample.actions"], got["sample.x_steps"], got["sample.denoised"] = a, xs, ds
        idx, gates, probs = net.routing(sigmas[:-1])
        got["routing.sigmas"] = sigmas[:-1]
        got["routing.noise_emb"] = net.noise_embedding(sigmas[:-1])[:, 0]
        got["routing.indices"], got["routing.gates"], got["routing.probs"] = idx, gates, probs
        sampler = CachedSampler(net, pre, sigmas)
        got["cached.actions"] = sampler.sample(x_T, s_goal, s_imgs)
    rows, ok = [], True
    for key in sorted(cases):
        exp = cases[key]
        if key not in got:
            if key in ("denoise.images", "denoise.goal", "denoise.x", "denoise.sigma", "sample.images",
                       "sample.goal", "sample.x_T"):
                continue
            rows.append({"key": key, "max_abs_diff": None, "ok": False, "note": "not computed"})
            ok = False
            continue
        g = got[key].detach().to("cpu")
        if exp.dtype == torch.int64:
            same = torch.equal(g.sort(-1).values, exp.sort(-1).values)
            rows.append({"key": key, "max_abs_diff": 0.0 if same else float("inf"), "ok": same, "note": "indices (as sets)"})
            ok &= same
            continue
        g = g.reshape(exp.shape).to(torch.float64)
        diff = (g - exp.to(torch.float64)).abs().max().item()
        # gates in the fixture are in topk order; compare as sets by sorting along with indices
        passed = diff <= tol + tol * exp.abs().max().item() if key == "sample.x_steps" else diff <= tol
        rows.append({"key": key, "max_abs_diff": diff, "ok": bool(passed), "note": ""})
        ok &= bool(passed)
    return ok, rows


def read_state_dict(path) -> dict:
    """A state dict from .safetensors, or a torch/Lightning checkpoint (``state_dict`` inside)."""
    from pathlib import Path as _P

    p = _P(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    sd = torch.load(str(p), map_location="cpu", weights_only=False)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def load_reference_into(policy, path) -> dict:
    """Load an authors'-layout checkpoint into a ``MoDEPolicy``: the denoiser (strictly by shape) and,
    when present, ``static_resnet.*`` / ``gripper_resnet.*`` into the first two cameras' encoders.
    Returns a report of what was loaded, missing and skipped."""
    groups = split_agent_state_dict(read_state_dict(path))
    den = convert_denoiser_state_dict(groups["denoiser"])
    own = policy.denoiser.state_dict()
    shaped = {k: v for k, v in den.items() if k in own and own[k].shape == v.shape}
    report = {"denoiser_loaded": len(shaped), "denoiser_skipped": sorted(set(den) - set(shaped)),
              "denoiser_missing": sorted(set(own) - set(shaped)), "encoders": {}, "ignored": len(groups["other"])}
    policy.denoiser.load_state_dict(shaped, strict=False)
    for cam, key in zip(policy.config.camera_names, ("static_resnet", "gripper_resnet")):
        if groups[key]:
            m, u = policy.encoders[cam].load_state_dict(groups[key], strict=False)
            report["encoders"][cam] = {"from": key, "missing": len(m), "unexpected": len(u)}
    return report
