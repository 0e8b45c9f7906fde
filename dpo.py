"""
Direct preference optimisation: sequence log-probs, the DPO loss (and its cDPO and IPO variants), DPO training.

What it owns: `sequence_logps` (the summed log-prob of the response tokens of a padded batch), `response_logps`
(the same, batched and without gradient, for reference caching and KL estimates), `pack_pairs` and `pair_logps`
(both sides of a batch of pairs in one forward pass, the shared prompt computed once), the pure loss functions
`dpo_loss` and `ipo_loss`, and `train_dpo`, which fits a policy to (prompt, chosen, rejected) token lists with
`train.fit`.

The loss (RLHF Workflow eq. 5; Rafailov et al. 2023 eq. 7), with beta playing the KL weight eta of eq. 2:

    h    = [log pi(a_w|x) - log pi0(a_w|x)] - [log pi(a_l|x) - log pi0(a_l|x)]
    loss = -log sigmoid(beta * h)

Log-probs are summed over the response tokens, EOS included (when to stop is part of the response), prompt and
padding excluded.

What it simplifies: the reference log-probs are computed once per data set before training (the reference model
need not be in memory while the policy trains); no gradient accumulation. Plain DPO lets both chosen and rejected
log-probs fall (the history logs both means so the reader can see it); `nll_weight` adds the chosen responses'
per-token NLL (RPO), an option of iterate.py (`--nll-weight`), not its default.

    python dpo.py   # fits a tiny random model to a toy preference and prints the margin and accuracy
"""
import torch
import torch.nn.functional as F

from distributed import data_parallel
from train import fit, map_batches, shuffled_batches


def sequence_logps(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the masked tokens of each row: logits [B, T, V], tokens [B, T], mask [B, T] -> [B];
    mask is bool or any 0/1 dtype.

    logps[b] = sum over t >= 1 of mask[b, t] * log_softmax(logits[b, t-1])[tokens[b, t]]

    - A SUM, not a mean: the sequence log-prob log pi(a|x) that DPO's equation needs.
    - Shifted by one: the logits at position t-1 predict the token at t, so `mask` marks *targets* (the response
      tokens, EOS included); mask[:, 0] is never used, since nothing predicts the first token.
    - Prompt and padding must be False (0) in `mask`; whatever the tokens or logits are there does not count. The
      masked terms are dropped with torch.where, not multiplied by 0, so a NaN or inf at a masked position cannot
      leak into the sum (0 * NaN is NaN). A row with no True (nonzero) target gives exactly 0.
    """
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)                   # [B, T-1, V]
    targets = tokens[:, 1:]                                                    # [B, T-1]
    token_logps = logprobs.gather(-1, targets[..., None]).squeeze(-1)          # [B, T-1]
    return torch.where(mask[:, 1:] != 0, token_logps, torch.zeros_like(token_logps)).sum(-1)


def pack_pairs(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], device="cpu"):
    """One row per pair: the prompt once, then the chosen response, then the rejected one, right-padded to T tokens.
    The rejected response attends to the prompt and to itself, never to the chosen one, and its positions go on
    from the prompt's end, so each response is computed exactly as after its prompt alone, while the prompt, which
    both share, is computed once (the peer benchmark's pairs of 16 + 48 + 48 tokens: 112 a row, against 2 x 64).

    Returns tokens [B, T]; the attention mask [B, T, T] and positions [B, T] that GPT.forward takes for such rows;
    predictor [B, T], the position whose logits predict each token (the prompt's last, for either response's first
    token); and chosen_mask, rejected_mask [B, T], each side's targets (its response tokens)."""
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    B, T = len(prompts), max(lengths)
    tokens = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), 3, dtype=torch.long)  # 0 the prompt, 1 chosen, 2 rejected, 3 padding
    positions = torch.zeros(B, T, dtype=torch.long)
    predictor = torch.zeros(B, T, dtype=torch.long)
    for row, (prompt, good, bad) in enumerate(zip(prompts, chosen, rejected)):
        P, C = len(prompt), len(good)
        tokens[row, :lengths[row]] = torch.tensor(prompt + good + bad, dtype=torch.long)
        segment[row, :P], segment[row, P:P + C], segment[row, P + C:lengths[row]] = 0, 1, 2
        positions[row, :P + C] = torch.arange(P + C)
        positions[row, P + C:lengths[row]] = torch.arange(P, P + len(bad))
        predictor[row, 1:lengths[row]] = torch.arange(lengths[row] - 1)
        predictor[row, P + C] = P - 1  # the rejected response's first token follows the prompt, not the chosen one
    index = torch.arange(T)
    causal = index[None, :] <= index[:, None]                                           # [T, T] query, key
    key_segment, query_segment = segment[:, None, :], segment[:, :, None]
    # a token sees the prompt and its own segment, causally; padding sees only itself (a row of no key would be NaN)
    sees = (key_segment == 0) | (key_segment == query_segment)
    mask = (causal & sees & (query_segment != 3)) | (index[None, :] == index[:, None])
    return tuple(t.to(device) for t in (tokens, mask, positions, predictor, segment == 1, segment == 2))


