"""Tests of dpo.py: the loss against hand-computed numbers, sequence_logps against an explicit loop, masking and
padding, reference caching, and a short DPO run on a toy preference. All seeded and deterministic."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dpo import dpo_loss, ipo_loss, pack_pairs, pair_logps, response_logps, sequence_logps, train_dpo
from model import GPT, GPTConfig
from train import collate

TOY = dict(vocab_size=32, dim=32, n_layer=2, n_head=2, n_kv_head=1, ffn_hidden=64, max_seq_len=32)


LOG_SIGMOID_1 = -0.31326168751822286  # log sigmoid(1) = -log(1 + e^-1)


def toy_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TOY)).eval()


def toy_pairs(n, seed=0):
    """After any prompt, token 5 (then end token 1) is preferred to token 6 (then 1)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(7, 32, (3,), generator=gen).tolist(), [5, 1], [6, 1]) for _ in range(n)]


def test_dpo_loss_is_log_2_when_policy_equals_reference():
    # h = 0 gives -log sigmoid(0) = log 2 for any beta and any label smoothing
    logps = -10 * torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    for beta, eps in [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3)]:
        losses, chosen_rewards, rejected_rewards = dpo_loss(logps[0], logps[1], logps[0], logps[1], beta, eps)
        torch.testing.assert_close(losses, torch.full((6,), math.log(2)), atol=1e-6, rtol=0)
        assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_dpo_loss_hand_case_with_and_without_label_smoothing():
    # beta 0.5; chosen -3 vs ref -4 (+1), rejected -5 vs ref -4 (-1): h = 2, beta * h = 1
    policy_chosen = torch.tensor([-3.0], requires_grad=True)
    policy_rejected = torch.tensor([-5.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-4.0]), torch.tensor([-4.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5)
    assert losses.item() == pytest.approx(0.31326168751822286, abs=1e-6)       # -log sigmoid(1)
    # cDPO, eps 0.1: 0.9 * 0.31326 + 0.1 * 1.31326 (= -log sigmoid(-1) = 1 - log sigmoid(1))
    smoothed, _, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228, abs=1e-6)
    # the rewards are beta * (policy - reference) and carry no gradient
    assert chosen_rewards.item() == pytest.approx(0.5) and rejected_rewards.item() == pytest.approx(-0.5)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    assert losses.requires_grad


def test_ipo_loss_hand_case_and_empty_response():
    # beta 0.5, so the target margin 1/(2 beta) is 1; chosen +1 over 2 tokens, rejected -1 over 4 tokens:
    # h = 0.5 - (-0.25) = 0.75 and the loss is (0.75 - 1)^2 = 0.0625
    losses, chosen_rewards, rejected_rewards = ipo_loss(
        torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]),
        torch.tensor([2]), torch.tensor([4]), beta=0.5)
    assert losses.item() == pytest.approx(0.0625, abs=1e-7)
    assert chosen_rewards.item() == pytest.approx(0.25) and rejected_rewards.item() == pytest.approx(-0.125)
    # an empty response (0 tokens, summed log-prob 0) gives a finite loss: h = 0, loss = (0 - 1)^2
    zero = torch.zeros(1)
    losses, _, _ = ipo_loss(zero, zero, zero, zero, torch.tensor([0]), torch.tensor([0]), beta=0.5)
    assert losses.item() == 1.0
    # beta 0.1 (target margin 5, where 1/(2 beta) and 2 beta differ) and a one-token chosen response: chosen +2
    # over 1 token, rejected -1 over 2: h = 2 + 0.5 = 2.5, loss (2.5 - 5)^2 = 6.25
    losses, chosen_rewards, _ = ipo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-3.0]),
                                         torch.tensor([-3.0]), torch.tensor([1]), torch.tensor([2]), beta=0.1)
    assert losses.item() == pytest.approx(6.25) and chosen_rewards.item() == pytest.approx(0.2)


