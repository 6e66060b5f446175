"""Bad-input corpus across the CLI (issue 9): each broken input gives exit status 2 and one line
naming what is wrong, no traceback, and leaves every file already in the run directory
byte-for-byte unchanged."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import TEST_DATA, run_cli, tree_digest
from exitnas.cli import main

TINY = TEST_DATA / "tiny.yaml"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run with every step done: supernet, search, one retrain, one export."""
    from exitnas.arch import Arch
    from exitnas.export import export_run
    from exitnas.retrain import retrain
    from exitnas.rundir import RunDir
    from exitnas.search import SearchOptions, run_search
    from exitnas.space import load_space
    from exitnas.train import train_supernet

    root = tmp_path_factory.mktemp("bad") / "run"
    space = load_space(TINY, {"supernet.epochs": 1, "retrain.epochs": 2})
    run = RunDir(root)
    run.init(space)
    train_supernet(run, space, log=None)
    run_search(root, SearchOptions(trials=4), log=open(os.devnull, "w"))
    arch = Arch.from_id(ARCH)
    retrain(run, arch, space=space, log=None)
    export_run(run, arch, root / "export" / "good", onnx=False)
    return root


ARCH = "d2.2~s0b1=conv~max_softmax=0.8"


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (run dir copy, scratch dir) -> argv
    expect: str                               # must appear in the one error line
    prepare: Callable[[Path, Path], None] = lambda run, tmp: None
    keep_config: bool = True                  # config.yaml must be unchanged too


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _space(tmp: Path, text: str) -> str:
    return str(_write(tmp / "space.yaml", text))


TINY_TEXT = TINY.read_text()


def _corrupt(path: Path, keep: float | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep else b"\x00garbage" * 64)


