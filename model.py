"""
A minimal Llama-style decoder and its sampler.

What it owns: `GPTConfig` (one dataclass, with named presets), `GPT` (token embedding, RMSNorm, rotary position
embedding with Llama 3.1 frequency scaling, grouped-query attention through F.scaled_dot_product_attention,
SwiGLU feed-forward, optionally tied output matrix) and `GPT.generate`, batched sampling with a KV cache over
prompts of different lengths. Below GPT: `GPT.from_pretrained` / `save_pretrained` for Meta and Hugging Face
Llama 3.x checkpoints, and LoRA by hand (`LoRALinear`, `add_lora`, `lora_disabled`, `merge_lora`; Hu et al. 2021).

Module attribute names are the keys of Meta's Llama checkpoints (`tok_embeddings`, `layers.{i}.attention.wq`,
`feed_forward.w1`, `attention_norm`, ...), so a Meta state dict loads with no renaming.

Padding. A batch may be left-padded (prompts for sampling) or right-padded (training pairs). Padding is described
by a boolean `mask[B, S]` of real tokens, never by a token value (the model can sample the pad id). A token's
rotary position is the number of real tokens before it, so a row gives the same result whatever padding it got,
and every position may attend to itself so no attention row is ever empty.

    python model.py   # prints the presets' parameter counts and a sample from an untrained tiny model
"""
import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle position * inv_freq[i], as Meta's complex-number code does.
    x: [B, T, H, D]; cos, sin: [B, T, D/2]."""
    x_pairs = x.float().unflatten(-1, (-1, 2))           # [B, T, H, D/2, 2]
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]     # broadcast over heads
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)                 # [B, T, H, D]


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_len` positions."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        head_dim = config.dim // config.n_head
        shape = (batch_size, config.n_kv_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled so far (the same for every row; padding is in the mask)

    def select(self, keep: torch.Tensor):
        """Keep only the rows where `keep` [B] is True (rows that finished sampling leave the batch)."""
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.dim // config.n_head
        self.wq = nn.Linear(config.dim, config.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * self.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
        if attn_mask is None:
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

    def forward(self, x, cos, sin, attn_mask, cache, layer):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


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
        scaling factor (Meta's params.json for Llama 3.2 1B/3B lacks it: pass 32). See load_llama below."""
        return load_llama(cls, path, dtype, device, max_seq_len, rope_scaling_factor)

    def save_pretrained(self, path):
        """Write a Hugging Face Llama folder (config.json + model.safetensors) that from_pretrained and
        transformers' LlamaForCausalLM.from_pretrained read. See save_hf_folder below."""
        save_hf_folder(self, path)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, tokens, mask=None, cache: KVCache | None = None):
        """The final normed hidden states [B, T, C] of `tokens` [B, T].

        mask: optional bool [B, S] of real tokens over every position so far (S = cache.length + T), for padded
        batches; None means no padding. With a cache, `tokens` continue the cached sequence."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.max_seq_len}")
        attn_mask = None
        if mask is not None and cache is None and not (mask[:, 1:] & ~mask[:, :-1]).any():
            mask = None  # right padding only: under a causal mask it cannot reach a real token, so skip the mask
        if mask is None and (cache is None or start == 0) and T > 1:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            if mask is None:
                mask = torch.ones(B, start + T, dtype=torch.bool, device=tokens.device)
            # a token's position is the number of real tokens before it, whatever padding precedes it
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, start:]            # [B, T]
            query_index = torch.arange(start, start + T, device=tokens.device)[:, None]
            key_index = torch.arange(start + T, device=tokens.device)[None, :]
            causal = key_index <= query_index                                          # [T, S]
            attn_mask = (causal & mask[:, None, :]) | (key_index == query_index)       # [B, T, S]: self always visible
            attn_mask = attn_mask[:, None]                                             # [B, 1, T, S]
        angles = positions[..., None].float() * self.inv_freq                        # [B, T, D/2]
        cos, sin = angles.cos(), angles.sin()
        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, cache, i)
        if cache is not None:
            cache.length = start + T
        return self.norm(x)

    def forward(self, tokens, mask=None, cache: KVCache | None = None):
        """Logits [B, T, V] of the next token at every position of `tokens` [B, T] (see hidden_states)."""
        return self.output(self.hidden_states(tokens, mask, cache)).float()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, stop_ids=(), generator: torch.Generator | None = None,
                 return_logps: bool = False):
        """Sample a response for each prompt with a KV cache; prompts may have different lengths.

        Returns one list of response tokens per prompt (the prompt excluded). A row that samples a stop id ends with
        it; a row without one was cut at max_new_tokens. temperature 0 is greedy. With return_logps, also returns
        each token's log-prob under the model itself (temperature 1, no top-k): the numbers a KL estimate needs."""
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
        # left-pad so that every row's next token is at the same column; padding lives only in `mask`
        tokens = torch.zeros(B, longest, dtype=torch.long, device=device)
        mask = torch.zeros(B, longest + max_new_tokens, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt):] = True
        mask[:, longest:] = True  # generated tokens are always real
        cache = KVCache(self.config, B, longest + max_new_tokens, device, self.output.weight.dtype)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)            # the prompt each row of the (shrinking) batch belongs to
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new_tokens = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
        new_logps = torch.zeros(B, max_new_tokens, device=device)
        logits = self(tokens, mask[:, :longest], cache)[:, -1]                       # [B, V]
        for step in range(max_new_tokens):
            next_token = sample_token(logits, temperature, top_k, generator)           # [B]
            new_tokens[rows, step] = next_token
            new_logps[rows, step] = F.log_softmax(logits.float(), -1).gather(1, next_token[:, None])[:, 0]
            done |= torch.isin(next_token, stop)
            if done.all() or step == max_new_tokens - 1:
                break
            if done.float().mean() > 0.25:  # drop finished rows from the batch and the cache: they cost compute
                keep = ~done
                rows, next_token, mask, done = rows[keep], next_token[keep], mask[keep], done[keep]
                cache.select(keep)
            logits = self(next_token[:, None], mask[:, :cache.length + 1], cache)[:, -1]
        responses, logps = [], []
        for row_tokens, row_logps in zip(new_tokens.tolist(), new_logps.tolist()):
            # a row ends at its first stop id (included); nothing after it counts
            end = next((i + 1 for i, t in enumerate(row_tokens) if t in stop_ids or t < 0), len(row_tokens))
            end -= 1 if row_tokens[end - 1] < 0 else 0
            responses.append(row_tokens[:end])
            logps.append(row_logps[:end])
        return (responses, logps) if return_logps else responses


