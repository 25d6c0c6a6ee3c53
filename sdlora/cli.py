"""`sdlora` command line: thin subcommands onto the stage modules.

Each stage module that has a command defines `add_command(subparsers)`, which adds its
parser and sets `func(args) -> int`. Every expected failure prints one line and no traceback:
user mistakes (`UserError` and its kin) exit 2; the system refusing a write or a read (a full
disk, permissions) and undecodable text exit 1; an interrupt exits 128 + the signal (130 for
Ctrl-C). Only a bug in sdlora prints a traceback, with a request to report it.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback

from .errors import USER_ERRORS

# Stage modules with a subcommand, in the order `--help` lists them.
COMMAND_MODULES = ["run", "dataset", "train", "sample", "lowrank", "config", "kohya_import", "tiny.build", "benchsuite",
                   "ui.command"]  # imports Gradio only when `sdlora ui` runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlora",
        description="Stable Diffusion LoRA style trainer: dataset builder, trainer, Kohya export, "
                    "sampler and low-rank tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdlora {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f".{name}", __package__)
        module.add_command(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdlora")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from .speed import tune_cpu_allocator

    tune_cpu_allocator()  # big training buffers reused instead of re-faulted every step (speed.py)
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except OSError as e:
        print(f"sdlora: error: {os_error_message(e)}", file=sys.stderr)
        return 1
    except UnicodeDecodeError as e:
        print(f"sdlora: error: a file is not UTF-8 text ({e}); save it as UTF-8", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print("sdlora: internal error: this is a bug in sdlora, not in your files or settings; please report it "
              "to the sdlora maintainers with the traceback above and the command you ran", file=sys.stderr)
        return 1


def os_error_message(e: OSError) -> str:
    """One line for a failed read or write: the file, what the system said, what to do."""
    where = f"{e.filename}: " if e.filename else ""
    fixes = {
        errno.ENOSPC: "the disk is full: free some space (or set output.dir on another disk) and run again; "
                      "files written before stay whole",
        errno.EDQUOT: "the disk quota is used up: free some space and run again",
        errno.EACCES: "permission denied: make the folder writable for you, or choose another path",
        errno.EPERM: "operation not permitted: check the file's owner and permissions, or choose another path",
        errno.EROFS: "the file system is read-only: choose a writable path (e.g. set output.dir)",
        errno.ENOENT: "no such file or folder: check the path",
        errno.EISDIR: "this is a folder, not a file: give a file path",
        errno.ENOTDIR: "a part of this path is a file, not a folder: check the path",
    }
    return where + fixes.get(e.errno, f"{e.strerror or e}: check the path and the disk")


if __name__ == "__main__":
    sys.exit(main())
