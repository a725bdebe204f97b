"""Training configuration (YAML), typed and validated like the policy config."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..model.config import ConfigError, PolicyConfig, build_config, preset


@dataclass
class DataConfig:
    paths: list = field(default_factory=list)       # episode HDF5 files (mode-ros convert output)
    cameras: list | None = None                     # camera names in model order (default: the file's)
    state_keys: list = field(default_factory=list)  # obs keys concatenated into the state token
    normalization: str = "minmax"                   # minmax | quantile
    num_workers: int = 0


@dataclass
class OptimConfig:
    steps: int = 20000
    batch_size: int = 64           # global batch (split over DDP ranks)
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_frac: float = 0.02      # tri-stage: warm-up (from init_lr_scale·lr), hold, cosine decay
    hold_frac: float = 0.08
    init_lr_scale: float = 0.1
    final_lr_scale: float = 1e-6
    grad_clip: float | None = None
    load_balance_weight: float = 0.01   # 0.01 from scratch, 0 when finetuning with frozen routers
    router_z_weight: float = 0.0
    ema: str = "warmup"            # warmup: 1-(1+n)^(-2/3) capped at ema_max | fixed | none
    ema_decay: float = 0.999
    ema_max: float = 0.9999
    bf16: bool = True              # autocast on CUDA
    freeze_router: bool = False
    # the reference trains on the repeated last action past an episode's end like on any other step;
    # true excludes those padded steps from the loss instead
    mask_padding: bool = False    # the reference freezes routers when finetuning from pretrained


@dataclass
class TrainConfig:
    out_dir: str = "runs/mode"
    seed: int = 0
    preset: str = "small"
    policy: dict = field(default_factory=dict)      # overrides merged into the preset (nested)
    init_from: str | None = None   # mode_ros checkpoint dir, or an authors'-layout .ckpt/.safetensors
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 10
    ckpt_every: int = 1000
    device: str = "auto"

    def policy_config(self) -> PolicyConfig:
        base = preset(self.preset).to_dict()
        _merge(base, self.policy, "policy")
        return PolicyConfig.from_dict(base)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = build_config(cls, d or {}, "")
        if cfg.optim.steps < 1 or cfg.optim.batch_size < 1:
            raise ConfigError("optim.steps and optim.batch_size must be >= 1")
        if cfg.optim.ema not in ("warmup", "fixed", "none"):
            raise ConfigError(f"optim.ema must be warmup, fixed or none, got {cfg.optim.ema!r}")
        if cfg.data.normalization not in ("minmax", "quantile"):
            raise ConfigError("data.normalization must be minmax or quantile")
        if not cfg.data.paths:
            raise ConfigError("data.paths is empty: list the episode files to train on")
        cfg.policy_config()  # validate the policy part early
        return cfg


def _merge(base: dict, over: dict, where: str) -> None:
    for k, v in (over or {}).items():
        if k not in base:
            raise ConfigError(f"unknown config key: {where}.{k}")
        if isinstance(v, dict) and isinstance(base[k], dict):
            _merge(base[k], v, f"{where}.{k}")
        else:
            base[k] = v
