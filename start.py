"""
The start of a run: the device, the tokenizer, the prompts and pi0.

What it owns: picking the device; the synthetic world's word-level tokenizer; pi0 by supervised fine-tuning (SFT)
on the world's corpus, cached in the run's cache folder under the settings it was built with (one file per set of
settings, never replaced); prompt files; and loading a Llama 3.x checkpoint as pi0 instead. `read_inputs` reads
and checks everything the user gave before any work (a bad input is an InputError naming the flag);
`start(settings, device, cache_dir)` returns the tokenizer, the prompts and pi0 for iterate.py.

SFT is plain next-token cross-entropy on the response tokens (the prompt is context), with train.fit.

    python -m pytest tests/test_start.py -q
"""
import hashlib
import json
import os
import random
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from distributed import data_parallel, is_main
from model import GPT, GPTConfig
from oracle import World
from rundir import InputError, atomic_save
from tokenizer import Tokenizer
from train import collate, fit, shuffled_batches


def pick_device(name: str) -> torch.device:
    """`name` itself, or with "auto" the first of cuda, mps and cpu that this machine has. A device this machine
    does not have is an InputError."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0)
                                          < torch.cuda.device_count()):
            raise InputError(f"--device {name}: this machine has no such CUDA device")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise InputError(f"--device {name}: MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def world_tokenizer() -> Tokenizer:
    """The synthetic world's word-level tokenizer, fit on every prompt as Tokenizer.encode_prompt writes it and on
    2000 corpus responses (the same for every seed: the phrase book is fixed, and 2000 responses hold all its
    words)."""
    world = World(seed=0)
    texts = [prompt + "\n" for prompt in world.prompts] + [response for _, response in world.sft_corpus(2000, seed=0)]
    return Tokenizer.from_texts(texts, name="world words")


# ---------------------------------------------------------------------------------------------------------------
# caching a model under the settings it was built with

def content_hash(path) -> str | None:
    """A hash of what a --prompts file or an --init folder holds (None for None), so that a cache follows the
    contents, not the path. Files up to 64 MiB are read whole; of a larger one (weights) its size and its first and
    last MiB, which hold the safetensors header and a sample of the tensors."""
    if path is None:
        return None
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                                                       for name in names)
    for file in files:
        size = os.path.getsize(file)
        digest.update(f"{os.path.relpath(file, path)}:{size}".encode())
        with open(file, "rb") as f:
            if size <= 64 << 20:
                digest.update(f.read())
            else:
                digest.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def cached_path(cache_dir, name: str, key: dict) -> str:
    """The cache file of `name` (pi0, rm0) built under `key`: one file per set of settings, so that a run with
    other settings never replaces another's cache (and its paid labels)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{name}-{digest}.pt")


def save_cached(path, key, **entries):
    """Write `entries` (a state dict, a config, labelled pairs...) under `key`, the settings they were built with;
    atomically, so that a kill never leaves a half-written cache."""
    atomic_save({"key": key, **entries}, path)


def load_cached(path, key, what):
    """The saved entries of a cached model if its settings match `key`; None (with a logged reason) otherwise.
    key None: whatever settings it was built with."""
    if not os.path.exists(path):
        return None
    saved = torch.load(path, weights_only=True, map_location="cpu")  # weights only: a file must not run code
    if key is not None and saved.get("key") != key:
        print(f"{path}: cached {what} was built with other settings; rebuilding it "
              f"(cached {saved.get('key')}, wanted {key})")
        return None
    print(f"{path}: reusing the cached {what}")
    return saved


