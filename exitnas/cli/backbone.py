"""``exitnas train-backbone CONFIG --run-dir DIR``: stage 0, the full-depth backbone with its
final exit only (see :mod:`exitnas.backbone`). Resumes like ``train-supernet``."""
from __future__ import annotations

from . import add_set_argument, command, parse_sets
from .train import _resume_flags


@command("train-backbone", help="train the full-depth backbone with its final exit (stage 0)")
class TrainBackbone:
    @staticmethod
    def add_arguments(p):
        p.add_argument("config", help="search-space YAML")
        p.add_argument("--run-dir", required=True, help="run directory (created if missing)")
        add_set_argument(p)
        _resume_flags(p)

    @staticmethod
    def run(args):
        from ..backbone import train_backbone
        from ..rundir import RunDir
        from ..space import load_space
        from ..train import distributed

        space = load_space(args.config, parse_sets(args.set))
        with distributed() as dist:
            result = train_backbone(RunDir(args.run_dir), space, dist=dist, resume=args.resume,
                                    restart=args.restart)
            if dist.is_main:
                val = result.history[-1]["val_acc"] if result.history else float("nan")
                print(f"backbone weights: {result.weights} (val acc {val:.4f})\n"
                      f"metrics: {result.metrics}\n"
                      f"next: exitnas train-supernet {args.config} --run-dir {args.run_dir}")
