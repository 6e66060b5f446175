"""Scoring from cached exit statistics.

For one depth setting, one pass over a split with every candidate head active gives, per
(position, head) pair and for the final exit, each sample's max softmax probability, entropy
and argmax. Any choice of exits, heads, policy and thresholds for that depth is then scored from
these arrays without touching the network, and gives exactly the predictions and exit indices of
the extracted model's early-exit forward (``MultiExitModel.predict``)::

    cache = load_or_build_cache(run, net, (3, 2, 4), splits)        # one pass, then on disk
    model = net.extract(arch, calib=calibration_batches(space, splits))  # what the cache scored
    s = score(cache, arch, cost_table(space))                       # ~0.1 ms, no network
    stats = ArchStats.from_cache(cache, arch, cost_table(space))    # one arch, for protocols
    stats = ArchStats.from_model(model, batches(...), costs=cost_table(space), arch=arch)

Scoring runs in numpy over float32 statistics with each policy's numpy rule
(:mod:`exitnas.exit_rules`, the rules the runtime applies), which compares as the policy's torch
rule does (``conf >= float32(t)``, ``entropy <= float32(t)``, equal argmax for patience).
The cached statistics are uncalibrated (the supernet's raw logits): search scoring does not
apply ``policy.calibration`` (:mod:`exitnas.calibration`). Exactness holds up to the CPU kernels themselves: per-sample logits can differ in the last bits
with the batch a sample is computed in, which only matters for a sample whose confidence lies
within those bits of a threshold.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch

from . import exit_rules
from .arch import Arch, Exit
from .cost import CostTable
from .policy import POLICIES, ExitStats
from .supernet import _BN_STATS
from .units import MACS, Unit


# ---- the single vectorised scorer ------------------------------------------------------------
def exit_index(policy: str, params: Sequence[float], conf: np.ndarray, entropy: np.ndarray,
               pred: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exit taken by every sample [N] under ``policy``'s numpy rule (uint8; ``len(rows) - 1``
    = the final exit; at most 256 exits).

    ``conf``/``entropy``/``pred`` are [R, N] statistics; ``rows`` picks an arch's exits from
    them in network order, the final exit last."""
    return exit_rules.exit_index(POLICIES.get(policy).rule, params, conf, entropy, pred, rows)


@dataclass(frozen=True)
class Score:
    """Accuracy and costs in the cost table's unit (``exitnas.units``)."""

    accuracy: float
    expected_cost: float               # sum_k exit_fractions[k] x exit_costs[k]
    exit_fractions: tuple[float, ...]  # share of samples leaving at each exit (final last)
    exit_accuracy: tuple[float, ...]   # accuracy of each exit on all samples (anytime)
    exit_costs: tuple[float, ...]      # C_k


@lru_cache(maxsize=8)
def _arange(n: int) -> np.ndarray:
    out = np.arange(n, dtype=np.intp)
    out.flags.writeable = False
    return out


def _summarise(idx: np.ndarray, correct_flat: np.ndarray, rows: np.ndarray, n: int,
               exit_accuracy: tuple[float, ...], exit_costs: Sequence[float]) -> Score:
    counts = np.bincount(idx, minlength=len(rows))
    flat = rows[idx]
    flat *= n
    flat += _arange(n)
    hits = int(np.count_nonzero(correct_flat.take(flat)))
    # integer costs x integer counts (or fsum's exactly rounded float sum), divided once: the
    # same float for any summation order
    if all(isinstance(m, int) for m in exit_costs):
        total = sum(c * m for c, m in zip(counts.tolist(), exit_costs))
    else:
        total = math.fsum(c * float(m) for c, m in zip(counts.tolist(), exit_costs))
    return Score(accuracy=hits / n, expected_cost=total / n,
                 exit_fractions=tuple(c / n for c in counts.tolist()),
                 exit_accuracy=exit_accuracy, exit_costs=tuple(exit_costs))


