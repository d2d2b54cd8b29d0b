"""Data parallelism across the processes torchrun starts: which rank this is, and the few collectives the scripts use.

    torchrun --nproc_per_node=2 train.py [flags]      # one process per GPU (or CPU share); python train.py: one
    world, device = distributed.init(device)          # reads torchrun's RANK, LOCAL_RANK, WORLD_SIZE

Every rank holds the whole model and the same optimizer state; ranks split the work (problems, demonstrations,
held-out problems) and combine what they found with the functions below. Without torchrun (WORLD_SIZE unset or 1)
init returns a single-process World and every function is the identity: no process group, nothing to install.
Backends: nccl on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU.

With --fsdp (the end of this file) the ranks hold 1/N of the weights, gradients and AdamW state each instead:
FSDP2 (torch.distributed.fsdp.fully_shard) gathers each block's weights for its forward and backward and sums
the gradients into each rank's shard (a reduce-scatter), in place of sum_grads.
"""
import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import transformer_on


@dataclass(frozen=True)
class World:
    rank: int = 0          # this process among all of them (0 .. size - 1)
    local_rank: int = 0    # this process on its machine: its GPU
    size: int = 1          # processes in all
    device: str = "cpu"    # where reductions of plain numbers run (nccl needs CUDA tensors)
    fsdp: bool = False     # weights, gradients and AdamW state sharded across the ranks (shard_model below)

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
        All reductions are issued at once (async), then waited for: they overlap each other, not the backward.
        Under FSDP the backward has already summed every gradient into its shard: nothing to do."""
        if self.size == 1 or self.fsdp:
            return
        grads = []
        for p in params:
            if p.requires_grad:
                if p.grad is None:  # a rank with no rows this step still takes part
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        for work in [dist.all_reduce(g, async_op=True) for g in grads]:
            work.wait()

    def max(self, value):
        """The largest of every rank's number (an int or float), on every rank."""
        if self.size == 1:
            return value
        top = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        return type(value)(top.item())

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


# -----------------------------------------------------------------------------
# FSDP2 (--fsdp): each rank keeps a 1/N shard of every weight, its gradient and its AdamW state
#
# One FSDP unit per block, and one for the rest (embedding, final norm and the tied head: one tensor), as
# torchtitan does. A unit's forward all-gathers its weights and frees them after (the root's stay until the
# backward); its backward reduce-scatters the gradients: summed over ranks, each rank keeping its shard. So every
# forward and backward is a collective, and every rank must run as many of them: grpo.micro_batches and the
# warm-up pad a rank's micro-batches with zero-weight ones. Sampling would all-gather every block's weights for
# every token; `unsharded` gathers them once for a whole generate call instead.


def shard_model(model):
    """fully_shard(model) in place, block by block, gradients summed (not averaged) over ranks -> model."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # torch >= 2.6
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_method(model, "hidden_states")  # grpo calls it directly, not through forward
    for unit in [model, *model.layers]:
        unit.set_gradient_divide_factor(1.0)  # the loss weights already divide by the global batch
        if hasattr(unit, "set_force_sum_reduction_for_comms"):  # newer torch: a plain sum, which gloo also has
            unit.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def unsharded(model, world):
    """Inside: every weight of an FSDP model gathered once and kept (so decode steps run no collectives, and ranks
    may decode different numbers of steps); resharded on exit. Without FSDP: nothing."""
    if not world.fsdp:
        yield
        return
    for block in model.layers:
        block.set_reshard_after_forward(False, recurse=False)
    for unit in [model, *model.layers]:
        unit.unshard()
    try:
        yield
    finally:
        for block in model.layers:
            block.reshard()
            block.set_reshard_after_forward(True, recurse=False)
        model.reshard()


def gathered(model, world, optimizer=None):
    """FSDP: (a plain Transformer with every whole weight, AdamW's state_dict with whole tensors or None), on rank
    0's CPU, in the layout of a run without FSDP (so either resumes the other); (None, None) on the other ranks.
    Every rank must call it: each sends its shards, one tensor at a time."""
    from torch.distributed.tensor import DTensor

    def whole(t):  # every rank takes part in the all-gather; rank 0 keeps the result
        t = t.full_tensor() if isinstance(t, DTensor) else t
        return t.cpu() if world.main else None
    weights = {name: whole(t) for name, t in model.state_dict().items()}
    adamw = None
    if optimizer is not None:
        saved = optimizer.state_dict()  # {"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups"}
        adamw = {"state": {i: {k: whole(v) for k, v in s.items()} for i, s in saved["state"].items()},
                 "param_groups": saved["param_groups"]}
    if not world.main:
        return None, None
    return transformer_on(model.config, weights, model.vocab_limit), adamw


def load_optimizer_state(optimizer, saved):
    """FSDP: an AdamW state_dict with whole tensors (any run's checkpoint) -> optimizer, each rank keeping the
    shard of every moment that matches its shard of the weight."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {k: distribute_tensor(v.to(params[i].device), params[i].device_mesh, params[i].placements)
                 if isinstance(params[i], DTensor) and v.shape == params[i].shape else v for k, v in s.items()}
             for i, s in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
