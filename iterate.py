"""
Online iterative RLHF, end to end: SFT pi0, a Bradley-Terry reward model, then T iterations of the main agent /
enhancer loop of "RLHF Workflow" (Dong et al. 2024, Algorithm 2) and "Iterative Preference Learning from Human
Feedback" (Xiong et al. 2024, Algorithm 1), labelled by the synthetic oracle of oracle.py.

    pi0    = SFT on the world's corpus                               (start.py; cached in the run folder)
    r_hat  = Bradley-Terry reward model on L0 oracle-labelled pairs of pi0 samples
    for t in 1..T:
        refit:    (t > 1) r_hat = theta^T phi, theta the MLE on all oracle labels so far (a logistic regression
                  on the first fit's features phi; --rm-refit all refits every weight): epochs until a
                  held-out tenth stops improving
        collect:  n samples per prompt from pi_{t-1} (half at temperature 1.0, half at 0.7), ranked by r_hat;
                  main agent = the best-ranked sample (exploit); enhancer = the pair's other side (explore):
            best-worst : r_hat's worst sample                     (Algorithm 2)
            uncertainty: the sample farthest from the main one in ||phi(a1) - phi(a2)||_{Sigma^-1} (Algorithm 1)
            random     : two samples, no ranking                  (plain online DPO)
            offline    : the same pairs drawn from pi0 up front   (the baseline)
        label:    the oracle draws y ~ Bernoulli(P(main > enhancer)) (or r_hat decides: --labeler rm); a response
                  cut off by the token cap is judged unfinished
        DPO:      pi_t from pi_{t-1} on the new pairs, reference pi0, plain sigmoid DPO (eq. 5): no NLL term,
                  no label smoothing (both are options)
        evaluate: win-rate against pi0, KL(pi_t || pi0) on held-out prompts (evaluate.py)

Simplified on purpose: phi is learnt once, by the first fit, and each refit continues the previous head (as the
theory's linear reward does, the enhancer's Sigma is built from the same phi); the enhancer searches among the n
samples rather than training a second policy.

    python iterate.py                 # the default synthetic world on the CPU, a few minutes
    python iterate.py --help
"""
import contextlib
import copy
import json
import os
import random
import sys
import time
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

import distributed
import dpo
import reward
from evaluate import evaluate, make_held_out, write_evaluation
from lora import AdaptersOff, add_lora, merge_lora, share_frozen
from model import GPT, sample, sample_key
from oracle import Oracle
from rundir import (InputError, Ledger, atomic_save, atomic_write_text, check_run_folder, open_run_folder,
                    set_stream_states, stream_states, trained_state)
from settings import Settings, parse_args
from start import (cached_path, compute_dtype, content_hash, load_cached, make_pi0, pi0_key, pick_device,
                   read_inputs, save_cached)
from train import precision


# ---------------------------------------------------------------------------------------------------------------
# collect: n samples per prompt, ranked, paired by the exploration rule

# a labelled pair as DPO and the reward model take it: (prompt tokens, chosen tokens, rejected tokens)
Preference = tuple[list[int], list[int], list[int]]


class Candidate(NamedTuple):
    """A pair before its label: the main agent's response and the enhancer's, with the scores that ranked them."""
    prompt: str
    prompt_tokens: list[int]
    main: list[int]
    main_text: str
    enhancer: list[int]
    enhancer_text: str
    main_score: float
    enhancer_score: float
    main_finished: bool             # whether the response stopped (False: cut off by the token cap)
    enhancer_finished: bool


