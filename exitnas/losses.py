"""Multi-exit training losses, in a registry.

A loss maps the logits of every exit (early exits in network order, the final exit last) and
the labels to one scalar::

    loss = build_loss("sdn", temperature=3.0, weight=0.5)
    value = loss(model.forward_exits(x), y, progress=epoch / epochs)

``progress`` (share of training done, in [0, 1]) is used only by losses that ramp over time
(``sdn``). Weighted losses are normalised by the sum of their weights, so every loss stays on
the scale of one cross-entropy and a learning rate tuned for ``mean_ce`` carries over.

Add your own with ``@LOSSES.register("name")`` on a subclass of :class:`ExitLoss`; the name can
then be used as ``retrain.loss`` or ``exitnas retrain --loss NAME``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .registry import Registry

LOSSES: Registry[type["ExitLoss"]] = Registry("loss")


class ExitLoss:
    """Base class. ``temperature`` and ``weight`` are used by distillation losses only."""

    def __init__(self, *, temperature: float = 3.0, weight: float = 0.5) -> None:
        self.temperature = float(temperature)
        self.weight = float(weight)

    def __call__(self, logits: list[torch.Tensor], labels: torch.Tensor, *,
                 progress: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


def _weighted(losses: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(weights)
    return sum(w * l for w, l in zip(weights, losses)) / total


def soft_distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) × T², batch mean (Hinton et al.).
    ``teacher`` should be detached by the caller."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


@LOSSES.register("mean_ce")
class MeanCE(ExitLoss):
    """Mean of the cross-entropies of all exits, the final one included (the default)."""

    def __call__(self, logits, labels, *, progress=1.0):
        return torch.stack([F.cross_entropy(z, labels) for z in logits]).mean()


@LOSSES.register("sdn")
class SDNRamped(ExitLoss):
    """SDN (Kaya et al. 2019): the final exit has weight 1; early exit k of K exits has weight
    ``progress × (k + 1) / K``, ramping from 0 to its position-proportional maximum over
    training (SDN's 0.15 … 0.9 for six exits at 15 … 90 % of the network)."""

    def __call__(self, logits, labels, *, progress=1.0):
        k = len(logits)
        ramp = min(max(float(progress), 0.0), 1.0)
        weights = [ramp * (i + 1) / k for i in range(k - 1)] + [1.0]
        return _weighted([F.cross_entropy(z, labels) for z in logits], weights)


@LOSSES.register("pabee")
class PABEELinear(ExitLoss):
    """PABEE (Zhou et al. 2020): exit j (1-based) weighted by j, i.e. Σ j·L_j / Σ j."""

    def __call__(self, logits, labels, *, progress=1.0):
        weights = [float(j + 1) for j in range(len(logits))]
        return _weighted([F.cross_entropy(z, labels) for z in logits], weights)


@LOSSES.register("distill")
class SelfDistill(ExitLoss):
    """BYOT-style self-distillation (Zhang et al. 2019): every early exit learns from the labels
    and from the final exit's softened output, ``(1 - weight) × CE + weight × T² × KL``; the final
    exit learns from the labels only and is the (detached) teacher. Mean over exits."""

    def __call__(self, logits, labels, *, progress=1.0):
        teacher = logits[-1].detach()
        terms = [(1 - self.weight) * F.cross_entropy(z, labels)
                 + self.weight * soft_distill(z, teacher, self.temperature) for z in logits[:-1]]
        terms.append(F.cross_entropy(logits[-1], labels))
        return torch.stack(terms).mean()


@LOSSES.register("boost")
class BoostWeighted(ExitLoss):
    """Boosting-style sample weights (in the spirit of BoostNet, Yu et al. 2023): exit k weights
    each sample's cross-entropy by ``1 - p`` of the previous exit's (detached) probability of the
    true class, normalised to mean 1, so later exits focus on what earlier exits get wrong. Exit
    outputs stay independent (no ensembled logits), so inference is unchanged. Mean over exits."""

    def __call__(self, logits, labels, *, progress=1.0):
        terms = [F.cross_entropy(logits[0], labels)]
        for prev, z in zip(logits[:-1], logits[1:]):
            with torch.no_grad():
                p_true = prev.float().softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
                w = (1 - p_true).clamp_min(1e-3)
                w = w / w.mean()
            terms.append((w * F.cross_entropy(z, labels, reduction="none")).mean())
        return torch.stack(terms).mean()


def build_loss(name: str, *, temperature: float = 3.0, weight: float = 0.5) -> ExitLoss:
    """The loss ``name`` from the registry; an unknown name is a ConfigError naming the field."""
    try:
        cls = LOSSES.get(name)
    except ConfigError as err:
        raise ConfigError(str(err), path="retrain.loss") from None
    return cls(temperature=temperature, weight=weight)


def loss_from_config(cfg) -> ExitLoss:
    """The loss of a :class:`~exitnas.space.RetrainConfig`."""
    return build_loss(cfg.loss, temperature=cfg.loss_temperature, weight=cfg.loss_weight)


__all__ = ["LOSSES", "ExitLoss", "build_loss", "loss_from_config", "soft_distill"]
