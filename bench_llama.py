"""
Benchmarks of checkpoints.py's Llama checkpoint loading and of one online iteration's work on a Llama-sized model.

(a) Load memory. Writes a random bfloat16 model shaped like Llama 3.2 1B but with 4 of its 16 layers (about 1 GB)
as a Hugging Face folder (model.safetensors) and as a Meta folder (consolidated.00.pth), then loads each in a fresh
subprocess with GPT.from_pretrained(dtype=torch.bfloat16), touches every weight and runs a forward, and reports
the child's peak resident memory (VmHWM; ru_maxrss off Linux) above its baseline after `import torch, model`, as
a ratio of the file size. Loading through mmap + load_state_dict(assign=True) should keep it near 1.0 (target
<= 1.3).
(b) --gpu. On CUDA, a random model of Llama 3.2 1B's exact shape (dim 2048, 16 layers, 32 heads, 8 kv heads,
FFN 8192, vocabulary 128256, tied, RoPE theta 500000 scaled by 32) in bfloat16 with float32 LoRA adapters of rank
16, under bf16 autocast as iterate.py runs, does one iteration's work: n sampled responses per prompt (tokens/s),
one DPO step on (first, second) response pairs with the adapters-off model as reference (seconds, and MFU: 6 N
FLOPs a token plus attention, over the step time, against the GPU's bf16 peak), and the peak GPU memory of each;
then the tiny default run of iterate.py end to end on the GPU (wall time, final win-rate). Without CUDA it says so.
(c) --iteration. One online iteration of iterate.py itself (--lora, --dtype bfloat16: the first reward model,
sampling, labelling, DPO, evaluation) from a random Llama-3.2-1B-shaped folder in bfloat16 (all 16 layers, 2.3
GiB, with a synthetic 128000-rank tokenizer.model), or from --init FOLDER (a real one), in a subprocess on CUDA
when there is one, else the CPU. It prints the peak memory above the baseline (CUDA: max_memory_allocated; CPU:
VmHWM) as a ratio of the checkpoint's bfloat16 size: policy, reference and reward model share one frozen base, so
the target is 1.5 plus activations and KV cache.

What it simplifies: random weights (speed and memory do not depend on them); (b) has no tokenizer, random prompt
ids; (c)'s synthetic tokenizer splits the world's text into bytes (long prompts), its other ranks unreachable.

    python bench_llama.py               # (a): about a minute on 2 CPU cores, 2 GB of temporary disk, 2.5 GB of memory
    python bench_llama.py --gpu         # (a) and (b)
    python bench_llama.py --skip-load --iteration --prompts 4 --new-tokens 16  # (c): 9 minutes on 2 CPU cores,
                                                    # 2.5 GB of disk, 5.5 GB of memory
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora import add_lora, lora_disabled
from model import GPT, GPTConfig
from train import precision

LLAMA_32_1B = dict(vocab_size=128256, dim=2048, n_layer=16, n_head=32, n_kv_head=8, ffn_hidden=8192, norm_eps=1e-5,
                   max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True,
                   rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position=8192))
META_PARAMS = dict(dim=2048, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256, ffn_dim_multiplier=1.5,
                   norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)  # Llama 3.2 1B's params.json


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux read VmHWM: ru_maxrss survives exec, so a child started by
    a parent holding the 1 GB model could report the parent's footprint as its own baseline."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def current_rss_mb() -> float:
    """This process's resident memory now (VmRSS on Linux; the peak elsewhere)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024  # kB
    return peak_rss_mb()


