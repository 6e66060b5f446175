"""``l2w``: per-sample, per-exit loss weights from a meta-learned weight-prediction network.

L2W-DEN (Han, Pu, Lai, Wang, Song, Cao, Huang, Deng, Huang, "Learning to Weight Samples for
Dynamic Early-exiting Networks", ECCV 2022; reference code github.com/LeapLabTHU/L2W-DEN,
read for this reconstruction, not copied). With ``ce[i, k]`` sample i's cross-entropy at exit k
(K exits, the final one included) on a batch of B samples:

- **Weights.** A weight-prediction network (an MLP: K loss values -> ``HIDDEN`` ReLU units ->
  K outputs, tanh) maps each sample's detached per-exit losses to ``v[i, k]`` in (-1, 1);
  the weights are ``w = 1 + EPSILON × (v - mean(v))`` with the mean over the whole B x K
  matrix (the reference's ``constraint_dimension mat``), so they average exactly 1 and, with
  ``EPSILON`` < 0.5, lie in (1 - 2 EPSILON, 1 + 2 EPSILON): positive.
- **Training loss** (what the model learns from): ``mean_{i,k} w[i, k] × ce[i, k]``, the
  weights held fixed. The reference sums over exits; the mean keeps the loss on the scale of
  one cross-entropy like every registered loss.
- **Meta step** (every ``META_INTERVAL`` steps, before the model's step): a virtual SGD step
  of the model on the weighted loss, ``θ' = θ - lr × (∇θ L_w(θ, φ) + weight_decay × θ)``,
  taken with ``torch.func.functional_call`` on the step's trainable parameters (the graph
  kept, so θ' depends on the weight net's parameters φ); BatchNorm buffers are copied, so
  neither the parameters nor the running statistics of the model change. Then the meta loss
  of θ' on a held-out batch, backpropagated into φ only, one Adam step on φ.
- **Meta loss** (the paper's target): the exits' losses under the exit distribution of a
  budget. Exit k gets the share ``q_k ∝ P^k`` (k = 1..K, normalised: MSDNet's budgeted
  batch, P = ``TARGET_P``) of the held-out batch: going through the exits in order, exit k
  takes the ``floor(n × q_k)`` samples it is most confident about (max softmax of θ') that
  no earlier exit took, the final exit the rest; the meta loss is the sum over exits of the
  mean cross-entropy (under θ') of the samples each exit takes.

**Held-out data**: each training batch is split in two halves (``chunk(2)``); the first half is
what the model trains on in that step (the virtual step and the real one), the second half is
the meta step's held-out batch and is not trained on in that step. So the step's gradient comes
from half the batch (as in the reference, which takes two half-batch steps per batch); batches
are reshuffled every epoch, so every train image serves in both roles over training. Val and
test are never used.

Hyper-parameters, the reference's published command (MSDNet on ImageNet, ``--meta_net_hidden_size
500 --meta_lr 1e-4 --meta_weight_decay 1e-4 --epsilon 0.3 --target_p_index 15
--meta_net_input_type loss --constraint_dimension mat``), as class constants (subclass to change
them), not config fields: the paper does not ask users to tune them. ``META_INTERVAL`` 1 is the
code's default (a meta step before every step; the ImageNet command's 100 goes with batch 4096).

Reconstructed here, differing from the reference: the virtual step uses ``retrain.optim.lr``
(the peak rate) with weight decay and no momentum (the reference copies the model optimizer's
current scheduled rate and momentum buffer); the meta learning rate follows a cosine over the
share of training done, per epoch (the reference: per step). Under DDP the meta gradients are
averaged over the ranks, so every rank keeps the same weight net (not covered by a test).
``temperature`` and ``weight`` are not used. The weight net and its optimizer are the loss's
``state_dict`` (kept in the training checkpoint).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .losses import LOSSES, ExitLoss


class WeightNet(nn.Module):
    """The weight-prediction network: per-exit losses (B, K) -> tanh outputs (B, K)."""

    def __init__(self, *, exits: int, hidden: int) -> None:
        super().__init__()
        self.exits = exits
        self.body = nn.Sequential(nn.Linear(exits, hidden), nn.ReLU(), nn.Linear(hidden, exits))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(losses))


def target_shares(exits: int, p: float) -> torch.Tensor:
    """Exit k's share ``q_k ∝ p^k`` (k = 1..exits), normalised (float64)."""
    q = torch.tensor(p, dtype=torch.float64) ** torch.arange(1, exits + 1, dtype=torch.float64)
    return q / q.sum()


def exit_assignment(logits: list[torch.Tensor], shares: torch.Tensor) -> list[torch.Tensor]:
    """Per exit, the indices of the samples it takes: in exit order, the ``floor(n × q_k)``
    most confident (max softmax) samples no earlier exit took; the final exit the rest."""
    n = logits[0].shape[0]
    free = torch.ones(n, dtype=torch.bool, device=logits[0].device)
    out = []
    for k, z in enumerate(logits):
        if k == len(logits) - 1:
            take = torch.nonzero(free).flatten()
        else:
            conf = z.detach().softmax(dim=1).amax(dim=1).masked_fill(~free, -1.0)
            order = conf.argsort(descending=True, stable=True)
            take = order[:min(math.floor(n * float(shares[k])), int(free.sum()))]
        free[take] = False
        out.append(take)
    return out


