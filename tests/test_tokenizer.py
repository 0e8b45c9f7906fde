"""
Tests for tokenizer.py: the offline byte-level encoding, the word-level vocabulary fit on texts, the rank-file and
tokenizer.json loaders, and the real Llama 3 tokenizer pinned to known ids and to Meta's own reference code.

Fast, offline and seeded (fixed seeds, so no test can fail by chance). The real Llama 3 `tokenizer.model` ships
in the `llama-models` wheel on PyPI, pinned in requirements-dev.txt; without it the Llama 3 tests skip with the
reason (CI prints skip reasons). Nothing is installed or fetched at test time.

    python -m pytest tests/test_tokenizer.py -q
"""

import base64
import importlib
import importlib.util
import json
import random
import re
from pathlib import Path

import pytest

from tokenizer import LLAMA3_SPECIALS, Tokenizer, bytes_to_unicode, load_rank_file

# -----------------------------------------------------------------------------
# helpers: write tokenizer files the way their real producers do


def write_rank_file(path, ranks):
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def write_hf_json(path, ranks, specials):
    """A minimal Hugging Face tokenizer.json: GPT-2 byte-to-unicode strings as vocabulary keys, ids = ranks."""
    to_char = bytes_to_unicode()
    vocab = {"".join(to_char[b] for b in token): rank for token, rank in ranks.items()}
    added = [{"id": i, "content": t, "special": True} for t, i in specials.items()]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added}, f)


def random_unicode(rng, n):
    """n random characters: ASCII, controls (NUL, newlines), latin, CJK, emoji, and any non-surrogate code point."""
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x17F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x0, 0x10FFFF)]
    chars = []
    while len(chars) < n:
        lo, hi = rng.choice(pools)
        cp = rng.randint(lo, hi)
        if not 0xD800 <= cp <= 0xDFFF:  # lone surrogates have no UTF-8 form: no tokenizer can round-trip them
            chars.append(chr(cp))
    return "".join(chars)


# -----------------------------------------------------------------------------
# the byte-level tokenizer, Tokenizer()


def test_default_round_trips_random_unicode():
    """decode(encode(s)) == s for random strings of any code points (emoji, CJK, NUL, newlines)."""
    tok, rng = Tokenizer(), random.Random(0)
    samples = [random_unicode(rng, rng.randint(0, 200)) for _ in range(200)]
    samples += ["", "\n", "\x00", "a\r\n\tb  \n\n", "héllo 世界 🙂👍🏽"]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s


def test_default_round_trips_random_bytes_as_text():
    """Random bytes, decoded to text with U+FFFD for invalid UTF-8, round-trip exactly."""
    tok, rng = Tokenizer(), random.Random(1)
    for _ in range(200):
        s = bytes(rng.randrange(256) for _ in range(rng.randint(0, 100))).decode("utf-8", errors="replace")
        assert tok.decode(tok.encode(s)) == s