def sample_token(logits, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token per row of logits [B, V]: greedy at temperature 0, else softmax(logits / T) over the top k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Llama checkpoints. Meta's folders load with no renaming (our names are Meta's); Hugging Face's need a rename
# table and a permutation of wq and wk, because HF's rotary code pairs dim j with j + D/2 where Meta's pairs
# 2i with 2i + 1. Loading never holds two copies: the model is built on the "meta" device (shapes only), the
# files are memory-mapped, each tensor is cast on its own, and load_state_dict(assign=True) adopts the tensors.

HF_TO_META = {  # Hugging Face name -> ours (Meta's); {i} is the layer index
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}
META_TO_HF = {meta: hf for hf, meta in HF_TO_META.items()}
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # one file, or the index of its shards
RECOMPUTED = ("rope.freqs", "rotary_emb.inv_freq")  # rotary tables that Llama 2 / old HF files carry; we recompute


def rename(name: str, table: dict) -> str | None:
    """Map a checkpoint name through HF_TO_META or META_TO_HF; None for a name the table does not know."""
    match = re.fullmatch(r"((?:model\.)?layers)\.(\d+)\.(.+)", name)
    if match is None:
        return table.get(name)
    renamed = table.get(f"{match[1]}.{{i}}.{match[3]}")
    return renamed.format(i=match[2]) if renamed else None


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of each head of an HF q/k projection from [halves] to [adjacent pairs] layout."""
    d_out, d_in = w.shape
    return w.view(n_heads, 2, d_out // n_heads // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_hf_to_meta."""
    d_out, d_in = w.shape
    return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def config_from_meta_params(params: dict, vocab_size: int, tied: bool, max_seq_len: int | None,
                            rope_scaling_factor: float | None) -> GPTConfig:
    """GPTConfig from Meta's params.json. The FFN width is not stored: Meta's FeedForward derives it from dim."""
    dim = params["dim"]
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = params["multiple_of"] * -(-hidden // params["multiple_of"])  # round up to a multiple
    scaling = None
    if params.get("use_scaled_rope"):
        # Meta's reference code hard-codes factor 8 (right for 3.1); Llama 3.2 1B/3B were trained with 32 but
        # their params.json may not say so, so the caller must pass rope_scaling_factor=32 for them.
        factor = rope_scaling_factor or params.get("rope_scaling_factor")
        if factor is None and tied:  # 3.2 1B/3B are the Llama 3 models with a tied output matrix
            warnings.warn("params.json: use_scaled_rope without a factor; using Meta's default 8, but Llama 3.2 "
                          "1B/3B need rope_scaling_factor=32")
        scaling = dict(factor=float(factor or 8.0), low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position=8192)
    return GPTConfig(vocab_size=vocab_size, dim=dim, n_layer=params["n_layers"], n_head=params["n_heads"],
                     n_kv_head=params.get("n_kv_heads") or params["n_heads"], ffn_hidden=hidden,
                     norm_eps=params["norm_eps"], max_seq_len=max_seq_len or 8192,
                     rope_theta=params.get("rope_theta", 10000.0), rope_scaling=scaling, tie_embeddings=tied)


def config_from_hf(cfg: dict, max_seq_len: int | None, rope_scaling_factor: float | None) -> GPTConfig:
    """GPTConfig from a Hugging Face config.json (transformers 4 `rope_scaling` or 5 `rope_parameters`)."""
    if cfg.get("model_type", "llama") != "llama" or cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: model_type {cfg.get('model_type')!r} with hidden_act "
                         f"{cfg.get('hidden_act')!r} is not a Llama")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
    try:
        scaling = None if rope_type == "default" else dict(
            factor=float(rope_scaling_factor or rope["factor"]), low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"], original_max_position=rope["original_max_position_embeddings"])
        dim, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim", dim // n_head) != dim // n_head:
            raise ValueError(f"config.json: head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads")
        return GPTConfig(vocab_size=cfg["vocab_size"], dim=dim, n_layer=cfg["num_hidden_layers"], n_head=n_head,
                         n_kv_head=cfg.get("num_key_value_heads") or n_head, ffn_hidden=cfg["intermediate_size"],
                         norm_eps=cfg["rms_norm_eps"],
                         max_seq_len=max_seq_len or min(cfg["max_position_embeddings"], 8192),
                         rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope_scaling=scaling,
                         tie_embeddings=cfg.get("tie_word_embeddings", False))
    except KeyError as e:
        raise ValueError(f"config.json: missing key {e}") from None


def expected_shapes(config: GPTConfig) -> dict:
    """Our name -> shape of every tensor a checkpoint of `config` must hold (a tied output is stored once)."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        shapes = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        del shapes["output.weight"]
    return shapes


def concat_meta_shards(name: str, pieces: list, files: list, shape: tuple) -> torch.Tensor:
    """Join one tensor's model-parallel slices. Each rank holds rows (wq, wk, wv, w1, w3, output) or columns (wo,
    w2) of a matrix; tok_embeddings is split by columns in Llama 2 but by vocabulary rows in Llama 3; norms are
    replicated. So the split dim is the one whose slices add up to the full size the config implies."""
    shapes = [tuple(p.shape) for p in pieces]
    if all(s == shape for s in shapes):
        return pieces[0]  # the only shard, or a replicated norm
    for dim in range(len(shape)):
        others_match = all(s[:dim] + s[dim + 1:] == shape[:dim] + shape[dim + 1:] for s in shapes)
        if len(pieces) > 1 and others_match and sum(s[dim] for s in shapes) == shape[dim]:
            return torch.cat(pieces, dim)
    got = shapes[0] if len(shapes) == 1 else f"slices {shapes} in {len(files)} shards, which do not join into"
    raise ValueError(f"{files[0]}: tensor {name} has shape {got} but params.json implies {shape}")


def read_meta_checkpoint(folder: Path, dtype, device, max_seq_len, rope_scaling_factor):
    """GPTConfig and our name -> tensor, from params.json + consolidated.00.pth (+ .01, ... for model-parallel)."""
    files = sorted(folder.glob("consolidated.*.pth"))
    # mmap: tensors stay views of the file until used; weights_only: a checkpoint must not be able to run code
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    for shard in shards:
        for name in RECOMPUTED:
            shard.pop(name, None)
    if "tok_embeddings.weight" not in shards[0]:
        raise ValueError(f"{files[0].name}: missing tensor tok_embeddings.weight")
    params = json.loads((folder / "params.json").read_text())
    vocab_size = params.get("vocab_size", -1)
    if vocab_size <= 0:  # Llama 2 writes -1 (the tokenizer decides); its embedding is split by columns, not rows
        vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    try:
        config = config_from_meta_params(params, vocab_size, "output.weight" not in shards[0], max_seq_len,
                                         rope_scaling_factor)
    except KeyError as e:
        raise ValueError(f"params.json: missing key {e}") from None
    expected = expected_shapes(config)
    for file, shard in zip(files, shards):  # every rank holds a slice of every tensor
        unexpected, missing = sorted(shard.keys() - expected.keys()), sorted(expected.keys() - shard.keys())
        if unexpected:
            raise ValueError(f"{file.name}: unexpected tensor {unexpected[0]}")
        if missing:
            raise ValueError(f"{file.name}: missing tensor {missing[0]}")
    names = [f.name for f in files]
    return config, {name: concat_meta_shards(name, [s[name] for s in shards], names, shape).to(device, dtype)
                    for name, shape in expected.items()}


def read_hf_checkpoint(folder: Path, dtype, device, max_seq_len, rope_scaling_factor):
    """GPTConfig and our-name -> tensor from config.json + model.safetensors or indexed model-*-of-*.safetensors."""
    from safetensors import safe_open
    config = config_from_hf(json.loads((folder / "config.json").read_text()), max_seq_len, rope_scaling_factor)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shard_of = json.loads(index.read_text())["weight_map"]  # checkpoint name -> shard file
        unlisted_in = index.name
    else:
        with safe_open(folder / "model.safetensors", "pt") as f:
            shard_of = dict.fromkeys(f.keys(), "model.safetensors")
        unlisted_in = "model.safetensors"
    found = {}  # checkpoint name -> (file, shape), read from the headers only
    for shard in sorted(set(shard_of.values())):
        if not (folder / shard).exists():
            key = next(k for k, s in shard_of.items() if s == shard)
            raise ValueError(f"{shard}: file not found, but {index.name} lists it for {key}")
        with safe_open(folder / shard, "pt") as f:
            found.update({k: (shard, f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(RECOMPUTED)})
    for key, shard in shard_of.items():
        if not key.endswith(RECOMPUTED) and (key not in found or found[key][0] != shard):
            raise ValueError(f"{shard}: missing tensor {key}")
    expected = {rename(name, META_TO_HF): shape for name, shape in expected_shapes(config).items()}
    for key, (file, shape) in found.items():
        if key not in expected:
            raise ValueError(f"{file}: unexpected tensor {key}")
        if tuple(shape) != expected[key]:
            raise ValueError(f"{file}: tensor {key} has shape {tuple(shape)} but config.json implies {expected[key]}")
    for key in sorted(expected.keys() - found.keys()):  # (one the index lists was caught above)
        raise ValueError(f"{unlisted_in}: missing tensor {key}")
    tensors = {}
    for shard in sorted(set(file for file, _ in found.values())):
        with safe_open(folder / shard, "pt", device=str(torch.device(device))) as f:
            for key in f.keys():
                if key.endswith(RECOMPUTED):
                    continue
                ours, t = rename(key, HF_TO_META), f.get_tensor(key).to(dtype=dtype)
                if ours.endswith(("attention.wq.weight", "attention.wk.weight")):
                    t = permute_hf_to_meta(t, config.n_head if ".wq." in ours else config.n_kv_head)
                tensors[ours] = t
    return config, tensors


def load_llama(cls, path, dtype=None, device="cpu", max_seq_len=None, rope_scaling_factor=None) -> "GPT":
    """The body of GPT.from_pretrained: detect the format, read and check the tensors, adopt them."""
    folder, dtype = Path(path), dtype or torch.float32
    if (folder / "params.json").exists() and any(folder.glob("consolidated.*.pth")):
        config, tensors = read_meta_checkpoint(folder, dtype, device, max_seq_len, rope_scaling_factor)
    elif (folder / "config.json").exists() and any((folder / f).exists() for f in HF_WEIGHTS):
        config, tensors = read_hf_checkpoint(folder, dtype, device, max_seq_len, rope_scaling_factor)
    else:
        raise ValueError(f"{folder}: neither a Meta checkpoint (params.json + consolidated.*.pth) nor a Hugging Face "
                         f"one (config.json + {' or '.join(HF_WEIGHTS)})")
    with torch.device("meta"):
        model = cls(config)
    if config.tie_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)  # assign: adopt our tensors, no copy into meta ones
    if config.tie_embeddings:  # assign made two Parameters of one tensor; make it one, as GPT.__init__ does
        model.output.weight = model.tok_embeddings.weight
    # inv_freq is a non-persistent buffer (no checkpoint has it), so it is still on the meta device
    model.inv_freq = rope_frequencies(config.dim // config.n_head, config.rope_theta, config.rope_scaling).to(device)
    return model


def save_hf_folder(model: "GPT", path):
    """The body of GPT.save_pretrained: config.json + model.safetensors in Hugging Face's Llama layout."""
    from safetensors.torch import save_file
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("save_pretrained writes plain Llama weights: call merge_lora(model) first")
    c, folder = model.config, Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and c.tie_embeddings:
            continue  # Hugging Face omits lm_head.weight when tie_word_embeddings is true
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = permute_meta_to_hf(t, c.n_head if ".wq." in name else c.n_kv_head)
        tensors[rename(name, META_TO_HF)] = t.detach().contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})  # transformers wants "format"
    rope_scaling = c.rope_scaling and dict(
        rope_type="llama3", factor=c.rope_scaling["factor"], low_freq_factor=c.rope_scaling["low_freq_factor"],
        high_freq_factor=c.rope_scaling["high_freq_factor"],
        original_max_position_embeddings=c.rope_scaling["original_max_position"])
    hf_config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", vocab_size=c.vocab_size,
        hidden_size=c.dim, intermediate_size=c.ffn_hidden, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.dim // c.n_head,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
        rope_scaling=rope_scaling, tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
        torch_dtype=str(model.tok_embeddings.weight.dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021, eq. 3): h = W x + (alpha / r) B A x with W frozen, A [r, in] and B [out, r] trained.
