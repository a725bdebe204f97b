"""Optimizer groups, the tri-stage LR schedule and EMA (MODE_SPEC §6)."""
from __future__ import annotations

import math

import torch


def param_groups(policy, weight_decay: float) -> list[dict]:
    """Reference grouping: parameters whose name contains "bias" get no decay; everything else
    (norm gains, pos_emb and both ResNets including BatchNorm) decays. Frozen params are skipped."""
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def tri_stage_lr(step: int, total: int, warmup_frac: float, hold_frac: float, init_scale: float,
                 final_scale: float) -> float:
    """Multiplier of the base LR: linear warm-up from init_scale, hold at 1, cosine to final_scale."""
    warm = int(round(total * warmup_frac))
    hold = int(round(total * hold_frac))
    decay = max(1, total - warm - hold)
    if step < warm:
        return init_scale + (1 - init_scale) * step / max(1, warm)
    if step < warm + hold:
        return 1.0
    t = min(1.0, (step - warm - hold) / decay)
    return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of the whole state_dict (floating tensors; buffers included)."""

    def __init__(self, model: torch.nn.Module, mode: str = "warmup", decay: float = 0.999, max_decay: float = 0.9999):
        self.mode, self.fixed, self.max_decay = mode, decay, max_decay
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}
        self.updates = 0

    def decay(self) -> float:
        if self.mode == "fixed":
            return self.fixed
        return min(max(1.0 - (1.0 + self.updates) ** (-2.0 / 3.0), 0.0), self.max_decay)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.decay()
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                s.copy_(v)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, d: dict) -> None:
        # keep each shadow tensor on the device it lives on (a resume loads the state on the CPU)
        self.shadow = {k: v.to(self.shadow[k].device, copy=True) if k in self.shadow else v.clone()
                       for k, v in d["shadow"].items()}
        self.updates = int(d["updates"])

    def copy_to(self, model: torch.nn.Module) -> None:
        sd = model.state_dict()
        model.load_state_dict({k: self.shadow[k].to(sd[k].dtype) for k in sd})
