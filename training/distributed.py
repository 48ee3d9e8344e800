"""Several processes, one model: what a ``torchrun`` job needs from training, and no more.

``torchrun --nproc_per_node=N -m training train ...`` starts N copies of the usual command
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`setup` turns them into a process group (``nccl`` on CUDA, ``gloo`` on CPU); without
them, or with ``WORLD_SIZE=1``, every function here is a no-op and a run is exactly the
single-process run. ``train.py`` uses these functions; it does not talk to
``torch.distributed`` itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from training.config import ConfigError
from training.engine import pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job: its rank, the job's size, its device."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, the version, MLflow and the progress bar."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r} must be an integer (torchrun sets it)") from None


def setup(device_name: str = "auto") -> Context:
    """Join the job torchrun started, or stand alone when there is none.

    Each rank takes ``cuda:LOCAL_RANK`` when CUDA is used (``device`` auto or cuda), else
    the CPU; the backend follows the device: ``nccl`` for CUDA, ``gloo`` for CPU.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Context(device=pick_device(device_name))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = _rank_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    if rank != 0:  # one voice per job: the other ranks report problems only
        for name in ("training", "serving"):
            logging.getLogger(name).setLevel(logging.WARNING)
    log.info("rank %d of %d on %s (%s)", rank, world, device, backend)
    return Context(device=device, rank=rank, world_size=world, local_rank=local_rank,
                   backend=backend)


def _rank_device(device_name: str, local_rank: int) -> torch.device:
    if device_name == "cpu":
        return torch.device("cpu")
    if device_name in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if device_name == "cuda":
            raise RuntimeError("device='cuda' asked for but CUDA is not available")
        return torch.device("cpu")  # DistributedDataParallel does not run on MPS
    raise ConfigError(f"device={device_name!r} in a torchrun job: each rank picks its own "
                      f"device, so use auto, cuda (rank r takes cuda:LOCAL_RANK) or cpu")


def is_main() -> bool:
    """True in a single process and on rank 0 of a job."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def local_main_first(ctx: Context) -> Iterator[None]:
    """Run the block on each machine's local rank 0 first, then on the other ranks: one
    process per machine downloads or unpacks data while the others wait for it."""
    if ctx.distributed and ctx.local_rank != 0:
        barrier()
    yield
    if ctx.distributed and ctx.local_rank == 0:
        barrier()


def all_reduce_mean(metrics: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks, the same dict on every rank; unchanged in a
    single process. Every rank must pass the same keys."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(metrics)
    keys = sorted(metrics)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                          device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= dist.get_world_size()
    return {**metrics, **dict(zip(keys, values.tolist()))}


def broadcast(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (any picklable value); ``obj`` as is alone."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Wait for every rank, then leave the process group (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- model, data, seeds
def wrap_model(model: nn.Module, ctx: Context, sync_batchnorm: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over the ranks at every
    backward); ``model`` itself in a single process. With ``sync_batchnorm`` BatchNorm
    layers compute their batch statistics over the global batch (CUDA only, as in torch).
    The wrapper shares ``model``'s parameters: keep using ``model`` for state_dict()."""
    if not ctx.distributed:
        return model
    if sync_batchnorm:
        if ctx.device.type != "cuda":
            raise ConfigError(f"sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm "
                              f"runs on GPUs only), but this job runs on {ctx.device.type}; "
                              f"set sync_batchnorm=false")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                   else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def train_sampler(dataset, ctx: Context, seed: int) -> DistributedSampler | None:
    """Each rank's share of the training set, reshuffled by ``set_epoch(epoch)`` from
    ``seed + epoch`` (so a resumed job sees the same shares); None in a single process."""
    if not ctx.distributed:
        return None
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                              shuffle=True, seed=seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one rank's epoch: ``seed + epoch`` on rank 0 (the single-process seed),
    offset by ``rank * 2**32`` on the others so their augmentation and dropout differ."""
    return seed + epoch + (rank << 32)
