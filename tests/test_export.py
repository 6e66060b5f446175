"""Export: artifacts and manifest, weight sources, refusals, atomicity under kill -9.

The trained run (a tiny supernet trained for a few seconds, thresholds chosen from its
confidences so every exit is really taken) and its full export (.pt2 + ONNX) are built once
per session by :func:`trained_export`, which test_runtime.py reuses.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli, tree_digest

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="the onnx extra (onnx, onnxscript, "
                                "onnxruntime) is not installed")
ARCH_DEPTHS = "d2.2~s0b1=sdn_pool,s1b0=conv"
OTHER_ARCH = "d1.2~s0b0=mlp,s1b0=linear~max_softmax=0.7,0.8"  # every head type is exported
_CACHE: dict = {}


def _train(net, splits, epochs: int = 3) -> None:
    from exitnas.data import batches

    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for epoch in range(epochs):
        for x, y in batches(splits.train, batch_size=32, mean=splits.mean, std=splits.std,
                            shuffle=True, seed=epoch):
            outs = net.forward_exits(x)
            loss = sum(torch.nn.functional.cross_entropy(o, y) for o in outs) / len(outs)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def trained_export(root: Path) -> dict:
    """Run dir with a briefly trained tiny supernet, the in-repo extracted model (BN re-estimated
    on the calibration batches, as the evaluation cache's), its exit cache, an arch whose thresholds send samples to every exit, and
    its export (with ONNX) built in-process. Memoised per process."""
    if "run" in _CACHE:
        return _CACHE
    from exitnas.arch import Arch
    from exitnas.data import load_splits, normalize
    from exitnas.evaluate import load_or_build_cache
    from exitnas.export import export_run
    from exitnas.policy import ExitStats
    from exitnas.rundir import RunDir
    from exitnas.space import load_space
    from exitnas.supernet import Supernet, calibration_batches

    torch.set_num_threads(2)
    space = load_space(ROOT / "tests" / "data" / "tiny.yaml")
    run = RunDir(root / "run")
    run.init(space)
    splits = load_splits(space)
    net = Supernet(space)
    _train(net, splits)
    net.save(run.sub("supernet") / "weights.safetensors")
    probe = Arch.parse(f"{ARCH_DEPTHS}~max_softmax=0.5,0.5")
    cache = load_or_build_cache(run, net, probe.depths, splits)  # BN of probe.depths
    x = normalize(torch.cat([splits.test.images, splits.val.images]), splits.mean, splits.std)
    with torch.no_grad():
        conf = ExitStats.stack(net.extract(probe, calib=calibration_batches(space, splits))
                               .eval().forward_exits(x)).conf
    # thresholds: ~40 % leave at exit 0, about half of the rest at exit 1
    t0 = float(np.quantile(conf[0].numpy(), 0.6))
    rest = conf[1][conf[0] < t0]
    t1 = float(np.quantile(rest.numpy(), 0.5))
    arch = Arch.parse(f"{ARCH_DEPTHS}~max_softmax={t0:.4f},{t1:.4f}").validate(space)
    model = net.extract(arch, calib=calibration_batches(space, splits)).eval()
    t = time.perf_counter()
    result = export_run(run, arch, root / "export")
    _CACHE.update(run=run, space=space, splits=splits, net=net, arch=arch, model=model, x=x,
                  cache=cache, out=result.out, result=result,
                  export_seconds=time.perf_counter() - t)
    return _CACHE


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict:
    return trained_export(tmp_path_factory.mktemp("exported"))


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- artifacts ----------------------------------------------------------------------------
def test_manifest_describes_the_export(exported):
    from exitnas import __version__
    from exitnas.cost import cost_table
    from exitnas.runtime import read_safetensors_header, sha256_file

    out, arch, space, splits = exported["out"], exported["arch"], exported["space"], exported["splits"]
    m = json.loads((out / "arch.json").read_text())
    assert m["space"] == {"name": "tiny", "version": 1, "fingerprint": space.fingerprint}
    assert m["arch"]["id"] == arch.id
    assert m["policy"] == {"name": "max_softmax", "thresholds": list(arch.thresholds)}
    table = cost_table(space)
    assert [e["macs"] for e in m["exits"]] == table.exit_costs(arch)
    assert [e["name"] for e in m["exits"]] == ["s0b1=sdn_pool", "s1b0=conv", "final"]
    assert m["macs"]["backbone"] == table.backbone()
    assert m["input"]["shape"] == [3, 8, 8]
    assert m["input"]["mean"] == list(splits.mean) and m["input"]["std"] == list(splits.std)
    assert m["classes"] == list(splits.classes)
    assert m["versions"]["exitnas"] == __version__ and m["versions"]["torch"] == torch.__version__
    assert m["source"]["kind"] == "supernet" and m["source"]["bn_recalibrated"]["batches"] == 2
    if HAVE_ONNX:
        assert m["onnx_skipped"] is None
    else:
        assert "is not installed" in m["onnx_skipped"]
    names = sorted(p.name for p in out.iterdir())
    listed = sorted(f["path"] for f in m["files"])
    assert names == sorted(listed + ["arch.json"])
    kinds = ("pt2", "onnx") if HAVE_ONNX else ("pt2",)
    for k in range(3):
        assert {f"{g}_{k}.{ext}" for g in ("exit", "segment", "head") for ext in kinds} <= set(names)
        g = m["graphs"]
        assert g[f"exit_{k}"]["weights_map"] == {"segment.": f"segments.{k}.", "head.": f"heads.{k}."}
        # an exit graph costs its segment and its head
        assert g[f"exit_{k}"]["macs"] == g[f"segment_{k}"]["macs"] + g[f"head_{k}"]["macs"]
        assert g[f"exit_{k}"]["output"][-3:] == [[None]] * 3
    assert {f"model.{ext}" for ext in kinds} | {"weights.safetensors"} <= set(names)
    assert "weights.pt" not in names and m["format_version"] == 3  # no pickle at all
    for f in m["files"]:
        assert f["sha256"] == sha256_file(out / f["path"])
    weights = next(f for f in m["files"] if f["path"] == "weights.safetensors")
    state = exported["model"].state_dict()
    assert weights["tensors"] == {k: list(v.shape) for k, v in state.items()}
    assert {k: v[1] for k, v in read_safetensors_header(out / "weights.safetensors").items()} == \
        {k: tuple(v.shape) for k, v in state.items()}
    for name, g in m["graphs"].items():
        assert g["onnx_max_abs_diff"] <= 1e-5 if HAVE_ONNX else "onnx" not in g, name
    from exitnas.cost import count_macs

    x = torch.zeros(1, 3, 8, 8)
    model = exported["model"]
    for k, (segment, head) in enumerate(zip(model.segments, model.heads)):
        assert m["graphs"][f"segment_{k}"]["macs"] == count_macs(segment, tuple(x.shape[1:]))
        x = segment(x)
        assert m["graphs"][f"head_{k}"]["macs"] == count_macs(head, tuple(x.shape[1:]))
        assert m["graphs"][f"head_{k}"]["input"] == [None, *x.shape[1:]]
    assert m["graphs"]["model"]["macs"] == m["exits"][-1]["macs"]


def test_exported_weights_are_the_recalibrated_extract(exported):
    """Supernet source: the arch extracted after the same BN recalibration the evaluation
    cache uses (the in-repo model), in safetensors."""
    from exitnas.io import load_weights

    out, model = exported["out"], exported["model"]
    ref = model.state_dict()
    st = load_weights(out / "weights.safetensors")
    assert sorted(st) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(st[k], v), k


@needs_onnx
def test_pt2_and_onnx_graphs_take_batch_1_and_256(exported):
    import onnxruntime as ort

    out, model = exported["out"], exported["model"]
    whole = torch.export.load(str(out / "model.pt2")).module()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 256):
        x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ref = model.forward_exits(x)
            got = whole(x)
        got_onnx = sess.run(None, {"x": x.numpy()})
        assert len(got) == len(got_onnx) == len(ref) == 3
        for r, g, o in zip(ref, got, got_onnx):
            assert g.shape == r.shape == (n, 4)
            assert float((g - r).abs().max()) <= 1e-5
            assert float(np.abs(o - r.numpy()).max()) <= 1e-5


# ---- weight sources -----------------------------------------------------------------------
def test_weight_source_preference(exported, tmp_path):
    """--weights, else retrain/<arch id>/<config regime> (then other regimes, then archs that
    differ only in thresholds), else the supernet; no weights at all is one line, exit 2."""
    from exitnas.export import resolve_weights
    from exitnas.io import save_weights
    from exitnas.rundir import RunDir
    from exitnas.supernet import build_model

    space, splits, arch = exported["space"], exported["splits"], exported["arch"]
    run = RunDir(tmp_path / "run")
    run.init(space)
    shutil.copytree(exported["run"].path / "supernet", run.path / "supernet")
    model, src = resolve_weights(run, space, arch, splits)
    assert src["kind"] == "supernet"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                   exported["model"].state_dict().values()))
    joint = build_model(space, arch, seed=1)
    refit = arch.with_thresholds((0.9, 0.95))  # same network, thresholds fitted again
    save_weights(run.path / "retrain" / refit.id / "joint" / "model.safetensors", joint.state_dict())
    model, src = resolve_weights(run, space, arch, splits)
    assert (src["kind"], src["regime"]) == ("retrain", "joint") and refit.id in src["path"]
    assert torch.equal(model.heads[0].fc.weight, joint.heads[0].fc.weight)
    own = build_model(space, arch, seed=3)
    save_weights(run.path / "retrain" / arch.id / "joint" / "model.safetensors", own.state_dict())
    model, src = resolve_weights(run, space, arch, splits)
    assert (src["kind"], src["regime"]) == ("retrain", "joint") and refit.id not in src["path"]
    assert torch.equal(model.heads[0].fc.weight, own.heads[0].fc.weight)
    assert space.retrain.regime == "mixed"
    mixed = build_model(space, arch, seed=2)
    save_weights(run.path / "retrain" / arch.id / "mixed" / "model.safetensors", mixed.state_dict())
    model, src = resolve_weights(run, space, arch, splits)
    assert (src["kind"], src["regime"]) == ("retrain", "mixed")
    assert torch.equal(model.heads[0].fc.weight, mixed.heads[0].fc.weight)
    model, src = resolve_weights(run, space, arch, splits, weights=run.path / "supernet" / "weights.safetensors")
    assert (src["kind"], src["weights"]) == ("weights", "supernet")

    empty = RunDir(tmp_path / "empty")
    empty.init(space)
    err = _one_line_error(run_cli("export", empty.path, "--arch", arch.id, "--no-onnx"))
    assert "no weights for" in err and "--weights" in err
    assert not (empty.path / "export").exists()


def test_export_cli_with_weights_file_and_refusals(exported, tmp_path):
    from exitnas.arch import Arch
    from exitnas.io import save_weights
    from exitnas.supernet import build_model

    space, arch, run = exported["space"], exported["arch"], exported["run"]
    model = build_model(space, arch, seed=5)
    wfile = tmp_path / "model.safetensors"
    save_weights(wfile, model.state_dict())
    out = tmp_path / "out"
    proc = run_cli("export", run.path, "--arch", arch.id, "--out", out, "--weights", wfile,
                   "--no-onnx")
    assert proc.returncode == 0, proc.stderr
    assert f"weights: --weights: {wfile}" in proc.stdout
    assert "onnx: skipped (--no-onnx)" in proc.stdout
    m = json.loads((out / "arch.json").read_text())
    assert m["onnx_skipped"] == "--no-onnx" and not list(out.glob("*.onnx"))
    assert m["source"] == {"kind": "weights", "path": str(wfile), "weights": "model"}

    pickle_file = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickle_file)
    before = tree_digest(out)
    err = _one_line_error(run_cli("export", run.path, "--arch", arch.id, "--out", out,
                                  "--weights", pickle_file, "--no-onnx"))
    assert "pickle" in err and str(pickle_file) in err
    other = build_model(space, Arch.parse(OTHER_ARCH), seed=0)
    wrong = tmp_path / "wrong.safetensors"
    save_weights(wrong, other.state_dict())
    err = _one_line_error(run_cli("export", run.path, "--arch", arch.id, "--out", out,
                                  "--weights", wrong, "--no-onnx"))
    assert "do not fit arch" in err
    assert tree_digest(out) == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    err = _one_line_error(run_cli("export", run.path, "--arch", arch.id, "--out", foreign, "--no-onnx"))
    assert "not an exitnas export" in err
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---- a graph without ONNX ----------------------------------------------------------------
NO_ONNX_HEAD = r"""
import sys
import torch
from torch import nn
from exitnas import cost
from exitnas.heads import HEADS


@HEADS.register("bessel")  # a user's head: torch.special.i0 has no ONNX function
class BesselHead(nn.Module):
    def __init__(self, *, in_channels, num_classes):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(torch.special.i0(torch.flatten(self.pool(x), 1)))


cost.EXTRA_HANDLES["aten::i0"] = lambda inputs, outputs: 0  # and its cost rule, for fvcore
space_file, run_dir, weights, out = sys.argv[1:5]
from exitnas.arch import Arch
from exitnas.cli import main
from exitnas.io import save_weights
from exitnas.rundir import RunDir
from exitnas.space import load_space
from exitnas.supernet import build_model

space = load_space(space_file)
RunDir(run_dir).init(space)
arch = Arch.parse("d2.2~s0b1=bessel,s1b0=linear~max_softmax=0.5,0.5")
save_weights(weights, build_model(space, arch, seed=0).state_dict())
sys.exit(main(["export", run_dir, "--arch", arch.id, "--out", out, "--weights", weights]))
"""


@needs_onnx
def test_a_graph_without_onnx_keeps_the_required_outputs(tmp_path):
    """A head whose op has no ONNX function: `exitnas export` exits 2 with one line naming the
    graph and the op, and the export is there without ONNX: every .pt2, the weights and
    arch.json (onnx_skipped says why); the pt2 runtime predicts, the ONNX one says why not."""
    from exitnas.runtime import ExportError, load

    space_file = tmp_path / "bessel.yaml"
    space_file.write_text((ROOT / "tests" / "data" / "tiny.yaml").read_text()
                          .replace("heads: [linear, sdn_pool, conv, mlp]", "heads: [bessel, linear]"))
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-c", NO_ONNX_HEAD, str(space_file), str(tmp_path / "run"),
                           str(tmp_path / "w.safetensors"), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    err = _one_line_error(proc)
    import re

    # the exporter decomposes aten.special_i0 into prims.bessel_i0, which it cannot translate
    assert re.search(r"ONNX export of graph model failed: op \S*i0\S* has no ONNX function;", err), err
    assert str(out) in err and "--no-onnx" in err
    m = json.loads((out / "arch.json").read_text())
    assert m["onnx_skipped"] in err and "onnx" not in m["versions"]
    names = sorted(p.name for p in out.iterdir())
    graphs = ["model"] + [f"{g}_{k}" for g in ("exit", "segment", "head") for k in range(3)]
    assert names == sorted([f"{g}.pt2" for g in graphs] + ["arch.json", "weights.safetensors"])
    assert all("onnx" not in g for g in m["graphs"].values())
    x = torch.randn(5, 3, 8, 8)
    assert load(out).predict(x).pred.shape == (5,)
    with pytest.raises(ExportError, match="exported without ONNX"):
        load(out, backend="onnx")


# ---- atomicity ----------------------------------------------------------------------------
def _export_proc(run: Path, arch: str, out: Path) -> subprocess.Popen:
    import os

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "exitnas", "export", str(run), "--arch", arch,
                             "--out", str(out), "--no-onnx"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _assert_complete(out: Path, arch_id: str) -> None:
    from exitnas.runtime import load

    m = json.loads((out / "arch.json").read_text())
    assert m["arch"]["id"] == arch_id
    assert sorted(p.name for p in out.iterdir()) == sorted([f["path"] for f in m["files"]] + ["arch.json"])
    load(out, check=True)  # every file present with its sha256 and shapes


PHASES = ("before-tmp", "tmp-written", "swapped")


def _tmp_dirs(out: Path) -> set[Path]:
    return set(out.parent.glob(f".{out.name}.tmp-*"))


def _swapped(out: Path, ino: int | None) -> bool:
    try:
        return out.stat().st_ino != ino
    except FileNotFoundError:
        return False


def _watched_export(run: Path, arch: str, out: Path) -> dict[str, float]:
    """Run one export to completion, timing (seconds from the start) when its temporary folder
    appears ("tmp") and when ``out`` becomes the new export ("swap")."""
    ino = out.stat().st_ino if out.exists() else None
    before, t0, times = _tmp_dirs(out), time.monotonic(), {}
    proc = _export_proc(run, arch, out)
    while proc.poll() is None:
        if "tmp" not in times and _tmp_dirs(out) - before:
            times["tmp"] = time.monotonic() - t0
        if "swap" not in times and _swapped(out, ino):
            times["swap"] = time.monotonic() - t0
        time.sleep(0.002)
    assert proc.wait() == 0, proc.stderr.read()
    times["total"] = time.monotonic() - t0
    assert {"tmp", "swap"} <= set(times), times  # both moments seen (polled every 2 ms)
    return times


def _kill_and_check(run: Path, out: Path, archs: tuple[str, str], trigger: str,
                    delay: float) -> tuple[str, str]:
    """Start an export over ``out`` of whichever of ``archs`` it does not hold, wait for
    ``trigger`` ("start": at once; "tmp": its temporary folder exists; "swap": ``out`` is the
    new folder), then ``delay`` seconds, then kill -9 it. Returns (phase, outcome), both read
    from what the kill left: "before-tmp" (``out`` unchanged, no new temporary folder) and
    "tmp-written" (``out`` unchanged, the new temporary folder left behind) give outcome "old";
    "swapped" (``out`` is the new export, complete) gives "new"; "finished" means the process
    exited before the kill (outcome "new", complete)."""
    old = tree_digest(out)
    held = json.loads((out / "arch.json").read_text())["arch"]["id"]
    target = archs[1] if held == archs[0] else archs[0]
    before, ino = _tmp_dirs(out), out.stat().st_ino
    proc = _export_proc(run, target, out)
    deadline = time.monotonic() + 300
    fired = {"start": lambda: True, "tmp": lambda: bool(_tmp_dirs(out) - before),
             "swap": lambda: _swapped(out, ino)}[trigger]
    while not fired() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(delay)
    finished = proc.poll() is not None
    proc.kill()
    proc.wait()
    left = _tmp_dirs(out) - before
    if tree_digest(out) == old:
        assert not finished, f"the export exited ({proc.returncode}) without replacing {out}"
        return ("tmp-written" if left else "before-tmp"), "old"
    _assert_complete(out, target)
    if finished:
        assert proc.returncode == 0
    return ("finished" if finished else "swapped"), "new"


def _atomicity(exported, tmp_path, kills) -> list[tuple[str, str]]:
    """Export once (the old artifact, timed), then run ``kills(times)``: (trigger, delay) pairs
    for exports of the other arch killed as :func:`_kill_and_check` says, then a full rerun.
    Returns the (phase, outcome) of every kill."""
    run = exported["run"].path
    out = tmp_path / "export"
    times = _watched_export(run, exported["arch"].id, out)
    archs = (exported["arch"].id, OTHER_ARCH)
    outcomes = [_kill_and_check(run, out, archs, trigger, delay) for trigger, delay in kills(times)]
    final = _export_proc(run, OTHER_ARCH, out)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    _assert_complete(out, OTHER_ARCH)
    assert not _tmp_dirs(out)  # the killed runs' leftovers are gone
    return outcomes


def test_export_is_atomic_under_kill(exported, tmp_path):
    """kill -9 in each phase of an export: before its temporary folder exists, while it is
    being written, and just after the swap; ``out`` is the old export in the first two and the
    new one, complete, in the last; a rerun completes."""
    outcomes = _atomicity(exported, tmp_path, lambda times: [("start", 0.0), ("tmp", 0.0),
                                                             ("swap", 0.0)])
    assert outcomes == [("before-tmp", "old"), ("tmp-written", "old"), ("swapped", "new")]


@pytest.mark.slow
def test_export_is_atomic_under_many_kills(exported, tmp_path):
    """12 kills at random moments inside each phase (measured on the first export); every
    phase must be hit, each leaves the old or the new complete export."""
    rng = random.Random(11)

    def kills(times):
        spans = {"start": times["tmp"], "tmp": times["swap"] - times["tmp"],
                 "swap": 0.5 * (times["total"] - times["swap"])}
        return [(t, rng.uniform(0, 0.9 * spans[t])) for t in ("start", "tmp", "swap") * 4]

    outcomes = _atomicity(exported, tmp_path, kills)
    print("kill phases and outcomes", outcomes)
    assert len(outcomes) == 12
    assert set(PHASES) <= {phase for phase, _ in outcomes}, outcomes
    assert all(outcome == ("new" if phase in ("swapped", "finished") else "old")
               for phase, outcome in outcomes)
