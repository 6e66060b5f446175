"""Supernet training (stage 1), and the public names of the shared training loop.

    space = load_space("search_spaces/quickstart.yaml")
    with distributed() as dist:                      # one process, or torchrun's group
        train_supernet(RunDir("runs/q"), space, dist=dist)

Supernet training follows BigNAS / AttentiveNAS: every step trains the largest, the smallest and
``supernet.random_subnets`` random depth settings (sandwich rule); the largest learns from the
labels, the others from the largest's final exit (in-place distillation, KL at
``supernet.distill_temperature``); with ``supernet.teacher: backbone`` every pass learns from
the labels plus distillation from the frozen trained backbone instead (Once-for-All's teacher),
so the full network is pulled back towards what stage 0 trained. Every candidate exit head active at a sampled depth is
computed and trained, so every head learns on every step (the largest pass activates them all).
Heads learn from their own losses on detached backbone features (see :class:`SandwichStep`):
the shared blocks are trained by the final exits, so dozens of candidate heads neither swamp
them nor each learn at a dozenth of the learning rate. How a pass's exit losses combine is a
``supernet.loss`` entry of :data:`~exitnas.losses.SUPERNET_LOSSES`.

The epoch loop, checkpoints, resume, metrics, NaN stop and DDP are :mod:`exitnas.loop`'s,
shared with the backbone, retraining and fine-tuning; its names are re-exported here. The
sampled sub-networks depend only on ``(seed, epoch)`` (``Epoch.rng``), so rerunning a killed
run from its last checkpoint ends with exactly the weights of an uninterrupted run (CPU, same
thread count). Under ``torchrun`` each rank trains on its shard, rank 0 alone writes files.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._config import to_dict
from .arch import sample_exits
from .data import Splits, load_splits
from .losses import build_supernet_loss, soft_distill
from .loop import (Dist, Epoch, LoopSpec, Phase, StepResult, accuracy, claim_step, default_device,
                   distributed, make_optimizer, make_scheduler, open_checkpoint, per_rank_batch,
                   read_metrics, rng_state, run_epoch, run_loop, seeded_supernet, set_rng_state,
                   train_batches, wrap_ddp, write_metrics)
from .rundir import RunDir
from .space import Space

# ---- supernet training ----------------------------------------------------------------------


def sandwich_depths(space: Space, rng: random.Random, n_random: int) -> list[tuple[int, ...]]:
    """Depth settings of one step after the largest: the smallest, then ``n_random`` drawn
    uniformly per stage."""
    out = [space.min_depths]
    for _ in range(n_random):
        out.append(tuple(rng.choice(allowed) for allowed in space.stage_depths))
    return out


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def exits_forward(net: nn.Module, x: torch.Tensor, depths: Sequence[int], *,
                  head_grad: float, full: frozenset = frozenset()) -> list[torch.Tensor]:
    """``net.forward_exits`` with every candidate exit at ``depths``; the gradient each early
    head sends back into the backbone is multiplied by ``head_grad`` (0 = heads learn on
    detached features), except for the exits in ``full``, whose gradient is passed whole."""
    exits = net.candidate_exits(depths)
    if head_grad == 1.0:
        return net.forward_exits(x, depths, exits)

    def hook(_module, args):
        if head_grad == 0.0:
            return (args[0].detach(),)
        return (_ScaleGrad.apply(args[0], head_grad),)

    handles = [net.heads[e.key].register_forward_pre_hook(hook) for e in exits if e not in full]
    try:
        return net.forward_exits(x, depths, exits)
    finally:
        for h in handles:
            h.remove()


class SandwichStep(nn.Module):
    """One supernet step as one forward (so DistributedDataParallel sees one graph): the
    largest network with every candidate exit learns from the labels; each of ``depths`` learns
    from the largest's final exit (or from the labels when ``distill`` is off), every candidate
    exit active. Returns the summed loss and the largest network's final-exit loss (detached).

    Per pass the loss is ``L_final + head_weight × Σ_h L_h`` over the H candidate heads that
    learn detached, and the gradient they send into the backbone is scaled so that the
    backbone sees ``L_final + head_share × mean_h L_h``. Each head thus learns from its own loss
    at a fixed strength however many candidate heads there are (a mean over heads would give
    each of dozens of heads a dozenth of a learning rate). Defaults, measured on the quickstart
    space: ``head_weight`` 0.5 (1.0 diverged at lr 0.05 while sdn_pool's mixing weight was
    unbounded; early heads sit in all 2 + n passes) and ``head_share`` 0 (heads on detached
    features: a share of 0.1-0.5 lowered both the final exit's and the heads' accuracy after
    3-8 epochs).

    ``exit_sets`` (``supernet.heads: sampled``; one per pass, the largest first) name the exits
    of the sub-network each pass stands for: those train the backbone as a multi-exit model
    does (``L_final + Σ_{e in set} L_e``, mean_ce's weighting up to a constant, the gradient
    passed whole), while the other candidate heads learn detached as above.

    With ``teacher`` (a frozen network; ``supernet.teacher: backbone``) every pass, the
    largest included, learns from ``CE(labels) + KL(teacher's final exit)`` at
    ``temperature``, its exits too.

    That combination is the ``sandwich`` entry of
    :data:`~exitnas.losses.SUPERNET_LOSSES`; ``loss`` names another entry, built with the same
    ``head_weight`` and ``head_share``."""

    def __init__(self, net: nn.Module, *, distill: bool, temperature: float,
                 head_weight: float = 0.5, head_share: float = 0.0,
                 loss: str = "sandwich", teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        # not a registered submodule: never trained, never switched to train mode, not in DDP
        self._teacher = (teacher,) if teacher is not None else ()
        self.distill = distill
        self.temperature = temperature
        self.head_weight = head_weight
        self.head_share = head_share
        self.loss = build_supernet_loss(loss, head_weight=head_weight, head_share=head_share)

    def _pass(self, x, depths, fn, sampled=()) -> tuple[torch.Tensor, torch.Tensor]:
        cands = self.net.candidate_exits(depths)
        full = frozenset(sampled)
        scale = self.loss.head_grad(len(cands) - len(full))
        logits = exits_forward(self.net, x, depths, head_grad=scale, full=full)
        detached = [z for e, z in zip(cands, logits) if e not in full]
        trained = [z for e, z in zip(cands, logits) if e in full]
        return self.loss(logits[-1], detached, trained, fn), logits[-1]

    def forward(self, x: torch.Tensor, y: torch.Tensor, depths: Sequence[tuple[int, ...]],
                exit_sets: Sequence[Sequence] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sets = list(exit_sets) if exit_sets is not None else [()] * (1 + len(depths))
        ce = lambda z: F.cross_entropy(z, y)  # noqa: E731
        if self._teacher:  # every pass: labels + the frozen backbone's final exit
            with torch.no_grad():
                soft = self._teacher[0].forward_exits(x, self.net.space.max_depths, ())[-1]
            ce = lambda z: (F.cross_entropy(z, y)  # noqa: E731
                            + soft_distill(z, soft, self.temperature))
        total, final = self._pass(x, self.net.space.max_depths, ce, sets[0])
        final = final.detach()
        kd = ce
        if self.distill and not self._teacher:  # in-place: from the largest's final exit
            kd = lambda z: soft_distill(z, final, self.temperature)  # noqa: E731
        for d, exits in zip(depths, sets[1:]):
            total = total + self._pass(x, d, kd, exits)[0]
        return total, F.cross_entropy(final, y)


def _supernet_eval(net, splits: Splits, space: Space, device) -> dict:
    """Val accuracy of the largest and smallest networks after BN recalibration (the
    evaluation cache's batches), on a copy so training is not affected."""
    from .supernet import calibration_batches

    probe = copy.deepcopy(net)
    out = {}
    for name, depths in (("largest", space.max_depths), ("smallest", space.min_depths)):
        probe.recalibrate_bn(depths, calibration_batches(space, splits, device=device))
        acc = accuracy(probe, splits.val, splits, depths=depths,
                       batch_size=space.data.eval_batch_size, device=device)
        out[f"val_acc_{name}"] = acc[-1]
        out[f"val_acc_{name}_exits"] = sum(acc[:-1]) / max(1, len(acc) - 1)
    return out


SupernetResult = StepResult  # the step's outputs (exitnas.loop.StepResult)


def supernet_settings(space: Space, backbone: Path | None = None) -> dict:
    """What shapes a supernet run (with the sha256 of the backbone it grows from); a
    checkpoint made with other values is not resumed."""
    from .runtime import sha256_file

    out = {"supernet": to_dict(space.supernet), "data": to_dict(space.data)}
    if backbone is not None:
        out["backbone_sha256"] = sha256_file(backbone)
    return out


def sandwich_phase(space: Space, net: nn.Module, teacher: nn.Module | None = None) -> Phase:
    """Supernet training as one phase of :mod:`exitnas.loop`: every parameter trains, each
    step runs the sandwich rule with depth settings (and exit sets) drawn from the epoch's
    rng; ``teacher`` is the frozen backbone of ``supernet.teacher: backbone``."""
    cfg = space.supernet

    def step(forward: nn.Module, x, y, epoch: Epoch) -> torch.Tensor:
        depths = sandwich_depths(space, epoch.rng, cfg.random_subnets)
        sets = None
        if cfg.heads == "sampled":
            sets = [sample_exits(space, d, epoch.rng) for d in (space.max_depths, *depths)]
        total, largest = forward(x, y, depths, sets)
        epoch.record("train_loss_largest_final", largest)
        return total

    module = SandwichStep(net, distill=cfg.distill, temperature=cfg.distill_temperature,
                          loss=cfg.loss, teacher=teacher)
    return Phase(epochs=cfg.epochs, optim=cfg.optim, forward=module, step=step)


def frozen_teacher(space: Space, backbone: Path, device) -> nn.Module:
    """The trained backbone as a frozen teacher: eval mode (BatchNorm keeps its trained
    statistics), no gradients, on ``device``."""
    from .backbone import load_backbone

    teacher = load_backbone(seeded_supernet(space, space.supernet.seed), backbone)
    teacher.to(device).eval().requires_grad_(False)
    if space.supernet.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher


def train_supernet(run_dir: RunDir, space: Space, *, dist: Dist | None = None,
                   resume: bool = False, restart: bool = False, splits: Splits | None = None,
                   log: Callable[[str], None] | None = print) -> SupernetResult:
    """Train the supernet of ``space`` into ``RUN/supernet/`` (see module docs). Continues from
    ``RUN/supernet/checkpoint.pt`` when it matches this space and these settings; a finished
    run is returned as is."""
    from .backbone import backbone_file, load_backbone

    dist = dist or Dist(device=default_device())
    cfg = space.supernet
    out = run_dir.path / "supernet"
    if run_dir.exists() and run_dir.space().fingerprint != space.fingerprint:
        run_dir.init(space)  # raises first: another space's run directory, nothing written
    backbone = backbone_file(run_dir, space) if cfg.init == "backbone" else None
    settings = supernet_settings(space, backbone)
    identity, state = claim_step(run_dir, space, kind="supernet", out=out, settings=settings,
                                 dist=dist, resume=resume, restart=restart)
    net = seeded_supernet(space, cfg.seed)
    if backbone is not None:
        load_backbone(net, backbone)
        if log and dist.is_main:
            log(f"growing the supernet from the trained backbone {backbone}")
    net.to(dist.device)
    teacher = frozen_teacher(space, backbone, dist.device) if cfg.teacher == "backbone" else None
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    splits = splits or load_splits(space)

    def evaluate() -> tuple[dict, str]:
        row = _supernet_eval(net, splits, space, dist.device)
        return row, (f"val acc largest {row['val_acc_largest']:.3f} smallest "
                     f"{row['val_acc_smallest']:.3f}")

    spec = LoopSpec(name="supernet", title="supernet training",
                    done_text="supernet already trained", identity=identity, settings=settings,
                    out=out, model=net, phases=(sandwich_phase(space, net, teacher),),
                    evaluate=evaluate,
                    seed=cfg.seed, final=out / "weights.safetensors",
                    channels_last=cfg.channels_last)
    result = run_loop(spec, state, space=space, splits=splits, dist=dist, log=log)
    if dist.is_main and not result.finished_before:
        net.save(spec.final)
    dist.barrier()
    return SupernetResult(spec.final, spec.checkpoint, spec.metrics, cfg.epochs,
                          result.history, result.resumed_from)


__all__ = ["Dist", "distributed", "default_device", "wrap_ddp", "make_optimizer",
           "make_scheduler", "open_checkpoint", "write_metrics", "read_metrics", "run_epoch",
           "train_batches", "sandwich_depths", "SandwichStep", "sandwich_phase",
           "exits_forward", "accuracy", "train_supernet", "SupernetResult", "rng_state",
           "set_rng_state", "per_rank_batch"]
