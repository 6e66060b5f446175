"""Training steps on Ray Train workers: ``--backend ray [--address ADDR] [--workers N]``.

    exitnas train-supernet CONFIG --run-dir /shared/runs/q --backend ray --address HEAD:6379 \\
        --workers 4

A ``TorchTrainer`` starts ``N`` workers, one per device (``ScalingConfig(num_workers=N,
use_gpu=<the cluster has GPUs>)``, one CPU or one GPU each) and joins them in a process group
(gloo on CPU, NCCL on GPU). Each worker builds a :class:`~exitnas._dist.Dist` from that group
(world rank, world size, ``ray.train.torch.get_device()``) and calls the very function torchrun's
processes call (``train_supernet``, ``train_backbone``, ``finetune``): the same data shards of
``data.batch_size / N`` images per step, DistributedDataParallel, rank 0 alone writes.

- **Checkpoints** are exitnas's own (``RUN/<step>/checkpoint.pt``), never Ray's: the run
  directory must be on a filesystem every node sees at the same path, and workers run in the
  driver's working directory, so relative paths (``--run-dir``, ``data.root``) mean what they
  mean to the driver. Ray Train keeps only its own small state in ``ray/`` beside the
  checkpoint (``RUN/supernet/ray/``).
- **Faults**: when a worker dies Ray Train restarts the whole group
  (``FailureConfig(max_failures=3)``) and the new workers continue from the last exitnas
  checkpoint, as a rerun of the command would. ``--restart`` holds until the run has written
  its first checkpoint; a group restarted after that continues from it.
- **Errors** a user can cause (:class:`~exitnas.errors.ExitnasError`: a foreign checkpoint,
  missing data on a node...) are not retried: the group ends, the next one stops at once, and
  the command stops with the first worker's line, exit 2.
- **Connection and token auth** are the search's (:func:`exitnas.search._ray._init_ray`):
  without ``--address`` a private local instance with ``N`` CPUs; with it ``RAY_AUTH_MODE=token``
  unless set, and a missing or wrong token is one line, exit 2.

Ray is imported only here, and only when a step runs on it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, ExitnasError, RunDirError, TrainingError

MAX_FAILURES = 3

Train = Callable[..., Any]  # train(dist, *, resume: bool, restart: bool) -> step result


@dataclass(frozen=True, kw_only=True)
class RayStep:
    """One training step as every worker runs it: ``train(dist, resume=, restart=)`` trains,
    rank 0 returns ``describe(result)``. ``checkpoint`` is the step's ``checkpoint.pt``
    (absolute); ``stamp`` its state when the command started (None: absent); ``errors`` the
    :class:`_Errors` actor."""

    name: str
    train: Train
    describe: Callable[[Any], str]
    checkpoint: str
    stamp: tuple[int, int, int] | None
    resume: bool
    restart: bool
    cwd: str
    errors: Any = None


class _Errors:
    """A Ray actor holding the first user error (an ExitnasError) any worker raised. The worker
    raises it too, so Ray Train ends the whole group (no rank waits on a peer that stopped);
    the group Ray then starts ends at once, and the driver raises the error: one line, no
    retries of a mistake."""

    def __init__(self) -> None:
        self.error: ExitnasError | None = None

    def put(self, error: ExitnasError) -> None:
        self.error = self.error or error

    def get(self) -> ExitnasError | None:
        return self.error


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file's current version (checkpoints are replaced atomically)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def restarts(step: RayStep) -> bool:
    """Whether this worker group starts the step over: ``--restart`` was given and the run has
    not written a checkpoint since the command started (a group restarted after that
    continues from it)."""
    return step.restart and _stamp(Path(step.checkpoint)) == step.stamp


def _worker(config: dict) -> Any:
    """Ray Train's per-worker function: a Dist from Ray Train's process group, then the step."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from ._dist import Dist

    step: RayStep = config["step"]
    if ray.get(step.errors.get.remote()) is not None:
        return None  # an earlier group stopped on the user's error: the driver raises it
    ctx = ray.train.get_context()
    try:
        try:
            os.chdir(step.cwd)  # Ray Train starts workers in a folder of its own
        except OSError:
            raise RunDirError(f"{step.cwd}: the driver's working directory is not on node "
                              f"{ray.get_runtime_context().get_node_id()[:12]}: run from a "
                              "folder every node sees at the same path") from None
        dist = Dist(rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                    device=ray.train.torch.get_device(),
                    enabled=torch.distributed.is_initialized())
        result = step.train(dist, resume=step.resume, restart=restarts(step))
    except ExitnasError as err:
        ray.get(step.errors.put.remote(err))
        raise
    return step.describe(result) if dist.is_main else None


def _check_devices(resources: dict, workers: int) -> bool:
    """Whether the workers use GPUs (the cluster has some); refuses more workers than devices
    (Ray would wait for them for ever)."""
    kind = "GPU" if resources.get("GPU", 0) > 0 else "CPU"
    have = int(resources.get(kind, 0))
    if workers > have:
        raise ConfigError(f"{workers} workers, one per device, but the Ray cluster has "
                          f"{have} {kind}s", file="--workers")
    return kind == "GPU"


def run_step(*, name: str, train: Train, describe: Callable[[Any], str], checkpoint: Path,
             resume: bool, restart: bool, address: str | None, workers: int,
             log=sys.stderr) -> str:
    """Run ``train`` on ``workers`` Ray Train workers (the cluster at ``address``, else a local
    instance); returns rank 0's ``describe(result)``. ``checkpoint``: the step's checkpoint.pt."""
    from .search._ray import _init_ray, _ray

    ray = _ray()
    try:
        from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as err:
        raise RunDirError(f"--backend ray needs Ray Train ({err}): pip install 'exitnas[ray]'"
                          ) from None
    checkpoint = checkpoint.resolve()
    cwd, stamp = os.getcwd(), _stamp(checkpoint)
    _init_ray(address, workers, log, log_to_driver=True)  # rank 0's progress lines
    try:
        errors = ray.remote(_Errors).options(num_cpus=0).remote()
        step = RayStep(name=name, train=train, describe=describe, checkpoint=str(checkpoint),
                       stamp=stamp, resume=resume, restart=restart, cwd=cwd, errors=errors)
        use_gpu = _check_devices(ray.cluster_resources(), workers)
        trainer = TorchTrainer(
            _worker, train_loop_config={"step": step},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=RunConfig(name="ray", storage_path=str(checkpoint.parent),
                                 failure_config=FailureConfig(max_failures=MAX_FAILURES)))
        try:
            result, failed = trainer.fit(), None
        except TrainingFailedError as err:
            result, failed = None, err
        error = ray.get(errors.get.remote())
    finally:
        ray.shutdown()
    if error is not None:
        raise error
    if failed is not None:
        lines = [line for line in str(failed).splitlines() if line.strip()]
        raise TrainingError(f"{name}: the Ray Train workers failed (restarted at most "
                            f"{MAX_FAILURES} times); the last good checkpoint is kept "
                            f"({checkpoint}); last error: "
                            f"{(lines or [type(failed).__name__])[-1].strip()[:300]}")
    return result.return_value


__all__ = ["run_step", "RayStep", "restarts", "MAX_FAILURES"]
