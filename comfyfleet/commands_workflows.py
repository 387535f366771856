"""``comfyfleet workflows list | show | cancel | delete | outputs``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from comfyfleet.commands_common import fields, guarded, open_client, print_json, table

if TYPE_CHECKING:
    from comfyfleet.commands_common import Sub

_SUMMARY = [("id", "id"), ("status", "status"), ("name", "name"), ("tags", "tags"), ("created_at", "created")]
_SHOWN = (
    "id",
    "name",
    "status",
    "attempt",
    "tags",
    "queue_number",
    "progress",
    "runner_id",
    "parent_id",
    "reruns",
    "correlation_id",
    "created_at",
    "started_at",
    "completed_at",
    "failure_reason",
    "error_node",
    "exception_type",
    "exception_message",
)


def add(sub: Sub, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("workflows", help="list, show, cancel workflows and fetch their outputs")
    verbs = group.add_subparsers(dest="workflows_cmd", required=True)

    listing = verbs.add_parser("list", parents=[common], help="the account's workflows, newest first")
    listing.add_argument("--status", default=None)
    listing.add_argument("--tag", default=None)
    listing.add_argument("--parent", default=None, metavar="ID", help="reruns of this workflow")
    listing.add_argument("--page", type=int, default=1)
    listing.add_argument("--per-page", type=int, default=20)
    listing.set_defaults(client_command=guarded(_list))

    show = verbs.add_parser("show", parents=[common], help="one workflow and its tasks")
    show.add_argument("id")
    show.set_defaults(client_command=guarded(_show))

    cancel = verbs.add_parser("cancel", parents=[common], help="cancel a workflow that has not ended")
    cancel.add_argument("id")
    cancel.set_defaults(client_command=guarded(_cancel))

    delete = verbs.add_parser("delete", parents=[common], help="delete a finished workflow and its outputs")
    delete.add_argument("id")
    delete.set_defaults(client_command=guarded(_delete))

    outputs = verbs.add_parser(
        "outputs", parents=[common], help="a workflow's outputs (--out DIR saves them)"
    )
    outputs.add_argument("id")
    outputs.add_argument("--out", type=Path, default=None, metavar="DIR")
    outputs.set_defaults(client_command=guarded(_outputs))


def _list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        page = client.list_workflows(
            status=args.status, tag=args.tag, parent_id=args.parent, page=args.page, per_page=args.per_page
        )
    if args.json:
        print_json(page)
        return 0
    table(page["workflows"], _SUMMARY)
    shown = len(page["workflows"])
    if page["total"] > shown:
        print(f"({shown} of {page['total']}; --page and --per-page show more)")
    return 0


def _show(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        wf = client.get_workflow(args.id)
    if args.json:
        print_json(wf)
        return 0
    fields(wf, _SHOWN)
    if wf.get("tasks"):
        print()
        table(
            wf["tasks"], [("node_id", "node"), ("class_type", "class"), ("status", "task"), ("reason", "why")]
        )
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        wf = client.cancel(args.id)
    if args.json:
        print_json(wf)
    else:
        print(f"workflow {wf['id']} {wf['status']}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        client.delete_workflow(args.id)
    if args.json:
        print_json({"id": args.id, "deleted": True})
    else:
        print(f"workflow {args.id} deleted")
    return 0


def _outputs(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        listed = client.outputs(args.id)
        if args.out is not None:
            from comfyfleet.client.outputs import target_path

            args.out.mkdir(parents=True, exist_ok=True)
            taken: set[Path] = set()
            listed = [
                o | {"path": str(client.download_to(o, target_path(args.out, o, taken)))} for o in listed
            ]
    if args.json:
        print_json({"outputs": listed, "total": len(listed)})
    elif args.out is not None:
        for out in listed:
            print(out["path"])
    else:
        table(
            listed,
            [
                ("id", "output"),
                ("node_id", "node"),
                ("kind", "kind"),
                ("filename", "file"),
                ("size", "bytes"),
            ],
        )
    return 0
