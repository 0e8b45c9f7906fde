"""Tests of checkpoints.py: Llama checkpoint loading and saving, against Hugging Face transformers' Llama.

Tiny random Llamas (hidden 64, 2 layers, 4 heads, 2 kv heads: grouped-query attention) in four variants (tied and
untied output matrix; Llama 3.1 RoPE scaling with factor 8 and 32) are written as a single-file and a sharded
Hugging Face folder and as a Meta folder (q and k permuted, keys renamed, here in the test), and must give
transformers' float32 logits (atol 1e-5) and its 20 greedy tokens. Seeded and offline; no test here is random.
"""
import dataclasses
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers' LlamaForCausalLM is the reference")

from checkpoints import expected_shapes, read_folder  # noqa: E402
from model import GPT, GPTConfig, rope_frequencies  # noqa: E402

VOCAB = 300
LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)  # Meta's constants: a Meta folder cannot say otherwise
VARIANTS = {
    "tied": dict(tie_word_embeddings=True),
    "untied": dict(tie_word_embeddings=False),
    "llama3_x8": dict(tie_word_embeddings=False, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
    "llama3_x32": dict(tie_word_embeddings=True, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
}
# Meta's name for each Hugging Face name (written out here so that the test does not borrow checkpoints.py's table)
META_NAME = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))  # a batch of two rows
PROMPTS = [IDS[0, :12].tolist(), IDS[1, :7].tolist()]  # different lengths: the sampler left-pads




def hf_llama(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    scaled = "rope_scaling" in VARIANTS[variant]
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=16384 if scaled else 256, rope_theta=500000.0, rms_norm_eps=1e-6,
        # std 0.1 rather than 0.02 gives logits of order 1, so that RoPE scaling changes them visibly (see
        # test_rope_scaling_changes_the_logits) and greedy decoding meets no near-ties
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no early stop
        **VARIANTS[variant])
    return transformers.LlamaForCausalLM(config).eval()


def hf_greedy(hf, prompts, n):
    longest = max(map(len, prompts))
    ids, attention = torch.zeros(len(prompts), longest, dtype=torch.long), torch.zeros(len(prompts), longest)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):], attention[row, longest - len(prompt):] = torch.tensor(prompt), 1
    out = hf.generate(input_ids=ids, attention_mask=attention.long(), do_sample=False, max_new_tokens=n,
                      pad_token_id=0)
    return out[:, longest:].tolist()


def meta_name(hf_name: str) -> str:
    if not hf_name.startswith("model.layers."):
        return META_NAME[hf_name]
    _, _, layer, module = hf_name.removesuffix(".weight").split(".", 3)  # model, layers, i, self_attn.q_proj
    return f"layers.{layer}.{META_NAME[module]}.weight"


