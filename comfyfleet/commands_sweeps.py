"""``comfyfleet sweep ID`` (a rerun of the workflow for every combination of the values given,
followed until all of them end) and ``comfyfleet sweeps show | cancel SWEEP``.

    comfyfleet sweep WF -p prompt=cat -p prompt=owl -c sampler=euler -c sampler=dpm_2

makes four workflows: a name given more than once takes each of its values in turn, in every
combination with the others. A ``-f`` file is uploaded once and named by its sha256."""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfyfleet.client import Client
from comfyfleet.commands_common import (
    EXIT_NOT_COMPLETED,
    UsageError,
    guarded,
    open_client,
    pair,
    print_json,
    table,
)

if TYPE_CHECKING:
    from comfyfleet.commands_common import Sub


def add(sub: Sub, common: argparse.ArgumentParser) -> None:
    sweep = sub.add_parser(
        "sweep", parents=[common], help="rerun a workflow for every combination of the values given"
    )
    sweep.add_argument("id", help="the workflow to rerun")
    sweep.add_argument("-p", "--param", action="append", metavar="NAME=TEXT", help="a $text value (repeat)")
    sweep.add_argument("-f", "--file", action="append", metavar="NAME=PATH", help="a $file value (repeat)")
    sweep.add_argument(
        "-c", "--choice", action="append", metavar="NAME=OPTION", help="a #choice value (repeat)"
    )
    sweep.add_argument("--timeout-s", type=int, default=None, help="seconds one attempt may take")
    sweep.add_argument("--correlation-id", default=None)
    sweep.add_argument("--priority", type=int, default=None, help="higher runs first [the original's]")
    sweep.add_argument("--no-wait", action="store_true", help="print the sweep's id and return")
    sweep.add_argument(
        "--wait-timeout", type=float, default=None, metavar="S", help="stop following after S s"
    )
    sweep.set_defaults(client_command=guarded(_sweep))

    group = sub.add_parser("sweeps", help="show or cancel a sweep")
    verbs = group.add_subparsers(dest="sweeps_cmd", required=True)
    show = verbs.add_parser("show", parents=[common], help="a sweep's workflows and their statuses")
    show.add_argument("id", help="the sweep")
    show.set_defaults(client_command=guarded(_show))
    cancel = verbs.add_parser("cancel", parents=[common], help="cancel what of a sweep has not ended")
    cancel.add_argument("id", help="the sweep")
    cancel.set_defaults(client_command=guarded(_cancel))


def _sweep(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        grid = _grid(args, client)
        made = client.sweep(
            args.id,
            grid=grid,
            timeout_s=args.timeout_s,
            correlation_id=args.correlation_id,
            priority=args.priority,
        )
        if args.no_wait:
            print_json(made) if args.json else print(made["sweep_id"])
            return 0
        done = _follow(client, made, args)
    if args.json:
        print_json(done)
    else:
        _report(done, grid)
    return 0 if done["counts"] == {"completed": done["total"]} else EXIT_NOT_COMPLETED


def _grid(args: argparse.Namespace, client: Client) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for flag, sigil, items in (("-p", "$", args.param), ("-c", "#", args.choice)):
        for item in items or ():
            name, value = pair(item, flag)
            grid.setdefault(sigil + name, []).append(value)
    uploaded: dict[Path, str] = {}
    for item in args.file or ():
        name, value = pair(item, "-f")
        path = Path(value).expanduser()
        if path not in uploaded:
            uploaded[path] = client.upload(path)["sha256"]
        grid.setdefault("$" + name, []).append({"sha256": uploaded[path], "filename": path.name})
    if not grid:
        raise UsageError(
            "give the values to sweep: -p NAME=TEXT, -c NAME=OPTION or -f NAME=PATH, each name once per value"
        )
    return grid


def _follow(client: Client, made: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Each workflow in turn until it ends (a line for each unless ``--json``); the sweep then."""
    deadline = time.monotonic() + args.wait_timeout if args.wait_timeout is not None else None
    total = made["total"]
    for number, wf in enumerate(made["workflows"], 1):
        left = max(0.0, deadline - time.monotonic()) if deadline is not None else None
        ended = client.wait(wf["id"], timeout=left)
        if not args.json:
            print(f"{number}/{total} {ended['id']} {ended['status']}", flush=True)
    return client.get_sweep(made["sweep_id"])


def _report(done: dict[str, Any], grid: dict[str, list[Any]]) -> None:
    names = list(grid)
    rows = []
    for wf, values in zip(done["workflows"], itertools.product(*grid.values()), strict=True):
        shown = {n: v["filename"] if isinstance(v, dict) else v for n, v in zip(names, values, strict=True)}
        rows.append({"id": wf["id"], "status": wf["status"], **shown})
    print(f"sweep {done['sweep_id']}: {_counts(done)}")
    table(rows, [("id", "workflow"), ("status", "status"), *((n, n) for n in names)])


def _counts(sweep: dict[str, Any]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(sweep["counts"].items()))


def _show(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        sweep = client.get_sweep(args.id)
    if args.json:
        print_json(sweep)
        return 0
    print(f"sweep {sweep['sweep_id']} of workflow {sweep['parent_id']}: {_counts(sweep)}")
    table(sweep["workflows"], [("id", "workflow"), ("status", "status"), ("completed_at", "ended")])
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        sweep = client.cancel_sweep(args.id)
    if args.json:
        print_json(sweep)
    else:
        print(f"sweep {sweep['sweep_id']}: {sweep['cancelled_now']} cancelled; now {_counts(sweep)}")
    return 0
