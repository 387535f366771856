"""``comfyfleet runners list | show | create | disable | enable``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from comfyfleet.commands_common import fields, guarded, open_client, print_json, table, tags

if TYPE_CHECKING:
    from comfyfleet.commands_common import Sub

_SHOWN = (
    "id",
    "name",
    "status",
    "tags",
    "connected",
    "last_seen",
    "agent_version",
    "protocol_version",
    "current_jobs",
    "created_at",
)


def add(sub: Sub, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("runners", help="the account's runners")
    verbs = group.add_subparsers(dest="runners_cmd", required=True)

    listing = verbs.add_parser("list", parents=[common], help="every runner, connected or not")
    listing.set_defaults(client_command=guarded(_list))

    show = verbs.add_parser("show", parents=[common], help="one runner, with its capacity")
    show.add_argument("id")
    show.set_defaults(client_command=guarded(_show))

    create = verbs.add_parser("create", parents=[common], help="register a runner; prints its token once")
    create.add_argument("name")
    create.add_argument("--tags", action="append", default=None, help="its tags (comma separated)")
    create.set_defaults(client_command=guarded(_create))

    for verb, status, what in (
        ("disable", "disabled", "it finishes what it runs and gets nothing new"),
        ("enable", "active", "it takes work again"),
    ):
        change = verbs.add_parser(verb, parents=[common], help=what)
        change.add_argument("id")
        change.set_defaults(client_command=guarded(_set_status), status=status)


def _rows(runners: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r | {"jobs": len(r.get("current_jobs") or [])} for r in runners]


def _list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        page = client.list_runners()
    if args.json:
        print_json(page)
        return 0
    columns = [("id", "id"), ("name", "name"), ("status", "status"), ("connected", "connected")]
    table(_rows(page["runners"]), [*columns, ("jobs", "jobs"), ("tags", "tags")])
    return 0


def _show(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        runner = client.get_runner(args.id)
    if args.json:
        print_json(runner)
    else:
        fields(runner, _SHOWN)
    return 0


def _create(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        runner = client.create_runner(args.name, tags(args.tags))
    if args.json:
        print_json(runner)
        return 0
    print(f"created runner {runner['name']} ({runner['id']}); its token is shown only once:")
    print(runner["token"])
    return 0


def _set_status(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        runner = client.update_runner(args.id, status=args.status)
    if args.json:
        print_json(runner)
    else:
        print(f"runner {runner['name']} ({runner['id']}) is {runner['status']}")
    return 0
