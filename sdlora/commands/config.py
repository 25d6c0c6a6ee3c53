"""`sdlora config keys` and `sdlora config check CONFIG`."""

from __future__ import annotations

import json

from sdlora import config
from sdlora.config import add_override_argument, load_config


def add_command(subparsers) -> None:
    p = subparsers.add_parser("config", help="check a config, or list every key",
                              description="`sdlora config keys` prints every config key with its default and "
                                          "meaning; `sdlora config check CONFIG` validates a file and prints it "
                                          "resolved (paths made absolute).")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    sub.add_parser("keys", help="every key, its default and meaning (markdown)").set_defaults(func=_cmd_keys)
    check = sub.add_parser("check", help="validate a config and print it resolved")
    check.add_argument("config", help="a style's TOML config")
    add_override_argument(check)
    check.set_defaults(func=_cmd_check)


def _cmd_keys(args) -> int:
    print(config.reference_markdown())  # looked up at call time: one owner, patchable in tests
    return 0


def _cmd_check(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0
