"""
Speed and headroom numbers for the CPU default, printed (timings live here, never in tests).

1. training tokens/s of the `tiny` preset, and pairs/s of reward-model training on pairs of the world's lengths;
2. sampling tokens/s at 64 new tokens with the KV cache and without it (every token re-runs the whole sequence);
3. SFT wall time at iterate.py's defaults, and pi0's gold-reward distribution on held-out prompts: mean, 10th and
   90th percentile, the share that finish with the end token, the share of distinct responses, and the best gold
   reward among 64 samples per prompt (the headroom above pi0).

    python bench.py                       # trains pi0 with iterate.py's defaults (about a minute on 2 cores)
    python bench.py --pi0 runs/default/pi0-<key>.pt   # or measures a cached pi0
    python bench.py --run runs/default          # where a finished run's gain comes from (see `diagnose_run`)
    python bench.py --json bench.json           # the speed figures, also written as JSON

4. the stages of one online iteration at iterate.py's defaults (iteration 2, the first with a reward-model refit):
   refit, collect and label, DPO, evaluation, in seconds.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

import iterate
import reward
import start
from dpo import response_logps
from evaluate import kl_estimate
from iterate import rm0_key
from model import GPT, GPTConfig, sample, sample_key
from oracle import REWARD_MAX, Oracle, World, reward_parts
from settings import Settings


def training_speed(config, batch=16, length=128, steps=10):
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (batch, length))
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            clock = time.time()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch * (length - 1) / (time.time() - clock)


def reward_training_speed(config, batch=32, prompt_length=11, steps=10):
    """Pairs per second of reward-model training (the refits: most of a default run) on pairs shaped like the
    world's: an 11-token prompt, responses of 4 to 28 tokens."""
    rm = reward.RewardModel(GPT(config))
    lengths = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(0, config.vocab_size, (prompt_length,)).tolist(),
              *(torch.randint(0, config.vocab_size, (int(n),)).tolist()
                for n in torch.randint(4, 29, (2,), generator=lengths))) for _ in range(batch * (steps + 2))]
    reward.train_reward_model(rm, pairs[:2 * batch], steps=2, batch_size=batch)  # two warm-up steps
    clock = time.time()
    reward.train_reward_model(rm, pairs[2 * batch:], steps=steps, batch_size=batch)
    return steps * batch / (time.time() - clock)


@torch.no_grad()
def uncached_sample(model, prompts, max_new_tokens, generator):
    """The reference sampler: equal-length prompts, the whole sequence through forward for every new token."""
    tokens = torch.tensor(prompts)
    for _ in range(max_new_tokens):
        probs = torch.softmax(model(tokens)[:, -1], -1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], 1)
    return tokens[:, len(prompts[0]):]


def sampling_speed(model, batch=32, prompt_length=48, new_tokens=64):
    prompts = torch.randint(0, 256, (batch, prompt_length)).tolist()
    clock = time.time()
    model.generate(prompts, new_tokens, generator=torch.Generator().manual_seed(0))
    cached = batch * new_tokens / (time.time() - clock)
    clock = time.time()
    uncached_sample(model, prompts, new_tokens, torch.Generator().manual_seed(0))
    return cached, batch * new_tokens / (time.time() - clock)


def pi0_statistics(pi0, tokenizer, world, n_prompts=256, best_of=64, best_prompts=64):
    oracle, cap = Oracle(), Settings().max_new_tokens
    prompts = world.eval_prompts[:n_prompts]
    prompt_tokens = [tokenizer.encode_prompt(p) for p in prompts]
    responses = sample(pi0, prompt_tokens, cap, 1.0, tokenizer.stop_ids, [sample_key(0, i) for i in range(n_prompts)])
    texts = [tokenizer.decode_response(r) for r in responses]
    rewards = np.array([oracle.reward(p, t, tokenizer.stopped(r)) for p, t, r in zip(prompts, texts, responses)])
    print(f"pi0 on {n_prompts} held-out prompts (temperature 1.0): gold reward mean {rewards.mean():+.2f}, "
          f"p10 {np.percentile(rewards, 10):+.2f}, p90 {np.percentile(rewards, 90):+.2f}; finished with the end "
          f"token {np.mean([tokenizer.stopped(r) for r in responses]):.2f}; distinct "
          f"{len(set(texts)) / len(texts):.2f}")
    clock = time.time()
    best = []
    for i, (prompt, tokens) in enumerate(zip(prompts[:best_prompts], prompt_tokens[:best_prompts])):
        samples = sample(pi0, [tokens] * best_of, cap, 1.0, tokenizer.stop_ids,
                         [sample_key(1, i, j) for j in range(best_of)])
        best.append(max(oracle.reward(prompt, tokenizer.decode_response(s), tokenizer.stopped(s)) for s in samples))
    print(f"best of {best_of} samples per prompt ({best_prompts} prompts): mean {np.mean(best):+.2f}, "
          f"best {max(best):+.2f}, share reaching the maximum r* {REWARD_MAX} {np.mean(np.isclose(best, REWARD_MAX)):.2f} "
          f"({time.time() - clock:.0f} s)")


