"""What the benchmarks share: where the data is, which machine and code ran them, stage wall
times summed over the sessions a resumable benchmark took, and stored exit statistics.

    from benchmarks._common import cifar10_root, Sessions, Timings, machine
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from exitnas.evaluate import ArchStats  # noqa: E402
from exitnas.io import atomic_path, atomic_write_json  # noqa: E402

CIFAR10_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def cifar10_root() -> Path:
    """CIFAR-10 (JPEG) extracted once into ``$EXITNAS_DATA_CACHE`` (default
    ``.cache/cifar10-jpeg``, as the tests' fixture): ImageFolder train/ and test/."""
    from exitnas.data import extract_tarball

    cache = Path(os.environ.get("EXITNAS_DATA_CACHE", ROOT / ".cache" / "cifar10-jpeg"))
    if not CIFAR10_TARBALL.is_file() and not (cache / "test").is_dir():
        sys.exit(f"CIFAR-10 (JPEG) tarball not found at {CIFAR10_TARBALL}")
    return extract_tarball(CIFAR10_TARBALL, cache)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line: cores, CPU model, GPU if any, torch version and threads."""
    import torch

    gpu = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    return (f"{os.cpu_count()}-core {cpu_model()} ({platform.machine()}), {gpu}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} torch thread(s)")


def git_state(paths: tuple[str, ...] = ("exitnas", "benchmarks")) -> str:
    """The commit, and the files under ``paths`` that differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT,
                               text=True, capture_output=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    files = [line[3:] for line in dirty.splitlines()]
    return head + (f" (uncommitted: {', '.join(files)})" if files else "")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


class Sessions:
    """``sessions.json``: every session that worked on a resumable benchmark, with its start
    time, the code it imported and the load average when it started."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = json.loads(path.read_text()) if path.is_file() else []

    def start(self, **extra) -> None:
        self.rows.append({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                          "code": git_state(), "load": load_average(), "machine": machine(),
                          **extra})
        atomic_write_json(self.path, self.rows)


class Timings:
    """Wall seconds per stage, summed over the sessions that worked on it until it first
    finished (a killed stage's partial session counts; a rerun after it finished does not)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, stage: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, timed; the stage counts as finished when it returns."""
        entry = self.data.setdefault(stage, {"seconds": 0.0, "sessions": 0, "done": False})
        t0, finished = time.perf_counter(), False
        try:
            out = fn(*args, **kwargs)
            finished = True
            return out
        finally:
            if not entry["done"]:
                entry["seconds"] += time.perf_counter() - t0
                entry["sessions"] += 1
                entry["load_after"] = load_average()
                entry["done"] = finished
                atomic_write_json(self.path, self.data)

    def total(self) -> float:
        return sum(e["seconds"] for e in self.data.values())


def save_stats(path: Path, stats: ArchStats, **meta) -> None:
    """Exit statistics as an ``.npz`` (no pickles) with ``meta`` (JSON) beside them."""
    if stats.unit.key != "macs":  # the files hold integer MACs (load_stats reads them so)
        raise ValueError(f"save_stats stores MACs, got costs in {stats.unit.label}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, conf=stats.conf, entropy=stats.entropy, pred=stats.pred,
                     labels=stats.labels, exit_macs=np.asarray(stats.exit_costs, np.int64),
                     backbone_macs=np.int64(stats.backbone_cost),
                     meta=np.frombuffer(json.dumps({"names": list(stats.names), **meta})
                                        .encode(), dtype=np.uint8))


def load_stats(path: Path) -> tuple[ArchStats, dict] | None:
    """What :func:`save_stats` wrote, or None when there is no readable file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            stats = ArchStats(z["conf"], z["entropy"], z["pred"], z["labels"],
                              tuple(int(c) for c in z["exit_macs"]), int(z["backbone_macs"]),
                              tuple(meta.pop("names")))
    except (OSError, ValueError, KeyError):
        return None
    return stats, meta


def model_stats(space, arch, weights: Path, splits, split: str, folder: Path) -> ArchStats:
    """Exit statistics of the model in ``weights`` (``arch`` of ``space``) on ``split``, one
    CPU pass, stored in ``folder`` per weights file (sha256) and reused."""
    from exitnas.cost import cost_table
    from exitnas.data import batches
    from exitnas.runtime import sha256_file
    from exitnas.supernet import load_model

    path = folder / f"{sha256_file(weights)[:16]}-{split}.npz"
    got = load_stats(path)
    if got is not None and got[1].get("arch") == arch.id:
        return got[0]
    costs = cost_table(space)
    model = load_model(space, arch, weights)
    data = batches(getattr(splits, split), batch_size=space.data.eval_batch_size,
                   mean=splits.mean, std=splits.std)
    stats = ArchStats.from_model(model, data, costs=costs, arch=arch)
    save_stats(path, stats, arch=arch.id, weights=str(weights))
    return stats


__all__ = ["ROOT", "CIFAR10_TARBALL", "cifar10_root", "machine", "cpu_model", "git_state",
           "load_average", "Sessions", "Timings", "save_stats", "load_stats", "model_stats"]
