"""search/_sampler.py: the indexed NSGA-II samples exactly what Optuna's own does, and the
throughput benchmark can time the two side by side."""
from __future__ import annotations

from search_support import tiny_run, trained_tiny  # noqa: F401


def test_indexed_nsga2_samples_exactly_like_optunas_own():
    import optuna

    from exitnas.search import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def run(sampler, n=300):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        out = []
        for _ in range(n):
            t = study.ask()
            x, c = t.suggest_float("x", 0, 1), t.suggest_categorical("c", ["a", "b", "c"])
            k = t.suggest_int("k", 1, 4)
            t.set_constraint("budget", x - 0.8)
            study.tell(t, [x * k + (c == "b"), (x - 0.3) ** 2 + k])
            out.append((x, c, k))
        return out, study

    ours, study = run(make_sampler("nsga2", seed=3, population_size=10))
    stock, _ = run(optuna.samplers.NSGAIISampler(population_size=10, seed=3))
    assert type(study.sampler).__name__ == "IndexedNSGAIISampler"
    assert ours == stock
    assert max(t.system_attrs["NSGAIISampler:generation"] for t in study.trials) >= 20


def test_the_throughput_benchmark_compares_both_samplers_side_by_side(tiny_run):
    """benchmarks/search_throughput.py --phases sampler, at test size: both NSGA-II samplers in
    the in-process loop, pair by pair, sampling the same architectures."""
    from benchmarks.search_throughput_loop import (SAMPLER_CLASSES, sampler_comparison,
                                                   sampler_summary)
    from exitnas.data import load_splits
    from exitnas.rundir import RunDir
    from exitnas.search import CacheStore
    from exitnas.supernet import Supernet

    run = RunDir(tiny_run)
    space = run.space()
    net = Supernet(space).load(tiny_run / "supernet" / "weights.safetensors")
    store = CacheStore(run_dir=run, net=net, splits=load_splits(space))
    rows = sampler_comparison("tiny", space, store, [30, 45], repeats=2)
    assert [(r["trials"], r["repeat"], r["sampler"]) for r in rows] == [
        (30, 0, SAMPLER_CLASSES[0]), (30, 0, SAMPLER_CLASSES[1]),
        (30, 1, SAMPLER_CLASSES[1]), (30, 1, SAMPLER_CLASSES[0]),  # the order alternates
        (45, 0, SAMPLER_CLASSES[0]), (45, 0, SAMPLER_CLASSES[1]),
        (45, 1, SAMPLER_CLASSES[1]), (45, 1, SAMPLER_CLASSES[0])]
    assert all(r["population"] == space.search.population_size and r["seconds"] > 0 for r in rows)
    summary = sampler_summary(rows)
    assert [(s["trials"], s["repeats"]) for s in summary] == [(30, 2), (45, 2)]
    for s in summary:
        mine = [r for r in rows if r["trials"] == s["trials"]]
        ratios = sorted(a["seconds"] / b["seconds"] for a in mine for b in mine
                        if a["repeat"] == b["repeat"] and a["sampler"] == SAMPLER_CLASSES[0]
                        and b["sampler"] == SAMPLER_CLASSES[1])
        assert (s["speedup_min"], s["speedup_max"]) == (ratios[0], ratios[-1])
