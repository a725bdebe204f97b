"""Observation and goal encoders: FiLM-ResNet-18 / FiLM-ResNet-50 (torchvision backbones) and the
CLIP text tower (open_clip), plus image preprocessing.

Nothing here downloads anything: pretrained weights come from local files named in the config.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (B, 3, H, W) or float in [0, 1] -> resized (antialias bilinear), CLIP-normalised float32."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = imagenet_mean_std(x.device)
    return (x - mean) / std


_MEAN_STD: dict = {}


def imagenet_mean_std(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-resident CLIP mean/std, created once per device (no host copies in a captured graph)."""
    key = str(device)
    if key not in _MEAN_STD:
        _MEAN_STD[key] = (torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1),
                          torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1))
    return _MEAN_STD[key]


def _load_backbone_weights(module: nn.Module, path: str | None, drop_prefixes=("fc.",)) -> None:
    """Load torchvision- or timm-named ResNet weights (same key names) from a local file."""
    if not path:
        return
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vision.weights: no such file {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.startswith(drop_prefixes)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.startswith(drop_prefixes)]
    if missing or unexpected:
        raise ValueError(f"vision.weights {p}: missing keys {missing[:5]}…, unexpected {unexpected[:5]}…")


class FiLMResNet18(nn.Module):
    """Reference CALVIN encoder: torchvision ResNet-18 topology, FiLM (gamma*x + beta, no "1+") inside
    every BasicBlock after bn2 and before the residual add; per stage a generator
    SiLU -> Linear(512 -> 4C) giving [gamma_0, beta_0, gamma_1, beta_1]; avg-pool -> fc(512 -> 512)."""

    out_dim = 512

    def __init__(self, cond_dim: int = 512, weights: str | None = None):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.fc = nn.Linear(512, 512)
        for i, c in enumerate((64, 128, 256, 512), start=1):
            setattr(self, f"film_module{i}", nn.Module())
            getattr(self, f"film_module{i}").modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 4 * c))
        _load_backbone_weights(self, weights, drop_prefixes=("fc.", "film_module"))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            layer = getattr(self, f"layer{i}")
            film = getattr(self, f"film_module{i}").modulation(cond)  # (B, 4C)
            params = film.chunk(2 * len(layer), dim=-1)
            for j, blk in enumerate(layer):
                gamma, beta = params[2 * j][..., None, None], params[2 * j + 1][..., None, None]
                identity = x if blk.downsample is None else blk.downsample(x)
                out = blk.relu(blk.bn1(blk.conv1(x)))
                out = blk.bn2(blk.conv2(out))
                x = blk.relu(gamma * out + beta + identity)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FiLMResNet50(nn.Module):
    """Reference pretrain encoder: ResNet-50 (timm/torchvision key names under ``resnet.``), FiLM once
    after each stage: x <- (1 + gamma(g)) x + beta(g) with zero-initialised Linear(512 -> C); 2048-d
    global-pooled output, no projection. ImageNet weights load from ``vision.weights`` (local file)."""

    out_dim = 2048

    def __init__(self, cond_dim: int = 512, weights: str | None = None):
        super().__init__()
        from torchvision.models import resnet50

        self.resnet = resnet50(weights=None)
        self.resnet.fc = nn.Identity()
        _load_backbone_weights(self.resnet, weights)
        for i, c in enumerate((256, 512, 1024, 2048), start=1):
            m = nn.Module()
            m.gamma, m.beta = nn.Linear(cond_dim, c), nn.Linear(cond_dim, c)
            for lin in (m.gamma, m.beta):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            setattr(self, f"film{i}", m)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        for i in range(1, 5):
            x = getattr(r, f"layer{i}")(x)
            film = getattr(self, f"film{i}")
            x = (1 + film.gamma(cond))[..., None, None] * x + film.beta(cond)[..., None, None]
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def build_vision_encoder(arch: str, weights: str | None = None) -> nn.Module:
    if arch == "film_resnet18":
        return FiLMResNet18(weights=weights)
    if arch == "film_resnet50":
        return FiLMResNet50(weights=weights)
    raise ValueError(f"unknown vision arch {arch!r}")