def load_cached_gpt(path) -> GPT:
    """A cached pi0 (pi0.pt) as a GPT in eval mode, whatever settings it was built with."""
    saved = load_cached(path, None, "model")
    if saved is None:
        raise FileNotFoundError(f"{path}: no such cached model")
    model = GPT(GPTConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# SFT: pi0

def sft_loss(model, tokens, mask, response_mask):
    """Next-token cross-entropy on response tokens only; the prompt is context."""
    logits = model(tokens, mask)[:, :-1]                  # [B, T-1, V] predicts tokens[:, 1:]
    targets, counted = tokens[:, 1:], response_mask[:, 1:]
    return F.cross_entropy(logits[counted], targets[counted])


def sft_corpus_tokens(world, tokenizer, examples: int, max_new_tokens: int, chat: str, seed: int):
    """The world's SFT corpus as (prompt tokens, response tokens + end token) pairs; a rambling response is cut
    where sampling would cut it."""
    return [(tokenizer.encode_prompt(prompt, chat), tokenizer.encode(response, eos=True)[:max_new_tokens])
            for prompt, response in world.sft_corpus(examples, seed=seed)]


def train_sft(model, corpus, steps: int, lr: float, batch_size: int, seed: int, device) -> float:
    """Fit `model` to the corpus in place; returns the last step's loss."""
    prompts, responses = zip(*corpus)
    net = data_parallel(model)  # what forward is called on: the model, or under torchrun its DDP wrapper
    loss_fn = lambda indices: (sft_loss(net, *collate([prompts[i] for i in indices], [responses[i] for i in indices],
                                                      device)), {})
    history = fit(model, loss_fn, shuffled_batches(len(corpus), batch_size, seed), steps, lr,
                  warmup=steps // 20, weight_decay=0.1, desc="SFT pi0",
                  size=lambda indices: sum(len(responses[i]) for i in indices))  # a mean over response tokens
    return history[-1]["loss"]


def pi0_key(settings, tokenizer) -> dict:
    """The settings pi0 depends on: a cached pi0 is reused only when all of them match."""
    names = ("seed", "preset", "sft_examples", "sft_steps", "sft_batch", "sft_lr", "max_new_tokens")
    return {"tokenizer": f"{tokenizer.model.name}, {tokenizer.n_vocab} ids",
            **{name: getattr(settings, name) for name in names}}


def make_pi0(world, tokenizer, settings, device, cache_dir) -> GPT:
    """pi0 = SFT on the world's corpus, or the cached one built with the same settings."""
    key = pi0_key(settings, tokenizer)
    path = cached_path(cache_dir, "pi0", key)
    torch.manual_seed(settings.seed)
    saved = load_cached(path, key, "pi0")
    config = GPTConfig.preset(settings.preset, vocab_size=tokenizer.n_vocab)
    model = GPT(config if saved is None else GPTConfig(**saved["config"])).to(device)
    if saved is not None:
        model.load_state_dict(saved["model"])
        return model.eval()
    corpus = sft_corpus_tokens(world, tokenizer, settings.sft_examples, settings.max_new_tokens, settings.chat,
                               settings.seed)
    clock = time.time()
    loss = train_sft(model, corpus, settings.sft_steps, settings.sft_lr, settings.sft_batch, settings.seed, device)
    print(f"SFT: {settings.sft_steps} steps in {time.time() - clock:.1f} s, final loss {loss:.3f}")
    if is_main():  # under torchrun every rank trained the same pi0 (data-parallel); rank 0 writes it
        save_cached(path, key, config=asdict(model.config), model=model.state_dict())
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# prompt files and Llama checkpoints

def load_prompts(path: str) -> list[str]:
    """Prompts from a JSON-lines file, one {"prompt": "..."} per line; blank lines are skipped. The whole file is
    read and checked first; the first problem is a ValueError naming its line."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror})") from None
    prompts = []
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{number}: not UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{path}:{number}: expected an object with a string "prompt"')
        try:
            record["prompt"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, written as \\ud800 in the JSON: not text
            raise ValueError(f"{path}:{number}: the prompt holds a lone surrogate, not text") from None
        prompts.append(record["prompt"])
    if len(prompts) < 4:
        raise ValueError(f"{path}: needs at least 4 prompts (training and held-out), found {len(prompts)}")
    return prompts


def check_prompt_lengths(prompts: list[str], tokenizer, chat: str, max_new_tokens: int, max_seq_len: int,
                         where: str):
    """Every prompt must leave room for --max-new-tokens in the model's context; the first that does not is a
    ValueError naming it."""
    for number, prompt in enumerate(prompts, 1):
        length = len(tokenizer.encode_prompt(prompt, chat))
        if length + max_new_tokens > max_seq_len:
            raise ValueError(f"{where}: prompt {number} is {length} tokens; with --max-new-tokens {max_new_tokens} "
                             f"that passes the model's context of {max_seq_len} ({prompt[:40]!r}...)")


def split_prompts(prompts: list[str], n_eval: int, seed: int) -> SimpleNamespace:
    """A seeded split of a prompt file's prompts: held-out prompts for evaluation, the rest for training (the two
    attributes a World has)."""
    prompts = list(prompts)
    random.Random(seed).shuffle(prompts)
    n_eval = min(n_eval, len(prompts) // 2)
    return SimpleNamespace(eval_prompts=prompts[:n_eval], train_prompts=prompts[n_eval:])


def compute_dtype(dtype_name: str, device) -> torch.dtype:
    """--dtype: bfloat16 (what "auto" picks on CUDA) or float32. See train.precision for what it sets."""
    if dtype_name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]


def load_checkpoint(folder, dtype_name: str, device, rope_scaling_factor=None):
    """pi0 and its tokenizer from a Meta or Hugging Face Llama folder, its weights in --dtype (compute_dtype): pi0
    never trains (what trains is a float32 copy of it, or adapters on it), so bfloat16 weights may stay bfloat16."""
    dtype = compute_dtype(dtype_name, device)
    tokenizer = Tokenizer.from_pretrained(folder)
    pi0 = GPT.from_pretrained(folder, dtype=dtype, device=device, rope_scaling_factor=rope_scaling_factor)
    try:
        tokenizer.check_fits(pi0.config.vocab_size)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from None
    if pi0.config.vocab_size > tokenizer.n_vocab:  # sampling would draw ids that have no text
        raise ValueError(f"the model's vocabulary has {pi0.config.vocab_size} ids but its tokenizer "
                         f"{tokenizer.n_vocab}: a sampled id past {tokenizer.n_vocab - 1} would have no text")
    print(f"pi0 from {folder}: {pi0.num_params() / 1e6:.1f} M parameters, {dtype}")
    return tokenizer, pi0.eval()


def read_inputs(settings, device):
    """Everything a run reads from the user, checked before any work: the world, the tokenizer, the prompts
    (train_prompts and eval_prompts) and, with --init, the checkpoint as pi0 (else None: SFT makes it). A bad
    input is an InputError naming the flag."""
    s = settings
    world = World(seed=s.seed)
    if s.init is None:
        tokenizer, pi0, max_seq_len = world_tokenizer(), None, GPTConfig.preset(s.preset).max_seq_len
    else:
        if not os.path.isdir(s.init):
            raise InputError(f"--init {s.init}: no such folder")
        if not any(os.path.exists(os.path.join(s.init, name)) for name in ("config.json", "params.json")):
            raise InputError(f"--init {s.init}: holds neither config.json (Hugging Face) nor params.json (Meta)")
        try:
            tokenizer, pi0 = load_checkpoint(s.init, s.dtype, device, s.rope_scaling_factor)
        except Exception as error:  # whatever the reader raised, the folder is the cause: say so on one line
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise InputError(f"--init {s.init}: cannot load it: {reason}") from None
        max_seq_len = pi0.config.max_seq_len
    try:
        prompts = world.prompts if s.prompts is None else load_prompts(s.prompts)
        check_prompt_lengths(prompts, tokenizer, s.chat, s.max_new_tokens, max_seq_len,
                             s.prompts or "the world's prompts")
    except ValueError as error:
        raise InputError(f"--prompts {error}" if s.prompts else str(error)) from None
    prompt_source = world if s.prompts is None else split_prompts(prompts, s.eval_prompts, s.seed)
    return world, tokenizer, prompt_source, pi0


def start(settings, device, cache_dir):
    """The tokenizer, the prompts (train_prompts and eval_prompts) and pi0: SFT on the synthetic world (cached),
    or a Llama checkpoint (--init)."""
    world, tokenizer, prompt_source, pi0 = read_inputs(settings, device)
    if pi0 is None:
        pi0 = make_pi0(world, tokenizer, settings, device, cache_dir)
    return tokenizer, prompt_source, pi0
