"""Every command's --help ends with examples, and every flag an example uses is one the command (or
Beam, for the jobs) knows: a renamed flag cannot leave a stale example behind."""
import re
import shlex

import pytest

from pipeline import cli

BEAM_FLAGS = {"--direct_running_mode", "--direct_num_workers", "--runner"}


def _help(command, capsys) -> str:
    try:
        cli.main([command, "--help"])
    except SystemExit as stop:  # argparse exits 0 after printing help
        assert stop.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_lists_examples_that_use_known_flags(command, capsys):
    text = _help(command, capsys)
    assert "\nexamples:\n" in text, f"`balancebeam {command} --help` has no examples"
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text.split("\nexamples:\n")[0]))
    examples_text = text.split("\nexamples:\n")[1].replace("\\\n", " ")  # a shell line continuation
    examples = [line.strip() for line in examples_text.splitlines() if line.strip()]
    assert examples
    for example in examples:
        words = shlex.split(example)
        assert words[:2] == ["balancebeam", command], example
        for word in words[2:]:
            if word.startswith("--"):
                flag = word.split("=", 1)[0]
                assert flag in known or flag in BEAM_FLAGS, (
                    f"{example}: {flag} is not a flag of {command}")