# ---- the supernet cache ----------------------------------------------------------------------
@dataclass(frozen=True)
class ExitCache:
    """Statistics of every candidate exit of one depth setting over one split.

    ``conf``/``entropy`` (float32) and ``pred`` (int64) are [E + 1, N]: row i is ``exits[i]``,
    the last row is the final exit. ``labels`` is [N] int64."""

    depths: tuple[int, ...]
    exits: tuple[Exit, ...]
    conf: torch.Tensor
    entropy: torch.Tensor
    pred: torch.Tensor
    labels: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.labels.numel())

    @cached_property
    def _index(self) -> dict[Exit, int]:
        return {e: i for i, e in enumerate(self.exits)}

    def row_index(self, arch: Arch) -> np.ndarray:
        """Row indices (numpy) of ``arch``'s exits, the final exit last."""
        try:
            return np.array([self._index[e] for e in arch.exits] + [len(self.exits)], dtype=np.intp)
        except KeyError as err:
            raise ValueError(f"exit {err.args[0]} is not in the cache for depths {self.depths}") from None

    def rows(self, arch: Arch) -> torch.Tensor:
        """Row indices of ``arch``'s exits, the final exit last."""
        return torch.from_numpy(self.row_index(arch)).long()

    def correct(self) -> torch.Tensor:
        return self.pred == self.labels.unsqueeze(0)

    # numpy views shared with the tensors (no copy), built once per cache
    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(t.contiguous().numpy() for t in (self.conf, self.entropy, self.pred))

    @cached_property
    def _correct_flat(self) -> np.ndarray:
        return (self.arrays[2] == self.labels.numpy()[None, :]).reshape(-1)

    @cached_property
    def row_accuracy(self) -> tuple[float, ...]:
        """Accuracy of every cached row on all samples (anytime accuracy)."""
        n = self.num_samples
        return tuple(c / n for c in self._correct_flat.reshape(-1, n).sum(axis=1).tolist())


@torch.no_grad()
def build_cache(net, depths: tuple[int, ...], batches: Iterable) -> ExitCache:
    """One pass of ``net`` (a Supernet in eval mode whose BN statistics are those of
    ``depths``: inside ``net.calibrated(depths, ...)``) over ``batches`` of (images, labels)
    with every candidate exit active."""
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
    return ExitCache(tuple(depths), exits, conf, entropy, pred, torch.cat(labels).long())


