"""The one training loop every step uses: phases, checkpoint / resume, metrics, NaN stop, DDP.

    spec = LoopSpec(name="supernet", title="supernet training", done_text="supernet already "
                    "trained", identity=identity, settings=settings, out=RUN / "supernet",
                    model=net, phases=(Phase(epochs=10, optim=cfg.optim, forward=step_module,
                                             step=step),),
                    evaluate=evaluate, seed=cfg.seed, final=RUN / "supernet/weights.safetensors")
    state = open_checkpoint(spec.checkpoint, identity=identity, settings=settings,
                            resume=False, restart=False)
    result = run_loop(spec, state, space=space, splits=splits, dist=dist, log=print)

A step module (backbone, supernet, retrain, finetune) says only what is specific to it: what
identifies a run and which settings shape it, its phases (epochs, which parameters train,
optimizer and schedule, the graph of one step, the loss of one step), how an epoch is
evaluated, and what it writes when training is done. The loop does the rest the same way for
every step:

- Each phase makes its parameters trainable (``Phase.trainable``) before anything else, then
  wraps its ``forward`` module in DistributedDataParallel (one graph per phase; a fresh
  wrapper per phase), and makes its own optimizer over the parameters that require grad and
  its own per-step schedule over its own epochs.
- The data order of an epoch, and the ``random.Random`` a step draws from (``Epoch.rng``),
  depend only on ``(seed, epoch)``.
- After every epoch rank 0 evaluates, appends a metrics row and writes the checkpoint
  atomically (model, optimizer, scheduler, RNG state, every row so far, identity and
  settings), then rewrites ``metrics.csv`` from the rows. So a killed run resumed from its
  last checkpoint ends with exactly the weights of an uninterrupted one (same device and thread
  count): inside a phase its optimizer and schedule go on; at a phase boundary the next phase
  starts as it would have.
- A non-finite loss on any rank stops training before the weights change
  (:class:`~exitnas.errors.TrainingError`); the last good checkpoint is kept.
- A finished checkpoint whose ``final`` output exists is returned as is, nothing written.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ._dist import (Dist, default_device, distributed, per_rank_batch, rng_state,
                    set_rng_state, wrap_ddp)
from ._checkpoint import open_checkpoint, read_metrics, write_metrics
from .data import Splits, batches
from .errors import TrainingError
from .io import save_checkpoint
from .space import OptimConfig, Space

# ---- optimizer, schedule, data --------------------------------------------------------------


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over those of ``params`` that require grad."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, epochs: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up over ``warmup_epochs``, then cosine to 0 (or constant)."""
    total = max(1, epochs * steps_per_epoch)
    warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_batches(splits: Splits, space: Space, *, seed: int, epoch: int, dist: Dist,
                  batch_size: int) -> tuple[Iterator, int]:
    """This rank's augmented training batches for ``epoch`` and how many there are. The order
    depends only on ``(seed, epoch)``; every rank draws the same permutation and takes its
    shard."""
    n = len(splits.train) // dist.world
    drop = n >= batch_size  # full batches only, unless the set is smaller than one batch
    steps = n // batch_size if drop else 1
    it = batches(splits.train, batch_size=batch_size, mean=splits.mean, std=splits.std,
                 shuffle=True, augment_images=space.data.augment, seed=seed * 100_003 + epoch,
                 drop_last=drop, rank=dist.rank, world=dist.world)
    return it, steps


def run_epoch(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], data: Iterator,
              *, steps: int, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, dist: Dist, where: str,
              channels_last: bool = False) -> float:
    """One pass over ``data``: ``step(x, y)`` runs forward and backward and returns the loss;
    then the optimizer and scheduler step. A non-finite loss (on any rank) raises
    TrainingError before the weights change. Returns the mean loss."""
    from tqdm import tqdm

    total, count = 0.0, 0
    bar = tqdm(data, total=steps, desc=where, leave=False, disable=None if dist.is_main else True)
    for i, (x, y) in enumerate(bar):
        x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        value = dist.mean(step(x, y))
        if not math.isfinite(value):
            raise TrainingError(f"{where}, step {i + 1}: loss is {value}; stopped (lower the "
                                "learning rate or check the data); the last good checkpoint "
                                "is kept")
        optimizer.step()
        scheduler.step()
        total += value
        count += 1
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    bar.close()
    return total / max(1, count)


@torch.no_grad()
def accuracy(net: nn.Module, data, splits: Splits, *, depths=None, batch_size: int,
             device: torch.device) -> list[float]:
    """Accuracy of every exit over ``data`` (an ImageSet): a Supernet at ``depths`` (every
    candidate exit) or a MultiExitModel (its exits)."""
    correct, n = None, 0
    for x, y in batches(data, batch_size=batch_size, mean=splits.mean, std=splits.std):
        x, y = x.to(device), y.to(device)
        out = net.forward_exits(x, depths) if depths is not None else net.forward_exits(x)
        hits = torch.stack([(z.argmax(1) == y).sum() for z in out]).cpu()
        correct = hits if correct is None else correct + hits
        n += len(y)
    return (correct.double() / max(1, n)).tolist()


