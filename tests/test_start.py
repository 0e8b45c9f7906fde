"""Tests of start.py: the world's tokenizer, the pi0 cache and its key, prompt files."""
import dataclasses

import pytest

import start
from iterate import Settings
from oracle import World
from tokenizer import LLAMA3_PATTERN, Tokenizer


def test_world_tokenizer_has_one_token_per_word_of_the_world():
    import regex
    tokenizer, world = start.world_tokenizer(), World(seed=5)  # another seed's split and corpus than it was fit on
    texts = [p + "\n" for p in world.prompts] + [a for _, a in world.sft_corpus(5000, seed=5)]
    pieces = {piece for text in texts for piece in regex.findall(LLAMA3_PATTERN, text)}
    assert len(pieces) > 80 and all(len(tokenizer.encode(piece)) == 1 for piece in pieces)
    assert tokenizer.n_vocab < 1024  # words and their prefixes on top of the 256 bytes, not a large vocabulary


def test_cache_with_other_settings_is_rebuilt_and_logged(small_world, tmp_path, capsys):
    tokenizer, world, _ = small_world
    settings = Settings(sft_steps=2, sft_examples=64, max_new_tokens=16)
    start.make_pi0(world, tokenizer, settings, "cpu", str(tmp_path))
    start.make_pi0(world, tokenizer, settings, "cpu", str(tmp_path))
    assert "reusing the cached pi0" in capsys.readouterr().out
    settings = dataclasses.replace(settings, sft_steps=3)
    start.make_pi0(world, tokenizer, settings, "cpu", str(tmp_path))
    out = capsys.readouterr().out
    assert "built with other settings; rebuilding" in out and "'sft_steps': 2" in out
    # a pi0 cached with another tokenizer (another vocabulary) is rebuilt, never loaded into the wrong shape
    start.make_pi0(world, Tokenizer(), settings, "cpu", str(tmp_path))
    out = capsys.readouterr().out
    assert "built with other settings; rebuilding" in out and "'tokenizer': 'bytes, 259 ids'" in out
    # the cached file reads back as the same model, whatever its settings
    cached = start.load_cached_gpt(str(tmp_path / "pi0.pt"))
    assert cached.config.vocab_size == Tokenizer().n_vocab


def test_prompt_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected an object with a string \"prompt\""):
        start.load_prompts(str(path))
    path.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: not JSON"):
        start.load_prompts(str(path))
