"""Retrain an architecture as a standalone multi-exit model with a training regime.

    result = retrain(RunDir("runs/q"), Arch.parse("d3.3.2~s0b1=linear~max_softmax=0.9"),
                     space=space, regime="mixed")

Phases (seed paper, Kubaty et al., "How to train your multi-exit model?"):

- phase 1: the backbone alone with its final classifier (cross-entropy of the final exit);
- phase 2: backbone and every exit head, all trainable (``retrain.loss``);
- phase 3: exit heads only; the backbone (segments and final head) gets no gradient
  (``requires_grad`` False) and its BatchNorm layers stay in eval mode.

joint = phase 2 for all ``retrain.epochs``; disjoint = phase 1 then phase 3; mixed = phase 1
then phase 2 with the early heads freshly re-initialised. Phase 1 takes
``round(epochs × phase1_fraction)`` epochs (at least 1, at most epochs - 1), so every regime
trains for the same total number of epochs. Each phase has its own optimizer and learning-rate
schedule over its own epochs.

Outputs: ``RUN/retrain/<arch id>/<regime>/{model.safetensors, checkpoint.pt, metrics.csv,
arch.json}``. A killed run continues from its last epoch; a checkpoint of another arch, regime,
space or settings is refused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._config import to_dict
from .arch import Arch
from .data import Splits, load_splits
from .errors import ConfigError, RunDirError
from .io import atomic_write_json, load_weights, save_checkpoint, save_weights
from .losses import loss_from_config
from .model import MultiExitModel
from .rundir import RunDir
from .space import Space
from .train import (Dist, accuracy, default_device, make_optimizer, make_scheduler,
                    open_checkpoint, per_rank_batch, rng_state, run_epoch, set_rng_state,
                    train_batches, wrap_ddp, write_metrics)

REGIMES = ("joint", "disjoint", "mixed")
PHASE_NAMES = {1: "backbone", 2: "joint", 3: "heads"}


def phase_plan(regime: str, epochs: int, phase1_fraction: float) -> list[int]:
    """The phase (1, 2 or 3) of every epoch; the same length for every regime."""
    if regime not in REGIMES:
        raise ConfigError(f"unknown regime {regime!r} (known: {', '.join(REGIMES)})",
                          path="retrain.regime")
    if regime == "joint":
        return [2] * epochs
    if epochs < 2:
        raise ConfigError(f"{epochs} epoch cannot be split into two phases for regime "
                          f"{regime!r}; use at least 2", path="retrain.epochs")
    p1 = min(max(round(epochs * phase1_fraction), 1), epochs - 1)
    return [1] * p1 + [3 if regime == "disjoint" else 2] * (epochs - p1)


def backbone_modules(model: MultiExitModel) -> list[nn.Module]:
    """The backbone: every segment and the final head."""
    return [*model.segments, model.heads[-1]]


def set_phase(model: MultiExitModel, phase: int) -> None:
    """Trainable parameters for ``phase``: 1 backbone only, 2 everything, 3 early heads only."""
    for m in backbone_modules(model):
        m.requires_grad_(phase in (1, 2))
    for head in model.heads[:-1]:
        head.requires_grad_(phase in (2, 3))


def train_mode(model: MultiExitModel, phase: int) -> None:
    """Train mode, except the frozen backbone's BatchNorm layers in phase 3 (eval mode keeps
    their running statistics unchanged)."""
    model.train()
    if phase == 3:
        for m in backbone_modules(model):
            m.eval()


class PhaseForward(nn.Module):
    """The forward of one phase (one graph for DistributedDataParallel): phase 1 runs the
    backbone and the final head only; phases 2 and 3 return every exit's logits."""

    def __init__(self, model: MultiExitModel, phase: int) -> None:
        super().__init__()
        self.model = model
        self.phase = phase

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.phase == 1:
            for segment in self.model.segments:
                x = segment(x)
            return [self.model.heads[-1](x)]
        return self.model.forward_exits(x)


