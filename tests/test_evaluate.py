"""Tests of evaluate.py: the KL estimate and the fresh samples evaluation draws."""
import pytest
import torch

import evaluate
import reward
from model import GPT, sample_key
from oracle import Oracle


def keys(n, stream):
    return [sample_key(stream, i) for i in range(n)]


def test_kl_is_exactly_zero_when_policy_is_reference(small_world):
    tokenizer, world, model = small_world
    prompts = [tokenizer.encode_prompt(p) for p in world.eval_prompts[:6]]
    responses = model.generate(prompts, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(evaluate.kl_estimate(model, model, prompts, responses), torch.zeros(6))


def test_evaluation_samples_fresh_at_temperature_one(small_world, monkeypatch):
    # KL and win-rate are computed on fresh samples of the policy drawn at temperature 1.0 with no top-k, never on
    # training samples (drawn half at 0.7)
    tokenizer, world, model = small_world
    oracle = Oracle()
    held_out = evaluate.make_held_out(model, world.eval_prompts[:8], tokenizer, oracle, "auto", 12, keys(8, 0))
    policy = GPT(model.config)
    policy.load_state_dict(model.state_dict())
    calls, kl_inputs = [], []
    original_generate = policy.generate

    def spy(prompts, max_new_tokens, temperature=1.0, top_k=None, **kwargs):
        out = original_generate(prompts, max_new_tokens, temperature, top_k, **kwargs)
        calls.append((temperature, top_k, out))
        return out

    original_kl = evaluate.kl_estimate
    monkeypatch.setattr(policy, "generate", spy)
    monkeypatch.setattr(evaluate, "kl_estimate",
                        lambda p, r, pt, resp: kl_inputs.append(resp) or original_kl(p, r, pt, resp))
    rm = reward.RewardModel(GPT(model.config))
    evaluate.evaluate(policy, model, rm, held_out, oracle, tokenizer, 12, keys(8, 1))
    assert calls and all(t == 1.0 and k is None for t, k, _ in calls)
    assert kl_inputs == [[r for _, _, out in calls for r in out]]


def test_kl_of_a_different_policy_equals_an_independent_token_by_token_sum(small_world):
    # each row alone, unpadded, full forward, log-softmax by hand: sum over response tokens of log pi - log pi0
    tokenizer, world, pi0 = small_world
    torch.manual_seed(1)
    policy = GPT(pi0.config).eval()
    prompts = [tokenizer.encode_prompt(p) for p in world.eval_prompts[:5]]
    responses = policy.generate(prompts, 10, generator=torch.Generator().manual_seed(0))
    expected = []
    for prompt, response in zip(prompts, responses):
        tokens = torch.tensor([prompt + response])
        total = 0.0
        with torch.no_grad():
            for model, sign in ((policy, 1.0), (pi0, -1.0)):
                logps = torch.log_softmax(model(tokens)[0].double(), -1)       # [T, V]
                total += sign * sum(logps[len(prompt) + i - 1, t].item() for i, t in enumerate(response))
        expected.append(total)
    kl = evaluate.kl_estimate(policy, pi0, prompts, responses)
    assert kl.tolist() == pytest.approx(expected, abs=1e-4) and kl.abs().min() > 0.01


def test_rm_accuracy_measures_agreement_with_r_star_on_policy_against_pi0_pairs(small_world, monkeypatch):
    # a reward model that scores with r* itself orders every (policy sample, pi0 sample) pair right: 1.0; one that
    # scores with -r* orders every pair wrong: 0.0 (pairs r* ties are skipped)
    tokenizer, world, model = small_world
    oracle = Oracle()
    held_out = evaluate.make_held_out(model, world.eval_prompts[:24], tokenizer, oracle, "auto", 12, keys(24, 0))
    prompt_of = {tuple(t): p for p, t in zip(held_out.prompts, held_out.prompt_tokens)}
    for sign, expected in ((1.0, 1.0), (-1.0, 0.0)):
        monkeypatch.setattr(evaluate.reward, "score", lambda rm, prompt_tokens, responses, sign=sign: torch.tensor(
            [sign * oracle.reward(prompt_of[tuple(p)], tokenizer.decode_response(r), tokenizer.stopped(r))
             for p, r in zip(prompt_tokens, responses)]))
        policy = GPT(model.config).eval()
        row, _ = evaluate.evaluate(policy, model, None, held_out, oracle, tokenizer, 12, keys(24, 1))
        assert row["rm_accuracy"] == expected


def test_every_metric_of_a_row_against_an_independent_computation(small_world):
    # the policy's samples are redrawn with the same keys and every number recomputed here by hand, each
    # response judged as it ended (the 10-token cap cuts most of a random model's)
    import math

    import numpy as np
    from model import sample
    from oracle import malformed
    tokenizer, world, pi0 = small_world
    oracle = Oracle(temperature=0.7)
    held_out = evaluate.make_held_out(pi0, world.eval_prompts[:16], tokenizer, oracle, "auto", 10, keys(16, 0))
    # the held-out set: the prompts encoded the asked way, pi0's sample drawn at temperature 1 and judged as it ended
    assert held_out.prompt_tokens == [tokenizer.encode_prompt(p, "auto") for p in world.eval_prompts[:16]]
    assert held_out.pi0_responses == sample(pi0, held_out.prompt_tokens, 10, 1.0, tokenizer.stop_ids, keys(16, 0))
    assert held_out.pi0_finished == [tokenizer.stopped(r) for r in held_out.pi0_responses]
    assert held_out.pi0_rewards == [oracle.reward(p, t, f) for p, t, f in
                                    zip(held_out.prompts, held_out.pi0_texts, held_out.pi0_finished)]
    assert held_out.pi0_parts == [oracle.reward_parts(p, t, f) for p, t, f in
                                  zip(held_out.prompts, held_out.pi0_texts, held_out.pi0_finished)]
    torch.manual_seed(3)
    policy, rm = GPT(pi0.config).eval(), reward.RewardModel(GPT(pi0.config))
    torch.nn.init.normal_(rm.head.weight)
    # (stream 2's keys: a random model stops within 10 tokens about once in 60 rows, and one of these 16 does)
    row, samples = evaluate.evaluate(policy, pi0, rm, held_out, oracle, tokenizer, 10, keys(16, 2))
    responses = sample(policy, held_out.prompt_tokens, 10, 1.0, tokenizer.stop_ids, keys(16, 2))
    texts, finished = [tokenizer.decode_response(r) for r in responses], [tokenizer.stopped(r) for r in responses]
    assert samples == list(zip(texts, finished)) and 0 < sum(finished) < 16
    probs = [oracle.prob(p, t, u, f, g) for p, t, u, f, g in
             zip(held_out.prompts, texts, held_out.pi0_texts, finished, held_out.pi0_finished)]
    assert row["win_rate"] == pytest.approx(np.mean(probs), abs=1e-12)
    assert row["win_rate_se"] == pytest.approx(np.std(probs, ddof=1) / math.sqrt(16), rel=0.05)
    gold = [oracle.reward(p, t, f) for p, t, f in zip(held_out.prompts, texts, finished)]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold, held_out.pi0_rewards)]
    assert row["hard_win_rate"] == pytest.approx(np.mean(wins), abs=1e-12)
    kl = evaluate.kl_estimate(policy, pi0, held_out.prompt_tokens, responses)
    assert row["kl"] == pytest.approx(kl.mean().item()) and row["kl_se"] == pytest.approx(kl.std().item() / 4)
    assert row["reward"] == pytest.approx(np.mean(gold), abs=1e-12)
    assert row["proxy_reward"] == pytest.approx(reward.score(rm, held_out.prompt_tokens, responses).mean().item())
    assert row["length"] == np.mean([len(r) for r in responses]) and row["finished"] == np.mean(finished)
    assert row["malformed"] == np.mean([malformed(t) for t in texts])
    parts = [oracle.reward_parts(p, t, f) for p, t, f in zip(held_out.prompts, texts, finished)]
    assert row["topic_share"] == np.mean([x["topic"] == 1.5 for x in parts])
    proxy, proxy_pi0 = (reward.score(rm, held_out.prompt_tokens, r) for r in (responses, held_out.pi0_responses))
    for key, truth, truth_pi0 in (("rm_accuracy", gold, held_out.pi0_rewards),
                                  *((f"rm_accuracy_{k}", [x[k] for x in parts], [x[k] for x in held_out.pi0_parts])
                                    for k in ("topic", "tone"))):
        ordered = [(a - b) * (t - u) for a, b, t, u in zip(proxy.tolist(), proxy_pi0.tolist(), truth, truth_pi0)
                   if t != u]
        expected = np.mean([1.0 if o > 0 else 0.5 if o == 0 else 0.0 for o in ordered]) if ordered else None
        assert row[key] == (pytest.approx(expected) if expected is not None else None), key