def _pickle_payload(path: Path, sentinel: Path) -> None:
    """A pickle that would create ``sentinel`` if anything unpickled it."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    path.write_bytes(pickle.dumps({"model": Evil()}))


CASES = [
    Case("yaml_syntax", lambda r, t: ["train-supernet", _space(t, "name: [x\n"), "--run-dir", r],
         "YAML syntax error"),
    Case("unknown_key", lambda r, t: ["train-supernet", _space(t, TINY_TEXT + "colour: red\n"),
                                      "--run-dir", r], "unknown key 'colour'"),
    Case("wrong_type_set", lambda r, t: ["train-supernet", TINY, "--run-dir", r, "--set",
                                         "supernet.epochs=two"],
         "supernet.epochs: expected an integer, got str 'two'"),
    Case("range_set", lambda r, t: ["train-supernet", TINY, "--run-dir", r, "--set",
                                    "supernet.optim.lr=-1"], "supernet.optim.lr: -1.0 is not > 0.0"),
    Case("unknown_set_key", lambda r, t: ["train-supernet", TINY, "--run-dir", r, "--set",
                                          "supernet.epoch=3"], "unknown key in override"),
    Case("set_without_value", lambda r, t: ["train-supernet", TINY, "--run-dir", r, "--set",
                                            "supernet.epochs"], "expected key=value"),
    Case("unknown_family", lambda r, t: ["train-supernet", _space(t, TINY_TEXT.replace(
        "family: resnet", "family: vgg")), "--run-dir", r], "backbone.family: unknown value 'vgg'"),
    Case("unknown_block", lambda r, t: ["train-supernet", _space(t, TINY_TEXT.replace(
        "block: basic", "block: dense")), "--run-dir", r], "backbone.block: unknown value 'dense'"),
    Case("unknown_head", lambda r, t: ["run", TINY, "--run-dir", r, "--set",
                                       "exits.heads=[linear, attention]"],
         "exits.heads: unknown value 'attention'"),
    Case("unknown_policy", lambda r, t: ["run", TINY, "--run-dir", r, "--set",
                                         "policy.names=[oracle]"],
         "policy.names: unknown value 'oracle'"),
    Case("unknown_loss", lambda r, t: ["retrain", r, "--arch", ARCH, "--loss", "focal"],
         "unknown loss 'focal'"),
    Case("missing_config", lambda r, t: ["train-supernet", t / "nope.yaml", "--run-dir", r],
         "cannot read file"),
    Case("arch_depth", lambda r, t: ["retrain", r, "--arch", "d3.2~none~max_softmax="],
         "depth 3 of stage 0"),
    Case("arch_position", lambda r, t: ["export", r, "--arch", "d1.2~s0b1=conv~max_softmax=0.8",
                                        "--out", t / "x"], "not a candidate"),
    Case("arch_head", lambda r, t: ["cost", TINY, "--arch", "d2.2~s0b1=lstm~max_softmax=0.8"],
         "head 'lstm' is not allowed"),
    Case("arch_unparsable", lambda r, t: ["retrain", r, "--arch", "resnet-ish"], "does not parse"),
    Case("arch_thresholds", lambda r, t: ["export", r, "--arch", "d2.2~s0b1=conv~max_softmax=",
                                          "--out", t / "x"], "needs 1 value(s), got 0"),
    Case("infeasible_budget", lambda r, t: ["search", r, "--budget", "10"], "cheapest"),
    Case("budget_garbage", lambda r, t: ["search", r, "--budget", "lots"], "--budget"),
    Case("missing_data_dir", lambda r, t: ["train-supernet", _space(t, TINY_TEXT.replace(
        "dataset: synthetic", f"dataset: imagefolder\n  root: {t / 'nodata'}")), "--run-dir",
        t / "fresh"], "missing folder train/"),
    Case("empty_data_dir", lambda r, t: ["train-supernet", _space(t, TINY_TEXT.replace(
        "dataset: synthetic", f"dataset: imagefolder\n  root: {t}")), "--run-dir", t / "fresh"],
         "train/ has no class folders",
         prepare=lambda r, t: [(t / "train").mkdir(), (t / "test").mkdir()] and None),
    Case("corrupt_checkpoint", lambda r, t: ["train-supernet", TINY, "--run-dir", r, "--resume",
                                             "--set", "supernet.epochs=1"],
         "checkpoint", prepare=lambda r, t: _corrupt(r / "supernet" / "checkpoint.pt")),
    Case("truncated_checkpoint", lambda r, t: ["retrain", r, "--arch", ARCH, "--resume",
                                               "--set", "retrain.epochs=2"],
         "checkpoint", prepare=lambda r, t: _corrupt(
             r / "retrain" / ARCH / "mixed" / "checkpoint.pt", keep=0.5)),
    Case("pickle_as_weights", lambda r, t: ["export", r, "--arch", ARCH, "--weights",
                                            t / "w.safetensors", "--out", t / "x"],
         "not safetensors", prepare=lambda r, t: torch.save({"a": torch.zeros(2)},
                                                            t / "w.safetensors")),
    Case("malicious_pickle_checkpoint", lambda r, t: ["train-supernet", TINY, "--run-dir", r,
                                                      "--resume", "--set", "supernet.epochs=1"],
         "checkpoint", prepare=lambda r, t: _pickle_payload(r / "supernet" / "checkpoint.pt",
                                                           t / "pwned")),
    Case("export_manifest_shapes", lambda r, t: ["predict", r / "export" / "good", TINY],
         "shape", prepare=lambda r, t: _edit_manifest(r / "export" / "good")),
    Case("export_missing_segment", lambda r, t: ["predict", r / "export" / "good", TINY],
         "missing", prepare=lambda r, t: _remove_first_pt2(r / "export" / "good")),
    Case("export_pickled_weights", lambda r, t: ["predict", r / "export" / "good", TINY],
         "safetensors", prepare=lambda r, t: torch.save(
             {"x": torch.zeros(1)}, r / "export" / "good" / "weights.safetensors")),
    Case("run_dir_of_other_space", lambda r, t: ["train-supernet", "search_spaces/quickstart.yaml",
                                                 "--run-dir", r], "belongs to space 'tiny'"),
    Case("search_without_supernet", lambda r, t: ["search", r],
         "weights.safetensors", prepare=lambda r, t: (r / "supernet" / "weights.safetensors").unlink()),
    Case("not_a_run_dir", lambda r, t: ["search", t / "empty"], "not a run directory",
         prepare=lambda r, t: (t / "empty").mkdir()),
    Case("report_without_models", lambda r, t: ["report", r], "no model found",
         prepare=lambda r, t: shutil.rmtree(r / "retrain")),
    Case("nan_loss", lambda r, t: ["train-supernet", TINY, "--run-dir", r, "--restart", "--set",
                                   "supernet.optim.lr=1e30", "--set", "supernet.epochs=1"],
         "loss is nan", keep_config=False),
    Case("retrain_epochs_zero", lambda r, t: ["retrain", r, "--arch", ARCH, "--epochs", "0"],
         "--epochs"),
    # issue 12.2: each of these printed a traceback (or changed a file) before
    Case("space_not_utf8", lambda r, t: ["space", "check", _bytes(t, b"name: caf\xe9\n")],
         "not UTF-8 text (byte 0xe9 at line 1"),
    Case("space_duplicate_key", lambda r, t: ["space", "check", _space(
        t, TINY_TEXT + "num_classes: 7\n")], "duplicate key 'num_classes'"),
    Case("space_deep_nesting", lambda r, t: ["space", "check", _space(
        t, "name: " + "[" * 5000 + "]" * 5000 + "\n")], "nested more than 32 levels"),
    Case("space_nan", lambda r, t: ["space", "check", _space(t, TINY_TEXT.replace(
        "lr: 0.05", "lr: .nan", 1))], "supernet.optim.lr: expected a finite number, got nan"),
    Case("space_long_int", lambda r, t: ["space", "check", _space(t, TINY_TEXT.replace(
        "num_classes: 4", "num_classes: " + "9" * 5000))], "too long"),
    Case("space_huge_depth", lambda r, t: ["space", "check", _space(t, TINY_TEXT.replace(
        "depths: [1, 2]}", "depths: [1, 2147483648]}", 1))], "2147483648 is not <= 512"),
    Case("set_nested_too_deep", lambda r, t: ["retrain", r, "--arch", ARCH, "--set",
                                              "supernet.epochs=" + "[" * 200 + "]" * 200],
         "--set: supernet.epochs: YAML syntax error"),
    Case("arch_double_dot", lambda r, t: ["cost", TINY, "--arch",
                                          "d1..2~s0b0=linear~max_softmax=0.5"],
         "depths 'd1..2' are not"),
    Case("arch_value_two_dots", lambda r, t: ["retrain", r, "--arch",
                                              "d1.2~s0b0=linear~max_softmax=0.5.5"],
         "value '0.5.5' is not a number"),
    Case("arch_json_nan", lambda r, t: ["export", r, "--arch", '{"depths": [2, 2], "exits": [],'
                                        ' "thresholds": [NaN]}', "--out", t / "x"],
         "NaN is not a number JSON allows"),
    Case("budget_overflows", lambda r, t: ["search", r, "--budget", "1e999"],
         "not a finite number of MACs"),
    Case("budget_of_another_study", lambda r, t: ["search", r, "--budget", "0.5"],
         "was run with another budget"),
    Case("journal_garbled", lambda r, t: ["search", r], "not a readable Optuna journal",
         prepare=lambda r, t: _garble_line(r / "search" / "study.log", 1)),
    Case("study_record_not_utf8", lambda r, t: ["search", r], "not a study record",
         prepare=lambda r, t: (r / "search" / "study.json").write_bytes(b"\x80{}")),
    Case("search_bad_weights_no_journal", lambda r, t: ["search", r], "not a valid safetensors",
         prepare=lambda r, t: [(r / "search" / "study.log").unlink(),
                               (r / "supernet" / "weights.safetensors").write_bytes(b"")] and None),
    Case("dashboard_without_journal", lambda r, t: ["dashboard", r, "--port", "0"],
         "journal is missing", prepare=lambda r, t: (r / "search" / "study.log").unlink()),
    Case("dashboard_port_range", lambda r, t: ["dashboard", r, "--port", "70000"],
         "not a TCP port"),
    Case("predict_batch_zero", lambda r, t: ["predict", r / "export" / "good", TINY,
                                             "--batch-size", "0"], "--batch-size 0"),
]


def _bytes(tmp: Path, data: bytes) -> str:
    path = tmp / "space.yaml"
    path.write_bytes(data)
    return str(path)


def _garble_line(path: Path, index: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[index] = lines[index][:10] + b"\x00garbage" + lines[index][10:]
    path.write_bytes(b"".join(lines))


def _edit_manifest(folder: Path) -> None:
    import json

    path = folder / "arch.json"
    data = json.loads(path.read_text())
    text = json.dumps(data)
    # claim a different shape for the first weight tensor listed
    files = data["files"]
    entry = next(f for f in files if f.get("tensors"))
    name = next(iter(entry["tensors"]))
    entry["tensors"][name] = [999] + list(entry["tensors"][name])[1:]
    path.write_text(json.dumps(data))
    assert json.dumps(data) != text


def _remove_first_pt2(folder: Path) -> None:
    next(p for p in sorted(folder.rglob("*.pt2")) if "model" not in p.name).unlink()


def test_corpus_size():
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    case.prepare(run, scratch)
    before = tree_digest(run)
    code = main([str(a) for a in case.argv(run, scratch)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert case.expect in lines[0], lines[0]
    after = tree_digest(run)
    if not case.keep_config:  # the resolved config records the latest command's settings
        before.pop("config.yaml")
        after.pop("config.yaml")
    assert after == before
    assert not (scratch / "pwned").exists()


def test_bad_input_in_a_subprocess_prints_no_traceback(trained_run, tmp_path):
    proc = run_cli("retrain", trained_run, "--arch", "d3.2~none~max_softmax=")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]


def test_search_continues_after_a_torn_journal_record(trained_run, tmp_path):
    """A writer killed mid-append leaves a last line without its newline (replay ignores it).
    The next search cuts it before appending: the record it appended used to fuse with the
    torn line into one that does not parse, after which every replay failed."""
    import optuna

    from exitnas.search._storage import StorageSpec

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    log = run / "search" / "study.log"
    whole = log.read_bytes()
    log.write_bytes(whole + b'{"op_code": 4, "worker_id": "killed", "study_id": 0, "da')
    proc = run_cli("search", run, "--trials", "5")
    assert proc.returncode == 0, proc.stderr
    text = log.read_bytes()
    assert text.startswith(whole) and b"killed" not in text and text.endswith(b"\n")
    storage = StorageSpec(journal=str(log)).open()
    study = optuna.load_study(storage=storage, study_name=json.loads(
        (run / "search" / "study.json").read_text())["study_name"])
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 5
