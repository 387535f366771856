"""``comfyfleet run`` (submit a workflow, follow it, save its outputs) and ``comfyfleet
rerun`` (with new parameters as a new workflow, or ``--from-node`` in place)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfyfleet.client import Client
from comfyfleet.commands_common import (
    EXIT_NOT_COMPLETED,
    UsageError,
    guarded,
    open_client,
    pairs,
    print_json,
    table,
    tags,
)
from comfyfleet.commands_progress import display_for

if TYPE_CHECKING:
    from comfyfleet.commands_common import Sub


def _parameter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--param", action="append", metavar="NAME=TEXT", help="a $text parameter")
    p.add_argument("-f", "--file", action="append", metavar="NAME=PATH", help="a $file parameter")
    p.add_argument("-c", "--choice", action="append", metavar="NAME=OPTION", help="a #choice parameter")
    p.add_argument("--timeout-s", type=int, default=None, help="seconds one attempt may take")
    p.add_argument("--correlation-id", default=None)
    p.add_argument(
        "--priority",
        type=int,
        default=None,
        help="higher runs first, up to the tier's maximum [0; a rerun: its original's]",
    )


def _finish_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="save every output here")
    p.add_argument("--no-wait", action="store_true", help="print the workflow's id and return")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="S", help="stop following after S s")


def add(sub: Sub, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser("run", parents=[common], help="submit a workflow, follow it, save its outputs")
    run.add_argument("workflow", type=Path, help="the workflow's API-format JSON")
    _parameter_flags(run)
    run.add_argument("--tags", action="append", default=None, help="runner tags it needs (comma separated)")
    run.add_argument("--name", default=None, help="[the file's name]")
    _finish_flags(run)
    run.set_defaults(client_command=guarded(_run))

    rerun = sub.add_parser(
        "rerun", parents=[common], help="rerun a workflow: new parameters (a new workflow), or --from-node"
    )
    rerun.add_argument("id", help="the workflow to rerun")
    _parameter_flags(rerun)
    rerun.add_argument(
        "--from-node", default=None, metavar="NODE", help="rerun in place from this node (or task id) on"
    )
    rerun.add_argument(
        "--input", action="append", metavar="NAME=VALUE", help="with --from-node: an input of that node"
    )
    _finish_flags(rerun)
    rerun.set_defaults(client_command=guarded(_rerun))


def _run(args: argparse.Namespace) -> int:
    files = pairs(args.file, "-f")
    with open_client(args) as client:
        wf = client.submit(
            args.workflow,
            params=pairs(args.param, "-p"),
            files={k: Path(v).expanduser() for k, v in files.items()},
            choices=pairs(args.choice, "-c"),
            tags=tags(args.tags),
            name=args.name or args.workflow.stem,
            timeout_s=args.timeout_s,
            correlation_id=args.correlation_id,
            priority=args.priority,
        )
        return _follow(client, wf, args)


def _rerun(args: argparse.Namespace) -> int:
    params, choices = pairs(args.param, "-p"), pairs(args.choice, "-c")
    with open_client(args) as client:
        if args.from_node is None and args.input:
            raise UsageError("--input sets an input of the --from-node node: give --from-node too")
        if args.from_node is None:
            files = {k: Path(v).expanduser() for k, v in pairs(args.file, "-f").items()}
            wf = client.rerun(
                args.id,
                params=params,
                files=files,
                choices=choices,
                timeout_s=args.timeout_s,
                correlation_id=args.correlation_id,
                priority=args.priority,
            )
            return _follow(client, wf, args)
        if args.file or args.timeout_s is not None or args.priority is not None:
            raise UsageError(
                "a rerun --from-node keeps the input files, timeout and priority; "
                "rerun without it to change them"
            )
        workflow_id = client.rerun_from_node(
            args.id,
            args.from_node,
            params=params,
            choices=choices,
            task_input=pairs(args.input, "--input"),
            correlation_id=args.correlation_id,
        )
        return _follow(client, client.get_workflow(workflow_id), args)


def _follow(client: Client, wf: dict[str, Any], args: argparse.Namespace) -> int:
    """Show the workflow until it ends, then save (``--out``) and list its outputs."""
    if args.no_wait:
        if args.json:
            print_json(wf)
        else:
            print(wf["id"])
        return 0
    display = display_for(wf["id"], as_json=args.json)
    try:
        done = client.wait(wf["id"], timeout=args.wait_timeout, on_event=display.update)
    finally:
        display.close()
    outputs = client.outputs(wf["id"]) if done["status"] == "completed" else []
    saved = _save(client, outputs, args.out)
    if args.json:
        print_json({"workflow": done, "outputs": saved})
    else:
        _report(done, saved, saved_to=args.out)
    return 0 if done["status"] == "completed" else EXIT_NOT_COMPLETED


def _save(client: Client, outputs: list[dict[str, Any]], folder: Path | None) -> list[dict[str, Any]]:
    if folder is None:
        return outputs
    from comfyfleet.client.outputs import target_path

    folder.mkdir(parents=True, exist_ok=True)
    taken: set[Path] = set()
    return [o | {"path": str(client.download_to(o, target_path(folder, o, taken)))} for o in outputs]


def _report(done: dict[str, Any], outputs: list[dict[str, Any]], saved_to: Path | None) -> None:
    if done["status"] == "cancelled":
        print(f"workflow {done['id']} was cancelled")
        return
    if done["status"] != "completed":
        print(f"workflow {done['id']} {done['status']}: {_why(done)}")
        return
    if saved_to is not None:
        for out in outputs:
            print(out["path"])
        return
    print(f"workflow {done['id']} completed with {len(outputs)} output(s) (--out DIR saves them):")
    table(outputs, [("id", "output"), ("node_id", "node"), ("filename", "file"), ("size", "bytes")])


def _why(wf: dict[str, Any]) -> str:
    """The workflow's own account of its end: the node and error, or ComfyUI's node errors."""
    if wf.get("exception_message"):
        where = f"node {wf['error_node']}: " if wf.get("error_node") else ""
        kind = f"{wf['exception_type']}: " if wf.get("exception_type") else ""
        return f"{where}{kind}{wf['exception_message']}"
    if wf.get("node_errors"):
        return f"node errors {wf['node_errors']}"
    if wf.get("failure_reason"):
        return f"failure reason {wf['failure_reason']}"
    return "no reason given"