def test_default_ids_are_utf8_bytes_and_specials_follow():
    """Default ids are the UTF-8 bytes; bos, eos and pad are 256, 257, 258, distinct; n_vocab is 259."""
    tok = Tokenizer()
    assert tok.encode("Aé") == list("Aé".encode("utf-8"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_vocab) == (256, 257, 258, 259)
    assert tok.special_ids == {256, 257, 258} and all(i >= 256 for i in tok.special_ids)
    assert tok.stop_ids == (257,)


def test_bos_eos_flags_add_exactly_one_id_each():
    """bos=True puts bos_id first, eos=True puts eos_id last, and nothing else changes."""
    tok = Tokenizer()
    plain = tok.encode("hi there")
    assert tok.encode("hi there", bos=True) == [tok.bos_id] + plain
    assert tok.encode("hi there", eos=True) == plain + [tok.eos_id]
    assert tok.encode("hi there", bos=True, eos=True) == [tok.bos_id] + plain + [tok.eos_id]


def test_text_spelling_a_special_token_stays_plain_text():
    """The literal string "<|end_of_text|>" encodes to its bytes, not to the special id (no injection)."""
    tok = Tokenizer()
    ids = tok.encode("<|end_of_text|>")
    assert ids == list(b"<|end_of_text|>")
    assert not set(ids) & tok.special_ids


def test_decode_replaces_invalid_utf8():
    """Invalid UTF-8 (a sampled byte sequence) decodes with U+FFFD instead of raising."""
    tok = Tokenizer()
    assert tok.decode([0xFF, 0xFE, 0x80]) == bytes([0xFF, 0xFE, 0x80]).decode("utf-8", errors="replace")
    assert "\ufffd" in tok.decode([0xFF, 0xFE, 0x80])
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # half a character


def test_decode_skip_special():
    """skip_special=True drops special ids; otherwise they decode to their names."""
    tok = Tokenizer()
    ids = tok.encode("ok", bos=True, eos=True)
    assert tok.decode(ids) == "<|begin_of_text|>ok<|end_of_text|>"
    assert tok.decode(ids, skip_special=True) == "ok"


def test_bad_inputs_raise_clear_errors():
    """encode of a non-str is a TypeError; decode of an id outside [0, n_vocab) is a ValueError naming it."""
    tok = Tokenizer()
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError):
        tok.encode(None)
    with pytest.raises(ValueError, match="259"):
        tok.decode([1, 259])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_chat_needs_header_tokens():
    """The byte tokenizer has no Llama 3 header tokens, so encode_chat refuses clearly."""
    with pytest.raises(ValueError, match="header tokens"):
        Tokenizer().encode_chat([{"role": "user", "content": "hi"}])


def test_check_fits():
    """A model vocabulary may be larger than the tokenizer's, never smaller."""
    tok = Tokenizer()
    tok.check_fits(259)
    tok.check_fits(512)
    with pytest.raises(ValueError, match="tokenizer has 259 ids but the model's vocabulary has 258"):
        tok.check_fits(258)


# -----------------------------------------------------------------------------
# the word-level vocabulary fit on texts (from_texts)

WORD_TEXTS = ["Write a formal note to your boss about coffee.\n", "Dear sir, I like coffee. It is calm. Regards."]


def test_from_texts_makes_each_seen_word_one_token():
    tok = Tokenizer.from_texts(WORD_TEXTS)
    # whole words with their leading space; punctuation split off as Llama 3's pattern splits it
    assert [tok.decode([i]) for i in tok.encode(WORD_TEXTS[0])] == \
        ["Write", " a", " formal", " note", " to", " your", " boss", " about", " coffee", ".\n"]
    assert [tok.decode([i]) for i in tok.encode("Dear sir, I like coffee.")] == \
        ["Dear", " sir", ",", " I", " like", " coffee", "."]


def test_from_texts_falls_back_to_bytes_for_unseen_text():
    tok, rng = Tokenizer.from_texts(WORD_TEXTS), random.Random(2)
    # a misspelling ends as shorter pieces (the longest seen prefix, then a byte), never as a wrong word
    assert [tok.decode([i]) for i in tok.encode(" coffex")] == [" coffe", "x"]
    for s in [random_unicode(rng, rng.randint(0, 80)) for _ in range(100)] + ["", "héllo 世界 🙂"]:
        assert tok.decode(tok.encode(s)) == s


def test_from_texts_ids_and_specials():
    tok = Tokenizer.from_texts(WORD_TEXTS)
    assert tok.encode("a") == [ord("a")]  # single bytes keep their byte ids
    n_ranks = tok.n_vocab - 3
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n_ranks, n_ranks + 1, n_ranks + 2)
    assert tok.stop_ids == (tok.eos_id,)
    assert Tokenizer.from_texts(list(reversed(WORD_TEXTS))).n_vocab == tok.n_vocab  # order of texts is irrelevant
    assert Tokenizer.from_texts(reversed(WORD_TEXTS)).encode(WORD_TEXTS[1]) == tok.encode(WORD_TEXTS[1])