# The DPO reference policy is the same model with the adapters switched off, so it costs no second copy.

class LoRALinear(nn.Module):
    """A frozen nn.Linear (no bias) plus a trainable low-rank update. It keeps the base matrix as `weight`, so the
    state-dict key of the base (`layers.0.attention.wq.weight`) does not change; the adapter adds `lora_A`,
    `lora_B`. B starts at zero, so a fresh adapter leaves the model's output exactly as it was."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the paper's code does
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.enabled:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        return y


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), dropout: float = 0.0) -> nn.Module:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear, in place, and freeze every
    other parameter. alpha defaults to rank (scale 1). Returns the model."""
    model.requires_grad_(False)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"add_lora: no nn.Linear named any of {targets} (adapters already added?)")
    for name in names:
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(parent)
        setattr(module, child, LoRALinear(getattr(module, child), rank, rank if alpha is None else alpha, dropout))
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Within the block the model is its base (the DPO reference); each adapter's flag is restored after."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    flags = [m.enabled for m in adapters]
    try:
        for m in adapters:
            m.enabled = False
        yield model
    finally:
        for m, flag in zip(adapters, flags):
            m.enabled = flag


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base, W + (alpha / r) B A, and put plain nn.Linear modules back (frozen, as
    add_lora left them), so that save_pretrained writes ordinary Llama keys. Returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            merged = m.weight.float() + (m.lora_B.float() @ m.lora_A.float()) * m.scale  # sum in float32
            linear = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(merged.to(m.weight.dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


if __name__ == "__main__":
    for name in ("tiny", "small"):
        print(f"{name}: {GPT(GPTConfig.preset(name)).num_params() / 1e6:.2f} M parameters")
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"))
    print(model.generate([[1, 2, 3], [4]], max_new_tokens=8, temperature=1.0))
