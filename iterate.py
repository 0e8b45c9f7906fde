"""
Online iterative RLHF, end to end: SFT pi0, a Bradley-Terry reward model, then T iterations of the main agent /
enhancer loop of "RLHF Workflow" (Dong et al. 2024, Algorithm 2) and "Iterative Preference Learning from Human
Feedback" (Xiong et al. 2024, Algorithm 1), labelled by the synthetic oracle of oracle.py.

    pi0    = SFT on the world's corpus                               (cached in the run folder)
    r_hat  = Bradley-Terry reward model on L0 oracle-labelled pairs of pi0 samples
    for t in 1..T:
        n samples per prompt from pi_{t-1} (half at temperature 1.0, half at 0.7)
        main agent = the sample r_hat ranks best (exploit); enhancer = the pair's other side (explore):
            best-worst : r_hat's worst sample                     (Algorithm 2)
            uncertainty: the sample farthest from the main one in ||phi(a1) - phi(a2)||_{Sigma^-1} (Algorithm 1)
            random     : two samples, no ranking                  (plain online DPO)
            offline    : the same pairs drawn from pi0 up front   (the baseline)
        label the pairs with the oracle (or with r_hat: --labeler rm), DPO from pi_{t-1} with reference pi0,
        refit r_hat on all oracle labels so far, evaluate on held-out prompts.

Simplified on purpose: the reward model is refit by continuing from its previous weights on all labels so far
(not re-initialised from pi0), and the enhancer searches among the n samples rather than training a second policy.

    python iterate.py                 # the default synthetic world on the CPU, a few minutes
    python iterate.py --help
"""
import argparse
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dpo
import reward
from model import GPT, GPTConfig, add_lora, lora_disabled, merge_lora
from oracle import Oracle, World, hard_win_rate, malformed, soft_win_rate
from tokenizer import Tokenizer
from train import collate, fit, shuffled_batches

