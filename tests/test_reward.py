"""Tests of reward.py: the Bradley-Terry loss against its formula, the reward read at the last real token whatever
the padding, training on a toy preference, and held-out accuracy with ties. All seeded and deterministic."""
import copy
import math
import random

import pytest
import torch

from model import GPT, GPTConfig
from reward import (RewardModel, bradley_terry_loss, embed, embed_and_score, pairwise_accuracy, score,
                    train_reward_model)

TOY = dict(vocab_size=32, dim=32, n_layer=2, n_head=2, n_kv_head=1, ffn_hidden=64, max_seq_len=32)




def toy_reward_model(seed=0, random_head=False):
    torch.manual_seed(seed)
    rm = RewardModel(GPT(GPTConfig(**TOY))).eval()
    if random_head:  # the zero-initialised head scores every row 0, which would hide where it reads
        torch.nn.init.normal_(rm.head.weight)
    return rm


def toy_pairs(n, seed):
    """A response holding token 5 beats one holding token 6, whatever the prompt and the other tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(7, 32, (n, 6), generator=gen).tolist()
    return [(r[:3], [r[3], 5, r[4]], [r[3], 6, r[5]]) for r in rows]


def test_bradley_terry_loss_hand_case():
    # mean of -log sigmoid(d) with d = 1 and d = -2: (log(1 + e^-1) + log(1 + e^2)) / 2
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 2.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2, abs=1e-6)
    assert bradley_terry_loss(torch.tensor([0.7, -3.0]), torch.tensor([0.7, -3.0])).item() == \
        pytest.approx(math.log(2), abs=1e-7)


def test_reward_read_at_last_real_token_whatever_the_padding():
    # the same (prompt, response) scored alone, right-padded beside a longer row, and left-padded; the response
    # ends in token 0, the pad value, so reading the reward "at the first pad token" would go wrong
    rm = toy_reward_model(random_head=True)
    prompt, response, longer = [3, 4, 5], [9, 10, 0], [7] * 12
    row = torch.tensor([prompt + response])
    alone = rm(row)[0]
    expected_features = rm.backbone.hidden_states(row)[0, -1]                   # the last token, computed directly
    torch.testing.assert_close(rm.features(row)[0], expected_features)
    right = score(rm, [prompt, longer[:2]], [response, longer[2:]])             # train.collate right-pads with 0
    torch.testing.assert_close(right[0], alone, atol=1e-5, rtol=0)
    left = torch.tensor([[0] * 6 + prompt + response, longer])
    left_mask = torch.tensor([[False] * 6 + [True] * 6, [True] * 12])
    torch.testing.assert_close(rm(left, left_mask)[0], alone, atol=1e-5, rtol=0)
    assert alone.abs() > 1e-3                                                   # the comparison is not 0 == 0


def test_features_and_scores_shapes():
    rm = toy_reward_model()
    tokens = torch.randint(0, 32, (4, 7), generator=torch.Generator().manual_seed(0))
    assert rm.features(tokens, torch.ones(4, 7, dtype=torch.bool)).shape == (4, 32)
    assert rm(tokens).shape == (4,) and rm(tokens).dtype == torch.float32
    prompts, responses = [[1, 2], [3], [4, 5, 6]], [[7], [8, 9], []]
    assert embed(rm, prompts, responses, batch_size=2).shape == (3, 32)
    assert torch.equal(score(rm, prompts, responses), torch.zeros(3))           # the head starts at zero
    with pytest.raises(ValueError, match="no real token"):
        rm.features(tokens[:1], torch.zeros(1, 7, dtype=torch.bool))


def test_train_reward_model_learns_a_toy_preference():
    # from the zero head the first loss is log 2; after training, held-out pairs are ranked right
    rm = toy_reward_model()
    history = train_reward_model(rm, toy_pairs(128, seed=1), steps=40, lr=1e-3, batch_size=16)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["loss"] < 0.4
    # held-out pairs in both orders: the truth is a label, 1 for the preferred side
    prompts, chosen, rejected = zip(*(toy_pairs(32, seed=2) + toy_pairs(32, seed=3)))
    first, second = list(chosen[:32] + rejected[32:]), list(rejected[:32] + chosen[32:])
    first_wins = [1] * 32 + [0] * 32
    accuracy = pairwise_accuracy(score(rm, prompts, first), score(rm, prompts, second), first_wins,
                                 [1 - w for w in first_wins])
    assert accuracy >= 0.95


def test_pairwise_accuracy_counts_ties_as_one_half_and_skips_pairs_the_truth_ties():
    # (r_a, r_b, truth_a, truth_b): right, right, wrong, a tie of r, and a pair the truth ties (skipped)
    rewards_a, rewards_b = [2.0, -1.0, 0.5, 0.3, 9.0], [1.0, 0.0, 0.7, 0.3, 0.0]
    truth_a, truth_b = [1.0, 0.0, 1.0, 1.5, 2.0], [0.0, 1.0, 0.0, 0.0, 2.0]
    # (1 + 1 + 0 + 0.5) / 4
    assert pairwise_accuracy(rewards_a, rewards_b, truth_a, truth_b) == pytest.approx(0.625)
    # labels as the truth, tensors as rewards, the same answer
    assert pairwise_accuracy(torch.tensor(rewards_a[:4]), torch.tensor(rewards_b[:4]), [1, 0, 1, 1],
                             [0, 1, 0, 0]) == pytest.approx(0.625)
    # every pair tied by the truth: no accuracy to report
    assert pairwise_accuracy([1.0], [0.0], [0.3], [0.3]) is None


def test_embed_and_score_gives_the_features_and_the_head_on_them():
    rm = toy_reward_model(random_head=True)
    prompts, responses = [[1, 2], [3], [4, 5, 6]], [[7], [8, 9], []]
    features, rewards = embed_and_score(rm, prompts, responses, batch_size=2)
    assert torch.equal(features, embed(rm, prompts, responses, batch_size=2))
    assert torch.allclose(rewards, score(rm, prompts, responses, batch_size=2), atol=1e-6)


def test_fit_mle_trains_on_every_pair_but_the_held_out_tenth_and_keeps_the_best_epoch(monkeypatch):
    import reward
    seen, original = [], reward.train_reward_model
    monkeypatch.setattr(reward, "train_reward_model",
                        lambda rm, pairs, *args, **kwargs: seen.append(list(pairs)) or original(rm, pairs, *args,
                                                                                                   **kwargs))
    rm, pairs = toy_reward_model(), toy_pairs(100, seed=1)
    fit = reward.fit_mle(rm, pairs, lr=1e-3, batch_size=16, seed=0, max_epochs=6)
    # every epoch sees the same 90 pairs, and the 10 held out are the rest: every label is used, once per epoch
    assert all(len(epoch) == 90 and epoch == seen[0] for epoch in seen)
    held_out = [p for p in pairs if p not in seen[0]]
    assert len(held_out) == 10
    assert 1 <= fit["epoch_kept"] <= fit["epochs"] == len(seen) <= 6
    # it stopped because the held-out loss rose (or hit the cap), and the kept weights are the best epoch's
    prompts, chosen, rejected = zip(*held_out)
    loss = bradley_terry_loss(score(rm, prompts, chosen), score(rm, prompts, rejected)).item()
    assert loss == pytest.approx(fit["held_out_loss"], abs=1e-6) and loss < math.log(2)
    assert fit["held_out_accuracy"] >= 0.9


def test_trainable_layers_fine_tune_the_top_blocks_the_final_norm_and_the_head_only():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=32, dim=16, n_layer=3, n_head=2, n_kv_head=1, ffn_hidden=32, max_seq_len=16))
    rm = RewardModel(gpt, trainable_layers=1)
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    pairs = [([3, 4], [5, 1], [6, 1]), ([7], [5, 8, 1], [6, 9, 1])] * 4
    train_reward_model(rm, pairs, steps=3, lr=1e-2, batch_size=4)
    moved = {k for k, v in rm.state_dict().items() if not torch.equal(before[k], v)}
    trainable = {k for k in before if k.startswith(("backbone.layers.2.", "backbone.norm.", "head."))}
    # the head and the top block move (the head from step 1, the block from step 2 once the head is non-zero)
    assert moved <= trainable and "head.weight" in moved and any(k.startswith("backbone.layers.2.") for k in moved)
    assert all(not p.requires_grad for n, p in rm.named_parameters() if n not in trainable)


def test_on_a_lora_backbone_only_its_adapters_in_the_top_blocks_and_the_head_train():
    # under --lora the reward model is pi0's frozen base with adapters of its own: the base (final norm included)
    # stays frozen whatever --rm-trainable-layers says
    from lora import add_lora
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=32, dim=16, n_layer=3, n_head=2, n_kv_head=1, ffn_hidden=32, max_seq_len=16))
    for layers, blocks in ((None, ("0", "1", "2")), (1, ("2",))):
        rm = RewardModel(add_lora(copy.deepcopy(gpt), rank=2), trainable_layers=layers)
        trains = {n for n, p in rm.named_parameters() if p.requires_grad}
        assert trains == {"head.weight", "head.bias"} | {n for n, _ in rm.named_parameters() if "lora_" in n and
                                                         n.split(".")[2] in blocks}


def test_a_bfloat16_base_with_float32_adapters_and_head_scores_without_autocast():
    # a device where bf16 autocast does not run (MPS on older PyTorch) still meets a bf16 base and float32 trainables
    from lora import add_lora
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=32, dim=16, n_layer=2, n_head=2, n_kv_head=1, ffn_hidden=32, max_seq_len=16))
    rm = RewardModel(add_lora(copy.deepcopy(gpt).to(torch.bfloat16), rank=2))
    torch.nn.init.normal_(rm.head.weight)  # a trained head: the zero one would score 0 whatever the features
    twin = RewardModel(add_lora(gpt, rank=2))
    twin.load_state_dict({k: v.float() for k, v in rm.state_dict().items()})
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    scores, reference = rm(tokens), twin(tokens)
    # bf16 features (8 bits) through a head of norm ~4, scores near +-3.3: measured 0.009 apart
    assert scores.dtype == torch.float32 and reference.abs().min() > 0.1 and torch.allclose(scores, reference, atol=0.1)


def test_fit_mle_keeps_the_best_epochs_weights_and_stops_when_the_held_out_loss_rises(monkeypatch):
    # scripted: epoch e sets every head weight to e (in place, as an optimiser does) and the held-out losses of
    # epochs 1, 2, 3 are 0.6, 0.5, 0.7: fit_mle runs 3 epochs, then restores epoch 2's weights exactly
    import reward
    seeds, losses = [], iter([0.6, 0.5, 0.7, 0.55])

    def scripted_training(rm, train, steps, lr, batch_size, seed, device, warmup):
        assert len(train) == 18
        seeds.append(seed)
        with torch.no_grad():
            rm.head.weight.fill_(len(seeds))
    monkeypatch.setattr(reward, "train_reward_model", scripted_training)
    monkeypatch.setattr(reward, "bradley_terry_loss", lambda chosen, rejected: torch.tensor(next(losses)))
    rm = toy_reward_model()
    fit = reward.fit_mle(rm, toy_pairs(20, seed=1), lr=1e-3, batch_size=4, seed=4, max_epochs=5)
    assert fit["epochs"] == 3 and fit["epoch_kept"] == 2 and seeds == [5, 6, 7]
    assert torch.equal(rm.head.weight, torch.full_like(rm.head.weight, 2.0))
    assert fit["held_out_loss"] == pytest.approx(0.55)  # measured again on the restored weights


def test_fit_mle_is_seeded_and_refuses_fewer_than_two_pairs():
    import reward
    fits = []
    for seed in (0, 0, 1):
        rm = toy_reward_model()
        fit = reward.fit_mle(rm, toy_pairs(30, seed=1), lr=1e-3, batch_size=8, seed=seed, max_epochs=2)
        assert fit["epochs"] <= 2
        fits.append((fit, rm.head.weight.clone()))
    assert fits[0][0] == fits[1][0] and torch.equal(fits[0][1], fits[1][1])
    assert not torch.equal(fits[0][1], fits[2][1])
    with pytest.raises(ValueError, match="fit_mle: needs at least 2 labelled pairs .one is held out., got 1"):
        reward.fit_mle(toy_reward_model(), toy_pairs(1, seed=1), lr=1e-3, batch_size=8)



def test_fit_mle_head_only_fits_the_head_on_fixed_features_and_leaves_the_backbone_as_it_was():
    # a response ending in token 5 beats one ending in token 6: phi at the last token tells them apart, so the linear
    # reward theta^T phi can learn it with the backbone frozen
    import reward
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(7, 32, (120, 4), generator=gen).tolist()
    pairs = [(r[:2], [r[2], 5], [r[3], 6]) for r in rows]
    rm = toy_reward_model()
    backbone = {k: v.clone() for k, v in rm.backbone.state_dict().items()}
    fit = reward.fit_mle(rm, pairs, lr=3e-2, batch_size=16, seed=0, max_epochs=20, head_only=True)
    assert all(torch.equal(v, backbone[k]) for k, v in rm.backbone.state_dict().items())
    assert rm.head.weight.abs().sum() > 0
    # the held-out numbers it reports are the model's own: recomputed through score() on the held-out twelve pairs
    order = random.Random(0).sample(range(120), 120)
    prompts, chosen, rejected = zip(*[pairs[i] for i in order[:12]])
    chosen_rewards, rejected_rewards = score(rm, prompts, chosen), score(rm, prompts, rejected)
    assert bradley_terry_loss(chosen_rewards, rejected_rewards).item() == pytest.approx(fit["held_out_loss"], abs=1e-5)
    assert fit["held_out_loss"] < 0.3 and fit["held_out_accuracy"] == 1.0
    assert 1 <= fit["epoch_kept"] <= fit["epochs"] <= 20


def test_fit_mle_head_only_on_given_features_needs_no_forward_pass_and_fits_as_it_would_alone(monkeypatch):
    import reward
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(7, 32, (60, 4), generator=gen).tolist()
    pairs = [(r[:2], [r[2], 5], [r[3], 6]) for r in rows]
    alone, given = toy_reward_model(), toy_reward_model()
    features = reward.pair_features(given, pairs)
    fit_alone = reward.fit_mle(alone, pairs, lr=3e-2, batch_size=16, seed=0, max_epochs=5, head_only=True)
    monkeypatch.setattr(given.backbone, "hidden_states", lambda *a, **k: pytest.fail("a forward pass"))
    fit_given = reward.fit_mle(given, pairs, lr=3e-2, batch_size=16, seed=0, max_epochs=5, head_only=True,
                               features=features)
    assert fit_given == fit_alone and fit_alone["epochs"] >= 2
    assert all(torch.equal(a, b) for a, b in zip(alone.head.parameters(), given.head.parameters()))
    with pytest.raises(ValueError, match=r"fit_mle: features of \[59, 59\] pairs for 60 pairs"):
        reward.fit_mle(given, pairs, lr=3e-2, batch_size=16, head_only=True,
                       features=tuple(phi[:59] for phi in features))


def test_embed_of_a_padded_batch_equals_each_row_alone():
    # features read at each row's last real token: rows of different lengths in one batch give what they give alone
    rm = toy_reward_model(random_head=True)
    prompts, responses = [[7, 8], [9], [10, 11, 12]], [[5, 13, 14, 15], [6], [5, 16]]
    batched = embed(rm, prompts, responses, batch_size=3)
    alone = torch.cat([embed(rm, [p], [r], batch_size=1) for p, r in zip(prompts, responses)])
    assert torch.allclose(batched, alone, atol=1e-5) and not torch.allclose(batched[0], batched[1])


def test_train_reward_model_first_step_stats_read_each_row_at_its_last_real_token(monkeypatch):
    # rows of different lengths in one batch, a random head: the first step's margin is the mean of
    # score(chosen) - score(rejected) computed row by row; with the zero head every pair ties, which counts as wrong
    import reward
    pairs = [([7, 8], [5, 9, 10, 11], [6]), ([12], [5], [6, 13, 14]), ([15, 16, 17], [5, 18], [6, 19])]
    rm = toy_reward_model(random_head=True)
    prompts, chosen, rejected = zip(*pairs)
    margin = torch.cat([score(rm, [p], [c]) - score(rm, [p], [r]) for p, c, r in pairs]).mean().item()
    seen = {}
    original = reward.fit
    monkeypatch.setattr(reward, "fit", lambda *args, **kwargs: seen.update(args=args[3:], kwargs=kwargs) or
                        original(*args, **kwargs))
    history = train_reward_model(rm, pairs, steps=1, lr=0.0, batch_size=3)
    assert history[0]["margin"] == pytest.approx(margin, abs=1e-5) and abs(margin) > 0.01
    assert seen["args"] == (1, 0.0, 0, 0.0, 1.0) and seen["kwargs"] == {"desc": "reward"}  # the defaults reach fit
    assert train_reward_model(toy_reward_model(), pairs, steps=1, lr=0.0, batch_size=3)[0]["accuracy"] == 0.0


def test_features_of_a_one_token_row_and_a_row_with_none():
    rm = toy_reward_model(random_head=True)
    tokens = torch.tensor([[7, 0, 0], [7, 8, 9]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    alone = rm.features(tokens[:1, :1])
    assert torch.allclose(rm.features(tokens, mask)[0], alone[0], atol=1e-6)  # read at column 0, not the padding
    with pytest.raises(ValueError, match="RewardModel: a row has no real token"):
        rm.features(tokens, torch.tensor([[False, False, False], [True, True, True]]))
