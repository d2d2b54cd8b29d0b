"""Data parallelism across the processes torchrun starts: which rank this is, and the few collectives the scripts use.

    torchrun --nproc_per_node=2 train.py [flags]      # one process per GPU (or CPU share); python train.py: one
    world, device = distributed.init(device)          # reads torchrun's RANK, LOCAL_RANK, WORLD_SIZE

Every rank holds the whole model and the same optimizer state; ranks split the work (problems, demonstrations,
held-out problems) and combine what they found with the functions below. Without torchrun (WORLD_SIZE unset or 1)
init returns a single-process World and every function is the identity: no process group, nothing to install.
Backends: nccl on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU.
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0          # this process among all of them (0 .. size - 1)
    local_rank: int = 0    # this process on its machine: its GPU
    size: int = 1          # processes in all
    device: str = "cpu"    # where reductions of plain numbers run (nccl needs CUDA tensors)

    @property
    def main(self):
        """Rank 0: the one that prints, writes logs and saves checkpoints."""
        return self.rank == 0

    def sum(self, values):
        """[x, y, ...] numbers on this rank -> [sum of x over ranks, ...] on every rank (float64, so counts stay
        exact up to 2**53)."""
        if self.size == 1:
            return list(values)
        total = torch.tensor(list(values), dtype=torch.float64, device=self.device)   # [n]
        dist.all_reduce(total)
        return total.tolist()

    def sum_grads(self, params):
        """Replace every p.grad by its sum over ranks (a missing one counts as zeros). The loss weights are
        normalised by the global batch, so the sum is the gradient one process would get from the whole batch.
        All reductions are issued at once (async), then waited for: they overlap each other, not the backward."""
        if self.size == 1:
            return
        grads = []
        for p in params:
            if p.requires_grad:
                if p.grad is None:  # a rank with no rows this step still takes part
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        for work in [dist.all_reduce(g, async_op=True) for g in grads]:
            work.wait()

    def gather(self, items):
        """This rank's list -> the lists of all ranks concatenated in rank order, on every rank (any picklable
        items). With shard() this puts items back in their one-process order."""
        if self.size == 1:
            return list(items)
        everyone = [None] * self.size
        dist.all_gather_object(everyone, list(items))
        return [item for part in everyone for item in part]

    def shard(self, items):
        """This rank's contiguous slice of items (sizes differ by at most one; the whole list in one process)."""
        n = len(items)
        return items[self.rank * n // self.size:(self.rank + 1) * n // self.size]

    def barrier(self):
        """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
        if self.size > 1:
            dist.barrier()


SINGLE = World()  # one process: what every function defaults to


def from_env():
    """The World torchrun's environment describes, before any process group exists (a single process without it)."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size == 1:
        return SINGLE
    return World(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", 0)), size=size)


def init(device):
    """device ("cpu", "cuda", "cuda:N") -> (World, the device this rank runs on). Under torchrun: one process group,
    nccl with this rank's GPU cuda:LOCAL_RANK on CUDA, gloo on CPU. Alone: SINGLE and the device unchanged."""
    world = from_env()
    if world.size == 1:
        return world, device
    if torch.device(device).type == "cuda":
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    elif torch.device(device).type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--device={device}: torchrun runs on CUDA (nccl) or CPU (gloo)")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(world.rank, world.local_rank, world.size, device), device


def close():
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def only_main_prints(world):
    """Send the other ranks' stdout to os.devnull, so that the log is printed once (stderr, where errors go, stays)."""
    if not world.main:
        sys.stdout = open(os.devnull, "w")
