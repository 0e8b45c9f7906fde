"""Tests of start.py: the world's tokenizer, the pi0 cache and its key, prompt files."""
import dataclasses
import os

import pytest

import start
from oracle import World
from settings import Settings
from tokenizer import LLAMA3_PATTERN, Tokenizer


def test_world_tokenizer_has_one_token_per_word_of_the_world():
    import regex
    tokenizer, world = start.world_tokenizer(), World(seed=5)  # another seed's split and corpus than it was fit on
    texts = [p + "\n" for p in world.prompts] + [a for _, a in world.sft_corpus(5000, seed=5)]
    pieces = {piece for text in texts for piece in regex.findall(LLAMA3_PATTERN, text)}
    assert len(pieces) > 80 and all(len(tokenizer.encode(piece)) == 1 for piece in pieces)
    assert tokenizer.n_vocab < 1024  # words and their prefixes on top of the 256 bytes, not a large vocabulary


def test_cache_is_one_file_per_settings_and_never_replaced(small_world, tmp_path, capsys):
    tokenizer, world, _ = small_world
    settings = Settings(sft_steps=2, sft_examples=64, max_new_tokens=16)
    start.make_pi0(world, tokenizer, settings, "cpu", str(tmp_path))
    first = start.cached_path(str(tmp_path), "pi0", start.pi0_key(settings, tokenizer))
    first_bytes = open(first, "rb").read()
    start.make_pi0(world, tokenizer, settings, "cpu", str(tmp_path))
    assert "reusing the cached pi0" in capsys.readouterr().out
    # other settings, or another tokenizer (another vocabulary): another file; the first is kept as it was
    for other_settings, other_tokenizer in ((dataclasses.replace(settings, sft_steps=3), tokenizer),
                                            (settings, Tokenizer())):
        start.make_pi0(world, other_tokenizer, other_settings, "cpu", str(tmp_path))
        assert "reusing" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        os.path.basename(start.cached_path(str(tmp_path), "pi0", start.pi0_key(s, t)))
        for s, t in ((settings, tokenizer), (dataclasses.replace(settings, sft_steps=3), tokenizer),
                     (settings, Tokenizer())))
    assert open(first, "rb").read() == first_bytes
    # a cached file reads back as the same model, whatever its settings
    cached = start.load_cached_gpt(start.cached_path(str(tmp_path), "pi0", start.pi0_key(settings, Tokenizer())))
    assert cached.config.vocab_size == Tokenizer().n_vocab


def test_content_hash_follows_the_contents_not_the_path(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n')
    assert start.content_hash(str(tmp_path / "a.jsonl")) == start.content_hash(str(tmp_path / "b.jsonl"))
    before = start.content_hash(str(tmp_path / "a.jsonl"))
    (tmp_path / "a.jsonl").write_text('{"prompt": "y"}\n')
    assert start.content_hash(str(tmp_path / "a.jsonl")) != before
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = start.content_hash(str(folder))
    (folder / "config.json").write_text('{"dim": 1}')
    assert start.content_hash(str(folder)) != before and start.content_hash(None) is None


def test_prompt_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected an object with a string \"prompt\""):
        start.load_prompts(str(path))
    path.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: not JSON"):
        start.load_prompts(str(path))
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: not UTF-8"):
        start.load_prompts(str(path))
    path.write_text('{"prompt": "a"}\n{"prompt": "\\ud800"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: the prompt holds a lone surrogate"):
        start.load_prompts(str(path))
    with pytest.raises(ValueError, match=r"nosuch.jsonl: cannot read it"):
        start.load_prompts(str(tmp_path / "nosuch.jsonl"))


def test_a_prompt_that_leaves_no_room_for_the_response_is_refused(small_world):
    tokenizer = small_world[0]
    with pytest.raises(ValueError, match=r"p.jsonl: prompt 2 is \d+ tokens; with --max-new-tokens 28 that passes "
                                         r"the model's context of 40"):
        start.check_prompt_lengths(["short", "word " * 30], tokenizer, "off", 28, 40, "p.jsonl")
    start.check_prompt_lengths(["short"], tokenizer, "off", 28, 40, "p.jsonl")  # room left: accepted


def test_a_device_this_machine_lacks_is_an_input_error(monkeypatch):
    from rundir import InputError
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(InputError, match="--device cuda: this machine has no such CUDA device"):
        start.pick_device("cuda")
    with pytest.raises(InputError, match="--device gpu0: not a device name"):
        start.pick_device("gpu0")
    assert start.pick_device("cpu").type == "cpu"


def test_preset_sets_the_shape_of_the_pi0_that_sft_trains(small_world, tmp_path, monkeypatch):
    tokenizer, world, _ = small_world
    monkeypatch.setattr(start, "train_sft", lambda model, *args: 0.0)  # the shape is the point, not the training
    for preset in ("tiny", "small"):
        pi0 = start.make_pi0(world, tokenizer, Settings(preset=preset, sft_examples=8), "cpu", str(tmp_path))
        assert pi0.config == start.GPTConfig.preset(preset, vocab_size=tokenizer.n_vocab)


def test_init_is_loaded_in_the_asked_dtype_with_the_asked_rope_factor(tmp_path, write_llama):
    import torch
    folder = write_llama(tmp_path / "llama", rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                               original_max_position=8192))
    cpu = torch.device("cpu")
    *_, pi0 = start.read_inputs(Settings(init=str(folder)), cpu)  # auto: float32 off CUDA; the folder's factor
    assert {p.dtype for p in pi0.parameters()} == {torch.float32} and pi0.config.rope_scaling["factor"] == 8.0
    *_, pi0 = start.read_inputs(Settings(init=str(folder), dtype="bfloat16", rope_scaling_factor=32.0), cpu)
    assert {p.dtype for p in pi0.parameters()} == {torch.bfloat16} and pi0.config.rope_scaling["factor"] == 32.0
