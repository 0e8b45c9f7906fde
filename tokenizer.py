"""
Tokenizer: text <-> token ids, on top of tiktoken.

Owns four things:
1. The fallback: an offline byte-level encoding built in code (256 byte tokens, no merges, 3 special tokens),
   so any text round-trips with no file and no network.
2. A word-level vocabulary fit on a corpus (`from_texts`): the byte tokens plus one token per distinct word the
   corpus holds. The synthetic world uses it: a topic word is one token, so copying it from the prompt is one
   attention lookup, and sequences are about 3.5x shorter than in bytes. Any other text still round-trips.
3. The Llama 3 `tokenizer.model` format (a tiktoken rank file, parsed here) and, as a fallback, a Hugging Face
   `tokenizer.json` of the same byte-level vocabulary.
4. The Llama 3 chat format and its stop tokens.

Simplifications: encode() always treats its input as ordinary text (a prompt that spells "<|eot_id|>" cannot
inject a special token; special ids only come from bos/eos flags and encode_chat); no chunking of very long
inputs (Meta splits strings over 400K characters for tiktoken's sake; our prompts and samples are short).

    python -m pytest tests/test_tokenizer.py -q
"""

import base64
import binascii
import json
import os

import regex
import tiktoken

# Meta's split regex for Llama 3 (llama_models/llama3/tokenizer.py)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama 3.1 / 3.2 special tokens, in order from id = number of ranks (128000); 256 in all
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIALS))]

CHAT_ROLES = ("system", "user", "assistant")


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable unicode character, as used by Hugging Face tokenizer.json files.

    Printable latin-1 bytes map to themselves; the other 68 (control chars, space, ...) go to 256, 257, ... in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def load_rank_file(path):
    """Parse a tiktoken rank file: one "base64(token bytes) rank" per line, ranks 0, 1, 2, ... in order.

    We parse it ourselves: tiktoken.load.load_tiktoken_bpe caches even a local file by path and can return stale data.
    """
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError(f"expected 2 columns, got {len(parts)}")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}, line {lineno}: not 'base64token rank' ({e})") from None
            # BPE merges by rank and decodes by id: a gap or a repeat would silently shift every later id
            if rank != len(ranks) or token in ranks:
                raise ValueError(f"{path}, line {lineno}: rank {rank} for token {token!r}; ranks must be 0, 1, 2, ... "
                                 f"over distinct tokens, so expected a new token with rank {len(ranks)}")
            ranks[token] = rank
    return ranks


