"""Exit policies, vectorised over samples.

A policy sees per-exit statistics of the early exits, stacked as [K, N] tensors (K early exits,
N samples), and returns a [K, N] boolean mask "sample n may leave at exit k". A sample leaves at
the first exit whose mask is true; the final exit takes every remaining sample. Row k of the
mask depends only on rows <= k, so the same code serves the cached scorer (all exits at once)
and the model's early-exit forward (one exit at a time).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import Registry

POLICIES: Registry["Policy"] = Registry("policy")


@dataclass(frozen=True)
class ExitStats:
    """Per-exit statistics, each [K, N]: max softmax probability (float32), entropy of the
    softmax in nats (float32), and argmax class (int64)."""

    conf: torch.Tensor
    entropy: torch.Tensor
    pred: torch.Tensor

    @staticmethod
    def from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(conf, entropy, pred) of one exit's logits [N, C], computed in float32."""
        logp = torch.log_softmax(logits.float(), dim=1)
        conf, pred = logp.exp().max(dim=1)
        entropy = -(logp.exp() * logp).sum(dim=1)
        return conf, entropy, pred

    @classmethod
    def stack(cls, logits: list[torch.Tensor]) -> "ExitStats":
        parts = [cls.from_logits(x) for x in logits]
        return cls(*(torch.stack([p[i] for p in parts]) for i in range(3)))


class Policy:
    """Base class. ``params`` is the arch's ``thresholds`` tuple: one value per early exit for
    threshold policies, a single integer-valued patience for ``patience``."""

    name: str = ""
    per_exit: bool = True  # one parameter per early exit (else a single one)
    integer: bool = False  # parameters are whole numbers
    range_field: str = "threshold_range"  # the PolicyConfig field bounding the parameters

    def param_range(self, cfg) -> tuple[float, float]:
        """(low, high) allowed for this policy's parameters by a space's ``PolicyConfig``."""
        return tuple(getattr(cfg, self.range_field))

    def num_params(self, n_exits: int) -> int:
        return n_exits if self.per_exit else 1

    def exit_mask(self, stats: ExitStats, params: tuple[float, ...]) -> torch.Tensor:
        raise NotImplementedError

    def check(self, params: tuple[float, ...], n_exits: int) -> str | None:
        """None when ``params`` fit ``n_exits`` early exits, else what is wrong."""
        want = self.num_params(n_exits)
        if len(params) != want:
            return f"policy {self.name} needs {want} value(s), got {len(params)}"
        return None


def _column(params: tuple[float, ...], k: int) -> torch.Tensor:
    return torch.tensor(params[:k], dtype=torch.float32).reshape(-1, 1)


@POLICIES.register("max_softmax")
class MaxSoftmax(Policy):
    """Leave at the first exit whose max softmax probability is >= its threshold."""

    name = "max_softmax"

    def exit_mask(self, stats: ExitStats, params: tuple[float, ...]) -> torch.Tensor:
        return stats.conf >= _column(params, stats.conf.shape[0])

    def check(self, params, n_exits):
        bad = [t for t in params if not 0.0 <= t <= 1.0]
        return super().check(params, n_exits) or (f"threshold {bad[0]} is outside [0, 1]" if bad else None)


@POLICIES.register("entropy")
class Entropy(Policy):
    """Leave at the first exit whose softmax entropy (nats) is <= its threshold."""

    name = "entropy"
    range_field = "entropy_range"

    def exit_mask(self, stats: ExitStats, params: tuple[float, ...]) -> torch.Tensor:
        return stats.entropy <= _column(params, stats.entropy.shape[0])

    def check(self, params, n_exits):
        bad = [t for t in params if t < 0]
        return super().check(params, n_exits) or (f"entropy threshold {bad[0]} is negative" if bad else None)


@POLICIES.register("patience")
class Patience(Policy):
    """PABEE-style: leave at exit k once exits k-p+1..k (p consecutive exits) agree on the
    class. p = 1 leaves at the first exit."""

    name = "patience"
    per_exit = False
    integer = True
    range_field = "patience_range"

    def exit_mask(self, stats: ExitStats, params: tuple[float, ...]) -> torch.Tensor:
        p = int(params[0])
        pred = stats.pred
        run = torch.ones_like(pred)
        for k in range(1, pred.shape[0]):  # loop over exits, not samples
            run[k] = torch.where(pred[k] == pred[k - 1], run[k - 1] + 1, 1)
        return run >= p

    def check(self, params, n_exits):
        msg = super().check(params, n_exits)
        if msg is None and (params[0] < 1 or params[0] != int(params[0])):
            msg = f"patience {params[0]} is not a positive integer"
        return msg


def get_policy(name: str) -> Policy:
    return POLICIES.get(name)()


def first_exit(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first true row per column of a [K, N] mask; K (the final exit) if none."""
    k = mask.shape[0]
    if k == 0:
        return torch.zeros(mask.shape[1], dtype=torch.long)
    hit = mask.any(dim=0)
    return torch.where(hit, mask.to(torch.uint8).argmax(dim=0), torch.full_like(hit, k, dtype=torch.long))
