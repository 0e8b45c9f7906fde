"""
Llama 3.x checkpoint folders as plain data: Meta folders in, Hugging Face folders in and out.

What it owns: `read_folder` (what GPT.from_pretrained reads) detects a Meta folder (params.json + consolidated.*.pth,
model-parallel shards joined) or a Hugging Face one (config.json + model.safetensors, or shards listed in
model.safetensors.index.json), checks every key and shape against the config and raises one ValueError naming the
file and the key, and returns the config as a dict of GPTConfig's fields plus the tensors under our (Meta's)
names; `write_hf_folder` (what GPT.save_pretrained writes) turns such fields and a state dict into a Hugging Face
folder that transformers' LlamaForCausalLM reads; `expected_shapes` is Llama's tensor layout written out for a
config. It imports nothing of this project: model.py imports it, so building the model from the data is model.py's
part (on the "meta" device, adopting the tensors), and so is refusing a model with unmerged LoRA adapters.

Names. Meta's folders load with no renaming, since GPT's attribute names are Meta's keys; Hugging Face's need the
rename table HF_TO_META and a permutation of the rows of wq and wk: HF's rotary code pairs dim j of a head with
j + D/2 where Meta's pairs 2i with 2i + 1, so HF stores each head's q/k rows in the other order.

Memory. Reading never holds two copies: the files are memory-mapped and each tensor is cast on its own; the model
then adopts the tensors (GPT.from_pretrained, load_state_dict(assign=True)).

What it simplifies: Llama only (no biases, no other rope types than default and llama3); it writes one
model.safetensors, never shards.

    python checkpoints.py   # a tiny random Llama state to a Hugging Face folder and back: every tensor identical
"""
import json
import re
import warnings
from pathlib import Path

import torch

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
                            rope_scaling_factor: float | None) -> dict:
    """GPTConfig's fields from Meta's params.json. The FFN width is not stored: Meta's FeedForward derives it from
    dim."""
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
    return dict(vocab_size=vocab_size, dim=dim, n_layer=params["n_layers"], n_head=params["n_heads"],
                n_kv_head=params.get("n_kv_heads") or params["n_heads"], ffn_hidden=hidden,
                norm_eps=params["norm_eps"], max_seq_len=max_seq_len or 8192,
                rope_theta=params.get("rope_theta", 10000.0), rope_scaling=scaling, tie_embeddings=tied)


def config_from_hf(cfg: dict, max_seq_len: int | None, rope_scaling_factor: float | None) -> dict:
    """GPTConfig's fields from a Hugging Face config.json (transformers 4 `rope_scaling` or 5 `rope_parameters`)."""
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
        return dict(vocab_size=cfg["vocab_size"], dim=dim, n_layer=cfg["num_hidden_layers"], n_head=n_head,
                    n_kv_head=cfg.get("num_key_value_heads") or n_head, ffn_hidden=cfg["intermediate_size"],
                    norm_eps=cfg["rms_norm_eps"], max_seq_len=max_seq_len or min(cfg["max_position_embeddings"], 8192),
                    rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope_scaling=scaling,
                    tie_embeddings=cfg.get("tie_word_embeddings", False))
    except KeyError as e:
        raise ValueError(f"config.json: missing key {e}") from None


def expected_shapes(c: dict) -> dict:
    """Our name -> shape of every tensor a checkpoint of config fields `c` must hold, in GPT's state-dict order (a
    tied output is stored once). Llama's layout written out, since this module may not build a GPT to ask it;
    tests/test_checkpoints.py checks the table against GPT's own state dict, so the two cannot drift apart."""
    dim, ffn, vocab = c["dim"], c["ffn_hidden"], c["vocab_size"]
    head_dim = dim // c["n_head"]
    q_rows, kv_rows = c["n_head"] * head_dim, c["n_kv_head"] * head_dim
    shapes = {"tok_embeddings.weight": (vocab, dim)}
    for i in range(c["n_layer"]):
        shapes.update({f"layers.{i}.{name}.weight": shape for name, shape in (
            ("attention_norm", (dim,)), ("attention.wq", (q_rows, dim)), ("attention.wk", (kv_rows, dim)),
            ("attention.wv", (kv_rows, dim)), ("attention.wo", (dim, q_rows)), ("ffn_norm", (dim,)),
            ("feed_forward.w1", (ffn, dim)), ("feed_forward.w2", (dim, ffn)), ("feed_forward.w3", (ffn, dim)))})
    shapes["norm.weight"] = (dim,)
    if not c["tie_embeddings"]:
        shapes["output.weight"] = (vocab, dim)
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


def read_meta_checkpoint(folder: Path, dtype, device, max_seq_len, rope_scaling_factor, check_config):
    """Config fields and our name -> tensor, from params.json + consolidated.00.pth (+ .01, ... for
    model-parallel)."""
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
    check_config(config)
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


