"""
LoRA by hand (Hu et al. 2021, eq. 3): h = W x + (alpha / r) B A x, with W frozen and A [r, in], B [out, r] trained.

What it owns: `LoRALinear` (a frozen nn.Linear plus the low-rank update), `add_lora` (swap the named projections of
a model for LoRALinear, in place, and freeze the rest), `lora_disabled` (a block in which the model is its base),
`AdaptersOff` (the base as a module of its own), `share_frozen` (a second model over the same frozen tensors) and
`merge_lora` (fold the adapters back into plain nn.Linear).

The DPO reference policy pi0 is then the same model with the adapters switched off, and the reward model the same
frozen base with adapters of its own, so policy, reference and reward model cost one copy of the base weights. The
base may be bfloat16; the adapters are always float32.

What it simplifies: bias-free nn.Linear only (Llama has no biases); adapters are saved by merging them
(merge_lora, then GPT.save_pretrained writes a plain Llama folder), never as a separate adapter file.

    python lora.py   # adds adapters to a tiny random model, moves them, and checks adapters-off and merging
"""
import contextlib
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """A frozen nn.Linear (no bias) plus a trainable low-rank update. It keeps the base matrix as `weight`, so the
    state-dict key of the base (`layers.0.attention.wq.weight`) does not change; the adapter adds `lora_A`,
    `lora_B`. B starts at zero, so a fresh adapter leaves the model's output exactly as it was."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        # the adapters train, so they are float32 whatever the base's dtype: AdamW's small steps on bf16 weights
        # round away (a bf16 number near 0.01 cannot move by less than 2^-14)
        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the paper's code does
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.enabled:
            x = self.dropout(x)
            if not torch.is_autocast_enabled(x.device.type):  # (under autocast the multiplies run in bf16 anyway)
                x = x.to(self.lora_A.dtype)  # a bf16 base's input meets the float32 adapters
            y = y + (F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale).to(y.dtype)
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


class AdaptersOff(nn.Module):
    """pi0 as the LoRA policy with its adapters switched off: the DPO reference without a second copy."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    @property
    def config(self):
        return self.policy.config

    def forward(self, *args, **kwargs):
        with lora_disabled(self.policy):
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with lora_disabled(self.policy):
            return self.policy.generate(*args, **kwargs)


def share_frozen(module: nn.Module) -> nn.Module:
    """A copy of `module` that shares its frozen parameters and its buffers (no memory) and copies the parameters
    that train. Under LoRA the reward model is pi0's frozen base with adapters and a head of its own: one copy of
    the base serves the policy, the reference (adapters off) and the reward model."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()] if not t.requires_grad}
    return copy.deepcopy(module, memo)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base, W + (alpha / r) B A, and put plain nn.Linear modules back (frozen, as
    add_lora left them), so that save_pretrained writes ordinary Llama keys. In place, one matrix at a time summed
    in float32: no second copy of the weights (at 8B that copy would be 14 GB), but a model sharing the base (the
    reward model under LoRA, the adapters-off reference) sees it merged too. Returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.weight.copy_(m.weight.float() + (m.lora_B.float() @ m.lora_A.float()) * m.scale)  # rounds once
            linear = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=False, device="meta")
            linear.weight = m.weight
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


if __name__ == "__main__":
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    policy = GPT(GPTConfig.preset("tiny")).eval()
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        base = policy(tokens)
        add_lora(policy, rank=4)
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        print(f"LoRA rank 4: {trainable} trainable of {policy.num_params()} parameters")
        print("fresh adapters leave the logits unchanged:", torch.equal(policy(tokens), base))
        for m in policy.modules():
            if isinstance(m, LoRALinear):
                nn.init.normal_(m.lora_B, std=0.05)  # as if trained
        adapted = policy(tokens)
        print(f"moved adapters change the logits by up to {(adapted - base).abs().max():.4f}")
        print("adapters off give the base exactly:", torch.equal(AdaptersOff(policy)(tokens), base))
        merge_lora(policy)
        print(f"merged: logits within {(policy(tokens) - adapted).abs().max():.1e} of the adapted ones")
