"""Exit policies: each one owns its parameters, its torch rule and its numpy rule.

A policy sees per-exit statistics of the early exits, stacked as [K, N] tensors (K early exits,
N samples), and returns a [K, N] boolean mask "sample n may leave at exit k". A sample leaves at
the first exit whose mask is true; the final exit takes every remaining sample. Row k of the
mask depends only on rows <= k, so the same code serves the cached scorer (all exits at once)
and the model's early-exit forward (one exit at a time).

Adding a policy is one file::

    class MarginRule(exit_rules.Rule):            # numpy: the scorer and the runtime
        ...

    @POLICIES.register("margin")
    class Margin(Policy):
        rule = MarginRule()
        param = Param(key="margin_range", default=(0.0, 1.0), ge=0.0, le=1.0, gene="mrg",
                      doc="margin thresholds")
        def exit_mask(self, stats, params): ...   # torch: MultiExitModel.predict

Registering also registers ``rule`` with :mod:`exitnas.exit_rules` under the same name, so the
scorer (:mod:`exitnas.evaluate`) and the runtime find it; the space file's ``policy`` section
gains ``margin_range`` (:class:`~exitnas.space.PolicyConfig`), the genome draws ``mrg<k>``
per early exit (:class:`~exitnas.search.Genome`), and ``fitted = True`` (a
:class:`~exitnas.exit_rules.Threshold` rule) lets :mod:`exitnas.thresholds` fit them instead.

Calibration (``policy.calibration``, :mod:`exitnas.calibration`) is an option of every policy:
the statistics are computed from each exit's logits divided by its temperature T_k, so
``max_softmax`` and ``entropy`` decide on calibrated confidences / entropies, and
``patience`` is unaffected (T_k > 0 keeps every argmax). No policy needs code for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from . import exit_rules
from .registry import Registry


@dataclass(frozen=True, kw_only=True)
class Param:
    """A policy's parameters as the space bounds them and the genome draws them."""

    key: str                       # the space file's policy.<key>: [low, high]
    default: tuple[float, float]   # that key's default
    doc: str                       # its line in the config reference
    gene: str                      # Optuna parameter: <gene><slot> per early exit, else <gene>
    integer: bool = False          # whole numbers (the key is then [int, int])
    ge: float | None = None        # bounds on the key's values
    le: float | None = None
    fill: Literal["low", "high"] = "low"  # the end taken where no value is drawn (a carried,
    # inactive gene; a fitted policy's placeholder before fitting, which lets no sample leave)


class _Policies(Registry["Policy"]):
    """Policies by name. Registering one sets its ``name`` and registers its numpy ``rule``
    with :mod:`exitnas.exit_rules`; a fitted policy needs a threshold rule, and two policies
    that name the same space key or gene must declare the same Param."""

    def register(self, name: str):
        add = super().register(name)

        def deco(cls: type["Policy"]) -> type["Policy"]:
            if name in self:
                raise ValueError(f"policy {name!r} is already registered")
            if not isinstance(getattr(cls, "param", None), Param):
                raise TypeError(f"policy {name!r} declares no Param")
            rule = getattr(cls, "rule", None)
            if cls.fitted and not isinstance(rule, exit_rules.Threshold):
                raise TypeError(f"policy {name!r} is fitted but its rule is not an "
                                "exit_rules.Threshold")
            for other in self.in_order():
                p = self.get(other).param
                if p != cls.param and cls.param.key == p.key:
                    raise ValueError(f"policy {name!r} declares policy.{p.key} unlike {other!r}")
                if p != cls.param and cls.param.gene == p.gene:
                    raise ValueError(f"policy {name!r} takes gene {p.gene!r} of {other!r}")
            exit_rules.register(name, rule)  # refuses a non-Rule, or another rule of that name
            cls.name = name
            return add(cls)

        return deco

    def in_order(self) -> list[str]:
        """Names in registration order (the genome's and the config reference's order)."""
        return list(self._items)


POLICIES: _Policies = _Policies("policy")


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
    """Base class. ``params`` is the arch's ``thresholds`` tuple: one value per early exit
    (``rule.per_exit``) or a single one. A subclass sets ``rule`` (numpy), ``param`` and
    :meth:`exit_mask` (torch); ``fitted``: :mod:`exitnas.thresholds` fits the parameters on
    val (the rule is an :class:`~exitnas.exit_rules.Threshold`), ``budgeted_batch``: that fit
    also starts from MSDNet's budgeted-batch thresholds (a >= rule)."""

    name: str = ""  # set by POLICIES.register
    rule: exit_rules.Rule
    param: Param
    fitted: bool = False
    budgeted_batch: bool = False

    @property
    def per_exit(self) -> bool:
        return self.rule.per_exit

    @property
    def integer(self) -> bool:
        return self.param.integer

    def param_range(self, cfg) -> tuple[float, float]:
        """(low, high) allowed for this policy's parameters by a space's ``PolicyConfig``."""
        return tuple(getattr(cfg, self.param.key))

    def fill(self, cfg) -> float:
        """The value taken where none is drawn (:attr:`Param.fill`)."""
        lo, hi = self.param_range(cfg)
        return hi if self.param.fill == "high" else lo

    def num_params(self, n_exits: int) -> int:
        return self.rule.num_params(n_exits)

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

    rule = exit_rules.MAX_SOFTMAX
    param = Param(key="threshold_range", default=(0.5, 1.0), ge=0.0, le=1.0, gene="thr",
                  fill="high", doc="max_softmax thresholds")
    fitted = True
    budgeted_batch = True

    def exit_mask(self, stats: ExitStats, params: tuple[float, ...]) -> torch.Tensor:
        return stats.conf >= _column(params, stats.conf.shape[0])

    def check(self, params, n_exits):
        bad = [t for t in params if not 0.0 <= t <= 1.0]
        return super().check(params, n_exits) or (f"threshold {bad[0]} is outside [0, 1]" if bad else None)


@POLICIES.register("entropy")
class Entropy(Policy):
    """Leave at the first exit whose softmax entropy (nats) is <= its threshold."""

    rule = exit_rules.ENTROPY
    param = Param(key="entropy_range", default=(0.0, 1.5), ge=0.0, gene="ent", fill="low",
                  doc="entropy thresholds, nats")
    fitted = True

    def exit_mask(self, stats: ExitStats, params: tuple[float, ...]) -> torch.Tensor:
        return stats.entropy <= _column(params, stats.entropy.shape[0])

    def check(self, params, n_exits):
        bad = [t for t in params if t < 0]
        return super().check(params, n_exits) or (f"entropy threshold {bad[0]} is negative" if bad else None)


@POLICIES.register("patience")
class Patience(Policy):
    """PABEE-style: leave at exit k once exits k-p+1..k (p consecutive exits) agree on the
    class. p = 1 leaves at the first exit."""

    rule = exit_rules.PATIENCE
    param = Param(key="patience_range", default=(1, 3), ge=1, le=4096, integer=True,
                  gene="patience", fill="low", doc="patience p (exits that agree)")

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