def read_hf_checkpoint(folder: Path, dtype, device, max_seq_len, rope_scaling_factor, check_config):
    """Config fields and our name -> tensor, from config.json + model.safetensors or indexed
    model-*-of-*.safetensors."""
    from safetensors import safe_open
    config = config_from_hf(json.loads((folder / "config.json").read_text()), max_seq_len, rope_scaling_factor)
    check_config(config)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shard_of = json.loads(index.read_text())["weight_map"]  # checkpoint name -> shard file
        unlisted_in = index.name
        for shard in set(shard_of.values()):  # a shard is a file of this folder, never a path out of it
            if Path(shard).is_absolute() or ".." in Path(shard).parts or len(Path(shard).parts) != 1:
                raise ValueError(f"{index.name}: shard {shard!r} is not a file name inside {folder}")
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
                    t = permute_hf_to_meta(t, config["n_head"] if ".wq." in ours else config["n_kv_head"])
                tensors[ours] = t
    return config, tensors


def read_folder(path, dtype=None, device="cpu", max_seq_len=None, rope_scaling_factor=None,
                check_config=lambda fields: None) -> tuple[dict, dict]:
    """What GPT.from_pretrained reads: detect the format, read and check the tensors. Returns GPTConfig's fields as
    a dict and our name -> tensor (in `dtype`, float32 if None, on `device`; a tied output matrix only as
    tok_embeddings.weight). check_config(fields) runs before any tensor is checked, so that a config the model
    cannot take is refused with the model's own message rather than as a shape that does not match."""
    folder, dtype = Path(path), dtype or torch.float32
    if (folder / "params.json").exists() and any(folder.glob("consolidated.*.pth")):
        return read_meta_checkpoint(folder, dtype, device, max_seq_len, rope_scaling_factor, check_config)
    if (folder / "config.json").exists() and any((folder / f).exists() for f in HF_WEIGHTS):
        return read_hf_checkpoint(folder, dtype, device, max_seq_len, rope_scaling_factor, check_config)
    raise ValueError(f"{folder}: neither a Meta checkpoint (params.json + consolidated.*.pth) nor a Hugging Face "
                     f"one (config.json + {' or '.join(HF_WEIGHTS)})")


def write_hf_folder(path, c: dict, state: dict, dtype: torch.dtype):
    """What GPT.save_pretrained writes: config.json + model.safetensors in Hugging Face's Llama layout, from
    GPTConfig's fields `c` and a state dict under our names (plain Llama keys only: LoRA adapters merged first).
    The weights are written in `dtype`, which config.json records as torch_dtype."""
    from safetensors.torch import save_file
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in state.items():
        if name == "output.weight" and c["tie_embeddings"]:
            continue  # Hugging Face omits lm_head.weight when tie_word_embeddings is true
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = permute_meta_to_hf(t, c["n_head"] if ".wq." in name else c["n_kv_head"])
        tensors[rename(name, META_TO_HF)] = t.detach().to(dtype).contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})  # transformers wants "format"
    scaling = c["rope_scaling"]
    rope_scaling = scaling and dict(
        rope_type="llama3", factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"], original_max_position_embeddings=scaling["original_max_position"])
    hf_config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", vocab_size=c["vocab_size"],
        hidden_size=c["dim"], intermediate_size=c["ffn_hidden"], num_hidden_layers=c["n_layer"],
        num_attention_heads=c["n_head"], num_key_value_heads=c["n_kv_head"], head_dim=c["dim"] // c["n_head"],
        rms_norm_eps=c["norm_eps"], max_position_embeddings=c["max_seq_len"], rope_theta=c["rope_theta"],
        rope_scaling=rope_scaling, tie_word_embeddings=c["tie_embeddings"], attention_bias=False, mlp_bias=False,
        torch_dtype=str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


if __name__ == "__main__":
    import tempfile
    # a tiny Llama state made up from the shape table (GQA, untied, RoPE scaled), with no model needed: a round trip
    # through the Hugging Face layout (renamed, q/k permuted) must give back every tensor and field exactly
    fields = dict(vocab_size=259, dim=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=128, norm_eps=1e-5,
                  max_seq_len=256, rope_theta=500000.0, tie_embeddings=False,
                  rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192))
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) for name, shape in expected_shapes(fields).items()}
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_folder(tmp, fields, state, torch.float32)
        print("wrote", ", ".join(sorted(p.name for p in Path(tmp).iterdir())))
        fields_again, state_again = read_folder(tmp)
    print("config fields identical after the round trip:", fields_again == fields)
    print("tensors identical after the round trip:",
          state_again.keys() == state.keys() and all(torch.equal(state[k], state_again[k]) for k in state))