@LOSSES.register("l2w")
class L2W(ExitLoss):
    """L2W-DEN sample weighting; see the module docstring."""

    HIDDEN = 500             # weight net hidden units (one hidden layer)
    EPSILON = 0.3            # weight spread: w = 1 + EPSILON (v - mean v)
    META_LR = 1e-4           # Adam learning rate of the weight net (peak; cosine over training)
    META_WEIGHT_DECAY = 1e-4
    META_INTERVAL = 1        # a meta step every this many training steps
    TARGET_P = 0.75          # budgeted-batch p of the meta loss's exit shares q_k ∝ p^k
    SEED = 0                 # weight net initialisation (the global RNG is not touched)

    def __init__(self, *, temperature: float = 3.0, weight: float = 0.5) -> None:
        super().__init__(temperature=temperature, weight=weight)
        self.net: WeightNet | None = None
        self.optimizer: torch.optim.Adam | None = None
        self.steps = 0
        self._pending: dict | None = None

    # ---- weights ------------------------------------------------------------------------

    def _ensure(self, exits: int, device: torch.device) -> WeightNet:
        if self.net is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.SEED)
                net = WeightNet(exits=exits, hidden=self.HIDDEN)
            self.net = net.to(device)
            self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.META_LR,
                                              weight_decay=self.META_WEIGHT_DECAY)
            if self._pending is not None:
                self.net.load_state_dict(self._pending["net"])
                self.optimizer.load_state_dict(self._pending["optimizer"])
                self.steps = int(self._pending["steps"])
                self._pending = None
        if self.net.exits != exits:
            raise ValueError(f"l2w weight net was built for {self.net.exits} exits, not {exits}")
        return self.net.to(device)

    def weights(self, ce: torch.Tensor) -> torch.Tensor:
        """Sample weights (B, K) for per-exit cross-entropies ``ce`` (B, K), which are fed to
        the weight net detached: mean exactly 1, each in (1 - 2 EPSILON, 1 + 2 EPSILON)."""
        v = self._ensure(ce.shape[1], ce.device)(ce.detach())
        return 1.0 + self.EPSILON * (v - v.mean())

    @staticmethod
    def exit_losses(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy of every exit, (B, K), nats."""
        return torch.stack([F.cross_entropy(z, labels, reduction="none") for z in logits], 1)

    def __call__(self, logits, labels, *, progress=1.0):
        ce = self.exit_losses(logits, labels)
        with torch.no_grad():
            w = self.weights(ce)
        return (w * ce).mean()

    # ---- meta step ----------------------------------------------------------------------

    def meta_loss(self, module: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                  held_out: tuple[torch.Tensor, torch.Tensor], *, lr: float,
                  weight_decay: float) -> torch.Tensor:
        """The meta loss of the virtual step on ``train`` evaluated on ``held_out``, a
        function of the weight net's parameters (graph kept); ``module`` is left as it was."""
        from torch.func import functional_call

        params = dict(module.named_parameters())
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        x, y = train
        ce = self.exit_losses(functional_call(module, {**params, **buffers}, (x,)), y)
        weighted = (self.weights(ce) * ce).mean()
        names = [n for n, p in params.items() if p.requires_grad]
        grads = torch.autograd.grad(weighted, [params[n] for n in names], create_graph=True,
                                    allow_unused=True)
        stepped = dict(params)
        for n, g in zip(names, grads):
            p = params[n]
            step = p.detach() * weight_decay if g is None else g + weight_decay * p.detach()
            stepped[n] = p.detach() - lr * step
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        xm, ym = held_out
        logits = functional_call(module, {**stepped, **buffers}, (xm,))
        take = exit_assignment(logits, target_shares(len(logits), self.TARGET_P))
        terms = [F.cross_entropy(z[idx], ym[idx]) for z, idx in zip(logits, take) if len(idx)]
        return torch.stack(terms).sum()

    def meta_update(self, module: nn.Module, train, held_out, *, lr: float,
                    weight_decay: float, progress: float = 0.0) -> torch.Tensor:
        """One meta step: the weight net's parameters take one Adam step down the gradient of
        :meth:`meta_loss`; only they change. Returns the meta loss before the step."""
        loss = self.meta_loss(module, train, held_out, lr=lr, weight_decay=weight_decay)
        params = list(self.net.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        average = torch.distributed.is_available() and torch.distributed.is_initialized()
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
            if average:
                torch.distributed.all_reduce(p.grad)
                p.grad /= torch.distributed.get_world_size()
        for group in self.optimizer.param_groups:
            group["lr"] = self.META_LR * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def before_step(self, module, x, y, *, epoch, optim):
        if len(x) < 2:
            return x, y
        (xt, xm), (yt, ym) = x.chunk(2), y.chunk(2)
        if self.steps % self.META_INTERVAL == 0:
            value = self.meta_update(module, (xt, yt), (xm, ym), lr=optim.lr,
                                     weight_decay=optim.weight_decay, progress=epoch.progress)
            epoch.record("l2w_meta_loss", value)
        self.steps += 1
        return xt, yt

    # ---- checkpoint ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.net is None:
            return dict(self._pending or {})
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps": self.steps, "exits": self.net.exits}

    def load_state_dict(self, state: dict) -> None:
        self.net, self.optimizer, self._pending = None, None, dict(state)
