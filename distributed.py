"""
Several processes under `torchrun`: PyTorch's own engine (torch.distributed), nothing home-made. Without torchrun
(no WORLD_SIZE in the environment, or 1) every function here is the one-process identity and iterate.py runs as a
plain script.

What is divided, and how (the rest of the project calls only what is below):
- sampling (`model.sample`) and every pass without gradient (`train.map_batches`: scores, features, the DPO
  reference's log-probs, the KL's): each rank takes the rows i with i % world == rank and the results are gathered
  back into their order (`shard`, `gather`). A response's draws follow its own key (model.sample_key), so the
  candidates are the same on 1 rank or 8.
- training (`train.fit`): each rank computes the loss of its share of the global batch and DDP averages the
  gradients (`data_parallel`), scaled so that the step is the one-process step on the whole batch.
- a Llama checkpoint under LoRA (`shard_weights`, FSDP2's fully_shard): each rank keeps 1/world of every weight
  of the policy and of the reward model, frozen base included, and gathers one block at a time to compute it.
  Sampling and scoring gather the whole model on each rank for their duration (`full_weights`): a generation's
  steps differ from rank to rank, and a sharded forward is a collective every rank must join.
- labels: rank 0 alone asks the oracle and appends to labels.jsonl, then sends the labelled pairs to every rank
  (`from_main`); rank 0 alone writes files and prints (`is_main`).

    torchrun --standalone --nproc-per-node 2 iterate.py          # two processes on one machine (CPU: gloo)
"""
import contextlib
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """Whether torchrun started this process among several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun described (NCCL on CUDA, each rank on GPU LOCAL_RANK; gloo otherwise) and
    silence the printing of every rank but 0. Returns this rank's device."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints; the others' errors still reach stderr
    return device


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(n: int) -> list[int]:
    """The indices of n rows that this rank handles: i % world == rank (spread evenly, whatever the order)."""
    return list(range(rank(), n, world_size()))


def gather(n: int, local: list) -> list:
    """The n results in their order, on every rank, from each rank's results for its `shard(n)`."""
    if world_size() == 1:
        return list(local)
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(local))
    out = [None] * n
    for r, part in enumerate(parts):
        out[r::world_size()] = part
    return out


def gather_tensor(n: int, local: torch.Tensor) -> torch.Tensor:
    """`gather` for a tensor whose dim 0 holds this rank's rows: the [n, ...] tensor, on the CPU."""
    if world_size() == 1:
        return local
    parts = [None] * world_size()
    dist.all_gather_object(parts, local.cpu())
    order = torch.tensor([i for r in range(world_size()) for i in range(r, n, world_size())], dtype=torch.long)
    rows = torch.cat([part for part in parts if part.numel()]) if n else local.cpu()
    out = torch.empty_like(rows)
    out[order] = rows
    return out


def from_main(obj):
    """Rank 0's `obj`, on every rank (the labelled pairs rank 0 bought, say)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `values` over all ranks, on the CPU (NCCL reduces on the GPU, gloo on the CPU)."""
    if world_size() == 1:
        return values
    on_gpu = dist.get_backend() == "nccl"
    values = values.to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu", copy=True)
    dist.all_reduce(values)
    return values.cpu()


def barrier():
    if world_size() > 1:
        dist.barrier()


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """What training calls forward on: the model itself in one process or when FSDP2 shards it (its backward
    averages the gradients itself); otherwise under torchrun a DistributedDataParallel wrapper, which averages the
    gradients of every rank in backward. (Every weight that trains takes part in the loss: a reward model freezes
    its backbone's unused output matrix.)"""
    if world_size() == 1 or sharded(model):
        return model
    return DistributedDataParallel(model)


# ---------------------------------------------------------------------------------------------------------------
# FSDP2: Llama checkpoints under LoRA

def shard_weights(model: torch.nn.Module, blocks) -> torch.nn.Module:
    """FSDP2 in place: each transformer block its own unit (gathered for its forward and backward, then freed),
    and `model` the root that holds the rest (embeddings, final norm, output, a reward head). `model` must be what
    training calls forward on: its forward hook gathers the root's weights."""
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    # FSDP2 sets itself up at the root's first forward; sampling reaches the blocks through hidden_states, and a
    # block run first would take itself for the root. One token through the root, on every rank, settles it
    with torch.no_grad():
        model(torch.ones(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    return model


def sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def full_weights(model: torch.nn.Module):
    """Within the block, every FSDP2 unit of `model` holds its whole weights on each rank and a forward calls no
    collective, so ranks may run different numbers of forwards (sampling, scoring their own shards); after it,
    the weights are sharded again. Nothing happens for a model that is not sharded."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:  # the root keeps its weights between forward and backward, as fully_shard sets it
            unit.reshard()
            unit.set_reshard_after_forward(unit is not units[0], recurse=False)


def full_state(state: dict) -> dict:
    """A state dict with every sharded tensor gathered whole (a collective: every rank must call it)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def load_state(model: torch.nn.Module, state: dict, strict: bool = True):
    """model.load_state_dict(state) for a whole (not sharded) state, whether `model` is sharded or not."""
    if sharded(model):  # each whole tensor cut into this rank's shard of its parameter
        current = model.state_dict()
        state = {k: distribute_tensor(v.to(current[k].dtype), current[k].device_mesh, current[k].placements)
                 if isinstance(current.get(k), DTensor) else v for k, v in state.items()}
    model.load_state_dict(state, strict=strict)
