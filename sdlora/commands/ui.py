"""`sdlora ui [--port N] [--listen] [--root DIR]`: the command that starts the web app.

This module only registers the command: Gradio and the pages are imported when `sdlora ui`
runs, so the CLI's start-up does not grow (`pip install sdlora[ui]` brings them).
"""

from __future__ import annotations

import sys

from sdlora.errors import UserError

DEFAULT_PORT = 7860  # Gradio's, A1111's and kohya_ss's habit


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "ui", help="a local web app: review and edit the dataset, train with live progress, compare results",
        description="Starts a web app on http://127.0.0.1:PORT over the project folder (the current folder, or "
                    "--root): the Dataset page runs the dataset builder and edits captions, the Train page runs "
                    "`sdlora train` in its own process and follows it, the Results page shows grids and samples. "
                    "Needs the ui extra: pip install 'sdlora[ui]'.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    p.add_argument("--listen", action="store_true",
                   help="serve on every network interface (0.0.0.0), not only this machine: anyone who can reach "
                        "the port can read the project's images and start trainings")
    p.add_argument("--root", default=".", help="the project folder the UI reads and writes inside (default: .)")
    p.set_defaults(func=_cmd_ui)


def _cmd_ui(args) -> int:
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: choose a port between 1 and 65535, e.g. --port {DEFAULT_PORT}")
    try:
        from sdlora.ui.app import serve
    except ImportError as e:
        if e.name and e.name.split(".")[0] in ("gradio", "pandas", "tomlkit"):
            raise UserError(f"sdlora ui needs the ui extra ({e.name} is not installed): "
                            "pip install 'sdlora[ui]'") from None
        raise
    return serve(args.root, args.port, args.listen, log=lambda line: print(line, file=sys.stderr))
