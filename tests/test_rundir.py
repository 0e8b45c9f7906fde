"""Tests of rundir.py and of runs that survive: the label ledger, atomic writes, --resume after SIGKILL in every
stage, folders never clobbered, bad input refused before any work, a NaN loss stopping the run."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import iterate
from oracle import Oracle
from rundir import InputError, Ledger, atomic_save, check_run_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--threads", "1", "--sft-examples", "200", "--sft-steps", "4", "--rm-labels", "16", "--rm-max-epochs", "2",
        "--iterations", "2", "--prompts-per-iter", "8", "--n", "2", "--pairs-per-prompt", "1", "--eval-prompts",
        "16", "--max-new-tokens", "8"]
TIMING = ("seconds", "eval_s", "pairs_s", "dpo_s", "rm_s")


def without_timing(folder) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(folder / "metrics.jsonl")]


def folder_digest(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# the ledger and atomic writes

def test_ledger_records_each_label_once_and_replays_it(tmp_path):
    path, oracle = str(tmp_path / "labels.jsonl"), Oracle()
    ledger = Ledger(path)
    rng = np.random.default_rng(0)
    pairs = [("tell me about cats", "cats are nice .", "no ."), ("hi", "hello !", "hello")]
    bought = [ledger.label(oracle, rng, 1, x, [1, 2], a, [3], b, True, False) for x, a, b in pairs]
    lines = [json.loads(line) for line in open(path)]
    assert [line["label"] for line in lines] == bought and oracle.queries == 2
    assert lines[0] == {"iteration": 1, "prompt": pairs[0][0], "a": pairs[0][1], "b": pairs[0][2], "a_tokens": [1, 2],
                        "b_tokens": [3], "a_finished": True, "b_finished": False, "label": bought[0],
                        "prob": Oracle().prob(*pairs[0], True, False)}
    # a resumed run asks the same queries in the same order: the recorded labels come back, nothing is appended,
    # one draw is still taken per query (the label stream stays where an uninterrupted run has it)
    replay, replay_oracle, replay_rng = Ledger(path), Oracle(), np.random.default_rng(0)
    assert [replay.label(replay_oracle, replay_rng, 1, x, [1, 2], a, [3], b, True, False)
            for x, a, b in pairs] == bought
    assert replay_oracle.queries == 2 and len(open(path).readlines()) == 2
    assert replay_rng.random() == rng.random()
    with pytest.raises(RuntimeError, match=r"labels.jsonl:1: the ledger holds another pair"):
        Ledger(path).label(Oracle(), rng, 1, "another prompt", [1], "a", [2], "b")


def test_ledger_drops_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"prompt": "x", "a": "y", "b": "z", "label": true}\n{"prompt": "x", "a"')
    ledger = Ledger(str(path))
    assert len(ledger.lines) == 1 and path.read_text().endswith("true}\n")


def test_atomic_save_leaves_the_old_file_whole_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    atomic_save({"iteration": 1}, path)

    def killed(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"iteration": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"iteration": 1}


# ---------------------------------------------------------------------------------------------------------------
# resume after SIGKILL

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    iterate.main(TINY + ["--out", str(folder)])
    return folder


KILL = """
import os, signal, sys
sys.path.insert(0, {root!r})
import iterate, {module}
real, calls = {module}.{function}, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {call}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
{module}.{function} = dying
iterate.main({argv!r})
"""


@pytest.mark.parametrize("stage, module, function, call", [
    pytest.param("SFT", "start", "train_sft", 1, marks=pytest.mark.slow),
    pytest.param("the first reward model's fit, its labels bought", "reward", "fit_mle", 1, marks=pytest.mark.slow),
    pytest.param("sampling in iteration 2", "iterate", "sample_candidates", 2, marks=pytest.mark.slow),
    ("DPO in iteration 2, its labels bought", "dpo", "train_dpo", 2),  # the default run keeps one kill
    pytest.param("evaluation after iteration 2", "iterate", "evaluate", 3, marks=pytest.mark.slow),
])
def test_resume_after_sigkill_gives_the_uninterrupted_run(stage, module, function, call, uninterrupted, tmp_path):
    folder = tmp_path / "run"
    script = KILL.format(root=ROOT, module=module, function=function, call=call,
                         argv=TINY + ["--out", str(folder)])
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-500:]
    ledger_path = folder / "labels.jsonl"
    bought_before_resume = open(ledger_path).readlines() if ledger_path.exists() else []  # SFT: none yet
    iterate.main(TINY + ["--out", str(folder), "--resume"])
    assert without_timing(folder) == without_timing(uninterrupted)
    # no label bought twice: the ledger is the uninterrupted run's, line for line, and began with what was bought
    ledger = open(folder / "labels.jsonl").readlines()
    assert ledger == open(uninterrupted / "labels.jsonl").readlines()
    assert ledger[:len(bought_before_resume)] == bought_before_resume
    assert len(ledger) == without_timing(folder)[-1]["labels"]
    if "labels bought" in stage:  # the kill came after labels the checkpoint does not hold: they were kept
        checkpointed = 0 if module == "reward" else without_timing(uninterrupted)[1]["labels"]
        assert len(bought_before_resume) > checkpointed
    assert open(folder / "samples.txt").read() == open(uninterrupted / "samples.txt").read()


# ---------------------------------------------------------------------------------------------------------------
# nothing clobbered; bad input refused before any work

def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(uninterrupted, capsys):
    before = folder_digest(uninterrupted)
    for flags, message in ((["--out", str(uninterrupted)], "holds a run; pass --resume to continue it or "
                                                           "--overwrite to start again"),
                           (["--out", str(uninterrupted), "--overwrite", "--prompts", "nosuch.jsonl"],
                            "--prompts nosuch.jsonl: cannot read it"),
                           (["--out", str(uninterrupted), "--resume", "--beta", "0.5"],
                            "--beta 0.5 (the run has 0.2)")):
        with pytest.raises(SystemExit) as exit_:
            iterate.main(TINY + flags)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert folder_digest(uninterrupted) == before


def test_overwrite_starts_afresh_and_leaves_nothing_stale(tmp_path):
    iterate.main(TINY + ["--out", str(tmp_path)])
    (tmp_path / "policy" / "stale.txt").write_text("from the first run")
    metrics = iterate.main(TINY + ["--out", str(tmp_path), "--overwrite", "--iterations", "1"])
    assert [r["iteration"] for r in metrics] == [0, 1] == [json.loads(l)["iteration"] for l in
                                                          open(tmp_path / "metrics.jsonl")]
    assert not (tmp_path / "policy" / "stale.txt").exists()
    assert len(open(tmp_path / "labels.jsonl").readlines()) == metrics[-1]["labels"]


def test_a_checkpoint_folder_is_never_a_run_folder(uninterrupted, capsys):
    policy = uninterrupted / "policy"
    before = folder_digest(policy)
    with pytest.raises(SystemExit):
        iterate.main(TINY + ["--init", str(policy), "--out", str(policy), "--overwrite"])
    assert "holds model weights or a model config.json" in capsys.readouterr().err
    assert folder_digest(policy) == before
    with pytest.raises(InputError, match="--resume: .* holds no run to resume"):
        check_run_folder(str(policy / "nothing"), resume=True, overwrite=False)


def refused_init(tmp_path, capsys) -> str:
    """Run TINY with --init tmp_path/llama; it must stop with exit 2 and one line on stderr, before any run folder
    exists. Returns that line."""
    with pytest.raises(SystemExit) as exit_:
        iterate.main(TINY + ["--init", str(tmp_path / "llama"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    return err


@pytest.mark.parametrize("write, message", [
    (lambda folder: None, "no such folder"),
    (lambda folder: folder.mkdir(), "holds neither config.json (Hugging Face) nor params.json (Meta)"),
    (lambda folder: folder.mkdir() or (folder / "config.json").write_text("{not json"), "cannot load it"),
])
def test_a_bad_init_folder_is_one_line_and_exit_2(write, message, tmp_path, capsys):
    write(tmp_path / "llama")
    assert f"--init {tmp_path / 'llama'}: {message}" in refused_init(tmp_path, capsys)


def test_a_truncated_safetensors_file_is_one_line_and_exit_2(tmp_path, capsys, write_llama):
    write_llama(tmp_path / "llama")
    weights = tmp_path / "llama" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a download cut in the middle
    assert f"--init {tmp_path / 'llama'}: cannot load it: " in refused_init(tmp_path, capsys)


def test_a_model_vocabulary_past_its_tokenizer_is_refused_before_any_work(tmp_path, capsys, write_llama):
    write_llama(tmp_path / "llama", vocab_size=600)
    assert "the model's vocabulary has 600 ids but its tokenizer 512" in refused_init(tmp_path, capsys)


def test_an_over_long_prompt_is_refused_before_any_label_is_bought(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello"] * 8 + ["hello " * 300]))
    with pytest.raises(SystemExit) as exit_:
        iterate.main(TINY + ["--prompts", str(prompts), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--prompts {prompts}: prompt 9 is " in err and "context of 256" in err
    assert not (tmp_path / "run").exists()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = iterate.dpo.train_dpo, []

    def nan_in_iteration_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("dpo: the loss is nan at step 3 of 4")
        return real(*args, **kwargs)

    monkeypatch.setattr(iterate.dpo, "train_dpo", nan_in_iteration_2)
    with pytest.raises(SystemExit) as exit_:
        iterate.main(TINY + ["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "the loss is nan" in err and "checkpoint is kept" in err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 1


def test_a_crafted_pickle_runs_no_code(tmp_path):
    import start
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "pi0-crafted.pt"
    torch.save({"key": None, "model": Evil()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        start.load_cached(str(path), None, "pi0")
    assert not marker.exists()


def test_a_dpo_stage_with_no_pairs_is_skipped_with_a_logged_line(small_world, capsys):
    # every pair of an iteration tied (so none was kept): nothing to learn from, and no endless empty loop
    _, _, model = small_world
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy, stats = iterate.dpo_stage(model, model, [], [], iterate.Settings(), "cpu", 2)
    assert policy is model and stats == {"dpo_steps": 0}
    assert "iteration 3: no pairs to train on (all tied); DPO skipped" in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
