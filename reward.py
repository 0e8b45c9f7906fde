"""
The Bradley-Terry reward model: a scalar head on the GPT, its loss, its training, and scoring responses.

What it owns: `bradley_terry_loss`, `RewardModel` (a GPT backbone, initialised by the caller from pi0, plus a
linear head read at the last real token of each row), `score` and `embed` (batched, without gradient),
`embed_and_score`, `train_reward_model` (on `train.fit`), `fit_mle` (epochs until a held-out share stops improving;
`fit_head`: of the head alone on fixed features) and `pairwise_accuracy` (agreement with the truth).

The model behind it (RLHF Workflow eq. 1): P(a1 > a2 | x) = sigmoid(r(x, a1) - r(x, a2)). Fitting r by maximum
likelihood on labelled pairs (a_w preferred to a_l) minimises

    loss = -log sigmoid(r(x, a_w) - r(x, a_l))

averaged over pairs. The reward is defined only up to a constant per prompt; nothing here pins it.

The head reads the final hidden state of the last REAL token of each row, found from the mask and never from a
token value (with a pad id equal to EOS, Llama reward models that search for the pad token read the score at the
wrong place). That hidden state is also phi(x, a), the feature vector of the uncertainty enhancer
(`RewardModel.features`, `embed`).

What it simplifies: one scalar head, no reward centring or margin term, no ensembles; the caller tokenises.

    python reward.py   # fits a tiny random reward model to a toy preference and prints its accuracy
"""
import copy
import math
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import data_parallel, full_weights, load_state
from train import collate, fit, map_batches, shuffled_batches


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected) (RLHF Workflow eq. 1); log 2 at equal rewards."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


class RewardModel(nn.Module):
    """r(x, a) = head(phi(x, a)), with phi the backbone's final normed hidden state at the last real token.

    `backbone` is a GPT the reward model trains where its parameters require grad: a float32 copy of pi0 (the
    paper initialises the reward model from the SFT model), or under LoRA pi0's frozen base with adapters of its own
    (lora.share_frozen). Its output matrix is unused; the head is float32."""

    def __init__(self, backbone, trainable_layers: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.dim, 1)
        if trainable_layers is not None:
            # fine-tune only the top blocks (and the final norm), of what the backbone lets train: the backward
            # pass stops there, which makes refitting the reward model every iteration affordable on a CPU
            trains = {id(param) for param in backbone.parameters() if param.requires_grad}
            top = list(backbone.layers)[len(backbone.layers) - trainable_layers:] if trainable_layers else []
            kept = {id(param) for module in [*top, backbone.norm] for param in module.parameters()}
            for param in backbone.parameters():
                param.requires_grad_(id(param) in trains and id(param) in kept)
        if not backbone.config.tie_embeddings:  # the output matrix never meets a reward: nothing to train there
            backbone.output.weight.requires_grad_(False)
        # a zero head starts every reward at exactly 0 (first loss log 2, all ties); the backbone gets gradient
        # from the second step on, once the head has moved
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """phi(x, a): the hidden state [B, C] at the last real token of each row of tokens [B, T].

        mask: bool [B, T] of real tokens, any padding (left, right, or none when mask is None)."""
        hidden = self.backbone.hidden_states(tokens, mask)                          # [B, T, C]
        B, T = tokens.shape
        if mask is None:
            last = torch.full((B,), T - 1, device=tokens.device)
        else:
            if not mask.any(1).all():
                raise ValueError("RewardModel: a row has no real token")
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            last = torch.where(mask, positions, -1).max(1).values                   # [B] last True column
        return hidden[torch.arange(B, device=tokens.device), last]                  # [B, C]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards [B], float32."""
        features = self.features(tokens, mask)  # a bf16 base's features meet the float32 head where no autocast runs
        return self.head(features.to(self.head.weight.dtype)).squeeze(-1).float()


def score(rm, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 64,
          device=None) -> torch.Tensor:
    """r(x, a) for each (prompt, response) token-list pair: Tensor [N] on the CPU, without gradient."""
    return map_batches(rm, lambda tokens, mask, _: rm(tokens, mask), prompts, responses, batch_size, device)


def embed(rm, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 64,
          device=None) -> torch.Tensor:
    """phi(x, a) for each (prompt, response) pair: Tensor [N, C] on the CPU, without gradient."""
    return map_batches(rm, lambda tokens, mask, _: rm.features(tokens, mask), prompts, responses, batch_size, device)


