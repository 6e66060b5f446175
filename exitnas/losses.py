"""Multi-exit training losses, in a registry.

A loss maps the logits of every exit (early exits in network order, the final exit last) and
the labels to one scalar::

    loss = build_loss("sdn", temperature=3.0, weight=0.5)
    value = loss(model.forward_exits(x), y, progress=epoch / epochs)

``progress`` (share of training done, in [0, 1]) is used only by losses that ramp over time
(``sdn``). Weighted losses are normalised by the sum of their weights, so every loss stays on
the scale of one cross-entropy and a learning rate tuned for ``mean_ce`` carries over.

Add your own with ``@LOSSES.register("name")`` on a subclass of :class:`ExitLoss`; the name can
then be used as ``retrain.loss`` or ``exitnas retrain --loss NAME``. A loss that needs more
than the logits declares it through the hooks every retrain / fine-tuning run calls: the
``regimes`` it can train and :meth:`ExitLoss.check` (before anything is loaded),
:meth:`ExitLoss.prepare` (once, with the run's data), :meth:`ExitLoss.before_step` (before
every step of phases 2 and 3: a meta step, another batch) and ``state_dict`` (kept in the
training checkpoint, so a resumed run goes on where it stopped).

Supernet training has its own registry, ``SUPERNET_LOSSES`` (``supernet.loss``): an entry
says how one pass of the sandwich rule (one sub-network, every candidate exit active) turns
its exits' losses into one scalar and how much gradient the heads that learn on detached
features send into the backbone (:class:`SupernetLoss`; the default ``sandwich``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from .data import Splits
    from .loop import Epoch
    from .space import OptimConfig, Space

LOSSES: Registry[type["ExitLoss"]] = Registry("loss")
SUPERNET_LOSSES: Registry[type["SupernetLoss"]] = Registry("supernet loss")


class ExitLoss:
    """Base class. ``temperature`` and ``weight`` are used by distillation losses only.
    ``regimes``: the retraining regimes the loss can train (None: every one); ``name``: its
    registry name (set by :func:`build_loss`)."""

    regimes: ClassVar[tuple[str, ...] | None] = None
    name: str = ""

    def __init__(self, *, temperature: float = 3.0, weight: float = 0.5) -> None:
        self.temperature = float(temperature)
        self.weight = float(weight)

    def __call__(self, logits: list[torch.Tensor], labels: torch.Tensor, *,
                 progress: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def check(self, *, regime: str, space: "Space") -> None:
        """Refuse, in one line, a run this loss cannot train (called before data is loaded
        and before anything is written). Default: a regime outside ``regimes``."""
        if self.regimes is not None and regime not in self.regimes:
            raise ConfigError(f"{self.name or type(self).__name__!r} trains with regime "
                              f"{' or '.join(self.regimes)} only, not {regime!r}",
                              path="retrain.loss")

    def prepare(self, *, space: "Space", splits: "Splits") -> None:
        """Once before training, with the run's space and data. Default: nothing."""

    def before_step(self, module: "nn.Module", x: torch.Tensor, y: torch.Tensor, *,
                    epoch: "Epoch", optim: "OptimConfig") -> tuple[torch.Tensor, torch.Tensor]:
        """Before every step of phases 2 and 3: ``module`` is the phase's forward (not wrapped
        for DDP; its parameters are the model's, those of the phase require grad), ``x, y``
        the step's batch. Returns the batch the step trains on. Default: ``(x, y)``."""
        return x, y

    def state_dict(self) -> dict:
        """What the loss learns during training (kept in the checkpoint). Default: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (a resumed run)."""


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
    loss = cls(temperature=temperature, weight=weight)
    loss.name = name
    return loss


def loss_from_config(cfg) -> ExitLoss:
    """The loss of a :class:`~exitnas.space.RetrainConfig`."""
    return build_loss(cfg.loss, temperature=cfg.loss_temperature, weight=cfg.loss_weight)


# ---- supernet losses -----------------------------------------------------------------------


class SupernetLoss:
    """One sandwich pass's loss. The pass computes every candidate exit active at its depths;
    ``criterion(logits)`` is the pass's loss of one exit (cross-entropy against the labels for
    the largest network, distillation from its final exit for the others). ``sampled`` are the
    logits of the exit set the pass stands for (``supernet.heads: sampled``; their gradient
    reaches the backbone whole), ``detached`` those of every other candidate head, whose
    gradient into the backbone is scaled by :meth:`head_grad` (0: they learn on detached
    features). ``head_weight`` and ``head_share`` are the weights of the default entry."""

    def __init__(self, *, head_weight: float = 0.5, head_share: float = 0.0) -> None:
        self.head_weight = float(head_weight)
        self.head_share = float(head_share)

    def head_grad(self, detached: int) -> float:
        """Factor on the gradient each of ``detached`` heads sends into the backbone."""
        raise NotImplementedError

    def __call__(self, final: torch.Tensor, detached: list[torch.Tensor],
                 sampled: list[torch.Tensor], criterion) -> torch.Tensor:
        raise NotImplementedError


@SUPERNET_LOSSES.register("sandwich")
class SandwichLoss(SupernetLoss):
    """``L_final + head_weight × Σ_h L_h + Σ_e L_e`` over the H detached heads h and the
    sampled exits e, with the detached heads' gradient into the backbone scaled by
    ``head_share / H / head_weight``: each head learns from its own loss at a fixed strength
    however many candidate heads there are, while the backbone sees ``L_final + head_share ×
    mean_h L_h`` (plus the sampled exits' losses, as a multi-exit model trained with
    ``mean_ce`` does, up to a constant). Defaults measured on the quickstart space (see
    :class:`~exitnas.train.SandwichStep`)."""

    def head_grad(self, detached: int) -> float:
        return self.head_share / max(1, detached) / self.head_weight

    def __call__(self, final, detached, sampled, criterion):
        loss = criterion(final)
        if detached:
            loss = loss + self.head_weight * torch.stack([criterion(z) for z in detached]).sum()
        if sampled:
            loss = loss + torch.stack([criterion(z) for z in sampled]).sum()
        return loss


def build_supernet_loss(name: str, *, head_weight: float = 0.5,
                        head_share: float = 0.0) -> SupernetLoss:
    """The supernet loss ``name``; an unknown name is a ConfigError naming the field."""
    try:
        cls = SUPERNET_LOSSES.get(name)
    except ConfigError as err:
        raise ConfigError(str(err), path="supernet.loss") from None
    return cls(head_weight=head_weight, head_share=head_share)


__all__ = ["LOSSES", "ExitLoss", "build_loss", "loss_from_config", "soft_distill",
           "SUPERNET_LOSSES", "SupernetLoss", "SandwichLoss", "build_supernet_loss"]


from . import losses_label_free as _label_free  # noqa: E402,F401 (registers)
from . import losses_l2w as _l2w  # noqa: E402,F401 (registers)
from . import losses_neg_correlation as _neg_correlation  # noqa: E402,F401 (registers)
from . import losses_quicknets as _quicknets  # noqa: E402,F401 (registers)
from . import losses_synergy as _synergy  # noqa: E402,F401 (registers)