def random_model(config: GPTConfig, device, dtype) -> GPT:
    """GPT with its own random init, built directly in `dtype` on `device` (no float32 copy on the way)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return GPT(config)
    finally:
        torch.set_default_dtype(default)


def child(folder: str):
    """Runs in the subprocess: load, touch, forward; print the memory numbers as one JSON line."""
    baseline = peak_rss_mb()
    start = time.time()
    model = GPT.from_pretrained(folder, dtype=torch.bfloat16, rope_scaling_factor=32)
    load_s = time.time() - start
    with torch.no_grad():
        for p in model.parameters():
            p.max()  # mmap'd tensors are read from disk only when used: make every page resident
        finite = bool(model(torch.tensor([[1, 2, 3, 4]])).isfinite().all())
    print(json.dumps(dict(baseline_mb=baseline, peak_mb=peak_rss_mb(), load_s=load_s, finite=finite)))


def bench_load_memory(layers: int):
    config = GPTConfig(**{**LLAMA_32_1B, "n_layer": layers})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_model(config, "cpu", torch.bfloat16)
        model.save_pretrained(tmp / "hf")
        (tmp / "meta").mkdir()
        (tmp / "meta" / "params.json").write_text(json.dumps({**META_PARAMS, "n_layers": layers}))
        torch.save({k: v for k, v in model.state_dict().items() if k != "output.weight"},  # tied: stored once
                   tmp / "meta" / "consolidated.00.pth")
        del model
        print(f"(a) Llama 3.2 1B shape with {layers} layers, bfloat16, loaded with dtype=torch.bfloat16 on the CPU")
        for name, file in (("Hugging Face", tmp / "hf" / "model.safetensors"),
                           ("Meta", tmp / "meta" / "consolidated.00.pth")):
            out = subprocess.run([sys.executable, __file__, "--child", str(file.parent)], check=True,
                                 capture_output=True, text=True).stdout
            stats = json.loads(out.strip().splitlines()[-1])
            size_mb = file.stat().st_size / 2**20
            ratio = (stats["peak_mb"] - stats["baseline_mb"]) / size_mb
            print(f"  {name:13s} {file.name:20s} {size_mb:7.0f} MiB  peak RSS above baseline "
                  f"{stats['peak_mb'] - stats['baseline_mb']:7.0f} MiB  ratio {ratio:.2f} (target <= 1.3)  "
                  f"load {stats['load_s']:.1f} s  logits finite: {stats['finite']}")


# dense bfloat16 tensor-core peaks, TFLOPS, by a piece of torch.cuda.get_device_name() (vendors' data sheets)
BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165,
                    "3090": 71}


def dpo_step_flops(config: GPTConfig, n_params: int, rows: int, length: int) -> float:
    """The model FLOPs of one DPO step on `rows` sequences of `length` tokens, as MFU counts them: 6 N a token (the
    policy's forward and backward, as if every weight trained) plus attention's two T x T products (4 T^2 d a
    sequence and layer forward, 3 times that with the backward). The reference's forward (2 N a token) is work the
    step also does and is not counted, so the MFU is a lower bound."""
    attention_forward = 4 * config.n_layer * length**2 * config.dim * rows
    return 6 * n_params * rows * length + 3 * attention_forward


def bench_gpu(args, device="cuda"):
    if not torch.cuda.is_available():
        print("(b) --gpu: no CUDA device here; skipped")
        return
    from dpo import dpo_loss, sequence_logps
    device = torch.device(device)
    torch.manual_seed(0)
    model = random_model(GPTConfig(**LLAMA_32_1B), device, torch.bfloat16)
    add_lora(model, rank=args.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"(b) {torch.cuda.get_device_name()}: Llama 3.2 1B shape, bfloat16, {model.num_params() / 1e9:.2f} B "
          f"parameters, LoRA rank {args.rank}: {sum(p.numel() for p in trainable) / 1e6:.1f} M trainable")
    weights_gb = torch.cuda.memory_allocated() / 2**30

    # sampling: n responses for each prompt, all rows in one batch
    prompts = torch.randint(3, 128000, (args.prompts, args.prompt_len)).tolist()
    rows = [p for p in prompts for _ in range(args.n)]
    generator = torch.Generator(device).manual_seed(0)
    model.eval()
    model.generate(rows[:2], 4, generator=generator)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    responses = model.generate(rows, args.new_tokens, temperature=1.0, generator=generator)
    torch.cuda.synchronize()
    sample_s = time.time() - start
    n_tokens = sum(map(len, responses))
    print(f"  sampling {len(rows)} rows ({args.prompts} prompts x {args.n}) x {args.new_tokens} tokens: "
          f"{n_tokens / sample_s:.0f} tokens/s ({sample_s:.1f} s); peak "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (weights {weights_gb:.2f} GiB)")

    # one DPO step on (first, second) response of each prompt; every row is prompt_len + new_tokens long
    chosen = [prompts[i] + responses[i * args.n] for i in range(args.prompts)]
    rejected = [prompts[i] + responses[i * args.n + 1] for i in range(args.prompts)]
    tokens = torch.tensor(chosen + rejected, device=device)                              # [2B, T]
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, args.prompt_len:] = True                                                     # the response tokens
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    model.train()

    def dpo_step():
        with torch.no_grad(), lora_disabled(model):  # the reference: the same weights, adapters off
            reference = sequence_logps(model(tokens), tokens, mask)
        policy = sequence_logps(model(tokens), tokens, mask)
        losses, _, _ = dpo_loss(policy[:args.prompts], policy[args.prompts:], reference[:args.prompts],
                                reference[args.prompts:], beta=0.1)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dpo_step()  # warm-up (also creates the optimizer state)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(args.steps):
        dpo_step()
    torch.cuda.synchronize()
    step_s = (time.time() - start) / args.steps
    flops = dpo_step_flops(model.config, model.num_params(), *tokens.shape)
    peak = args.peak_tflops or next((tf for name, tf in BF16_PEAK_TFLOPS.items()
                                     if name in torch.cuda.get_device_name()), None)
    mfu = f"MFU {flops / step_s / (peak * 1e12):.1%} of {peak:.0f} TFLOPS" if peak else "MFU: pass --peak-tflops"
    print(f"  DPO step on {args.prompts} pairs of {tokens.shape[1]} tokens (reference forward, policy forward and "
          f"backward, AdamW): {step_s * 1000:.0f} ms; {flops / 1e12:.2f} TFLOP, {mfu}; peak "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def default_run(device="cuda"):
    """The tiny default run of iterate.py end to end, on `device`: wall time and final win-rate."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        subprocess.run([sys.executable, str(Path(__file__).parent / "iterate.py"), "--device", device, "--out", tmp],
                       check=True, capture_output=True)
        rows = [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl")]
    print(f"  the default run (python iterate.py --device {device}) end to end: {time.time() - start:.0f} s, final "
          f"win-rate {rows[-1]['win_rate']:.3f} +- {rows[-1]['win_rate_se']:.3f}, KL {rows[-1]['kl']:.2f}")


def write_llama_folder(folder: Path, config: GPTConfig):
    """A random bfloat16 Llama folder of `config`'s shape with a tokenizer.model covering its vocabulary: the 256
    bytes, then synthetic multi-byte tokens (tiktoken never reaches them: no merges lead there), then Llama 3's
    256 special tokens, which the tokenizer adds itself."""
    import base64
    random_model(config, "cpu", torch.bfloat16).save_pretrained(folder)
    n_ranks = config.vocab_size - 256
    tokens = [bytes([i]) for i in range(256)] + [b"\xff\xfe" + i.to_bytes(3, "big") for i in range(n_ranks - 256)]
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n"
                                                    for rank, t in enumerate(tokens)))


