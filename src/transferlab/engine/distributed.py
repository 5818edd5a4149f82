"""One training run across processes: torchrun's environment, the process group and the collectives a run uses.

`torchrun --nproc-per-node N -m transferlab train ...` starts N copies of `train`. Each finds WORLD_SIZE, RANK and
LOCAL_RANK in its environment (`from_environment`, the only place that reads them) and joins one process group:
gloo on the CPU, NCCL on CUDA with one GPU per process (cuda:LOCAL_RANK). Without those variables, or with
WORLD_SIZE = 1, a run is one process: `SINGLE`, whose methods return their input untouched, so nothing changes.

What a run shares out and what it writes once is train.py's business; this module knows ranks and tensors only.
A process that fails makes torchrun stop the others; a collective that waits longer than TRANSFERLAB_DIST_TIMEOUT
seconds (default 1800: long enough for rank 0 to decode a large data set while the others wait) fails too, so no
process waits forever, and the process group is always destroyed on the way out.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, DistributedError, first_line
from .device import resolve_device

TIMEOUT_ENV = "TRANSFERLAB_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in a run: `world_size` processes, this one `rank` (0 writes), on GPU `local_rank`."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None  # set once the process group is up (session)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """The process that writes files, logs, draws progress bars and reports errors met by all alike."""
        return self.rank == 0

    def describe(self) -> dict:
        """What a run's environment records about it: nothing for one process."""
        return {"world_size": self.world_size, "backend": self.backend} if self.active else {}

    def device(self, device: torch.device) -> torch.device:
        """The device this process trains on: its own GPU (cuda:LOCAL_RANK) under CUDA."""
        return torch.device("cuda", self.local_rank) if self.active and device.type == "cuda" else device

    def part(self, n: int, among: int | None = None) -> slice:
        """This process's contiguous share of n items in rank order, shared among the first `among` processes (default
        all; the others get none); shares differ by at most one item."""
        k = self.world_size if among is None else among
        return slice(n * self.rank // k, n * (self.rank + 1) // k) if self.rank < k else slice(n, n)

    def seed(self, seed: int, epoch: int) -> int:
        """A seed of this process's own for one epoch (dropout, augmentation): drawn again each epoch, so a run
        resumed from state.pt draws what the uninterrupted run drew."""
        return int(np.random.SeedSequence([seed, epoch, self.rank]).generate_state(1)[0])

    # -------------------------------------------------------------- collectives (no-ops in one process)
    def barrier(self) -> None:
        if self.active:
            dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it decodes and caches the data), then the others (they read its cache)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes, in place."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's object, on every process (picklable objects)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, obj) -> bool:
        """Do all processes hold an equal object?"""
        if not self.active:
            return True
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, obj)
        return all(o == everyone[0] for o in everyone)

    def gather_rows(self, x: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
        """Every process holds rows `part(n)` of a tensor along `dim` -> the whole tensor, in order, on every process.
        Sent as bytes, so any dtype travels exactly and in one collective."""
        if not self.active:
            return x
        sizes = [(n * (r + 1)) // self.world_size - (n * r) // self.world_size for r in range(self.world_size)]
        x = x.movedim(dim, 0).contiguous()
        rest = x.shape[1:]
        width = int(np.prod(rest, dtype=np.int64)) * x.element_size()
        flat = (
            x.reshape(len(x), -1).view(torch.uint8)
            if x.numel()
            else torch.zeros(len(x), width, dtype=torch.uint8, device=x.device)
        )
        padded = torch.zeros(max(sizes), width, dtype=torch.uint8, device=x.device)
        padded[: len(flat)] = flat
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        whole = torch.cat([p[:s] for p, s in zip(parts, sizes)])
        return whole.view(x.dtype).reshape(n, *rest).movedim(0, dim)

    def average_buffers(self, model: nn.Module) -> None:
        """Per-process BatchNorm: each process normalises its share of a batch with that share's statistics, and
        after an epoch the running statistics of the layers in training mode are averaged over the processes, so
        validation and the checkpoint use one set. Frozen layers' buffers are equal everywhere and left alone."""
        if not self.active:
            return
        for module in model.modules():
            if module.training:
                for buffer in module.buffers(recurse=False):
                    if buffer.is_floating_point():
                        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                        buffer.div_(self.world_size)

    def wrap(self, module: nn.Module, *, find_unused: bool) -> nn.Module:
        """DistributedDataParallel around the trainable part: gradients averaged over the processes. Buffers are
        not broadcast each step (average_buffers). `find_unused`: gradual unfreezing leaves groups without a
        gradient for some epochs."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel  # only a run across processes wraps its model

        ids = [self.local_rank] if self.backend == "nccl" else None
        # torch 2.14 renamed broadcast_buffers (and warns about the old name); both still sync once, at the start
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused, **no_sync)

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


SINGLE = Distributed()


def from_environment() -> Distributed:
    """torchrun's WORLD_SIZE, RANK and LOCAL_RANK, or one process (SINGLE) when WORLD_SIZE is unset or 1."""
    text = os.environ.get("WORLD_SIZE")
    if text is None:
        return SINGLE
    try:
        world_size = int(text)
        rank = int(os.environ.get("RANK", ""))
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE={text}, RANK={os.environ.get('RANK')}, LOCAL_RANK={os.environ.get('LOCAL_RANK')}: "
            "expected integers (start several processes with torchrun)"
        ) from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"WORLD_SIZE={world_size} with RANK={rank}, LOCAL_RANK={local_rank}: not a valid process")
    return Distributed(world_size, rank, local_rank) if world_size > 1 else SINGLE


