"""Data-parallel training and sharded work over ``torch.distributed``.

A run with several processes is started by ``torchrun`` or by ``recforge train ... --nproc N``
(which starts ``torch.distributed.run`` itself). Every process reads the same data and builds the
same model from the same seed; then:

* **training**: each global batch of ``batch_size`` samples (the same on every process: the
  epoch's order comes from the common generator) is cut into one share per process
  (:meth:`TorchRecommender.epoch_batches`); each process draws its share's negatives from its own
  generator, computes the loss of its share, and :class:`~torch.nn.parallel.DistributedDataParallel`
  averages the gradients, so one step sees the whole global batch, as in one process;
* **evaluation**: the users are cut into contiguous shards, one per process; the per-user values
  are gathered in rank order, so every user is counted exactly once and the metrics equal those of
  one process (no padding of the last shard, hence no duplicated users);
* **files**: only rank 0 writes the run folder, checkpoints and predictions.

The backend is ``gloo`` on CPUs and ``nccl`` on CUDA GPUs (each process on ``cuda:LOCAL_RANK``).
Why DDP wraps a module whose ``forward`` is the model's loss: models compute their loss through
several methods of their network (propagation, encoders, contrastive views), and DDP averages the
gradients of every parameter reached from the wrapped module's forward pass.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn

from recforge.errors import ConfigError


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (no-op for one process
    or when already joined). Returns True when this process is part of a group of several."""
    if env_world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shard_bounds(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of this process's share of ``n`` items (sizes differ by at most 1)."""
    r, w = world()
    rank = r if rank is None else rank
    size = w if size is None else size
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather(obj) -> list:
    """Every process's ``obj``, in rank order (``[obj]`` for one process)."""
    r, w = world()
    if w == 1:
        return [obj]
    out = [None] * w
    dist.all_gather_object(out, obj)
    return out


def all_mean(value: float) -> float:
    """The mean of a float over the processes (the value itself for one process)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world()[1]


class LossModule(nn.Module):
    """A module whose forward pass is the model's loss on a batch (what DDP wraps)."""

    def __init__(self, model):
        super().__init__()
        self.net = model.net_
        self._model = [model]  # a list: not registered as a submodule

    def forward(self, batch):
        return self._model[0].loss(batch)


def wrap(model):
    """The model's loss wrapped in DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = model.device_
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    # some models leave parameters out of some steps (an unused view, a disabled auxiliary loss)
    return DDP(LossModule(model), device_ids=ids, find_unused_parameters=True)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``recforge ARGV`` in ``nproc`` processes with ``torch.distributed.run``; its exit status."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give 1 or more processes")
    if env_world_size() > 1:
        raise ConfigError("--nproc inside a process group: start with torchrun or with --nproc, not both")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "recforge.cli", *argv]
    env = dict(os.environ)
    # each process gets an equal share of the cores unless the user set it
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