def iteration_child(folder: str, out: str, flags: list[str]):
    """Runs in the subprocess: one online iteration of iterate.py; prints the peak memory as one JSON line."""
    import iterate
    cuda = torch.cuda.is_available()
    memory = (lambda: torch.cuda.memory_allocated() / 2**20) if cuda else current_rss_mb
    baseline, models, weights, reward_models = memory(), [], [], []
    make_policy, new_reward_model = iterate.make_policy, iterate.new_reward_model
    iterate.new_reward_model = lambda *args: reward_models.append(new_reward_model(*args)) or reward_models[-1]

    def measured_make_policy(pi0, settings):  # the moment pi0, the reward model and the policy all exist
        made = make_policy(pi0, settings)
        models.append(memory())
        tensors = [t for m in (pi0, *made, *reward_models) for t in [*m.parameters(), *m.buffers()]]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        weights.append(sum(storages.values()) / 2**20)  # every distinct tensor storage of the three models
        return made
    iterate.make_policy = measured_make_policy
    start = time.time()
    rows = iterate.main(["--init", folder, "--out", out, "--overwrite", *flags])
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    print(json.dumps(dict(baseline_mb=baseline, models_mb=models[0], weights_mb=weights[0], peak_mb=peak,
                          seconds=time.time() - start, device="cuda" if cuda else "cpu",
                          win_rate=rows[-1]["win_rate"], kl=rows[-1]["kl"])))


