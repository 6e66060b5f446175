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

This is training from scratch (``exitnas retrain``), or with ``retrain.init_from_supernet``
from ``arch``'s sub-network of the supernet (BatchNorm re-estimated for its depths, as the
search scored it). Continuing from the inherited weights without a phase 1 is fine-tuning
(:mod:`exitnas.finetune`, which reuses the phases defined here).

Training runs in :mod:`exitnas.loop`, one loop phase per regime phase. Outputs:
``RUN/retrain/<arch id>/<regime>/{model.safetensors, calibration.json, checkpoint.pt,
metrics.csv, arch.json}``. After training, ``policy.calibration`` is fitted on val
(:mod:`exitnas.calibration`; the arch's thresholds are kept, not re-fitted) and stored in
``calibration.json``, bound to the weights' sha256, which the export bakes in; a rerun of a
finished run with another ``policy.calibration`` re-fits that file only.
A killed run continues from its last epoch; a checkpoint of another arch, regime, space or
settings is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import calibration
from ._config import to_dict
from .arch import Arch
from .data import Splits, load_splits
from .errors import ConfigError, RunDirError
from .io import atomic_write_json, save_weights
from .loop import (Dist, Epoch, LoopSpec, Phase, accuracy, default_device, open_checkpoint,
                   per_rank_batch, run_loop)
from .losses import ExitLoss, loss_from_config
from .model import MultiExitModel
from .rundir import RunDir
from .space import OptimConfig, Space

REGIMES = ("joint", "disjoint", "mixed")
PHASE_NAMES = {1: "backbone", 2: "joint", 3: "heads"}


def phase_plan(regime: str, epochs: int, phase1_fraction: float, *,
               phase1: str = "train") -> list[int]:
    """The phase (1, 2 or 3) of every epoch; the same length for every regime. With ``phase1``
    ``backbone`` (stage 0's backbone is phase 1) every epoch is the regime's later phase."""
    if regime not in REGIMES:
        raise ConfigError(f"unknown regime {regime!r} (known: {', '.join(REGIMES)})",
                          path="retrain.regime")
    if phase1 == "backbone":
        if regime == "joint":
            raise ConfigError("regime 'joint' has no phase 1 to take from the trained "
                              "backbone; use disjoint or mixed, or retrain.phase1=train",
                              path="retrain.phase1")
        return [3 if regime == "disjoint" else 2] * epochs
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


def retrain_settings(space: Space, run_dir: RunDir | None = None) -> dict:
    """What shapes a retrain run (with ``retrain.phase1: backbone``, the sha256 of the
    backbone); a checkpoint made with other values is not resumed."""
    from .backbone import backbone_file
    from .runtime import sha256_file

    cfg = to_dict(space.retrain)
    cfg.pop("regime")  # part of the identity (and of the output path)
    out = {"retrain": cfg, "data": to_dict(space.data)}
    if space.retrain.phase1 == "backbone" and run_dir is not None:
        out["backbone_sha256"] = sha256_file(backbone_file(run_dir, space))
    return out


def initial_model(run_dir: RunDir, space: Space, arch: Arch, splits: Splits) -> MultiExitModel:
    """A fresh model (seed ``retrain.seed``); with ``retrain.phase1: backbone`` the trained
    backbone under fresh heads (:func:`backbone_model`); with ``retrain.init_from_supernet``,
    ``arch`` extracted from ``RUN/supernet/weights.safetensors`` (:func:`inherited_model`)."""
    from .supernet import build_model

    if space.retrain.phase1 == "backbone":
        return backbone_model(run_dir, space, arch, splits)
    if not space.retrain.init_from_supernet:
        with torch.random.fork_rng(devices=[]):
            return build_model(space, arch, seed=space.retrain.seed)
    return inherited_model(run_dir, space, arch, splits, hint="or set "
                           "retrain.init_from_supernet=false")


def inherited_model(run_dir: RunDir, space: Space, arch: Arch, splits: Splits, *,
                    hint: str = "") -> MultiExitModel:
    """``arch``'s sub-network of ``RUN/supernet/weights.safetensors`` with BatchNorm
    re-estimated for its depths on the calibration batches: the model the search scored
    (train mode; global RNG untouched)."""
    from .supernet import Supernet, calibration_batches

    weights = supernet_weights(run_dir, hint=hint)
    with torch.random.fork_rng(devices=[]):
        net = Supernet(space, pretrained=False).load(weights)
    return net.extract(arch, calib=calibration_batches(space, splits)).train()


def backbone_model(run_dir: RunDir, space: Space, arch: Arch, splits: Splits) -> MultiExitModel:
    """``arch`` on stage 0's trained backbone (:func:`~exitnas.backbone.backbone_file`) with
    fresh early heads (seed ``retrain.seed``): its first ``depths[s]`` blocks of every stage.
    At full depth BatchNorm keeps the backbone's trained statistics; a shallower ``arch`` has
    them re-estimated for its depths on the calibration batches (train mode; global RNG
    untouched)."""
    from .backbone import backbone_file, load_backbone
    from .loop import seeded_supernet
    from .supernet import calibration_batches

    path = backbone_file(run_dir, space)
    net = seeded_supernet(space, space.retrain.seed, init=lambda n: load_backbone(n, path))
    calib = None if arch.depths == space.max_depths else calibration_batches(space, splits)
    return net.extract(arch, calib=calib).train()


def supernet_weights(run_dir: RunDir, *, hint: str = "") -> Path:
    """``RUN/supernet/weights.safetensors``, or a one-line RunDirError saying how to get it."""
    weights = run_dir.path / "supernet" / "weights.safetensors"
    if not weights.is_file():
        raise RunDirError(f"{weights}: not found; train the supernet first "
                          f"(`exitnas train-supernet`){' ' + hint if hint else ''}")
    return weights


def regime_phase(model: MultiExitModel, phase: int, *, epochs: int, optim: OptimConfig,
                 loss: ExitLoss, on_start: Callable[[int], None] | None = None) -> Phase:
    """Regime phase ``phase`` (1, 2 or 3) of ``model`` as a phase of :mod:`exitnas.loop`:
    phase 1 learns from the final exit's cross-entropy, phases 2 and 3 from ``loss`` over every
    exit (``progress`` = the share of all epochs done), on the batch its
    :meth:`~exitnas.losses.ExitLoss.before_step` returns; the loss's state is checkpointed."""
    module = PhaseForward(model, phase)

    def step(forward: nn.Module, x, y, epoch: Epoch) -> torch.Tensor:
        if phase == 1:
            return F.cross_entropy(forward(x)[-1], y)
        x, y = loss.before_step(module, x, y, epoch=epoch, optim=optim)
        return loss(forward(x), y, progress=epoch.progress)

    return Phase(epochs=epochs, optim=optim, forward=module, step=step,
                 trainable=lambda: set_phase(model, phase),
                 train_mode=lambda: train_mode(model, phase),
                 on_start=on_start or (lambda _epoch: None), name=f"phase {phase}",
                 columns={"phase": phase}, state=None if phase == 1 else loss)


def exit_accuracy_row(model: MultiExitModel, splits: Splits, space: Space,
                      device: torch.device) -> tuple[dict, str]:
    """Val accuracy of every exit of ``model`` (left in eval mode) as metrics-row entries
    ``val_acc_exit<k>`` / ``val_acc_final``, and the progress text."""
    model.eval()
    acc = accuracy(model, splits.val, splits, batch_size=space.data.eval_batch_size,
                   device=device)
    row = {f"val_acc_exit{k + 1}": a for k, a in enumerate(acc[:-1])}
    row["val_acc_final"] = acc[-1]
    return row, f"val acc per exit {' '.join(f'{a:.3f}' for a in acc)}"


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
    plan = phase_plan(regime, cfg.epochs, cfg.phase1_fraction, phase1=cfg.phase1)
    loss_fn = loss_from_config(cfg)
    loss_fn.check(regime=regime, space=space)
    per_rank_batch(space.data.batch_size, dist)
    out = retrain_dir(run_dir, arch, regime)
    identity = {"kind": "retrain", "space": space.name, "fingerprint": space.fingerprint,
                "arch": arch.id, "regime": regime}
    settings = retrain_settings(space, run_dir)
    state = open_checkpoint(out / "checkpoint.pt", identity=identity, settings=settings,
                            resume=resume, restart=restart)
    splits = splits or load_splits(space)
    loss_fn.prepare(space=space, splits=splits)
    model = initial_model(run_dir, space, arch, splits).to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    def on_start(phase: int) -> Callable[[int], None]:
        def start(epoch: int) -> None:
            if regime == "mixed" and phase == 2:
                reinit_heads(model, space, arch, seed=cfg.seed + 1)
            if on_phase_start is not None:
                on_phase_start(phase, epoch, model)
        return start

    phases = tuple(regime_phase(model, p, epochs=plan.count(p), optim=cfg.optim, loss=loss_fn,
                                on_start=on_start(p)) for p in dict.fromkeys(plan))
    spec = LoopSpec(name=regime, title="retraining", done_text="already retrained",
                    identity=identity, settings=settings, out=out, model=model, phases=phases,
                    evaluate=lambda: exit_accuracy_row(model, splits, space, dist.device),
                    seed=cfg.seed, final=out / "model.safetensors",
                    channels_last=cfg.channels_last)
    result = run_loop(spec, state, space=space, splits=splits, dist=dist, log=log)
    history = result.history
    if result.finished_before:
        _calibrate(model.eval(), spec.final, space, splits, dist, reuse=True)
        return RetrainResult(out, model, arch, regime, plan, history, result.resumed_from)
    set_phase(model, 2)  # leave every parameter trainable for whoever uses the model next
    model.eval()
    if dist.is_main:
        meta = {"space": space.name, "fingerprint": space.fingerprint, "arch": arch.id,
                "regime": regime}
        save_weights(spec.final, model.state_dict(), meta)
        _calibrate(model, spec.final, space, splits, dist, reuse=False)
        last = history[-1] if history else {}
        atomic_write_json(out / "arch.json", {
            "arch": arch.to_json(), "space": space.name, "fingerprint": space.fingerprint,
            "regime": regime, "loss": cfg.loss, "epochs": len(plan),
            "phase_epochs": {PHASE_NAMES[p]: plan.count(p) for p in sorted(set(plan))},
            "init_from_supernet": cfg.init_from_supernet, "phase1": cfg.phase1,
            "exit_names": model.exit_names,
            "val_accuracy": [last.get(f"val_acc_exit{k + 1}") for k in range(len(arch.exits))]
            + [last.get("val_acc_final")]})
    dist.barrier()
    return RetrainResult(out, model, arch, regime, plan, history, result.resumed_from)


def _calibrate(model: MultiExitModel, weights: Path, space: Space, splits: Splits, dist: Dist,
               *, reuse: bool) -> None:
    """Set ``model``'s temperatures by ``policy.calibration``: the stored ones (``reuse``: a
    finished run, same method, same weights) or fitted on val and stored beside ``weights``
    (rank 0 only; the other ranks keep T_k = 1)."""
    from .data import batches

    if not dist.is_main:
        return
    cal, reused = calibration.reuse_or_fit(
        model, weights, space.policy.calibration,
        lambda: batches(splits.val, batch_size=space.data.eval_batch_size, mean=splits.mean,
                        std=splits.std), reuse=reuse)
    model.set_temperatures(cal.temperatures)
    if not reused:
        calibration.store(weights, cal)


def load_retrained(run_dir: RunDir, arch: Arch, regime: str, space: Space) -> MultiExitModel:
    """The model written by :func:`retrain` (eval mode) with the temperatures stored beside
    it (none stored: T_k = 1)."""
    from .supernet import load_model

    path = retrain_dir(run_dir, arch, regime) / "model.safetensors"
    model = load_model(space, arch, path)
    fitted = calibration.load(path, model.num_exits)
    if fitted is not None:
        model.set_temperatures(fitted.temperatures)
    return model


__all__ = ["REGIMES", "phase_plan", "retrain", "RetrainResult", "retrain_dir", "set_phase",
           "train_mode", "reinit_heads", "backbone_modules", "load_retrained", "PhaseForward",
           "initial_model", "inherited_model", "backbone_model", "supernet_weights", "regime_phase",
           "exit_accuracy_row"]