def sample_candidates(policy, prompt_tokens, n: int, max_new_tokens: int, stop_ids, keys) -> list[list[list[int]]]:
    """n responses per prompt, half at temperature 1.0 and half at 0.7 (Algorithm 2): a list [P][n]; keys(k) gives
    the P keys of the k-th sample of every prompt. One sampling call per temperature, a prompt's samples side by
    side, so that they share its prefill (GPT.generate) and the batches are large."""
    candidates = [[None] * n for _ in prompt_tokens]
    key_table = [keys(k) for k in range(n)]                                          # [n][P]
    for temperature, samples in ((1.0, range((n + 1) // 2)), (0.7, range((n + 1) // 2, n))):
        rows = [(p, k) for p in range(len(prompt_tokens)) for k in samples]
        if not rows:
            continue
        responses = sample(policy, [prompt_tokens[p] for p, _ in rows], max_new_tokens, temperature, stop_ids,
                           [key_table[k][p] for p, k in rows])
        for (p, k), response in zip(rows, responses):
            candidates[p][k] = response
    return candidates


def best_worst_pairs(scores, texts, per_prompt: int = 1):
    """Main = the best-ranked sample, enhancer = the worst (Algorithm 2); with per_prompt k > 1 also the i-th best
    against the i-th worst for i < k, so more of the n samples are labelled. Pairs whose two sides tie (same text
    or score) are dropped. scores: Tensor [P, n]; texts: [P][n]. Returns (prompt, main, enhancer) index triples."""
    order = scores.argsort(1, descending=True)                                    # [P, n] best first
    triples = []
    for p in range(len(texts)):
        for i in range(min(per_prompt, scores.shape[1] // 2)):
            best, worst = int(order[p, i]), int(order[p, -1 - i])
            if scores[p, best] > scores[p, worst] and texts[p][best] != texts[p][worst]:
                triples.append((p, best, worst))
    return triples


def random_pairs(texts, rng, per_prompt: int = 1):
    """Disjoint pairs of distinct samples per prompt (per_prompt of them, at most n // 2), no ranking: plain
    online DPO. Identical texts are dropped."""
    triples = []
    for p, row in enumerate(texts):
        picks = rng.sample(range(len(row)), 2 * min(per_prompt, len(row) // 2))
        triples += [(p, i, j) for i, j in zip(picks[::2], picks[1::2]) if row[i] != row[j]]
    return triples


def uncertainty_pairs(scores, features, texts, sigma, per_prompt: int = 1):
    """The theory's enhancer (Algorithm 1): main = the reward model's best sample (exploit); enhancer = the sample
    that maximises the uncertainty of the pair, ||phi(main) - phi(a)||_{Sigma^-1} (explore), with
    Sigma = lambda*I + sum over labelled pairs of (phi_w - phi_l)(phi_w - phi_l)^T; with per_prompt k > 1 the
    main sample against each of the k most uncertain ones. scores: [P, n]; features: [P, n, C]; sigma: [C, C]."""
    best = scores.argmax(1)                                                       # [P]
    diff = features[torch.arange(len(texts)), best][:, None, :] - features        # [P, n, C]
    uncertainty = torch.einsum("pnc,cd,pnd->pn", diff, torch.linalg.inv(sigma), diff)  # squared norms [P, n]
    enhancers = uncertainty.argsort(1, descending=True)[:, :min(per_prompt, scores.shape[1] // 2)]  # [P, k]
    return [(p, int(best[p]), int(e)) for p in range(len(texts)) for e in enhancers[p]
            if uncertainty[p, e] > 0 and texts[p][best[p]] != texts[p][e]]


def feature_covariance(rm, pairs: list[Preference], lam: float):
    """Sigma = lambda*I + sum over labelled pairs of d d^T, d = phi(chosen) - phi(rejected), with today's phi."""
    prompts = [p for p, _, _ in pairs]
    phi = reward.embed(rm, prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs])  # [2N, C]
    d = phi[:len(pairs)] - phi[len(pairs):]                                       # [N, C]
    return lam * torch.eye(d.shape[1]) + d.T @ d                                  # [C, C]


def collect(rule, sampler, rm, oracle, prompts, labelled, settings, tokenizer, t: int, rng) -> list[Candidate]:
    """Sample n responses per prompt from `sampler` (iteration t's keys), rank them with the reward model (or r*:
    --rank oracle), and pair (main, enhancer) by the rule; `labelled` are the oracle-labelled pairs so far (Sigma's
    data)."""
    s = settings
    prompt_tokens = [tokenizer.encode_prompt(p, s.chat) for p in prompts]
    keys = lambda k: [sample_key(s.seed, CANDIDATES, t, i, k) for i in range(len(prompts))]
    candidates = sample_candidates(sampler, prompt_tokens, s.n, s.max_new_tokens, tokenizer.stop_ids, keys)
    texts = [[tokenizer.decode_response(r) for r in row] for row in candidates]
    flat_prompts = [pt for pt, row in zip(prompt_tokens, candidates) for _ in row]
    features, scores = reward.embed_and_score(rm, flat_prompts, [r for row in candidates for r in row])
    features, scores = features.view(len(prompts), s.n, -1), scores.view(len(prompts), s.n)  # [P, n, C], [P, n]
    if s.rank == "oracle":  # the upper bound: rank by the truth, paying one query per sample scored
        scores = torch.tensor([[oracle.reward(x, t, tokenizer.stopped(r)) for t, r in zip(texts_row, row)]
                               for x, texts_row, row in zip(prompts, texts, candidates)])
        oracle.queries += scores.numel()
    if rule == "random":
        triples = random_pairs(texts, rng, s.pairs_per_prompt)
    elif rule == "uncertainty":
        sigma = feature_covariance(rm, labelled, s.uncertainty_lambda)
        triples = uncertainty_pairs(scores, features, texts, sigma, s.pairs_per_prompt)
    else:  # best-worst, and offline, which ranks pi0's samples the same way
        triples = best_worst_pairs(scores, texts, s.pairs_per_prompt)
    return [Candidate(prompts[p], prompt_tokens[p], candidates[p][i], texts[p][i], candidates[p][j], texts[p][j],
                      float(scores[p, i]), float(scores[p, j]), tokenizer.stopped(candidates[p][i]),
                      tokenizer.stopped(candidates[p][j])) for p, i, j in triples]


# ---------------------------------------------------------------------------------------------------------------
# label

def label_pairs(candidates: list[Candidate], labeler: str, oracle, rng, ledger: Ledger | None = None,
                iteration: int = 0) -> list[Preference]:
    """The oracle draws y ~ Bernoulli(P(main > enhancer)) (one query each, recorded in the ledger when given), or
    the reward model prefers its higher-scored side (no query; a pair it scores equal says nothing and is dropped,
    as best-worst drops it, whatever the pair rule)."""
    labelled = []
    for c in candidates:
        if labeler == "oracle" and ledger is not None:
            main_wins = ledger.label(oracle, rng, iteration, c.prompt, c.main, c.main_text, c.enhancer,
                                     c.enhancer_text, c.main_finished, c.enhancer_finished)
        elif labeler == "oracle":
            main_wins = oracle.label(c.prompt, c.main_text, c.enhancer_text, rng, c.main_finished,
                                     c.enhancer_finished)
        elif c.main_score == c.enhancer_score:
            continue
        else:
            main_wins = c.main_score > c.enhancer_score
        labelled.append((c.prompt_tokens, c.main, c.enhancer) if main_wins else
                        (c.prompt_tokens, c.enhancer, c.main))
    return labelled


def label_on_main(candidates: list[Candidate], labeler: str, oracle, rng, ledger: Ledger | None,
                  iteration: int) -> list[Preference]:
    """label_pairs on rank 0, the one that holds the ledger; every rank gets its labelled pairs and its count of
    queries (under torchrun; in one process, just label_pairs)."""
    labelled = label_pairs(candidates, labeler, oracle, rng, ledger, iteration) if distributed.is_main() else None
    labelled, oracle.queries = distributed.from_main((labelled, oracle.queries))
    return labelled


# ---------------------------------------------------------------------------------------------------------------
# the reward model: the maximum-likelihood fit on the first oracle labels (of pi0 samples), then on all labels so far

def trainable_copy(pi0):
    """A float32 copy of pi0 whose weights all train; pi0 itself stays frozen in its own dtype."""
    return copy.deepcopy(pi0).float().requires_grad_(True)


def fsdp(settings) -> bool:
    """Whether FSDP2 shards the weights that train across ranks: a Llama checkpoint under torchrun (the world's
    small models train under DDP, each rank with every weight)."""
    return bool(settings.init and distributed.world_size() > 1)


def trainable_policy(pi0, settings):
    """A float32 copy of pi0 to fine-tune in full, sharded across ranks under FSDP2."""
    policy = trainable_copy(pi0)
    return distributed.shard_weights(policy, policy.layers) if fsdp(settings) else policy


def whole_policy(state: dict, config, settings):
    """One plain model (adapters and all) from a sharded policy's state gathered whole (distributed.full_state)."""
    with torch.device("meta"):
        whole = add_lora(GPT(config), settings.lora) if settings.lora else GPT(config)
    whole.load_state_dict(state, assign=True)
    return whole


def make_policy(pi0, settings):
    """(the policy that trains, the DPO reference). Under LoRA: pi0 with float32 adapters, and the same model with
    them switched off (one copy of the weights, sharded across ranks under FSDP2); otherwise a float32 copy of pi0,
    and pi0."""
    if settings.lora:
        policy = add_lora(pi0, settings.lora)
        if fsdp(settings):
            distributed.shard_weights(policy, policy.layers)
        return policy, AdaptersOff(policy)
    return trainable_policy(pi0, settings), pi0


def new_reward_model(pi0, settings, device):
    """r_hat initialised from pi0 with a zero head: every reward starts at 0. Under LoRA its backbone is pi0's
    frozen base itself with adapters of its own (no copy of the base); otherwise a float32 copy of pi0."""
    trainable = None if settings.rm_trainable_layers < 0 else settings.rm_trainable_layers
    backbone = add_lora(share_frozen(pi0), settings.lora) if settings.lora else trainable_copy(pi0)
    rm = reward.RewardModel(backbone, trainable).to(device)
    if fsdp(settings):  # its own shards of the base: on W ranks, 2/W of it per rank with the policy's
        distributed.shard_weights(rm, rm.backbone.layers)
    return rm


def fit_reward_model(rm, labelled: list[Preference], settings, device, head_only: bool = False,
                     features=None) -> dict:
    """The MLE of r_hat on every label in `labelled` (reward.fit_mle): epochs until a held-out tenth of the labels
    stops improving; of its head alone on fixed features with head_only (`features`: phi of both sides of every
    pair, when known). Returns the held-out loss and accuracy and the epochs, for metrics.jsonl."""
    s = settings
    fit = reward.fit_mle(rm, labelled, s.rm_lr, s.rm_batch, s.seed, device, max_epochs=s.rm_max_epochs,
                         head_only=head_only, features=features)
    return {f"rm_{key}": value for key, value in fit.items()}


def rm0_key(settings, tokenizer) -> dict:
    """What the first reward model depends on; --init and --prompts by their contents, not their paths."""
    s = settings
    names = ("chat", "rm_labels", "rm_max_epochs", "rm_batch", "rm_lr", "rm_trainable_layers", "max_new_tokens",
             "oracle_temperature", "lora", "dtype")
    return {"pi0": pi0_key(s, tokenizer), "init": content_hash(s.init), "prompts": content_hash(s.prompts),
            **{name: getattr(s, name) for name in names}}


def make_reward_model(pi0, prompt_source, oracle, tokenizer, settings, device, cache_dir,
                      ledger: Ledger | None = None):
    """r_hat fit to L0 oracle-labelled pairs of pi0 samples (random pairs on training prompts). Cached with its
    labelled pairs (and their ledger lines), which every later refit reuses. Returns (r_hat, its pairs, the fit's
    statistics)."""
    s = settings
    key = rm0_key(s, tokenizer)
    path = cached_path(cache_dir, "rm0", key)
    rm = new_reward_model(pi0, s, device)
    saved = load_cached(path, key, "first reward model")
    if distributed.from_main(saved is not None and ledger is not None and len(saved["ledger"]) != saved["queries"]):
        print(f"{path}: its labels are not in ledger form; rebuilding it")  # (rank 0 holds the ledger)
        saved = None
    if saved is not None:
        distributed.load_state(rm, saved["model"], strict=not s.lora)
        oracle.queries += saved["queries"]
        if ledger is not None:
            ledger.adopt(saved["ledger"])
        return rm.eval(), saved["pairs"], saved["fit"]
    rng = random.Random(s.seed + 1)
    prompts = [rng.choice(prompt_source.train_prompts) for _ in range(s.rm_labels)]
    prompt_tokens = [tokenizer.encode_prompt(p, s.chat) for p in prompts]
    first, second = (sample(pi0, prompt_tokens, s.max_new_tokens, 1.0, tokenizer.stop_ids,
                            [sample_key(s.seed, FIRST_PAIRS, 0, i, k) for i in range(len(prompts))])
                     for k in range(2))
    candidates = [Candidate(p, pt, a, tokenizer.decode_response(a), b, tokenizer.decode_response(b), 0.0, 0.0,
                            tokenizer.stopped(a), tokenizer.stopped(b))
                  for p, pt, a, b in zip(prompts, prompt_tokens, first, second) if a != b]
    first_line = ledger.used if ledger is not None else 0
    labelled = label_on_main(candidates, "oracle", oracle, np.random.default_rng(s.seed + 1), ledger, 0)
    fit = fit_reward_model(rm, labelled, s, device)
    state = distributed.full_state(trained_state(rm, s))  # under FSDP2, gathered on every rank
    if distributed.is_main():  # one query per labelled pair (the caller's oracle may have answered others before)
        save_cached(path, key, model=state, pairs=labelled, queries=len(labelled), fit=fit,
                    ledger=ledger.lines[first_line:ledger.used] if ledger is not None else [])
    return rm.eval(), labelled, fit


def refit_reward_model(rm, rm_start, oracle_pairs: list[Preference], settings, device, features: list):
    """The refit: the MLE on every oracle label so far, of the head alone (--rm-refit head) or of every weight, from
    the previous reward model (warm), or from `rm_start` (pi0 with a fresh head) when given. Returns (r_hat, the
    fit's statistics).

    features: under --rm-refit head, phi of the pairs embedded so far, one (chosen [n, C], rejected [n, C]) group
    per refit, which this one extends by the pairs labelled since the last. The backbone never trains after the
    first fit, so a pair's phi never changes: each pair goes through the network once, not once per refit (the
    groups are kept in the checkpoint, so a resumed run refits on the same numbers)."""
    rm = rm if rm_start is None else share_frozen(rm_start)  # a fresh copy of what trains; a frozen base is shared
    if settings.rm_refit != "head":
        return rm, fit_reward_model(rm, oracle_pairs, settings, device)
    embedded = sum(len(chosen) for chosen, _ in features)
    if embedded < len(oracle_pairs):
        features.append(reward.pair_features(rm, oracle_pairs[embedded:], device))
    phi = tuple(torch.cat(side) for side in zip(*features))                      # ([N, C], [N, C])
    return rm, fit_reward_model(rm, oracle_pairs, settings, device, head_only=True, features=phi)


# ---------------------------------------------------------------------------------------------------------------
# DPO

def train_policy(policy, reference, pairs: list[Preference], settings, device, seed: int) -> dict:
    """One iteration's DPO of `policy` in place, against `reference`: pi0 (the paper), or the previous iterate
    (--reference previous). Returns the statistics a user watches for stability."""
    s = settings
    steps = max(1, round(s.dpo_epochs * len(pairs) / s.dpo_batch))
    history = dpo.train_dpo(policy, pairs, s.beta, steps, s.dpo_lr, s.dpo_batch, s.label_smoothing, s.loss,
                            reference=reference, seed=seed, device=device, warmup=max(1, steps // 10),
                            nll_weight=s.nll_weight)
    return {"dpo_steps": steps, "dpo_loss": history[-1]["loss"],
            "dpo_accuracy": float(np.mean([h["accuracy"] for h in history[-10:]])),
            "chosen_logps_start": history[0]["chosen_logps"], "chosen_logps_end": history[-1]["chosen_logps"],
            "rejected_logps_start": history[0]["rejected_logps"], "rejected_logps_end": history[-1]["rejected_logps"]}


def dpo_stage(policy, pi0, new_pairs: list[Preference], all_pairs: list[Preference], settings, device, t: int):
    """Iteration t's DPO: pi_t from pi_{t-1} on the new pairs (--restart: from pi0 on all pairs so far), against pi0
    or the previous iterate (--reference previous). Returns (pi_t, its statistics); with no pairs (all tied) there
    is nothing to learn from, and the stage is skipped with a logged line."""
    s = settings
    previous, policy = policy, (trainable_policy(pi0, s) if s.restart else policy)
    pairs = all_pairs if s.restart else new_pairs
    if not pairs:
        print(f"iteration {t + 1}: no pairs to train on (all tied); DPO skipped")
        return policy, {"dpo_steps": 0}
    return policy, train_policy(policy, pi0 if s.reference == "pi0" else previous, pairs, s, device, s.seed + t)


# ---------------------------------------------------------------------------------------------------------------
# the loop

# what a sampled response is for: with the seed, the iteration, the prompt's index and the sample's, its key
# (model.sample_key), from which its every draw derives: the same on any number of ranks and at any batch size
FIRST_PAIRS, CANDIDATES, HELD_OUT, EVALUATION = range(1, 5)


def random_streams(seed: int) -> SimpleNamespace:
    """One seeded random stream per use (labels, random pairs), so that a change in one stage leaves the draws of
    the other as they were (sampling draws from keys instead: see FIRST_PAIRS)."""
    return SimpleNamespace(label=np.random.default_rng(seed + 5), pair=random.Random(seed + 6))


def iteration_prompts(train_order: list[str], t: int, m: int) -> list[str]:
    """Iteration t's m prompts: the next chunk of a fixed shuffle of the training prompts, wrapping around."""
    return [train_order[(t * m + i) % len(train_order)] for i in range(m)]


@contextlib.contextmanager
def timed(seconds: dict, key: str):
    """Record the wall time of the block, in seconds to 0.1, as seconds[key]."""
    start_time = time.time()
    yield
    seconds[key] = round(time.time() - start_time, 1)


def run(settings: Settings) -> list[dict]:
    """Algorithm 2 end to end, in the precision --dtype asks for (train.precision); returns the rows written to
    metrics.jsonl."""
    device = distributed.setup(pick_device(settings.device))  # under torchrun: join the ranks (distributed.py)
    try:
        with precision(compute_dtype(settings.dtype, device), device):
            return online_loop(settings, device)
    finally:
        distributed.teardown()


def online_loop(settings: Settings, device) -> list[dict]:
    """Every input is checked before any work; each iteration ends with an atomic checkpoint that --resume
    continues from."""
    s = settings
    torch.manual_seed(s.seed)  # what draws from torch's global generator (LoRA's init, a head's) is seeded too
    if s.threads:
        torch.set_num_threads(s.threads)
    cache_dir = s.cache or s.out
    check_run_folder(s.out, s.resume, s.overwrite)
    world, tokenizer, prompt_source, pi0 = read_inputs(s, device)
    main_rank = distributed.is_main()  # rank 0 alone labels, writes files and prints (always so in one process)
    if fsdp(s) and s.rm_refit_from == "pi0":
        raise InputError("--rm-refit-from pi0 with --init under torchrun is not supported: refits under FSDP2 "
                         "continue the sharded reward model (--rm-refit-from previous)")
    if main_rank:
        open_run_folder(s)
    distributed.barrier()
    print(f"device {device} x {distributed.world_size()}; settings in {os.path.join(s.out, 'config.json')}")
    clock, oracle, metrics = time.time(), Oracle(s.oracle_temperature), []
    ledger = Ledger(os.path.join(s.out, "labels.jsonl")) if main_rank else None
    checkpoint_path = os.path.join(s.out, "checkpoint.pt")

    pi0 = (pi0 if pi0 is not None else make_pi0(world, tokenizer, s, device, cache_dir)).requires_grad_(False)
    pi0_dtype = pi0.tok_embeddings.weight.dtype
    rm, oracle_pairs, rm0_fit = make_reward_model(pi0, prompt_source, oracle, tokenizer, s, device, cache_dir,
                                                  ledger)
    rm_start = new_reward_model(pi0, s, device) if s.rm_refit_from == "pi0" else None  # each refit starts here
    policy, pi0 = make_policy(pi0, s)  # under LoRA, pi0 is the policy with its adapters switched off
    eval_keys = lambda stream, t: [sample_key(s.seed, stream, t, i) for i in range(s.eval_prompts)]
    held_out = make_held_out(pi0, prompt_source.eval_prompts[:s.eval_prompts], tokenizer, oracle, s.chat,
                             s.max_new_tokens, eval_keys(HELD_OUT, 0))
    rngs = random_streams(s.seed)
    train_order = random.Random(s.seed + 7).sample(prompt_source.train_prompts, len(prompt_source.train_prompts))

    def collect_and_label(t, sampler, explored):  # explored: every labelled pair so far (Sigma's data)
        prompts = iteration_prompts(train_order, t, s.prompts_per_iter)
        rule = "best-worst" if s.pairs == "offline" else s.pairs
        candidates = collect(rule, sampler, rm, oracle, prompts, explored, s, tokenizer, t, rngs.pair)
        return label_on_main(candidates, s.labeler, oracle, rngs.label, ledger, t + 1)

    def record(iteration, policy, extra):
        eval_clock = time.time()
        row, samples = evaluate(policy, pi0, rm, held_out, oracle, tokenizer, s.max_new_tokens,
                                eval_keys(EVALUATION, iteration))
        row = {"iteration": iteration, "labels": oracle.queries, **row, **extra,
               "eval_s": round(time.time() - eval_clock, 1), "seconds": round(time.time() - clock, 1)}
        if main_rank:
            write_evaluation(s.out, metrics, row, samples, held_out, oracle, s.show)
        else:
            metrics.append(row)

    pi0_pairs, explored, all_pairs, offline, first = list(oracle_pairs), list(oracle_pairs), [], None, 0
    rm_features = []  # phi of the oracle pairs, for head-only refits (refit_reward_model)
    saved = torch.load(checkpoint_path, weights_only=True) if s.resume and os.path.exists(checkpoint_path) else None
    if saved is not None:  # --resume: back to the end of the last finished iteration, every stream included
        first, metrics[:] = saved["iteration"], saved["metrics"]
        distributed.load_state(policy, saved["policy"], strict=not s.lora)
        distributed.load_state(rm, saved["rm"], strict=not s.lora)
        set_stream_states(rngs, saved["streams"])
        oracle.queries = saved["queries"]
        if main_rank:
            ledger.used = saved["ledger_used"]
        oracle_pairs, explored, all_pairs, offline = (saved["data"][k] for k in ("oracle", "explored", "all",
                                                                                  "offline"))
        rm_features = saved["data"].get("rm_features", [])  # a checkpoint from before it kept them: embedded anew
        clock -= saved["seconds"]
        print(f"resuming {s.out} after iteration {first}")
    if main_rank:
        atomic_write_text(os.path.join(s.out, "metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in metrics))
        with open(os.path.join(s.out, "samples.txt"), "r+b") as f:  # what the lost iteration wrote goes
            f.truncate(saved["samples_bytes"] if saved is not None else 0)

    if first == 0:
        record(0, pi0, rm0_fit)
        if s.pairs == "offline":  # the baseline: the whole label budget spent on pi0's samples before any training
            offline = [collect_and_label(t, pi0, oracle_pairs) for t in range(s.iterations)]
    for t in range(first, s.iterations):
        seconds, rm_fit = {}, {}
        if t > 0 and s.labeler == "oracle" and s.pairs != "offline":
            with timed(seconds, "rm_s"):  # refit: the MLE of the reward model on all oracle labels so far (none
                # after the last iteration: its labels would only rank a next iteration's samples)
                rm, rm_fit = refit_reward_model(rm, rm_start, oracle_pairs, s, device, rm_features)
        with timed(seconds, "pairs_s"):  # collect and label
            new_pairs = offline[t] if s.pairs == "offline" else collect_and_label(t, policy, explored)
            explored += new_pairs
            if s.labeler == "oracle" and s.pairs != "offline":
                oracle_pairs = oracle_pairs + new_pairs
            if s.hybrid:  # the t-th share of the first reward model's pi0 pairs joins this iteration's data
                new_pairs = new_pairs + pi0_pairs[t * len(pi0_pairs) // s.iterations:
                                                  (t + 1) * len(pi0_pairs) // s.iterations]
            all_pairs += new_pairs
        with timed(seconds, "dpo_s"):  # DPO: pi_t from pi_{t-1} (or from pi0 with --restart)
            policy, dpo_stats = dpo_stage(policy, pi0, new_pairs, all_pairs, s, device, t)
        record(t + 1, policy, {"pairs": len(new_pairs), **dpo_stats, **rm_fit, **seconds})
        states = [distributed.full_state(trained_state(model, s)) for model in (policy, rm)]  # every rank gathers
        if main_rank:
            atomic_save({"iteration": t + 1, "policy": states[0], "rm": states[1],
                             "streams": stream_states(rngs), "queries": oracle.queries, "ledger_used": ledger.used,
                             "metrics": metrics,
                             "data": {"oracle": oracle_pairs, "explored": explored, "all": all_pairs,
                                      "offline": offline, "rm_features": rm_features},
                             "samples_bytes": os.path.getsize(os.path.join(s.out, "samples.txt")),
                             "seconds": round(time.time() - clock, 1)}, checkpoint_path)
    save_dtype = pi0_dtype if s.save_dtype == "auto" else getattr(torch, s.save_dtype)
    if fsdp(s):  # every rank gathers the shards (a collective); rank 0 puts the whole policy back together
        state = distributed.full_state(policy.state_dict())
        policy = whole_policy(state, policy.config, s) if main_rank else None
    if main_rank:  # a Hugging Face folder that from_pretrained reads
        if s.lora:
            merge_lora(policy)
        policy.save_pretrained(os.path.join(s.out, "policy"), save_dtype)
    print(f"policy/ saved in {save_dtype} ({'pi0' if s.save_dtype == 'auto' else '--save-dtype'})")
    print(f"done in {time.time() - clock:.0f} s; wrote metrics.jsonl, labels.jsonl, samples.txt, curves.png, "
          f"policy/ in {s.out}")
    return metrics


def main(argv=None) -> list[dict]:
    """The command line: a bad input is one line on stderr and exit status 2, before any work; a loss that turns
    NaN stops the run, keeping the last finished iteration's checkpoint."""
    settings = parse_args(argv)
    say = sys.stderr if os.environ.get("RANK", "0") == "0" else open(os.devnull, "w")  # under torchrun: rank 0
    try:
        return run(settings)
    except InputError as error:
        print(f"iterate.py: error: {error}", file=say)
        raise SystemExit(2) from None
    except FloatingPointError as error:
        print(f"iterate.py: stopped: {error}; the last finished iteration's checkpoint is kept in "
              f"{os.path.join(settings.out, 'checkpoint.pt')} (--resume continues from it)", file=say)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
