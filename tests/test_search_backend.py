"""search/_backend.py: run_search resolves one frozen SearchContext and hands it to the chosen
registered backend; the storage it opened is the one the backend writes through."""
from __future__ import annotations

import dataclasses

import pytest

from conftest import tree_digest
from search_support import tiny_run, trained_tiny, trial_counts  # noqa: F401


def test_search_context_holds_what_run_search_resolved(tiny_run):
    from exitnas.search import SearchContext, SearchOptions, search_context

    ctx = search_context(tiny_run, SearchOptions(trials=7, budget="0.8", seed=3), log=None)
    assert isinstance(ctx, SearchContext)
    assert (ctx.n_trials, ctx.seed, ctx.backend, ctx.sampler) == (7, 3, "optuna", "nsga2")
    assert ctx.budget.expected == pytest.approx(0.8 * ctx.costs.backbone())
    assert ctx.weights == tiny_run / "supernet" / "weights.safetensors"
    assert ctx.storage.spec.journal == str((tiny_run / "search" / "study.log").resolve())
    assert ctx.study._storage is ctx.storage.optuna  # on the opened storage (private: a test may)
    assert ctx.study.user_attrs["exitnas"]["budget"] == ctx.budget.to_json()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.n_trials = 8


def test_run_search_hands_the_chosen_backend_one_context(tiny_run):
    """A backend registered here (it records its context, then runs the in-process one)."""
    from exitnas.search import (BACKENDS, Backend, BackendResult, SearchContext, SearchOptions,
                                register_backend, run_search)
    from exitnas.search._inprocess import InProcessBackend

    seen: list = []

    @register_backend("recording")
    class Recording(Backend):
        def run(self, ctx: SearchContext) -> BackendResult:
            seen.append(ctx)
            inner = InProcessBackend().run(ctx)
            return BackendResult(committed=inner.committed, loop_seconds=inner.loop_seconds,
                                 info={**inner.info, "recorded": True})

    try:
        result = run_search(tiny_run, SearchOptions(trials=12, backend="recording"), log=None)
    finally:
        del BACKENDS["recording"]
    [ctx] = seen
    assert isinstance(ctx, SearchContext) and ctx.backend == "recording" and ctx.n_trials == 12
    assert result.summary["backend"] == "recording" and result.summary["recorded"] is True
    assert result.summary["committed_by_this_process"] == 12 == result.trials
    assert trial_counts(tiny_run)["complete"] == 12
    # every byte of the journal went through the storage in the context
    assert ctx.storage.journal.appended == (tiny_run / "search" / "study.log").stat().st_size


def test_register_backend_refuses_a_taken_name_and_a_non_backend():
    from exitnas.search import BACKENDS, Backend, register_backend

    assert list(BACKENDS) == ["optuna", "ray"]
    with pytest.raises(ValueError, match="'optuna' is already registered"):
        register_backend("optuna")(type("Again", (Backend,), {"run": lambda self, ctx: None}))
    with pytest.raises(TypeError, match="not a Backend subclass"):
        register_backend("plain")(object)
    assert list(BACKENDS) == ["optuna", "ray"]


def test_unknown_backend_is_refused_before_anything_is_written(tiny_run):
    from exitnas.errors import RunDirError
    from exitnas.search import SearchOptions, run_search

    before = tree_digest(tiny_run)
    with pytest.raises(RunDirError, match=r"^--backend 'spark': expected optuna or ray$"):
        run_search(tiny_run, SearchOptions(backend="spark"), log=None)
    assert tree_digest(tiny_run) == before
