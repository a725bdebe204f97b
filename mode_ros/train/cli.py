"""``mode-ros train --config train.yaml [--resume] [--set key=value …]`` (also under torchrun)."""
from __future__ import annotations

import argparse
import sys

from ..model.config import ConfigError


TRAIN_DESCRIPTION = """\
Train a MoDE policy on episodes written by `mode-ros convert` (recipes: config/train_*.yaml; a quick
camera policy on a CPU: config/train_quick_images.yaml). The output folder (out_dir of the config) holds:
  export/              the checkpoint to deploy (config.yaml, model.safetensors, normalization.json,
                       goal_embeddings.safetensors, expert_usage.png; state_model.json for a policy with a
                       state: the node's predict_state), written every ckpt_every steps and at the end,
                       then with training.json: `mode-ros info --checkpoint OUT/export`
  train_state.pt       weights, optimiser, EMA, RNG and step, for --resume
  train_summary.json   steps, final loss, samples/s, seconds, device
  loss.png             the loss curve
  tb/                  TensorBoard scalars (losses, learning rate, expert usage per layer)
"""


def register(sub) -> None:
    p = sub.add_parser("train", help="train a MoDE policy on converted episodes (torchrun for many GPUs)",
                       description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (see config/train_*.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/train_state.pt (refused when there is none)")
    p.add_argument("--resume-or-start", action="store_true",
                   help="continue from OUT_DIR/train_state.pt, or start at step 0 when there is none (said so)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.steps=500 --set data.paths=[a.hdf5]")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps in this run")
    p.set_defaults(func=cmd_train)
    f = sub.add_parser("fit-state-model", help="fit the state model of a checkpoint (the node's predict_state) "
                                               "on episodes; `mode-ros train` fits one itself")
    f.add_argument("--checkpoint", required=True, help="checkpoint folder: state_model.json is written into it")
    f.add_argument("--data", nargs="+", required=True, help="episode files (mode-ros convert) at the control rate")
    f.add_argument("--state-keys", default=None,
                   help="comma-separated obs keys concatenated into the state, as in training (default: the "
                        "files' state keys)")
    f.add_argument("--horizon", type=int, default=5,
                   help="ticks over which a state value must be predicted better than held (default 5)")
    f.set_defaults(func=cmd_fit_state_model)


def cmd_fit_state_model(args) -> int:
    """Fit, check against the checkpoint's state and action sizes, write, print the per-value errors. Only
    the checkpoint's config is read (not its weights, nor the state model this replaces, which may be
    broken)."""
    from ..data.dataset import EpisodeWindowDataset
    from ..model.checkpoint import CheckpointError, checkpoint_config, resolve_checkpoint
    from ..model.state_model import StateModel, StateModelError

    try:
        folder = resolve_checkpoint(args.checkpoint)
        cfg = checkpoint_config(folder)
        keys = [k for k in (args.state_keys or "").split(",") if k] or _file_state_keys(args.data)
        ds = EpisodeWindowDataset(args.data, image_size=None, chunk_size=cfg.chunk_size, state_keys=keys)
        if (ds.state_dim, ds.action_dim) != (cfg.state_dim, cfg.action_dim):
            raise StateModelError(f"the episodes give state_dim {ds.state_dim}, action_dim {ds.action_dim}; the "
                                  f"checkpoint has {cfg.state_dim}, {cfg.action_dim} (--state-keys?)")
        model = StateModel.fit(ds.state_action_runs(), horizon=args.horizon)
    except (CheckpointError, StateModelError, OSError, KeyError, ValueError) as exc:
        print(f"mode-ros fit-state-model: {exc}", file=sys.stderr)
        return 2
    path = model.save(folder)
    names = ds.state_names or [f"state[{i}]" for i in range(ds.state_dim)]
    print(f"{'value':16s} {'predicted':>9s} {'error/held':>10s}  ({model.report['transitions']} transitions, "
          f"{model.report['heldout_runs']} held-out runs, {args.horizon} ticks)")
    for name, on, r in zip(names, model.predicted, model.report["error_ratio"]):
        print(f"{name:16s} {'yes' if on else 'no':>9s} {'-' if r is None else format(r, '.3f'):>10s}")
    print(f"state model: {path}")
    return 0


def _file_state_keys(paths) -> list[str]:
    from ..data.episodes import EpisodeReader
    return list(EpisodeReader(paths[0]).state_keys)


def apply_overrides(d: dict, items: list[str]) -> dict:
    import yaml
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {part} is not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(val)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: invalid YAML value ({_one_line(exc)})") from None
    return d


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def load_config(path: str, overrides: list[str]):
    """The training config of a YAML file with ``--set`` overrides; every problem is a ConfigError
    naming the file (or the override)."""
    import yaml
    from .config import TrainConfig

    try:
        with open(path) as f:   # a YAML error names the file through the stream
            d = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({_one_line(exc)})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(d).__name__}")
    return TrainConfig.from_dict(apply_overrides(d, overrides))


def cmd_train(args) -> int:
    from .trainer import TrainingError

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"mode-ros train: config error: {exc}", file=sys.stderr)
        return 2
    try:
        tr = _start(cfg, args)
        tr.train(args.steps)
    except TrainingError as exc:
        print(f"mode-ros train: {exc}", file=sys.stderr)
        return exc.exit_code
    if tr.is_main:
        write_training_record(tr)
    if tr.world > 1:
        import torch
        torch.distributed.destroy_process_group()
    print(f"checkpoint: {tr.out / 'export'}")
    return 0


def write_training_record(tr) -> None:
    """OUT/export/training.json: steps, the data's control rate, data and recipe (``mode-ros info``)."""
    import json

    from ..model.checkpoint import TRAINING_FILE

    rates = sorted({r.control_rate_hz for r in tr.dataset.readers if r.control_rate_hz})
    rec = {"steps": tr.step, "batch_size": tr.cfg.optim.batch_size,
           "control_rate_hz": rates[0] if len(rates) == 1 else None, "data": list(tr.cfg.data.paths),
           "preset": tr.cfg.preset}
    if len(rates) > 1:
        rec["control_rates_hz"] = rates   # files recorded at different rates: none is the policy's
    (tr.out / "export" / TRAINING_FILE).write_text(json.dumps(rec, indent=1))


def _start(cfg, args):
    """The trainer, resumed as asked: --resume needs OUT_DIR/train_state.pt, --resume-or-start says when
    it starts from step 0."""
    from .trainer import STATE_FILE, Trainer, TrainingError

    tr = Trainer(cfg)
    if (args.resume or args.resume_or_start) and not tr.resume():
        state = tr.out / STATE_FILE
        if args.resume:
            raise TrainingError(f"--resume: {state} does not exist, nothing to resume (run without --resume, or "
                                "with --resume-or-start, to start from step 0)")
        print(f"mode-ros train: --resume-or-start: no {state}: STARTING FROM STEP 0", file=sys.stderr)
    return tr
