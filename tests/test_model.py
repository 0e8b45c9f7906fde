"""Tests of model.py: the cache, padding and sampling properties the rest of the project relies on."""
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache, rope_frequencies, single_query_attention

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # different lengths on purpose


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", max_seq_len=64)).eval()


def uncached_greedy(model, prompt, n):
    """The reference: one prompt at a time, the whole sequence re-run through forward for every new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def left_padded(rows):
    longest = max(map(len, rows))
    tokens = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, longest - len(row):] = torch.tensor(row)
        mask[i, longest - len(row):] = True
    return tokens, mask


@pytest.mark.parametrize("n_head, n_kv_head", [(4, 4), (4, 2), (8, 1)])
def test_single_query_attention_equals_scaled_dot_product_attention(n_head, n_kv_head):
    # a sampling step's attention (one query per row, a padding mask) against torch's kernel; each row keeps at least
    # one key, as generate's mask always does (a row sees its own new token)
    gen = torch.Generator().manual_seed(0)
    B, S, D = 5, 9, 16
    q = torch.randn(B, n_head, 1, D, generator=gen)
    k, v = (torch.randn(B, n_kv_head, S, D, generator=gen) for _ in range(2))
    mask = torch.rand(B, 1, 1, S, generator=gen) > 0.4
    mask[..., -1] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_kv_head != n_head)
    assert torch.allclose(single_query_attention(q, k, v, mask), expected, atol=1e-6)


def test_presets_sizes_and_unknown_preset():
    # tiny is the CPU default (1-3 M parameters), small a laptop GPU's (20-50 M)
    assert 1e6 <= GPT(GPTConfig.preset("tiny")).num_params() <= 3e6
    assert 20e6 <= GPT(GPTConfig.preset("small")).num_params() <= 50e6
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        GPTConfig.preset("huge")


def test_cached_forward_equals_uncached(model):
    # feeding a sequence in three chunks through the cache gives the logits of one full forward
    tokens = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
    chunks = [model(tokens[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 20)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_row(model):
    # a row's logits are the same alone, left-padded beside a longer row, and right-padded
    short, long = [3, 4, 5], [6, 7, 8, 9, 10, 11]
    alone = model(torch.tensor([short]))[0]
    tokens, mask = left_padded([short, long])
    torch.testing.assert_close(model(tokens, mask)[0, -3:], alone, atol=1e-5, rtol=1e-5)
    right = torch.tensor([short + [0, 0, 0], long])
    right_mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    torch.testing.assert_close(model(right, right_mask)[0, :3], alone, atol=1e-5, rtol=1e-5)


def test_batched_cached_greedy_equals_one_at_a_time_uncached(model):
    batched = model.generate(PROMPTS, max_new_tokens=16, temperature=0)
    for prompt, response in zip(PROMPTS, batched):
        assert response == uncached_greedy(model, prompt, 16)


def test_sampler_logps_equal_teacher_forced_logps(model):
    # the log-probs recorded while sampling (at temperature 0.7, with the cache and left padding) equal a
    # teacher-forced forward of the same left-padded tokens
    gen = torch.Generator().manual_seed(1)
    responses, logps = model.generate(PROMPTS, 12, temperature=0.7, generator=gen, return_logps=True)
    tokens, mask = left_padded([p + r for p, r in zip(PROMPTS, responses)])
    logprobs = F.log_softmax(model(tokens, mask), -1)
    T = tokens.shape[1]
    for row, response in enumerate(responses):
        n = len(response)
        forced = logprobs[row, T - n - 1:T - 1].gather(1, torch.tensor(response)[:, None])[:, 0]
        torch.testing.assert_close(forced, torch.tensor(logps[row]), atol=1e-4, rtol=0)


def test_stop_ids_end_a_row(model):
    # whichever token greedy decoding emits 3rd becomes a stop id: the row must end right there, with it
    free = model.generate([PROMPTS[0]], 10, temperature=0)[0]
    stop = free[2]
    first = free.index(stop)
    stopped = model.generate([PROMPTS[0], PROMPTS[1]], 10, temperature=0, stop_ids=(stop,))
    assert stopped[0] == free[:first + 1]
    assert all(t != stop for t in stopped[1][:-1])  # the other row ends at its own first stop id, if any


def test_sampling_is_seeded(model):
    sample = lambda seed: model.generate(PROMPTS, 8, generator=torch.Generator().manual_seed(seed))
    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_sample_keys_are_splitmix64_computed_independently_in_python():
    # the keys and draws against a plain-integer splitmix64 (Steele et al.): nothing relies on int64 wrapping
    # being what the tensor code assumes without this check
    from model import row_uniforms, sample_key
    M = 2**64

    def mix(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % M
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % M
        return z ^ (z >> 31)

    def key(*parts):
        k = 0
        for part in parts:
            k = mix((k + 0x9E3779B97F4A7C15 + part) % M)
        return k - M if k >= 2**63 else k

    parts = [(0,), (3, 1, 2, 7, 5), (-1, 2**40), (12345, 4, 0, 383)]
    assert [sample_key(*p) for p in parts] == [key(*p) for p in parts]
    keys = [key(*p) for p in parts]
    for step in (0, 5):
        expected = [((mix((k + (step + 1) * 0x9E3779B97F4A7C15) % M) >> 41) + 0.5) / 2**23 for k in keys]
        assert row_uniforms(torch.tensor(keys), step).tolist() == expected


def test_a_rows_response_follows_its_key_whatever_batch_or_chunk_it_is_in(model):
    from model import sample, sample_key
    prompts = PROMPTS * 3
    keys = [sample_key(0, i) for i in range(len(prompts))]
    together = model.generate(prompts, 12, keys=keys)
    assert together == [model.generate([p], 12, keys=[k])[0] for p, k in zip(prompts, keys)]
    assert together == sample(model, prompts, 12, 1.0, (), keys, chunk=2)
    assert together[::-1] == model.generate(prompts[::-1], 12, keys=keys[::-1])
    assert together[0] != together[3]  # same prompt, another key: another response


def test_rows_that_share_a_prompt_share_its_prefill(model, monkeypatch):
    shapes, hidden_states = [], model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda tokens, *a, **k: shapes.append(tuple(tokens.shape)) or
                        hidden_states(tokens, *a, **k))
    prompts = [[1, 2, 3], [4], [1, 2, 3], [1, 2, 3], [4]]
    model.generate(prompts, 3, keys=list(range(5)))
    assert shapes[0] == (2, 3) and shapes[1][0] == 5  # two distinct prompts prefilled, then five rows decode


def test_inverse_transform_draws_follow_the_softmax():
    # 200,000 draws from a fixed 5-token distribution (one token at probability 0, never drawn): every frequency
    # within 4 standard errors of its probability, at temperature 1 and 0.5
    from model import sample_token
    logits = torch.tensor([2.0, 0.0, float("-inf"), 1.0, -1.0])
    keys = torch.arange(200_000)
    for temperature in (1.0, 0.5):
        probs = F.softmax(logits / temperature, -1)
        tokens = sample_token(logits.expand(len(keys), -1), temperature, None, keys, step=0)
        freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
        se = (probs * (1 - probs) / len(tokens)).sqrt()
        assert freq[2] == 0
        assert ((freq - probs).abs() <= 4 * se + 1e-12).all(), (freq, probs)


def test_top_k_one_is_greedy(model):
    gen = torch.Generator().manual_seed(0)
    assert model.generate(PROMPTS, 8, temperature=1.0, top_k=1, generator=gen) == \
        model.generate(PROMPTS, 8, temperature=0)


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        model.generate(PROMPTS, 0)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        model.generate([[1] * 60], 8)
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_rope_scaling_keeps_high_and_divides_low_frequencies():
    # Llama 3.1 scaling: short wavelengths unchanged, long ones divided by the factor, in between in between
    plain = rope_frequencies(64, 500000.0, None)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    scaled = rope_frequencies(64, 500000.0, scaling)
    wavelen = 2 * torch.pi / plain
    high, low = wavelen < 8192 / 4, wavelen > 8192
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    middle = ~high & ~low
    assert torch.all(scaled[middle] < plain[middle]) and torch.all(scaled[middle] > plain[middle] / 8)


def test_rows_leaving_the_batch_keep_everything_exact(model):
    # with a stop id that ends some rows early, finished rows leave the batch (and the cache) mid-sampling; every
    # row must still equal one-prompt-at-a-time uncached greedy decoding cut at its first stop id
    prompts = [[i, i + 1, i + 2][: 1 + i % 3] for i in range(20, 36)]
    free = [uncached_greedy(model, p, 12) for p in prompts]
    stop_ids = {row[2] for row in free[:8]}  # at least 8 rows stop by their third token
    batched = model.generate(prompts, 12, temperature=0, stop_ids=stop_ids)
    assert sum(len(row) < 12 for row in batched) >= 8
    for row, reference in zip(batched, free):
        first_stop = next((i for i, t in enumerate(reference) if t in stop_ids), None)
        assert row == (reference if first_stop is None else reference[:first_stop + 1])


def test_sample_chunks_prompts_so_that_a_chunks_kv_cache_fits_its_budget():
    # Llama 3.1 8B's shape (on the meta device: shapes only) in bf16: 128 KiB of keys and values a token, so 512-token
    # rows give 16 rows a chunk for a 1 GiB cache; the world's tiny model keeps chunks of 1024
    from model import sample
    with torch.device("meta"):
        llama = GPT(GPTConfig(vocab_size=128256, dim=4096, n_layer=32, n_head=32, n_kv_head=8, ffn_hidden=14336,
                              max_seq_len=8192)).to(torch.bfloat16)
        tiny = GPT(GPTConfig.preset("tiny", vocab_size=600))
    for model, length, expected in ((llama, 500, [16] * 6 + [4]), (tiny, 12, [1024, 76])):
        sizes = []
        model.generate = lambda prompts, *args, **kwargs: sizes.append(len(prompts)) or [[1]] * len(prompts)
        assert len(sample(model, [[1] * length] * sum(expected), 12, 1.0, [], [0] * sum(expected))) == sum(expected)
        assert sizes == expected