def diagnose_run(run, tokenizer, n_prompts=256):
    """Per part of r*, the mean over held-out prompts for pi0 and for the run's final policy, and how often each
    follows the prompt's topic and tone; and the first reward model's pairwise accuracy on pairs of pi0 samples,
    overall and on the pairs whose topic part, or tone part, differs; and where the policy's KL from pi0 sits.
    pi0 and the first reward model are read from the run's cache folder (its --cache, else the run folder), on the
    run's seed and response cap."""
    if not all(os.path.exists(os.path.join(run, name)) for name in ("config.json", "policy")):
        raise SystemExit(f"--run {run}: not a finished run of iterate.py (it needs config.json and policy/)")
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    settings = Settings(**{**config, "resume": False, "overwrite": False})
    cache = settings.cache or run
    pi0_path = start.cached_path(cache, "pi0", start.pi0_key(settings, tokenizer))
    rm0_path = start.cached_path(cache, "rm0", rm0_key(settings, tokenizer))
    if not all(os.path.exists(path) for path in (pi0_path, rm0_path)):
        raise SystemExit(f"--run {run}: its cache folder {cache} has no {os.path.basename(pi0_path)} and "
                         f"{os.path.basename(rm0_path)} (moved or deleted?)")
    cap, world = settings.max_new_tokens, World(seed=settings.seed)
    pi0 = start.load_cached_gpt(pi0_path)
    policy = GPT.from_pretrained(os.path.join(run, "policy")).eval()
    prompts = world.eval_prompts[:n_prompts]
    prompt_tokens = [tokenizer.encode_prompt(p) for p in prompts]
    samples = {}
    for name, model in (("pi0", pi0), ("policy", policy)):
        responses = sample(model, prompt_tokens, cap, 1.0, tokenizer.stop_ids,
                           [sample_key(0, i) for i in range(len(prompts))])
        samples[name] = responses
        texts = [tokenizer.decode_response(r) for r in responses]
        parts = [reward_parts(p, t, tokenizer.stopped(r)) for p, t, r in zip(prompts, texts, responses)]
        print(f"{name:>6}: " + "  ".join(f"{k} {np.mean([x[k] for x in parts]):+.2f}" for k in parts[0]))
        # does the model read the prompt? the asked topic scores >= +1.0 and the asked greeting >= +0.5 (the
        # corpus has each in 30 % of its responses; a prompt-blind model hits the topic 1 time in 40)
        print(f"{'':>6}  mentions the asked topic {np.mean([x['topic'] >= 1.0 for x in parts]):.2f}, "
              f"greets in the asked tone {np.mean([x['tone'] >= 0.5 for x in parts]):.2f}")
    # where the policy's KL from pi0 sits (the stability rule watches its jumps): in responses cut at the cap, in
    # runs of full stops (r* prices neither "Regards." nor "Regards.....": both end a sentence), in a few prompts
    kl = kl_estimate(policy, pi0, prompt_tokens, samples["policy"]).numpy()                   # [P] nats
    cut = np.array([not tokenizer.stopped(r) for r in samples["policy"]])
    dots = np.array([".." in tokenizer.decode_response(r) for r in samples["policy"]])
    share = lambda rows: f"{rows.mean():.0%} of the responses, holding {kl[rows].sum() / kl.sum():.0%} of it"
    print(f"KL(policy || pi0) {kl.mean():.2f} nats on its samples: cut at the cap {share(cut)}; with a run of full "
          f"stops {share(dots)}; the top 5 % of prompts hold "
          f"{kl[kl >= np.quantile(kl, 0.95)].sum() / kl.sum():.0%} of it")
    # where pi0's samples stopped, does each model stop there? P(stop token | prompt, the response before it)
    ended = [(p, r) for p, r in zip(prompt_tokens, samples["pi0"]) if tokenizer.stopped(r)]
    stop_at = lambda model: (response_logps(model, [p for p, _ in ended], [r for _, r in ended])
                             - response_logps(model, [p for p, _ in ended], [r[:-1] for _, r in ended])).exp()
    print(f"where pi0's samples stop ({len(ended)}), P(stop there): pi0 {stop_at(pi0).mean():.2f}, "
          f"policy {stop_at(policy).mean():.2f}")
    saved = torch.load(rm0_path, weights_only=True)
    rm = reward.RewardModel(GPT(pi0.config))
    rm.load_state_dict(saved["model"])
    second = sample(pi0, prompt_tokens, cap, 1.0, tokenizer.stop_ids, [sample_key(2, i) for i in range(len(prompts))])
    keys = ("total", "topic", "tone")
    gold = np.array([[sum(parts.values()), parts["topic"], parts["tone"]]
                     for responses in (samples["pi0"], second) for parts in
                     (reward_parts(p, tokenizer.decode_response(r), tokenizer.stopped(r))
                      for p, r in zip(prompts, responses))]).reshape(2, -1, len(keys))
    proxy = [reward.score(rm.eval(), prompt_tokens, rs) for rs in (samples["pi0"], second)]
    # on the pairs where that part of r* differs, does the reward model order them as the part does?
    accuracies = []
    for k, key in enumerate(keys):
        accuracy = reward.pairwise_accuracy(proxy[0], proxy[1], gold[0, :, k], gold[1, :, k])
        accuracies.append(f"{key} {accuracy:.2f} ({(gold[0, :, k] != gold[1, :, k]).sum()} pairs)")
    print("first reward model on pairs of pi0 samples, accuracy by " + ", ".join(accuracies))