# ---- the spec of a training run -------------------------------------------------------------


@dataclass
class Epoch:
    """What a step sees of its epoch: ``index`` (0-based) of ``total``, ``rng`` seeded by
    ``(seed, index)``, and :meth:`record` for per-step values averaged into the metrics row."""

    index: int
    total: int
    rng: random.Random
    records: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """Share of training done when the epoch starts, in [0, 1)."""
        return self.index / self.total

    def record(self, name: str, value: torch.Tensor) -> None:
        """Keep a detached scalar; the row gets its mean over the epoch and the ranks."""
        self.records.setdefault(name, []).append(value.detach())


Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, Epoch], torch.Tensor]


def _nothing(*_args) -> None:
    return None


@dataclass(frozen=True, kw_only=True)
class Phase:
    """Consecutive epochs trained one way. ``trainable()`` sets ``requires_grad`` for the
    phase; ``forward`` is the module one step runs (wrapped in DDP); ``step(forward, x, y,
    epoch)`` returns the loss (the loop runs backward). ``on_start(epoch)`` runs when the
    phase starts (not when a run resumes inside it), after ``trainable``; ``train_mode()``
    before every epoch (default: the model's ``train()``). ``name`` goes into progress text
    ("epoch 3/4 (phase 2)"), ``columns`` into every metrics row. ``state``: something else
    the phase learns (``state_dict()`` / ``load_state_dict()``, e.g. a loss's weight net),
    kept in the checkpoint when its state is not empty and restored when a run resumes inside
    the phase."""

    epochs: int
    optim: OptimConfig
    forward: nn.Module
    step: Step
    trainable: Callable[[], None] = _nothing
    on_start: Callable[[int], None] = _nothing
    train_mode: Callable[[], None] | None = None
    name: str = ""
    columns: dict = field(default_factory=dict)
    state: Any = None


@dataclass(frozen=True, kw_only=True)
class LoopSpec:
    """One training run. ``name`` starts progress text ("supernet epoch 1/10"), ``title``
    the resume message ("resuming supernet training from ..."), ``done_text`` the message of a
    finished run. ``identity`` and ``settings`` must match for a checkpoint to be resumed (see
    :func:`open_checkpoint`). ``evaluate()`` runs on rank 0 after every epoch and returns
    metrics-row entries and a short text for the progress line. ``final`` is the step's own
    output, written by the caller after the loop."""

    name: str
    title: str
    done_text: str
    identity: dict
    settings: dict
    out: Path
    model: nn.Module
    phases: tuple[Phase, ...]
    evaluate: Callable[[], tuple[dict, str]]
    seed: int
    final: Path
    channels_last: bool = False

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.csv"

    @property
    def epochs(self) -> int:
        return sum(p.epochs for p in self.phases)


@dataclass(frozen=True)
class LoopResult:
    history: list[dict]
    resumed_from: int
    finished_before: bool  # the checkpoint was finished and ``final`` existed: nothing ran


# ---- the loop -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    spec: LoopSpec
    space: Space
    splits: Splits
    dist: Dist
    say: Callable[[str], None]
    batch: int
    history: list[dict]


@dataclass(frozen=True)
class StepResult:
    """What a finished training step left: its final weights, checkpoint and metrics, its
    epochs, the metrics rows and the epoch it resumed from (0: a fresh run)."""

    weights: Path
    checkpoint: Path
    metrics: Path
    epochs: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def claim_step(run_dir, space: Space, *, kind: str, out: Path, settings: dict, dist: Dist,
               resume: bool, restart: bool) -> tuple[dict, dict | None]:
    """Start a training step on ``run_dir``: refuse another space's run directory (nothing
    written), open ``out/checkpoint.pt`` for this step's identity and ``settings``, check the
    batch splits over the ranks, and record the space (rank 0). Returns (identity, state)."""
    if run_dir.exists() and run_dir.space().fingerprint != space.fingerprint:
        run_dir.init(space)  # raises: another space's run directory, nothing written
    identity = {"kind": kind, "space": space.name, "fingerprint": space.fingerprint}
    state = open_checkpoint(out / "checkpoint.pt", identity=identity, settings=settings,
                            resume=resume, restart=restart)
    per_rank_batch(space.data.batch_size, dist)
    if dist.is_main:
        run_dir.init(space)
    dist.barrier()
    return identity, state