def test_sequence_logps_equals_an_explicit_loop():
    gen = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 11
    logits = 3 * torch.randn(B, T, V, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.4
    expected = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:  # the logits at t-1 predict the token at t
                row = logits[b, t - 1].double()
                expected[b] += row[tokens[b, t]] - torch.logsumexp(row, 0)
    torch.testing.assert_close(sequence_logps(logits, tokens, mask).double(), expected, atol=1e-5, rtol=0)


def test_sequence_logps_ignores_tokens_and_logits_at_masked_positions():
    # changing the tokens where the mask is False (prompt, padding) changes nothing; NaN and inf logits at the
    # positions that predict masked tokens do not leak into the sum
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 8, 13, generator=gen)
    tokens = torch.randint(0, 13, (2, 8), generator=gen)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    clean = sequence_logps(logits, tokens, mask)
    other_tokens = torch.where(mask, tokens, (tokens + 5) % 13)
    assert torch.equal(sequence_logps(logits, other_tokens, mask), clean)
    dirty = logits.clone()
    predicts_masked = ~mask[:, 1:]                                    # logits at t-1 predict the token at t
    dirty[:, :-1][predicts_masked] = float("nan")
    dirty[0, 0, 3] = float("inf")
    dirty[:, -1] = float("nan")                                       # the last position predicts nothing
    assert torch.equal(sequence_logps(dirty, tokens, mask), clean)


def test_sequence_logps_same_for_bool_int_and_float_masks():
    # a 0/1 mask of any dtype selects the same targets, and still keeps NaN and inf at masked positions out
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 8, 13, generator=gen)
    tokens = torch.randint(0, 13, (2, 8), generator=gen)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    logits[0, 0] = float("nan")                                       # predicts tokens[0, 1], masked
    logits[0, 6, 2] = float("inf")                                    # predicts tokens[0, 7], masked
    by_bool = sequence_logps(logits, tokens, mask)
    assert by_bool.isfinite().all()
    for dtype in (torch.int64, torch.float32):
        assert torch.equal(sequence_logps(logits, tokens, mask.to(dtype)), by_bool), dtype


def test_empty_response_gives_exactly_zero_not_nan():
    logits = torch.full((2, 5, 7), float("nan"))
    logits[1] = float("inf")
    out = sequence_logps(logits, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2))