# -----------------------------------------------------------------------------
# loaders on small synthetic files


def small_ranks():
    """256 byte ranks plus a few merges, as a BPE trainer would write them (each merge of two earlier tokens)."""
    ranks = {bytes([i]): i for i in range(256)}
    for token in [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b"\n\n"]:
        ranks[token] = len(ranks)
    return ranks


def test_bytes_to_unicode_matches_gpt2():
    """The GPT-2 map is a bijection onto printable characters, with the well-known space -> 'Ġ', newline -> 'Ċ'."""
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256
    assert (m[ord(" ")], m[ord("\n")], m[ord("A")], m[0]) == ("Ġ", "Ċ", "A", "Ā")
    assert all(c.isprintable() for c in m.values())


def test_rank_file_and_hf_json_give_the_same_ids(tmp_path):
    """The same vocabulary as a rank file and as a tokenizer.json loads to identical encodings."""
    ranks = small_ranks()
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    (tmp_path / "meta").mkdir()
    (tmp_path / "hf").mkdir()
    write_rank_file(tmp_path / "meta" / "tokenizer.model", ranks)
    write_hf_json(tmp_path / "hf" / "tokenizer.json", ranks, specials)
    a = Tokenizer.from_pretrained(tmp_path / "meta")
    b = Tokenizer.from_pretrained(tmp_path / "hf")
    c = Tokenizer.from_pretrained(tmp_path / "meta" / "tokenizer.model")  # a file path works too
    assert a.n_vocab == b.n_vocab == c.n_vocab == len(ranks) + 256
    assert a.special_tokens == b.special_tokens
    text = "the thing, the other thing\n\nsoothing"
    assert a.encode(text) == b.encode(text) == c.encode(text)
    assert ranks[b" the"] in a.encode(text) and ranks[b"ing"] in a.encode(text)  # merges were used
    assert a.decode(a.encode(text, bos=True, eos=True), skip_special=True) == text


def test_bad_rank_file_names_file_and_line(tmp_path):
    """A malformed line, or a rank out of sequence, is a ValueError naming the file and the line."""
    path = tmp_path / "tokenizer.model"
    write_rank_file(path, small_ranks())
    lines = path.read_text().splitlines()
    for bad_line in ["not-base64!! 256", "dGg= 7", "dGg=", "dGg= x"]:
        path.write_text("\n".join(lines[:256] + [bad_line] + lines[257:]) + "\n")
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*line 257"):
            Tokenizer.from_pretrained(path)


def test_missing_tokenizer_files(tmp_path):
    """A folder with neither tokenizer.model nor tokenizer.json is a ValueError naming the path and the files."""
    with pytest.raises(ValueError, match="tokenizer.model.*tokenizer.json") as e:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


# -----------------------------------------------------------------------------
# the real Llama 3 tokenizer (from the llama-models wheel)


@pytest.fixture(scope="session")
def llama_models_root():
    """The folder holding the `llama_models` package (pinned in requirements-dev.txt); nothing is installed at
    test time: without it the Llama 3 tests skip, and CI prints the reason (-rs)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-models is not installed (pip install -r requirements-dev.txt pins it)")
    return Path(list(spec.submodule_search_locations)[0]).parent


@pytest.fixture(scope="session")
def llama3_model_path(llama_models_root):
    found = sorted((llama_models_root / "llama_models").rglob("llama3/**/tokenizer.model"))
    if not found:
        pytest.skip(f"no llama3 tokenizer.model under {llama_models_root / 'llama_models'}")
    return found[0]


@pytest.fixture(scope="session")
def llama3(llama3_model_path):
    return Tokenizer.from_pretrained(llama3_model_path)


def test_llama3_known_ids(llama3):
    """Pinned ids from Meta's tokenizer test and the Llama 3 vocabulary."""
    assert llama3.n_vocab == 128256
    ids = llama3.encode("This is a test sentence.", bos=True, eos=True)
    # <|begin_of_text|>, This, is, a, test, sentence, ., <|end_of_text|>
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert llama3.decode(ids, skip_special=True) == "This is a test sentence."
    assert llama3.encode("user") == [882] and llama3.encode("\n\n") == [271] and llama3.encode("assistant") == [78191]
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, 128004)
    assert 128001 in llama3.stop_ids and 128009 in llama3.stop_ids
    assert llama3.special_ids == set(range(128000, 128256))
    assert llama3.encode("<|eot_id|>") != [128009]  # the literal text is not the special token


