"""
What SFT, reward-model and DPO training share: turning (prompt, response) token lists into one padded batch,
running a model over such batches without gradient (scores, features, log-probs), and a straight-line optimisation
loop (AdamW, linear warm-up then cosine decay, gradient clipping).

Each trainer supplies its own loss as a function of a batch, so the loop below is the only training loop in the
project and each loss stays a pure function in its own file.
"""
import math
import random
from contextlib import nullcontext

import torch
from tqdm import tqdm

from distributed import full_weights, gather_tensor, rank, shard, sum_over_ranks, world_size


def collate(prompts: list[list[int]], responses: list[list[int]], device="cpu"):
    """Right-pad prompt + response rows into tokens [B, T], with two bool masks [B, T]:
    `mask` marks real tokens, `response_mask` marks response tokens (the targets that count)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    B, T = len(prompts), max(lengths)
    tokens = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    response_mask = torch.zeros(B, T, dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        tokens[row, :lengths[row]] = torch.tensor(prompt + response, dtype=torch.long)
        mask[row, :lengths[row]] = True
        response_mask[row, len(prompt):lengths[row]] = True
    return tokens.to(device), mask.to(device), response_mask.to(device)


def precision(dtype: torch.dtype, device):
    """A run's compute precision, entered once around all its work (iterate.run). Under bfloat16, autocast runs the
    matrix multiplies in bf16 while every weight that trains stays float32 (LoRA adapters, the reward head, a fully
    fine-tuned policy or reward model; `fit` refuses anything else) and frozen weights may be stored in bf16.
    Under float32, nothing is cast. No cast cache: autocast's would live as long as the run and hand out the bf16
    casts of weights that a step, or a load_state_dict such as fit_mle's return to its best epoch, changed since."""
    device = torch.device(device)
    if dtype != torch.bfloat16:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


@torch.no_grad()
def map_batches(model, fn, prompts: list[list[int]], responses: list[list[int]], batch_size: int,
                device=None, max_tokens: int | None = None) -> torch.Tensor:
    """fn(tokens, mask, response_mask) on right-padded batches of prompt + response rows (see `collate`), in eval
    mode, without gradient, in the caller's `precision`: the results, float32 on the CPU, concatenated along dim 0.
    Scoring, features and log-probs all go through here. An empty input gives an empty tensor. max_tokens caps
    rows x the longest row of a batch (halving its rows): long rows over a large vocabulary make large logits.
    Rows are batched longest first, so little of a batch is padding. Under torchrun each rank computes its share of
    the rows and every rank gets all the results."""
    device = device if device is not None else next(model.parameters()).device
    n = len(prompts)
    mine = shard(n)  # under torchrun, this rank's share of the rows (distributed.py); all of them otherwise
    # longest first, so that a batch pads to rows of about its own length (results go back in their order below)
    order = sorted(mine, key=lambda i: -(len(prompts[i]) + len(responses[i])))
    prompts, responses = [prompts[i] for i in order], [responses[i] for i in order]
    was_training = model.training
    model.eval()
    out, start = [], 0
    with full_weights(model):  # FSDP2: the whole model on each rank while it scores (distributed.py)
        while start < len(prompts):
            longest = lambda rows: max(len(p) + len(r) for p, r in zip(prompts[start:start + rows],
                                                                       responses[start:start + rows]))
            rows = batch_size
            while max_tokens and rows > 1 and rows * longest(rows) > max_tokens:  # the padded batch: rows x longest
                rows //= 2
            out.append(fn(*collate(prompts[start:start + rows], responses[start:start + rows], device)).float().cpu())
            start += rows
    model.train(was_training)
    results = torch.cat(out) if out else torch.zeros(0)
    position = {i: k for k, i in enumerate(order)}
    return gather_tensor(n, results[[position[i] for i in mine]] if out else results)


def shuffled_batches(n_examples: int, batch_size: int, seed: int):
    """Endless minibatches of example indices, reshuffled every epoch from a seeded generator. (Grouping batches by
    length would skip a quarter of the padding, but measured on the first reward model it stopped the fit after one
    epoch at 0.65 held-out accuracy against 0.71 after four: batches of one length are not a random sample.)"""
    if n_examples < 1 or batch_size < 1:  # else the loop below would never yield
        raise ValueError(f"shuffled_batches: need at least one example and a batch size >= 1, got {n_examples} "
                         f"and {batch_size}")
    rng = random.Random(seed)
    while True:
        order = list(range(n_examples))
        rng.shuffle(order)
        for start in range(0, n_examples, batch_size):
            yield order[start:start + batch_size]


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(model, loss_fn, batches, steps: int, lr: float, warmup: int = 0, weight_decay: float = 0.0,
        grad_clip: float = 1.0, desc: str = "train", size=len) -> list[dict]:
    """Minimise loss_fn(batch) -> (mean loss over the batch, stats) over `steps` batches from the iterator
    `batches`. Only parameters with requires_grad are trained (LoRA freezes the rest), and only in float32. Returns
    one stats dict per step. Under torchrun, loss_fn must call forward on `data_parallel(model)` (the trainers
    below do), so that backward averages the gradients over ranks.

    Under torchrun a batch is a list of example indices: each rank takes its share and weighs its mean loss by its
    share of what the loss averages over (size(indices): rows, unless the loss is a mean over tokens), times the
    ranks (DDP averages the gradients over ranks), so the step equals the one-process step on the whole batch; the
    logged loss and stats are those of the whole batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    if any(p.dtype != torch.float32 for p in params):  # a bf16 weight at 1.0 cannot move by less than 2^-8
        raise ValueError(f"{desc}: trainable weights must be float32 (got {sorted({str(p.dtype) for p in params})}); "
                         "keep frozen weights in bfloat16 and train a float32 copy or adapters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    ranks = world_size()
    model.train()
    history = []
    progress = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0, disable=rank() != 0)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        batch = next(batches)
        if ranks == 1:
            loss, stats = loss_fn(batch)
            share = 1.0
        else:  # this rank's rows; a rank left without one runs a row at weight 0, to join the gradient exchange
            mine = batch[rank()::ranks]
            share = size(mine) / size(batch)
            loss, stats = loss_fn(mine or batch[:1])
        # the whole batch's loss and stats: the sum over ranks of each one's weighted by its share
        totals = sum_over_ranks(torch.tensor([loss.item(), *stats.values()], dtype=torch.float64) * share)
        total_loss, stats = totals[0].item(), dict(zip(stats, totals[1:].tolist()))
        if not math.isfinite(total_loss):  # stop before the step: the weights stay as they were, finite
            raise FloatingPointError(f"{desc}: the loss is {total_loss} at step {step + 1} of {steps}")
        optimizer.zero_grad(set_to_none=True)
        (loss * (share * ranks)).backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        history.append({"loss": total_loss, **stats})
        progress.set_postfix(loss=f"{total_loss:.3f}", refresh=False)
    model.eval()
    return history