def test_response_logps_same_whatever_the_padding():
    # a (prompt, response) row scored alone, right-padded beside a longer row (two pad values), and left-padded
    model = toy_model()
    prompt, response, longer = [3, 4, 5], [9, 10, 1], [7] * 12
    tokens = torch.tensor([prompt + response])
    targets = torch.tensor([[False] * 3 + [True] * 3])
    alone = sequence_logps(model(tokens), tokens, targets)[0]
    batched = response_logps(model, [prompt, longer[:2]], [response, longer[2:]])
    torch.testing.assert_close(batched[0], alone, atol=1e-5, rtol=0)
    for pad in (0, 31):
        right = torch.tensor([prompt + response + [pad] * 6, longer])
        right_mask = torch.tensor([[True] * 6 + [False] * 6, [True] * 12])
        right_targets = torch.zeros(2, 12, dtype=torch.bool)
        right_targets[0, 3:6] = True
        torch.testing.assert_close(sequence_logps(model(right, right_mask), right, right_targets)[0], alone,
                                   atol=1e-5, rtol=0)
        left = torch.tensor([[pad] * 6 + prompt + response, longer])
        left_mask = torch.tensor([[False] * 6 + [True] * 6, [True] * 12])
        left_targets = torch.zeros(2, 12, dtype=torch.bool)
        left_targets[0, 9:] = True
        torch.testing.assert_close(sequence_logps(model(left, left_mask), left, left_targets)[0], alone,
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt needs at least one token"):
        response_logps(model, [[]], [[1]])


def test_one_gradient_step_raises_chosen_relative_to_rejected():
    # at policy = reference, one SGD step on the DPO loss raises log pi(chosen) - log pi(rejected)
    model = toy_model().train()
    prompts, chosen, rejected = [[3, 4, 5]], [[9, 10, 1]], [[11, 12, 1]]
    tokens, mask, targets = collate(prompts * 2, chosen + rejected)

    def logps():
        return sequence_logps(model(tokens, mask), tokens, targets)

    before = logps().detach()
    losses, _, _ = dpo_loss(*logps(), before[0:1], before[1:2], beta=0.1)
    losses.mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    after = logps().detach()
    assert after[0] - after[1] > before[0] - before[1] + 1e-3


def test_reference_log_probs_are_computed_once():
    # the reference runs ceil(2N / ref_batch_size) forward passes before training, however many steps follow;
    # its weights are untouched, and the first step's loss is dpo_loss on its log-probs
    policy, reference = toy_model(0), toy_model(1)
    pairs = toy_pairs(10)
    calls = []
    reference.register_forward_hook(lambda *args: calls.append(1))
    weights = copy.deepcopy(reference.state_dict())
    prompts, chosen, rejected = zip(*pairs)
    policy_logps = (response_logps(policy, prompts, chosen), response_logps(policy, prompts, rejected))
    ref_logps = (response_logps(reference, prompts, chosen), response_logps(reference, prompts, rejected))
    calls.clear()
    history = train_dpo(policy, pairs, beta=0.1, steps=6, lr=1e-3, batch_size=10, reference=reference,
                        ref_batch_size=4)
    assert len(calls) == 5
    assert all(torch.equal(weights[k], v) for k, v in reference.state_dict().items())
    expected, _, _ = dpo_loss(*policy_logps, *ref_logps, beta=0.1)
    assert history[0]["loss"] == pytest.approx(expected.mean().item(), abs=1e-5)


def test_train_dpo_learns_a_toy_preference():
    # with the policy as its own reference the first loss is log 2; then the margin grows and accuracy reaches 1
    policy = toy_model()
    history = train_dpo(policy, toy_pairs(32), beta=0.1, steps=25, lr=1e-3, batch_size=16)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[0]["margin"] == pytest.approx(0, abs=1e-5)
    assert history[-1]["margin"] > 0.2
    assert all(h["accuracy"] == 1.0 for h in history[-5:])
    assert history[-1]["chosen_logps"] - history[-1]["rejected_logps"] > history[0]["chosen_logps"] - \
        history[0]["rejected_logps"] + 2
    assert set(history[0]) == {"loss", "accuracy", "margin", "chosen_logps", "rejected_logps"}


def test_train_ipo_and_cdpo_run_with_an_empty_response():
    # an empty rejected response (a row with no targets) keeps every loss finite, for IPO and for cDPO
    pairs = toy_pairs(8) + [([3, 4], [5, 1], [])]
    for loss, eps in (("ipo", 0.0), ("dpo", 0.1)):
        history = train_dpo(toy_model(), pairs, beta=0.5, steps=3, lr=1e-3, batch_size=9, loss=loss,
                            label_smoothing=eps)
        assert all(math.isfinite(v) for h in history for v in h.values())
    with pytest.raises(ValueError, match="unknown loss"):
        train_dpo(toy_model(), pairs, steps=1, loss="kto")


def test_nll_weight_adds_the_chosen_per_token_nll():
    # the first step's loss (policy = reference, so DPO gives log 2) is log 2 + w * mean(-log pi(chosen) / |chosen|),
    # the chosen log-probs computed independently by response_logps
    torch.manual_seed(0)
    policy = GPT(GPTConfig(**TOY))
    pairs = [([3, 4, 5], [6, 7, 1], [8, 1]), ([9, 10], [11, 1], [12, 13, 14, 1])]
    chosen_logps = response_logps(policy, [p for p, _, _ in pairs], [c for _, c, _ in pairs])
    lengths = torch.tensor([len(c) for _, c, _ in pairs], dtype=torch.float)
    expected = math.log(2) + 0.5 * (-chosen_logps / lengths).mean().item()
    history = train_dpo(policy, pairs, beta=0.1, steps=1, lr=0.0, batch_size=2, nll_weight=0.5)
    assert history[0]["loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("loss, eps", [("ipo", 0.0), ("dpo", 0.2), ("dpo", 0.0)])
def test_first_training_loss_equals_the_formula_on_independent_log_probs(loss, eps):
    # a reference that differs from the policy, so h != 0 and each loss has its own value; the first step's loss
    # (one batch of all pairs, before any update) against the formula on log-probs from response_logps
    torch.manual_seed(0)
    policy, reference = GPT(GPTConfig(**TOY)), GPT(GPTConfig(**TOY))
    pairs = [([3, 4, 5], [6, 7, 1], [8, 1]), ([9, 10], [11, 1], [12, 13, 14, 1]), ([2], [15, 16, 17, 18, 1], [1])]
    prompts, chosen, rejected = zip(*pairs)
    pc, pr = response_logps(policy, prompts, chosen), response_logps(policy, prompts, rejected)
    rc, rr = response_logps(reference, prompts, chosen), response_logps(reference, prompts, rejected)
    beta = 0.5
    if loss == "ipo":  # log-ratios averaged over response tokens (the end token included)
        nc = torch.tensor([len(c) for c in chosen], dtype=torch.float)
        nr = torch.tensor([len(r) for r in rejected], dtype=torch.float)
        h = (pc - rc) / nc - (pr - rr) / nr
        expected = ((h - 1 / (2 * beta)) ** 2).mean().item()
    else:
        h = (pc - rc) - (pr - rr)
        expected = (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean().item()
    history = train_dpo(policy, pairs, beta=beta, steps=1, lr=0.0, batch_size=3, loss=loss, label_smoothing=eps,
                        reference=reference)
    assert history[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert abs(expected - math.log(2)) > 1e-3 or loss == "ipo"  # the case is not the trivial h = 0 one


def test_train_dpo_hands_its_schedule_to_fit_and_reports_ties_as_not_ordered(monkeypatch):
    # the defaults reach the shared loop (warm-up 0, no weight decay, clipping at 1, seeded order), and at the first
    # step the policy is its own reference: every implicit reward is 0, a tie, which accuracy counts as wrong
    import dpo
    seen = {}
    original = dpo.fit
    monkeypatch.setattr(dpo, "fit", lambda *args, **kwargs: seen.update(args=args[3:], kwargs=kwargs) or
                        original(*args, **kwargs))
    history = train_dpo(toy_model(), toy_pairs(4), beta=0.1, steps=1, lr=1e-3, batch_size=4)
    assert seen["args"] == (1, 1e-3, 0, 0.0, 1.0) and seen["kwargs"] == {"desc": "dpo"}
    assert history[0]["accuracy"] == 0.0 and history[0]["margin"] == 0.0
    with pytest.raises(ValueError, match="label_smoothing applies to the DPO loss only, not to IPO"):
        train_dpo(toy_model(), toy_pairs(4), steps=1, loss="ipo", label_smoothing=0.1)


def test_pack_pairs_shares_the_prompt_and_hides_the_chosen_response_from_the_rejected_one():
    # one pair: prompt [7, 8], chosen [5, 1], rejected [6, 9, 1], and a shorter pair padded after it
    tokens, mask, positions, predictor, chosen_mask, rejected_mask = pack_pairs([[7, 8], [10]], [[5, 1], [4]],
                                                                                [[6, 9, 1], [3]])
    assert tokens[0].tolist() == [7, 8, 5, 1, 6, 9, 1] and tokens[1, :3].tolist() == [10, 4, 3]
    assert positions[0].tolist() == [0, 1, 2, 3, 2, 3, 4]             # the rejected side starts after the prompt
    assert predictor[0].tolist() == [0, 0, 1, 2, 1, 4, 5]             # its first token is predicted by the prompt
    assert chosen_mask[0].tolist() == [False, False, True, True, False, False, False]
    assert rejected_mask[0].tolist() == [False] * 4 + [True] * 3
    assert mask[0, 4].tolist() == [True, True, False, False, True, False, False]   # rejected: prompt and itself
    assert mask[0, 3].tolist() == [True, True, True, True, False, False, False]    # chosen: causal, prompt and itself
    assert mask[1, 5].tolist() == [False] * 5 + [True] + [False]                   # padding: itself only
    assert not (chosen_mask[1, 3:] | rejected_mask[1, 3:]).any()


def test_pair_logps_equal_two_separate_rows_in_value_and_gradient():
    gen = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(2, 32, (n,), generator=gen).tolist()
    prompts, chosen, rejected = [draw(3), draw(1), draw(6)], [draw(5), draw(1), draw(2)], [draw(2), draw(7), draw(1)]
    packed_model, separate_model = toy_model(), toy_model()
    packed = pair_logps(packed_model, prompts, chosen, rejected)
    tokens, mask, response_mask = collate(prompts + prompts, chosen + rejected)
    separate = sequence_logps(separate_model(tokens, mask), tokens, response_mask)
    torch.testing.assert_close(torch.cat(packed), separate, atol=1e-5, rtol=0)
    (packed[0] - 2 * packed[1]).sum().backward()
    (separate[:3] - 2 * separate[3:]).sum().backward()
    for (name, a), b in zip(packed_model.named_parameters(), separate_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
