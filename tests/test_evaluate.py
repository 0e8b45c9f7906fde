"""Tests of evaluate.py: the KL estimate and the fresh samples evaluation draws."""
import pytest
import torch

import evaluate
import reward
from model import GPT
from oracle import Oracle


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
    held_out = evaluate.make_held_out(model, world.eval_prompts[:8], tokenizer, oracle, "auto", 12,
                                      torch.Generator().manual_seed(0))
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
    evaluate.evaluate(policy, model, rm, held_out, oracle, tokenizer, 12, torch.Generator().manual_seed(1))
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
    held_out = evaluate.make_held_out(model, world.eval_prompts[:24], tokenizer, oracle, "auto", 12,
                                      torch.Generator().manual_seed(0))
    prompt_of = {tuple(t): p for p, t in zip(held_out.prompts, held_out.prompt_tokens)}
    for sign, expected in ((1.0, 1.0), (-1.0, 0.0)):
        monkeypatch.setattr(evaluate.reward, "score", lambda rm, prompt_tokens, responses, sign=sign: torch.tensor(
            [sign * oracle.reward(prompt_of[tuple(p)], tokenizer.decode_response(r), tokenizer.stopped(r))
             for p, r in zip(prompt_tokens, responses)]))
        policy = GPT(model.config).eval()
        row, _ = evaluate.evaluate(policy, model, None, held_out, oracle, tokenizer, 12,
                                   torch.Generator().manual_seed(1))
        assert row["rm_accuracy"] == expected
