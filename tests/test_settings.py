"""Tests of settings.py: the command line is made from Settings, and bad input is refused with one line naming the
flag (--resume's settings: tests/test_rundir.py)."""
import pytest

import settings


@pytest.mark.parametrize("flags, message", [
    (["--pairs", "best-of"], "unknown rule 'best-of'"),
    (["--labeler", "human"], "unknown labeler 'human'"),
    (["--n", "1"], "--samples-per-prompt must be at least 2"),
    (["--pairs-per-prompt", "0"], "--pairs-per-prompt must be at least 1"),
    (["--restart", "--lora", "4"], "--restart with --lora is not supported"),
    (["--n", "3", "--pairs-per-prompt", "2"], "--pairs-per-prompt 2 needs --samples-per-prompt of at least 4, got 3"),
    (["--beta", "0"], "--beta must be a finite number > 0, got 0.0"),
    (["--beta", "-1"], "--beta must be a finite number > 0, got -1.0"),
    (["--dpo-lr", "nan"], "--dpo-lr must be a finite number > 0, got nan"),
    (["--dpo-batch", "0"], "--dpo-batch must be at least 1, got 0"),
    (["--rm-labels", "0"], "--rm-labels must be at least 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--label-smoothing", "2"], "--label-smoothing must be in [0, 0.5), got 2.0"),
    (["--threads", "0"], "--threads >= 1"),
    (["--rm-refit-from", "pi0"], "--rm-refit-from pi0 needs --rm-refit all"),
])
def test_bad_cli_input_is_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        settings.parse_args(flags)
    assert message in capsys.readouterr().err


def test_settings_are_the_cli_defaults_and_refuse_the_same_input():
    # the CLI is made from the dataclass: no flag, no difference; a flag sets the field of the same name
    assert settings.parse_args([]) == settings.Settings()
    assert settings.parse_args(["--prompts-per-iter", "7", "--hybrid"]) == settings.Settings(prompts_per_iter=7,
                                                                                          hybrid=True)
    # tools that build Settings directly get the same checks as the command line, and cannot write into it
    with pytest.raises(ValueError, match="--samples-per-prompt must be at least 2"):
        settings.Settings(n=1)
    with pytest.raises(ValueError, match="--chat: 'sometimes' is not one of"):
        settings.Settings(chat="sometimes")
    with pytest.raises(AttributeError):
        settings.Settings().n = 4


def test_every_flag_passes_through_torchruns_own_parser():
    # torchrun parses the whole command line with abbreviations on: a flag of iterate.py that is a prefix of one of
    # its own (--n: --nnodes, --nproc-per-node, ...) never reaches the script. Every flag but the kept alias does
    from torch.distributed.run import get_args_parser
    torchrun = get_args_parser()
    names = [name for action in settings.make_parser()._actions for name in action.option_strings
             if name not in ("-h", "--help", "--n")]
    assert "--samples-per-prompt" in names and len(names) == len(settings.fields(settings.Settings))
    for name in names:
        assert torchrun.parse_args(["--nproc-per-node", "2", "iterate.py", name, "1"]).training_script_args == \
            [name, "1"], name
    with pytest.raises(SystemExit):  # the alias is for one process only
        torchrun.parse_args(["--nproc-per-node", "2", "iterate.py", "--n", "4"])
    assert settings.parse_args(["--samples-per-prompt", "4"]) == settings.parse_args(["--n", "4"]) == \
        settings.Settings(n=4)
