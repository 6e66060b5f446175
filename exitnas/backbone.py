"""Stage 0: the full-depth backbone with its final exit only.

    result = train_backbone(RunDir("runs/q"), space)      # -> RUN/backbone/weights.safetensors
    net = load_backbone(Supernet(space), result.weights)  # stage 1 grows the supernet from it

The backbone is the supernet at every stage's largest depth with no early exit: stem, blocks
and final head, trained with the cross-entropy of the final exit (``backbone_training``
settings). It is phase 1 of the ``disjoint`` and ``mixed`` regimes, and the network the
supernet is grown from (Once-for-All: train the largest network first, then add elasticity).
Its weights file holds only backbone tensors (``stem.*``, ``stages.*``, ``final.*``), named as
in :class:`~exitnas.supernet.Supernet`, so it loads into a supernet of any exit settings.

Training runs in :mod:`exitnas.loop` as one phase that trains the backbone's parameters only
(the exit heads get no gradient, so DDP waits for none): checkpoints after every epoch, resume
after kill -9 with the weights of an uninterrupted run, NaN stop, ``torchrun``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._config import to_dict
from .data import Splits, load_splits
from .errors import CheckpointError
from .io import load_state_dict, save_weights
from .loop import (Dist, LoopSpec, Phase, StepResult, accuracy, claim_step, default_device,
                   run_loop, seeded_supernet)
from .rundir import RunDir
from .space import Space

BACKBONE_PREFIXES = ("stem.", "stages.", "final.")


BackboneResult = StepResult  # the step's outputs (exitnas.loop.StepResult)


def backbone_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a supernet's state dict (no exit heads)."""
    return {k: v for k, v in net.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}


def _renamed(state: dict[str, torch.Tensor], sources) -> dict[str, torch.Tensor]:
    """``state`` in the supernet's names via ``sources`` (supernet path, source path); a
    tensor from no source module keeps its own name (so it is the one reported unexpected)."""
    by_len = sorted(sources, key=lambda ps: -len(ps[1]))
    out = {}
    for key, t in state.items():
        hit = next(((ours, theirs) for ours, theirs in by_len if key.startswith(theirs + ".")), None)
        out[key if hit is None else hit[0] + key[len(hit[1]):]] = t
    return out


def load_backbone(net, path: str | Path):
    """Load backbone weights into supernet ``net``; its exit heads keep their weights. The
    file is :func:`train_backbone`'s (exitnas's names) or, for a family with ``sources``
    (torchvision), the source model's state dict, renamed. ``.safetensors``, or ``.pth`` /
    ``.pt`` read with ``weights_only``. Every backbone tensor must be present with its shape,
    and nothing else may be in the file."""
    state = load_state_dict(path)  # refuses pickles that are not plain tensors
    want = backbone_state(net)
    if net.sources and not set(state) <= set(want):
        state = _renamed(state, net.sources)
    extra = sorted(set(state) - set(want))
    missing = sorted(set(want) - set(state))
    if extra or missing:
        what = f"unexpected tensor {extra[0]!r}" if extra else f"missing tensor {missing[0]!r}"
        raise CheckpointError(f"{path}: not a backbone of space {net.space.name!r} ({what})")
    for name, t in state.items():
        if t.shape != want[name].shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(t.shape)}, the "
                                  f"backbone of space {net.space.name!r} needs "
                                  f"{list(want[name].shape)}")
    net.load_state_dict(state, strict=False)
    return net


def backbone_file(run_dir: RunDir, space: Space) -> Path:
    """The trained backbone a supernet grows from: ``backbone.weights`` when set (a file, or
    what the family resolves, e.g. ``torchvision:IMAGENET1K_V2``), else
    ``RUN/backbone/weights.safetensors``; a one-line RunDirError says how to get one."""
    from .errors import RunDirError

    if space.backbone.weights is not None:
        return weights_path(space)
    path = run_dir.path / "backbone" / "weights.safetensors"
    if not path.is_file():
        raise RunDirError(f"{run_dir.path}: no trained backbone to grow the supernet from (no "
                          "backbone/weights.safetensors); run `exitnas train-backbone` first, set "
                          "backbone.weights, or set supernet.init=scratch")
    return path


def weights_path(space: Space) -> Path:
    """The local file ``backbone.weights`` names: the family's resolution of it (a
    download cache) or the path itself, which must exist."""
    from .errors import RunDirError

    spec = space.backbone.weights
    path = space.family.weights_file(space.backbone) or Path(spec)
    if not path.is_file():
        raise RunDirError(f"backbone.weights {spec!r}: file not found")
    return path


class _FinalExitStep(nn.Module):
    """The backbone's forward and loss as one module (so DDP sees one graph)."""

    def __init__(self, net: nn.Module, *, label_smoothing: float) -> None:
        super().__init__()
        self.net, self.label_smoothing = net, label_smoothing

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.net.forward_exits(x, self.net.space.max_depths, exits=())[-1]
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)


def backbone_settings(space: Space) -> dict:
    """What shapes a backbone run; a checkpoint made with other values is not resumed."""
    return {"backbone_training": to_dict(space.backbone_training), "data": to_dict(space.data)}


def train_backbone(run_dir: RunDir, space: Space, *, dist: Dist | None = None,
                   resume: bool = False, restart: bool = False, splits: Splits | None = None,
                   log: Callable[[str], None] | None = print) -> BackboneResult:
    """Train the full-depth backbone of ``space`` into ``RUN/backbone/`` (module docs).
    Continues from ``RUN/backbone/checkpoint.pt`` when it matches this space and these
    settings; a finished run is returned as is."""
    dist = dist or Dist(device=default_device())
    cfg = space.backbone_training
    out = run_dir.path / "backbone"
    settings = backbone_settings(space)
    identity, state = claim_step(run_dir, space, kind="backbone", out=out, settings=settings,
                                 dist=dist, resume=resume, restart=restart)
    net = seeded_supernet(space, cfg.seed)
    net.to(dist.device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    splits = splits or load_splits(space)

    def trainable() -> None:  # exit heads are not part of stage 0
        for k, p in net.named_parameters():
            p.requires_grad_(k.startswith(BACKBONE_PREFIXES))

    def evaluate() -> tuple[dict, str]:
        net.eval()
        val = accuracy(net, splits.val, splits, depths=space.max_depths,
                       batch_size=space.data.eval_batch_size, device=dist.device)[-1]
        return {"val_acc": val}, f"val acc {val:.4f}"

    phase = Phase(epochs=cfg.epochs, optim=cfg.optim, trainable=trainable,
                  forward=_FinalExitStep(net, label_smoothing=cfg.label_smoothing),
                  step=lambda forward, x, y, _epoch: forward(x, y))
    spec = LoopSpec(name="backbone", title="backbone training",
                    done_text="backbone already trained", identity=identity, settings=settings,
                    out=out, model=net, phases=(phase,), evaluate=evaluate, seed=cfg.seed,
                    final=out / "weights.safetensors", channels_last=cfg.channels_last)
    result = run_loop(spec, state, space=space, splits=splits, dist=dist, log=log)
    if dist.is_main and not result.finished_before:
        save_weights(spec.final, backbone_state(net),
                     {"space": space.name, "fingerprint": space.fingerprint, "kind": "backbone"})
    dist.barrier()
    return BackboneResult(spec.final, spec.checkpoint, spec.metrics, cfg.epochs, result.history,
                          result.resumed_from)


__all__ = ["train_backbone", "load_backbone", "backbone_state", "backbone_file", "weights_path",
           "BackboneResult",
           "BACKBONE_PREFIXES"]
