"""What the client commands (``run``, ``rerun``, ``workflows``, ``runners``, ``login``) share:
their common flags, the client they talk through, ``key=value`` pairs, plain tables and
JSON, and one place that turns failures into a message and an exit status.

Exit statuses: 0 done, 1 the server refused or could not be reached, 2 a usage error, 3 the
workflow ended but did not complete (failed, invalid or cancelled).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from comfyfleet.client import Client, ClientError, config

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NOT_COMPLETED = 3

Command = Callable[[argparse.Namespace], int]
if TYPE_CHECKING:
    Sub: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


class UsageError(Exception):
    """A command given something it cannot use (exit status 2)."""


def common_flags() -> argparse.ArgumentParser:
    """The flags every client command takes (an argparse parent)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--server", default=None, help=f"control plane URL [{config.SERVER_ENV}, the login file]"
    )
    flags.add_argument("--token", default=None, help=f"client token [{config.TOKEN_ENV}, the login file]")
    flags.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return flags


def open_client(args: argparse.Namespace) -> Client:
    chosen = config.resolve(args.server, args.token)
    if chosen.token is None:
        raise UsageError(
            f"no token: run 'comfyfleet login --server URL --token TOKEN', set {config.TOKEN_ENV}, "
            "or pass --token"
        )
    return Client(chosen.server, chosen.token)


def guarded(command: Command) -> Command:
    """``command`` with its failures said in one line on stderr, never a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ClientError as exc:
            return fail(str(exc), EXIT_REFUSED)
        except (UsageError, ValueError) as exc:
            return fail(str(exc), EXIT_USAGE)
        except BrokenPipeError:
            # The reader left (``| head``): nothing is wrong to tell, and nowhere to tell it. Python
            # would complain again flushing stdout at exit, so it goes nowhere from here.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_REFUSED
        except OSError as exc:  # a file to send or a folder to save into
            where = f": {exc.filename}" if exc.filename else ""
            return fail(f"{exc.strerror or exc}{where}", EXIT_USAGE)
        except KeyboardInterrupt:
            return fail("interrupted (the workflow goes on; 'comfyfleet workflows cancel ID' stops it)", 130)

    return run


def fail(message: str, status: int) -> int:
    print(f"comfyfleet: error: {message}", file=sys.stderr)
    return status


def pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``["k=v", ...]`` (from a repeated flag) as a dict; the value may itself hold ``=``."""
    return dict(pair(item, flag) for item in values or ())


def pair(item: str, flag: str) -> tuple[str, str]:
    """``"k=v"`` as ``("k", "v")``; a usage error without the ``=`` or the name."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{flag} takes NAME=VALUE, not {item!r}")
    return key.strip(), value


def tags(values: Sequence[str] | None) -> list[str] | None:
    """``--tags a,b --tags c`` as ``["a", "b", "c"]``."""
    if not values:
        return None
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """Rows as aligned columns (``columns``: key, heading), for a terminal or ``grep``."""
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, (_, h) in enumerate(columns)]
    for line in ([h for _, h in columns], *cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def fields(view: Mapping[str, Any], keys: Sequence[str]) -> None:
    """``key: value`` lines for the keys that have a value."""
    width = max(len(k) for k in keys)
    for key in keys:
        if view.get(key) not in (None, [], {}, ""):
            print(f"{key + ':':{width + 1}} {_cell(view[key])}")