def seeded_supernet(space: Space, seed: int, *, init=None):
    """A Supernet initialised from ``seed`` without moving the global RNG; ``init(net)``
    (e.g. loading a backbone) runs before it is returned."""
    from .supernet import Supernet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Supernet(space, pretrained=False)
    if init is not None:
        init(net)
    return net


def run_loop(spec: LoopSpec, state: dict | None, *, space: Space, splits: Splits, dist: Dist,
             log: Callable[[str], None] | None = print) -> LoopResult:
    """Train ``spec`` from ``state`` (a checkpoint from :func:`open_checkpoint`, or None)."""
    say = log if (log and dist.is_main) else _nothing
    start, history = 0, []
    if state is not None:
        spec.model.load_state_dict(state["model"])
        set_rng_state(state["rng"])
        start, history = int(state["epoch"]), list(state["metrics"])
        if start >= spec.epochs and spec.final.is_file():
            say(f"{spec.done_text} ({start} epochs): {spec.final}")
            return LoopResult(history, start, True)
        say(f"resuming {spec.title} from {spec.checkpoint} (epoch {start}/{spec.epochs})")
    run = _Run(spec, space, splits, dist, say, per_rank_batch(space.data.batch_size, dist),
               history)
    first = 0
    for i, phase in enumerate(spec.phases):
        if start < first + phase.epochs:
            _run_phase(run, i, first, max(start, first), state)
        first += phase.epochs
    return LoopResult(history, start, False)


def _run_phase(run: _Run, index: int, first: int, start: int, state: dict | None) -> None:
    """Epochs ``start..`` of phase ``index``, which begins at epoch ``first``."""
    spec, phase, dist = run.spec, run.spec.phases[index], run.dist
    phase.trainable()
    if start == first:
        phase.on_start(first)
    forward = wrap_ddp(phase.forward, dist)
    _, steps = train_batches(run.splits, run.space, seed=spec.seed, epoch=first, dist=dist,
                             batch_size=run.batch)
    optimizer = make_optimizer(spec.model.parameters(), phase.optim)
    scheduler = make_scheduler(optimizer, phase.optim, epochs=phase.epochs,
                               steps_per_epoch=steps)
    if start > first:  # resumed inside the phase: its optimizer and schedule go on
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if phase.state is not None and "phase_state" in state:
            phase.state.load_state_dict(state["phase_state"])
    for epoch in range(start, first + phase.epochs):
        _run_one_epoch(run, index, epoch, forward, optimizer, scheduler)


def _run_one_epoch(run: _Run, index: int, epoch: int, forward: nn.Module, optimizer,
                   scheduler) -> None:
    spec, phase, dist = run.spec, run.spec.phases[index], run.dist
    t0 = time.perf_counter()
    (phase.train_mode or spec.model.train)()
    ctx = Epoch(epoch, spec.epochs, random.Random(spec.seed * 100_003 + epoch))

    def step(x, y):
        loss = phase.step(forward, x, y, ctx)
        loss.backward()
        return loss

    data, steps = train_batches(run.splits, run.space, seed=spec.seed, epoch=epoch, dist=dist,
                                batch_size=run.batch)
    lr = optimizer.param_groups[0]["lr"]
    where = f"{spec.name} epoch {epoch + 1}/{spec.epochs}" + (f" ({phase.name})" if phase.name
                                                               else "")
    loss = run_epoch(step, data, steps=steps, optimizer=optimizer, scheduler=scheduler,
                     dist=dist, where=where, channels_last=spec.channels_last)
    row = {"epoch": epoch + 1, **phase.columns, "lr": lr, "train_loss": loss}
    row.update({k: dist.mean(torch.stack(v).mean()) for k, v in ctx.records.items()})
    if dist.is_main:
        values, text = spec.evaluate()
        row.update(values)
        row["seconds"] = time.perf_counter() - t0
        run.history.append(row)
        extra = phase.state.state_dict() if phase.state is not None else {}
        save_checkpoint(spec.checkpoint, {
            "identity": spec.identity, "settings": spec.settings, "epoch": epoch + 1,
            "phase": index, "model": spec.model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_state(), "metrics": run.history,
            **({"phase_state": extra} if extra else {})})
        write_metrics(spec.metrics, run.history)
        run.say(f"{where}: loss {loss:.4f}, {text} ({row['seconds']:.1f} s)")
    dist.barrier()


__all__ = ["LoopSpec", "Phase", "Epoch", "LoopResult", "run_loop", "run_epoch", "train_batches",
           "make_optimizer", "make_scheduler", "accuracy", "open_checkpoint", "write_metrics",
           "read_metrics", "Dist", "distributed", "default_device", "wrap_ddp",
           "per_rank_batch", "rng_state", "set_rng_state"]