PAIR_RULES = ("best-worst", "random", "uncertainty", "offline")
LABELERS = ("oracle", "rm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/default", help="run folder: metrics.jsonl, curves.png, samples.txt")
    run.add_argument("--cache", default=None, help="folder for pi0 and the first reward model (default: --out); "
                                                   "arms that share it share pi0")
    run.add_argument("--seed", type=int, default=0, help="seeds the world, the models and the oracle")
    run.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ckpt = parser.add_argument_group("starting from a Llama 3.x checkpoint instead of SFT on the synthetic world")
    ckpt.add_argument("--init", default=None, help="a Meta or Hugging Face Llama folder: pi0 (its tokenizer.model "
                                                    "or tokenizer.json is used too)")
    ckpt.add_argument("--prompts", default=None, help='a JSON-lines file of {"prompt": ...} to use instead of the '
                                                      "world's prompts (the oracle still judges the text)")
    ckpt.add_argument("--chat", default="auto", choices=("auto", "on", "off"),
                      help="wrap prompts in the Llama 3 chat format (auto: when the tokenizer has it)")
    ckpt.add_argument("--lora", type=int, default=0, help="LoRA rank for the policy (0: train all weights); the "
                                                          "DPO reference is then the same model with adapters off")
    ckpt.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                      help="weights of a loaded checkpoint (auto: bfloat16 on CUDA)")
    ckpt.add_argument("--rope-scaling-factor", type=float, default=None, help="RoPE scaling factor of a Meta folder "
                                                                              "(Llama 3.2 1B/3B: 32)")
    world = parser.add_argument_group("world and pi0 (SFT)")
    world.add_argument("--preset", default="tiny", help="model size: tiny (CPU) or small (GPU)")
    world.add_argument("--sft-examples", type=int, default=20000, help="prompt/response pairs in the SFT corpus")
    world.add_argument("--sft-steps", type=int, default=300, help="SFT optimiser steps (steps, not seconds: a "
                                                                  "seed reproduces pi0)")
    world.add_argument("--sft-batch", type=int, default=16, help="SFT batch size")
    world.add_argument("--sft-lr", type=float, default=4e-3, help="SFT peak learning rate")
    world.add_argument("--max-new-tokens", type=int, default=28, help="cap on sampled response tokens (28 words "
                       "cut the corpus's rambles, 13 %% of its responses)")
    rm = parser.add_argument_group("reward model")
    rm.add_argument("--rm-labels", type=int, default=1024, help="oracle-labelled pi0 pairs for the first reward "
                                                                "model (L0; counted in labels spent)")
    rm.add_argument("--rm-steps", type=int, default=150, help="reward-model steps per fit")
    rm.add_argument("--rm-refit-steps", type=int, default=30, help="steps of each per-iteration refit (continues "
                                                                    "from the previous reward model)")
    rm.add_argument("--rm-batch", type=int, default=32, help="reward-model batch size (pairs)")
    rm.add_argument("--rm-trainable-layers", type=int, default=-1, help="top blocks of the pi0 backbone the "
                                                                          "reward model fine-tunes (-1: all)")
    rm.add_argument("--rm-lr", type=float, default=1e-3, help="reward-model peak learning rate")
    online = parser.add_argument_group("online loop")
    online.add_argument("--iterations", type=int, default=5, help="T, the number of online iterations")
    online.add_argument("--prompts-per-iter", type=int, default=192, help="m, prompts (so at most m pairs) per "
                                                                         "iteration")
    online.add_argument("--n", type=int, default=8, help="samples per prompt (half at temperature 1.0, half 0.7)")
    online.add_argument("--pairs", default="best-worst", help=f"exploration rule: {', '.join(PAIR_RULES)}")
    online.add_argument("--pairs-per-prompt", type=int, default=2, help="k, labelled pairs per prompt, at most n/2 "
                        "(best-worst: the i-th best against the i-th worst for i < k; random: k disjoint pairs; "
                        "uncertainty: the best against the k most uncertain; the paper: 1)")
    online.add_argument("--rank", default="rm", choices=("rm", "oracle"), help="who ranks the n samples: the reward "
                        "model, or r* itself (the enhancer's upper bound; each sample scored costs one query)")
    online.add_argument("--hybrid", action="store_true", help="keep the first reward model's oracle-labelled pi0 "
                        "pairs in the DPO data too, an equal share in each iteration (the hybrid batch)")
    online.add_argument("--labeler", default="oracle", help="who labels the pairs: oracle (queries counted) or rm "
                                                            "(the reward model, the paper's practice)")
    online.add_argument("--uncertainty-lambda", type=float, default=1.0, help="lambda of Sigma = lambda*I + sum "
                                                                              "of pair feature outer products")
    online.add_argument("--restart", action="store_true", help="each iteration trains from pi0 on all pairs so "
                                                                "far (default: from the previous iterate on the "
                                                                "new pairs)")
    online.add_argument("--reference", default="pi0", choices=("pi0", "previous"), help="DPO reference policy")
    d = parser.add_argument_group("DPO")
    d.add_argument("--loss", default="dpo", choices=("dpo", "ipo"), help="preference loss")
    d.add_argument("--beta", type=float, default=0.1, help="KL weight beta (eta in the papers)")
    d.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO's label noise epsilon")
    d.add_argument("--nll-weight", type=float, default=5.0, help="weight of the chosen responses' per-token NLL "
                                                                 "added to the loss (RPO); 0 is plain DPO")
    d.add_argument("--dpo-epochs", type=float, default=4.0, help="passes over each iteration's pairs")
    d.add_argument("--dpo-batch", type=int, default=16, help="pairs per DPO step")
    d.add_argument("--dpo-lr", type=float, default=6e-4, help="DPO peak learning rate")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-prompts", type=int, default=384, help="held-out prompts for win-rate and KL")
    ev.add_argument("--show", type=int, default=4, help="sample responses written per iteration")
    args = parser.parse_args(argv)
    if args.pairs not in PAIR_RULES:
        parser.error(f"--pairs: unknown rule {args.pairs!r}; choose one of {', '.join(PAIR_RULES)}")
    if args.labeler not in LABELERS:
        parser.error(f"--labeler: unknown labeler {args.labeler!r}; choose one of {', '.join(LABELERS)}")
    if args.n < 2:
        parser.error(f"--n must be at least 2 to form a pair, got {args.n}")
    if args.pairs_per_prompt < 1:
        parser.error(f"--pairs-per-prompt must be at least 1, got {args.pairs_per_prompt}")
    if args.lora and args.restart:
        parser.error("--restart with --lora is not supported: the adapters are the policy's only trained weights")
    return args


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# text <-> tokens