def to_meta(hf) -> dict:
    """The HF model's weights under Meta's names, with q and k rows permuted from HF's halves layout to Meta's
    adjacent pairs: HF's rotary code pairs dim j of a head with j + D/2, Meta's pairs 2i with 2i + 1."""
    c, state = hf.config, {}
    for name, w in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            d_out, d_in = w.shape
            w = w.view(n, 2, d_out // n // 2, d_in).transpose(1, 2).reshape(d_out, d_in)
        state[meta_name(name)] = w.clone()
    return state


def write_meta(hf, folder, n_shards=1, embedding_split=0, with_factor=False):
    """params.json + consolidated.{00,01}.pth. With 2 shards: rows of wq/wk/wv/w1/w3/output, columns of wo/w2,
    tok_embeddings by rows (Llama 3's vocab split) or columns (Llama 2's), norms replicated."""
    c = hf.config
    folder.mkdir(parents=True)
    scaling = c.rope_parameters.get("rope_type") == "llama3"
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                  ffn_dim_multiplier=0.75,  # int(2 * 4 * 64 / 3) = 170; * 0.75 = 127; up to a multiple of 32: 128
                  norm_eps=1e-6, rope_theta=500000.0, use_scaled_rope=scaling)
    if with_factor:
        params["rope_scaling_factor"] = c.rope_parameters["factor"]
    (folder / "params.json").write_text(json.dumps(params))
    state = to_meta(hf)
    for rank in range(n_shards):
        shard = {}
        for name, w in state.items():
            if n_shards == 1 or w.dim() == 1:
                shard[name] = w
                continue
            dim = embedding_split if name == "tok_embeddings.weight" else int(name.endswith(("wo.weight", "w2.weight")))
            shard[name] = w.chunk(n_shards, dim)[rank].clone()
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (HF model, its greedy tokens, {format: folder})."""
    out = {}
    for variant in VARIANTS:
        hf, root = hf_llama(variant), tmp_path_factory.mktemp(variant)
        hf.save_pretrained(root / "single")
        hf.save_pretrained(root / "sharded", max_shard_size="100KB")
        write_meta(hf, root / "meta")
        folders = {"single": root / "single", "sharded": root / "sharded", "meta": root / "meta"}
        if variant == "llama3_x8":
            write_meta(hf, root / "meta_2shards", n_shards=2, embedding_split=0, with_factor=True)
            write_meta(hf, root / "meta_2shards_cols", n_shards=2, embedding_split=1)
            folders.update(meta_2shards=root / "meta_2shards", meta_2shards_cols=root / "meta_2shards_cols")
        with torch.no_grad():
            out[variant] = (hf, hf_greedy(hf, PROMPTS, 20), folders)
    return out


def load(folder, variant, **kwargs):
    # Meta's params.json cannot say 32, so a Llama 3.2 1B/3B-like folder is loaded the way those must be
    factor = 32.0 if variant == "llama3_x32" and "meta" in folder.name else None
    return GPT.from_pretrained(folder, rope_scaling_factor=factor, **kwargs).eval()


CASES = [(v, f) for v in VARIANTS for f in ("single", "sharded", "meta")] + \
        [("llama3_x8", "meta_2shards"), ("llama3_x8", "meta_2shards_cols")]


@pytest.mark.parametrize("variant,fmt", CASES)
def test_logits_and_greedy_tokens_equal_transformers(checkpoints, variant, fmt):
    hf, hf_tokens, folders = checkpoints[variant]
    model = load(folders[fmt], variant)
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    if model.config.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=0)
    assert model.generate(PROMPTS, 20, temperature=0) == hf_tokens


def test_rope_scaling_changes_the_logits(checkpoints):
    """The scaled variants would pass even if scaling were ignored, unless it changes the logits at our positions."""
    hf, _, _ = checkpoints["llama3_x8"]
    plain = hf_llama("untied")
    plain.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (hf(IDS).logits - plain(IDS).logits).abs().max() > 1e-3
    scaled = rope_frequencies(16, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position=8192))
    assert not torch.equal(scaled, rope_frequencies(16, 500000.0, None))


def test_meta_rope_factor_defaults_to_8_and_is_read_or_overridden(checkpoints):
    folders = checkpoints["llama3_x32"][2]
    with pytest.warns(UserWarning, match="rope_scaling_factor=32"):  # tied + scaled: looks like Llama 3.2 1B/3B
        assert GPT.from_pretrained(folders["meta"]).config.rope_scaling["factor"] == 8.0
    assert GPT.from_pretrained(folders["meta"], rope_scaling_factor=32).config.rope_scaling["factor"] == 32.0
    folders = checkpoints["llama3_x8"][2]  # meta_2shards's params.json carries rope_scaling_factor
    assert json.loads((folders["meta_2shards"] / "params.json").read_text())["rope_scaling_factor"] == 8.0
    assert GPT.from_pretrained(folders["meta_2shards"], rope_scaling_factor=4).config.rope_scaling["factor"] == 4.0


def test_bfloat16_load(checkpoints):
    hf, _, folders = checkpoints["untied"]
    model = GPT.from_pretrained(folders["single"], dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_loads_in_transformers_and_back(checkpoints, variant, tmp_path):
    hf, _, folders = checkpoints[variant]
    load(folders["meta"], variant).save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = GPT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [
    dict(tie_embeddings=True),                                   # tied, GQA (the tiny preset)
    dict(tie_embeddings=False),                                  # untied, GQA
    dict(n_head=4, n_kv_head=4, tie_embeddings=False),           # untied, MHA
    dict(dim=96, n_head=6, n_kv_head=1, ffn_hidden=256, n_layer=3, vocab_size=300),  # tied, one k/v head
])
def test_shape_table_equals_the_models_state_dict(overrides):
    """checkpoints.py writes Llama's layout out rather than build a GPT: it must be GPT's state dict exactly."""
    config = GPTConfig.preset("tiny", **overrides)
    with torch.device("meta"):  # shapes only
        shapes = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        del shapes["output.weight"]  # a tied output matrix is stored once, as tok_embeddings.weight
    assert list(expected_shapes(dataclasses.asdict(config)).items()) == list(shapes.items())


@pytest.mark.parametrize("fmt", ["single", "sharded", "meta"])
def test_read_folder_gives_every_config_field(checkpoints, fmt):
    """A field the readers forgot would silently take GPTConfig's default in from_pretrained."""
    fields, _ = read_folder(checkpoints["llama3_x8"][2][fmt])
    assert fields.keys() == {f.name for f in dataclasses.fields(GPTConfig)}


