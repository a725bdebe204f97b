"""The training loop: episodes -> windows -> MoDE policy -> deployable checkpoint.

Determinism and exact resume: the data order is a per-epoch permutation drawn from (seed, epoch);
the diffusion noise, sigma and augmentation shifts of step s are drawn from a generator seeded by
(seed, step) for the whole global batch and sliced per rank, so N steps + resume + N steps equals 2N
steps, and 2 DDP ranks see exactly the samples/noise that 1 process would with the same global batch.
Everything else random (dropout, per-token routing samples, goal dropout) uses the global RNG, whose
state is saved in every checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model.policy import Affine, MoDEPolicy
from ..model.sampling import sample_prefix_rows, sample_training_sigmas
from .config import TrainConfig
from .schedule import EMA, param_groups, tri_stage_lr

log = logging.getLogger("mode_ros.train")


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message names the file or the step and value at fault.
    ``exit_code``: 2 = could not run (bad data, config, out_dir, train_state.pt), 1 = stopped with
    problems (a non-finite loss or gradient: nothing non-finite is exported)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


STATE_FILE = "train_state.pt"
TMP_EXPORT_GLOB = ".tmp_ckpt_*"   # MoDEPolicy.save_pretrained's temp folders (left by a kill -9)


class _LossModule(nn.Module):
    """DDP needs a forward(); this one returns (total loss, diffusion loss, aux)."""

    def __init__(self, policy: MoDEPolicy, lb_weight: float):
        super().__init__()
        self.policy, self.lb_weight = policy, lb_weight

    def forward(self, batch, sigma, noise):
        loss, aux = self.policy.loss(batch, sigma=sigma, noise=noise)
        total = loss + self.lb_weight * aux["load_balance"]
        return total, loss, aux


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1))


def _to_affine(norm) -> Affine | None:
    if norm is None:
        return None
    a = Affine(np.asarray(norm.center, np.float32), np.asarray(norm.scale, np.float32), np.asarray(norm.constant, bool))
    a.extra = norm.to_dict()
    return a


class Trainer:
    def __init__(self, cfg: TrainConfig, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        self.world, self.rank, self.local_rank = _dist_info()
        self.device = self._setup_device(cfg.device)
        torch.manual_seed(cfg.seed + self.rank)
        pcfg = cfg.policy_config()
        self.dataset = self._load_data(pcfg)
        self.policy = self._build_policy(pcfg)
        self.module = _LossModule(self.policy, cfg.optim.load_balance_weight)
        if self.world > 1:
            # the identical initialisation above reset every rank to one stream: give each rank its own
            # again (dropout, goal dropout, noise levels and noise differ per rank, as intended)
            torch.manual_seed(cfg.seed + self.rank)
            unused = pcfg.model.keep_gripper_embed
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        else:
            self.ddp = self.module
        o = cfg.optim
        self.opt = torch.optim.AdamW(param_groups(self.policy, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.ema = EMA(self.policy, o.ema, o.ema_decay, o.ema_max) if o.ema != "none" else None
        self.step = 0
        self.losses: list[float] = []
        if o.batch_size % self.world:
            raise ValueError(f"optim.batch_size {o.batch_size} must be divisible by the number of ranks {self.world}")
        self.local_batch = o.batch_size // self.world
        if len(self.dataset) == 0:
            raise TrainingError(f"data.paths {cfg.data.paths}: no training windows")
        self.out = Path(cfg.out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise TrainingError(f"out_dir {self.out}: exists and is not a folder")
        self.is_main = self.rank == 0
        self.tb = None

    def _setup_device(self, device: str) -> torch.device:
        """This rank's device ("auto": its GPU, else the CPU); joins the process group under torchrun."""
        if device == "auto":
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # "cuda" -> this rank's GPU
            dev = torch.device("cuda", self.local_rank)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    def _load_data(self, pcfg):
        """The training windows; the policy config takes the data's cameras, action and state layout."""
        from ..data.dataset import EpisodeWindowDataset

        cfg = self.cfg
        cams = cfg.data.cameras  # None: the file's cameras; []: a state-only policy
        try:
            ds = EpisodeWindowDataset(
                cfg.data.paths, camera_names=cams or None,
                image_size=tuple(pcfg.vision.image_size) if cams != [] else None, chunk_size=pcfg.chunk_size,
                state_keys=cfg.data.state_keys, normalization=cfg.data.normalization)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise TrainingError(_data_error(cfg.data.paths, exc)) from None
        if cams == []:
            ds.camera_names = []  # windows then carry no images (nothing is read from disk)
        self.cameras = list(ds.camera_names)
        pcfg.camera_names = self.cameras
        if not self.cameras:
            pcfg.vision.arch = "none"
        pcfg.action_dim = ds.action_dim
        pcfg.action_names = list(ds.action_names) if len(ds.action_names) == ds.action_dim else []
        pcfg.state_dim = ds.state_dim
        pcfg.state_names = list(ds.state_names)
        pcfg.validate()
        return ds

    def _build_policy(self, pcfg) -> MoDEPolicy:
        """The policy (identical initialisation on every rank, or init_from), with the data's normalisers and
        its instructions' embeddings (computed once, shipped with the checkpoint)."""
        cfg, ds = self.cfg, self.dataset
        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.policy = MoDEPolicy(pcfg, _to_affine(ds.action_normalizer), _to_affine(ds.state_normalizer))
        if cfg.init_from:
            self._init_from(cfg.init_from)
        if cfg.optim.freeze_router:
            for blk in self.policy.denoiser.blocks:
                blk.router.requires_grad_(False)
        self.policy.to(self.device)
        goal_emb = self.policy.text.encode(ds.instructions)
        self.goal_table = goal_emb.to(self.device)
        self.policy.set_goal_embeddings(dict(zip(ds.instructions, goal_emb)))
        self.policy.state_model = self._fit_state_model(ds)
        if self.world > 1 and self.cameras and self.device.type == "cuda":
            # BatchNorm statistics over the global batch, as the reference does under DDP
            self.policy.encoders = nn.SyncBatchNorm.convert_sync_batchnorm(self.policy.encoders)
        return self.policy

    def _fit_state_model(self, ds):
        """The state model shipped with the checkpoint (the node's predict_state), None without a state."""
        from ..model.state_model import StateModel, StateModelError

        if not ds.state_dim:
            return None
        try:
            model = StateModel.fit(ds.state_action_runs())
        except StateModelError as exc:
            self._say(f"no state model: {exc}")
            return None
        self._say(f"state model: {int(model.predicted.sum())} of {model.state_dim} state values predicted over "
                  f"the inference delay ({model.report['transitions']} transitions)")
        return model

    # ---- init from pretrained ---------------------------------------------------------------------
    def _init_from(self, path: str) -> None:
        from ..model.reference import load_reference_into

        p = Path(path)
        if not p.is_file():   # a checkpoint folder or 'bundled' (resolve_checkpoint says what is wrong)
            src = MoDEPolicy.from_pretrained(path)
            missing, unexpected = self.policy.load_state_dict(src.state_dict(), strict=False)
            self._say(f"init_from {p}: {len(missing)} missing, {len(unexpected)} unexpected keys")
            return
        rep = load_reference_into(self.policy, p)
        self._say(f"init_from {p} (authors' layout): {rep['denoiser_loaded']} denoiser tensors loaded, "
                  f"{len(rep['denoiser_missing'])} missing, {len(rep['denoiser_skipped'])} skipped "
                  f"{rep['denoiser_skipped'][:3]}; encoders {rep['encoders']}")

    # ---- data ---------------------------------------------------------------------------------------
    def _perm(self, epoch: int) -> np.ndarray:
        if getattr(self, "_perm_cache", (None,))[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7_777_777 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.dataset), generator=g).numpy())
        return self._perm_cache[1]

    def _global_indices(self, step: int) -> np.ndarray:
        """Global batch `step` of an endless stream of per-epoch permutations (no sample dropped)."""
        n, gb = len(self.dataset), self.cfg.optim.batch_size
        pos = np.arange(step * gb, (step + 1) * gb)
        return np.array([self._perm(int(k // n))[int(k % n)] for k in pos])

    def _batch(self, step: int) -> dict:
        idx = self._global_indices(step)
        mine = idx[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        items = [self.dataset[int(i)] for i in mine]
        dev = self.device
        batch = {"actions": torch.stack([it["actions"] for it in items]).to(dev)}
        if self.cfg.optim.mask_padding:
            batch["mask"] = torch.stack([it["action_mask"] for it in items]).to(dev)
        goal_idx = torch.stack([it["goal_index"] for it in items]).to(dev)
        batch["goal_emb"] = self.goal_table[goal_idx]
        if self.dataset.state_dim:
            batch["state"] = torch.stack([it["state"] for it in items]).to(dev)
        gen = _step_generator(self.cfg.seed, step)
        gb = self.cfg.optim.batch_size
        sigma = sample_training_sigmas(self.policy.config.diffusion, gb, generator=gen)
        noise = torch.randn(gb, self.policy.chunk_size, self.policy.action_dim, generator=gen)
        sl = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        if self.cameras:
            pads = self.policy.config.vision.random_shift_pad
            imgs = []
            for ci, cam in enumerate(self.cameras):
                x = torch.stack([it["images"][cam] for it in items]).to(dev)
                pad = int(pads[ci] if len(pads) > 1 else pads[0])
                shifts = torch.randint(0, 2 * pad + 1, (gb, 2), generator=gen)[sl] if pad > 0 else None
                imgs.append(_shift(x, shifts, pad))
            batch["images"] = torch.stack(imgs, dim=1)
        rows = sample_prefix_rows(self.policy.config.diffusion, gb, generator=gen)   # None unless prefix-trained
        if rows is not None:
            batch["prefix_rows"] = rows[sl].to(dev)
        return batch, sigma[sl].to(dev), noise[sl].to(dev)

    # ---- loop -------------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(f"[train] {msg}", file=sys.stderr, flush=True)

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return o.lr * tri_stage_lr(step, o.steps, o.warmup_frac, o.hold_frac, o.init_lr_scale, o.final_lr_scale)

    def train_step(self) -> dict:
        o = self.cfg.optim
        self.policy.train()
        batch, sigma, noise = self._batch(self.step)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        use_amp = self.device.type == "cuda" and o.bf16
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                total, loss, aux = self.ddp(batch, sigma, noise)
        except RuntimeError as exc:   # e.g. the router's sampling on NaN probabilities
            if not re.search(r"\b(nan|inf)\b", str(exc), re.IGNORECASE):
                raise
            self._diverged(f"the forward pass met non-finite values ({' '.join(str(exc).split())})")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.world == 1:   # under DDP only global values decide (the gradient norm after all-reduce)
            self._check_finite("loss", float(total.detach()))
        params = [q for q in self.policy.parameters() if q.grad is not None]
        if o.grad_clip:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip))
        else:
            gnorm = float(torch.nn.utils.get_total_norm([q.grad for q in params]))
        self._check_finite("gradient norm", gnorm)   # before the step: the weights stay finite
        self.opt.step()
        # finite gradients can still step to non-finite weights (weight decay x a huge lr); one sync
        weights_ok = torch.stack([torch.isfinite(q).all() for q in params]).all()
        if not bool(weights_ok):
            self._diverged("the optimizer step made weights non-finite")
        if self.ema is not None:
            self.ema.update(self.policy)
        self.step += 1
        out = {"loss": loss.item(), "load_balance": aux["load_balance"].item(), "lr": self.opt.param_groups[0]["lr"],
               "usage": aux["gates"].detach().float().mean(0).cpu()}
        out["grad_norm"] = gnorm
        return out

    def _check_finite(self, what: str, value: float) -> None:
        if not math.isfinite(value):
            self._diverged(f"the {what} is {value}")

    def _diverged(self, why: str) -> None:
        raise TrainingError(
            f"training stopped at step {self.step}: {why} (lr {self.lr_at(self.step):.3g}; a "
            f"learning rate too high for the data is the usual cause); nothing non-finite was written"
            + (f", the last saved checkpoint in {self.out} is kept" if (self.out / STATE_FILE).is_file() else ""),
            exit_code=1)

    def train(self, steps: int | None = None) -> dict:
        o = self.cfg.optim
        end = o.steps if steps is None else min(o.steps, self.step + steps)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tb"))
            except Exception as exc:  # noqa: BLE001
                self._say(f"tensorboard unavailable: {exc}")
        bar = None
        if self.is_main and not self.quiet:
            try:
                from tqdm import tqdm
                bar = tqdm(total=end, initial=self.step, desc="train", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass
        t0, n0 = time.perf_counter(), self.step
        try:
            while self.step < end:
                m = self.train_step()
                self.losses.append(m["loss"])
                if self.is_main:
                    self._report(m, end, bar, (self.step - n0) * o.batch_size / max(1e-9, time.perf_counter() - t0))
                if self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0 and self.step < end:
                    self.save_checkpoint()
        except TrainingError:
            if bar is not None:
                bar.close()   # the error then starts a line of its own
            raise
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        self.save_checkpoint()
        summary = {"steps": self.step, "final_loss": self.losses[-1] if self.losses else None,
                   "samples_per_s": (self.step - n0) * o.batch_size / max(elapsed, 1e-9), "seconds": elapsed,
                   "world_size": self.world, "device": str(self.device)}
        if self.is_main:
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=1))
            self._say(f"done: {summary}")
            if self.tb is not None:
                self.tb.flush()
        return summary

    def _report(self, m: dict, end: int, bar, sps: float) -> None:
        """Progress bar and TensorBoard scalars of one step (rank 0)."""
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lb=f"{m['load_balance']:.3f}", sps=f"{sps:.1f}")
        if self.tb is not None and (self.step % self.cfg.log_every == 0 or self.step == end):
            self.tb.add_scalar("loss/diffusion", m["loss"], self.step)
            self.tb.add_scalar("loss/load_balance", m["load_balance"], self.step)
            self.tb.add_scalar("lr", m["lr"], self.step)
            self.tb.add_scalar("throughput/samples_per_s", sps, self.step)
            for l, row in enumerate(m["usage"]):
                for e, v in enumerate(row):
                    self.tb.add_scalar(f"expert_usage/layer{l}/expert{e}", float(v), self.step)

    # ---- checkpoints -----------------------------------------------------------------------------
    def export_policy(self) -> MoDEPolicy:
        """A copy of the policy carrying the EMA weights (what gets deployed)."""
        import copy
        pol = copy.deepcopy(self.policy).to("cpu")
        if self.ema is not None:
            self.ema.copy_to(pol)
        return pol.eval()

    def save_checkpoint(self) -> None:
        if not self.is_main:
            if self.world > 1:
                torch.distributed.barrier()
            return
        self.out.mkdir(parents=True, exist_ok=True)
        bad = [k for k, v in self.policy.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingError(f"step {self.step}: {len(bad)} weight tensor(s) are non-finite ({bad[:3]}): not "
                                f"saved; the last saved checkpoint in {self.out} is kept", exit_code=1)
        _remove_stale_exports(self.out)
        state = {"step": self.step, "model": self.policy.state_dict(), "optim": self.opt.state_dict(),
                 "ema": self.ema.state_dict() if self.ema else None, "losses": self.losses,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                 "config": self.cfg_dict(), "normalization": self._norm_state()}
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / STATE_FILE)
        pol = self.export_policy()
        _save_with_norm(pol, self.out / "export")
        try:
            plot_expert_usage(pol, self.out / "export" / "expert_usage.png")
            if len(self.losses) > 1:
                plot_losses(self.losses, self.out / "loss.png")
        except Exception as exc:  # noqa: BLE001 - plots never break training
            self._say(f"plot failed: {exc}")
        if self.world > 1:
            torch.distributed.barrier()

    def cfg_dict(self) -> dict:
        import dataclasses
        return dataclasses.asdict(self.cfg)

    def _norm_state(self) -> dict:
        """The affine normalisation the weights are trained against (offset/scale per dimension)."""
        return {k: None if a is None else {"offset": np.asarray(a.offset).tolist(), "scale": np.asarray(a.scale).tolist()}
                for k, a in (("action", self.policy.action_norm), ("state", self.policy.state_norm))}

    def resume(self) -> bool:
        """Continue from OUT_DIR/train_state.pt; False when there is none. A file that cannot be read
        (empty, truncated, not a training state) raises :class:`TrainingError` naming it."""
        p = self.out / STATE_FILE
        if not p.is_file():
            return False
        try:
            st = torch.load(p, map_location="cpu", weights_only=False)
            if not isinstance(st, dict) or not {"step", "model", "optim", "losses", "rng"} <= set(st):
                raise ValueError("not a mode_ros training state (keys step, model, optim, losses, rng)")
        except Exception as exc:  # noqa: BLE001 - pickle/zip/EOF errors of a broken file: one line naming it
            raise TrainingError(f"{p}: cannot resume from it: {type(exc).__name__}: {exc} (delete it to start "
                                f"from step 0)") from None
        saved = st.get("normalization")
        if saved is not None:
            # the statistics are refitted from cfg.data at start-up: if the data changed since the
            # checkpoint, the weights would go on training (and export) against another scale
            now = self._norm_state()
            for key in ("action", "state"):
                a, b = saved.get(key), now.get(key)
                same = (a is None) == (b is None) and (a is None or all(
                    np.allclose(a[f], b[f], rtol=1e-5, atol=1e-7) for f in ("offset", "scale")))
                if not same:
                    raise TrainingError(f"resume from {p}: the {key} normalisation fitted on the current data "
                                       "differs from the checkpoint's (were episodes added, removed or changed?); "
                                       "train into a new output folder, or use init_from to start from the weights")
        self.policy.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optim"])
        if self.ema is not None and st["ema"] is not None:
            self.ema.load_state_dict(st["ema"])
        self.step, self.losses = int(st["step"]), list(st["losses"])
        torch.set_rng_state(st["rng"]["torch"])
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        if self.world > 1:  # distinct streams per rank after resume
            torch.manual_seed(self.cfg.seed + self.rank + 1000 * self.step)
        self._say(f"resumed from {p} at step {self.step}")
        return True


def _data_error(paths, exc: Exception) -> str:
    """A one-line message for a dataset that cannot be opened, naming the file at fault."""
    from ..data.episodes import EpisodeReader

    if any(str(p) in str(exc) for p in paths):
        return str(exc)
    for p in paths:
        try:
            EpisodeReader(p)
        except Exception as err:  # noqa: BLE001 - h5py raises OSError/KeyError for broken files
            return f"{p}: not an episode file ({type(err).__name__}: {err})"
    return f"data.paths {list(paths)}: {type(exc).__name__}: {exc}"


def _remove_stale_exports(out: Path) -> None:
    """Temp folders of an export cut short (kill -9 inside save_pretrained); only this process writes
    into out_dir, so any of them is stale."""
    import shutil

    for d in out.glob(TMP_EXPORT_GLOB):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            log.warning("removed %s, left by an export that did not finish", d)


def _shift(x: torch.Tensor, shifts: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Random shift with given integer offsets in [0, 2·pad] (replicate padding, exact crop)."""
    if shifts is None or pad <= 0:
        return x
    n, c, h, w = x.shape
    s = shifts.to(x.device)
    rows = (torch.arange(h, device=x.device)[None] + s[:, :1] - pad).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device)[None] + s[:, 1:] - pad).clamp(0, w - 1)
    y = torch.gather(x, 2, rows[:, None, :, None].expand(n, c, h, w))
    return torch.gather(y, 3, cols[:, None, None, :].expand(n, c, h, w))


def _save_with_norm(policy: MoDEPolicy, path: Path) -> None:
    policy.save_pretrained(path)
    # keep the data floor's full statistics beside the affine parameters, for humans and tools
    norm = json.loads((path / "normalization.json").read_text())
    for key, aff in (("action", policy.action_norm), ("state", policy.state_norm)):
        if aff is not None and getattr(aff, "extra", None):
            norm[key]["data"] = aff.extra
    tmp = path / "normalization.json.tmp"
    tmp.write_text(json.dumps(norm, indent=1))
    os.replace(tmp, path / "normalization.json")   # the export folder is never left half-written


def plot_expert_usage(policy: MoDEPolicy, path: Path) -> None:
    """Heat map of gate mass per sampling step (sigma) x layer x expert: the paper's Figure 6."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = policy.sampler.ensure()
    usage = t.usage(policy.config.model.num_experts)  # (S, L, E)
    S, L, E = usage.shape
    fig, axes = plt.subplots(1, L, figsize=(2.2 * L + 1, 3.2), squeeze=False)
    sig = t.sigmas[:-1].cpu().numpy()
    for l in range(L):
        ax = axes[0, l]
        ax.imshow(usage[:, l].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {l}", fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_xticks(range(E))
        ax.set_yticks(range(S))
        ax.set_yticklabels([f"{s:.3g}" for s in sig] if l == 0 else [], fontsize=6)
    axes[0, 0].set_ylabel("sigma (sampling step)", fontsize=7)
    fig.suptitle("expert gate per denoising step (cached routing table)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
