"""Data parallelism on an existing engine: torchrun starts the processes, PyTorch's DDP or FSDP2 keeps them in step.

    torchrun --nproc-per-node 2 -m pipeline distill --teacher T --student S --out OUT
    torchrun --nproc-per-node 2 -m pipeline train --out runs/demo

Every process runs the same command. `cluster()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK),
joins the process group (gloo on CPU, NCCL on GPU) and says which share of each global batch is this process's:
a contiguous slice of it, so N processes at global batch B see exactly the windows one process sees at B.
Each process's loss is the mean over its slice and DDP averages gradients across processes, so with equal
slices the update is the one-process update on the whole batch (tests/models/test_distributed.py holds 2 gloo
processes to 1 process, parameter by parameter). `wrap(model, fsdp=True)` shards parameters, gradients and
optimizer state over the processes with `fully_shard` (each decoder layer, then the root), for models that do
not fit one device. Without torchrun (or with one process) every helper is the identity and nothing is
initialised.

Only the main process (rank 0) prints, shows progress and writes files; the others compute.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from models.errors import UserError


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def device(self) -> torch.device:
        if self.parallel and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise UserError(f"batch size {batch_size} does not divide among {self.world} processes; "
                            f"give a multiple of {self.world}")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's contiguous slice of a global batch (rows)."""
        if not self.parallel:
            return batch
        n = batch.shape[0] // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    def wrap(self, model: nn.Module, fsdp: bool = False) -> nn.Module:
        """DDP, or FSDP2 (`fully_shard` on each decoder layer and the root); the model itself with one process."""
        if not self.parallel:
            return model
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in decoder_layers(model):
                fully_shard(layer)
            # the root too reshards after each forward: left gathered after an evaluation (no backward follows),
            # its parameters would not be the ones the optimizer holds when the state is saved
            fully_shard(model, reshard_after_forward=True)
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            return DistributedDataParallel(model.to(self.device), device_ids=[self.local_rank])
        return DistributedDataParallel(model)

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over all processes (evaluation counts, token totals)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.parallel:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    def mean(self, value: float) -> float:
        return self.sum(value)[0] / self.world

    def agree(self, value: float) -> float:
        """The main process's value (a stop decision, the schedule's progress by its clock), the same on every
        process: a clock read by each would differ, and leave the others waiting in a collective forever or
        stepping with another learning rate."""
        if not self.parallel:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.item()

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers' `model.layers`, or our Decoder's `layers`."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def full_state_dict(model: nn.Module, cl: Cluster) -> dict[str, torch.Tensor]:
    """Every parameter whole on the CPU (gathered from the shards under FSDP); every process must call it."""
    if cl.parallel:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # the names of a single process's state dict (what load_state_dict wants back on a resume), a tied head
        # sharing the embedding's tensor as it does there: gathered, it would be a copy under its own name.
        # With cpu_offload only rank 0 receives the tensors; the others get an empty dict
        inner = unwrap(model)
        first: dict[int, str] = {}
        alias = {n: first.setdefault(id(p), n) for n, p in inner.named_parameters(remove_duplicate=False)}
        return {n: full[alias.get(n, n)] for n in inner.state_dict() if alias.get(n, n) in full}
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def environment() -> tuple[int, int, int, int]:
    """(rank, world, local rank, local world) from torchrun's variables; a single process without them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as e:
        raise UserError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK are not integers ({e})") from e
    return rank, world, local_rank, local_world


_joined = False  # whether cluster() has joined torchrun's process group in this process (kept until exit)


def join(local_rank: int) -> None:
    """Join torchrun's process group (gloo on CPU, NCCL where CUDA is present) once per process, and leave it at
    exit. Not after each use: a second init_process_group after destroy_process_group names its group "0" again
    in torchrun's store, where the first group's keys still are, and a process that reads them waits forever
    (a `pipeline run` with [train] and [distill] under torchrun enters cluster() twice)."""
    global _joined
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    _joined = True
    atexit.register(leave)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def cluster() -> Iterator[Cluster]:
    """torchrun's process group (joined on first use), with each process's threads set to its share of the cores
    for the duration. A group the caller initialised is used as it is, threads untouched."""
    rank, world, local_rank, local_world = environment()
    if world <= 1 or (dist.is_initialized() and not _joined):
        yield Cluster(rank if world > 1 else 0, world, local_rank, local_world)
        return
    if not dist.is_initialized():
        join(local_rank)
    previous = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // local_world))
    try:
        yield Cluster(rank, world, local_rank, local_world)
    finally:
        torch.set_num_threads(previous)