# --- bad input: one ValueError that names the file and the key ---

def copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"neither a Meta checkpoint \(params.json \+ consolidated.\*.pth\)"):
        GPT.from_pretrained(tmp_path)


def test_index_listing_a_missing_shard_is_refused(checkpoints, tmp_path):
    folder = copy_folder(checkpoints["untied"][2]["sharded"], tmp_path / "x")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.layers.1.mlp.up_proj.weight"]
    (folder / shard).unlink()
    with pytest.raises(ValueError, match=rf"^{shard}: file not found, but model.safetensors.index.json lists it "
                                         r"for model\.\S+\.weight$"):
        GPT.from_pretrained(folder)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors"])
def test_index_shard_paths_must_stay_inside_the_folder(checkpoints, tmp_path, escape):
    # an index is data from the internet: it must not make the loader open a file elsewhere on the machine
    folder = copy_folder(checkpoints["untied"][2]["sharded"], tmp_path / "x")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = escape
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json: shard '{re.escape(escape)}' is not a file "
                                         r"name inside"):
        GPT.from_pretrained(folder)


@pytest.mark.parametrize("fmt", ["single", "sharded"])
def test_missing_tensor_is_refused(checkpoints, tmp_path, fmt):
    folder = copy_folder(checkpoints["untied"][2][fmt], tmp_path / "x")
    key = "model.layers.1.mlp.up_proj.weight"
    file = "model.safetensors"
    if fmt == "sharded":
        file = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    rewrite_safetensors(folder / file, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"^{file}: missing tensor {key}$"):
        GPT.from_pretrained(folder)


def test_missing_tensor_in_meta_folder_is_refused(checkpoints, tmp_path):
    folder = copy_folder(checkpoints["untied"][2]["meta"], tmp_path / "x")
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    del state["layers.1.feed_forward.w3.weight"]
    torch.save(state, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"^consolidated.00.pth: missing tensor layers.1.feed_forward.w3.weight$"):
        GPT.from_pretrained(folder)


def test_unexpected_tensor_is_refused(checkpoints, tmp_path):
    folder = copy_folder(checkpoints["tied"][2]["single"], tmp_path / "x")
    rewrite_safetensors(folder / "model.safetensors",
                        lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(ValueError, match=r"^model.safetensors: unexpected tensor model.layers.0.self_attn.q_norm"):
        GPT.from_pretrained(folder)


def test_shape_not_matching_the_config_is_refused(checkpoints, tmp_path):
    folder = copy_folder(checkpoints["tied"][2]["single"], tmp_path / "x")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"^model.safetensors: tensor model.layers.0.mlp.(gate|up|down)_proj.weight "
                                         r"has shape \((128, 64|64, 128)\) but config.json implies"):
        GPT.from_pretrained(folder)
