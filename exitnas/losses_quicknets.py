"""``quicknets``: cascaded training, each exit learns only what the exits before it got wrong.

QuickNets (Patel & Siegelmann, "QuickNets: Saving Training and Preventing Overconfidence in
Early-Exit Neural Architectures", arXiv 2212.12866, 2022) train a network block by block,
"such that each successive layer is only trained on samples that could not be correctly
classified by the previous layers": a sample an exit classifies correctly leaves the training
set of every later block. exitnas trains all exits at once, so the cascade is applied per
batch: with ``right_j`` = exit j's argmax equals the label (detached; the paper's "correctly
classified", no confidence threshold), exit k trains on

    S_k = { i : right_j(i) is false for every exit j < k }      (S_0: the whole batch)

and its term is the mean cross-entropy over S_k (the mean over its shrunken training set, as
training block k on the reduced set does; 0 when S_k is empty)::

    loss = (1 / K) Σ_k mean_{i in S_k} CE(z_k[i], y_i)

A sample in no S_k sends exactly zero gradient through that exit's logits. The final exit is
block K and follows the same rule; with one exit the loss is its cross-entropy. ``temperature``
and ``weight`` are not used (the method has neither).

The paper's commitment layers, which detect over-confident early predictions, make an exit
decision of their own at inference. :class:`CommitmentLayer` is their training part: a layer on
an exit's detached, sorted softmax output trained to predict whether that exit is right. Using it to
exit (a policy, the exported graphs, the runtime) is not wired in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import LOSSES, ExitLoss


def learned(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool per sample: the exit's argmax is the label (QuickNets' "correctly classified")."""
    return logits.detach().argmax(dim=1) == labels


def cascade_masks(logits: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Per exit, the bool mask of the samples it trains on: those no earlier exit got right."""
    active = torch.ones_like(labels, dtype=torch.bool)
    masks = []
    for z in logits:
        masks.append(active)
        active = active & ~learned(z, labels)
    return masks


@LOSSES.register("quicknets")
class QuickNetsCascade(ExitLoss):
    """``(1 / K) Σ_k mean_{i in S_k} CE_k(i)``, S_k the samples every exit before k got wrong;
    see the module docstring."""

    def __call__(self, logits, labels, *, progress=1.0):
        terms = []
        for z, mask in zip(logits, cascade_masks(logits, labels)):
            ce = F.cross_entropy(z, labels, reduction="none")
            keep = mask.to(ce.dtype)
            terms.append((ce * keep).sum() / keep.sum().clamp_min(1.0))
        return torch.stack(terms).mean()


class CommitmentLayer(nn.Module):
    """A QuickNets commitment layer for one exit: ``Linear(num_classes, 1)`` on the exit's
    detached softmax probabilities sorted in descending order (class-agnostic, so a weight on
    the top probability alone is a max-softmax threshold), whose sigmoid is the probability
    that the exit's argmax is right: trained by :meth:`loss` (binary cross-entropy against
    :func:`learned`; no gradient reaches the exit). The exit commits where :meth:`commits`."""

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_classes, 1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Commitment logit per sample (N,) from the exit's logits (N, C)."""
        probs = logits.detach().softmax(dim=1).sort(dim=1, descending=True).values
        return self.linear(probs).squeeze(1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy (batch mean, nats) against the exit being right."""
        return F.binary_cross_entropy_with_logits(self(logits),
                                                  learned(logits, labels).to(logits.dtype))

    def commits(self, logits: torch.Tensor) -> torch.Tensor:
        """Bool per sample: the layer's probability that the exit is right is >= 0.5."""
        return self(logits) >= 0.0
