"""The genome: a fixed set of Optuna parameters that decodes to a valid :class:`Arch`.

Every trial suggests the same parameters (so NSGA-II's crossover sees whole genomes), and
parameters that the chosen depths or policy make irrelevant are carried but inactive:

- ``depth<i>``: stage i's depth (categorical over the space's depths);
- ``n_exits``: early exits wanted, in [min_exits, max_exits] (capped by the positions);
- per exit slot k < max_exits: ``exit<k>`` a candidate position at maximum depth
  (``s1b2``), ``head<k>`` its head design, ``thr<k>`` / ``ent<k>`` its max-softmax / entropy
  threshold (only those the space's policies use);
- ``policy`` (when the space allows several) and ``patience``.

With ``search.thresholds: fitted`` (the default) there are no threshold genes: the genome is
the structure (depths, exits, heads, policy) and decodes with placeholder thresholds (the
top of ``threshold_range`` / the bottom of ``entropy_range``: no sample leaves early), which
the objective replaces by thresholds fitted on val (:mod:`exitnas.thresholds`).

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
        self.genes = () if self.fitted else tuple(
            g for g, p in (("thr", "max_softmax"), ("ent", "entropy")) if p in self.policies)

    # ---- define-by-run ---------------------------------------------------------------------
    def suggest(self, trial) -> dict[str, Any]:
        """Suggest every parameter on an Optuna trial; returns them as a dict."""
        sp = self.space
        out: dict[str, Any] = {}
        for i, st in enumerate(sp.backbone.stages):
            if len(st.depths) > 1:
                out[f"depth{i}"] = trial.suggest_categorical(f"depth{i}", list(st.depths))
        if self.min_exits < self.slots:
            out["n_exits"] = trial.suggest_int("n_exits", self.min_exits, self.slots)
        labels = [position_label(p) for p in self.positions]
        for k in range(self.slots):
            out[f"exit{k}"] = trial.suggest_categorical(f"exit{k}", labels)
            if len(sp.exits.heads) > 1:
                out[f"head{k}"] = trial.suggest_categorical(f"head{k}", list(sp.exits.heads))
            if "thr" in self.genes:
                out[f"thr{k}"] = trial.suggest_float(f"thr{k}", *sp.policy.threshold_range)
            if "ent" in self.genes:
                out[f"ent{k}"] = trial.suggest_float(f"ent{k}", *sp.policy.entropy_range)
        if len(self.policies) > 1:
            out["policy"] = trial.suggest_categorical("policy", list(self.policies))
        if "patience" in self.policies:
            out["patience"] = trial.suggest_int("patience", *sp.policy.patience_range)
        return out

    # ---- decoding --------------------------------------------------------------------------
    def decode(self, params: Mapping[str, Any]) -> Arch:
        """The architecture a parameter dict stands for (always valid in the space)."""
        sp = self.space
        depths = tuple(int(params.get(f"depth{i}", st.depths[0]))
                       for i, st in enumerate(sp.backbone.stages))
        active = sp.positions(depths)
        n = min(int(params.get("n_exits", self.slots)), len(active))
        policy = str(params.get("policy", self.policies[0]))
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
            if policy == "max_softmax":
                values.append(float(params[f"thr{k}"]) if "thr" in self.genes
                              else sp.policy.threshold_range[1])
            elif policy == "entropy":
                values.append(float(params[f"ent{k}"]) if "ent" in self.genes
                              else sp.policy.entropy_range[0])
        if policy == "patience":
            values = [float(int(params["patience"]))]
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

    def encode(self, arch: Arch) -> dict[str, Any]:
        """Parameters that decode to ``arch`` (to enqueue known architectures)."""
        sp = self.space
        out: dict[str, Any] = {}
        for i, st in enumerate(sp.backbone.stages):
            if len(st.depths) > 1:
                out[f"depth{i}"] = arch.depths[i]
        if self.min_exits < self.slots:
            out["n_exits"] = max(len(arch.exits), self.min_exits)
        fill = [position_label(e.position) for e in arch.exits] or [position_label(self.positions[0])]
        for k in range(self.slots):
            e = arch.exits[k] if k < len(arch.exits) else None
            out[f"exit{k}"] = position_label(e.position) if e else fill[-1]
            if len(sp.exits.heads) > 1:
                out[f"head{k}"] = e.head if e else sp.exits.heads[0]
            t = arch.thresholds[k] if e and arch.policy in ("max_softmax", "entropy") else None
            if "thr" in self.genes:
                out[f"thr{k}"] = t if arch.policy == "max_softmax" and t is not None \
                    else sp.policy.threshold_range[1]
            if "ent" in self.genes:
                out[f"ent{k}"] = t if arch.policy == "entropy" and t is not None \
                    else sp.policy.entropy_range[0]
        if len(self.policies) > 1:
            out["policy"] = arch.policy
        if "patience" in self.policies:
            out["patience"] = int(arch.thresholds[0]) if arch.policy == "patience" \
                else sp.policy.patience_range[0]
        return out