@torch.no_grad()
def embed_and_score(rm, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 64, device=None):
    """phi(x, a) [N, C] and r(x, a) = head(phi) [N] from one forward pass (the uncertainty rule needs both)."""
    features = embed(rm, prompts, responses, batch_size, device)                   # [N, C]
    with full_weights(rm):  # under FSDP2 the head is sharded too (distributed.py)
        return features, rm.head(features.to(rm.head.weight.device)).squeeze(-1).float().cpu()


def train_reward_model(rm, pairs, steps: int = 200, lr: float = 1e-4, batch_size: int = 32, seed: int = 0,
                       device="cpu", weight_decay: float = 0.0, warmup: int = 0,
                       grad_clip: float = 1.0) -> list[dict]:
    """Fit `rm` (in place, on `device`) to `pairs`, a list of (prompt, chosen, rejected) token lists, with the
    Bradley-Terry loss. Returns one stats dict per step: loss, accuracy (r_chosen > r_rejected), margin."""
    prompts = [p for p, _, _ in pairs]
    chosen = [c for _, c, _ in pairs]
    rejected = [r for _, _, r in pairs]

    net = data_parallel(rm)  # what forward is called on: the reward model, or under torchrun its DDP wrapper

    def loss_fn(indices):
        batch_prompts = [prompts[i] for i in indices]
        # chosen and rejected in one forward pass of 2B rows
        tokens, mask, _ = collate(batch_prompts + batch_prompts, [chosen[i] for i in indices]
                                  + [rejected[i] for i in indices], device)
        rewards = net(tokens, mask)                                                 # [2B]
        chosen_rewards, rejected_rewards = rewards[:len(indices)], rewards[len(indices):]
        stats = {"accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
                 "margin": (chosen_rewards - rejected_rewards).mean().item()}
        return bradley_terry_loss(chosen_rewards, rejected_rewards), stats

    batches = shuffled_batches(len(pairs), batch_size, seed)
    return fit(rm, loss_fn, batches, steps, lr, warmup, weight_decay, grad_clip, desc="reward")