def reinit_heads(model: MultiExitModel, space: Space, arch: Arch, *, seed: int) -> None:
    """Replace the early heads by those of a fresh ``build_model(space, arch, seed=seed)``
    (global RNG untouched)."""
    from .supernet import build_model

    with torch.random.fork_rng(devices=[]):
        fresh = build_model(space, arch, seed=seed)
    for head, new in zip(model.heads[:-1], fresh.heads[:-1]):
        head.load_state_dict(new.state_dict())


def retrain_settings(space: Space) -> dict:
    """What shapes a retrain run; a checkpoint made with other values is not resumed."""
    cfg = to_dict(space.retrain)
    cfg.pop("regime")  # part of the identity (and of the output path)
    return {"retrain": cfg, "data": to_dict(space.data)}


def initial_model(run_dir: RunDir, space: Space, arch: Arch) -> MultiExitModel:
    """A fresh model (seed ``retrain.seed``) or, with ``retrain.init_from_supernet``, ``arch``
    extracted from ``RUN/supernet/weights.safetensors``."""
    from .supernet import Supernet, build_model

    with torch.random.fork_rng(devices=[]):
        if not space.retrain.init_from_supernet:
            return build_model(space, arch, seed=space.retrain.seed)
        weights = run_dir.path / "supernet" / "weights.safetensors"
        if not weights.is_file():
            raise RunDirError(f"{weights}: not found; train the supernet first "
                              "(`exitnas train-supernet`) or set retrain.init_from_supernet=false")
        return Supernet(space).load(weights).extract(arch)


@dataclass(frozen=True)
class RetrainResult:
    out: Path
    model: MultiExitModel
    arch: Arch
    regime: str
    phases: list[int]
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def retrain_dir(run_dir: RunDir, arch: Arch, regime: str) -> Path:
    return run_dir.path / "retrain" / arch.id / regime


