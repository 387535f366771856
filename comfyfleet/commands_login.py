"""``comfyfleet login``: check a server and token, and keep them for the other commands."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from comfyfleet.client import Client, config
from comfyfleet.commands_common import UsageError, guarded, print_json

if TYPE_CHECKING:
    from comfyfleet.commands_common import Sub


def add(sub: Sub, common: argparse.ArgumentParser) -> None:
    login = sub.add_parser(
        "login",
        parents=[common],
        help="store the server and a client token (checked first) for the other commands",
        description=f"Writes $XDG_CONFIG_HOME/comfyfleet/client.json (~/.config/...; mode 0600; "
        f"{config.CONFIG_ENV} names another file). "
        "--token - reads the token from stdin, keeping it out of the shell's history.",
    )
    login.set_defaults(client_command=guarded(_login))


def _token(args: argparse.Namespace) -> str:
    raw = args.token if args.token is not None else os.environ.get(config.TOKEN_ENV)
    if raw == "-":
        raw = sys.stdin.readline()
    if not raw or not raw.strip():
        raise UsageError(
            f"login needs --token TOKEN (or --token - to read it from stdin, or {config.TOKEN_ENV})"
        )
    return raw.strip()


def _login(args: argparse.Namespace) -> int:
    token = _token(args)
    server = args.server or os.environ.get(config.SERVER_ENV) or config.DEFAULT_SERVER
    with Client(server, token) as client:
        who = client.whoami()  # a wrong token or server is said now, not at the next command
        server = client.server
    path = config.save_file(server, token)
    account = who["account"]["name"]
    if args.json:
        print_json({"server": server, "account": account, "scope": who.get("scope"), "config": str(path)})
    else:
        print(f"logged in to {server} as account {account!r} ({who.get('scope')} token); saved in {path}")
    return 0
