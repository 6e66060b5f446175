"""search/_genome.py: every sample decodes to a valid arch; encode/decode round trip; repairs."""
from __future__ import annotations

import random

import pytest

from conftest import SPACES
from search_support import TINY


@pytest.mark.parametrize("space_file", [TINY, SPACES / "quickstart.yaml", SPACES / "resnet_cifar.yaml",
                                        SPACES / "mobilenetv2_cifar.yaml"])
def test_genome_decodes_every_sample_to_a_valid_arch(space_file):
    import optuna

    from exitnas.search import Genome
    from exitnas.space import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(space_file)
    genome = Genome(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    names, counts = None, set()
    for _ in range(300):
        trial = study.ask()
        params = genome.suggest(trial)
        names = names or sorted(params)
        assert sorted(params) == names  # a fixed-size genome: every trial, every parameter
        arch = genome.decode(params)
        assert arch.validate(space) is arch
        active = space.positions(arch.depths)
        want = min(params.get("n_exits", genome.slots), len(active))
        assert len(arch.exits) == want <= space.exits.max_exits
        counts.add(len(arch.exits))
        study.tell(trial, 0.0)
    assert len(counts) >= 2  # the number of exits varies


@pytest.mark.parametrize("space_file", [TINY, SPACES / "quickstart.yaml", SPACES / "resnet_cifar.yaml"])
def test_genome_encode_decode_round_trip(space_file):
    from exitnas.arch import sample_arch
    from exitnas.search import Genome
    from exitnas.space import load_space

    space = load_space(space_file, {"search.thresholds": "evolved"})
    genome = Genome(space)
    rng = random.Random(0)
    for _ in range(200):
        arch = sample_arch(space, rng)
        assert genome.decode(genome.encode(arch)) == arch
    # fitted thresholds: the genome is the structure; thresholds decode to "nobody leaves"
    fitted = Genome(load_space(space_file))
    assert not any(k.startswith(("thr", "ent")) for k in fitted.encode(arch))
    p = space.policy
    for _ in range(200):
        arch = sample_arch(space, rng)
        back = fitted.decode(fitted.encode(arch))
        assert (back.depths, back.exits, back.policy) == (arch.depths, arch.exits, arch.policy)
        want = {"max_softmax": (p.threshold_range[1],) * len(arch.exits),
                "entropy": (p.entropy_range[0],) * len(arch.exits)}.get(arch.policy, arch.thresholds)
        assert back.thresholds == want


def test_genome_repairs_inactive_and_duplicate_slots(tiny_space):
    from exitnas.search import Genome

    genome = Genome(tiny_space.with_overrides({"search.thresholds": "evolved"}))
    # positions s0b0, s0b1, s1b0; 2 slots
    base = {"depth0": 1, "depth1": 2, "n_exits": 2, "exit0": "s0b1", "exit1": "s0b0",
            "head0": "conv", "head1": "linear", "thr0": 0.7, "thr1": 0.9, "ent0": 0.1,
            "ent1": 0.2, "policy": "max_softmax", "patience": 1}
    arch = genome.decode(base)  # s0b1 is beyond depth 1: moves to s0b0, taken -> next free s1b0
    assert arch.id == "d1.2~s0b0=conv,s1b0=linear~max_softmax=0.7,0.9"
    arch = genome.decode({**base, "depth1": 1})  # only s0b0 active: one exit
    assert arch.id == "d1.1~s0b0=conv~max_softmax=0.7"
    arch = genome.decode({**base, "depth0": 2, "policy": "patience", "patience": 2})
    assert arch.id == "d2.2~s0b0=linear,s0b1=conv~patience=2"
