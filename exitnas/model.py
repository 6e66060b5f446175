"""The standalone multi-exit model: a chain of backbone segments, one head per exit.

Segment k runs the backbone from exit k-1 (or the input) up to exit k; head k turns its output
into logits. The last head is the final exit. ``forward_exits`` returns every exit's logits and
is the one path used by training, costing and export; ``predict`` applies the exit policy per
sample and drops samples that have left from the rest of the computation.

``temperatures`` (one T_k > 0 per exit, default 1: :mod:`exitnas.calibration`) are what the
exit decision divides each exit's logits by before its statistics: ``predict``,
``calibrated_exits`` and the export's ``ExitGraph`` apply them; ``forward_exits`` returns the
raw logits. They are not in the state dict (they are stored beside the weights).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .calibration import check_temperatures, scale_logits
from .policy import ExitStats, first_exit, get_policy


class Prediction(NamedTuple):
    pred: torch.Tensor  # [N] class index
    exit: torch.Tensor  # [N] exit taken (K = the final exit)
    conf: torch.Tensor  # [N] max softmax probability at the exit taken


class MultiExitModel(nn.Module):
    def __init__(self, *, segments: list[nn.Module], heads: list[nn.Module], policy: str,
                 thresholds: tuple[float, ...], exit_names: list[str],
                 temperatures: tuple[float, ...] | None = None) -> None:
        super().__init__()
        if not len(segments) == len(heads) == len(exit_names):
            raise ValueError("segments, heads and exit_names must have one entry per exit")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.policy = policy
        self.thresholds = tuple(thresholds)
        self.exit_names = list(exit_names)
        self.set_temperatures(temperatures)

    def set_temperatures(self, temperatures: tuple[float, ...] | None) -> None:
        """T_k per exit (final last) the exit decision divides the logits by; None: all 1."""
        n = len(self.heads)
        self.temperatures = (1.0,) * n if temperatures is None else \
            check_temperatures(temperatures, n)

    @property
    def num_exits(self) -> int:
        """Exits including the final one."""
        return len(self.heads)

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for segment, head in zip(self.segments, self.heads):
            x = segment(x)
            out.append(head(x))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_exits(x)

    def calibrated_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits divided by its temperature: what the exit decision sees."""
        return [scale_logits(z, t) for z, t in zip(self.forward_exits(x), self.temperatures)]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, thresholds: tuple[float, ...] | None = None,
                policy: str | None = None) -> Prediction:
        """Per-sample early exit over a batch: a sample leaves at the first exit the policy
        accepts and is not computed further; the final exit takes the rest."""
        rule = get_policy(policy or self.policy)
        params = self.thresholds if thresholds is None else tuple(thresholds)
        n, last = x.shape[0], self.num_exits - 1
        pred = torch.empty(n, dtype=torch.long)
        conf = torch.empty(n, dtype=torch.float32)
        exit_idx = torch.full((n,), last, dtype=torch.long)
        alive = torch.arange(n)
        history: list[tuple[torch.Tensor, ...]] = []
        for k, (segment, head) in enumerate(zip(self.segments, self.heads)):
            x = segment(x)
            c, e, p = ExitStats.from_logits(scale_logits(head(x), self.temperatures[k]))
            if k == last:
                pred[alive], conf[alive] = p, c
                break
            history.append((c, e, p))
            stats = ExitStats(*(torch.stack([h[i] for h in history]) for i in range(3)))
            leave = rule.exit_mask(stats, params)[k]
            done = alive[leave]
            pred[done], conf[done], exit_idx[done] = p[leave], c[leave], k
            keep = ~leave
            alive, x = alive[keep], x[keep]
            history = [tuple(t[keep] for t in h) for h in history]
            if alive.numel() == 0:
                break
        return Prediction(pred, exit_idx, conf)


def exits_from_logits(logits: list[torch.Tensor], policy: str,
                      thresholds: tuple[float, ...],
                      temperatures: tuple[float, ...] | None = None) -> Prediction:
    """Apply a policy to every exit's logits at once (the reference for ``predict``); raw
    logits with the model's ``temperatures`` (None: all 1)."""
    if temperatures is not None:
        logits = [scale_logits(z, t) for z, t in zip(logits, temperatures)]
    stats = ExitStats.stack(logits)
    k = len(logits) - 1
    early = ExitStats(stats.conf[:k], stats.entropy[:k], stats.pred[:k])
    idx = first_exit(get_policy(policy).exit_mask(early, thresholds))
    cols = torch.arange(idx.numel())
    return Prediction(stats.pred[idx, cols], idx, stats.conf[idx, cols])


class ExitGraph(nn.Module):
    """Segment k, head k and the exit statistics as one graph (what an export runs per exit):
    ``x -> (features, conf, entropy, pred)``; the final exit (``final=True``) returns
    ``(conf, entropy, pred)``. The statistics are :meth:`ExitStats.from_logits`, so a runtime
    leaves the graph only for the exit decision. Its state dict is ``segment.*`` + ``head.*``
    (the model's ``segments.k.*`` + ``heads.k.*``). ``temperature`` (T_k, a float) divides the
    head's logits before the statistics: a constant of the traced graph (T = 1: no op)."""

    def __init__(self, *, segment: nn.Module, head: nn.Module, final: bool,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.segment, self.head, self.final = segment, head, final
        self.temperature = check_temperatures((temperature,), 1)[0]

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs in order (the ONNX graph's output names)."""
        return ["conf", "entropy", "pred"] if self.final else ["features", "conf", "entropy", "pred"]

    def forward(self, x: torch.Tensor):
        features = self.segment(x)
        stats = ExitStats.from_logits(scale_logits(self.head(features), self.temperature))
        return stats if self.final else (features, *stats)