def pair_logps(model, prompts, chosen, rejected, device="cpu"):
    """(log pi(chosen | prompt) [B], log pi(rejected | prompt) [B]) from one forward pass over packed pairs
    (pack_pairs): the summed log-probs of sequence_logps, with the prompt computed once."""
    tokens, mask, positions, predictor, chosen_mask, rejected_mask = pack_pairs(prompts, chosen, rejected, device)
    logprobs = F.log_softmax(model(tokens, mask, positions=positions).float(), dim=-1)     # [B, T, V]
    rows = torch.arange(len(prompts), device=tokens.device)[:, None]
    token_logps = logprobs[rows, predictor, tokens]                                   # [B, T]
    zero = torch.zeros_like(token_logps)
    return tuple(torch.where(side, token_logps, zero).sum(-1) for side in (chosen_mask, rejected_mask))


# elements of one batch's [rows, tokens, vocabulary] logits in the no-gradient passes: 256 MiB in float32, about
# 640 MiB with their bf16 original and the log-softmax. The world's batches stay far below it; at Llama 3's 128256
# ids it allows 523 tokens a batch
LOGITS_BUDGET = 2**26


def response_logps(model, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 32,
                   device=None) -> torch.Tensor:
    """log pi(response | prompt) for each pair, summed over response tokens: Tensor [N] on the CPU, float32,
    without gradient (`train.map_batches`). Every prompt needs at least one token (a begin token will do):
    otherwise nothing would predict the response's first token."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("response_logps: every prompt needs at least one token (e.g. the begin token)")
    return map_batches(model, lambda tokens, mask, response_mask: sequence_logps(model(tokens, mask), tokens,
                                                                                  response_mask),
                       prompts, responses, batch_size, device, max_tokens=LOGITS_BUDGET // model.config.vocab_size)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0):
    """The DPO loss per example (RLHF Workflow eq. 5), with optional label smoothing (conservative DPO, cDPO).

    All inputs are summed sequence log-probs, Tensor [B]. With h = (pi_c - ref_c) - (pi_r - ref_r) and eps the
    label smoothing (the assumed chance that a label is flipped):

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps = 0 is plain DPO; at policy = reference, h = 0 and the loss is log 2 whatever eps is.
    Returns (losses, chosen_rewards, rejected_rewards), each [B]; the rewards are the implicit rewards
    beta * (log pi - log pi0) of each response, detached (diagnostics only)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             chosen_lengths, rejected_lengths, beta: float = 0.1):
    """The IPO loss per example (Azar et al. 2023, eq. 17), on log-probs AVERAGED over response tokens.

    Inputs are summed sequence log-probs [B] and the number of response tokens of each [B]; as in the IPO paper's
    practice, each log-ratio is divided by its response length (clamped to at least 1, so an empty response gives
    a log-ratio of 0, not NaN). With h = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r:

        loss = (h - 1 / (2 * beta))^2

    A squared loss pulls h to a fixed margin instead of pushing it without bound as DPO does. Returns
    (losses, chosen_rewards, rejected_rewards); the rewards are beta times the averaged log-ratios, detached."""
    chosen_logratios = (policy_chosen_logps - reference_chosen_logps) / chosen_lengths.clamp(min=1)
    rejected_logratios = (policy_rejected_logps - reference_rejected_logps) / rejected_lengths.clamp(min=1)
    h = chosen_logratios - rejected_logratios
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def train_dpo(policy, pairs, beta: float = 0.1, steps: int = 100, lr: float = 5e-5, batch_size: int = 16,
              label_smoothing: float = 0.0, loss: str = "dpo", reference=None,
              seed: int = 0, device="cpu", warmup: int = 0, weight_decay: float = 0.0, grad_clip: float = 1.0,
              ref_batch_size: int = 32, nll_weight: float = 0.0) -> list[dict]:
    """Fit `policy` (in place, on `device`) to `pairs`, a list of (prompt, chosen, rejected) token lists; responses
    end with their stop token when they stopped. Returns one stats dict per step (see `train.fit`).

    The reference log-probs are computed once, before the first update, in batches of `ref_batch_size`, by
    `reference` if given (pi0 while continuing from the previous iterate; for a LoRA policy, the same model with
    its adapters switched off), else by `policy` itself before any update.
    loss: "dpo" (with `label_smoothing` > 0 it is cDPO) or "ipo". nll_weight > 0 adds that times the chosen
    responses' per-token negative log-likelihood (RPO, Pang et al. 2024): it anchors the chosen log-probs, which
    plain DPO lets fall together with the rejected ones, moving mass into malformed text."""
    if loss not in ("dpo", "ipo"):
        raise ValueError(f"unknown loss {loss!r}; choose 'dpo' or 'ipo'")
    if loss == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the DPO loss only, not to IPO")
    prompts = [p for p, _, _ in pairs]
    chosen = [c for _, c, _ in pairs]
    rejected = [r for _, _, r in pairs]
    # chosen and rejected in one list, so the reference sees each batch once: [2N] -> two [N]
    both = response_logps(reference if reference is not None else policy, prompts + prompts, chosen + rejected,
                          ref_batch_size, device).to(device)
    reference_chosen, reference_rejected = both[:len(pairs)], both[len(pairs):]

    net = data_parallel(policy)  # what forward is called on: the policy, or under torchrun its DDP wrapper

    def loss_fn(indices):
        # chosen and rejected through the policy in one forward pass of B packed rows
        batch_chosen, batch_rejected = [chosen[i] for i in indices], [rejected[i] for i in indices]
        policy_chosen, policy_rejected = pair_logps(net, [prompts[i] for i in indices], batch_chosen, batch_rejected,
                                                    device)                          # [B], [B]
        index = torch.tensor(indices, device=device)
        ref_c, ref_r = reference_chosen[index], reference_rejected[index]
        lengths = lambda side: torch.tensor([len(r) for r in side], device=device)    # [B] targets per row
        if loss == "ipo":
            losses, chosen_rewards, rejected_rewards = ipo_loss(
                policy_chosen, policy_rejected, ref_c, ref_r, lengths(batch_chosen), lengths(batch_rejected), beta)
        else:
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen, policy_rejected, ref_c, ref_r, beta, label_smoothing)
        loss_value = losses.mean()
        if nll_weight:
            chosen_tokens = lengths(batch_chosen).clamp(min=1)
            loss_value = loss_value + nll_weight * (-policy_chosen / chosen_tokens).mean()
        stats = {
            "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_logps": policy_chosen.mean().item(),    # both may fall during DPO: watch them
            "rejected_logps": policy_rejected.mean().item(),
        }
        return loss_value, stats

    batches = shuffled_batches(len(pairs), batch_size, seed)
    return fit(policy, loss_fn, batches, steps, lr, warmup, weight_decay, grad_clip, desc=loss)


if __name__ == "__main__":
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=32, dim=32, n_layer=2, n_head=2, n_kv_head=1, ffn_hidden=64, max_seq_len=16))
    # a toy preference: after any prompt, answer token 5 rather than token 6 (then the end token 1)
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(7, 32, (4,), generator=gen).tolist(), [5, 1], [6, 1]) for _ in range(64)]
    history = train_dpo(policy, pairs, beta=0.1, steps=40, lr=1e-3, batch_size=16)
    for step in (0, 9, 19, 39):
        print(f"step {step + 1:2d}: " + ", ".join(f"{k} {v:+.3f}" for k, v in history[step].items()))