def bench_iteration(args):
    flags = ["--lora", str(args.rank), "--dtype", "bfloat16", "--iterations", "1", "--rm-labels", "8",
             "--rm-max-epochs", "1", "--prompts-per-iter", str(args.prompts), "--samples-per-prompt", "2", "--pairs-per-prompt", "1",
             "--eval-prompts", str(args.prompts), "--max-new-tokens", str(args.new_tokens), "--dpo-batch", "4",
             "--rm-batch", "4", "--show", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.init) if args.init else Path(tmp) / "llama"
        if not args.init:
            write_llama_folder(folder, GPTConfig(**LLAMA_32_1B))
        size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        # a fixed mmap threshold: glibc then returns freed large blocks at once, and the CPU's peak resident memory
        # counts what was live, not what the allocator kept
        out = subprocess.run([sys.executable, __file__, "--iteration-child", str(folder), str(Path(tmp) / "run"),
                              *flags], check=True, capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}).stdout
        stats = json.loads(out.strip().splitlines()[-1])
    models, above = stats["models_mb"] - stats["baseline_mb"], stats["peak_mb"] - stats["baseline_mb"]
    print(f"(c) one online iteration of iterate.py, {' '.join(flags)}, on the {stats['device']}: checkpoint "
          f"{size_mb:.0f} MiB (Llama 3.x folders are bfloat16); the distinct tensors of pi0, the reward model and the "
          f"policy {stats['weights_mb']:.0f} MiB, {stats['weights_mb'] / size_mb:.2f} x the checkpoint; memory above "
          f"baseline once they exist (after the first reward model's fit) {models:.0f} MiB; peak "
          f"{above:.0f} MiB, {(above - models):.0f} MiB more for activations, logits and KV cache; "
          f"{stats['seconds']:.0f} s; final win-rate {stats['win_rate']:.3f}, KL {stats['kl']:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("load memory (a)")
    group.add_argument("--layers", type=int, default=4, help="layers of the written checkpoint (4: about 1 GB)")
    group.add_argument("--skip-load", action="store_true", help="skip (a)")
    group.add_argument("--child", metavar="FOLDER", help=argparse.SUPPRESS)  # internal: the measuring subprocess
    group = parser.add_argument_group("GPU iteration (b)")
    group.add_argument("--gpu", action="store_true", help="run (b) on CUDA (skipped, exit 0, without CUDA)")
    group.add_argument("--prompts", type=int, default=8, help="prompts per batch (also DPO pairs per step)")
    group.add_argument("--n", type=int, default=4, help="responses sampled per prompt")
    group.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    group.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per response")
    group.add_argument("--rank", type=int, default=16, help="LoRA rank")
    group.add_argument("--steps", type=int, default=3, help="timed DPO steps (after one warm-up)")
    group.add_argument("--peak-tflops", type=float, help="the GPU's bf16 peak for the MFU (default: a table)")
    group = parser.add_argument_group("one online iteration (c)")
    group.add_argument("--iteration", action="store_true", help="run (c): iterate.py's loop, one iteration")
    group.add_argument("--init", help="a real Llama folder for (c) instead of a random Llama-3.2-1B-shaped one")
    group.add_argument("--iteration-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.iteration_child:
        return iteration_child(args.iteration_child[0], args.iteration_child[1], args.iteration_child[2:])
    print(json.dumps({k: v for k, v in vars(args).items() if k != "child"}))
    if not args.skip_load:
        bench_load_memory(args.layers)
    if args.gpu:
        with precision(torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu"):  # as iterate.py runs
            bench_gpu(args)
        if torch.cuda.is_available():
            default_run()
    if args.iteration:
        bench_iteration(args)


if __name__ == "__main__":
    main()
