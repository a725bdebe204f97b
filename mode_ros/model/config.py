"""Typed, validated configuration of a MoDE policy (denoiser, encoders, diffusion, I/O layout).

Every section is a dataclass. ``PolicyConfig.from_dict`` refuses unknown keys and wrong types with a
message naming the full key path (``model.n_layers: expected int, got str``), so a typo in a YAML file
is a one-line error, not a traceback from deep inside the model.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or inconsistent."""


@dataclass
class DenoiserConfig:
    """The MoDE transformer (reference class ``MoDeDiT``). Defaults = the paper's 8-layer CALVIN model."""

    embed_dim: int = 1024
    n_layers: int = 8
    n_heads: int = 8
    num_experts: int = 4
    top_k: int = 2
    mlp_ratio: int = 4              # SwiGLU hidden width = mlp_ratio * embed_dim (reference: 4)
    obs_dim: int = 512              # width of one camera token (512 FiLM-ResNet-18, 2048 FiLM-ResNet-50)
    goal_dim: int = 512             # CLIP ViT-B/32 text embedding width
    goal_seq_len: int = 1
    obs_seq_len: int = 1
    attn_pdrop: float = 0.3
    mlp_pdrop: float = 0.1
    goal_drop: float = 0.1          # elementwise Bernoulli mask on the goal vector, training only, no rescale
    router_temperature: float = 1.0
    # "reference": x_out = LN2(h) + MoE(LN2(h)) (needed for released checkpoints);
    # "prenorm":   x_out = h + MoE(LN2(h)) (the usual pre-norm block; an explicit deviation)
    residual: str = "reference"
    keep_gripper_embed: bool = True  # unused reference weight, kept so reference state_dicts load strictly
    norm_eps: float = 1e-6

    def validate(self, where: str = "model") -> None:
        if self.embed_dim % self.n_heads:
            raise ConfigError(f"{where}.embed_dim ({self.embed_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{where}.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.residual not in ("reference", "prenorm"):
            raise ConfigError(f"{where}.residual must be 'reference' or 'prenorm', got {self.residual!r}")
        for name in ("attn_pdrop", "mlp_pdrop", "goal_drop"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{where}.{name} must be in [0, 1), got {v}")
        if self.n_layers < 1 or self.embed_dim < 1 or self.num_experts < 1:
            raise ConfigError(f"{where}: n_layers, embed_dim and num_experts must be positive")


@dataclass
class VisionConfig:
    """One FiLM-ResNet per camera, conditioned on the goal embedding."""

    arch: str = "film_resnet18"     # film_resnet18 | film_resnet50 | none (state-only policies)
    image_size: list = field(default_factory=lambda: [224, 224])  # [H, W] the encoder sees
    weights: str | None = None      # optional local file with backbone weights (ImageNet for ResNet-50)
    random_shift_pad: list = field(default_factory=lambda: [10, 4])  # train-time shift per camera (px)

    def validate(self, where: str = "vision") -> None:
        if self.arch not in ("film_resnet18", "film_resnet50", "none"):
            raise ConfigError(f"{where}.arch must be film_resnet18, film_resnet50 or none, got {self.arch!r}")
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise ConfigError(f"{where}.image_size must be [H, W] with H, W >= 8, got {self.image_size}")


@dataclass
class TextConfig:
    """CLIP text tower through open_clip (frozen, fp32 features, 512-d, not L2-normalised)."""

    arch: str = "ViT-B-32"          # an open_clip model name, or "tiny" (small random tower for tests)
    weights: str | None = None      # local open_clip checkpoint file (e.g. open_clip_pytorch_model.bin)
    random_init_seed: int | None = None  # allow random weights (tests/demos); the goal cache stays authoritative
    cache_size: int = 10000

    def validate(self, where: str = "text") -> None:
        if self.cache_size < 1:
            raise ConfigError(f"{where}.cache_size must be >= 1")


@dataclass
class DiffusionConfig:
    sigma_data: float = 0.5
    sigma_min: float = 0.001
    sigma_max: float = 80.0
    num_steps: int = 10
    schedule: str = "exponential"   # exponential | karras
    sampler: str = "ddim"
    train_density: str = "loglogistic"  # loglogistic | loguniform
    loglogistic_loc: float | None = None  # default ln(sigma_data)
    loglogistic_scale: float = 0.5
    # training-time prefix conditioning (real-time chunking): this share of the training chunks get
    # their first prefix_min_rows..prefix_max_rows rows clean (read by the network as they are, no loss
    # on them); a checkpoint trained so is sampled with its frozen prefix rows given the same way.
    # prefix_min_rows = prefix_max_rows = d trains for one deployment delay of d ticks
    prefix_prob: float = 0.0
    prefix_max_rows: int = 0
    prefix_min_rows: int = 1

    @property
    def prefix_trained(self) -> bool:
        return self.prefix_prob > 0

    def validate(self, where: str = "diffusion") -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"{where}: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.num_steps < 1:
            raise ConfigError(f"{where}.num_steps must be >= 1")
        if self.schedule not in ("exponential", "karras"):
            raise ConfigError(f"{where}.schedule must be exponential or karras, got {self.schedule!r}")
        if self.sampler != "ddim":
            raise ConfigError(f"{where}.sampler: only 'ddim' is implemented, got {self.sampler!r}")
        if self.train_density not in ("loglogistic", "loguniform"):
            raise ConfigError(f"{where}.train_density must be loglogistic or loguniform")
        if not 0.0 <= self.prefix_prob <= 1.0:
            raise ConfigError(f"{where}.prefix_prob must be in [0, 1], got {self.prefix_prob}")
        if self.prefix_prob > 0 and self.prefix_max_rows < 1:
            raise ConfigError(f"{where}.prefix_max_rows must be >= 1 when prefix_prob > 0, got {self.prefix_max_rows}")
        if self.prefix_prob > 0 and not 1 <= self.prefix_min_rows <= self.prefix_max_rows:
            raise ConfigError(f"{where}.prefix_min_rows must be in 1..prefix_max_rows ({self.prefix_max_rows}), "
                              f"got {self.prefix_min_rows}")


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a policy: I/O layout + model + encoders + diffusion."""

    camera_names: list = field(default_factory=lambda: ["static", "gripper"])
    action_dim: int = 7
    chunk_size: int = 10
    action_names: list = field(default_factory=list)
    state_dim: int = 0              # > 0 adds a proprioceptive state token (own projection)
    state_names: list = field(default_factory=list)
    gripper_dims: list = field(default_factory=list)  # action dims binarised by sign at inference
    model: DenoiserConfig = field(default_factory=DenoiserConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    @property
    def n_cameras(self) -> int:
        return len(self.camera_names)

    def validate(self) -> "PolicyConfig":
        self.model.validate("model")
        self.vision.validate("vision")
        self.text.validate("text")
        self.diffusion.validate("diffusion")
        if self.action_dim < 1 or self.chunk_size < 1:
            raise ConfigError("action_dim and chunk_size must be >= 1")
        if self.diffusion.prefix_max_rows >= self.chunk_size:
            raise ConfigError(f"diffusion.prefix_max_rows ({self.diffusion.prefix_max_rows}) must be below "
                              f"chunk_size ({self.chunk_size}): some rows must stay free")
        if self.action_names and len(self.action_names) != self.action_dim:
            raise ConfigError(f"action_names has {len(self.action_names)} entries, action_dim is {self.action_dim}")
        if self.state_names and len(self.state_names) != self.state_dim:
            raise ConfigError(f"state_names has {len(self.state_names)} entries, state_dim is {self.state_dim}")
        if len(set(self.camera_names)) != len(self.camera_names):
            raise ConfigError(f"camera_names must be unique, got {self.camera_names}")
        if self.vision.arch == "none" and self.camera_names:
            raise ConfigError("vision.arch is 'none' but camera_names is not empty")
        if self.vision.arch != "none" and not self.camera_names:
            raise ConfigError("camera_names is empty: set vision.arch to 'none' for a state-only policy")
        if not self.camera_names and self.state_dim == 0:
            raise ConfigError("a policy needs at least one camera or a state (state_dim > 0)")
        want_obs = {"film_resnet18": 512, "film_resnet50": 2048}.get(self.vision.arch)
        if want_obs is not None and self.model.obs_dim != want_obs:
            raise ConfigError(f"model.obs_dim must be {want_obs} for vision.arch={self.vision.arch}, got {self.model.obs_dim}")
        for g in self.gripper_dims:
            if not 0 <= g < self.action_dim:
                raise ConfigError(f"gripper_dims entry {g} out of range for action_dim {self.action_dim}")
        if self.n_cameras and len(self.vision.random_shift_pad) not in (1,) and \
                len(self.vision.random_shift_pad) < self.n_cameras:
            raise ConfigError("vision.random_shift_pad needs one entry or one per camera")
        return self

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PolicyConfig":
        return build_config(cls, data or {}, "").validate()


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {type(value).__name__} ({value!r})")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} ({value!r})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected bool, got {type(value).__name__} ({value!r})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected str, got {type(value).__name__} ({value!r})")
        return value
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected list, got {type(value).__name__} ({value!r})")
        return list(value)
    return value


def build_config(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s): {', '.join(where + u for u in unknown)} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        where = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_config(tp, value, where)
        else:
            kwargs[name] = _check_type(value, tp, where)
    return cls(**kwargs)


# ---- presets -------------------------------------------------------------------------------
def preset(name: str) -> PolicyConfig:
    """Named configurations. The paper presets reproduce the reference parameter counts."""
    name = name.lower()
    if name in ("paper-8l", "calvin-8l", "paper"):
        # CALVIN from scratch: 8 layers, FiLM-ResNet-18 (512-d camera tokens)
        cfg = PolicyConfig()
    elif name in ("paper-8l-r50",):
        cfg = PolicyConfig(model=DenoiserConfig(obs_dim=2048), vision=VisionConfig(arch="film_resnet50"))
    elif name in ("pretrain-12l", "paper-12l"):
        # the released pretrain/finetune layout: 12 layers, FiLM-ResNet-50 (2048-d tokens)
        cfg = PolicyConfig(model=DenoiserConfig(n_layers=12, obs_dim=2048), vision=VisionConfig(arch="film_resnet50"))
    elif name == "small":
        cfg = PolicyConfig(
            model=DenoiserConfig(embed_dim=256, n_layers=4, n_heads=4, keep_gripper_embed=False),
            vision=VisionConfig(image_size=[96, 96], random_shift_pad=[4, 2]),
            text=TextConfig(arch="ViT-B-32"))
    elif name == "tiny":
        cfg = PolicyConfig(
            camera_names=["static", "gripper"],
            model=DenoiserConfig(embed_dim=64, n_layers=2, n_heads=2, keep_gripper_embed=False),
            vision=VisionConfig(image_size=[32, 32], random_shift_pad=[2, 1]),
            text=TextConfig(arch="tiny", random_init_seed=0, cache_size=256))
    elif name == "metaworld":
        # Meta-World MT10 from state + language (docs/SIM.md): no cameras, the 21-d sim state as a
        # token, 4-d actions; ~2 M parameters (a few MB). The text tower is the small random "tiny"
        # one: the checkpoint's goal-embedding cache holds the 10 MT10 instructions, so no CLIP
        # weights are needed (other goals are refused once random_init_seed is cleared).
        cfg = PolicyConfig(
            camera_names=[], action_dim=4, state_dim=21, chunk_size=10,
            model=DenoiserConfig(embed_dim=128, n_layers=4, n_heads=4, num_experts=4, top_k=2, mlp_ratio=2,
                                 attn_pdrop=0.1, mlp_pdrop=0.05, goal_drop=0.0, keep_gripper_embed=False),
            vision=VisionConfig(arch="none", image_size=[64, 64], random_shift_pad=[0]),
            text=TextConfig(arch="tiny", random_init_seed=0, cache_size=256))
    elif name == "reference-small":
        # the layout of shared/fixtures/mode_reference_small (d=128, 3 layers, 4 heads)
        cfg = PolicyConfig(model=DenoiserConfig(embed_dim=128, n_layers=3, n_heads=4))
    else:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return cfg.validate()


PRESETS = ("paper-8l", "paper-8l-r50", "pretrain-12l", "small", "tiny", "reference-small", "metaworld")
