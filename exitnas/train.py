"""Training: the shared loop pieces and supernet training.

    space = load_space("search_spaces/quickstart.yaml")
    with distributed() as dist:                      # one process, or torchrun's group
        train_supernet(RunDir("runs/q"), space, dist=dist)

Supernet training follows BigNAS / AttentiveNAS: every step trains the largest, the smallest and
``supernet.random_subnets`` random depth settings (sandwich rule); the largest learns from the
labels, the others from the largest's final exit (in-place distillation, KL at
``supernet.distill_temperature``). Every candidate exit head active at a sampled depth is
computed and trained, so every head learns on every step (the largest pass activates them all).
Heads learn from their own losses on detached backbone features (see :class:`SandwichStep`):
the shared blocks are trained by the final exits, so dozens of candidate heads neither swamp
them nor each learn at a dozenth of the learning rate.

Checkpoints are written atomically after every epoch (model, optimizer, scheduler, RNG state,
metrics so far, and the settings that shaped the run). The data order and the sampled
sub-networks depend only on ``(seed, epoch)``, so rerunning a killed run from its last
checkpoint ends with exactly the weights of an uninterrupted run (CPU, same thread count).

Under ``torchrun`` (``WORLD_SIZE`` set) a process group is started (NCCL on GPU, gloo on CPU),
each rank trains on its shard of every epoch with ``data.batch_size / world`` images per step
(the global batch is unchanged), gradients are averaged by DistributedDataParallel, and rank 0
alone writes files.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._config import to_dict
from .arch import sample_exits
from .data import Splits, batches, load_splits
from .errors import CheckpointError, ConfigError, TrainingError
from .io import atomic_write_text, load_checkpoint, save_checkpoint
from .losses import soft_distill
from .rundir import RunDir
from .space import OptimConfig, Space

# ---- devices and process groups ------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """Where this process trains: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    enabled: bool = False  # a torch.distributed process group is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar over all ranks (every rank gets the same float)."""
        value = value.detach().float().reshape(1)
        if self.enabled:
            torch.distributed.all_reduce(value)
            value = value / self.world
        return float(value.item())


