"""``MoDEPolicy``: the one API between the floors.

    policy = MoDEPolicy.from_pretrained("ckpt/")            # config.yaml + model.safetensors + …
    actions = policy.predict_chunk([img_static, img_wrist], "open the drawer")   # (10, A) robot units

Inside: per-camera FiLM-ResNet (conditioned on the CLIP goal embedding) -> camera tokens; MoDE
denoiser sampled with the cached-routing DDIM sampler; actions de-normalised with the checkpoint's
statistics. Training uses ``policy.loss(batch)``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.normalization import load_checkpoint_normalization
# the checkpoint's files and its one error type (not found, unreadable, not fitting the model)
from .checkpoint import CONFIG_FILE, GOALS_FILE, NORM_FILE, WEIGHTS_FILE, CheckpointError, resolve_checkpoint
from .state_model import StateModelError, load_state_model
from .config import PolicyConfig, preset
from .denoiser import EDMPrecond, MoDEDenoiser
from .encoders import GoalError, TextEncoder, build_vision_encoder, preprocess_images
from .expert_cache import CachedSampler
from .inpainting import ChunkPrefix, PrefixGuide, prefix_guide
from .sampling import make_schedule, sample_ddim, sample_training_sigmas

log = logging.getLogger("mode_ros.policy")


def _read_file(path: Path, read):
    """``read(path)``, any failure raised as :class:`CheckpointError` naming the file."""
    try:
        return read(path)
    except Exception as exc:  # noqa: BLE001 - safetensors, yaml, json, torch: one error naming the file
        why = " ".join(str(exc).split()).removeprefix(f"{path}: ")   # one line (YAML errors span several)
        raise CheckpointError(f"{path}: {why}" if why else f"{path}: {type(exc).__name__}") from None


class Affine:
    """Per-dimension affine normalisation: normalised = (x - offset) / scale (maps to about [-1, 1])."""

    def __init__(self, offset: Sequence[float], scale: Sequence[float], constant: Sequence[bool] | None = None):
        self.offset = np.asarray(offset, dtype=np.float32)
        self.scale = np.asarray(scale, dtype=np.float32)
        if self.offset.shape != self.scale.shape or np.any(~np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise ValueError("normalisation: offset/scale must have equal shapes and positive finite scales")
        # dimensions that never changed in the training data: normalised to 0, denormalised to their
        # value (the model's output there carries no information; e.g. a gripper never used)
        self.constant = (np.zeros(self.offset.shape, bool) if constant is None
                         else np.asarray(constant, dtype=bool).reshape(self.offset.shape))

    @classmethod
    def identity(cls, dim: int) -> "Affine":
        return cls(np.zeros(dim), np.ones(dim))

    @classmethod
    def from_dict(cls, d: dict) -> "Affine":
        return cls(d["offset"], d["scale"], d.get("constant"))

    def to_dict(self) -> dict:
        d = {"offset": self.offset.tolist(), "scale": self.scale.tolist()}
        if self.constant.any():
            d["constant"] = self.constant.tolist()
        return d

    def normalize(self, x):
        y = (x - self.offset) / self.scale
        return np.where(self.constant, 0.0, y).astype(y.dtype) if self.constant.any() else y

    def denormalize(self, x):
        y = x * self.scale + self.offset
        return np.where(self.constant, self.offset, y).astype(y.dtype) if self.constant.any() else y


class MoDEPolicy(nn.Module):
    def __init__(self, config: PolicyConfig, action_norm: Affine | None = None, state_norm: Affine | None = None):
        super().__init__()
        self.config = config.validate()
        c = config
        self.denoiser = MoDEDenoiser(c.model, c.action_dim, c.chunk_size, c.n_cameras, c.state_dim)
        self.encoders = nn.ModuleDict(
            {name: build_vision_encoder(c.vision.arch, c.vision.weights) for name in c.camera_names})
        self.precond = EDMPrecond(c.diffusion.sigma_data)
        self.text = TextEncoder(c.text.arch, c.text.weights, c.text.random_init_seed, c.text.cache_size)
        self.action_norm = action_norm or Affine.identity(c.action_dim)
        self.state_norm = state_norm or (Affine.identity(c.state_dim) if c.state_dim else None)
        self.num_steps = c.diffusion.num_steps
        self.sampler = CachedSampler(self.denoiser, self.precond, make_schedule(c.diffusion, self.num_steps))
        self.use_cache = True
        self.fused = None   # optional FusedSampler (mode_ros.model.fast), see enable_fast()
        self.chunk_graph = None  # optional CUDA graph runner (mode_ros.model.graph)
        # optional replacement of the chunk's tensor computation, e.g. an ONNX export run by onnxruntime
        # (mode_ros.export.onnx_runtime.attach_onnx): backend.run(images, goal_emb, states, noise, guide) -> robot
        # units; backend.takes(guide) says whether it can sample with that real-time-chunking guide
        self.backend = None
        # (device, dtype) the weights had before release_torch_weights (None: the weights are here)
        self.released_from: tuple[torch.device, torch.dtype] | None = None
        self.experts_released = False   # ``release_expert_weights``: only the quantised experts remain
        # optional model of the robot's state over the inference delay (mode_ros.model.state_model.StateModel,
        # the checkpoint's state_model.json): the chunk controller's predict_state
        self.state_model = None
        # any load_state_dict into the denoiser (also a partial one, e.g. experts only) invalidates the
        # routing table, the fused copies of the weights and the captured graph
        self.denoiser.register_load_state_dict_post_hook(self._weights_loaded)

    # ---- properties of the I/O contract -----------------------------------------------------
    camera_names = property(lambda self: list(self.config.camera_names))
    chunk_size = property(lambda self: self.config.chunk_size)
    action_dim = property(lambda self: self.config.action_dim)
    state_dim = property(lambda self: self.config.state_dim)
    action_names = property(lambda self: list(self.config.action_names))
    known_goals = property(lambda self: sorted(self.text.pinned))

    @property
    def device(self) -> torch.device:
        return self.released_from[0] if self.released_from else self.denoiser.out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.released_from[1] if self.released_from else self.denoiser.out.weight.dtype

    # ---- construction / io --------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, seed: int = 0, **overrides) -> "MoDEPolicy":
        cfg = preset(name).to_dict()
        for k, v in overrides.items():
            cfg[k] = v
        torch.manual_seed(seed)
        return cls(PolicyConfig.from_dict(cfg))

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.yaml, model.safetensors, normalization.json, goal_embeddings.safetensors and, when
        there is one, state_model.json (atomically: into a temp dir renamed over the target)."""
        import shutil
        import tempfile

        import yaml
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp_ckpt_", dir=path.parent))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        sd = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "mode_ros", "version": "1"})
        norm = {"action": self.action_norm.to_dict()}
        if self.state_norm is not None:
            norm["state"] = self.state_norm.to_dict()
        (tmp / NORM_FILE).write_text(json.dumps(norm, indent=1))
        goals = sorted(self.text.pinned)
        emb = torch.stack([self.text.pinned[g] for g in goals]) if goals else torch.zeros(0, 512)
        save_file({"embeddings": emb.contiguous()}, str(tmp / GOALS_FILE), metadata={"goals": json.dumps(goals)})
        if self.state_model is not None:
            self.state_model.save(tmp)
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None,
                        num_steps: int | None = None) -> "MoDEPolicy":
        import yaml
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = resolve_checkpoint(path)   # a folder or 'bundled'; CheckpointError says what is missing

        def read_config(f):
            with open(f) as stream:   # a YAML error then names the file, not "<unicode string>"
                return PolicyConfig.from_dict(yaml.safe_load(stream))
        cfg = _read_file(path / CONFIG_FILE, read_config)
        if cfg.text.weights and not Path(cfg.text.weights).is_absolute():
            cfg.text.weights = str(path / cfg.text.weights)
        cfg.vision.weights = None  # backbone init weights are already inside model.safetensors
        norm = _read_file(path / NORM_FILE, lambda f: load_checkpoint_normalization(f, cfg.action_dim, cfg.state_dim))
        policy = cls(cfg, Affine.from_dict(norm["action"]), Affine.from_dict(norm["state"]) if norm["state"] else None)
        _read_file(path / WEIGHTS_FILE, lambda f: policy.load_state_dict(load_file(str(f)), strict=True))
        if (path / GOALS_FILE).is_file():
            def read_goals(f):
                with safe_open(str(f), "pt") as sf:
                    return json.loads(sf.metadata()["goals"]), sf.get_tensor("embeddings")
            goals, emb = _read_file(path / GOALS_FILE, read_goals)
            policy.text.pin(dict(zip(goals, emb)))
        try:
            policy.state_model = load_state_model(path, cfg.state_dim, cfg.action_dim)
        except StateModelError as exc:
            raise CheckpointError(str(exc)) from None
        policy.eval()
        if num_steps:
            policy.set_num_steps(num_steps)
        return policy.to_device(device, dtype)

    def to_device(self, device: str = "cpu", dtype: torch.dtype | str | None = None) -> "MoDEPolicy":
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(dtype, str):
            names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
            if dtype not in names:
                raise ValueError(f"dtype: {dtype!r} is not one of {sorted(names)}")
            dtype = names[dtype]
        self.to(device)
        if dtype is not None:
            self.denoiser.to(dtype)   # encoders stay fp32 unless a graph runner says otherwise
        if self.text.model is not None:
            self.text.model.to(device)
        self.chunk_graph = None
        return self

    def enable_fast(self, fused: bool = True, compile: bool = False, graph: bool = False, logger=None,
                    weight_quant: str = "none", attention: str | None = None, gemm: str = "torch",
                    pdl: bool = False) -> dict:
        """Inference speed-ups: fused QKV/expert kernels, torch.compile of the layer, whole-chunk
        CUDA graph, weight-only int8/fp8 experts (``weight_quant``; needs the fused sampler), the fused
        sampler's attention formulation (``attention``: sdpa / matmul / elementwise / triton, default
        by ``compile``) and GEMM kernels (``gemm``: torch / triton), and with both Triton, programmatic
        dependent launch (``pdl``, sm_90+). Each falls back with a logged reason, except an unknown
        ``weight_quant``, ``attention`` or ``gemm`` (ValueError). Returns what is active."""
        from . import triton_kernels as tk
        from .fast import FusedSampler, check_fast_options
        check_fast_options(weight_quant, attention, gemm)
        state = {"fused": False, "compiled": False, "graph": False, "weight_quant": "none",
                 "attention": None, "gemm": None, "pdl": False}
        if self.experts_released:
            raise RuntimeError("enable_fast: this policy's expert weights were released for its quantised fused "
                               "sampler (reload the checkpoint to change the fast path)")
        self.eval()
        # a call sets the whole fast configuration: a graph captured over an earlier fused sampler (whose
        # weight copies this call replaces) must never replay, and fused=False turns fusion off
        self.chunk_graph = None
        self.fused = None
        reason = tk.unavailable_reason(self.device) if "triton" in (attention, gemm) else None
        if reason is not None:
            if logger:
                logger.warning("attention=%s gemm=%s: %s; using the PyTorch kernels", attention, gemm, reason)
            attention = None if attention == "triton" else attention
            gemm = "torch"
        if pdl:
            why = ("needs attention='triton' and gemm='triton'" if (attention, gemm) != ("triton", "triton")
                   else tk.pdl_unavailable_reason(self.device))
            if why is not None:
                if logger:
                    logger.warning("pdl (programmatic dependent launch): %s; launching normally", why)
                pdl = False
        if weight_quant == "fp8" and self.device.type != "cuda":
            if logger:
                logger.warning("weight_quant fp8: needs a CUDA device (a CPU has no fp8 matmul; widening "
                               "the weights every step is slower than fp32), experts stay unquantised; "
                               "use int8 on CPU")
            weight_quant = "none"
        if fused or compile or weight_quant != "none":
            try:
                self.fused = FusedSampler(self.sampler, compile=compile, weight_quant=weight_quant,
                                          attention=attention, gemm=gemm, pdl=pdl)
                self.fused.build()
                state["fused"], state["compiled"], state["weight_quant"] = True, self.fused.compile, weight_quant
                if self.fused.compile_skipped and logger:
                    logger.info("torch.compile skipped: %s", self.fused.compile_skipped)
                state["attention"], state["gemm"], state["pdl"] = self.fused.attention, self.fused.gemm, self.fused.pdl
            except Exception as exc:  # noqa: BLE001
                self.fused = None
                if logger:
                    logger.warning("fused sampler unavailable (%s); using the cached eager sampler", exc)
        if graph:
            from .graph import enable_graph
            state["graph"] = enable_graph(self, 1, logger)
        return state

    def _weights_loaded(self, module, incompatible_keys) -> None:   # a bound method: deepcopy/pickle safe
        self.invalidate()

    def invalidate(self) -> None:
        """Rebuild the routing table, fused weights and CUDA graph on the next call (after editing
        weights in place; load_state_dict, set_num_steps and to_device do this by themselves)."""
        self.sampler.invalidate()
        self.chunk_graph = None

    def set_num_steps(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"num_steps must be >= 1, got {n}")
        self.num_steps = int(n)
        self.sampler.set_schedule(make_schedule(self.config.diffusion, self.num_steps))
        self.chunk_graph = None

    def set_goal_embeddings(self, goals: dict[str, torch.Tensor]) -> None:
        """Ship instruction embeddings with the checkpoint (computed once, e.g. by the trainer)."""
        self.text.pin(goals)

    # ---- tensors -> tensors -------------------------------------------------------------------
    def encode_observation(self, images: torch.Tensor | None, goal_emb: torch.Tensor) -> torch.Tensor | None:
        """images: (B, C, 3, H, W) uint8/float; goal_emb (B, 512) -> camera tokens (B, C, obs_dim)."""
        if not self.config.camera_names:
            return None
        size = self.config.vision.image_size
        toks = []
        for i, name in enumerate(self.config.camera_names):
            enc = self.encoders[name]
            edt = enc.fc.weight.dtype if hasattr(enc, "fc") and isinstance(enc.fc, nn.Linear) else \
                next(enc.parameters()).dtype
            x = preprocess_images(images[:, i], size).to(edt)
            toks.append(enc(x, goal_emb.to(edt)))
        return torch.stack(toks, dim=1)

    def loss(self, batch: dict, sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """batch: images (B,C,3,H,W) uint8 (already augmented), goal_emb (B,512), actions (B,K,A)
        normalised, optional state (B,S) normalised, optional mask (B,K), optional prefix_rows (B,)
        (training-time prefix conditioning, ``sampling.sample_prefix_rows``). Returns (loss, aux)."""
        actions = batch["actions"].float()
        b = actions.shape[0]
        goal = batch["goal_emb"].float()
        obs = self.encode_observation(batch.get("images"), goal)
        if sigma is None:
            sigma = sample_training_sigmas(self.config.diffusion, b, device=actions.device)
        loss, aux = self.precond.loss(self.denoiser, actions, sigma, goal, obs, batch.get("state"),
                                      noise=noise, weight=batch.get("mask"), prefix_rows=batch.get("prefix_rows"))
        return loss, aux

    def release_torch_weights(self) -> int:
        """Free the denoiser's and image encoders' weights (moved to the meta device) once a ``backend``
        computes every chunk, so the process holds the model once (the backend's copy); the text encoder
        and goal embeddings stay. PyTorch sampling afterwards raises. Returns the bytes freed."""
        if self.backend is None:
            raise RuntimeError("release_torch_weights: no backend computes the chunks (attach one first)")
        freed = sum(t.numel() * t.element_size() for m in (self.denoiser, self.encoders)
                    for t in list(m.parameters()) + list(m.buffers()) if t.device.type != "meta")
        released_from = (self.device, self.dtype)
        self.fused = self.chunk_graph = None
        self.denoiser.to("meta")
        self.encoders.to("meta")
        self.sampler.invalidate()
        self.released_from = released_from
        return freed

    def release_expert_weights(self) -> int:
        """Free the denoiser's stacked expert weights once the fused sampler computes every chunk from its
        own once-quantised experts (``enable_fast(weight_quant="int8" | "fp8")``), so the process holds
        the experts once, quantised; everything else stays. Afterwards sampling that needs them — the
        eager samplers, guidance, a new ``enable_fast`` — raises. Returns the bytes freed."""
        f = self.fused
        if f is None or f.weight_quant == "none" or self.released_from:
            raise RuntimeError("release_expert_weights: needs the fused sampler with quantised experts "
                               "(enable_fast(weight_quant='int8' or 'fp8'))")
        f.ensure()   # quantised from the weights about to go
        freed = 0
        for blk in self.sampler.net.blocks:
            for name in ("w1", "w2"):
                w = getattr(blk.moe, name)
                if not w.is_meta:
                    freed += w.numel() * w.element_size()
                    setattr(blk.moe, name, torch.nn.Parameter(w.detach().to("meta"), requires_grad=False))
        self.experts_released = True
        return freed

    @torch.no_grad()
    def sample_normalized(self, images, goal_emb, state=None, noise=None, cached: bool | None = None,
                          generator: torch.Generator | None = None, guide: PrefixGuide | None = None) -> torch.Tensor:
        """Normalised action chunks (B, K, A) from tensors already on the device. ``guide``: real-time
        chunking (``chunk_guide``); guidance needs gradients, so it runs the cached eager sampler."""
        if self.released_from:
            raise RuntimeError("this policy's PyTorch weights were released for its "
                               f"{type(self.backend).__name__} backend: it cannot sample in PyTorch")
        b = goal_emb.shape[0]
        dev = self.device
        if noise is None:
            noise = torch.randn(b, self.chunk_size, self.action_dim, device=dev, generator=generator)
        dt = self.dtype
        obs = self.encode_observation(images, goal_emb)
        obs = obs.to(dt) if obs is not None else None
        goal = goal_emb.to(dt)
        st = state.to(dt) if state is not None else None
        sigmas_max = self.config.diffusion.sigma_max
        x_T = noise.float() * sigmas_max
        use_cache = cached if cached is not None else self.use_cache
        if self.experts_released and not (use_cache and self.fused is not None
                                          and (guide is None or not guide.needs_grad)):
            raise RuntimeError("this policy's expert weights were released for its quantised fused sampler: "
                               + ("guidance needs them" if use_cache and self.fused is not None
                                  else "the eager samplers need them"))
        if use_cache:
            if self.fused is not None and guide is not None and guide.needs_grad and not self.fused.differentiable:
                self._log_once("rtc_fused", "real-time chunking guidance takes a vector-Jacobian product "
                               "through the denoiser: it runs the cached eager sampler, not the fused one "
                               "(compiled, Triton or quantised: no autograd)")
            elif self.fused is not None:
                return self.fused.sample(x_T, goal, obs, st, guide=guide)
            return self.sampler.sample(x_T, goal, obs, st, guide=guide)
        sig = self.sampler.schedule().to(dev)

        def fn(x, s):
            return self.precond.denoise(self.denoiser, x.to(dt), s.to(dt), goal, obs, st, mode="sync").float()
        return sample_ddim(fn, x_T, sig, guide=guide)

    # ---- numpy API used by the ROS node, replay and sim --------------------------------------------
    def _images_to_tensor(self, images, batched: bool) -> torch.Tensor | None:
        names = self.config.camera_names
        if not names:
            return None
        if isinstance(images, dict):
            missing = [n for n in names if n not in images]
            if missing:
                raise ValueError(f"missing camera image(s) {missing}; expected {names}")
            images = [images[n] for n in names]
        if images is None or len(images) != len(names):
            raise ValueError(f"expected {len(names)} camera image(s) {names}, got {0 if images is None else len(images)}")
        arrs = []
        for n, im in zip(names, images):
            a = np.asarray(im)
            want = 4 if batched else 3
            if a.ndim != want or a.shape[-1] != 3 or a.dtype != np.uint8 or 0 in a.shape:
                raise ValueError(f"camera {n!r}: expected {'B x ' if batched else ''}H x W x 3 uint8 RGB, "
                                 f"got shape {a.shape} dtype {a.dtype}")
            arrs.append(a if batched else a[None])
        if len({a.shape[0] for a in arrs}) > 1:
            raise ValueError("cameras differ in batch size: " + ", ".join(f"{n!r}: {a.shape[0]}" for n, a in zip(names, arrs)))
        size = self.config.vision.image_size
        out = []
        for a in arrs:  # resize per camera on the device (cameras may differ in size)
            t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device).permute(0, 3, 1, 2)
            if tuple(t.shape[-2:]) != tuple(size):
                t = torch.nn.functional.interpolate(t.float(), size=tuple(size), mode="bilinear",
                                                    antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
            out.append(t)
        return torch.stack(out, dim=1)

    def _state_to_tensor(self, state, b: int, batched: bool) -> torch.Tensor | None:
        if self.state_dim == 0:
            return None
        if state is None:
            raise ValueError(f"this policy needs a state vector of length {self.state_dim}")
        s = np.asarray(state, dtype=np.float32)
        want = (b, self.state_dim) if batched else (self.state_dim,)
        if s.shape != want:
            raise ValueError(f"state: expected shape {want}, got {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError("state contains NaN or Inf")
        s = self.state_norm.normalize(s) if self.state_norm is not None else s
        return torch.from_numpy(np.atleast_2d(s)).to(self.device)

    def encode_goal(self, text: str) -> np.ndarray:
        return self.text.encode([text])[0].numpy()

    def goal_problem(self, text: str) -> str | None:
        """Why ``text`` cannot be used as a goal with this checkpoint (None: it can; it is embedded now,
        so its first inference costs no encoding). Names the known instructions when there are few."""
        try:
            self.encode_goal(text)
        except ValueError as exc:   # GoalError: empty, too long, no text weights and not cached
            known = self.known_goals
            if known and len(known) <= 20:
                return f"{exc}; known instructions: " + "; ".join(repr(g) for g in known)
            return f"{exc} ({len(known)} cached instructions)" if known else str(exc)
        return None

    def predict_chunk(self, images, goal_text: str, state=None, seed: int | None = None,
                      prefix: ChunkPrefix | None = None) -> np.ndarray:
        """One chunk (chunk_size, action_dim) float32 in robot units for one observation. ``prefix``
        (real-time chunking, mode_ros.model.inpainting): the previous plan over the new chunk's first
        rows; its ``fixed`` rows are returned exactly, the overlap is pulled toward it. None: plain."""
        out = self.predict_chunk_batch(
            None if images is None else ({k: np.asarray(v)[None] for k, v in images.items()} if isinstance(images, dict)
                                         else [np.asarray(v)[None] for v in images]),
            [goal_text], None if state is None else np.asarray(state, dtype=np.float32)[None], seed=seed,
            prefixes=None if prefix is None else [prefix])
        return out[0]

    def predict_chunk_batch(self, images, goal_texts: Sequence[str], states=None, seed: int | None = None,
                            prefixes: Sequence[ChunkPrefix | None] | None = None) -> np.ndarray:
        """Chunks (B, chunk_size, action_dim) in robot units. ``prefixes``: one ChunkPrefix or None per
        sample (real-time chunking, see ``predict_chunk``); prefixes of one batch share their method."""
        if self.training:
            # inference in training mode would apply dropout and BatchNorm batch statistics (and update
            # the running ones): always evaluate, and give the module back as it was
            self.eval()
            try:
                return self.predict_chunk_batch(images, goal_texts, states, seed, prefixes)
            finally:
                self.train()
        b = len(goal_texts)
        img = self._images_to_tensor(images, batched=True)
        if img is not None and img.shape[0] != b:
            raise ValueError(f"{b} goals but {img.shape[0]} images per camera")
        st = self._state_to_tensor(states, b, batched=True)
        goal = self.text.encode(list(goal_texts)).to(self.device)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed))
        noise = torch.randn(b, self.chunk_size, self.action_dim, device=self.device, generator=gen)
        guide = self.chunk_guide(prefixes, noise) if prefixes is not None else None
        if self.backend is not None and (guide is None or self.backend.takes(guide)):
            # same checked inputs and noise; states in robot units; a replacement prefix as graph inputs
            out = self.backend.run(img, goal, None if st is None else np.asarray(states, np.float32), noise, guide)
        elif self.released_from:
            raise RuntimeError(f"a {guide.method} prefix needs PyTorch sampling, and this policy's PyTorch "
                               f"weights were released for its {type(self.backend).__name__} backend")
        else:
            out = self.postprocess(self._normalized_fast(img, goal, st, noise, guide))
        for j, p in enumerate(prefixes or ()):
            if p is not None:   # the rows executed before this chunk lands: the previous plan, exactly
                out[j, :p.fixed] = p.actions[:p.fixed]
        return out

    def chunk_guide(self, prefixes: Sequence[ChunkPrefix | None], noise: torch.Tensor) -> PrefixGuide | None:
        """Real-time chunking's per-step correction for this batch (None when no sample has a prefix)."""
        d = self.config.diffusion
        guide = prefix_guide(prefixes, self.action_norm.normalize, noise, self.sampler.schedule().to(noise.device),
                             d.sigma_data, clean=d.prefix_trained)
        if guide is not None and self.backend is not None and not self.backend.takes(guide):
            self._log_once("rtc_backend", "real-time chunking (%s) runs in PyTorch (the %s backend does not "
                           "take this prefix)", guide.method, type(self.backend).__name__)
        return guide

    def _log_once(self, key: str, msg: str, *args) -> None:
        seen = self.__dict__.setdefault("_logged", set())
        if key not in seen:
            seen.add(key)
            log.info(msg, *args)

    def postprocess(self, a_norm: torch.Tensor) -> np.ndarray:
        """Normalised (…, K, A) -> robot units; gripper dims binarised by sign in normalised space
        (so they land exactly on the recorded open/closed values)."""
        a = a_norm.float().cpu().numpy()
        for g in self.config.gripper_dims:
            a[..., g] = np.where(a[..., g] >= 0, 1.0, -1.0)
        return self.action_norm.denormalize(a).astype(np.float32)   # constant dims: their recorded value

    def _normalized_fast(self, img, goal, st, noise, guide: PrefixGuide | None = None) -> torch.Tensor:
        """Normalised chunk through whatever fast path is active (the CUDA graph when captured; a chunk
        with a real-time-chunking ``guide`` runs the eager samplers on the same routing table)."""
        if (guide is None and self.chunk_graph is not None and self.chunk_graph.batch == goal.shape[0]
                and self.chunk_graph.key == self.sampler.key()):
            return self.chunk_graph(img, goal, st, noise)
        if guide is not None and self.chunk_graph is not None:
            self._log_once("rtc_graph", "real-time chunking: chunks with a prefix run the eager %s sampler, "
                           "not the captured CUDA graph (it has no inputs for the prefix)",
                           "fused" if self.fused is not None and (not guide.needs_grad or self.fused.differentiable)
                           else "cached")
        return self.sample_normalized(img, goal, st, noise, guide=guide)

    def select_fast(self, candidates: Sequence[dict], runs: int = 10, tolerance: float = 0.05,
                    logger=None) -> dict:
        """Measure instead of guessing: apply each ``enable_fast`` configuration (a dict of its keyword
        arguments) in turn, time whole chunks on one fixed input (median of ``runs`` after two warm-up
        calls) and keep the fastest whose normalised actions stay within ``tolerance`` of this policy's
        plain cached sampler on the same input and noise (a path that computes something else is never
        chosen). A configuration that fails is skipped with its reason. Returns {"chosen": index or None
        (None: none qualified, fast paths off), "active": what enable_fast reported for it, "trials":
        per candidate {"config", "active", "median_ms", "max_abs_diff", "error"}}."""
        self.eval()
        self.fused, self.chunk_graph = None, None
        self.sampler.ensure()
        c = self.config
        g = torch.Generator(device=self.device).manual_seed(0)
        img = None
        if c.camera_names:
            h, w = c.vision.image_size
            img = torch.randint(0, 255, (1, len(c.camera_names), 3, h, w), dtype=torch.uint8, device=self.device,
                                generator=g)
        goal = torch.randn(1, 512, device=self.device, generator=g)
        st = torch.randn(1, self.state_dim, device=self.device, generator=g) if self.state_dim else None
        noise = torch.randn(1, self.chunk_size, self.action_dim, device=self.device, generator=g)

        def timed(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                self._normalized_fast(img, goal, st, noise)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                out.append((time.perf_counter() - t0) * 1e3)
            return out

        with torch.no_grad():
            ref = self.sample_normalized(img, goal, st, noise).float()
            trials = []
            for cfg in candidates:
                trial = {"config": dict(cfg), "active": None, "median_ms": None, "max_abs_diff": None, "error": ""}
                try:
                    trial["active"] = self.enable_fast(logger=logger, **cfg)
                    timed(2)
                    diff = float((self._normalized_fast(img, goal, st, noise).float() - ref).abs().max())
                    trial["max_abs_diff"] = diff
                    if not diff <= tolerance:
                        raise ValueError(f"actions {diff:.3g} from the cached sampler (> {tolerance:g})")
                    trial["median_ms"] = float(np.median(timed(max(1, runs))))
                except Exception as exc:  # noqa: BLE001 - a candidate that fails is reported, not fatal
                    trial["error"] = f"{type(exc).__name__}: {exc}"
                trials.append(trial)
        ok = [i for i, t in enumerate(trials) if t["median_ms"] is not None]
        chosen = min(ok, key=lambda i: trials[i]["median_ms"]) if ok else None
        if chosen is None:
            self.fused, self.chunk_graph = None, None
            active = None
        else:
            active = self.enable_fast(logger=logger, **candidates[chosen])
        if logger:
            for i, t in enumerate(trials):
                figure = f"{t['median_ms']:.2f} ms" if t["median_ms"] is not None else f"skipped ({t['error']})"
                logger.info("fast path %s%s: %s", t["config"], " (chosen)" if i == chosen else "", figure)
        return {"chosen": chosen, "active": active, "trials": trials}

    def warmup(self, runs: int = 2) -> float:
        """Build the routing cache and run a few chunks so the first real call is as fast as the rest.
        Returns the median warm-up latency in seconds (robust to one slow first call)."""
        self.eval()
        if not self.released_from:
            self.sampler.ensure()
        imgs = None
        if self.config.camera_names:
            h, w = self.config.vision.image_size
            imgs = [np.zeros((h, w, 3), np.uint8) for _ in self.config.camera_names]
        st = np.zeros(self.state_dim, np.float32) if self.state_dim else None
        goal = self.known_goals[0] if self.known_goals else None
        times = []
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            if goal is None and self.backend is not None:   # no goal to name: a zero goal embedding
                noise = torch.zeros(1, self.chunk_size, self.action_dim, device=self.device)
                out = self.backend.run(self._images_to_tensor(imgs, False), torch.zeros(1, 512, device=self.device),
                                       None if st is None else st[None], noise)
            elif goal is None:
                emb = torch.zeros(1, 512, device=self.device)
                out = self.sample_normalized(self._images_to_tensor(imgs, False), emb,
                                             self._state_to_tensor(st, 1, False))
            else:
                out = self.predict_chunk(imgs, goal, st)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        self._check_finite_chunk(torch.as_tensor(out))
        return float(sorted(times)[len(times) // 2])

    def _check_finite_chunk(self, chunk: torch.Tensor) -> None:
        """A warm-up chunk with NaN/Inf means the weights (or normalisation) are broken: refuse."""
        if bool(torch.isfinite(chunk).all()):
            return
        weights = [v for v in self.state_dict().values() if v.is_floating_point() and v.device.type != "meta"]
        bad = sum(int((~torch.isfinite(v)).sum()) for v in weights)
        total = sum(v.numel() for v in weights)
        raise CheckpointError(f"{WEIGHTS_FILE}: the warm-up chunk is not finite; {bad} of {total} weights are NaN/Inf"
                              if bad else "the warm-up chunk is not finite (the weights are finite: check the "
                              f"normalisation in {NORM_FILE})")


__all__ = ["MoDEPolicy", "Affine", "GoalError", "CheckpointError"]
