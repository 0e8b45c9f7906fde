"""Tests of lora.py: fresh adapters change nothing; a DPO step moves the adapters and nothing else; with the adapters
off (lora_disabled, AdaptersOff) the model is its base exactly, in forward and in generate; merged adapters save as
a plain Llama folder that we and transformers read back with the same logits.

The base is a tiny random Llama written by transformers and read with GPT.from_pretrained: test_checkpoints.py's
"llama3_x32" variant (hidden 64, 2 layers, 4 heads, 2 kv heads, tied output matrix, Llama 3.1 RoPE scaling by 32),
built from the same config and seed. Seeded and offline; no test here is random.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers' LlamaForCausalLM is the reference")

from lora import AdaptersOff, LoRALinear, add_lora, lora_disabled, merge_lora  # noqa: E402
from model import GPT  # noqa: E402

VOCAB = 300
IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))  # a batch of two rows
PROMPTS = [IDS[0, :12].tolist(), IDS[1, :7].tolist()]  # different lengths: the sampler left-pads




@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A Hugging Face folder holding a Llama 3.2 1B-like miniature (tied, RoPE scaled by 32), seed 0."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=16384, rope_theta=500000.0, rms_norm_eps=1e-6,
        initializer_range=0.1,  # logits of order 1, so that adapters and merging change them visibly
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))
    folder = tmp_path_factory.mktemp("llama3_x32") / "single"
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def sequence_logps(logits, tokens, mask):
    """Sum over t >= 1 of mask[:, t] * log p(tokens[:, t] | tokens[:, :t]) (dpo.sequence_logps's definition)."""
    logps = F.log_softmax(logits[:, :-1].float(), -1).gather(2, tokens[:, 1:, None])[..., 0]
    return (logps * mask[:, 1:]).sum(-1)


def dpo_step(model, optimizer, beta=0.1):
    """One DPO step (Rafailov et al. 2023, eq. 7) on a fixed pair; the reference is the model with adapters off."""
    chosen, rejected, mask = IDS[:1], IDS[1:], torch.ones(1, IDS.shape[1])
    with torch.no_grad(), lora_disabled(model):
        ref_chosen, ref_rejected = sequence_logps(model(chosen), chosen, mask), sequence_logps(model(rejected),
                                                                                               rejected, mask)
    margin = (sequence_logps(model(chosen), chosen, mask) - ref_chosen) - \
             (sequence_logps(model(rejected), rejected, mask) - ref_rejected)
    loss = -F.logsigmoid(beta * margin).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.fixture
def base_model(llama_folder):
    return GPT.from_pretrained(llama_folder).eval()  # tied and scaled


def test_fresh_adapters_leave_the_logits_unchanged(base_model):
    with torch.no_grad():
        before = base_model(IDS)
        add_lora(base_model, rank=4, alpha=8)
        assert torch.equal(base_model(IDS), before)  # B = 0: the update is exactly zero
    assert sum(isinstance(m, LoRALinear) for m in base_model.modules()) == 2 * 7


def test_dpo_step_changes_only_adapters_and_disabled_adapters_give_the_base(base_model):
    with torch.no_grad():
        base_logits = base_model(IDS)
    add_lora(base_model, rank=4)
    before = {name: t.clone() for name, t in base_model.state_dict().items()}
    trainable = [p for p in base_model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 7  # A and B of 7 projections in 2 layers, nothing else
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        dpo_step(base_model, optimizer)
    after = base_model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith(("lora_A", "lora_B")) for name in changed)
    assert "layers.0.attention.wq.lora_B" in changed
    with torch.no_grad():
        assert not torch.equal(base_model(IDS), base_logits)
        with lora_disabled(base_model):
            assert torch.equal(base_model(IDS), base_logits)
        assert all(m.enabled for m in base_model.modules() if isinstance(m, LoRALinear))  # restored


def test_adapters_off_module_is_the_base_in_forward_and_generate(base_model):
    base = copy.deepcopy(base_model)  # pi0, before any adapter
    policy = add_lora(base_model, rank=4, alpha=8)
    adapters = [m for m in policy.modules() if isinstance(m, LoRALinear)]
    torch.manual_seed(2)
    for m in adapters:
        torch.nn.init.normal_(m.lora_B, std=0.05)  # as if trained
    adapters[0].enabled = False  # a flag that was off must come back off, not on
    flags = [m.enabled for m in adapters]
    reference = AdaptersOff(policy)
    with torch.no_grad():
        base_logits = base(IDS)
        assert torch.equal(reference(IDS), base_logits)
        assert not torch.equal(policy(IDS), base_logits)
    assert [m.enabled for m in adapters] == flags

    def sample(model):  # temperature 1, a seeded generator: the same draws wherever the logits are the same
        return model.generate(PROMPTS, 20, temperature=1.0, generator=torch.Generator().manual_seed(3),
                              return_logps=True)
    base_tokens, base_logps = sample(base)
    assert sample(reference) == (base_tokens, base_logps)
    assert sample(policy)[1] != base_logps  # the adapters are on again, and generate sees them
    assert [m.enabled for m in adapters] == flags


def test_merged_adapters_save_and_load_with_the_same_logits(base_model, tmp_path):
    add_lora(base_model, rank=4, alpha=8)
    torch.manual_seed(2)
    for m in base_model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)  # as if trained
    with torch.no_grad():
        adapted = base_model(IDS)
        merge_lora(base_model)
        assert not any(isinstance(m, LoRALinear) for m in base_model.modules())
        torch.testing.assert_close(base_model(IDS), adapted, atol=1e-5, rtol=0)
        base_model.save_pretrained(tmp_path)
        torch.testing.assert_close(GPT.from_pretrained(tmp_path).eval()(IDS), adapted, atol=1e-5, rtol=0)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        torch.testing.assert_close(hf(IDS).logits, adapted, atol=1e-5, rtol=0)


