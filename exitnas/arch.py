"""Architectures: per-stage depths, early exits (position, head), exit policy and thresholds.

The canonical id is human-readable and file-name safe::

    d3.2.4~s0b1=linear,s1b0=conv~max_softmax=0.9,0.85

(depths ~ exits as s<stage>b<block>=<head> ~ policy=params; ``none`` when there is no early
exit). The final exit (the backbone's own classifier after the last block) is always present
and is not listed.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass

from .errors import ArchError
from .policy import get_policy
from .space import Space


# The id grammar, as an allowlist: numbers of bounded length, names as Python identifiers.
_INT = r"\d{1,6}"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_NUM = r"[-+]?(?:\d{1,20}(?:\.\d{0,20})?|\.\d{1,20})(?:[eE][-+]?\d{1,3})?"
_EXIT = re.compile(rf"s(?P<stage>{_INT})b(?P<block>{_INT})=(?P<head>{_NAME.pattern})")
_EXIT_NC = rf"s{_INT}b{_INT}={_NAME.pattern}"
_ID = re.compile(rf"d(?P<depths>{_INT}(?:\.{_INT}){{0,63}})"
                 rf"~(?P<exits>none|{_EXIT_NC}(?:,{_EXIT_NC}){{0,255}})"
                 rf"~(?P<policy>{_NAME.pattern})=(?P<params>(?:{_NUM}(?:,{_NUM}){{0,255}})?)")
_JSON_KEYS = {"id", "depths", "exits", "policy", "thresholds"}
_MAX_JSON = 1 << 20  # bytes; an arch JSON is a few hundred


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _json_list(value: object, what: str) -> list:
    if not isinstance(value, list):
        raise ArchError(f"arch JSON: {what} must be a list, got {_json_type(value)}")
    return value


def _json_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**6:
        raise ArchError(f"arch JSON: {what} {_short(value)} is not an integer in [0, 999999]")
    return value


def _diagnose(text: str) -> str:
    """Which part of an id that does not match ``_ID`` is wrong."""
    generic = ("does not parse (expected d<depths>~<exits>~<policy>=<values>, "
               "e.g. d2.2~s0b1=linear~max_softmax=0.8)")
    parts = text.split("~")
    if len(parts) != 3:
        return generic
    depths, exits, rule = parts
    if not re.fullmatch(rf"d{_INT}(?:\.{_INT})*", depths):
        return f"does not parse: depths {depths!r} are not d<int>.<int>..."
    if exits != "none":
        for part in exits.split(","):
            if not _EXIT.fullmatch(part):
                return f"does not parse: exit {part!r} is not s<stage>b<block>=<head>"
    name, _, values = rule.partition("=")
    if not _NAME.fullmatch(name):
        return f"does not parse: policy {name!r} is not a name"
    for v in values.split(",") if values else ():
        if not re.fullmatch(_NUM, v):
            return f"does not parse: value {v!r} is not a number"
    return generic


def _load_json(text: str, what: str) -> object:
    """``json.loads`` that refuses NaN / Infinity and nesting too deep to be an arch."""
    if len(text) > _MAX_JSON:
        raise ArchError(f"{what}: larger than {_MAX_JSON} bytes")

    def constant(name: str):
        raise ArchError(f"{what}: {name} is not a number JSON allows")

    try:
        return json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as err:
        raise ArchError(f"{what} does not parse: {err}") from None
    except RecursionError:
        raise ArchError(f"{what}: nested too deeply") from None


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
        thresholds = tuple(float(t) for t in self.thresholds)
        bad = [t for t in thresholds if not math.isfinite(t)]
        if bad:
            raise ArchError(f"threshold {bad[0]} is not a finite number")
        object.__setattr__(self, "thresholds", tuple(round(t, 4) for t in thresholds))

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
        """Parse a canonical id; anything outside the grammar (see ``_ID``) is refused."""
        if not isinstance(text, str):
            raise ArchError(f"arch id must be a string, got {type(text).__name__}")
        m = _ID.fullmatch(text.strip())
        if not m:
            raise ArchError(f"arch id {_short(text)} {_diagnose(text.strip())}")
        depths = tuple(int(d) for d in m["depths"].split("."))
        exits = []
        if m["exits"] != "none":
            for part in m["exits"].split(","):
                em = _EXIT.fullmatch(part)
                exits.append(Exit(int(em["stage"]), int(em["block"]), em["head"]))
        params = tuple(float(v) for v in m["params"].split(",")) if m["params"] else ()
        for v in params:
            if not math.isfinite(v):
                raise ArchError(f"arch id {_short(text)}: value {v} is not a finite number")
        return cls(depths=depths, exits=tuple(exits), policy=m["policy"], thresholds=params)

    # ---- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"id": self.id, "depths": list(self.depths),
                "exits": [{"stage": e.stage, "block": e.block, "head": e.head} for e in self.exits],
                "policy": self.policy, "thresholds": list(self.thresholds)}

    @classmethod
    def from_json(cls, data: object) -> "Arch":
        """The inverse of :meth:`to_json`; every key and value is checked (``id``, when
        present, must equal the id of the other fields)."""
        if not isinstance(data, dict):
            raise ArchError(f"arch JSON must be an object, got {_json_type(data)}")
        unknown = sorted(set(data) - _JSON_KEYS)
        if unknown:
            raise ArchError(f"arch JSON: unknown key {unknown[0]!r} (known: {', '.join(sorted(_JSON_KEYS))})")
        for key in ("depths", "exits"):
            if key not in data:
                raise ArchError(f"arch JSON: missing key {key!r}")
        depths = _json_list(data["depths"], "depths")
        for i, d in enumerate(depths):
            _json_int(d, f"depths[{i}]")
        exits = []
        for i, e in enumerate(_json_list(data["exits"], "exits")):
            where = f"exits[{i}]"
            if not isinstance(e, dict) or set(e) != {"stage", "block", "head"}:
                raise ArchError(f"arch JSON: {where} must be an object with exactly the keys "
                                "stage, block, head")
            head = e["head"]
            if not isinstance(head, str) or not _NAME.fullmatch(head):
                raise ArchError(f"arch JSON: {where}.head {_short(head)} is not a head name")
            exits.append(Exit(_json_int(e["stage"], f"{where}.stage"),
                              _json_int(e["block"], f"{where}.block"), head))
        policy = data.get("policy", "max_softmax")
        if not isinstance(policy, str) or not _NAME.fullmatch(policy):
            raise ArchError(f"arch JSON: policy {_short(policy)} is not a policy name")
        thresholds = []
        for i, t in enumerate(_json_list(data.get("thresholds", []), "thresholds")):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise ArchError(f"arch JSON: thresholds[{i}] {_short(t)} is not a finite number")
            thresholds.append(float(t))
        arch = cls(depths=tuple(depths), exits=tuple(exits), policy=policy,
                   thresholds=tuple(thresholds))
        if "id" in data and data["id"] != arch.id:
            raise ArchError(f"arch JSON: id {_short(data['id'])} does not match its fields "
                            f"({arch.id})")
        return arch

    @classmethod
    def parse(cls, text: str) -> "Arch":
        """An id string, a JSON object, or the path of a JSON file holding one (or holding
        ``{"arch": {...}}``, as retrain and export write)."""
        text = text.strip()
        if text.startswith("{"):
            return cls.from_json(_load_json(text, "arch JSON"))
        if text.endswith(".json"):
            try:
                with open(text, "rb") as fh:
                    raw = fh.read(_MAX_JSON + 1)
            except OSError as err:
                raise ArchError(f"{text}: cannot read arch JSON ({err.strerror or err})") from None
            if len(raw) > _MAX_JSON:
                raise ArchError(f"{text}: larger than {_MAX_JSON} bytes; not an arch JSON file")
            try:
                body = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ArchError(f"{text}: not UTF-8 text (byte {raw[err.start]:#04x} at offset "
                                f"{err.start})") from None
            data = _load_json(body, text)
            if isinstance(data, dict) and "arch" in data:
                data = data["arch"]
            return cls.from_json(data)
        return cls.from_id(text)

    def with_thresholds(self, thresholds: tuple[float, ...], policy: str | None = None) -> "Arch":
        return Arch(depths=self.depths, exits=self.exits, policy=policy or self.policy,
                    thresholds=thresholds)

    # ---- space checks --------------------------------------------------------------------
    def validate(self, space: Space) -> "Arch":
        """Return self, or raise ArchError saying what does not fit ``space``."""
        stages = space.stage_depths
        if len(self.depths) != len(stages):
            raise ArchError(f"arch {self.id}: {len(self.depths)} depths for {len(stages)} stages")
        for i, (d, allowed) in enumerate(zip(self.depths, stages)):
            if d not in allowed:
                raise ArchError(f"arch {self.id}: depth {d} of stage {i} is not one of {list(allowed)}")
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
    depths = tuple(rng.choice(allowed) for allowed in space.stage_depths)
    exits = sample_exits(space, depths, rng)
    policy = rng.choice(space.policy.names)
    return Arch(depths=depths, exits=exits, policy=policy,
                thresholds=sample_params(space, policy, len(exits), rng))


def sample_exits(space: Space, depths: tuple[int, ...], rng: random.Random) -> tuple[Exit, ...]:
    """Uniform random early exits at ``depths``: their number uniform in [min_exits,
    max_exits] (capped by the active positions), positions uniform without replacement, heads
    uniform (network order)."""
    positions = space.positions(depths)
    hi = min(space.exits.max_exits, len(positions))
    n = rng.randint(min(space.exits.min_exits, hi), hi)
    return tuple(Exit(s, b, rng.choice(space.exits.heads)) for s, b in sorted(rng.sample(positions, n)))


def sample_params(space: Space, policy: str, n_exits: int, rng: random.Random) -> tuple[float, ...]:
    """Uniform parameters for ``policy`` within the space's range for it."""
    rule = get_policy(policy)
    lo, hi = rule.param_range(space.policy)
    n = rule.num_params(n_exits)
    if rule.integer:
        return tuple(float(rng.randint(int(lo), int(hi))) for _ in range(n))
    return tuple(round(rng.uniform(lo, hi), 4) for _ in range(n))