def check_batch_size(batch_size: int, world: Distributed) -> None:
    """The global batch is split evenly over the processes: each takes batch_size / world_size images."""
    if batch_size % world.world_size:
        n = world.world_size
        below, above = batch_size - batch_size % n, batch_size - batch_size % n + n
        options = f"{below} or {above}" if below else str(above)
        raise ConfigError(
            f"batch_size = {batch_size} does not split evenly over {n} processes: each takes batch_size / {n} "
            f"images of every batch, so choose a multiple of {n} (e.g. {options})"
        )


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text}: expected a positive number of seconds")
    return value


@contextmanager
def session(device: str, batch_size: int) -> Iterator[Distributed]:
    """This process's part in a run: SINGLE without torchrun; else the process group, joined with the others
    (gloo on the CPU, NCCL on `device` cuda) and destroyed on the way out, whatever happens."""
    world = from_environment()
    if not world.active:
        yield SINGLE
        return
    check_batch_size(batch_size, world)
    timeout = timeout_seconds()
    if dist.is_initialized():  # the caller's own process group: used, and left to the caller
        yield dataclasses.replace(world, backend=dist.get_backend())
        return
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={world.local_rank} but {torch.cuda.device_count()} CUDA devices are visible: "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(world.local_rank)
    backend = "nccl" if cuda else "gloo"
    where = f"process {world.rank} of {world.world_size}"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as error:
        raise DistributedError(f"{where}: cannot join the process group ({_first_line(error)})") from None
    try:
        yield dataclasses.replace(world, backend=backend)
    except RuntimeError as error:
        if not communication_failed(error):
            raise
        raise DistributedError(f"{where}: lost the other processes ({_first_line(error)})") from None
    finally:
        dist.destroy_process_group()


def communication_failed(error: RuntimeError) -> bool:
    """Did a collective fail (a process gone, a timeout) rather than the run itself? gloo raises plain
    RuntimeErrors from its transport; NCCL and the store raise torch.distributed.DistError."""
    return isinstance(error, dist.DistError) or any(
        mark in str(error) for mark in ("gloo/", "ProcessGroupGloo", "NCCL")
    )


def _first_line(error: BaseException) -> str:
    """The message's first sentence, without the C++ source location gloo puts in front of it."""
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first_line(error))
    return text.split(". ", 1)[0].rstrip(".")
