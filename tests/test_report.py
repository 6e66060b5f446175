"""``exitnas report RUN`` on a tiny run directory holding retrained models."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import run_cli, tree_digest
from exitnas.arch import Arch, Exit
from exitnas.data import batches, load_splits
from exitnas.io import save_weights
from exitnas.rundir import RunDir
from exitnas.supernet import build_model

A = Arch(depths=(2, 2), exits=(Exit(0, 0, "linear"), Exit(1, 0, "conv")), thresholds=(0.3, 0.35))
B = Arch(depths=(1, 2), exits=(Exit(0, 0, "mlp"),), policy="entropy", thresholds=(1.3,))


@pytest.fixture
def run(tmp_path, tiny_space):
    """A run with two 'retrained' models: A with arch.json (regime joint), B found by its
    folder name only (regime mixed); and a search front."""
    run = RunDir(tmp_path / "run")
    run.init(tiny_space)
    for arch, regime, seed in ((A, "joint", 0), (B, "mixed", 1)):
        folder = run.path / "retrain" / arch.id / regime
        save_weights(folder / "model.safetensors", build_model(tiny_space, arch, seed=seed).state_dict())
        if arch is A:
            (folder / "arch.json").write_text(json.dumps({"arch": arch.to_json(), "regime": regime}))
    (run.path / "search").mkdir()
    pd.DataFrame({"trial": [3, 7], "arch_id": [A.id, B.id], "accuracy": [0.4, 0.5],
                  "expected_macs": [1e5, 2e5], "relative_cost": [0.33, 0.66]}
                 ).to_csv(run.path / "search" / "front.csv", index=False)
    return run


def _reference(space, arch, seed):
    """Test-split numbers computed directly from the model, without exitnas.evaluate."""
    model = build_model(space, arch, seed=seed).eval()
    splits = load_splits(space)
    per_exit, correct = None, 0
    with torch.no_grad():
        for x, y in batches(splits.test, batch_size=64, mean=splits.mean, std=splits.std):
            hits = torch.stack([(z.argmax(1) == y).sum() for z in model.forward_exits(x)])
            per_exit = hits if per_exit is None else per_exit + hits
            correct += int((model.predict(x).pred == y).sum())
    n = len(splits.test)
    return [int(h) / n for h in per_exit], correct / n


def test_report_writes_every_table_and_plot(run, tiny_space):
    r = run_cli("report", run.path)
    assert r.returncode == 0, r.stderr
    out = run.path / "report"
    for name in ("models", "policy", "anytime", "threshold_budgets", "threshold_sweep",
                 "budgeted_batch", "auc", "oracle", "front"):
        assert (out / f"{name}.csv").is_file(), name
    for png in ("threshold_sweep", "budgeted_batch", "anytime", "exit_accuracy", "front"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG", png
    keys = [(A.id, "joint"), (B.id, "mixed")]
    read = {n: pd.read_csv(out / f"{n}.csv") for n in
            ("models", "policy", "anytime", "threshold_budgets", "threshold_sweep",
             "budgeted_batch", "auc", "oracle")}
    rows = {"models": 1, "policy": 1, "threshold_budgets": 4, "threshold_sweep": 100,
            "budgeted_batch": 39, "auc": 3, "oracle": 1}
    for name, df in read.items():
        got = sorted(df.groupby(["arch", "regime"]).size().items())
        if name == "anytime":
            assert got == sorted([((A.id, "joint"), 3), ((B.id, "mixed"), 2)])
        else:
            assert got == sorted((k, rows[name]) for k in keys), name
    assert read["threshold_budgets"]["budget"].tolist()[:4] == [0.25, 0.5, 0.75, 1.0]
    assert read["auc"]["protocol"].tolist()[:3] == ["anytime", "threshold_sweep", "budgeted_batch"]
    # the numbers are the models' own: per-exit accuracy and the arch's policy on test
    for arch, regime, seed in ((A, "joint", 0), (B, "mixed", 1)):
        per_exit, own = _reference(tiny_space, arch, seed)
        any_t = read["anytime"][read["anytime"]["arch"] == arch.id]
        assert any_t["test_accuracy"].tolist() == pytest.approx(per_exit, abs=5e-5)
        assert any_t["name"].tolist() == [e.key for e in arch.exits] + ["final"]
        pol = read["policy"][read["policy"]["arch"] == arch.id].iloc[0]
        assert pol["test_accuracy"] == pytest.approx(own, abs=5e-5)
        assert pol["policy"] == arch.policy
    md = (out / "report.md").read_text()
    assert A.id in md and B.id in md and "## budgeted_batch" in md and "## front" in md
    assert pd.read_csv(out / "front.csv")["trial"].tolist() == [3, 7]


def test_report_without_models_fails_in_one_line(tmp_path, tiny_space):
    run = RunDir(tmp_path / "empty")
    run.init(tiny_space)
    before = tree_digest(run.path)
    r = run_cli("report", run.path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no model found" in r.stderr
    assert "retrain" in r.stderr and "Traceback" not in r.stderr
    assert tree_digest(run.path) == before
    r = run_cli("report", tmp_path / "nowhere")
    assert r.returncode == 2 and "not a run directory" in r.stderr


def test_report_refuses_weights_of_another_arch(run, tiny_space):
    wrong = run.path / "retrain" / A.id / "joint" / "model.safetensors"
    save_weights(wrong, build_model(tiny_space, B, seed=0).state_dict())
    r = run_cli("report", run.path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "do not fit arch" in r.stderr