def decide(cache: ExitCache, arch: Arch) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions [N], exit index [N]), both int64, of ``arch`` on the cached split."""
    rows = cache.row_index(arch)
    conf, entropy, pred = cache.arrays
    idx = exit_index(arch.policy, arch.thresholds, conf, entropy, pred, rows)
    n = cache.num_samples
    out = pred.reshape(-1)[rows[idx] * n + _arange(n)]
    return torch.from_numpy(out.astype(np.int64)), torch.from_numpy(idx.astype(np.int64))


def score(cache: ExitCache, arch: Arch, costs: CostTable) -> Score:
    """Accuracy and expected cost of ``arch`` from the cache (no network pass)."""
    rows = cache.row_index(arch)
    conf, entropy, pred = cache.arrays
    idx = exit_index(arch.policy, arch.thresholds, conf, entropy, pred, rows)
    acc = cache.row_accuracy
    return _summarise(idx, cache._correct_flat, rows, cache.num_samples,
                      tuple(acc[r] for r in rows.tolist()), costs.exit_costs(arch))


# ---- one fixed architecture (protocols) ------------------------------------------------------
@dataclass(frozen=True)
class ArchStats:
    """Per-exit statistics of ONE architecture over one split, [K, N] (final exit last):
    ``conf``/``entropy`` float32, ``pred`` int64; ``labels`` [N]; ``exit_costs`` C_k and
    ``backbone_cost`` the plain backbone's cost (relative costs divide by it), both in
    ``unit``."""

    conf: np.ndarray
    entropy: np.ndarray
    pred: np.ndarray
    labels: np.ndarray
    exit_costs: tuple[float, ...]
    backbone_cost: float
    names: tuple[str, ...] = field(default=())
    unit: Unit = MACS

    def __post_init__(self) -> None:
        for name, dtype in (("conf", np.float32), ("entropy", np.float32), ("pred", np.int64),
                            ("labels", np.int64)):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        costs = (*self.exit_costs, self.backbone_cost)
        if self.unit.integer and not all(float(c).is_integer() for c in costs):
            raise ValueError(f"{self.unit.label} are whole numbers, got costs {costs[:4]}...")
        num = int if self.unit.integer else float
        object.__setattr__(self, "exit_costs", tuple(num(c) for c in self.exit_costs))
        object.__setattr__(self, "backbone_cost", num(self.backbone_cost))
        k, n = self.conf.shape
        if self.entropy.shape != (k, n) or self.pred.shape != (k, n) or self.labels.shape != (n,):
            raise ValueError(f"ArchStats arrays disagree: conf {self.conf.shape}, entropy "
                             f"{self.entropy.shape}, pred {self.pred.shape}, labels {self.labels.shape}")
        if len(self.exit_costs) != k:
            raise ValueError(f"{len(self.exit_costs)} exit costs for {k} exits")
        if not self.names:
            object.__setattr__(self, "names", tuple(f"exit{i}" for i in range(k - 1)) + ("final",))

    @property
    def num_exits(self) -> int:
        """Exits including the final one (K)."""
        return int(self.conf.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @cached_property
    def _rows(self) -> np.ndarray:
        return np.arange(self.num_exits, dtype=np.intp)

    @cached_property
    def _correct_flat(self) -> np.ndarray:
        return (self.pred == self.labels[None, :]).reshape(-1)

    @cached_property
    def exit_accuracy(self) -> tuple[float, ...]:
        n = self.num_samples
        return tuple(c / n for c in self._correct_flat.reshape(-1, n).sum(axis=1).tolist())

    def exit_index(self, policy: str, params: Sequence[float]) -> np.ndarray:
        return exit_index(policy, params, self.conf, self.entropy, self.pred, self._rows)

    def score_index(self, idx: np.ndarray) -> Score:
        """Score given exits taken per sample [N] (from any rule: policy, budget, oracle)."""
        return _summarise(np.asarray(idx, dtype=np.intp), self._correct_flat, self._rows,
                          self.num_samples, self.exit_accuracy, self.exit_costs)

    def score(self, policy: str, params: Sequence[float]) -> Score:
        return self.score_index(self.exit_index(policy, params))

    @classmethod
    def from_cache(cls, cache: ExitCache, arch: Arch, costs: CostTable) -> "ArchStats":
        """``arch``'s rows of a supernet cache."""
        rows = cache.row_index(arch)
        conf, entropy, pred = cache.arrays
        return cls(conf[rows], entropy[rows], pred[rows], cache.labels.numpy().copy(),
                   tuple(costs.exit_costs(arch)), costs.backbone(),
                   tuple(e.key for e in arch.exits) + ("final",), costs.unit)

    @classmethod
    @torch.no_grad()
    def from_model(cls, model, batches: Iterable, *, costs: CostTable, arch: Arch) -> "ArchStats":
        """One pass of a standalone ``MultiExitModel`` of ``arch`` (eval mode, every exit
        computed for every sample) over ``batches`` of (images, labels); costs from
        ``costs``. The statistics are those ``model.predict`` decides on: each exit's logits
        divided by the model's temperature (:mod:`exitnas.calibration`; 1 unless set)."""
        was = model.training
        model.eval()
        parts, labels = [], []
        try:
            for x, y in batches:
                s = ExitStats.stack(model.calibrated_exits(x))
                parts.append((s.conf, s.entropy, s.pred))
                labels.append(y)
        finally:
            model.train(was)
        if not parts:
            raise ValueError("ArchStats.from_model got no batches")
        conf, entropy, pred = (torch.cat([p[i] for p in parts], dim=1).numpy() for i in range(3))
        return cls(conf, entropy, pred, torch.cat(labels).long().numpy(),
                   tuple(costs.exit_costs(arch)), costs.backbone(), tuple(model.exit_names),
                   costs.unit)


