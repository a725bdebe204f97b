"""``mode-ros train --config train.yaml [--resume] [--set key=value …]`` (also under torchrun)."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("train", help="train a MoDE policy on converted episodes (torchrun for many GPUs)")
    p.add_argument("--config", required=True, help="training YAML (see config/train_*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/train_state.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.steps=500 --set data.paths=[a.hdf5]")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps in this run")
    p.set_defaults(func=cmd_train)


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
        node[parts[-1]] = yaml.safe_load(val)
    return d


def load_config(path: str, overrides: list[str]):
    import yaml
    from .config import TrainConfig

    with open(path) as f:
        d = yaml.safe_load(f) or {}
    return TrainConfig.from_dict(apply_overrides(d, overrides))


def cmd_train(args) -> int:
    from ..model.config import ConfigError
    from .trainer import Trainer

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"mode-ros train: config error: {exc}", file=sys.stderr)
        return 2
    tr = Trainer(cfg)
    if args.resume:
        tr.resume()
    tr.train(args.steps)
    if tr.world > 1:
        import torch
        torch.distributed.destroy_process_group()
    print(f"checkpoint: {tr.out / 'export'}")
    return 0
