"""The command line's own behaviour: version, help per command, a closed pipe, shipped examples."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdlora.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"sdlora \S+\n", capsys.readouterr().out)


@pytest.mark.parametrize("command, words", [("resize", "lower rank"), ("extract", "difference"),
                                            ("merge", "Bake adapters"), ("inspect", "metadata"),
                                            ("convert", "Kohya's key names")])
def test_each_low_rank_command_describes_itself(capsys, command, words):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert words in out and "All four work on one module's weight change" not in out


def test_a_closed_pipe_ends_quietly():
    """`sdlora config keys | head`: the reader goes away before sdlora writes."""
    proc = subprocess.Popen([sys.executable, "-m", "sdlora.cli", "config", "keys"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the interpreter has started and printed
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == b""


def test_commands_named_in_shipped_configs_exist(capsys):
    named = [(path.name, m) for path in REPO.glob("datasets_cfg/*.toml") for line in path.read_text().splitlines()
             if "#" in line for m in re.findall(r"`sdlora ((?:[\w-]+ ?)+)`", line.split("#", 1)[1])]
    assert named
    for name, command in named:
        first, *rest = [w for w in command.split() if not w.isupper()]  # CONFIG and the like are placeholders
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([first, "--help"])
        help_text = capsys.readouterr().out
        assert e.value.code == 0, f"{name}: `sdlora {first}` is not a command"
        for word in rest:  # an action or option the command's help lists
            assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", help_text), f"{name}: `sdlora {command}`"
