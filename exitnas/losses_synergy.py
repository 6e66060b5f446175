"""``synergy``: the exits teach each other, every pair both ways (DKS).

Deeply-supervised Knowledge Synergy (Sun, Yao, Zhou, Zhao, CVPR 2019; code:
github.com/sundw2014/DKS) adds to the cross-entropies of all supervised branches (here: every
exit, the final one included) a synergy loss of dense pairwise knowledge matching: each
branch's class probabilities are the soft target of every other branch, top-down and
bottom-up, the target side held fixed. For K exits with softmax outputs p_k::

    loss = (1 / K) [ Σ_k CE(p_k, y) + λ Σ_{m != n} KL(p_m || p_n) ]      (batch means, nats)

with p_m detached in ``KL(p_m || p_n)`` (exit n learns from exit m; the paper writes the
cross-entropy H(p_m, p_n), which differs by the entropy of the detached target and has the same
gradient). All K(K - 1) ordered pairs and all cross-entropies have weight 1, the paper's dense
matching with its equal weights (its reference code sums them, λ = 1); the 1 / K keeps the loss
on the scale of one cross-entropy like the other registered losses. With one exit there is no
pair and the loss is its cross-entropy.

λ is the ExitLoss ``weight`` (``retrain.loss_weight``): the reference code's λ = 1 is
``retrain.loss_weight: 1.0``; exitnas' shared default 0.5 halves the synergy term.
``temperature`` is not used (DKS matches plain softmax outputs, T = 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import LOSSES, ExitLoss


@LOSSES.register("synergy")
class Synergy(ExitLoss):
    """``(Σ_k CE_k + weight × Σ_{m != n} KL(p_m || p_n)) / K`` with every target p_m detached;
    see the module docstring."""

    def __call__(self, logits, labels, *, progress=1.0):
        log_p = [F.log_softmax(z, dim=1) for z in logits]
        targets = [lp.detach() for lp in log_p]
        total = sum(F.nll_loss(lp, labels) for lp in log_p)
        pairs = [F.kl_div(log_p[n], targets[m], reduction="batchmean", log_target=True)
                 for m in range(len(logits)) for n in range(len(logits)) if m != n]
        if pairs:
            total = total + self.weight * torch.stack(pairs).sum()
        return total / len(logits)