def iteration_stages(cache: str) -> dict:
    """Seconds of each stage of iteration 2 of iterate.py at its defaults (the first with a refit), from the run's
    metrics.jsonl; pi0 and the first reward model come from (or go to) the `cache` folder."""
    with tempfile.TemporaryDirectory() as out:
        row = iterate.main(["--iterations", "2", "--out", out, "--cache", cache])[-1]
    return {"refit_s": row["rm_s"], "collect_and_label_s": row["pairs_s"], "dpo_s": row["dpo_s"],
            "evaluate_s": row["eval_s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pi0", default=None, help="a cached pi0-<key>.pt to measure instead of training one")
    parser.add_argument("--run", default=None, help="a finished run folder of iterate.py to diagnose instead")
    parser.add_argument("--json", default=None, help="also write the speed figures to this JSON file")
    parser.add_argument("--cache", default="runs/bench", help="pi0 and the first reward model of the iteration "
                        "timed in (4), built there the first time")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = start.world_tokenizer()
    if args.run:
        return diagnose_run(args.run, tokenizer)
    world = World(seed=0)
    config = GPTConfig.preset("tiny", vocab_size=tokenizer.n_vocab)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tiny preset "
          f"{GPT(config).num_params() / 1e6:.2f} M parameters")
    figures = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "training_tokens_per_s": training_speed(config)}
    print(f"training: {figures['training_tokens_per_s']:,.0f} tokens/s (batch 16 x 127)")
    figures["reward_training_pairs_per_s"] = reward_training_speed(config)
    print(f"reward-model training: {figures['reward_training_pairs_per_s']:,.0f} pairs/s (batch 32, prompts of 11 "
          "tokens, responses of 4-28)")
    model = GPT(config).eval()
    figures["sampling_tokens_per_s"], figures["sampling_uncached_tokens_per_s"] = sampling_speed(model)
    print(f"sampling 64 new tokens, batch 32, prompt 48: {figures['sampling_tokens_per_s']:,.0f} tokens/s with the "
          f"KV cache, {figures['sampling_uncached_tokens_per_s']:,.0f} without "
          f"({figures['sampling_tokens_per_s'] / figures['sampling_uncached_tokens_per_s']:.1f}x)")
    if args.pi0:
        pi0 = start.load_cached_gpt(args.pi0)
    else:
        s = Settings()
        pi0 = GPT(config)
        corpus = start.sft_corpus_tokens(world, tokenizer, s.sft_examples, s.max_new_tokens, s.chat, s.seed)
        clock = time.time()
        loss = start.train_sft(pi0, corpus, s.sft_steps, s.sft_lr, s.sft_batch, s.seed, "cpu")
        figures["sft_s"] = time.time() - clock
        print(f"SFT at iterate.py's defaults: {s.sft_steps} steps in {figures['sft_s']:.1f} s "
              f"(final loss {loss:.3f})")
    pi0_statistics(pi0.eval(), tokenizer, world)
    figures["iteration_2"] = iteration_stages(args.cache)
    print("one online iteration at iterate.py's defaults (iteration 2): " +
          ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in figures["iteration_2"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
