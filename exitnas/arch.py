"""Architectures: per-stage depths, early exits (position, head), exit policy and thresholds.

The canonical id is human-readable and file-name safe::

    d3.2.4~s0b1=linear,s1b0=conv~max_softmax=0.9,0.85

(depths ~ exits as s<stage>b<block>=<head> ~ policy=params; ``none`` when there is no early
exit). The final exit (the backbone's own classifier after the last block) is always present
and is not listed.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from .errors import ArchError
from .policy import get_policy
from .space import Space


@dataclass(frozen=True, order=True)
class Exit:
    stage: int
    block: int
    head: str

    @property
    def position(self) -> tuple[int, int]:
        return (self.stage, self.block)

    @property
    def key(self) -> str:
        return f"s{self.stage}b{self.block}={self.head}"


def _fmt(value: float) -> str:
    return f"{round(float(value), 4):g}"


@dataclass(frozen=True, kw_only=True)
class Arch:
    depths: tuple[int, ...]
    exits: tuple[Exit, ...]
    policy: str = "max_softmax"
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "exits", tuple(sorted(self.exits)))
        object.__setattr__(self, "thresholds", tuple(round(float(t), 4) for t in self.thresholds))

    # ---- id ------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        exits = ",".join(e.key for e in self.exits) or "none"
        params = ",".join(_fmt(t) for t in self.thresholds)
        return f"d{'.'.join(map(str, self.depths))}~{exits}~{self.policy}={params}"

    def __str__(self) -> str:
        return self.id

    @classmethod
    def from_id(cls, text: str) -> "Arch":
        m = re.fullmatch(r"d([\d.]+)~([^~]+)~(\w+)=([\d.,e+-]*)", text.strip())
        if not m:
            raise ArchError(f"arch id {text!r} does not parse (expected d<depths>~<exits>~<policy>=<values>)")
        depths = tuple(int(d) for d in m.group(1).split("."))
        exits = []
        if m.group(2) != "none":
            for part in m.group(2).split(","):
                em = re.fullmatch(r"s(\d+)b(\d+)=(\w+)", part)
                if not em:
                    raise ArchError(f"arch id {text!r}: exit {part!r} is not s<stage>b<block>=<head>")
                exits.append(Exit(int(em.group(1)), int(em.group(2)), em.group(3)))
        params = tuple(float(v) for v in m.group(4).split(",") if v)
        return cls(depths=depths, exits=tuple(exits), policy=m.group(3), thresholds=params)

    # ---- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"id": self.id, "depths": list(self.depths),
                "exits": [{"stage": e.stage, "block": e.block, "head": e.head} for e in self.exits],
                "policy": self.policy, "thresholds": list(self.thresholds)}

    @classmethod
    def from_json(cls, data: dict) -> "Arch":
        try:
            return cls(depths=tuple(data["depths"]),
                       exits=tuple(Exit(int(e["stage"]), int(e["block"]), str(e["head"]))
                                   for e in data["exits"]),
                       policy=str(data.get("policy", "max_softmax")),
                       thresholds=tuple(data.get("thresholds", ())))
        except (KeyError, TypeError, ValueError) as err:
            raise ArchError(f"arch JSON is malformed ({type(err).__name__}: {err})") from None

    @classmethod
    def parse(cls, text: str) -> "Arch":
        """An id string, a JSON object, or the path of a JSON file holding one."""
        text = text.strip()
        if text.startswith("{"):
            try:
                return cls.from_json(json.loads(text))
            except json.JSONDecodeError as err:
                raise ArchError(f"arch JSON does not parse: {err}") from None
        if text.endswith(".json"):
            try:
                data = json.loads(open(text).read())
            except (OSError, json.JSONDecodeError) as err:
                raise ArchError(f"{text}: cannot read arch JSON ({err})") from None
            return cls.from_json(data.get("arch", data))
        return cls.from_id(text)

    def with_thresholds(self, thresholds: tuple[float, ...], policy: str | None = None) -> "Arch":
        return Arch(depths=self.depths, exits=self.exits, policy=policy or self.policy,
                    thresholds=thresholds)

    # ---- space checks --------------------------------------------------------------------
    def validate(self, space: Space) -> "Arch":
        """Return self, or raise ArchError saying what does not fit ``space``."""
        stages = space.backbone.stages
        if len(self.depths) != len(stages):
            raise ArchError(f"arch {self.id}: {len(self.depths)} depths for {len(stages)} stages")
        for i, (d, st) in enumerate(zip(self.depths, stages)):
            if d not in st.depths:
                raise ArchError(f"arch {self.id}: depth {d} of stage {i} is not one of {list(st.depths)}")
        active = set(space.positions(self.depths))
        seen = set()
        for e in self.exits:
            if e.position not in active:
                raise ArchError(f"arch {self.id}: exit position s{e.stage}b{e.block} is not a "
                                f"candidate at depths {list(self.depths)}")
            if e.position in seen:
                raise ArchError(f"arch {self.id}: two exits at s{e.stage}b{e.block}")
            seen.add(e.position)
            if e.head not in space.exits.heads:
                raise ArchError(f"arch {self.id}: head {e.head!r} is not allowed "
                                f"(allowed: {', '.join(space.exits.heads)})")
        if len(self.exits) > space.exits.max_exits:
            raise ArchError(f"arch {self.id}: {len(self.exits)} exits, the space allows "
                            f"{space.exits.max_exits}")
        if self.policy not in space.policy.names:
            raise ArchError(f"arch {self.id}: policy {self.policy!r} is not allowed "
                            f"(allowed: {', '.join(space.policy.names)})")
        msg = get_policy(self.policy).check(self.thresholds, len(self.exits))
        if msg:
            raise ArchError(f"arch {self.id}: {msg}")
        return self


def sample_arch(space: Space, rng: random.Random) -> Arch:
    """Uniform random arch: depths uniform per stage, the number of exits uniform in
    [min_exits, max_exits] (capped by the active positions), positions uniform without
    replacement, heads uniform, policy uniform, thresholds uniform in the policy's range."""
    depths = tuple(rng.choice(st.depths) for st in space.backbone.stages)
    positions = space.positions(depths)
    hi = min(space.exits.max_exits, len(positions))
    n = rng.randint(min(space.exits.min_exits, hi), hi)
    chosen = sorted(rng.sample(positions, n))
    exits = tuple(Exit(s, b, rng.choice(space.exits.heads)) for s, b in chosen)
    policy = rng.choice(space.policy.names)
    return Arch(depths=depths, exits=exits, policy=policy,
                thresholds=sample_params(space, policy, n, rng))


def sample_params(space: Space, policy: str, n_exits: int, rng: random.Random) -> tuple[float, ...]:
    """Uniform parameters for ``policy`` within the space's range for it."""
    rule = get_policy(policy)
    lo, hi = rule.param_range(space.policy)
    n = rule.num_params(n_exits)
    if rule.integer:
        return tuple(float(rng.randint(int(lo), int(hi))) for _ in range(n))
    return tuple(round(rng.uniform(lo, hi), 4) for _ in range(n))