# ---- the cache on disk -----------------------------------------------------------------------
# Bump when what a cache holds, or how the network computes it, changes (2: sdn_pool's mix
# weight became sigmoid(mix_logit)); older cache files are then rebuilt, never misread.
CACHE_FORMAT = 2


def cache_digest(net) -> str:
    """sha256 (16 hex) of the weights that define a cache: every parameter and buffer except
    BatchNorm running statistics, which are re-estimated per depth setting before each pass
    (so a recalibration for one depth setting does not change the key of another)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        if name.rsplit(".", 1)[-1] in _BN_STATS:
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _settings_digest(space, split: str, exits: Sequence[Exit]) -> str:
    """What else changes the cached numbers: data and split settings, BN recalibration."""
    from ._config import to_dict

    key = {"format": CACHE_FORMAT, "split": split, "data": to_dict(space.data),
           "bn": space.supernet.bn_calib_batches,
           "seed": space.supernet.seed, "exits": [e.key for e in exits]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def cache_path(run_dir, depths: tuple[int, ...], digest: str, split: str, settings: str = ""):
    tail = f"-{settings}" if settings else ""
    return run_dir.path / "cache" / f"{split}-d{'.'.join(map(str, depths))}-{digest}{tail}.safetensors"


def _read_cache(path, depths, exits, labels) -> ExitCache | None:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        cache = ExitCache(depths, exits, t["conf"].float(), t["entropy"].float(),
                          t["pred"].long(), t["labels"].long())
    except Exception:
        return None  # unreadable: rebuild
    n = cache.num_samples
    shape = (len(exits) + 1, n)
    if cache.conf.shape != shape or cache.entropy.shape != shape or cache.pred.shape != shape:
        return None
    if labels is not None and not torch.equal(cache.labels, labels.long()):
        return None
    return cache


def _write_cache(path, cache: ExitCache) -> None:
    from safetensors.torch import save_file

    from .io import atomic_path

    # class indices fit int16 for any realistic label set: 4x smaller than int64
    small = int(max(cache.pred.max(), cache.labels.max())) < 2 ** 15
    itype = torch.int16 if small else torch.int32
    with atomic_path(path) as tmp:
        save_file({"conf": cache.conf.contiguous(), "entropy": cache.entropy.contiguous(),
                   "pred": cache.pred.to(itype), "labels": cache.labels.to(itype)}, str(tmp),
                  metadata={"depths": ".".join(map(str, cache.depths)),
                            "exits": ",".join(e.key for e in cache.exits)})


def load_or_build_cache(run_dir, net, depths: tuple[int, ...], splits, *, split: str = "val",
                        digest: str | None = None) -> ExitCache:
    """The cache of ``depths`` over ``split`` for these weights: read from
    ``RUN/cache/<split>-d<depths>-<weights>-<settings>.safetensors``, or built (inside
    ``net.calibrated(depths, calibration_batches(...))``: BN re-estimated for ``depths``, then
    ``net``'s own statistics restored) and written atomically. Either way ``net`` is left as it
    was: extract with ``net.extract(arch, calib=calibration_batches(space, splits))`` to get the
    model the cache scored. ``digest`` defaults to :func:`cache_digest`; ``splits`` may be
    None when the file exists."""
    from .data import batches
    from .supernet import calibration_batches

    depths = tuple(depths)
    space = net.space
    exits = tuple(net.candidate_exits(depths))
    digest = digest or cache_digest(net)
    path = cache_path(run_dir, depths, digest, split, _settings_digest(space, split, exits))
    data = getattr(splits, split) if splits is not None else None
    if path.is_file():
        cache = _read_cache(path, depths, exits, None if data is None else data.labels)
        if cache is not None:
            return cache
    if splits is None:
        raise ValueError(f"{path}: no usable cache and no splits given to build it")
    with net.calibrated(depths, calibration_batches(space, splits)):
        cache = build_cache(net, depths, batches(data, batch_size=space.data.eval_batch_size,
                                                 mean=splits.mean, std=splits.std))
    _write_cache(path, cache)
    return cache
