"""
A minimal Llama-style decoder and its sampler.

What it owns: `GPTConfig` (one dataclass, with named presets), `GPT` (token embedding, RMSNorm, rotary position
embedding with Llama 3.1 frequency scaling, grouped-query attention through F.scaled_dot_product_attention,
SwiGLU feed-forward, optionally tied output matrix) and `GPT.generate`, batched sampling with a KV cache over
prompts of different lengths. `GPT.from_pretrained` builds the model from what checkpoints.py reads out of a Meta
or Hugging Face Llama 3.x folder (plain config fields and tensors) and `save_pretrained` hands checkpoints.py its
config and state dict to write; checkpoints.py imports nothing from here. LoRA adapters live in lora.py.

Module attribute names are the keys of Meta's Llama checkpoints (`tok_embeddings`, `layers.{i}.attention.wq`,
`feed_forward.w1`, `attention_norm`, ...), so a Meta state dict loads with no renaming.

Padding. A batch may be left-padded (prompts for sampling) or right-padded (training pairs). Padding is described
by a boolean `mask[B, S]` of real tokens, never by a token value (the model can sample the pad id). A token's
rotary position is the number of real tokens before it, so a row gives the same result whatever padding it got,
and every position may attend to itself so no attention row is ever empty.

    python model.py   # the presets' parameter counts, a sample from an untrained tiny model, a save/load round trip
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import read_folder, write_hf_folder
from distributed import full_weights, gather, shard


@dataclass
class GPTConfig:
    vocab_size: int = 259          # the default byte-level tokenizer: 256 bytes + begin, end, pad
    dim: int = 128
    n_layer: int = 6
    n_head: int = 4
    n_kv_head: int = 2             # grouped-query attention: n_head // n_kv_head query heads share one k/v head
    ffn_hidden: int = 352          # SwiGLU width
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # Llama 3.1 RoPE scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position"}
    rope_scaling: dict | None = None
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.dim % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: dim {self.dim} must divide by n_head {self.n_head}, "
                             f"and n_head by n_kv_head {self.n_kv_head}")
        if (self.dim // self.n_head) % 2:
            raise ValueError(f"GPTConfig: head dim {self.dim // self.n_head} must be even for rotary embedding")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        presets = {
            "tiny": dict(dim=128, n_layer=6, n_head=4, n_kv_head=2, ffn_hidden=352),    # ~1.2 M: the CPU default
            "small": dict(dim=512, n_layer=8, n_head=8, n_kv_head=4, ffn_hidden=1408),  # ~25 M: a laptop GPU
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 (as Llama does), then return to the input dtype
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) of the rotary embedding, with Llama 3.1's long-context scaling:
    wavelengths shorter than original/high_freq_factor keep their frequency, longer than original/low_freq_factor
    are divided by `factor`, and those in between are blended linearly in 1/wavelength."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not scaling:
        return inv_freq.float()
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, blended)
    scaled = torch.where(wavelen < original / high, inv_freq, scaled)
    return scaled.float()


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle position * inv_freq[i], as Meta's code does: each pair is a
    complex number x[2i] + i x[2i+1], multiplied by rotation = cos + i sin of its angle (one kernel, where the pairs
    written out as real products take five times as long, forward and backward, for the same numbers).
    x: [B, T, H, D]; rotation: complex [B, T, D/2]."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))                # [B, T, H, D/2]
    return torch.view_as_real(pairs * rotation[:, :, None, :]).flatten(-2).type_as(x)   # [B, T, H, D]


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_len` positions."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        head_dim = config.dim // config.n_head
        shape = (batch_size, config.n_kv_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled so far (the same for every row; padding is in the mask)

    def select(self, keep: torch.Tensor):
        """Keep the rows `keep` picks, a bool mask [B] (rows that finished sampling leave the batch) or row indices
        (rows that share a prompt each get a copy of its prefill)."""
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]


def single_query_attention(q, k, v, attn_mask):
    """softmax(q k^T / sqrt(D), over the keys attn_mask lets through) v for one query per row: q [B, H, 1, D], k and
    v [B, H_kv, S, D], attn_mask bool [B, 1, 1, S]. Each k/v head meets its group of query heads in one batched
    product, without copying the cache. A sampling step's attention: on a CPU, with scaled_dot_product_attention's
    kernel instead, sampling 1024 prompts takes 1.11 times as long (1.02 to 1.05 at 64 to 256; 2 threads)."""
    B, H, _, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    scores = q.view(B, H_kv, H // H_kv, D) @ k.transpose(-1, -2) / math.sqrt(D)     # [B, H_kv, H / H_kv, S]
    scores = scores.masked_fill(~attn_mask.view(B, 1, 1, S), float("-inf"))
    return (scores.softmax(-1) @ v).view(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.dim // config.n_head
        self.wq = nn.Linear(config.dim, config.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * self.head_dim, config.dim, bias=False)

    def forward(self, x, rotation, attn_mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start:start + T] = k
            cache.values[layer][:, :, start:start + T] = v
            k = cache.keys[layer][:, :, :start + T]           # [B, H_kv, S, D], S = start + T
            v = cache.values[layer][:, :, :start + T]
        # each k/v head serves n_head // n_kv_head consecutive query heads (Llama's grouping); enable_gqa shares
        # them without copying the cache every step
        gqa = self.n_kv_head != self.n_head
        if T == 1 and attn_mask is not None and x.device.type == "cpu":
            y = single_query_attention(q, k, v, attn_mask)
        elif attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, rotation, attn_mask, cache, layer):
        x = x + self.attention(self.attention_norm(x), rotation, attn_mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


# splitmix64 (Steele et al. 2014) in int64 tensors: torch's int64 arithmetic wraps like uint64, and a logical
# right shift is an arithmetic one masked to the bits that stay
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15 - 2**64, 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shift(z, 30)) * MIX1
    z = (z ^ _shift(z, 27)) * MIX2
    return z ^ _shift(z, 31)


def sample_key(*parts: int) -> int:
    """One int64 key from integers such as (seed, stream, iteration, prompt index, sample index): what a sampled
    response's every draw derives from (see row_uniforms)."""
    key = torch.zeros((), dtype=torch.long)
    for part in parts:
        key = _mix(key + GOLDEN + part)
    return int(key)