def default_device() -> torch.device:
    """``EXITNAS_DEVICE`` if set (e.g. ``cpu``), else CUDA when available, else CPU."""
    name = os.environ.get("EXITNAS_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def distributed() -> Iterator[Dist]:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` set), else yield a
    single-process :class:`Dist`. The group is torn down on exit."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        yield Dist(device=default_device())
        return
    dist = torch.distributed
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = default_device()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Dist(rank=rank, world=world, device=device, enabled=True)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(module: nn.Module, dist: Dist) -> nn.Module:
    """DistributedDataParallel around ``module`` when a process group is up."""
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def per_rank_batch(batch_size: int, dist: Dist) -> int:
    if batch_size % dist.world:
        raise ConfigError(f"{batch_size} is not divisible by the {dist.world} training processes",
                          path="data.batch_size")
    return batch_size // dist.world


# ---- optimizer and schedule -----------------------------------------------------------------


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
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


# ---- checkpoints, resume and metrics --------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def open_checkpoint(path: Path, *, identity: dict, settings: dict, resume: bool,
                    restart: bool) -> dict | None:
    """The checkpoint to continue from, or None to start fresh.

    Without a checkpoint: fresh (``resume`` demands one). With one: it must have been made for
    the same ``identity`` (kind, space, arch, regime...) and the same ``settings``, else a
    one-line CheckpointError says what differs. ``restart`` ignores it (it is replaced when the
    first new epoch ends)."""
    if restart:
        return None
    if not path.is_file():
        if resume:
            raise CheckpointError(f"{path}: nothing to resume (no checkpoint yet); "
                                  "run without --resume to start")
        return None
    state = load_checkpoint(path)
    old_id = state.get("identity")
    if not isinstance(old_id, dict) or "epoch" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not an exitnas training checkpoint")
    for key, want in identity.items():
        if old_id.get(key) != want:
            raise CheckpointError(f"{path}: checkpoint belongs to {key} {old_id.get(key)!r}, "
                                  f"not {want!r}; refusing to resume from it")
    old, new = _flatten(state.get("settings", {})), _flatten(settings)
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if diff:
        k = diff[0]
        raise CheckpointError(f"{path}: made with {k}={old.get(k)!r}, this run has "
                              f"{k}={new.get(k)!r}; rerun with the same settings to resume, "
                              "or pass --restart to start over")
    return state


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite the metrics CSV from the history kept in the checkpoint (so a resumed run never
    duplicates or loses a row)."""
    if not rows:
        return
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---- the epoch loop -------------------------------------------------------------------------


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


# ---- supernet training ----------------------------------------------------------------------


def sandwich_depths(space: Space, rng: random.Random, n_random: int) -> list[tuple[int, ...]]:
    """Depth settings of one step after the largest: the smallest, then ``n_random`` drawn
    uniformly per stage."""
    out = [space.min_depths]
    for _ in range(n_random):
        out.append(tuple(rng.choice(st.depths) for st in space.backbone.stages))
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
    passed whole), while the other candidate heads learn detached as above."""

    def __init__(self, net: nn.Module, *, distill: bool, temperature: float,
                 head_weight: float = 0.5, head_share: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.distill = distill
        self.temperature = temperature
        self.head_weight = head_weight
        self.head_share = head_share

    def _pass(self, x, depths, fn, sampled=()) -> tuple[torch.Tensor, torch.Tensor]:
        cands = self.net.candidate_exits(depths)
        full = frozenset(sampled)
        scale = self.head_share / max(1, len(cands) - len(full)) / self.head_weight
        logits = exits_forward(self.net, x, depths, head_grad=scale, full=full)
        loss = fn(logits[-1])
        detached = [fn(z) for e, z in zip(cands, logits) if e not in full]
        if detached:
            loss = loss + self.head_weight * torch.stack(detached).sum()
        trained = [fn(z) for e, z in zip(cands, logits) if e in full]
        if trained:
            loss = loss + torch.stack(trained).sum()
        return loss, logits[-1]

    def forward(self, x: torch.Tensor, y: torch.Tensor, depths: Sequence[tuple[int, ...]],
                exit_sets: Sequence[Sequence] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sets = list(exit_sets) if exit_sets is not None else [()] * (1 + len(depths))
        ce = lambda z: F.cross_entropy(z, y)  # noqa: E731
        total, final = self._pass(x, self.net.space.max_depths, ce, sets[0])
        teacher = final.detach()
        kd = (lambda z: soft_distill(z, teacher, self.temperature)) if self.distill else ce
        for d, exits in zip(depths, sets[1:]):
            total = total + self._pass(x, d, kd, exits)[0]
        return total, F.cross_entropy(teacher, y)


@torch.no_grad()
def accuracy(net: nn.Module, data, splits: Splits, *, depths=None, batch_size: int,
             device: torch.device) -> list[float]:
    """Accuracy of every exit over ``data`` (a TensorSet): a Supernet at ``depths`` (every
    candidate exit) or a MultiExitModel (its exits)."""
    correct, n = None, 0
    for x, y in batches(data, batch_size=batch_size, mean=splits.mean, std=splits.std):
        x, y = x.to(device), y.to(device)
        out = net.forward_exits(x, depths) if depths is not None else net.forward_exits(x)
        hits = torch.stack([(z.argmax(1) == y).sum() for z in out]).cpu()
        correct = hits if correct is None else correct + hits
        n += len(y)
    return (correct.double() / max(1, n)).tolist()


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


@dataclass(frozen=True)
class SupernetResult:
    weights: Path
    checkpoint: Path
    metrics: Path
    epochs: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def supernet_settings(space: Space, backbone: Path | None = None) -> dict:
    """What shapes a supernet run (with the sha256 of the backbone it grows from); a
    checkpoint made with other values is not resumed."""
    from .backbone import file_sha256

    out = {"supernet": to_dict(space.supernet), "data": to_dict(space.data)}
    if backbone is not None:
        out["backbone_sha256"] = file_sha256(backbone)
    return out


def train_supernet(run_dir: RunDir, space: Space, *, dist: Dist | None = None,
                   resume: bool = False, restart: bool = False, splits: Splits | None = None,
                   log: Callable[[str], None] | None = print) -> SupernetResult:
    """Train the supernet of ``space`` into ``RUN/supernet/`` (see module docs). Continues from
    ``RUN/supernet/checkpoint.pt`` when it matches this space and these settings; a finished
    run is returned as is."""
    from .supernet import Supernet

    dist = dist or Dist(device=default_device())
    cfg = space.supernet
    out = run_dir.path / "supernet"
    paths = SupernetResult(out / "weights.safetensors", out / "checkpoint.pt",
                           out / "metrics.csv", cfg.epochs)
    if run_dir.exists() and run_dir.space().fingerprint != space.fingerprint:
        run_dir.init(space)  # raises: another space's run directory, nothing written
    identity = {"kind": "supernet", "space": space.name, "fingerprint": space.fingerprint}
    from .backbone import backbone_file, load_backbone

    backbone = backbone_file(run_dir, space) if cfg.init == "backbone" else None
    settings = supernet_settings(space, backbone)
    state = open_checkpoint(paths.checkpoint, identity=identity, settings=settings,
                            resume=resume, restart=restart)
    batch = per_rank_batch(space.data.batch_size, dist)
    if dist.is_main:
        run_dir.init(space)
    dist.barrier()
    say = log if (log and dist.is_main) else (lambda _msg: None)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = Supernet(space)
    if backbone is not None:
        load_backbone(net, backbone)
        say(f"growing the supernet from the trained backbone {backbone}")
    net.to(dist.device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    splits = splits or load_splits(space)
    step_module = SandwichStep(net, distill=cfg.distill, temperature=cfg.distill_temperature)
    model = wrap_ddp(step_module, dist)
    _, steps = train_batches(splits, space, seed=cfg.seed, epoch=0, dist=dist, batch_size=batch)
    optimizer = make_optimizer(net.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, epochs=cfg.epochs, steps_per_epoch=steps)
    start, history = 0, []
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, history = int(state["epoch"]), list(state["metrics"])
        if start >= cfg.epochs and paths.weights.is_file():
            say(f"supernet already trained ({start} epochs): {paths.weights}")
            return SupernetResult(paths.weights, paths.checkpoint, paths.metrics, cfg.epochs,
                                  history, start)
        say(f"resuming supernet training from {paths.checkpoint} (epoch {start}/{cfg.epochs})")

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        rng = random.Random(cfg.seed * 100_003 + epoch)
        largest_losses: list[torch.Tensor] = []

        def step(x, y):
            depths = sandwich_depths(space, rng, cfg.random_subnets)
            sets = None
            if cfg.heads == "sampled":
                sets = [sample_exits(space, d, rng) for d in (space.max_depths, *depths)]
            total, largest = model(x, y, depths, sets)
            total.backward()
            largest_losses.append(largest)
            return total

        data, steps = train_batches(splits, space, seed=cfg.seed, epoch=epoch, dist=dist,
                                    batch_size=batch)
        lr = optimizer.param_groups[0]["lr"]
        loss = run_epoch(step, data, steps=steps, optimizer=optimizer, scheduler=scheduler,
                         dist=dist, where=f"supernet epoch {epoch + 1}/{cfg.epochs}",
                         channels_last=cfg.channels_last)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss,
               "train_loss_largest_final": dist.mean(torch.stack(largest_losses).mean())}
        if dist.is_main:
            row.update(_supernet_eval(net, splits, space, dist.device))
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            save_checkpoint(paths.checkpoint, {
                "identity": identity, "settings": settings, "epoch": epoch + 1,
                "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "metrics": history})
            write_metrics(paths.metrics, history)
            say(f"supernet epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, val acc largest "
                f"{row['val_acc_largest']:.3f} smallest {row['val_acc_smallest']:.3f} "
                f"({row['seconds']:.1f} s)")
        dist.barrier()
    if dist.is_main:
        net.save(paths.weights)
    dist.barrier()
    return SupernetResult(paths.weights, paths.checkpoint, paths.metrics, cfg.epochs, history,
                          start)


__all__ = ["Dist", "distributed", "default_device", "wrap_ddp", "make_optimizer",
           "make_scheduler", "open_checkpoint", "write_metrics", "read_metrics", "run_epoch",
           "train_batches", "sandwich_depths", "SandwichStep", "exits_forward", "accuracy", "train_supernet",
           "SupernetResult", "rng_state", "set_rng_state"]
