"""The genome: a fixed set of Optuna parameters that decodes to a valid :class:`Arch`.

Every trial suggests the same parameters (so NSGA-II's crossover sees whole genomes), and
parameters that the chosen depths or policy make irrelevant are carried but inactive:

- ``depth<i>``: stage i's depth (categorical over the space's depths);
- ``n_exits``: early exits wanted, in [min_exits, max_exits] (capped by the positions);
- per exit slot k < max_exits: ``exit<k>`` a candidate position at maximum depth
  (``s1b2``), ``head<k>`` its head design, and each per-exit policy's gene (its
  ``Param.gene`` + k: ``thr<k>`` max-softmax, ``ent<k>`` entropy thresholds), drawn in the
  policy's ``policy.<key>`` range (only the space's policies);
- ``policy`` (when the space allows several), then each per-arch policy's gene (``patience``).

Genes follow the registry's order (:data:`exitnas.policy.POLICIES`); nothing here knows a
policy by name. With ``search.thresholds: fitted`` (the default) a fitted policy
(``Policy.fitted``) has no genes: the genome is the structure (depths, exits, heads, policy)
and decodes with placeholder thresholds (the policy's ``Param.fill`` end of its range: the top
of ``threshold_range`` / the bottom of ``entropy_range``, where no sample leaves), which the
objective replaces by thresholds fitted on val (:mod:`exitnas.thresholds`).

Why slots and not one gene per candidate position: with 14 positions and at most 6 exits
(``resnet_cifar``), a random per-position genome asks for ~11 exits and must be truncated,
which biases the search towards whichever exits the truncation keeps. Slots hold at most
``max_exits`` exits by construction. Decoding repairs the rest deterministically: a slot whose
position is beyond its stage's chosen depth moves to the stage's last active block (or the
nearest active position before it), and a slot that lands on a taken position moves to the
next free one, so an arch has exactly ``min(n_exits, active positions)`` early exits.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..arch import Arch, Exit
from ..policy import POLICIES, Policy, get_policy
from ..space import Position, Space


def position_label(pos: Position) -> str:
    return f"s{pos[0]}b{pos[1]}"


def _parse_label(label: str) -> Position:
    s, b = label[1:].split("b")
    return int(s), int(b)


class Genome:
    """Suggests (define-by-run) and decodes the parameters of one space."""

    def __init__(self, space: Space) -> None:
        self.space = space
        self.positions = space.positions()  # at maximum depth, network order
        self.slots = min(space.exits.max_exits, len(self.positions))
        self.min_exits = min(space.exits.min_exits, self.slots)
        self.policies = space.policy.names
        self.fitted = space.search.thresholds == "fitted"
        drawn: dict[str, Policy] = {}  # gene -> the (first) policy drawing it
        for name in POLICIES.in_order():
            pol = get_policy(name)
            if name in self.policies and not (self.fitted and pol.fitted):
                drawn.setdefault(pol.param.gene, pol)
        self.genes = tuple(drawn)
        self._per_exit = [p for p in drawn.values() if p.per_exit]
        self._per_arch = [p for p in drawn.values() if not p.per_exit]

    def _suggest(self, trial, pol: Policy, name: str):
        lo, hi = pol.param_range(self.space.policy)
        return trial.suggest_int(name, lo, hi) if pol.integer else trial.suggest_float(name, lo, hi)

    # ---- define-by-run ---------------------------------------------------------------------
    def suggest(self, trial) -> dict[str, Any]:
        """Suggest every parameter on an Optuna trial; returns them as a dict."""
        sp = self.space
        out: dict[str, Any] = {}
        for i, allowed in enumerate(sp.stage_depths):
            if len(allowed) > 1:
                out[f"depth{i}"] = trial.suggest_categorical(f"depth{i}", list(allowed))
        if self.min_exits < self.slots:
            out["n_exits"] = trial.suggest_int("n_exits", self.min_exits, self.slots)
        labels = [position_label(p) for p in self.positions]
        for k in range(self.slots):
            out[f"exit{k}"] = trial.suggest_categorical(f"exit{k}", labels)
            if len(sp.exits.heads) > 1:
                out[f"head{k}"] = trial.suggest_categorical(f"head{k}", list(sp.exits.heads))
            for pol in self._per_exit:
                out[f"{pol.param.gene}{k}"] = self._suggest(trial, pol, f"{pol.param.gene}{k}")
        if len(self.policies) > 1:
            out["policy"] = trial.suggest_categorical("policy", list(self.policies))
        for pol in self._per_arch:
            out[pol.param.gene] = self._suggest(trial, pol, pol.param.gene)
        return out

    # ---- decoding --------------------------------------------------------------------------
    def _value(self, params: Mapping[str, Any], pol: Policy, name: str) -> float:
        """A parameter of ``pol`` from gene ``name``, or its fill where it has no gene."""
        if pol.param.gene not in self.genes:
            return float(pol.fill(self.space.policy))
        return float(int(params[name])) if pol.integer else float(params[name])

    def decode(self, params: Mapping[str, Any]) -> Arch:
        """The architecture a parameter dict stands for (always valid in the space)."""
        sp = self.space
        depths = tuple(int(params.get(f"depth{i}", allowed[0]))
                       for i, allowed in enumerate(sp.stage_depths))
        active = sp.positions(depths)
        n = min(int(params.get("n_exits", self.slots)), len(active))
        policy = str(params.get("policy", self.policies[0]))
        pol = get_policy(policy)
        taken: dict[Position, int] = {}
        for k in range(self.slots):
            if len(taken) == n:
                break
            pos = self._place(_parse_label(str(params[f"exit{k}"])), depths, active, taken)
            taken[pos] = k
        exits, values = [], []
        for pos in sorted(taken):
            k = taken[pos]
            exits.append(Exit(pos[0], pos[1], str(params.get(f"head{k}", sp.exits.heads[0]))))
            if pol.per_exit:
                values.append(self._value(params, pol, f"{pol.param.gene}{k}"))
        if not pol.per_exit:
            values = [self._value(params, pol, pol.param.gene)]
        return Arch(depths=depths, exits=tuple(exits), policy=policy, thresholds=tuple(values))

    @staticmethod
    def _place(pos: Position, depths: tuple[int, ...], active: list[Position],
               taken: Mapping[Position, int]) -> Position:
        s, b = pos
        pos = (s, min(b, depths[s] - 1))
        if pos not in active:  # the final block, or a position the space does not list
            before = [p for p in active if p < pos]
            pos = before[-1] if before else active[0]
        if pos in taken:  # next free active position, wrapping around
            i = active.index(pos)
            pos = next(p for p in active[i:] + active[:i] if p not in taken)
        return pos

    def _gene(self, arch: Arch, pol: Policy, k: int | None) -> Any:
        """Gene of ``pol`` for ``arch``: its parameter ``k`` when ``arch`` uses ``pol`` (None:
        the slot holds no exit), else the policy's fill."""
        mine = arch.policy == pol.name and k is not None
        v = arch.thresholds[k] if mine else pol.fill(self.space.policy)
        return int(v) if pol.integer else v

    def encode(self, arch: Arch) -> dict[str, Any]:
        """Parameters that decode to ``arch`` (to enqueue known architectures)."""
        sp = self.space
        out: dict[str, Any] = {}
        for i, allowed in enumerate(sp.stage_depths):
            if len(allowed) > 1:
                out[f"depth{i}"] = arch.depths[i]
        if self.min_exits < self.slots:
            out["n_exits"] = max(len(arch.exits), self.min_exits)
        fill = [position_label(e.position) for e in arch.exits] or [position_label(self.positions[0])]
        for k in range(self.slots):
            e = arch.exits[k] if k < len(arch.exits) else None
            out[f"exit{k}"] = position_label(e.position) if e else fill[-1]
            if len(sp.exits.heads) > 1:
                out[f"head{k}"] = e.head if e else sp.exits.heads[0]
            for pol in self._per_exit:
                out[f"{pol.param.gene}{k}"] = self._gene(arch, pol, k if e else None)
        if len(self.policies) > 1:
            out["policy"] = arch.policy
        for pol in self._per_arch:
            out[pol.param.gene] = self._gene(arch, pol, 0)
        return out
