"""search/_sampler.py: the indexed NSGA-II samples exactly what Optuna's own does."""
from __future__ import annotations


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
