"""Every API call as a plain description (method, path, body), built once here and sent by
either client, so that the sync and async clients cannot drift apart."""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

Value = str | int | float | bool
# A file parameter: a path to read, the bytes themselves, or (file name, bytes).
FileSource = str | os.PathLike[str] | bytes | tuple[str, bytes]
# A workflow: the API-format graph itself, a path to its JSON file, or that file's bytes.
WorkflowSource = Mapping[str, Any] | str | os.PathLike[str] | bytes
# One multipart part: a file has a name and a type, a plain field neither.
Part = tuple[str, tuple[str | None, bytes, str | None]]


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: Mapping[str, str | int] | None = None
    json: Any = None
    # Sent as multipart/form-data, as the server documents its forms (fields included).
    parts: list[Part] | None = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None


def _id(value: str) -> str:
    """An id as one path segment, whatever a caller passes."""
    return quote(str(value), safe="")


def _field(sigil: str, name: str) -> str:
    bare = name.removeprefix(sigil)
    if not bare or bare[0] in "$#":
        raise ValueError(f"parameter name {name!r}: give the bare name, or {sigil}name")
    return sigil + bare


def _text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _file_part(name: str, source: FileSource) -> Part:
    if isinstance(source, tuple):
        filename, content = source
    elif isinstance(source, bytes):
        filename, content = name.removeprefix("$") or "file", source
    else:
        # Read whole: the server takes at most 50 MB a request, and bytes in hand let a
        # retried request be sent again unchanged.
        path = Path(source)
        filename, content = path.name, path.read_bytes()
    kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return _field("$", name), (filename, content, kind)


def workflow_bytes(workflow: WorkflowSource) -> bytes:
    if isinstance(workflow, bytes):
        return workflow
    if isinstance(workflow, Mapping):
        return json.dumps(workflow).encode()
    return Path(workflow).read_bytes()


def _plain(fields: Mapping[str, str]) -> list[Part]:
    return [(k, (None, v.encode(), None)) for k, v in fields.items()]


def _parameters(
    params: Mapping[str, Value] | None,
    choices: Mapping[str, str] | None,
    files: Mapping[str, FileSource] | None,
) -> list[Part]:
    fields = {_field("$", k): _text(v) for k, v in (params or {}).items()}
    fields.update({_field("#", k): str(v) for k, v in (choices or {}).items()})
    return _plain(fields) + [_file_part(k, v) for k, v in (files or {}).items()]


def _optional(
    timeout_s: int | None, correlation_id: str | None, priority: int | None = None
) -> dict[str, str]:
    extra = {}
    if timeout_s is not None:
        extra["timeout_s"] = str(timeout_s)
    if correlation_id is not None:
        extra["correlation_id"] = correlation_id
    if priority is not None:
        extra["priority"] = str(priority)
    return extra


def _key(idempotency_key: str | None) -> dict[str, str] | None:
    return {"Idempotency-Key": idempotency_key} if idempotency_key else None


def tag_list(tags: str | Iterable[str] | None) -> str | None:
    """Tags as the server's one comma-separated field."""
    if tags is None:
        return None
    joined = tags if isinstance(tags, str) else ",".join(tags)
    return ",".join(t.strip() for t in joined.split(",") if t.strip())


def submit(
    workflow: WorkflowSource,
    *,
    params: Mapping[str, Value] | None = None,
    files: Mapping[str, FileSource] | None = None,
    choices: Mapping[str, str] | None = None,
    tags: str | Iterable[str] | None = None,
    name: str | None = None,
    timeout_s: int | None = None,
    correlation_id: str | None = None,
    priority: int | None = None,
    idempotency_key: str | None = None,
) -> Call:
    fields = _optional(timeout_s, correlation_id, priority)
    if name is not None:
        fields["name"] = name
    joined = tag_list(tags)
    if joined:
        fields["tags"] = joined
    parts: list[Part] = [("workflow_json", ("workflow.json", workflow_bytes(workflow), "application/json"))]
    parts += _plain(fields) + _parameters(params, choices, files)
    return Call("POST", "/v1/workflow", parts=parts, headers=_key(idempotency_key))


def get_workflow(workflow_id: str) -> Call:
    return Call("GET", f"/v1/workflow/{_id(workflow_id)}")


def list_workflows(
    *,
    status: str | None = None,
    tag: str | None = None,
    parent_id: str | None = None,
    correlation_id: str | None = None,
    page: int = 1,
    per_page: int = 10,
) -> Call:
    query: dict[str, str | int] = {"page": page, "per_page": per_page}
    filters = {"status": status, "tag": tag, "parent_id": parent_id, "correlation_id": correlation_id}
    query.update({k: v for k, v in filters.items() if v is not None})
    return Call("GET", "/v1/workflow", query=query)


def delete_workflow(workflow_id: str) -> Call:
    return Call("DELETE", f"/v1/workflow/{_id(workflow_id)}")


def cancel(workflow_id: str) -> Call:
    return Call("POST", f"/v1/workflow/{_id(workflow_id)}/cancel")


