"""Exit rules in numpy: how each exit policy decides, one early exit at a time.

One module for the two places that decide in numpy: exitnas's scorer (:mod:`exitnas.evaluate`,
threshold fitting) and the deployment runtime (:mod:`exitnas.runtime`). It imports numpy only,
so the runtime, which runs without exitnas, loads it too: a deployment copies ``runtime.py``
and ``exit_rules.py`` side by side.

A rule sees early exit k = 0, 1, ... in turn: that exit's per-sample statistics (:class:`Row`)
and the state it returned at exit k - 1 (``()`` at exit 0), and returns the [n] boolean mask
"may leave at k" and its new state, a tuple of per-sample arrays. A sample's answer depends
only on its own statistics at exits <= k, so the runtime drops the samples that left, and their
rows of the state, between exits; the scorer runs every sample through every exit and keeps
the first exit that took it. The final exit takes every remaining sample::

    rule = get("max_softmax")
    params = rule.prepare((0.9, 0.8))                 # as compared: float32
    leave, state = rule.leave(0, Row(conf0, None, pred0), params, ())

Thresholds are compared in float32 (``conf >= float32(t)``, ``entropy <= float32(t)``), as
:mod:`exitnas.policy`'s torch rules compare them; a NaN statistic never leaves. A policy of
your own registers its rule here under its name (``exitnas.policy.POLICIES.register`` does it;
a deployment without exitnas calls :func:`register` before ``runtime.load``).
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

MAX_EXITS = 256  # exit indices are uint8


class Row(NamedTuple):
    """One exit's statistics over n samples: max softmax probability (float32), softmax entropy
    in nats (float32; None where the rule does not read it) and argmax class."""

    conf: np.ndarray
    entropy: np.ndarray | None
    pred: np.ndarray


class Rule:
    """Base class. ``reads`` names the :class:`Row` fields the rule uses (the runtime computes
    entropy only for rules that read it); ``per_exit``: one parameter per early exit, else one
    for the whole arch."""

    reads: tuple[str, ...] = ("conf", "entropy", "pred")
    per_exit: bool = True

    def num_params(self, n_early: int) -> int:
        return n_early if self.per_exit else 1

    def prepare(self, params: Sequence[float]) -> Any:
        """``params`` as :meth:`leave` compares them (default: a float32 array)."""
        return np.asarray(params, dtype=np.float32)

    def leave(self, k: int, row: Row, params: Any, state: tuple) -> tuple[np.ndarray, tuple]:
        raise NotImplementedError


class Threshold(Rule):
    """Leave at exit k when the statistic ``stat`` is >= the exit's threshold (``below``: <=).
    The rule :mod:`exitnas.thresholds` fits: per exit one value array and one direction."""

    def __init__(self, stat: str, *, below: bool) -> None:
        if stat not in ("conf", "entropy"):
            raise ValueError(f"a threshold rule compares conf or entropy, not {stat!r}")
        self.stat, self.below = stat, below
        self.reads = (stat,)
        self._field = Row._fields.index(stat)

    def passes(self, values: np.ndarray, t: np.float32) -> np.ndarray:
        """The comparison itself (``t`` already float32)."""
        return np.less_equal(values, t) if self.below else np.greater_equal(values, t)

    def leave(self, k, row, params, state):
        return self.passes(row[self._field], params[k]), state


class Patience(Rule):
    """PABEE: leave at exit k once exits k-p+1..k (p consecutive exits) agree on the class;
    p = 1 leaves at the first exit. State: (previous exit's class, length of the agreeing run)."""

    reads = ("pred",)
    per_exit = False

    def prepare(self, params):
        return int(params[0])

    def leave(self, k, row, params, state):
        if k == 0:
            run = np.ones(row.pred.shape[0], dtype=np.int32)
        else:
            prev, run = state
            run = np.where(row.pred == prev, run + 1, 1)
        return run >= params, (row.pred, run)


_RULES: dict[str, Rule] = {}


def register(name: str, rule: Rule) -> Rule:
    """Make ``rule`` the numpy rule of policy ``name``; another rule under a taken name raises."""
    if not isinstance(rule, Rule):
        raise TypeError(f"exit rule {name!r} is a {type(rule).__name__}, not an exit_rules.Rule")
    if _RULES.get(name, rule) is not rule:
        raise ValueError(f"exit rule {name!r} is already registered")
    _RULES[name] = rule
    return rule


def get(name: str) -> Rule:
    try:
        return _RULES[name]
    except KeyError:
        known = ", ".join(sorted(_RULES))
        raise LookupError(f"unknown exit policy {name!r} (known: {known})") from None


def names() -> list[str]:
    return sorted(_RULES)


MAX_SOFTMAX = register("max_softmax", Threshold("conf", below=False))
ENTROPY = register("entropy", Threshold("entropy", below=True))
PATIENCE = register("patience", Patience())


# ---- every sample through every exit (the scorer) --------------------------------------------
# A sample's exit index = how many leading exits it passes without leaving: the sum over k of
# "alive after exit k" (no earlier exit accepted it). Branch-free and ~6x faster than masked
# assignment; ``~hit`` (not the opposite comparison) keeps NaN statistics from leaving.
def _count_alive(hits: Iterable[np.ndarray]) -> np.ndarray:
    idx = alive = None
    for hit in hits:
        if alive is None:
            alive = ~hit
            idx = alive.astype(np.uint8)
        else:
            alive &= ~hit
            idx += alive
    return idx


def exit_index(rule: Rule, params: Sequence[float], conf: np.ndarray, entropy: np.ndarray,
               pred: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exit taken by every sample [N], uint8 (``len(rows) - 1`` = the final exit).

    ``conf``/``entropy``/``pred`` are [R, N] statistics; ``rows`` picks an arch's exits from
    them in network order, the final exit last."""
    if len(rows) > MAX_EXITS:
        raise ValueError(f"{len(rows)} exits: at most {MAX_EXITS} are supported")
    k = len(rows) - 1
    if rule.per_exit and len(params) < k:
        raise ValueError(f"{len(params)} thresholds for {k} early exits")
    if k == 0:
        return np.zeros(conf.shape[1], dtype=np.uint8)
    p = rule.prepare(params)

    def hits():
        state: tuple = ()
        for j in range(k):
            r = rows[j]
            hit, state = rule.leave(j, Row(conf[r], entropy[r], pred[r]), p, state)
            yield hit

    return _count_alive(hits())


__all__ = ["Row", "Rule", "Threshold", "Patience", "register", "get", "names", "exit_index",
           "MAX_SOFTMAX", "ENTROPY", "PATIENCE", "MAX_EXITS"]