def row_uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform draw in (0, 1) per row, float32 [B], from each row's int64 key [B] and the step: a counter-based
    generator, so a row's draws depend on its key alone, never on the batch, the chunk or the rank it is in."""
    bits = _shift(_mix(keys + torch.tensor(GOLDEN, device=keys.device) * (step + 1)), 41)  # top 23 bits, [B]
    return (bits.float() + 0.5) / 2**23  # exact in float32: 24 significant bits


def sample_token(logits, temperature: float, top_k: int | None, keys: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row of logits [B, V]: greedy at temperature 0, else drawn from softmax(logits / T) over the
    top k, by inverse transform: the first token whose cumulative probability reaches the row's uniform draw."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    cumulative = F.softmax(logits.float(), dim=-1).cumsum(-1)                # [B, V]
    target = row_uniforms(keys, step)[:, None] * cumulative[:, -1:]         # [B, 1]: scaled to the row's total
    # a zero-probability token leaves the cumulative sum flat, so the first index reaching the target never is one
    return torch.searchsorted(cumulative, target)[:, 0].clamp(max=logits.size(-1) - 1)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        inv_freq = rope_frequencies(config.dim // config.n_head, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: the residual projections add up over 2 * n_layer sublayers
        for name, param in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", max_seq_len: int | None = None,
                        rope_scaling_factor: float | None = None) -> "GPT":
        """A Llama from a Meta folder (params.json + consolidated.*.pth) or a Hugging Face one (config.json +
        model.safetensors, or shards with model.safetensors.index.json), in float32 unless `dtype` is given.
        max_seq_len defaults to the checkpoint's context capped at 8192; rope_scaling_factor overrides the RoPE
        scaling factor (Meta's params.json for Llama 3.2 1B/3B lacks it: pass 32). See checkpoints.read_folder.

        Never two copies in memory: the model is built on the "meta" device (shapes only) and adopts the tensors."""
        fields, tensors = read_folder(path, dtype, device, max_seq_len, rope_scaling_factor,
                                      check_config=lambda fields: GPTConfig(**fields))  # GPTConfig's own checks
        config = GPTConfig(**fields)
        with torch.device("meta"):
            model = cls(config)
        if config.tie_embeddings:
            tensors["output.weight"] = tensors["tok_embeddings.weight"]
        model.load_state_dict(tensors, strict=True, assign=True)  # assign: adopt the tensors, no copy into meta ones
        if config.tie_embeddings:  # assign made two Parameters of one tensor; make it one, as __init__ does
            model.output.weight = model.tok_embeddings.weight
        # inv_freq is a non-persistent buffer (no checkpoint has it), so it is still on the meta device
        inv_freq = rope_frequencies(config.dim // config.n_head, config.rope_theta, config.rope_scaling)
        model.inv_freq = inv_freq.to(device)
        return model

    def save_pretrained(self, path, dtype: torch.dtype | None = None):
        """Write a Hugging Face Llama folder (config.json + model.safetensors) that from_pretrained and
        transformers' LlamaForCausalLM.from_pretrained read, in `dtype` (default: the weights' own). See
        checkpoints.write_hf_folder."""
        # lora.LoRALinear's parameters are lora_A and lora_B; looking at names keeps this module free of lora.py
        if any("lora_" in name for name, _ in self.named_parameters()):
            raise ValueError("save_pretrained writes plain Llama weights: call merge_lora(model) first")
        write_hf_folder(path, asdict(self.config), self.state_dict(), dtype or self.tok_embeddings.weight.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, tokens, mask=None, cache: KVCache | None = None, positions=None):
        """The final normed hidden states [B, T, C] of `tokens` [B, T].

        mask: optional bool [B, S] of real tokens over every position so far (S = cache.length + T), for padded
        batches; None means no padding. With a cache, `tokens` continue the cached sequence.
        positions: each token's position [B, T], given for rows that pack several sequences (dpo.pack_pairs: a
        prompt, then two responses to it); `mask` is then bool [B, T, T], which tokens each token attends to."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.max_seq_len}")
        attn_mask = None
        if positions is not None:  # packed rows: the caller says which token sees which
            if cache is not None or mask is None or mask.shape != (B, T, T) or positions.shape != (B, T):
                raise ValueError("hidden_states: positions [B, T] go with a mask [B, T, T] and no cache")
            attn_mask = mask[:, None]                                                  # [B, 1, T, T]
        else:
            if mask is not None and cache is None and not (mask[:, 1:] & ~mask[:, :-1]).any():
                mask = None  # right padding only: under a causal mask it cannot reach a real token: skip the mask
            if mask is None and (cache is None or start == 0) and T > 1:
                positions = torch.arange(T, device=tokens.device).expand(B, T)
            else:
                if mask is None:
                    mask = torch.ones(B, start + T, dtype=torch.bool, device=tokens.device)
                # a token's position is the number of real tokens before it, whatever padding precedes it
                positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, start:]        # [B, T]
                query_index = torch.arange(start, start + T, device=tokens.device)[:, None]
                key_index = torch.arange(start + T, device=tokens.device)[None, :]
                causal = key_index <= query_index                                      # [T, S]
                attn_mask = (causal & mask[:, None, :]) | (key_index == query_index)   # [B, T, S]: self always seen
                attn_mask = attn_mask[:, None]                                         # [B, 1, T, S]
        angles = positions[..., None].float() * self.inv_freq                        # [B, T, D/2]
        rotation = torch.complex(angles.cos(), angles.sin())                       # [B, T, D/2] complex
        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotation, attn_mask, cache, i)
        if cache is not None:
            cache.length = start + T
        return self.norm(x)

    def forward(self, tokens, mask=None, cache: KVCache | None = None, positions=None):
        """Logits [B, T, V] of the next token at every position of `tokens` [B, T] (see hidden_states)."""
        return self.output(self.hidden_states(tokens, mask, cache, positions)).float()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, stop_ids=(), generator: torch.Generator | None = None,
                 return_logps: bool = False, keys: list[int] | None = None):
        """Sample a response for each prompt with a KV cache; prompts may have different lengths.

        Returns one list of response tokens per prompt (the prompt excluded). A row that samples a stop id ends with
        it; a row without one was cut at max_new_tokens. temperature 0 is greedy. With return_logps, also returns
        each token's log-prob under the model itself (temperature 1, no top-k): the numbers a KL estimate needs.

        Randomness: `keys` gives each row's int64 key (sample_key), from which all its draws derive, so a row's
        response does not depend on the batch it is sampled in; without keys, each row's key is drawn from
        `generator` (torch's global generator when None)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and every prompt at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                             f"model's context of {self.config.max_seq_len} tokens")
        device = self.output.weight.device
        B = len(prompts)
        if keys is not None and len(keys) != B:
            raise ValueError(f"generate: {len(keys)} keys for {B} prompts")
        if keys is None:
            keys = torch.randint(-2**63, 2**63 - 1, (B,), generator=generator,
                                 device=generator.device if generator is not None else "cpu").tolist()
        keys = torch.tensor(keys, dtype=torch.long, device=device)
        # rows with the same prompt (n samples of it) share its prefill: each distinct prompt is computed once
        distinct = list(dict.fromkeys(map(tuple, prompts)))                # in order of first appearance
        index = {prompt: i for i, prompt in enumerate(distinct)}
        source = torch.tensor([index[tuple(p)] for p in prompts], device=device)   # [B] each row's distinct prompt
        # left-pad so that every row's next token is at the same column; padding lives only in `mask`
        tokens = torch.zeros(len(distinct), longest, dtype=torch.long, device=device)
        mask = torch.zeros(len(distinct), longest + max_new_tokens, dtype=torch.bool, device=device)
        for row, prompt in enumerate(distinct):
            tokens[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt):] = True
        mask[:, longest:] = True  # generated tokens are always real
        cache = KVCache(self.config, len(distinct), longest + max_new_tokens, device, self.output.weight.dtype)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)            # the prompt each row of the (shrinking) batch belongs to
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new_tokens = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
        new_logps = torch.zeros(B, max_new_tokens, device=device) if return_logps else None
        # the prompt's last position only: its every position over a 128256-id vocabulary would cost gigabytes
        logits = self.output(self.hidden_states(tokens, mask[:, :longest], cache)[:, -1]).float()   # [B_distinct, V]
        if len(distinct) < B:  # each row gets a copy of its prompt's keys, values, logits and mask
            cache.select(source)
            logits, mask = logits[source], mask[source]                                      # [B, V], [B, S]
        for step in range(max_new_tokens):
            next_token = sample_token(logits, temperature, top_k, keys, step)          # [B]
            new_tokens[rows, step] = next_token
            if return_logps:  # a log-softmax over the vocabulary each step: only when asked (the draw ignores it)
                new_logps[rows, step] = F.log_softmax(logits.float(), -1).gather(1, next_token[:, None])[:, 0]
            done |= torch.isin(next_token, stop)
            if done.all() or step == max_new_tokens - 1:
                break
            if done.float().mean() > 0.25:  # drop finished rows from the batch and the cache: they cost compute
                keep = ~done
                rows, next_token, mask, done, keys = rows[keep], next_token[keep], mask[keep], done[keep], keys[keep]
                cache.select(keep)
            logits = self(next_token[:, None], mask[:, :cache.length + 1], cache)[:, -1]
        responses = []
        for row_tokens in new_tokens.tolist():
            # a row ends at its first stop id (included); nothing after it counts
            end = next((i + 1 for i, t in enumerate(row_tokens) if t in stop_ids or t < 0), len(row_tokens))
            end -= 1 if row_tokens[end - 1] < 0 else 0
            responses.append(row_tokens[:end])
        if not return_logps:
            return responses
        return responses, [row_logps[:len(r)] for r, row_logps in zip(responses, new_logps.tolist())]


KV_CACHE_BUDGET = 2**30  # bytes of one sampling chunk's KV cache


def sample(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, stop_ids, keys: list[int],
           chunk: int | None = None) -> list[list[int]]:
    """One response per prompt from `model.generate` (no top-k), each drawn from its own key (sample_key), `chunk`
    prompts at a time: the KV cache of a chunk is what bounds memory, so many prompts never need one giant cache.
    By default a chunk is as many prompts as a KV_CACHE_BUDGET cache holds, at most 1024 (the world's: always 1024;
    Llama 3.1 8B at 512 tokens: 16). Neither the chunking nor the ranks change a response: each row's draws follow
    its key."""
    if chunk is None:
        c, dtype_bytes = model.config, next(model.parameters()).element_size()
        per_token = c.n_layer * 2 * c.n_kv_head * (c.dim // c.n_head) * dtype_bytes
        chunk = max(1, min(1024, KV_CACHE_BUDGET // (per_token * (max(map(len, prompts), default=0) + max_new_tokens))))
    n = len(prompts)
    mine = shard(n)  # under torchrun, this rank's share of the prompts (distributed.py); all of them otherwise
    prompts, keys = [prompts[i] for i in mine], [keys[i] for i in mine]
    responses = []
    with full_weights(model):  # FSDP2: the whole model on each rank while it samples (distributed.py)
        for start in range(0, len(prompts), chunk):
            responses += model.generate(prompts[start:start + chunk], max_new_tokens, temperature,
                                        stop_ids=stop_ids, keys=keys[start:start + chunk])
    return gather(n, responses)


if __name__ == "__main__":
    import tempfile
    for name in ("tiny", "small"):
        print(f"{name}: {GPT(GPTConfig.preset(name)).num_params() / 1e6:.2f} M parameters")
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"))
    print(model.generate([[1, 2, 3], [4]], max_new_tokens=8, temperature=1.0))
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model.save_pretrained(tmp)
        again = GPT.from_pretrained(tmp).eval()
        print("logits identical after a save_pretrained / from_pretrained round trip:",
              torch.equal(model(tokens), again(tokens)))
