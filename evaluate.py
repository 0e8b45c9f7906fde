"""
Evaluation of a policy on held-out prompts: win-rate against pi0, KL(pi || pi0), gold and proxy reward, length,
the reward model's accuracy; the printed line, metrics.jsonl, samples.txt and curves.png.

    KL(pi || pi0) = E_x E_{a ~ pi} [log pi(a|x) - log pi0(a|x)]        (the KL term of RLHF Workflow eq. 2)
    win-rate      = mean over prompts of P(a_pi > a_pi0 | x) = sigmoid(r*(x, a_pi) - r*(x, a_pi0))   (eq. 1)

Both are estimated from one fresh sample of the policy per held-out prompt, drawn at temperature 1.0 with no top-k
(any other setting biases the KL estimate, even below 0). The KL sums log pi - log pi0 over the response tokens,
EOS included, never over padding. pi0's side of each comparison is one fixed sample per prompt, drawn once.

What it simplifies: one sample per prompt (the standard error over prompts is reported beside every mean); the win
is the oracle's Bradley-Terry probability (the soft win-rate), with the hard 0/1 win-rate logged beside it.

    python iterate.py --iterations 1     # evaluates pi0 and one iterate; see metrics.jsonl and curves.png
"""
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

import dpo
import reward
from model import sample
from oracle import hard_win_rate, malformed, soft_win_rate


@dataclass
class HeldOut:
    """The held-out prompts and pi0's fixed reference sample on each."""
    prompts: list[str]
    prompt_tokens: list[list[int]]
    pi0_responses: list[list[int]]
    pi0_texts: list[str]
    pi0_finished: list[bool]      # whether each stopped (False: cut off by the token cap)
    pi0_rewards: list[float]      # r* of pi0's samples
    pi0_parts: list[dict]         # and its parts


def make_held_out(pi0, prompts, tokenizer, oracle, chat, max_new_tokens, keys: list[int]) -> HeldOut:
    """Encode the held-out prompts and draw pi0's reference sample on each (temperature 1.0), prompt i's from
    keys[i] (model.sample_key)."""
    prompt_tokens = [tokenizer.encode_prompt(p, chat) for p in prompts]
    pi0_responses = sample(pi0, prompt_tokens, max_new_tokens, 1.0, tokenizer.stop_ids, keys)
    pi0_texts = [tokenizer.decode_response(r) for r in pi0_responses]
    pi0_finished = [tokenizer.stopped(r) for r in pi0_responses]
    return HeldOut(prompts, prompt_tokens, pi0_responses, pi0_texts, pi0_finished,
                   [oracle.reward(p, t, f) for p, t, f in zip(prompts, pi0_texts, pi0_finished)],
                   [oracle.reward_parts(p, t, f) for p, t, f in zip(prompts, pi0_texts, pi0_finished)])


def kl_estimate(policy, pi0, prompt_tokens, responses) -> torch.Tensor:
    """KL(pi || pi0) per prompt [P] = sum over response tokens (EOS included, never padding) of log pi - log pi0,
    on responses sampled from pi at temperature 1.0 with no top-k. Both sides are teacher-forced the same way, so
    it is exactly 0 when pi is pi0."""
    return (dpo.response_logps(policy, prompt_tokens, responses)
            - dpo.response_logps(pi0, prompt_tokens, responses))                    # [P]


def evaluate(policy, pi0, rm, held_out: HeldOut, oracle, tokenizer, max_new_tokens, keys: list[int]):
    """One fresh sample of the policy per held-out prompt at temperature 1.0 (prompt i's from keys[i]), against
    pi0's fixed sample. Returns (the metrics of the row, the sampled (text, finished) pairs)."""
    prompts, prompt_tokens = held_out.prompts, held_out.prompt_tokens
    responses = sample(policy, prompt_tokens, max_new_tokens, 1.0, tokenizer.stop_ids, keys)
    texts, finished = [tokenizer.decode_response(r) for r in responses], [tokenizer.stopped(r) for r in responses]
    kl = kl_estimate(policy, pi0, prompt_tokens, responses)
    gold = np.array([oracle.reward(p, t, f) for p, t, f in zip(prompts, texts, finished)])
    proxy = reward.score(rm, prompt_tokens, responses)
    against_pi0 = (prompts, texts, held_out.pi0_texts, finished, held_out.pi0_finished)
    win_rate, win_rate_se = soft_win_rate(oracle, *against_pi0)
    # the reward model's held-out accuracy: does it order (policy sample, pi0 sample) as r* does? And as the two
    # parts that ask it to read the prompt do, on the pairs where that part differs?
    proxy_pi0 = reward.score(rm, prompt_tokens, held_out.pi0_responses)
    rm_accuracy = reward.pairwise_accuracy(proxy, proxy_pi0, gold, held_out.pi0_rewards)
    parts = [oracle.reward_parts(p, t, f) for p, t, f in zip(prompts, texts, finished)]
    by_part = {f"rm_accuracy_{k}": reward.pairwise_accuracy(proxy, proxy_pi0, [x[k] for x in parts],
                                                             [x[k] for x in held_out.pi0_parts])
               for k in ("topic", "tone")}
    return {
        "win_rate": win_rate, "win_rate_se": win_rate_se,
        "hard_win_rate": hard_win_rate(oracle, *against_pi0)[0],
        "kl": kl.mean().item(), "kl_se": kl.std().item() / math.sqrt(len(kl)),
        "reward": float(gold.mean()), "proxy_reward": proxy.mean().item(),
        "length": float(np.mean([len(r) for r in responses])),
        "finished": float(np.mean(finished)),
        "malformed": float(np.mean([malformed(t) for t in texts])),
        "rm_accuracy": rm_accuracy, **by_part,
        "topic_share": float(np.mean([x["topic"] >= 1.0 for x in parts])),   # names the asked topic
    }, list(zip(texts, finished))


# ---------------------------------------------------------------------------------------------------------------
# what a run writes and prints

def summary(row) -> str:
    """The line printed after each evaluation."""
    return (f"iter {row['iteration']}: win-rate {row['win_rate']:.3f} ± {row['win_rate_se']:.3f}  "
            f"KL {row['kl']:.2f} ± {row['kl_se']:.2f}  r* {row['reward']:+.2f}  proxy {row['proxy_reward']:+.2f}  "
            f"len {row['length']:.0f}  finished {row['finished']:.2f}  malformed {row['malformed']:.2f}  "
            f"rm-acc {float('nan') if row['rm_accuracy'] is None else row['rm_accuracy']:.2f}  "
            f"labels {row['labels']}  ({row['seconds']:.0f} s)")


def plot_curves(metrics, path):
    """Win-rate and KL against the iteration, and win-rate against KL (the frontier), in one PNG."""
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


def write_evaluation(out, metrics, row, samples, held_out: HeldOut, oracle, show: int):
    """Append the row to metrics.jsonl and `show` samples to samples.txt; redraw curves.png; print the line."""
    metrics.append(row)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    with open(os.path.join(out, "samples.txt"), "a") as f:
        f.write(f"=== iteration {row['iteration']}\n")
        for prompt, (text, finished) in list(zip(held_out.prompts, samples))[:show]:
            cut = "" if finished else "  [cut off]"
            f.write(f"{prompt}\n  r* {oracle.reward(prompt, text, finished):+.2f}  {text}{cut}\n")
    plot_curves(metrics, os.path.join(out, "curves.png"))
    print(summary(row))