def load_hf_json(path):
    """Read the byte-level vocabulary of a Hugging Face tokenizer.json: (ranks, special tokens).

    Assumes the vocabulary ids are merge ranks, true for Llama 3 (its vocabulary is the tiktoken rank file).
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for text, rank in data["model"]["vocab"].items():
        if text in specials:
            continue  # some files list added tokens in the vocabulary too
        if any(c not in byte_of for c in text):
            raise ValueError(f"{path}: vocabulary token {text!r} is not GPT-2 byte-level (a SentencePiece vocabulary?)")
        ranks[bytes(byte_of[c] for c in text)] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: vocabulary ids are not 0..{len(ranks) - 1} without gaps")
    return ranks, specials


class Tokenizer:
    """tiktoken BPE plus the ids callers need: n_vocab, bos_id, eos_id, pad_id, stop_ids (generation ends at any
    of them), special_ids. Tokenizer() is bytes only; from_texts fits words on a corpus; from_pretrained loads
    Llama 3."""

    def __init__(self, mergeable_ranks=None, special_tokens=None, pat_str=r"[\s\S]", name="bytes"):
        if mergeable_ranks is None:
            # the default: one token per byte and no merges; "[\s\S]" splits text into single characters,
            # whose UTF-8 bytes are then tokens, so any string round-trips exactly
            mergeable_ranks = {bytes([i]): i for i in range(256)}
            special_tokens = {"<|begin_of_text|>": 256, "<|end_of_text|>": 257, "<|pad|>": 258}
        special_tokens = special_tokens or {}
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"{name}: byte-level BPE needs all 256 single bytes as tokens; missing {missing[:8]}")
        for needed in ("<|begin_of_text|>", "<|end_of_text|>"):
            if needed not in special_tokens:
                raise ValueError(f"{name}: no special token {needed}")
        clash = sorted(set(mergeable_ranks.values()) & set(special_tokens.values()))
        if clash:  # tiktoken would accept it, and decoding the special id would give the byte, or the reverse
            names = [t for t, i in special_tokens.items() if i in clash]
            raise ValueError(f"{name}: special tokens {names[:4]} reuse ids {clash[:4]} of ordinary tokens")
        self.model = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                       special_tokens=special_tokens)
        self.special_tokens = dict(special_tokens)
        self.n_vocab = self.model.n_vocab
        if len(mergeable_ranks) + len(special_tokens) != self.n_vocab:
            raise ValueError(f"{name}: ids are not 0..{self.n_vocab - 1} without gaps or repeats")
        self.bos_id = special_tokens["<|begin_of_text|>"]
        self.eos_id = special_tokens["<|end_of_text|>"]
        # Llama 3.1+ pads with finetune_right_pad_id; Llama 3.0 files have no pad token, so pad with eos
        self.pad_id = special_tokens.get("<|finetune_right_pad_id|>", special_tokens.get("<|pad|>", self.eos_id))
        # generation ends at end_of_text, or at eot_id for chat (Meta also stops at eom_id, a tool-call pause)
        self.stop_ids = tuple(special_tokens[t] for t in ("<|end_of_text|>", "<|eot_id|>") if t in special_tokens)
        self.special_ids = set(special_tokens.values())

    @classmethod
    def from_texts(cls, texts, name="words"):
        """Byte tokens plus one token per distinct pre-token (a word with its leading space, as Llama 3's split
        pattern cuts them) found in `texts`.

        tiktoken's BPE merges any two adjacent parts whose concatenation is a token, lowest rank first. Every prefix
        of every word is a token, so the part that starts a word can always absorb its right neighbour: a word seen
        in `texts` always ends as exactly one token, and an unseen one (a misspelling) falls back to shorter pieces.
        """
        split = regex.compile(LLAMA3_PATTERN)
        words = sorted({piece.encode() for text in texts for piece in split.findall(text)})
        ranks = {bytes([i]): i for i in range(256)}
        for word in words:
            for end in range(2, len(word) + 1):
                ranks.setdefault(word[:end], len(ranks))
        specials = {t: len(ranks) + i for i, t in enumerate(("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"))}
        return cls(ranks, specials, pat_str=LLAMA3_PATTERN, name=name)

    @classmethod
    def from_pretrained(cls, path):
        """Load from a tokenizer.model file, or a folder holding tokenizer.model (or original/tokenizer.model,
        as Hugging Face repos ship it), or else a folder holding only a Hugging Face tokenizer.json."""
        path = os.fspath(path)
        looked_for = ["tokenizer.model", os.path.join("original", "tokenizer.model"), "tokenizer.json"]
        candidates = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in looked_for]
        for file in candidates:
            if not os.path.isfile(file):
                continue
            if file.endswith(".json"):
                ranks, specials = load_hf_json(file)
            else:
                ranks = load_rank_file(file)
                specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
            return cls(ranks, specials, pat_str=LLAMA3_PATTERN, name=file)
        raise ValueError(f"no tokenizer at {path!r}: looked for a tokenizer file or a folder holding {looked_for}")

    def encode(self, text, bos=False, eos=False):
        """Text -> ids. Text that spells a special token is encoded as plain text, never as the special id."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self.model.encode_ordinary(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, skip_special=False):
        """Ids -> text. Never raises on invalid UTF-8 (sampled byte tokens can split a character): it gives U+FFFD."""
        ids = [int(i) for i in ids]  # also takes a tensor or numpy array
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.n_vocab})")
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.model.decode(ids, errors="replace")

    def encode_chat(self, messages, add_generation_prompt=True):
        """Llama 3 chat format: <|begin_of_text|> then per message
        <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>, then an open assistant header if asked."""
        if "<|start_header_id|>" not in self.special_tokens:
            raise ValueError("chat format needs the Llama 3 header tokens; this tokenizer has none")

        def header(role):
            if role not in CHAT_ROLES:
                raise ValueError(f"unknown chat role {role!r}; expected one of {CHAT_ROLES}")
            start, end = self.special_tokens["<|start_header_id|>"], self.special_tokens["<|end_header_id|>"]
            return [start] + self.encode(role) + [end] + self.encode("\n\n")

        ids = [self.bos_id]
        for message in messages:
            content = self.encode(message["content"].strip())
            ids += header(message["role"]) + content + [self.special_tokens["<|eot_id|>"]]
        if add_generation_prompt:
            ids += header("assistant")
        return ids

    def encode_prompt(self, prompt, chat="off"):
        """A prompt as the policy sees it. The world's format is begin-of-text, the prompt, a newline; a Llama 3
        Instruct model gets its chat format (chat "on", or "auto" when this tokenizer has the header tokens)."""
        if chat == "on" or (chat == "auto" and "<|start_header_id|>" in self.special_tokens):
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.encode(prompt + "\n", bos=True)

    def decode_response(self, ids):
        """The text of a sampled response, without its stop token (a stop token is not text; whether the response
        stopped is told by its last id, not by its text)."""
        return self.decode([i for i in ids if i not in self.stop_ids])

    def stopped(self, ids):
        """True when a sampled response ended with a stop token; False when the token cap cut it off."""
        return len(ids) > 0 and ids[-1] in self.stop_ids

    def check_fits(self, vocab_size):
        """A model's vocabulary may be larger than the tokenizer's (padded for speed), never smaller."""
        if self.n_vocab > vocab_size:
            raise ValueError(f"tokenizer has {self.n_vocab} ids but the model's vocabulary has {vocab_size}")