def tasks(workflow_id: str, attempt: int | None = None) -> Call:
    query = {"attempt": attempt} if attempt is not None else None
    return Call("GET", f"/v1/workflow/{_id(workflow_id)}/tasks", query=query)


def subscribe_path(workflow_id: str) -> str:
    return f"/v1/workflow/{_id(workflow_id)}/subscribe"


def rerun(
    workflow_id: str,
    *,
    params: Mapping[str, Value] | None = None,
    files: Mapping[str, FileSource] | None = None,
    choices: Mapping[str, str] | None = None,
    timeout_s: int | None = None,
    correlation_id: str | None = None,
    priority: int | None = None,
    idempotency_key: str | None = None,
) -> Call:
    parts = _parameters(params, choices, files) + _plain(_optional(timeout_s, correlation_id, priority))
    return Call("POST", f"/v1/workflow/{_id(workflow_id)}/rerun", parts=parts, headers=_key(idempotency_key))


def rerun_from_node(
    workflow_id: str,
    node: str | None,
    *,
    params: Mapping[str, Value] | None = None,
    choices: Mapping[str, str] | None = None,
    task_input: Mapping[str, Any] | None = None,
    correlation_id: str | None = None,
    idempotency_key: str | None = None,
) -> Call:
    body: dict[str, Any] = {}
    if node is not None:
        body["reRunFromTaskId"] = str(node)  # a node id or a task id: the server takes both
    inputs = {_field("$", k): _text(v) for k, v in (params or {}).items()}
    inputs.update({_field("#", k): str(v) for k, v in (choices or {}).items()})
    if inputs:
        body["workflowInput"] = inputs
    if task_input:
        body["taskInput"] = dict(task_input)
    if correlation_id is not None:
        body["correlationId"] = correlation_id
    return Call("POST", f"/api/workflow/{_id(workflow_id)}/rerun", json=body, headers=_key(idempotency_key))


def upload(source: FileSource, filename: str | None = None) -> Call:
    """A file stored once, to be named by its sha256 (in a sweep's sets, say)."""
    _, (name, content, kind) = _file_part("$file", source)
    return Call(
        "POST",
        "/v1/blob",
        query={"filename": filename or name or "file"},
        content=content,
        headers={"Content-Type": kind or "application/octet-stream"},
    )


def sweep(
    workflow_id: str,
    *,
    grid: Mapping[str, Iterable[Any]] | None = None,
    sets: Iterable[Mapping[str, Any]] | None = None,
    timeout_s: int | None = None,
    correlation_id: str | None = None,
    priority: int | None = None,
    idempotency_key: str | None = None,
) -> Call:
    """Names as the server takes them: ``$name`` for a parameter (a file as ``{"sha256": …}``
    from :func:`upload`), ``#name`` for a choice."""
    if (grid is None) == (sets is None):
        raise ValueError("a sweep takes grid (every combination) or sets, one of them")
    body: dict[str, Any] = (
        {"grid": {k: list(v) for k, v in grid.items()}}
        if grid is not None
        else {"sets": [dict(s) for s in sets or ()]}
    )
    for key, value in (("timeout_s", timeout_s), ("correlation_id", correlation_id), ("priority", priority)):
        if value is not None:
            body[key] = value
    return Call("POST", f"/v1/workflow/{_id(workflow_id)}/sweep", json=body, headers=_key(idempotency_key))


def get_sweep(sweep_id: str) -> Call:
    return Call("GET", f"/v1/sweep/{_id(sweep_id)}")


def cancel_sweep(sweep_id: str) -> Call:
    return Call("POST", f"/v1/sweep/{_id(sweep_id)}/cancel")


def list_outputs(workflow_id: str) -> Call:
    return Call("GET", f"/v1/workflow/{_id(workflow_id)}/outputs")


def output_path(output: Mapping[str, Any] | str) -> str:
    if isinstance(output, str):
        return f"/v1/output/{_id(output)}"
    src = output.get("src")
    return str(src) if isinstance(src, str) and src.startswith("/") else f"/v1/output/{_id(output['id'])}"


def user() -> Call:
    return Call("GET", "/v1/user")


def list_runners(*, page: int = 1, per_page: int = 100) -> Call:
    return Call("GET", "/v1/runner", query={"page": page, "per_page": per_page})


def get_runner(runner_id: str) -> Call:
    return Call("GET", f"/v1/runner/{_id(runner_id)}")


def create_runner(name: str, tags: str | Iterable[str] | None = None) -> Call:
    joined = tag_list(tags)
    return Call("POST", "/v1/runner", json={"name": name, "tags": joined.split(",") if joined else []})


def update_runner(
    runner_id: str, *, name: str | None = None, tags: Iterable[str] | None = None, status: str | None = None
) -> Call:
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if tags is not None:
        changes["tags"] = list(tags)
    if status is not None:
        changes["status"] = status
    return Call("PUT", f"/v1/runner/{_id(runner_id)}", json=changes)


def delete_runner(runner_id: str) -> Call:
    return Call("DELETE", f"/v1/runner/{_id(runner_id)}")