def test_save_pretrained_refuses_unmerged_adapters(base_model, tmp_path):
    add_lora(base_model, rank=2)
    with pytest.raises(ValueError, match="merge_lora"):
        base_model.save_pretrained(tmp_path)


def test_adapters_are_float32_on_a_bfloat16_base_with_or_without_autocast(llama_folder):
    model = add_lora(GPT.from_pretrained(llama_folder, dtype=torch.bfloat16).eval(), rank=4)
    adapters = [p for name, p in model.named_parameters() if "lora_" in name]
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for name, p in model.named_parameters()
               if "lora_" not in name)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_B, std=0.05)  # as if trained, so that the update shows
    plain = model(IDS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(IDS)
    reference = add_lora(GPT.from_pretrained(llama_folder).eval(), rank=4)  # the float32 twin, same adapters
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    # bf16 compute on bf16 weights, logits up to 3.6: bf16 keeps 8 bits (measured 0.039 plain, 0.042 autocast)
    assert (plain - reference(IDS)).abs().max() < 0.1 and (autocast - reference(IDS)).abs().max() < 0.1


def test_share_frozen_shares_the_frozen_base_and_copies_what_trains(base_model):
    from lora import share_frozen
    base_model.requires_grad_(False)
    twin = add_lora(share_frozen(base_model), rank=4)  # the reward model's backbone: the base, its own adapters
    policy = add_lora(base_model, rank=4)
    for mine, theirs in zip(twin.modules(), policy.modules()):
        if isinstance(mine, LoRALinear):
            assert mine.weight is theirs.weight and mine.lora_A is not theirs.lora_A
    assert twin.tok_embeddings.weight is policy.tok_embeddings.weight
    copied = share_frozen(twin)  # a refit from a fresh start: new adapters (same values), the same base
    assert copied.layers[0].attention.wq.weight is twin.layers[0].attention.wq.weight
    assert copied.layers[0].attention.wq.lora_A is not twin.layers[0].attention.wq.lora_A
    assert torch.equal(copied.layers[0].attention.wq.lora_A, twin.layers[0].attention.wq.lora_A)
