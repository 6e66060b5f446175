"""``neg_correlation``: the exits as a negatively correlated ensemble (DNCC).

Deep Negative Correlation Classification (Zhang, Hou, Liu, Bian, Xu, Zhou, Zhu, arXiv
2212.07070, 2022) trains ensemble members that share a backbone so that each one is accurate
and negatively correlated with the ensemble, by splitting the ensemble's loss into the members'
own losses and the members' correlation with the ensemble: negative correlation learning (Liu &
Yao 1999; Shi et al., "Crowd counting with deep negative correlation learning", CVPR 2018)
carried from squared error to cross-entropy. Here the members are the exits.

For K exits with softmax outputs p_k, the ensemble is their normalised geometric mean
``q = softmax(mean_k z_k)`` (z_k the logits). For it the split is exact (Heskes 1998)::

    mean_k CE(p_k, y) = CE(q, y) + mean_k KL(q || p_k)

so ``KL(q || p_k)`` is exit k's ambiguity, the part of its own error the ensemble does not
share. Each exit minimises its cross-entropy minus λ times its ambiguity, with q held fixed
(detached) as NCL holds the ensemble mean fixed::

    loss = mean_k [ CE(p_k, y) - λ KL(q || p_k) ]        (batch means, nats)

Exit k's gradient with respect to its logits is then ``(1 - λ)(p_k - y) + λ(q - y)``: λ = 0 is
independent training (``mean_ce``), λ = 1 trains every exit on the ensemble's error, and between
the two the penalty pushes each exit's output away from the ensemble's, so the exits' errors
decorrelate. With one exit q = p_1 and the loss is its cross-entropy.

λ is the ExitLoss ``weight`` (``retrain.loss_weight``, in [0, 1], NCL's range; exitnas' default
0.5). ``temperature`` is not used (the paper's softmax has none).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import LOSSES, ExitLoss


@LOSSES.register("neg_correlation")
class NegativeCorrelation(ExitLoss):
    """``mean_k [CE(p_k, y) - weight × KL(q || p_k)]``, q the exits' normalised geometric mean
    (detached); see the module docstring."""

    def __call__(self, logits, labels, *, progress=1.0):
        log_p = [F.log_softmax(z, dim=1) for z in logits]
        with torch.no_grad():
            log_q = F.log_softmax(torch.stack(logits).mean(dim=0), dim=1)
        terms = [F.nll_loss(lp, labels)
                 - self.weight * F.kl_div(lp, log_q, reduction="batchmean", log_target=True)
                 for lp in log_p]
        return torch.stack(terms).mean()
