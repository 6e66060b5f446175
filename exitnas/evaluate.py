"""Scoring from cached exit statistics.

For one depth setting, one pass over a split with every candidate head active gives, per
(position, head) pair and for the final exit, each sample's max softmax probability, entropy
and argmax. Any choice of exits, heads, policy and thresholds for that depth is then scored from
these arrays without touching the network, and gives exactly the predictions and exit indices of
the extracted model's early-exit forward (``MultiExitModel.predict``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .arch import Arch, Exit
from .cost import CostTable
from .policy import ExitStats, first_exit, get_policy


@dataclass(frozen=True)
class ExitCache:
    """Statistics of every candidate exit of one depth setting over one split.

    ``conf``/``entropy``/``pred`` are [E + 1, N]: row i is ``exits[i]``, the last row is the
    final exit. ``labels`` is [N]."""

    depths: tuple[int, ...]
    exits: tuple[Exit, ...]
    conf: torch.Tensor
    entropy: torch.Tensor
    pred: torch.Tensor
    labels: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.labels.numel())

    def rows(self, arch: Arch) -> torch.Tensor:
        """Row indices of ``arch``'s exits, the final exit last."""
        index = {e: i for i, e in enumerate(self.exits)}
        try:
            return torch.tensor([index[e] for e in arch.exits] + [len(self.exits)])
        except KeyError as err:
            raise ValueError(f"exit {err.args[0]} is not in the cache for depths {self.depths}") from None

    def correct(self) -> torch.Tensor:
        return self.pred == self.labels.unsqueeze(0)


@torch.no_grad()
def build_cache(net, depths: tuple[int, ...], batches: Iterable) -> ExitCache:
    """One pass of ``net`` (a Supernet, eval mode, BN already recalibrated for ``depths``)
    over ``batches`` of (images, labels) with every candidate exit active."""
    exits = tuple(net.candidate_exits(depths))
    parts: list[tuple[torch.Tensor, ...]] = []
    labels = []
    net.eval()
    for x, y in batches:
        logits = net.forward_exits(x, depths, exits)
        stats = ExitStats.stack(logits)
        parts.append((stats.conf, stats.entropy, stats.pred))
        labels.append(y)
    conf, entropy, pred = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))
    return ExitCache(tuple(depths), exits, conf, entropy, pred, torch.cat(labels))


@dataclass(frozen=True)
class Score:
    accuracy: float
    expected_macs: float
    exit_fractions: tuple[float, ...]  # share of samples leaving at each exit (final last)
    exit_accuracy: tuple[float, ...]   # accuracy of each exit on all samples (anytime)
    exit_macs: tuple[int, ...]         # C_k


def decide(cache: ExitCache, arch: Arch) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions [N], exit index [N]) of ``arch`` on the cached split."""
    rows = cache.rows(arch)
    early = rows[:-1]
    stats = ExitStats(cache.conf[early], cache.entropy[early], cache.pred[early])
    idx = first_exit(get_policy(arch.policy).exit_mask(stats, arch.thresholds))
    pred = cache.pred[rows[idx], torch.arange(cache.num_samples)]
    return pred, idx


def score(cache: ExitCache, arch: Arch, costs: CostTable) -> Score:
    """Accuracy and expected MACs of ``arch`` from the cache (no network pass)."""
    pred, idx = decide(cache, arch)
    n = cache.num_samples
    k = len(arch.exits) + 1
    fractions = torch.bincount(idx, minlength=k).double() / n
    c = costs.exit_costs(arch)
    rows = cache.rows(arch)
    per_exit = (cache.pred[rows] == cache.labels).double().mean(dim=1)
    return Score(accuracy=float((pred == cache.labels).double().mean()),
                 expected_macs=float((fractions * torch.tensor(c, dtype=torch.float64)).sum()),
                 exit_fractions=tuple(fractions.tolist()),
                 exit_accuracy=tuple(per_exit.tolist()), exit_macs=tuple(c))


def cache_path(run_dir, depths: tuple[int, ...], digest: str, split: str):
    return run_dir.path / "cache" / f"{split}-d{'.'.join(map(str, depths))}-{digest}.safetensors"


def load_or_build_cache(run_dir, net, depths: tuple[int, ...], splits, *, split: str = "val",
                        digest: str | None = None) -> ExitCache:
    """The cache of ``depths`` over ``split`` for these weights: read from the run directory,
    or built (BN recalibrated on ``supernet.bn_calib_batches`` train batches first) and written
    atomically. ``digest`` (see ``supernet.weights_digest``) keys it to the weights."""
    from safetensors.torch import load_file, save_file

    from .data import batches
    from .io import atomic_path
    from .supernet import weights_digest

    depths = tuple(depths)
    digest = digest or weights_digest(net)
    path = cache_path(run_dir, depths, digest, split)
    exits = tuple(net.candidate_exits(depths))
    if path.is_file():
        try:
            t = load_file(str(path))
            return ExitCache(depths, exits, t["conf"], t["entropy"], t["pred"], t["labels"])
        except Exception:
            pass  # unreadable cache file: rebuild it
    space = net.space
    calib = batches(splits.train, batch_size=space.data.batch_size, mean=splits.mean,
                    std=splits.std, shuffle=True, seed=space.supernet.seed)
    net.recalibrate_bn(depths, (b for _, b in zip(range(space.supernet.bn_calib_batches), calib)))
    data = getattr(splits, split)
    cache = build_cache(net, depths, batches(data, batch_size=space.data.eval_batch_size,
                                             mean=splits.mean, std=splits.std))
    with atomic_path(path) as tmp:
        save_file({"conf": cache.conf, "entropy": cache.entropy, "pred": cache.pred,
                   "labels": cache.labels}, str(tmp))
    return cache
