"""
The settings of a run: one frozen dataclass, `Settings`, whose fields are the command line of iterate.py (each
with its default, its --help text and its checks), and `parse_args`, which builds it from the command line, or
with --resume from the run's config.json (a flag given must agree with it).

    python iterate.py --help   # the same fields, grouped
"""
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields

from rundir import InputError

PAIR_RULES = ("best-worst", "random", "uncertainty", "offline")
LABELERS = ("oracle", "rm")


# ---------------------------------------------------------------------------------------------------------------
# settings: one dataclass, the command line made from it

def option(default, help: str, **argparse_kwargs):
    """A setting: its default, its --help text, and what else argparse needs (type where the default is None,
    choices)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass(frozen=True)
class Settings:
    """Every setting of a run. `python iterate.py --flag-name` sets `flag_name`; tools build Settings(...) directly."""
    # run
    out: str = option("runs/default", "run folder: metrics.jsonl, curves.png, samples.txt")
    cache: str | None = option(None, "folder for pi0 and the first reward model (default: --out); arms that share "
                                     "it share pi0", type=str)
    seed: int = option(0, "seeds the world, the models and the oracle")
    device: str = option("auto", "auto picks cuda, then mps, then cpu")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", type=int)
    resume: bool = option(False, "continue the run in --out from its last finished iteration, with the settings "
                                 "it was started with; labels already in its labels.jsonl are not bought again")
    overwrite: bool = option(False, "start afresh in an --out that holds a run (its files are replaced)")
    # starting from a Llama 3.x checkpoint
    init: str | None = option(None, "a Meta or Hugging Face Llama folder: pi0 (its tokenizer.model or "
                                    "tokenizer.json is used too)", type=str)
    prompts: str | None = option(None, 'a JSON-lines file of {"prompt": ...} to use instead of the world\'s prompts '
                                       "(the oracle still judges the text)", type=str)
    chat: str = option("auto", "wrap prompts in the Llama 3 chat format (auto: when the tokenizer has it)",
                       choices=("auto", "on", "off"))
    lora: int = option(0, "LoRA rank for the policy (0: train all weights); the DPO reference is then the same "
                          "model with adapters off")
    dtype: str = option("auto", "precision: bfloat16 keeps pi0's frozen weights in bf16 and computes under bf16 "
                                "autocast, while every weight that trains is float32; auto: bfloat16 on CUDA",
                        choices=("auto", "float32", "bfloat16"))
    save_dtype: str = option("auto", "dtype of the saved policy/ (auto: pi0's, i.e. the checkpoint's under --dtype)",
                             choices=("auto", "float32", "bfloat16"))
    rope_scaling_factor: float | None = option(None, "RoPE scaling factor of a Meta folder (Llama 3.2 1B/3B: 32)",
                                               type=float)
    # world and pi0 (SFT)
    preset: str = option("tiny", "model size: tiny (CPU) or small (GPU)")
    sft_examples: int = option(20000, "prompt/response pairs in the SFT corpus")
    sft_steps: int = option(300, "SFT optimiser steps (steps, not seconds: a seed reproduces pi0)")
    sft_batch: int = option(16, "SFT batch size")
    sft_lr: float = option(4e-3, "SFT peak learning rate")
    max_new_tokens: int = option(28, "cap on sampled response tokens (28 words cut the corpus's rambles, 13 %% of "
                                     "its responses)")
    oracle_temperature: float = option(1.0, "temperature of the oracle's Bradley-Terry draw (eq. 1), for its labels "
                                            "and the win-rates; near 0 every label follows r*")
    # reward model
    rm_labels: int = option(1024, "oracle-labelled pi0 pairs for the first reward model (L0; counted in labels "
                                  "spent)")
    rm_max_epochs: int = option(10, "cap on the epochs of each reward-model fit (the first and every refit); a fit "
                                    "stops earlier when the loss on a held-out tenth of the labels stops falling")
    rm_refit_from: str = option("previous", "where each refit starts: the previous reward model (warm) or pi0 with "
                                            "a fresh head", choices=("previous", "pi0"))
    rm_refit: str = option("head", "what each refit fits: only the head, on the features phi the first fit learned "
                                   "(head: the theory paper's linear reward theta^T phi, whose MLE is a logistic "
                                   "regression; a tenth of the time of all), or every trainable weight (all)",
                           choices=("head", "all"))
    rm_batch: int = option(32, "reward-model batch size (pairs)")
    rm_trainable_layers: int = option(-1, "top blocks of the pi0 backbone the reward model fine-tunes (-1: all)")
    rm_lr: float = option(1e-3, "reward-model peak learning rate")
    # online loop
    iterations: int = option(5, "T, the number of online iterations")
    prompts_per_iter: int = option(384, "m, prompts per iteration (pairs: up to k per prompt); 384 chosen on seeds "
                                        "0-2 with head refits, against 192")
    n: int = option(8, "n, samples per prompt (half at temperature 1.0, half 0.7); --n is kept as an alias, which "
                       "torchrun's own parser cannot pass on", flags=("--samples-per-prompt", "--n"))
    pairs: str = option("best-worst", f"exploration rule: {', '.join(PAIR_RULES)}")
    pairs_per_prompt: int = option(2, "k, labelled pairs per prompt, at most n/2 (best-worst: the i-th best against "
                                      "the i-th worst for i < k; random: k disjoint pairs; uncertainty: the best "
                                      "against the k most uncertain; the paper: 1)")
    rank: str = option("rm", "who ranks the n samples: the reward model, or r* itself (the enhancer's upper bound; "
                             "each sample scored costs one query)", choices=("rm", "oracle"))
    hybrid: bool = option(False, "keep the first reward model's oracle-labelled pi0 pairs in the DPO data too, an "
                                 "equal share in each iteration (the hybrid batch)")
    labeler: str = option("oracle", "who labels the pairs: oracle (queries counted) or rm (the reward model, the "
                                    "paper's practice)")
    uncertainty_lambda: float = option(1.0, "lambda of Sigma = lambda*I + sum of pair feature outer products")
    restart: bool = option(False, "each iteration trains from pi0 on all pairs so far (default: from the previous "
                                  "iterate on the new pairs)")
    reference: str = option("pi0", "DPO reference policy", choices=("pi0", "previous"))
    # DPO
    loss: str = option("dpo", "preference loss", choices=("dpo", "ipo"))
    beta: float = option(0.2, "KL weight beta (eta in the papers); 0.2 chosen on seeds 0-2: at 0.1 the rejected and "
                              "chosen log-probs fell about twice as far in iteration 1, at the same win-rate")
    label_smoothing: float = option(0.0, "conservative DPO's label noise epsilon")
    nll_weight: float = option(0.0, "weight of the chosen responses' per-token NLL added to the loss (RPO); 0, "
                                    "the default, is plain DPO")
    dpo_epochs: float = option(2.0, "passes over each iteration's pairs (the paper: 2)")
    dpo_batch: int = option(16, "pairs per DPO step")
    dpo_lr: float = option(1e-4, "DPO peak learning rate; 1e-4 chosen on seeds 0-2 (2e-4 collapsed on seed 1: "
                                 "win-rate 0.71 -> 0.59, KL 10 nats, in iteration 5)")
    # evaluation
    eval_prompts: int = option(384, "held-out prompts for win-rate and KL")
    show: int = option(4, "sample responses written per iteration")

    def __post_init__(self):
        for f in fields(self):
            if "choices" in f.metadata and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"--{flag(f.name)}: {getattr(self, f.name)!r} is not one of {f.metadata['choices']}")
        if self.pairs not in PAIR_RULES:
            raise ValueError(f"--pairs: unknown rule {self.pairs!r}; choose one of {', '.join(PAIR_RULES)}")
        if self.labeler not in LABELERS:
            raise ValueError(f"--labeler: unknown labeler {self.labeler!r}; choose one of {', '.join(LABELERS)}")
        if self.n < 2:
            raise ValueError(f"--samples-per-prompt must be at least 2 to form a pair, got {self.n}")
        if self.pairs_per_prompt < 1:
            raise ValueError(f"--pairs-per-prompt must be at least 1, got {self.pairs_per_prompt}")
        if self.pairs_per_prompt > self.n // 2:  # each pair takes two samples of its own; never lowered silently
            raise ValueError(f"--pairs-per-prompt {self.pairs_per_prompt} needs --samples-per-prompt of at least "
                             f"{2 * self.pairs_per_prompt}, got {self.n}")
        for name in ("sft_examples", "sft_steps", "sft_batch", "max_new_tokens", "rm_labels", "rm_max_epochs",
                     "rm_batch", "iterations", "prompts_per_iter", "dpo_batch", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("sft_lr", "rm_lr", "dpo_lr", "beta", "dpo_epochs", "uncertainty_lambda", "oracle_temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--{flag(name)} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 0.5:  # at 0.5 a label says nothing; above, it says the opposite
            raise ValueError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not (math.isfinite(self.nll_weight) and self.nll_weight >= 0):
            raise ValueError(f"--nll-weight must be a finite number >= 0, got {self.nll_weight}")
        if self.lora < 0 or (self.threads is not None and self.threads < 1) or self.show < 0:
            raise ValueError(f"--lora and --show must be >= 0 and --threads >= 1, got {self.lora}, {self.show} and "
                             f"{self.threads}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite: pass one of them, not both")
        if self.rm_refit == "head" and self.rm_refit_from == "pi0":
            raise ValueError("--rm-refit-from pi0 needs --rm-refit all: a head-only refit keeps the features of the "
                             "first fit, which a start from pi0 would throw away")
        if self.lora and self.restart:
            raise ValueError("--restart with --lora is not supported: the adapters are the policy's only trained "
                             "weights")


DESCRIPTION = ("Online iterative RLHF, end to end: SFT pi0, a Bradley-Terry reward model, then T iterations of the "
               "main agent / enhancer loop, labelled by a synthetic oracle (see iterate.py).")

# the first setting of each --help group
GROUPS = {"out": "run", "init": "starting from a Llama 3.x checkpoint instead of SFT on the synthetic world",
          "preset": "world and pi0 (SFT)", "rm_labels": "reward model", "iterations": "online loop",
          "loss": "DPO", "eval_prompts": "evaluation"}


def flag(name: str) -> str:
    """The command-line name of a setting, without its dashes: the field's name with dashes, unless it says
    otherwise (every flag must pass through torchrun's parser, which takes --n for an abbreviation of its own)."""
    flags = next((f.metadata.get("flags") for f in fields(Settings) if f.name == name), None)
    return flags[0][2:] if flags else name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr and exit status 2: no usage block to read past
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank parses; rank 0 says it
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# what may differ between a run and its --resume (the thread count changes no result beyond summation order)
FREE_ON_RESUME = ("resume", "overwrite", "threads", "out")


def make_parser(given_only: bool = False) -> Parser:
    """The command line, one flag per Settings field; given_only: flags not on the command line are left out."""
    parser = Parser(prog="iterate.py", description=DESCRIPTION, allow_abbrev=False,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                    argument_default=argparse.SUPPRESS if given_only else None)
    for f in fields(Settings):
        group = parser.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group
        kwargs = dict(f.metadata)
        names = kwargs.pop("flags", (f"--{flag(f.name)}",))
        default = {} if given_only else {"default": f.default}
        if isinstance(f.default, bool):
            group.add_argument(*names, dest=f.name, action="store_true", **default, **kwargs)
        else:
            group.add_argument(*names, dest=f.name, **default, **{"type": type(f.default), **kwargs})
    return parser


def parse_args(argv=None) -> Settings:
    """Settings from the command line; with --resume, the settings the run in --out was started with, and any flag
    given on the command line must agree with them."""
    parser = make_parser()
    args = vars(parser.parse_args(argv))
    try:
        if args["resume"]:
            return resumed_settings(args["out"], vars(make_parser(given_only=True).parse_args(argv)))
        return Settings(**args)
    except ValueError as error:
        parser.error(str(error))


def resumed_settings(out: str, given: dict) -> Settings:
    path = os.path.join(out, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise InputError(f"--resume: {path} cannot be read; {out} holds no run to resume") from None
    unknown = sorted(saved.keys() - {f.name for f in fields(Settings)})
    if unknown:
        raise InputError(f"--resume: {path} holds settings this version does not have: {', '.join(unknown)}")
    differ = [f"--{flag(name)} {value} (the run has {saved.get(name)})" for name, value in given.items()
              if name not in FREE_ON_RESUME and saved.get(name) != value]
    if differ:
        raise InputError(f"--resume: the command line disagrees with {path}: {'; '.join(differ)}")
    return Settings(**{**saved, **{name: given[name] for name in FREE_ON_RESUME if name in given},
                       "resume": True, "overwrite": False})
