"""Tests of evaluate.py: the KL estimate and the fresh samples evaluation draws."""
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