def test_llama3_chat_format(llama3):
    """A user turn is [start_header, "user", end_header, "\\n\\n", content..., eot]; the generation prompt opens
    an assistant header."""
    content = llama3.encode("Hi")
    ids = llama3.encode_chat([{"role": "user", "content": "  Hi\n"}], add_generation_prompt=False)
    assert ids == [128000, 128006, 882, 128007, 271] + content + [128009]
    ids = llama3.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    system = [128006] + llama3.encode("system") + [128007, 271] + llama3.encode("Be brief.") + [128009]
    assert ids == [128000] + system + [128006, 882, 128007, 271] + content + [128009] + [128006, 78191, 128007, 271]
    with pytest.raises(ValueError, match="role"):
        llama3.encode_chat([{"role": "User", "content": "Hi"}])


SAMPLES = ["Hello, world!", "  leading spaces and trailing  ", "I'm sure they'll say it's 12345 dollars.",
           "def f(x):\n    return x ** 2\n\n\n", "Привет мир, 你好世界, مرحبا 🙂", "<|eot_id|> is text here",
           ""]


def test_llama3_matches_meta_reference(llama_models_root, llama3_model_path, llama3, monkeypatch):
    """Our encoding equals Meta's own Tokenizer class (from the same wheel) on varied text, and round-trips."""
    monkeypatch.syspath_prepend(str(llama_models_root))
    try:
        meta = importlib.import_module("llama_models.llama3.tokenizer").Tokenizer(llama3_model_path)
    except Exception as e:  # its module layout changes between releases
        pytest.skip(f"cannot build Meta's reference tokenizer: {e!r}")
    rng = random.Random(2)
    for s in SAMPLES + [random_unicode(rng, 50) for _ in range(20)]:
        assert llama3.encode(s, bos=True, eos=True) == meta.encode(s, bos=True, eos=True)
        assert llama3.decode(llama3.encode(s)) == s


def test_llama3_hf_json_fallback_matches(llama3, llama3_model_path, tmp_path):
    """A tokenizer.json written from the real ranks (GPT-2 byte map) loads to the same ids as tokenizer.model."""
    ranks = load_rank_file(llama3_model_path)
    write_hf_json(tmp_path / "tokenizer.json", ranks, llama3.special_tokens)
    from_json = Tokenizer.from_pretrained(tmp_path)
    assert from_json.n_vocab == llama3.n_vocab and from_json.stop_ids == llama3.stop_ids
    for s in SAMPLES:
        assert from_json.encode(s) == llama3.encode(s)
    chat = [{"role": "user", "content": "Hi"}]
    assert from_json.encode_chat(chat) == llama3.encode_chat(chat)


def test_a_special_id_that_clashes_with_a_byte_id_is_refused(tmp_path):
    # begin of text on the id of byte 5, with a gap left at 258 so that the count of ids still adds up
    ranks = {bytes([i]): i for i in range(256)}
    write_hf_json(tmp_path / "tokenizer.json", ranks, {"<|begin_of_text|>": 5, "<|end_of_text|>": 256,
                                                        "<|pad|>": 257, "<|x|>": 259})
    with pytest.raises(ValueError, match=r"special tokens \['<\|begin_of_text\|>'\] reuse ids \[5\] of ordinary"):
        Tokenizer.from_pretrained(tmp_path)
