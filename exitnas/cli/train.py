"""``exitnas train-backbone CONFIG --run-dir DIR`` (stage 0, :mod:`exitnas.backbone`),
``exitnas train-supernet CONFIG --run-dir DIR`` and ``exitnas retrain RUN_DIR --arch A``.

Resume semantics (both commands): rerunning the same command continues from the step's last
checkpoint, or does nothing when the step has finished. A checkpoint made for another space,
arch or regime, or with other settings, is refused with one line naming what differs; nothing
is overwritten. ``--resume`` insists on continuing (error if there is no checkpoint yet);
``--restart`` trains from scratch, replacing the old outputs as new epochs finish.
Both run under ``torchrun --nproc_per_node N`` (DistributedDataParallel; gloo on CPU, NCCL on GPU),
and train-backbone / train-supernet (like finetune) on Ray Train workers with ``--backend ray``
(:mod:`exitnas.ray_train`).
"""
from __future__ import annotations

import argparse

from . import add_set_argument, command, parse_sets
from ..errors import ConfigError


def _resume_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint; error if there is none "
                        "(without a flag a matching checkpoint is continued anyway)")
    g.add_argument("--restart", action="store_true",
                   help="ignore any checkpoint and train from scratch")


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: this process, or torchrun's processes (default); ray: Ray "
                        "Train workers, one per device")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--workers", type=int, help="Ray Train workers, one per device (default 1)")


def run_training(args, job, describe, *, name: str, checkpoint) -> None:
    """Run ``job(dist, resume=, restart=)`` alone, under torchrun, or on Ray Train workers
    (``--backend ray``); rank 0's ``describe(result)`` is printed. ``checkpoint``: the step's
    checkpoint.pt."""
    import os

    if args.backend != "ray":
        for flag in ("address", "workers"):
            if getattr(args, flag) is not None:
                raise ConfigError("only used with --backend ray", file=f"--{flag}")
        from ..train import distributed

        with distributed() as dist:
            result = job(dist, resume=args.resume, restart=args.restart)
            if dist.is_main:
                print(describe(result))
        return
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"{args.workers} is not >= 1", file="--workers")
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("Ray Train starts its own workers: run it without torchrun",
                          file="--backend ray")
    from ..ray_train import run_step

    print(run_step(name=name, train=job, describe=describe, checkpoint=checkpoint,
                   resume=args.resume, restart=args.restart, address=args.address,
                   workers=args.workers or 1))


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="search-space YAML")
    p.add_argument("--run-dir", required=True, help="run directory (created if missing)")
    add_set_argument(p)
    _resume_flags(p)
    add_backend_arguments(p)


def _train_stage(args, train, describe, step: str) -> None:
    """Run ``train(run_dir, space, ...)`` alone, under torchrun or on Ray Train (step
    ``step``: outputs in RUN/<step>/); rank 0 prints ``describe(result)``."""
    from ..rundir import RunDir
    from ..space import load_space

    space = load_space(args.config, parse_sets(args.set))
    run_dir = RunDir(args.run_dir)

    def job(dist, *, resume: bool, restart: bool):
        return train(run_dir, space, dist=dist, resume=resume, restart=restart)

    run_training(args, job, describe, name=step,
                 checkpoint=run_dir.path / step / "checkpoint.pt")


@command("train-backbone", help="train the full-depth backbone with its final exit (stage 0)")
class TrainBackbone:
    add_arguments = staticmethod(_stage_arguments)

    @staticmethod
    def run(args):
        from ..backbone import train_backbone

        def describe(result):
            val = result.history[-1]["val_acc"] if result.history else float("nan")
            return (f"backbone weights: {result.weights} (val acc {val:.4f})\nmetrics: "
                    f"{result.metrics}\nnext: exitnas train-supernet {args.config} --run-dir "
                    f"{args.run_dir}")

        _train_stage(args, train_backbone, describe, "backbone")


@command("train-supernet", help="train the weight-sharing supernet of a search space")
class TrainSupernet:
    add_arguments = staticmethod(_stage_arguments)

    @staticmethod
    def run(args):
        from ..train import train_supernet

        _train_stage(args, train_supernet, lambda result: (
            f"supernet weights: {result.weights}\nmetrics: {result.metrics}\n"
            f"next: exitnas search {args.run_dir}   (or exitnas finetune {args.run_dir} "
            "--arch ID --regime mixed)"), "supernet")


@command("retrain", help="retrain an arch from scratch as a standalone model with a training "
                         "regime (to continue from its searched weights: exitnas finetune)")
class Retrain:
    @staticmethod
    def add_arguments(p):
        p.add_argument("run_dir", help="run directory made by train-supernet (or holding "
                                       "config.yaml)")
        p.add_argument("--arch", required=True, help="arch id, JSON, or JSON file")
        p.add_argument("--regime", choices=("joint", "disjoint", "mixed"),
                       help="training regime (default: retrain.regime of the run's config)")
        p.add_argument("--loss", help="exit loss from the registry (default: retrain.loss)")
        p.add_argument("--epochs", type=int, help="total epochs, split across phases")
        p.add_argument("--from-scratch", action="store_true",
                       help="freshly initialised weights (the default, unless the config sets "
                            "retrain.init_from_supernet); `exitnas finetune` continues from the "
                            "supernet's weights instead")
        add_set_argument(p)
        _resume_flags(p)

    @staticmethod
    def run(args):
        from ..arch import Arch
        from ..retrain import retrain
        from ..rundir import RunDir
        from ..train import distributed

        overrides = parse_sets(args.set)
        if args.loss is not None:
            from ..losses import LOSSES

            if args.loss not in LOSSES:
                raise ConfigError(f"unknown loss {args.loss!r} (known: {', '.join(LOSSES.names())})",
                                  file="--loss")
            overrides["retrain.loss"] = args.loss
        if args.epochs is not None:
            if args.epochs < 1:
                raise ConfigError(f"{args.epochs} is not >= 1", file="--epochs")
            overrides["retrain.epochs"] = args.epochs
        if args.from_scratch:
            if overrides.get("retrain.init_from_supernet", False) is not False:
                raise ConfigError("contradicts --set retrain.init_from_supernet",
                                  file="--from-scratch")
            overrides["retrain.init_from_supernet"] = False
        run_dir = RunDir(args.run_dir)
        space = run_dir.space(overrides)
        if args.from_scratch and space.retrain.phase1 == "backbone":
            raise ConfigError("contradicts retrain.phase1=backbone (which starts from the "
                              "trained backbone)", file="--from-scratch")
        arch = Arch.parse(args.arch)
        with distributed() as dist:
            result = retrain(run_dir, arch, space=space, regime=args.regime, dist=dist,
                             resume=args.resume, restart=args.restart)
            if dist.is_main:
                acc = " ".join(f"{a:.3f}" for a in (result.history[-1][k] for k in
                               result.history[-1] if k.startswith("val_acc")))
                print(f"retrained {arch.id} ({result.regime}): val acc per exit {acc}\n"
                      f"outputs: {result.out}/{{model.safetensors,arch.json,metrics.csv}}\n"
                      f"next: exitnas export {args.run_dir} --arch {arch.id}")
