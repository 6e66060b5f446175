"""Architectures: canonical ids, JSON round trip, validation, uniform sampling."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from exitnas.arch import Arch, Exit, sample_arch
from exitnas.errors import ArchError


def test_id_is_canonical_and_round_trips(quick_space):
    rng = random.Random(0)
    for _ in range(200):
        arch = sample_arch(quick_space, rng)
        assert arch.validate(quick_space) is arch
        assert Arch.from_id(arch.id) == arch
        assert Arch.from_json(json.loads(json.dumps(arch.to_json()))) == arch
        assert Arch.parse(json.dumps(arch.to_json())) == arch


def test_id_format():
    arch = Arch(depths=(3, 2, 4), exits=(Exit(1, 0, "conv"), Exit(0, 1, "linear")),
                policy="max_softmax", thresholds=(0.9, 0.85))
    assert arch.id == "d3.2.4~s0b1=linear,s1b0=conv~max_softmax=0.9,0.85"
    assert Arch(depths=(1,), exits=(), policy="patience", thresholds=(2,)).id == "d1~none~patience=2"


@pytest.mark.parametrize("text, message", [
    ("d3.2", "does not parse"),
    ("d3.2~s0x1=linear~max_softmax=0.5", "is not s<stage>b<block>=<head>"),
    ('{"depths": [1, 2]}', "missing key 'exits'"),
    ("{not json", "does not parse"),
])
def test_bad_ids_are_refused(text, message):
    with pytest.raises(ArchError, match=message):
        Arch.parse(text)


@pytest.mark.parametrize("arch_id, message", [
    ("d4.2.2~s0b0=linear~max_softmax=0.5", "depth 4 of stage 0"),
    ("d3.2~s0b0=linear~max_softmax=0.5", "2 depths for 3 stages"),
    ("d1.2.2~s0b1=linear~max_softmax=0.5", "not a candidate"),
    ("d3.2.2~s0b0=lstm~max_softmax=0.5", "head 'lstm' is not allowed"),
    ("d3.2.2~s0b0=linear,s0b1=linear,s0b2=linear,s1b0=linear~max_softmax=.5,.5,.5,.5", "4 exits"),
    ("d3.2.2~s0b0=linear~max_softmax=1.5", "outside [0, 1]"),
    ("d3.2.2~s0b0=linear,s1b0=mlp~max_softmax=0.5", "needs 2 value(s), got 1"),
    ("d3.2.2~s0b0=linear~patience=0.5", "not a positive integer"),
    ("d3.2.2~s2b1=linear~max_softmax=0.5", "not a candidate"),  # the final exit's block
])
def test_validation_says_what_is_wrong(quick_space, arch_id, message):
    with pytest.raises(ArchError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        Arch.from_id(arch_id).validate(quick_space)


def test_sampling_is_uniform_over_depths_and_heads(quick_space):
    rng = random.Random(1)
    archs = [sample_arch(quick_space, rng) for _ in range(3000)]
    depth0 = Counter(a.depths[0] for a in archs)
    heads = Counter(e.head for a in archs for e in a.exits)
    assert set(depth0) == {1, 2, 3}
    assert min(depth0.values()) > 900
    assert set(heads) == set(quick_space.exits.heads)
    assert min(heads.values()) > 0.8 * max(heads.values())
    assert all(1 <= len(a.exits) <= quick_space.exits.max_exits for a in archs)
