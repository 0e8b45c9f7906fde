"""Tests of distributed.py: the loop under torchrun, on the CPU with gloo and 2 processes.

Run as a script under torchrun, this file is the worker of the gradient test (see `worker`)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distributed  # noqa: E402


def torchrun(args, tmp_path, processes=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={processes}", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def step_gradients(trainer: str, batch_size: int) -> dict:
    """One DPO (or SFT) step of a seeded random model on seeded pairs: the gradients as the optimiser gets them
    (after DDP's averaging under torchrun), caught where train.fit clips them."""
    import dpo
    import start
    import train
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    policy = GPT(GPTConfig.preset("tiny", n_layer=2, vocab_size=64))
    reference = None
    if trainer == "dpo-lora-fsdp":  # adapters on a frozen base, sharded by FSDP2 over the ranks
        from lora import AdaptersOff, add_lora
        policy = add_lora(policy, 4)
        torch.nn.init.normal_(policy.layers[0].attention.wq.lora_B, std=0.1)  # B = 0 would leave A no gradient
        reference = AdaptersOff(policy)
    if trainer.endswith("fsdp") and distributed.world_size() > 1:
        distributed.shard_weights(policy, policy.layers)
    generator = torch.Generator().manual_seed(1)
    rows = lambda low, high: torch.randint(3, 64, (int(torch.randint(low, high, (1,), generator=generator)),),
                                           generator=generator).tolist()
    pairs = [(rows(2, 6), rows(1, 9), rows(1, 9)) for _ in range(16)]
    caught, clip = {}, train.torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):  # copies (the clip scales them in place); FSDP2's shards gathered whole
        caught.update(distributed.full_state({name: p.grad.clone() for name, p in policy.named_parameters()
                                              if p.grad is not None}))
        return clip(params, max_norm)

    train.torch.nn.utils.clip_grad_norm_ = spy
    try:
        if trainer.startswith("dpo"):
            dpo.train_dpo(policy, pairs, beta=0.1, steps=1, lr=1e-3, batch_size=batch_size, seed=0,
                          reference=reference)
        else:  # SFT's loss is a mean over tokens, not rows: each rank's share is its share of the tokens
            start.train_sft(policy, [(p, c) for p, c, _ in pairs], 1, 1e-3, batch_size, 0, "cpu")
    finally:
        train.torch.nn.utils.clip_grad_norm_ = clip
    return caught


def worker(trainer: str, batch_size: int, out: str):
    """Under torchrun: every rank computes the step; rank 0 saves what it got."""
    distributed.setup(torch.device("cpu"))
    gradients = step_gradients(trainer, batch_size)
    if distributed.is_main():
        torch.save(gradients, out)
    distributed.teardown()


@pytest.mark.parametrize("trainer, batch_size", [("dpo", 7), ("dpo", 1), ("sft", 7), ("dpo-fsdp", 7),
                                                 ("dpo-lora-fsdp", 7)])
def test_one_step_on_two_ranks_has_the_one_process_gradient(trainer, batch_size, tmp_path):
    # 7 pairs: ranks of 4 and 3 rows, each weighed by its share (SFT: of the response tokens); 1 pair: rank 1 has
    # none and joins at weight 0; under FSDP2 each rank also holds half of every weight
    out = tmp_path / "gradients.pt"
    torchrun([os.path.abspath(__file__), trainer, str(batch_size), str(out)], tmp_path)
    two_ranks, one_process = torch.load(out), step_gradients(trainer, batch_size)
    assert two_ranks.keys() == one_process.keys()
    assert max((two_ranks[k] - one_process[k]).abs().max().item() for k in one_process) < 1e-6
    assert max(g.abs().max().item() for g in one_process.values()) > 1e-3  # a gradient that says something


TINY = ["--sft-steps", "20", "--sft-examples", "2000", "--rm-labels", "64", "--iterations", "2",
        "--prompts-per-iter", "16", "--eval-prompts", "64", "--samples-per-prompt", "4", "--threads", "1"]


