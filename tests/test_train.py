"""Tests of train.py: the schedule, gradient clipping, a loss that turns NaN, the batching."""
import math

import pytest
import torch

from train import collate, fit, learning_rate, shuffled_batches


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    peak, steps, warmup = 1.0, 110, 10
    assert [learning_rate(s, steps, peak, warmup) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert learning_rate(10, steps, peak, warmup) == 1.0                       # the top of the cosine
    assert math.isclose(learning_rate(60, steps, peak, warmup), 0.1 + 0.9 * 0.5)  # half-way: the mean
    assert math.isclose(learning_rate(110, steps, peak, warmup), 0.1)          # the end: a tenth of the peak


def test_fit_clips_the_gradient_norm_and_follows_the_schedule():
    # one parameter, loss = 1000 * w: the raw gradient is 1000; clipped to norm 1, and AdamW's first step moves w
    # by lr whatever the gradient's size, so the clip shows in Adam's state, and the schedule in the moves
    w = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.w = w
    grads = []

    def loss_fn(_):  # one argument, the batch: shared/bench/peer_bench.py wraps loss_fn so
        return 1000 * w.sum(), {}

    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads.append((w.grad.item(), self.param_groups[0]["lr"]))
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = recording_step
    try:
        fit(model, loss_fn, iter(range(3)), steps=3, lr=0.5, warmup=2, grad_clip=1.0)
    finally:
        torch.optim.AdamW.step = original_step
    assert [g for g, _ in grads] == pytest.approx([1.0, 1.0, 1.0], rel=1e-5)
    assert [lr for _, lr in grads] == pytest.approx([0.25, 0.5, 0.5])


def test_a_nan_loss_stops_before_the_step_and_leaves_the_weights_finite():
    model = torch.nn.Linear(2, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = iter([torch.tensor(1.0, requires_grad=True), torch.tensor(float("nan"), requires_grad=True)])
    with pytest.raises(FloatingPointError, match=r"toy: the loss is nan at step 2 of 3"):
        fit(model, lambda *_: (model.weight.sum() + next(losses), {}), iter(range(3)), steps=3, lr=0.1,
            desc="toy")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # step 1 ran


def test_collate_right_pads_and_marks_the_response():
    tokens, mask, response_mask = collate([[5, 6], [7]], [[8], [9, 10, 11]])
    assert tokens.tolist() == [[5, 6, 8, 0], [7, 9, 10, 11]]
    assert mask.tolist() == [[True, True, True, False], [True] * 4]
    assert response_mask.tolist() == [[False, False, True, False], [False, True, True, True]]


def test_shuffled_batches_cover_every_example_each_epoch_and_refuse_none():
    batches = shuffled_batches(5, 2, seed=0)
    epoch = [next(batches) for _ in range(3)]
    assert sorted(i for batch in epoch for i in batch) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="need at least one example"):
        next(shuffled_batches(0, 2, seed=0))


def test_map_batches_returns_every_rows_result_in_the_callers_order():
    from train import map_batches
    model = torch.nn.Linear(1, 1)
    prompts = [[1] * k for k in (3, 1, 7, 2, 5)]
    responses = [[2] * k for k in (1, 6, 2, 1, 3)]
    fn = lambda tokens, mask, response_mask: torch.stack([mask.sum(1), response_mask.sum(1)], 1).float()
    out = map_batches(model, fn, prompts, responses, batch_size=2)
    assert out.tolist() == [[len(p) + len(r), len(r)] for p, r in zip(prompts, responses)]


def test_fit_trains_float32_weights_only():
    # a bf16 weight at 1.0 cannot move by less than 2^-8: AdamW's small steps would round away, so fit refuses
    model = torch.nn.Linear(2, 1).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"trainable weights must be float32 \(got \['torch.bfloat16'\]\)"):
        fit(model, lambda *_: (model.weight.float().sum(), {}), iter(range(1)), steps=1, lr=0.1)


def test_fit_under_bfloat16_autocast_computes_with_the_updated_weights():
    # a run keeps one autocast open throughout (train.precision); were its cast cache on, the bf16 casts of the
    # weights made before a step, or before an in-place load_state_dict (fit_mle's return to its best epoch),
    # would be used after it
    from train import precision
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 1), torch.randn(8, 4)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with precision(torch.bfloat16, "cpu"):
        before = model(x)
        fit(model, lambda *_: (model(x).float().pow(2).mean(), {}), iter(range(3)), steps=3, lr=0.1)
        after = model(x)
        model.load_state_dict(first)  # in place, as fit_mle restores its best epoch
        restored = model(x)
    with precision(torch.bfloat16, "cpu"):
        fresh = model(x)  # a new autocast: casts of the current weights
    assert not torch.equal(after, before) and torch.equal(restored, before) and torch.equal(restored, fresh)


def test_map_batches_caps_rows_times_length_and_gives_the_same_results():
    from train import map_batches
    prompts, responses = [[1] * n for n in range(1, 11)], [[2] * (11 - n) for n in range(1, 11)]  # 11 tokens each
    shapes = []
    model = torch.nn.Linear(1, 1)

    def fn(tokens, mask, response_mask):
        shapes.append(tuple(tokens.shape))
        return (tokens * mask).sum(1).float()
    whole = map_batches(model, fn, prompts, responses, batch_size=8)
    capped = map_batches(model, fn, prompts, responses, batch_size=8, max_tokens=25)
    assert torch.equal(whole, capped) and shapes[:2] == [(8, 11), (2, 11)]
    assert shapes[2:] == [(2, 11)] * 5  # 8 rows x 11 > 25, 4 x 11 > 25: 2 rows a batch


def test_precision_autocasts_to_bfloat16_only_when_asked():
    from train import precision
    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    for dtype, expected in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
        with precision(dtype, "cpu"):
            assert torch.is_autocast_enabled("cpu") == (dtype == torch.bfloat16) and layer(x).dtype == expected
