"""`sdlora` command line: parse, then call the command (`commands/`, one module per subcommand).

Building the parser imports no torch, numpy, diffusers or transformers, so `--help`, every
`COMMAND --help` and `--version` answer at once; a command imports its stage when it runs.

Every expected failure prints one line and no traceback, and exits 2: user mistakes (`UserError`
and its kin), the system refusing a write or a read (a full disk, a quota, a file-size limit,
permissions: the user frees space or picks another path) and undecodable text. An interrupt exits
128 + the signal (130 for Ctrl-C). Only a bug in sdlora prints a traceback, with a request to
report it, and exits 1.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback

from sdlora.commands import COMMAND_MODULES, add_commands
from sdlora.errors import USER_ERRORS
from sdlora.io import os_error_message, os_error_of
from sdlora.training.speed import tune_cpu_allocator


class Parser(argparse.ArgumentParser):
    """argparse, plus "did you mean" for a mistyped command, action or option (argparse 3.14's
    suggest_on_error, for the Pythons sdlora supports)."""

    def __init__(self, *args, **kwargs):
        self.option_names: list[str] = []  # before super().__init__, which adds -h
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.option_names += action.option_strings
        return action

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # A subcommand's parser sees its own unknown options here; argparse would report them from the
        # top-level parser, which knows none of the subcommand's options to suggest.
        if extras:
            hints = [f"{a} (did you mean {close[0]}?)" if a.startswith("-") and (close := difflib.get_close_matches(
                a.split("=")[0], self.option_names, n=1)) else a for a in extras]
            self.error(f"unrecognized arguments: {' '.join(hints)}")
        return namespace, extras

    def error(self, message: str):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = [c.strip(" '") for c in m[2].split(",")]  # quoted up to Python 3.13, bare after
            close = difflib.get_close_matches(m[1], choices, n=1)
            if close:
                message = f"{message}; did you mean {close[0]}?"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sdlora",
        description="Stable Diffusion LoRA style trainer: dataset builder, trainer, Kohya export, "
                    "sampler and low-rank tools. New here? `sdlora new NAME --images DIR` writes a starter config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show sdlora's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_commands(sub, COMMAND_MODULES)
    return parser


class _Version(argparse.Action):
    """argparse's version action, with the version read only when asked (importlib.metadata costs
    ~0.1 s, which every other command would pay)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("sdlora")
        except PackageNotFoundError:  # run from a source tree that was never installed
            text = "unknown (not installed)"
        print(f"sdlora {text}")  # to stdout, as argparse's own version action prints
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    tune_cpu_allocator()  # big training buffers reused instead of re-faulted every step (speed.py)
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # `sdlora config keys | head`: the reader has what it wanted; stop quietly. Python would
        # flush stdout again at exit, so it goes to /dev/null from here on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except USER_ERRORS as e:
        print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"sdlora: {e or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except UnicodeDecodeError as e:
        print(f"sdlora: error: a file is not UTF-8 text ({e}); save it as UTF-8", file=sys.stderr)
        return 2
    except Exception as e:
        failed = os_error_of(e)  # OSError, or a library's wrapper of one (safetensors' writer)
        if failed is not None:
            print(f"sdlora: error: {os_error_message(failed)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print("sdlora: internal error: this is a bug in sdlora, not in your files or settings; please report it "
              "to the sdlora maintainers with the traceback above and the command you ran", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