def retrain(run_dir: RunDir, arch: Arch, *, space: Space, regime: str | None = None,
            dist: Dist | None = None, resume: bool = False, restart: bool = False,
            splits: Splits | None = None, log: Callable[[str], None] | None = print,
            on_phase_start: Callable[[int, int, MultiExitModel], None] | None = None
            ) -> RetrainResult:
    """Retrain ``arch`` (validated against ``space``) with ``regime`` (default
    ``retrain.regime``). ``on_phase_start(phase, epoch, model)`` is called when a phase starts
    (after the mixed regime's head re-initialisation), e.g. to snapshot weights in tests."""
    dist = dist or Dist(device=default_device())
    cfg = space.retrain
    regime = regime or cfg.regime
    arch.validate(space)
    plan = phase_plan(regime, cfg.epochs, cfg.phase1_fraction)
    loss_fn = loss_from_config(cfg)
    batch = per_rank_batch(space.data.batch_size, dist)
    out = retrain_dir(run_dir, arch, regime)
    ckpt, weights_path = out / "checkpoint.pt", out / "model.safetensors"
    identity = {"kind": "retrain", "space": space.name, "fingerprint": space.fingerprint,
                "arch": arch.id, "regime": regime}
    state = open_checkpoint(ckpt, identity=identity, settings=retrain_settings(space),
                            resume=resume, restart=restart)
    say = log if (log and dist.is_main) else (lambda _msg: None)

    model = initial_model(run_dir, space, arch).to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    splits = splits or load_splits(space)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        set_rng_state(state["rng"])
        start, history = int(state["epoch"]), list(state["metrics"])
        if start >= len(plan) and weights_path.is_file():
            say(f"already retrained ({start} epochs): {weights_path}")
            return RetrainResult(out, model.eval(), arch, regime, plan, history, start)
        say(f"resuming retraining from {ckpt} (epoch {start}/{len(plan)})")

    phase = optimizer = scheduler = forward = None
    for epoch in range(start, len(plan)):
        if plan[epoch] != phase:
            phase = plan[epoch]
            first = epoch == 0 or plan[epoch - 1] != phase
            if first and regime == "mixed" and phase == 2:
                reinit_heads(model, space, arch, seed=cfg.seed + 1)
            set_phase(model, phase)
            forward = wrap_ddp(PhaseForward(model, phase), dist)
            _, steps = train_batches(splits, space, seed=cfg.seed, epoch=epoch, dist=dist,
                                     batch_size=batch)
            optimizer = make_optimizer(model.parameters(), cfg.optim)
            scheduler = make_scheduler(optimizer, cfg.optim, epochs=plan.count(phase),
                                       steps_per_epoch=steps)
            if not first:  # resumed inside a phase: its optimizer state goes on
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            if first and on_phase_start is not None:
                on_phase_start(phase, epoch, model)
        t0 = time.perf_counter()
        train_mode(model, phase)
        progress = epoch / len(plan)

        def step(x, y, forward=forward, phase=phase):
            logits = forward(x)
            loss = (F.cross_entropy(logits[-1], y) if phase == 1
                    else loss_fn(logits, y, progress=progress))
            loss.backward()
            return loss

        data, steps = train_batches(splits, space, seed=cfg.seed, epoch=epoch, dist=dist,
                                    batch_size=batch)
        lr = optimizer.param_groups[0]["lr"]
        where = f"{regime} epoch {epoch + 1}/{len(plan)} (phase {phase})"
        loss = run_epoch(step, data, steps=steps, optimizer=optimizer, scheduler=scheduler,
                         dist=dist, where=where, channels_last=cfg.channels_last)
        if dist.is_main:
            model.eval()
            acc = accuracy(model, splits.val, splits, batch_size=space.data.eval_batch_size,
                           device=dist.device)
            row = {"epoch": epoch + 1, "phase": phase, "lr": lr, "train_loss": loss}
            row.update({f"val_acc_exit{k + 1}": a for k, a in enumerate(acc[:-1])})
            row["val_acc_final"] = acc[-1]
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            save_checkpoint(ckpt, {
                "identity": identity, "settings": retrain_settings(space), "epoch": epoch + 1,
                "phase": phase, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "metrics": history})
            write_metrics(out / "metrics.csv", history)
            say(f"{where}: loss {loss:.4f}, val acc per exit "
                f"{' '.join(f'{a:.3f}' for a in acc)} ({row['seconds']:.1f} s)")
        dist.barrier()
    set_phase(model, 2)  # leave every parameter trainable for whoever uses the model next
    model.eval()
    if dist.is_main:
        meta = {"space": space.name, "fingerprint": space.fingerprint, "arch": arch.id,
                "regime": regime}
        save_weights(weights_path, model.state_dict(), meta)
        last = history[-1] if history else {}
        atomic_write_json(out / "arch.json", {
            "arch": arch.to_json(), "space": space.name, "fingerprint": space.fingerprint,
            "regime": regime, "loss": cfg.loss, "epochs": len(plan),
            "phase_epochs": {PHASE_NAMES[p]: plan.count(p) for p in sorted(set(plan))},
            "init_from_supernet": cfg.init_from_supernet, "exit_names": model.exit_names,
            "val_accuracy": [last.get(f"val_acc_exit{k + 1}") for k in range(len(arch.exits))]
            + [last.get("val_acc_final")]})
    dist.barrier()
    return RetrainResult(out, model, arch, regime, plan, history, start)


def load_retrained(run_dir: RunDir, arch: Arch, regime: str, space: Space) -> MultiExitModel:
    """The model written by :func:`retrain` (eval mode)."""
    from .supernet import build_model

    from .errors import CheckpointError

    path = retrain_dir(run_dir, arch, regime) / "model.safetensors"
    with torch.random.fork_rng(devices=[]):
        model = build_model(space, arch)
    try:
        model.load_state_dict(load_weights(path))
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit arch {arch.id} "
                              f"({str(err).splitlines()[0]})") from None
    return model.eval()


__all__ = ["REGIMES", "phase_plan", "retrain", "RetrainResult", "retrain_dir", "set_phase",
           "train_mode", "reinit_heads", "backbone_modules", "load_retrained", "PhaseForward"]
