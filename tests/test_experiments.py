"""Tests of experiments.py: arms share pi0 per seed, finished runs are reused, the table and figure are written."""
import os

import pytest
import torch

import experiments

TINY = ["--sft-examples", "500", "--sft-steps", "10", "--rm-labels", "16", "--rm-max-epochs", "2",
        "--iterations", "1", "--prompts-per-iter", "8", "--n", "2", "--pairs-per-prompt", "1",
        "--eval-prompts", "16", "--max-new-tokens", "16"]


def test_arms_share_pi0_and_runs_are_reused(tmp_path, capsys):
    out = str(tmp_path)
    table = experiments.main(["--arms", "best-worst", "offline", "--seeds", "0", "1", "--out", out, "--"] + TINY)
    assert set(table) == {"best-worst", "offline"}
    assert table["offline"]["win_rate"].shape == (2, 2)  # [seeds, evaluations]
    # within a seed both arms start from the same pi0: their iteration-0 evaluations are identical
    assert (table["offline"]["win_rate"][:, 0] == table["best-worst"]["win_rate"][:, 0]).all()
    assert os.path.getsize(os.path.join(out, "results.png")) > 0
    assert "| offline |" in open(os.path.join(out, "results.md")).read()
    capsys.readouterr()
    experiments.main(["--arms", "offline", "--seeds", "0", "--out", out, "--"] + TINY)
    assert "offline seed 0: reusing" in capsys.readouterr().out


@pytest.mark.slow
def test_parallel_jobs_give_the_sequential_numbers(tmp_path):
    """--jobs 2 runs arms in worker processes, two seeds' caches built at once; on the same thread count the table
    must not change (another thread count may add float sums in another order, so both use one thread)."""
    flags = ["--arms", "best-worst", "random", "--seeds", "0", "1"]
    shared = ["--"] + TINY + ["--threads", "1"]
    threads = torch.get_num_threads()
    try:  # iterate.main sets the thread count of this process: give the rest of the suite its own back
        sequential = experiments.main(flags + ["--out", str(tmp_path / "seq")] + shared)
    finally:
        torch.set_num_threads(threads)
    parallel = experiments.main(flags + ["--out", str(tmp_path / "par"), "--jobs", "2"] + shared)
    for arm in ("best-worst", "random"):
        for key in experiments.SUMMARY_KEYS:
            assert (parallel[arm][key] == sequential[arm][key]).all(), (arm, key)
    assert "iter 1:" in (tmp_path / "par" / "random" / "seed0" / "log.txt").read_text()


def test_unknown_arm_is_refused(capsys):
    with pytest.raises(SystemExit):
        experiments.main(["--arms", "online-magic"])
    assert "unknown arm 'online-magic'" in capsys.readouterr().err


def test_run_state_reads_a_setting_added_since_the_run_as_its_default(tmp_path):
    import json
    from dataclasses import asdict

    import iterate
    argv = ["--iterations", "2", "--seed", "3", "--out", str(tmp_path)]
    config = asdict(iterate.parse_args(argv))
    del config["oracle_temperature"]  # a run made before the flag existed ran at its default, 1.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\n' * 3)
    assert experiments.run_state(str(tmp_path), argv) == "finished"
    assert experiments.run_state(str(tmp_path), argv + ["--oracle-temperature", "0.5"]) == "other settings"
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\n' * 2)  # killed before its last iteration
    assert experiments.run_state(str(tmp_path), argv) == "interrupted"
