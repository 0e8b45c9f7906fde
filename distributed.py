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
- labels: rank 0 alone asks the oracle and appends to labels.jsonl, then sends the labelled pairs to every rank
  (`from_main`); rank 0 alone writes files and prints (`is_main`).

    torchrun --standalone --nproc-per-node 2 iterate.py          # two processes on one machine (CPU: gloo)
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
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
    """The elementwise sum of `values` (float, on this rank's device) over all ranks."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier():
    if world_size() > 1:
        dist.barrier()


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """What training calls forward on: the model itself in one process; under torchrun a DistributedDataParallel
    wrapper, which averages the gradients of every rank in backward. (Every weight that trains takes part in the
    loss: a reward model freezes its backbone's unused output matrix.)"""
    if world_size() == 1:
        return model
    return DistributedDataParallel(model)