def fit_mle(rm, pairs, lr: float, batch_size: int, seed: int = 0, device="cpu", max_epochs: int = 10,
            held_out_share: float = 0.1, head_only: bool = False, features=None) -> dict:
    """The maximum-likelihood fit of `rm` on every pair: epochs over all but a held-out share of them, each a pass
    with its own cosine cycle, until the Bradley-Terry loss on the held-out pairs stops falling; the weights of the
    best epoch are kept (at least one epoch runs: new labels always get a pass). Returns the held-out loss and
    accuracy of the kept weights, the epochs run and the epoch kept.

    head_only: phi stays as it is and only the head is fit (fit_head), on `features` = (phi of the chosen sides
    [N, C], phi of the rejected sides [N, C]) in the order of `pairs` when the caller has them (phi of a pair never
    changes while the backbone does not train), else on phi computed here."""
    if len(pairs) < 2:
        raise ValueError(f"fit_mle: needs at least 2 labelled pairs (one is held out), got {len(pairs)}")
    order = random.Random(seed).sample(range(len(pairs)), len(pairs))
    n_held = max(1, round(held_out_share * len(pairs)))
    if head_only:
        if features is None:
            features = pair_features(rm, pairs, device)
        if any(len(phi) != len(pairs) for phi in features):
            raise ValueError(f"fit_mle: features of {[len(phi) for phi in features]} pairs for {len(pairs)} pairs")
        rows = torch.tensor(order[n_held:] + order[:n_held])  # the training pairs, then the held-out ones
        return fit_head(rm, *(phi[rows].to(device) for phi in features), len(pairs) - n_held, lr, batch_size, seed,
                        max_epochs)
    held_out, train = [pairs[i] for i in order[:n_held]], [pairs[i] for i in order[n_held:]]
    prompts, chosen, rejected = zip(*held_out)

    def held_out_fit():  # (Bradley-Terry loss, rewards of the chosen side, of the rejected side)
        chosen_rewards, rejected_rewards = score(rm, prompts, chosen, device=device), score(rm, prompts, rejected,
                                                                                            device=device)
        return bradley_terry_loss(chosen_rewards, rejected_rewards).item(), chosen_rewards, rejected_rewards

    steps = math.ceil(len(train) / batch_size)
    train_epoch = lambda epoch: train_reward_model(rm, train, steps, lr, batch_size, seed + epoch, device,
                                                   warmup=steps // 10)
    return best_epochs(rm, train_epoch, held_out_fit, max_epochs)


def pair_features(rm, pairs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi of each pair's chosen side [N, C], phi of its rejected side [N, C]), on the CPU, without gradient."""
    prompts, chosen, rejected = zip(*pairs)
    return embed(rm, prompts, chosen, device=device), embed(rm, prompts, rejected, device=device)


def fit_head(rm, phi_chosen, phi_rejected, n_train: int, lr: float, batch_size: int, seed: int,
             max_epochs: int) -> dict:
    """fit_mle of the head alone, phi fixed: the theory paper's linear reward r = theta^T phi(x, a), whose MLE is a
    logistic regression on phi. phi_chosen, phi_rejected [N, C] are the pairs' features, the first n_train of them
    the training pairs, the rest held out: no forward pass through the network at all, let alone one per epoch. A
    whole float32 copy of the head trains (the same on every rank) and goes back into `rm` at the end, whether `rm`
    is sharded or not."""
    device = phi_chosen.device
    with full_weights(rm):  # under FSDP2 the head is sharded too: its whole weights are copied
        head = nn.utils.skip_init(nn.Linear, rm.head.in_features, 1, device=device)  # no draw from torch's RNG
        head.load_state_dict({k: v.detach().float().clone() for k, v in rm.head.state_dict().items()})
    rewards = lambda model, rows: tuple(model(phi[rows]).squeeze(-1).float() for phi in (phi_chosen, phi_rejected))
    held_out_rows = slice(n_train, None)

    def held_out_fit():
        with torch.no_grad():
            chosen_rewards, rejected_rewards = (r.cpu() for r in rewards(head, held_out_rows))
        return bradley_terry_loss(chosen_rewards, rejected_rewards).item(), chosen_rewards, rejected_rewards

    steps = math.ceil(n_train / batch_size)
    net = data_parallel(head)  # under torchrun, backward averages the gradients over the ranks

    def train_epoch(epoch):
        fit(head, lambda rows: (bradley_terry_loss(*rewards(net, rows)), {}),
            shuffled_batches(n_train, batch_size, seed + epoch), steps, lr, warmup=steps // 10, desc="reward head")
    result = best_epochs(head, train_epoch, held_out_fit, max_epochs)
    load_state(rm, {f"head.{k}": v for k, v in head.state_dict().items()}, strict=False)
    return result


def best_epochs(model, train_epoch, held_out_fit, max_epochs: int) -> dict:
    """Epochs of train_epoch(epoch) while held_out_fit() -> (loss, chosen rewards, rejected rewards) falls; the
    best epoch's weights are put back. Returns what fit_mle returns."""
    best_loss, best_state, best_epoch = math.inf, None, 0
    for epoch in range(1, max_epochs + 1):
        train_epoch(epoch)
        loss = held_out_fit()[0]
        if loss >= best_loss:
            break
        best_loss, best_state, best_epoch = loss, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    loss, chosen_rewards, rejected_rewards = held_out_fit()
    n_held = len(chosen_rewards)
    accuracy = pairwise_accuracy(chosen_rewards, rejected_rewards, [1] * n_held, [0] * n_held)
    return {"held_out_loss": loss, "held_out_accuracy": accuracy, "epochs": epoch, "epoch_kept": best_epoch}


def pairwise_accuracy(rewards_a, rewards_b, truth_a, truth_b) -> float | None:
    """Share of pairs (a, b) that the reward model orders as the truth does: sign(r(a) - r(b)) against
    sign(truth_a - truth_b), each argument [N]. The truth is r* (or a part of it), or a label: 1 for the preferred
    side and 0 for the other. Pairs the truth ties are skipped (None when every pair ties); a tie of r counts one
    half."""
    rewards_a, rewards_b, truth_a, truth_b = (np.asarray(x, dtype=np.float64)
                                              for x in (rewards_a, rewards_b, truth_a, truth_b))
    decided = truth_a != truth_b
    if not decided.any():
        return None
    agree = np.where(rewards_a == rewards_b, 0.5, (rewards_a > rewards_b) == (truth_a > truth_b))
    return float(agree[decided].mean())


if __name__ == "__main__":
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    rm = RewardModel(GPT(GPTConfig(vocab_size=32, dim=32, n_layer=2, n_head=2, n_kv_head=1, ffn_hidden=64,
                                   max_seq_len=16)))
    # a toy preference: a response holding token 5 beats one holding token 6, whatever else it holds
    gen = torch.Generator().manual_seed(0)

    def toy(n):
        rows = torch.randint(7, 32, (n, 6), generator=gen).tolist()
        return [(r[:3], [r[3], 5, r[4]], [r[3], 6, r[5]]) for r in rows]

    history = train_reward_model(rm, toy(128), steps=60, lr=1e-3, batch_size=16)
    prompts, chosen, rejected = zip(*toy(64))
    accuracy = pairwise_accuracy(score(rm, prompts, chosen), score(rm, prompts, rejected), [1] * 64, [0] * 64)
    print(f"train loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}; held-out accuracy {accuracy:.3f}")
