"""
The run folder, made to survive a kill: the label ledger, atomic writes, the per-iteration checkpoint, and the
refusal to reuse a folder that holds a run (without --resume or --overwrite) or model weights.

What it owns: `InputError` (a bad input, found before any work: iterate.py prints it on one line and exits 2),
`atomic_save` and `atomic_write_text` (write a temporary file, fsync, rename: a kill leaves the old file or the new
one, never half of one), `check_run_folder` and `open_run_folder`, what a checkpoint holds besides the data
(`stream_states` and `set_stream_states` for every random stream, `trained_state` for the policy and the reward
model), and `Ledger`, the file labels.jsonl.

The ledger is the record of every preference label the run counts: one JSON line per oracle query, appended and
fsynced the moment the label is given, before anything trains on it. A resumed run replays the same queries in
the same order (every random draw is seeded), so the i-th query of the run is the ledger's i-th line: it is read
back, checked to be the same pair, and never asked again. The ledger is only ever appended to.

    python -m pytest tests/test_rundir.py -q
"""
import json
import os
import shutil
from dataclasses import asdict

import torch

RUN_FILES = ("config.json", "metrics.jsonl", "labels.jsonl", "samples.txt", "checkpoint.pt")
CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json", "params.json", "consolidated.00.pth")


class InputError(ValueError):
    """A bad input (a flag, a file, a folder), found before any work is done."""


def _fsync_folder(folder):
    if hasattr(os, "O_DIRECTORY"):  # the rename itself is durable only once the folder is synced (POSIX)
        fd = os.open(folder or ".", os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic(path, write):
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_folder(os.path.dirname(path))


def atomic_save(obj, path):
    """torch.save `obj` to `path` so that a kill at any moment leaves the previous file or the new one whole."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str):
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


def holds_checkpoint(folder) -> bool:
    """Whether `folder` holds model weights or a model's config.json (a Llama folder, or a saved policy)."""
    if any(os.path.exists(os.path.join(folder, name)) for name in CHECKPOINT_FILES):
        return True
    config = os.path.join(folder, "config.json")
    if not os.path.exists(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            fields = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(fields, dict) and ("model_type" in fields or "hidden_size" in fields)


def check_run_folder(out: str, resume: bool, overwrite: bool):
    """Refuse, before any work, a folder whose contents a run would destroy."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite: pass one of them, not both")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: is a file, not a folder")
    if holds_checkpoint(out):
        raise InputError(f"--out {out}: holds model weights or a model config.json (a checkpoint folder); a run "
                         f"folder must be another folder")
    holds_run = any(os.path.exists(os.path.join(out, name)) for name in RUN_FILES)
    if resume and not os.path.exists(os.path.join(out, "config.json")):
        raise InputError(f"--resume: {out} holds no run to resume (no config.json)")
    if holds_run and not (resume or overwrite):
        raise InputError(f"--out {out}: holds a run; pass --resume to continue it or --overwrite to start again")


def open_run_folder(settings):
    """Create the run and cache folders; a new run writes config.json and starts metrics.jsonl, samples.txt and
    labels.jsonl afresh (--overwrite included); a resumed run keeps them."""
    for folder in (settings.out, settings.cache or settings.out):
        os.makedirs(folder, exist_ok=True)
    if settings.resume:
        return
    for name in ("metrics.jsonl", "samples.txt", "labels.jsonl", "checkpoint.pt", "curves.png"):
        if os.path.exists(os.path.join(settings.out, name)):
            os.remove(os.path.join(settings.out, name))
    shutil.rmtree(os.path.join(settings.out, "policy"), ignore_errors=True)  # --overwrite: nothing stale stays
    atomic_write_text(os.path.join(settings.out, "config.json"),
                      json.dumps({**asdict(settings), "resume": False, "overwrite": False}, indent=1))
    for name in ("metrics.jsonl", "samples.txt"):
        open(os.path.join(settings.out, name), "w").close()


def stream_states(rngs) -> dict:
    """The random streams' states (and torch's global one), in types torch.load(weights_only=True) reads back."""
    version, state, gauss = rngs.pair.getstate()
    return {"torch": torch.get_rng_state(), "label": json.dumps(rngs.label.bit_generator.state),
            "pair": [version, list(state), gauss]}


def set_stream_states(rngs, states: dict):
    torch.set_rng_state(states["torch"])
    rngs.label.bit_generator.state = json.loads(states["label"])
    version, state, gauss = states["pair"]
    rngs.pair.setstate((version, tuple(state), gauss))


def trained_state(model, settings) -> dict:
    """What training changed in the policy or the reward model: every weight, or under LoRA the adapters and the
    reward head only (the frozen base is the checkpoint's, shared by both)."""
    return {k: v for k, v in model.state_dict().items()
            if not settings.lora or "lora_" in k or k.startswith("head.")}


class Ledger:
    """labels.jsonl: one line per oracle label the run counts, fsynced as it is bought; replayed on --resume."""

    def __init__(self, path: str):
        self.path, self.lines, self.used = path, [], 0
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            whole = data[:data.rfind(b"\n") + 1]  # a line cut by a kill mid-write was never a bought label
            if len(whole) < len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(whole))
            self.lines = [json.loads(line) for line in whole.decode("utf-8").splitlines()]

    def label(self, oracle, rng, iteration: int, prompt: str, a_tokens, a: str, b_tokens, b: str,
              a_finished: bool = True, b_finished: bool = True) -> bool:
        """y ~ Bernoulli(P(a > b)) from the oracle, recorded; or, when the ledger already holds this query (a
        resumed run), its recorded label. Either way one query is counted and one draw taken from `rng`, so the
        run goes on exactly as an uninterrupted one."""
        index, self.used = self.used, self.used + 1
        if index < len(self.lines):
            line = self.lines[index]
            if (line["prompt"], line["a"], line["b"]) != (prompt, a, b):
                raise RuntimeError(f"{self.path}:{index + 1}: the ledger holds another pair for this query; the run "
                                   f"folder was written by other code or settings, so --resume cannot continue it")
            rng.random()
            oracle.queries += 1
            return line["label"]
        probability = oracle.prob(prompt, a, b, a_finished, b_finished)
        a_wins = oracle.label(prompt, a, b, rng, a_finished, b_finished)
        self.append({"iteration": iteration, "prompt": prompt, "a": a, "b": b, "a_tokens": list(a_tokens),
                     "b_tokens": list(b_tokens), "a_finished": a_finished, "b_finished": b_finished,
                     "label": a_wins, "prob": probability})
        return a_wins

    def adopt(self, lines: list[dict]):
        """Record labels bought by another run (a cached first reward model's), unless the ledger has them."""
        for line in lines:
            index, self.used = self.used, self.used + 1
            if index >= len(self.lines):
                self.append(line)

    def append(self, line: dict):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.lines.append(line)
