"""Kill -9 during retraining (issue 9): the rerun of the same command ends with weights equal to
an uninterrupted run with the same seed."""
from __future__ import annotations

from exitnas.rundir import RunDir
from exitnas.space import load_space
from test_train import _weights_equal, kill_and_resume

ARCH = "d2.2~s0b1=conv,s1b0=sdn_pool~max_softmax=0.8,0.7"


def test_kill_9_mid_retrain_then_rerun_gives_identical_weights(tmp_path, tiny_space_file):
    space = load_space(tiny_space_file, {"data.synthetic_size": 1024})
    for name in ("a", "b"):
        RunDir(tmp_path / name).init(space)
    cmd = ["retrain", "{RUN}", "--arch", ARCH, "--regime", "mixed", "--set", "retrain.epochs=4"]
    a, b, killed_at = kill_and_resume(cmd, f"retrain/{ARCH}/mixed", tmp_path,
                                      {"OMP_NUM_THREADS": "1"})
    assert killed_at in range(1, 4)
    assert _weights_equal(a / "model.safetensors", b / "model.safetensors")