def test_a_two_rank_run_labels_the_same_pairs_and_ends_within_the_error_of_one_process(tmp_path):
    # both from the same pi0 and first reward model (the cache): a pi0 trained on 2 ranks differs from one process's
    # in the order of float sums, which may flip a sampled token here and there
    import iterate
    cache = ["--cache", str(tmp_path / "cache")]
    iterate.main(TINY + cache + ["--out", str(tmp_path / "one")])
    torchrun(["iterate.py", *TINY, *cache, "--out", str(tmp_path / "two")], tmp_path)
    read = lambda run, name: [json.loads(line) for line in open(tmp_path / run / name)]
    one, two = read("one", "metrics.jsonl"), read("two", "metrics.jsonl")
    assert [row["iteration"] for row in two] == [0, 1, 2]  # one writer: no row twice
    # the first reward model's labels and iteration 1's: the same pairs, the same labels (the keys make the samples
    # rank-independent; rank 0 draws every label from the one label stream)
    first = lambda rows: [(r["prompt"], r["a_tokens"], r["b_tokens"], r["label"]) for r in rows if r["iteration"] <= 1]
    assert first(read("two", "labels.jsonl")) == first(read("one", "labels.jsonl"))
    assert len(first(read("one", "labels.jsonl"))) > 64
    for a, b in zip(one, two):
        assert abs(a["win_rate"] - b["win_rate"]) <= (a["win_rate_se"] ** 2 + b["win_rate_se"] ** 2) ** 0.5
        assert a["labels"] == b["labels"]
    assert os.path.isdir(tmp_path / "two" / "policy")


def test_one_process_helpers_are_the_identity():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(3) == [0, 1, 2] and distributed.gather(3, ["a", "b", "c"]) == ["a", "b", "c"]
    assert distributed.from_main({"x": 1}) == {"x": 1}
    model = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(model) is model


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])


def test_fsdp2_runs_the_loop_from_a_bf16_lora_llama_as_one_process_does(tmp_path, write_llama):
    # a bf16 Llama folder under LoRA: FSDP2 shards the policy and the reward model (base, adapters, head) over the
    # two ranks. From the same first reward model (the cache): the same pairs labelled, the policy moved, and a
    # policy/ folder put back together from the shards. (The weights themselves are compared in the gradient
    # test: Adam's first step moves every weight by +-lr whatever its gradient's size, so a float-noise gradient
    # flips a weight by 2 lr)
    from safetensors.torch import load_file
    folder = write_llama(tmp_path / "llama", dtype=torch.bfloat16, n_layer=2)
    flags = ["--init", str(folder), "--lora", "4", "--dtype", "bfloat16", "--save-dtype", "float32",
             "--rm-labels", "24", "--rm-max-epochs", "2", "--iterations", "1", "--prompts-per-iter", "8",
             "--samples-per-prompt", "2", "--pairs-per-prompt", "1", "--eval-prompts", "16", "--max-new-tokens",
             "8", "--dpo-lr", "1e-2", "--threads", "1", "--cache", str(tmp_path / "cache")]
    import iterate
    iterate.main(flags + ["--out", str(tmp_path / "one")])
    result = torchrun(["iterate.py", *flags, "--out", str(tmp_path / "two")], tmp_path)
    assert "device cpu x 2" in result.stdout
    pi0, one, two = (load_file(path / "model.safetensors") for path in
                     (folder, tmp_path / "one" / "policy", tmp_path / "two" / "policy"))
    assert one.keys() == two.keys() == pi0.keys()  # plain Llama keys: the adapters merged
    for policy in (one, two):
        assert max((policy[k] - pi0[k].float()).abs().max().item() for k in pi0) > 1e-3  # DPO moved it
    read = lambda run, name: [json.loads(line) for line in open(tmp_path / run / name)]
    assert read("one", "labels.jsonl") == read("two", "labels.jsonl")
    for a, b in zip(read("one", "metrics.jsonl"), read("two", "metrics.jsonl")):
        assert abs(a["win_rate"] - b["win_rate"]) <= (a["win_rate_se"] ** 2 + b["win_rate_se"] ** 2) ** 0.5


def test_shard_weights_and_full_weights_on_one_rank_are_the_plain_model():
    model = torch.nn.Linear(2, 2)
    assert not distributed.sharded(model)
    with distributed.full_weights(model) as inside:
        assert inside is model
    assert distributed.full_state(model.state_dict()).keys() == model.state_dict().keys()