class GoalError(ValueError):
    """A language goal cannot be used (empty, too long, or not encodable with this checkpoint)."""


class TextEncoder:
    """Frozen CLIP text tower (open_clip) -> 512-d fp32 features (projected EOT token, not normalised),
    with an LRU cache per instruction string. ``arch="tiny"`` builds a one-layer open_clip text
    transformer for tests; named archs (e.g. "ViT-B-32", "ViT-B-32-quickgelu" for OpenAI weights) are
    built by open_clip and load ``weights`` from a local file."""

    MAX_CHARS = 1000

    def __init__(self, arch: str = "ViT-B-32", weights: str | None = None, random_init_seed: int | None = None,
                 cache_size: int = 10000):
        # deliberately not an nn.Module: the frozen tower is never part of a policy's state_dict
        self.arch, self.cache_size = arch, cache_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.pinned: dict[str, torch.Tensor] = {}   # embeddings shipped with a checkpoint (never evicted)
        self.model: nn.Module | None = None
        self._weights, self._seed = weights, random_init_seed
        self.source = "none"

    # Built lazily: a checkpoint whose goals are all in its embedding cache never needs the tower.
    def _build(self) -> nn.Module:
        if self.model is not None:
            return self.model
        if self._weights is None and self._seed is None:
            raise GoalError("no CLIP text weights configured (text.weights) and random init not allowed "
                            "(text.random_init_seed): only the checkpoint's cached instructions can be used")
        if self._weights is not None and not Path(self._weights).is_file():
            raise GoalError(f"text.weights: no such file {self._weights}")
        try:
            import open_clip
        except ImportError as exc:   # the [clip] extra: without it only cached instructions work
            raise GoalError(f"open_clip is not installed ({exc}; pip install 'mode_ros[clip]'): only the "
                            "checkpoint's cached instructions can be used") from None
        with torch.random.fork_rng(devices=[]):
            if self._seed is not None:
                torch.manual_seed(self._seed)
            model, encode = self._construct(open_clip)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32" if self.arch == "tiny" else self.arch)
        model.eval().requires_grad_(False)
        self.model = model
        self.source = f"{self.arch}:{'file ' + str(self._weights) if self._weights else 'random(seed=%s)' % self._seed}"
        return model

    def _construct(self, open_clip):
        if self.arch == "tiny":
            from open_clip.model import CLIPTextCfg, _build_text_tower
            model = _build_text_tower(512, CLIPTextCfg(width=64, heads=2, layers=1))
            if self._weights:
                model.load_state_dict(torch.load(self._weights, map_location="cpu", weights_only=True))
            encode = model
        else:
            clip = open_clip.create_model(self.arch, pretrained=self._weights, load_weights=self._weights is not None)
            clip.visual = None  # the vision tower is never used
            encode = _ClipTextOnly(clip)
            model = encode
        return model, encode

    @staticmethod
    def check(text: str) -> str:
        if not isinstance(text, str):
            raise GoalError(f"goal must be a string, got {type(text).__name__}")
        t = " ".join(text.split())
        if not t:
            raise GoalError("goal is empty")
        if len(t) > TextEncoder.MAX_CHARS:
            raise GoalError(f"goal is {len(t)} characters long (limit {TextEncoder.MAX_CHARS})")
        return t

    def pin(self, embeddings: dict[str, torch.Tensor]) -> None:
        for k, v in embeddings.items():
            self.pinned[self.check(k)] = v.detach().float().cpu().reshape(-1)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, 512) fp32 embeddings on the CPU; cached."""
        keys = [self.check(t) for t in texts]
        missing = [k for k in dict.fromkeys(keys) if k not in self.pinned and k not in self.cache]
        if missing:
            model = self._build()
            tokens = self.tokenizer(missing)
            dev = next(iter(model.parameters())).device
            feats = model(tokens.to(dev)).float().cpu()
            for k, f in zip(missing, feats):
                self.cache[k] = f
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        out = []
        for k in keys:
            if k in self.pinned:
                out.append(self.pinned[k])
            else:
                self.cache.move_to_end(k)
                out.append(self.cache[k])
        return torch.stack(out)


class _ClipTextOnly(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=False)