def encode_prompt(tokenizer: Tokenizer, prompt: str, chat: str = "off") -> list[int]:
    """The world's format is begin-of-text, the prompt, a newline; a Llama 3 Instruct model gets its chat format
    (chat "on", or "auto" when the tokenizer has the header tokens)."""
    if chat == "on" or (chat == "auto" and "<|start_header_id|>" in tokenizer.special_tokens):
        return tokenizer.encode_chat([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt + "\n", bos=True)


def decode_response(tokenizer: Tokenizer, response: list[int]) -> str:
    """The text the oracle judges: the stop token is not text, so a stopped and a truncated response differ only
    in how the text ends (the oracle's `finished` part)."""
    return tokenizer.decode([t for t in response if t not in tokenizer.stop_ids])


# ---------------------------------------------------------------------------------------------------------------
# SFT: pi0

def sft_loss(model, tokens, mask, response_mask):
    """Next-token cross-entropy on response tokens only; the prompt is context."""
    logits = model(tokens, mask)[:, :-1]                  # [B, T-1, V] predicts tokens[:, 1:]
    targets, counted = tokens[:, 1:], response_mask[:, 1:]
    return F.cross_entropy(logits[counted], targets[counted])


def sft_corpus_tokens(world, tokenizer, args):
    """The world's SFT corpus as (prompt tokens, response tokens + end token) pairs; a rambling response is cut
    where sampling would cut it."""
    return [(encode_prompt(tokenizer, prompt, args.chat), tokenizer.encode(response, eos=True)[:args.max_new_tokens])
            for prompt, response in world.sft_corpus(args.sft_examples, seed=args.seed)]


def train_sft(model, corpus, args, device):
    prompts, responses = zip(*corpus)
    batches = (collate([prompts[i] for i in idx], [responses[i] for i in idx], device)
               for idx in shuffled_batches(len(corpus), args.sft_batch, args.seed))
    history = fit(model, lambda batch: (sft_loss(model, *batch), {}), batches, args.sft_steps, args.sft_lr,
                  warmup=args.sft_steps // 20, weight_decay=0.1, desc="SFT pi0", device=device)
    return history[-1]["loss"]


def save_model(model, path, key):
    torch.save({"key": key, "config": asdict(model.config), "model": model.state_dict()}, path)


def load_cached(path, key, what):
    """A cached model if its settings match `key`; None (with a logged reason) otherwise."""
    if not os.path.exists(path):
        return None
    saved = torch.load(path, weights_only=True, map_location="cpu")
    if saved.get("key") != key:
        print(f"{path}: cached {what} was built with other settings; rebuilding it "
              f"(cached {saved.get('key')}, wanted {key})")
        return None
    print(f"{path}: reusing the cached {what}")
    return saved


def pi0_key(args, tokenizer) -> dict:
    """The settings pi0 depends on: a cached pi0 is reused only when all of them match."""
    settings = ("seed", "preset", "sft_examples", "sft_steps", "sft_batch", "sft_lr", "max_new_tokens")
    return {"tokenizer": f"{tokenizer.model.name}, {tokenizer.n_vocab} ids", **{k: getattr(args, k) for k in settings}}


def world_tokenizer() -> Tokenizer:
    """The synthetic world's word-level tokenizer, fit on every prompt as encode_prompt writes it and on 2000
    corpus responses (the same for every seed: the phrase book is fixed, and 2000 responses hold all its words)."""
    world = World(seed=0)
    texts = [prompt + "\n" for prompt in world.prompts] + [response for _, response in world.sft_corpus(2000, seed=0)]
    return Tokenizer.from_texts(texts, name="world words")


def make_pi0(world, tokenizer, args, device, cache_dir):
    key = pi0_key(args, tokenizer)
    path = os.path.join(cache_dir, "pi0.pt")
    torch.manual_seed(args.seed)
    saved = load_cached(path, key, "pi0")
    config = GPTConfig.preset(args.preset, vocab_size=tokenizer.n_vocab)
    model = GPT(config if saved is None else GPTConfig(**saved["config"])).to(device)
    if saved is not None:
        model.load_state_dict(saved["model"])
        return model.eval()
    corpus = sft_corpus_tokens(world, tokenizer, args)
    start = time.time()
    loss = train_sft(model, corpus, args, device)
    print(f"SFT: {args.sft_steps} steps in {time.time() - start:.1f} s, final loss {loss:.3f}")
    save_model(model, path, key)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# sampling, ranking and pairing

def sample(policy, prompt_tokens, temperature, args, generator, chunk=1024):
    """One response per prompt (token lists, a stopped one ends with its stop id), in chunks to bound memory."""
    responses = []
    for start in range(0, len(prompt_tokens), chunk):
        responses += policy.generate(prompt_tokens[start:start + chunk], args.max_new_tokens, temperature,
                                     stop_ids=args.stop_ids, generator=generator)
    return responses


def sample_candidates(policy, prompt_tokens, args, generator):
    """n responses per prompt, half at temperature 1.0 and half at 0.7 (Algorithm 2): a list [P][n]."""
    candidates = [[] for _ in prompt_tokens]
    for k in tqdm(range(args.n), desc="sampling", leave=False):
        temperature = 1.0 if k < (args.n + 1) // 2 else 0.7
        for row, response in enumerate(sample(policy, prompt_tokens, temperature, args, generator)):
            candidates[row].append(response)
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


def feature_covariance(rm, pairs, lam):
    """Sigma = lambda*I + sum over labelled pairs of d d^T, d = phi(chosen) - phi(rejected), with today's phi."""
    prompts = [p for p, _, _ in pairs]
    phi = reward.embed(rm, prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs])  # [2N, C]
    d = phi[:len(pairs)] - phi[len(pairs):]                                       # [N, C]
    return lam * torch.eye(d.shape[1]) + d.T @ d                                  # [C, C]


def make_pairs(rule, policy_for_samples, rm, oracle, prompts, prompt_tokens, labelled, args, tokenizer, generator,
               rng):
    """Sample n responses per prompt, rank them with the reward model (or r*: --rank oracle), pick (main,
    enhancer) by the rule.
    Returns (prompt text, prompt tokens, main tokens, main text, enhancer tokens, enhancer text, main score,
    enhancer score) tuples."""
    candidates = sample_candidates(policy_for_samples, prompt_tokens, args, generator)
    texts = [[decode_response(tokenizer, r) for r in row] for row in candidates]
    flat_prompts = [pt for pt, row in zip(prompt_tokens, candidates) for _ in row]
    flat_responses = [r for row in candidates for r in row]
    # one forward gives both phi and the reward, r = head(phi)
    features = reward.embed(rm, flat_prompts, flat_responses).view(len(prompts), args.n, -1)      # [P, n, C]
    with torch.no_grad():
        scores = rm.head(features.to(rm.head.weight.device)).squeeze(-1).float().cpu()           # [P, n]
    if args.rank == "oracle":  # the upper bound: rank by the truth, paying one query per sample scored
        scores = torch.tensor([[oracle.reward(x, t) for t in row] for x, row in zip(prompts, texts)])
        oracle.queries += scores.numel()
    if rule == "random":
        triples = random_pairs(texts, rng, args.pairs_per_prompt)
    elif rule == "uncertainty":
        sigma = feature_covariance(rm, labelled, args.uncertainty_lambda)
        triples = uncertainty_pairs(scores, features, texts, sigma, args.pairs_per_prompt)
    else:  # best-worst, and offline, which ranks pi0's samples the same way
        triples = best_worst_pairs(scores, texts, args.pairs_per_prompt)
    return [(prompts[p], prompt_tokens[p], candidates[p][i], texts[p][i], candidates[p][j], texts[p][j],
             float(scores[p, i]), float(scores[p, j])) for p, i, j in triples]


def label_pairs(pairs, labeler, oracle, rng):
    """(prompt tokens, chosen, rejected) triples: the oracle draws y ~ Bernoulli(P(main > enhancer)) (one query
    each), or the reward model prefers its higher-scored side (no query; a pair it scores equal says nothing and
    is dropped, as best-worst drops it, whatever the pair rule)."""
    labelled = []
    for prompt, prompt_tokens, main, main_text, enhancer, enhancer_text, main_score, enhancer_score in pairs:
        if labeler == "oracle":
            main_wins = oracle.label(prompt, main_text, enhancer_text, rng)
        elif main_score == enhancer_score:
            continue
        else:
            main_wins = main_score > enhancer_score
        labelled.append((prompt_tokens, main, enhancer) if main_wins else (prompt_tokens, enhancer, main))
    return labelled


# ---------------------------------------------------------------------------------------------------------------
# the first reward model, trained on oracle labels of pi0 samples

def make_reward_model(pi0, world, oracle, tokenizer, args, device, cache_dir):
    """r_hat initialised from pi0 and fit to L0 oracle-labelled pairs of pi0 samples (random pairs on training
    prompts). Cached with its labelled pairs, which every later refit reuses."""
    settings = ("init", "prompts", "chat", "rm_labels", "rm_steps", "rm_batch", "rm_lr", "rm_trainable_layers",
                "max_new_tokens")
    key = {"pi0": pi0_key(args, tokenizer), **{k: getattr(args, k) for k in settings}}
    path = os.path.join(cache_dir, "rm0.pt")
    trainable = None if args.rm_trainable_layers < 0 else args.rm_trainable_layers
    rm = reward.RewardModel(copy.deepcopy(pi0), trainable).to(device)
    saved = load_cached(path, key, "first reward model")
    if saved is not None:
        rm.load_state_dict(saved["model"])
        oracle.queries += saved["queries"]
        return rm.eval(), saved["pairs"]
    rng = random.Random(args.seed + 1)
    prompts = [rng.choice(world.train_prompts) for _ in range(args.rm_labels)]
    prompt_tokens = [encode_prompt(tokenizer, p, args.chat) for p in prompts]
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    first, second = (sample(pi0, prompt_tokens, 1.0, args, generator) for _ in range(2))
    pairs = [(p, pt, a, decode_response(tokenizer, a), b, decode_response(tokenizer, b), 0.0, 0.0)
             for p, pt, a, b in zip(prompts, prompt_tokens, first, second) if a != b]
    labelled = label_pairs(pairs, "oracle", oracle, np.random.default_rng(args.seed + 1))
    fit_reward_model(rm, labelled, args, device, args.rm_steps)
    # one query per labelled pair (the caller's oracle may have answered others before)
    torch.save({"key": key, "model": rm.state_dict(), "pairs": labelled, "queries": len(labelled)}, path)
    return rm.eval(), labelled


def fit_reward_model(rm, labelled, args, device, steps):
    history = reward.train_reward_model(rm, labelled, steps, args.rm_lr, args.rm_batch, args.seed,
                                        device, weight_decay=0.0, warmup=steps // 10)
    return float(np.mean([h["accuracy"] for h in history[-20:]]))


# ---------------------------------------------------------------------------------------------------------------
# evaluation on held-out prompts

def kl_estimate(policy, pi0, prompt_tokens, responses):
    """KL(pi || pi0) per prompt = sum over response tokens (EOS included, never padding) of log pi - log pi0, on
    responses sampled from pi at temperature 1.0 with no top-k (any other setting biases it, even negative).
    Both sides are teacher-forced the same way, so it is exactly 0 when pi is pi0."""
    return (dpo.response_logps(policy, prompt_tokens, responses)
            - dpo.response_logps(pi0, prompt_tokens, responses))                    # [P]


def evaluate(policy, pi0, rm, evaluation, args, tokenizer, oracle, generator):
    """One fresh sample of the policy per held-out prompt at temperature 1.0, against pi0's fixed sample."""
    prompts, prompt_tokens, pi0_texts = evaluation["prompts"], evaluation["prompt_tokens"], evaluation["pi0_texts"]
    responses = sample(policy, prompt_tokens, 1.0, args, generator)
    texts = [decode_response(tokenizer, r) for r in responses]
    kl = kl_estimate(policy, pi0, prompt_tokens, responses)
    gold = np.array([oracle.reward(p, t) for p, t in zip(prompts, texts)])
    proxy = reward.score(rm, prompt_tokens, responses)
    win_rate, win_rate_se = soft_win_rate(oracle, prompts, texts, pi0_texts)
    # the reward model's held-out accuracy: does it order (policy sample, pi0 sample) as r* does? (r* ties skipped)
    gold_pi0 = np.array(evaluation["pi0_rewards"])
    proxy_pi0 = evaluation["pi0_proxy"](rm)
    decided = gold != gold_pi0
    agree = (gold > gold_pi0) == (proxy.numpy() > proxy_pi0.numpy())
    rm_accuracy = float(np.mean(agree[decided])) if decided.any() else None
    return {
        "win_rate": win_rate, "win_rate_se": win_rate_se,
        "hard_win_rate": hard_win_rate(oracle, prompts, texts, pi0_texts)[0],
        "kl": kl.mean().item(), "kl_se": kl.std().item() / math.sqrt(len(kl)),
        "reward": float(gold.mean()), "proxy_reward": proxy.mean().item(),
        "length": float(np.mean([len(r) for r in responses])),
        "finished": float(np.mean([len(r) > 0 and r[-1] in args.stop_ids for r in responses])),
        "malformed": float(np.mean([malformed(t) for t in texts])),
        "rm_accuracy": rm_accuracy,
    }, texts


def make_evaluation(pi0, world, tokenizer, oracle, args, device):
    """The held-out prompts and pi0's fixed reference sample on each (temperature 1.0)."""
    prompts = world.eval_prompts[:args.eval_prompts]
    prompt_tokens = [encode_prompt(tokenizer, p, args.chat) for p in prompts]
    generator = torch.Generator(device=device).manual_seed(args.seed + 2)
    pi0_responses = sample(pi0, prompt_tokens, 1.0, args, generator)
    pi0_texts = [decode_response(tokenizer, r) for r in pi0_responses]
    return {"prompts": prompts, "prompt_tokens": prompt_tokens, "pi0_texts": pi0_texts,
            "pi0_rewards": [oracle.reward(p, t) for p, t in zip(prompts, pi0_texts)],
            "pi0_proxy": lambda rm: reward.score(rm, prompt_tokens, pi0_responses)}


def plot_curves(metrics, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    iterations = [m["iteration"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series = [("win_rate", "win-rate vs pi0 (soft)"), ("kl", "KL(pi || pi0), nats")]
    for ax, (key, label) in zip(axes, series):
        ax.errorbar(iterations, [m[key] for m in metrics], yerr=[m[key + "_se"] for m in metrics], marker="o")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[2].plot([m["kl"] for m in metrics], [m["win_rate"] for m in metrics], marker="o")
    for m in metrics:
        axes[2].annotate(str(m["iteration"]), (m["kl"], m["win_rate"]), textcoords="offset points", xytext=(4, 4))
    axes[2].set_xlabel("KL(pi || pi0), nats")
    axes[2].set_ylabel("win-rate vs pi0")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_prompts(path: str) -> list[str]:
    """Prompts from a JSON-lines file, one {"prompt": "..."} per line; blank lines are skipped."""
    prompts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{number}: expected an object with a string "prompt"')
            prompts.append(record["prompt"])
    if len(prompts) < 4:
        raise ValueError(f"{path}: needs at least 4 prompts (training and held-out), found {len(prompts)}")
    return prompts


def file_prompts(path: str, n_eval: int, seed: int) -> SimpleNamespace:
    """A seeded split of a prompt file: held-out prompts for evaluation, the rest for training."""
    prompts = load_prompts(path)
    random.Random(seed).shuffle(prompts)
    n_eval = min(n_eval, len(prompts) // 2)
    return SimpleNamespace(eval_prompts=prompts[:n_eval], train_prompts=prompts[n_eval:])


def load_start(args, device, cache_dir):
    """The tokenizer, the prompts and pi0: SFT on the synthetic world (cached), or a Llama checkpoint."""
    world = World(seed=args.seed)
    prompt_source = world if args.prompts is None else file_prompts(args.prompts, args.eval_prompts, args.seed)
    if args.init is None:
        tokenizer = world_tokenizer()
        return tokenizer, prompt_source, make_pi0(world, tokenizer, args, device, cache_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = Tokenizer.from_pretrained(args.init)
    pi0 = GPT.from_pretrained(args.init, dtype=dtype, device=device, rope_scaling_factor=args.rope_scaling_factor)
    try:
        tokenizer.check_fits(pi0.config.vocab_size)
    except ValueError as error:
        raise ValueError(f"{args.init}: {error}") from None
    print(f"pi0 from {args.init}: {pi0.num_params() / 1e6:.1f} M parameters, {dtype}")
    return tokenizer, prompt_source, pi0.eval()


class AdaptersOff(torch.nn.Module):
    """pi0 as the LoRA policy with its adapters switched off: the DPO reference without a second copy."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, *args, **kwargs):
        with lora_disabled(self.policy):
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with lora_disabled(self.policy):
            return self.policy.generate(*args, **kwargs)


def train_policy(policy, pi0, pairs, args, device, seed):
    """One iteration's DPO from the current policy; the reference is pi0 (the paper) or the policy as it was before
    this update (--reference previous). Returns the statistics a user watches for stability."""
    reference = pi0 if args.reference == "pi0" else None  # None: train_dpo uses the policy before any update
    steps = max(1, round(args.dpo_epochs * len(pairs) / args.dpo_batch))
    history = dpo.train_dpo(policy, pairs, args.beta, steps, args.dpo_lr, args.dpo_batch, args.label_smoothing,
                            args.loss, reference=reference, seed=seed, device=device, warmup=max(1, steps // 10),
                            nll_weight=args.nll_weight)
    return {"dpo_steps": steps, "dpo_loss": history[-1]["loss"],
            "dpo_accuracy": float(np.mean([h["accuracy"] for h in history[-10:]])),
            "chosen_logps_start": history[0]["chosen_logps"], "chosen_logps_end": history[-1]["chosen_logps"],
            "rejected_logps_start": history[0]["rejected_logps"], "rejected_logps_end": history[-1]["rejected_logps"]}


# ---------------------------------------------------------------------------------------------------------------
# the loop

def summary(row):
    return (f"iter {row['iteration']}: win-rate {row['win_rate']:.3f} ± {row['win_rate_se']:.3f}  "
            f"KL {row['kl']:.2f} ± {row['kl_se']:.2f}  r* {row['reward']:+.2f}  proxy {row['proxy_reward']:+.2f}  "
            f"len {row['length']:.0f}  finished {row['finished']:.2f}  malformed {row['malformed']:.2f}  "
            f"rm-acc {float('nan') if row['rm_accuracy'] is None else row['rm_accuracy']:.2f}  "
            f"labels {row['labels']}  ({row['seconds']:.0f} s)")


def write_evaluation(out, metrics, row, texts, evaluation, oracle, show):
    """Append the row to metrics.jsonl and a few samples to samples.txt; redraw curves.png."""
    metrics.append(row)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    with open(os.path.join(out, "samples.txt"), "a") as f:
        f.write(f"=== iteration {row['iteration']}\n")
        for prompt, text in list(zip(evaluation["prompts"], texts))[:show]:
            f.write(f"{prompt}\n  r* {oracle.reward(prompt, text):+.2f}  {text}\n")
    plot_curves(metrics, os.path.join(out, "curves.png"))
    print(summary(row))


def collect_pairs(t, policy, pi0, rm, oracle, oracle_pairs, prompts_for, args, tokenizer, rngs):
    """Iteration t's labelled pairs. The offline baseline draws them from pi0 (all before any training, so the
    policy never moves the data); the online rules from the current policy."""
    prompts, prompt_tokens = prompts_for(t)
    rule, sampler = ("best-worst", pi0) if args.pairs == "offline" else (args.pairs, policy)
    pairs = make_pairs(rule, sampler, rm, oracle, prompts, prompt_tokens, oracle_pairs, args, tokenizer, rngs.sample,
                       rngs.pair)
    return label_pairs(pairs, args.labeler, oracle, rngs.label)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    for folder in (args.out, args.cache or args.out):
        os.makedirs(folder, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    for name in ("metrics.jsonl", "samples.txt"):
        open(os.path.join(args.out, name), "w").close()
    print(f"device {device}; settings in {os.path.join(args.out, 'config.json')}")
    start, oracle, metrics = time.time(), Oracle(), []

    tokenizer, prompt_source, pi0 = load_start(args, device, args.cache or args.out)
    args.stop_ids = tokenizer.stop_ids
    rm, oracle_pairs = make_reward_model(pi0, prompt_source, oracle, tokenizer, args, device, args.cache or args.out)
    policy = copy.deepcopy(pi0)
    if args.lora:  # the policy trains adapters only; pi0 is the same weights with the adapters switched off
        policy = add_lora(pi0, args.lora)
        pi0 = AdaptersOff(policy)
    evaluation = make_evaluation(pi0, prompt_source, tokenizer, oracle, args, device)
    rngs = SimpleNamespace(eval=torch.Generator(device=device).manual_seed(args.seed + 3),
                           sample=torch.Generator(device=device).manual_seed(args.seed + 4),
                           label=np.random.default_rng(args.seed + 5), pair=random.Random(args.seed + 6))
    train_order = random.Random(args.seed + 7).sample(prompt_source.train_prompts, len(prompt_source.train_prompts))

    def prompts_for(t):  # iteration t's prompts: the next chunk of a fixed shuffle of the training prompts
        chunk = [train_order[(t * args.prompts_per_iter + i) % len(train_order)] for i in range(args.prompts_per_iter)]
        return chunk, [encode_prompt(tokenizer, p, args.chat) for p in chunk]

    def record(iteration, policy, extra):
        clock = time.time()
        row, texts = evaluate(policy, pi0, rm, evaluation, args, tokenizer, oracle, rngs.eval)
        row = {"iteration": iteration, "labels": oracle.queries, **row, **extra,
               "eval_s": round(time.time() - clock, 1), "seconds": round(time.time() - start, 1)}
        write_evaluation(args.out, metrics, row, texts, evaluation, oracle, args.show)

    record(0, pi0, {})
    if args.pairs == "offline":  # the whole label budget spent on pi0's samples before any training
        offline = [collect_pairs(t, policy, pi0, rm, oracle, oracle_pairs, prompts_for, args, tokenizer, rngs)
                   for t in range(args.iterations)]
    pi0_pairs, all_pairs = list(oracle_pairs), []
    for t in range(args.iterations):
        clock = time.time()
        if args.pairs == "offline":
            new_pairs = offline[t]
        else:
            new_pairs = collect_pairs(t, policy, pi0, rm, oracle, oracle_pairs, prompts_for, args, tokenizer, rngs)
            oracle_pairs = oracle_pairs + (new_pairs if args.labeler == "oracle" else [])
        if args.hybrid:  # the t-th share of the first reward model's pi0 pairs joins this iteration's data
            new_pairs = new_pairs + pi0_pairs[t * len(pi0_pairs) // args.iterations:
                                              (t + 1) * len(pi0_pairs) // args.iterations]
        all_pairs += new_pairs
        seconds = {"pairs_s": time.time() - clock}
        if args.restart:
            policy = copy.deepcopy(pi0)
        clock = time.time()
        dpo_stats = train_policy(policy, pi0, all_pairs if args.restart else new_pairs, args, device, args.seed + t)
        seconds["dpo_s"], clock = time.time() - clock, time.time()
        rm_fit_accuracy = None
        if args.labeler == "oracle" and args.pairs != "offline":  # the MLE on all oracle labels so far
            rm_fit_accuracy = fit_reward_model(rm, oracle_pairs, args, device, args.rm_refit_steps)
        seconds["rm_s"] = time.time() - clock
        record(t + 1, policy, {"pairs": len(new_pairs), **dpo_stats, "rm_fit_accuracy": rm_fit_accuracy,
                               **{k: round(v, 1) for k, v in seconds.items()}})
    if args.lora:
        merge_lora(policy)
    policy.save_pretrained(os.path.join(args.out, "policy"))  # a Hugging Face folder GPT.from_pretrained reads
    print(f"done in {time.time() - start:.0f} s; wrote metrics.jsonl, samples.txt, curves.png, policy/ in {args.out}")
    return metrics


if __name__ == "__main__":
    main()
