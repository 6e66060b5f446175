"""The evaluation engine: cached scoring equals the extracted model's early-exit forward."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exitnas.arch import Arch, Exit, sample_arch
from exitnas.cost import cost_table, model_segment_macs
from exitnas.data import batches, load_splits
from exitnas.evaluate import (ArchStats, ExitCache, cache_digest, decide, exit_index,
                              load_or_build_cache, score)
from exitnas.policy import POLICIES, ExitStats, first_exit, get_policy
from exitnas.rundir import RunDir
from exitnas.supernet import Supernet, calibration_batches

N_ARCHS = 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny supernet trained for one short epoch (all exits, random depths), so exits are
    confident enough that samples leave at every exit."""
    from exitnas.space import load_space
    from conftest import TEST_DATA

    space = load_space(TEST_DATA / "tiny.yaml", {"data.synthetic_size": 1600,
                                                 "data.val_fraction": 0.2, "exits.max_exits": 3})
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds waits on a busy machine
    splits = load_splits(space)
    net = Supernet(space)
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    rng = random.Random(0)
    settings = space.depth_settings()
    net.train()
    for x, y in batches(splits.train, batch_size=32, mean=splits.mean, std=splits.std,
                        shuffle=True, seed=0):
        loss = sum(F.cross_entropy(z, y) for z in net.forward_exits(x, rng.choice(settings)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    run = RunDir(tmp_path_factory.mktemp("run"))
    run.init(space)
    yield space, splits, net, run
    torch.set_num_threads(threads)


def _thresholds(policy: str, stats: ArchStats, rng: random.Random) -> tuple[float, ...]:
    """Thresholds at random quantiles of each exit's own val statistic, so that samples
    really leave at every exit (a fixed 0.9 would send nearly all out at one exit)."""
    k = stats.num_exits - 1
    if policy == "patience":
        return (float(rng.randint(1, 3)),)
    values = stats.conf if policy == "max_softmax" else stats.entropy
    return tuple(float(np.quantile(values[j], rng.uniform(0.1, 0.9))) for j in range(k))


def _predict(model, splits, space, thresholds, policy):
    preds, exits = [], []
    for x, _ in batches(splits.val, batch_size=space.data.eval_batch_size, mean=splits.mean,
                        std=splits.std):
        out = model.predict(x, thresholds, policy)
        preds.append(out.pred)
        exits.append(out.exit)
    return torch.cat(preds), torch.cat(exits)


def test_cached_scoring_equals_extracted_model_predict(trained):
    space, splits, net, run = trained
    costs = cost_table(space)
    rng = random.Random(1)
    archs = [sample_arch(space, rng) for _ in range(N_ARCHS)]
    by_depth: dict[tuple[int, ...], list[Arch]] = {}
    for a in archs:
        by_depth.setdefault(a.depths, []).append(a)
    checked, exits_seen = 0, Counter()
    labels = splits.val.labels
    n = len(labels)
    for depths, group in by_depth.items():
        cache = load_or_build_cache(run, net, depths, splits)
        for base in group:
            model = net.extract(base, calib=calibration_batches(space, splits)).eval()
            stats = ArchStats.from_cache(cache, base, costs)
            for policy in ("max_softmax", "entropy", "patience"):
                for _ in range(3):
                    arch = base.with_thresholds(_thresholds(policy, stats, rng), policy)
                    pred_c, idx_c = decide(cache, arch)
                    pred_m, idx_m = _predict(model, splits, space, arch.thresholds, policy)
                    assert torch.equal(idx_c, idx_m), arch.id
                    assert torch.equal(pred_c, pred_m), arch.id
                    s = score(cache, arch, costs)
                    c = costs.exit_costs(arch)
                    counts = torch.bincount(idx_m, minlength=len(c)).tolist()
                    assert s.accuracy == int((pred_m == labels).sum()) / n
                    assert s.expected_cost == sum(k * m for k, m in zip(counts, c)) / n
                    assert s.exit_fractions == tuple(k / n for k in counts)
                    assert stats.score(policy, arch.thresholds) == s
                    exits_seen.update(i if i < len(c) - 1 else "final" for i in idx_m.tolist())
                    checked += 1
    assert checked == N_ARCHS * 9
    # the test exercised early exits at several positions, not only the final exit
    assert {0, 1, 2, "final"} <= set(exits_seen), exits_seen
    assert min(exits_seen[k] for k in (0, 1, "final")) >= 50, exits_seen


def test_threshold_equal_to_a_confidence_exits_there(trained):
    """Boundary: a threshold equal to a cached confidence (float32) lets that sample leave, in
    the cache and in the model alike (exit 0 sees the same batch in both, bit for bit)."""
    space, splits, net, run = trained
    arch = Arch(depths=(2, 2), exits=(Exit(0, 0, "linear"), Exit(1, 0, "conv")),
                thresholds=(0.5, 0.5))
    cache = load_or_build_cache(run, net, arch.depths, splits)
    model = net.extract(arch, calib=calibration_batches(space, splits)).eval()
    stats = ArchStats.from_cache(cache, arch, cost_table(space))
    t0 = float(np.sort(stats.conf[0])[len(stats.labels) // 2])
    params = (t0, 1.0)
    idx = stats.exit_index("max_softmax", params)
    _, idx_m = _predict(model, splits, space, params, "max_softmax")
    assert np.array_equal(idx, idx_m.numpy())
    assert int((idx == 0).sum()) == int((stats.conf[0] >= np.float32(t0)).sum())
    assert int((stats.conf[0] == np.float32(t0)).sum()) >= 1


def test_from_model_equals_from_cache(trained):
    """The same per-exit statistics from a standalone model pass and from the supernet cache."""
    space, splits, net, run = trained
    costs = cost_table(space)
    arch = Arch(depths=(2, 2), exits=(Exit(0, 1, "sdn_pool"), Exit(1, 0, "mlp")),
                thresholds=(0.6, 0.7))
    cache = load_or_build_cache(run, net, arch.depths, splits)
    model = net.extract(arch, calib=calibration_batches(space, splits))
    a = ArchStats.from_cache(cache, arch, costs)
    b = ArchStats.from_model(model, batches(splits.val, batch_size=space.data.eval_batch_size,
                                            mean=splits.mean, std=splits.std),
                             costs=costs, arch=arch)
    for x, y in ((a.conf, b.conf), (a.entropy, b.entropy), (a.pred, b.pred), (a.labels, b.labels)):
        assert np.array_equal(x, y)
    assert a.names == b.names == ("s0b1=sdn_pool", "s1b0=mlp", "final")
    assert a.score("max_softmax", (0.6, 0.7)) == b.score("max_softmax", (0.6, 0.7))
    # the cost table's C_k are what fvcore counts on the extracted model directly
    assert model_segment_macs(model, (3, 8, 8)) == list(a.exit_costs)


def test_cache_on_disk_is_keyed_compact_and_reused(trained):
    space, splits, net, run = trained
    depths = (1, 2)
    digest = cache_digest(net)
    first = load_or_build_cache(run, net, depths, splits)
    files = sorted((run.path / "cache").glob(f"val-d1.2-{digest}-*.safetensors"))
    assert len(files) == 1
    assert not list((run.path / "cache").glob(".*.tmp"))  # atomic: no temporaries left
    from safetensors.torch import load_file

    raw = load_file(str(files[0]))
    assert raw["pred"].dtype == torch.int16 and raw["labels"].dtype == torch.int16
    assert raw["conf"].dtype == torch.float32 and raw["conf"].shape == (len(first.exits) + 1, len(splits.val))
    # reused: no splits needed, identical contents
    again = load_or_build_cache(run, net, depths, None)
    for f in ("conf", "entropy", "pred", "labels"):
        assert torch.equal(getattr(first, f), getattr(again, f))
    # recalibrating BN for other depths does not change the key; changing a weight does
    load_or_build_cache(run, net, (2, 1), splits)
    assert cache_digest(net) == digest
    changed = Supernet(space)
    changed.load_state_dict(net.state_dict())
    with torch.no_grad():
        changed.final.fc.weight[0, 0] += 1.0
    assert cache_digest(changed) != digest
    # a corrupt file is rebuilt, not trusted
    files[0].write_bytes(b"garbage")
    rebuilt = load_or_build_cache(run, net, depths, splits)
    assert torch.equal(rebuilt.labels, first.labels)
    assert load_file(str(files[0]))["conf"].shape == first.conf.shape
    with pytest.raises(ValueError, match="no usable cache"):
        load_or_build_cache(run, net, (2, 2), None, split="test")


@pytest.mark.parametrize("policy", POLICIES.names())
def test_numpy_rule_equals_torch_policy(policy):
    """The numpy rules of the scorer agree with every registered torch policy (the one
    ``MultiExitModel.predict`` applies), ties at the threshold included."""
    g = torch.Generator().manual_seed(3)
    k, n = 4, 2000
    conf = (torch.randint(0, 20, (k + 1, n), generator=g) / 20).float()  # many exact ties
    entropy = (torch.randint(0, 30, (k + 1, n), generator=g) / 20).float()
    pred = torch.randint(0, 3, (k + 1, n), generator=g)
    params = {"patience": (2.0,), "entropy": (0.5, 0.25, 1.0, 0.75)}.get(policy, (0.5, 0.25, 0.95, 0.75))
    rows = np.arange(k + 1)
    got = exit_index(policy, params, conf.numpy(), entropy.numpy(), pred.numpy(), rows)
    mask = get_policy(policy).exit_mask(ExitStats(conf[:k], entropy[:k], pred[:k]), params)
    want = first_exit(mask).numpy()
    assert np.array_equal(got, want)
    # every exit the policy can take is used, the final one included (patience 2: not exit 0)
    assert set(got.tolist()) == set(range(1 if policy == "patience" else 0, k + 1))


def test_policies_by_hand():
    conf = np.array([[0.9, 0.5, 0.5, 0.1], [0.2, 0.6, 0.95, 0.3], [0.1, 0.1, 0.1, 0.1]], np.float32)
    entropy = np.array([[0.1, 0.8, 0.4, 1.2], [0.9, 0.3, 0.1, 1.0], [0, 0, 0, 0]], np.float32)
    pred = np.array([[1, 2, 0, 3], [1, 2, 1, 0], [1, 0, 1, 2]])
    rows = np.arange(3)
    assert exit_index("max_softmax", (0.5, 0.9), conf, entropy, pred, rows).tolist() == [0, 0, 0, 2]
    assert exit_index("max_softmax", (0.9, 0.6), conf, entropy, pred, rows).tolist() == [0, 1, 1, 2]
    assert exit_index("entropy", (0.4, 0.3), conf, entropy, pred, rows).tolist() == [0, 1, 0, 2]
    assert exit_index("patience", (2,), conf, entropy, pred, rows).tolist() == [1, 1, 2, 2]
    assert exit_index("patience", (1,), conf, entropy, pred, rows).tolist() == [0, 0, 0, 0]
    # an arch without early exits: everyone takes the final exit
    assert exit_index("max_softmax", (), conf, entropy, pred, np.array([2])).tolist() == [0] * 4


def test_score_by_hand():
    exits = (Exit(0, 0, "linear"), Exit(0, 1, "linear"), Exit(1, 0, "conv"))
    conf = torch.tensor([[0.9, 0.4, 0.4, 0.3], [0.8, 0.8, 0.2, 0.1],
                         [0.5, 0.7, 0.9, 0.2], [1.0, 1.0, 1.0, 1.0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 0], [0, 1, 2, 1], [0, 1, 2, 3]])
    labels = torch.tensor([0, 1, 2, 0])
    cache = ExitCache((2, 2), exits, conf, torch.zeros_like(conf), pred, labels)
    arch = Arch(depths=(2, 2), exits=(exits[0], exits[2]), thresholds=(0.9, 0.7))

    class Costs:  # C_k of arch: exit s0b0, exit s1b0, final
        def exit_costs(self, a):
            return [10, 25, 40]

    pred_d, idx = decide(cache, arch)
    assert idx.tolist() == [0, 1, 1, 2] and pred_d.tolist() == [0, 1, 2, 3]
    s = score(cache, arch, Costs())
    assert s.accuracy == 3 / 4
    assert s.expected_cost == (10 + 25 + 25 + 40) / 4
    assert s.exit_fractions == (0.25, 0.5, 0.25)
    assert s.exit_accuracy == (2 / 4, 3 / 4, 3 / 4)
    assert s.exit_costs == (10, 25, 40)
    assert cache.rows(arch).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="not in the cache"):
        cache.rows(Arch(depths=(2, 2), exits=(Exit(0, 0, "mlp"),), thresholds=(0.5,)))



def _bn_buffers(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def test_extract_after_a_cache_hit_has_fresh_bn_statistics(trained, tmp_path):
    """Build the caches of depths A then B, get A again (a hit: nothing rebuilt), extract A:
    its BN buffers and outputs equal a fresh recalibration of A, and the cache's statistics
    are that model's. (Before the fix the extract inherited B's statistics.)"""
    import copy

    space, splits, trained_net, _ = trained
    net = copy.deepcopy(trained_net)
    before = _bn_buffers(net)
    run = RunDir(tmp_path / "run")
    run.init(space)
    arch = Arch(depths=(1, 2), exits=(Exit(0, 0, "conv"), Exit(1, 0, "sdn_pool")),
                thresholds=(0.5, 0.5))
    fresh = copy.deepcopy(trained_net)
    fresh.recalibrate_bn(arch.depths, calibration_batches(space, splits))
    want = fresh.extract(arch).eval()

    load_or_build_cache(run, net, arch.depths, splits)
    load_or_build_cache(run, net, (2, 1), splits)
    files = {p: p.stat().st_mtime_ns for p in (run.path / "cache").glob("*.safetensors")}
    assert len(files) == 2
    hit = load_or_build_cache(run, net, arch.depths, splits)
    assert {p: p.stat().st_mtime_ns for p in (run.path / "cache").glob("*.safetensors")} == files
    got = net.extract(arch, calib=calibration_batches(space, splits)).eval()

    want_state, got_state = want.state_dict(), got.state_dict()
    assert sorted(want_state) == sorted(got_state)
    assert sum(k.endswith("running_mean") for k in want_state) >= 4  # stem, blocks, conv head
    for k in want_state:
        assert torch.equal(want_state[k], got_state[k]), k
    x = next(batches(splits.val, batch_size=64, mean=splits.mean, std=splits.std))[0]
    with torch.no_grad():
        for a, b in zip(want.forward_exits(x), got.forward_exits(x)):
            assert torch.equal(a, b)
    costs = cost_table(space)
    from_model = ArchStats.from_model(got, batches(splits.val, batch_size=space.data.eval_batch_size,
                                                   mean=splits.mean, std=splits.std),
                                      costs=costs, arch=arch)
    from_cache = ArchStats.from_cache(hit, arch, costs)
    assert np.array_equal(from_model.conf, from_cache.conf)
    assert np.array_equal(from_model.pred, from_cache.pred)
    # the recalibration matters: the supernet's own (training) statistics give other buffers
    plain = net.extract(arch).state_dict()
    assert not all(torch.equal(plain[k], want_state[k]) for k in want_state)
    # neither the builds nor the hit nor the extraction touched the supernet's own statistics
    after = _bn_buffers(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training == trained_net.training
