"""GET /openapi.json: the control plane's HTTP API as OpenAPI 3.1.

Written out by hand from one table of operations, so that it says what the handlers do
(tests check that every route is described and every described route exists, and that
answers match the shapes given here)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

routes = web.RouteTableDef()

_ERROR = {"$ref": "#/components/schemas/Error"}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_WORKFLOW = {"$ref": "#/components/schemas/Workflow"}
_RUNNER = {"$ref": "#/components/schemas/Runner"}
_TEMPLATE = {"$ref": "#/components/schemas/Template"}

_STRING_OR_NULL = {"type": ["string", "null"]}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["status", "message"],
        "properties": {"status": {"type": "integer"}, "message": {"type": "string"}},
    },
    "Workflow": {
        "type": "object",
        "required": [
            "id",
            "name",
            "status",
            "tags",
            "created_at",
            "updated_at",
            "started_at",
            "completed_at",
        ],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "status": {
                "enum": [
                    "accepted",
                    "uploaded",
                    "queued",
                    "running",
                    "completed",
                    "failed",
                    "cancelled",
                    "invalid",
                ]
            },
            "tags": {"type": "array", "items": {"type": "string"}},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "started_at": _TIME_OR_NULL,
            "completed_at": _TIME_OR_NULL,
            "workflow_json": _ANY_OBJECT,
            "workflow_params": _ANY_OBJECT,
            "attempt": {"type": "integer"},
            "prompt_id": _STRING_OR_NULL,
            "queue_number": {"type": ["integer", "null"]},
            "progress": {"type": ["number", "null"]},
            "runner_id": _STRING_OR_NULL,
            "correlation_id": _STRING_OR_NULL,
            "parent_id": _STRING_OR_NULL,
            "error_node": _STRING_OR_NULL,
            "exception_type": _STRING_OR_NULL,
            "exception_message": _STRING_OR_NULL,
            "node_errors": {"type": ["object", "null"]},
            "failure_reason": {
                "enum": ["workflow", "infrastructure", "timeout", "queue_timeout", None],
                "description": "whose failure it was: the workflow's own graph, the fleet's once "
                "max_attempts ran out, an attempt past timeout_s, or no runner within the queue limit",
            },
            "attempts": {
                "type": "array",
                "description": "each attempt that ended without a result "
                "(attempt, runner_id, kind, reason, at)",
                "items": _ANY_OBJECT,
            },
            "timeout_s": {"type": "integer"},
            "queue_timeout_s": {"type": "integer"},
            "reruns": {"type": "array", "items": {"type": "string"}},
            "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
        },
    },
    "Task": {
        "type": "object",
        "required": ["task_id", "workflow_id", "attempt", "node_id", "status", "cached"],
        "properties": {
            "task_id": {"type": "string"},
            "workflow_id": {"type": "string"},
            "attempt": {"type": "integer"},
            "node_id": {"type": "string"},
            "class_type": _STRING_OR_NULL,
            "status": {"enum": ["SCHEDULED", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELED"]},
            "cached": {"type": "boolean"},
            "started_at": _TIME_OR_NULL,
            "ended_at": _TIME_OR_NULL,
            "reason": _STRING_OR_NULL,
            "failure_kind": {"enum": ["workflow", "infrastructure", "out_of_memory", None]},
        },
    },
    "Output": {
        "type": "object",
        "required": ["id", "workflow_id", "node_id", "filename", "content_type", "size", "src"],
        "properties": {
            "id": {"type": "string"},
            "workflow_id": {"type": "string"},
            "node_id": {"type": "string"},
            "filename": {"type": "string"},
            "kind": {"type": "string"},
            "content_type": {"type": "string"},
            "size": {"type": "integer"},
            "sha256": {"type": "string"},
            "src": {"type": "string"},
        },
    },
    "Runner": {
        "type": "object",
        "required": ["id", "name", "tags", "status", "created_at", "updated_at", "connected"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "status": {"enum": ["active", "disabled"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "connected": {"type": "boolean"},
            "last_seen": _TIME_OR_NULL,
            "capacity": {"type": ["object", "null"]},
            "comfyui": {"type": ["object", "null"]},
            "current_jobs": {"type": "array", "items": {"type": "string"}},
            "token": {"type": "string", "description": "only in the answer to create, shown once"},
        },
    },
    "Template": {
        "type": "object",
        "required": ["id", "name", "description", "body", "parameters"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "body": _ANY_OBJECT,
            "parameters": {"type": "array", "items": _ANY_OBJECT},
            "timeout_s": {"type": ["integer", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    },
}


def _list_of(name: str, item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [name, "total"],
        "properties": {name: {"type": "array", "items": item}, "total": {"type": "integer"}},
    }


_MULTIPART = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "description": "name, tags (comma list), workflow_json (file or field), correlation_id, "
            "timeout_s (seconds an attempt may take, up to the tier's maximum); $name text fields "
            "and file parts, #name choice fields",
            "additionalProperties": True,
        }
    }
}
_JSON_BODY = {"application/json": {"schema": _ANY_OBJECT}}
_PAGING = [
    {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
]

# (method, path, summary, auth, request body, {status: (description, schema or media)})
Operation = tuple[str, str, str, str, dict[str, Any] | None, dict[int, tuple[str, Any]]]
_C, _R, _O, _N = "client", "runner", "operator", "none"
OPERATIONS: list[Operation] = [
    (
        "post",
        "/v1/workflow",
        "Submit a workflow with its parameters",
        _C,
        _MULTIPART,
        {201: ("accepted", _WORKFLOW)},
    ),
    (
        "get",
        "/v1/workflow",
        "List workflows (status, tag, parent_id, correlation_id)",
        _C,
        None,
        {200: ("a page", _list_of("workflows", _ANY_OBJECT))},
    ),
    (
        "get",
        "/v1/workflow/{id}",
        "A workflow with its current tasks and reruns",
        _C,
        None,
        {200: ("it", _WORKFLOW)},
    ),
    (
        "post",
        "/v1/workflow/{id}/cancel",
        "Cancel a workflow that has not finished",
        _C,
        None,
        {200: ("cancelled", _WORKFLOW)},
    ),
    (
        "get",
        "/v1/workflow/{id}/outputs",
        "The outputs of the current attempt",
        _C,
        None,
        {200: ("outputs", _list_of("outputs", {"$ref": "#/components/schemas/Output"}))},
    ),
    (
        "get",
        "/v1/output/{id}",
        "Download an output",
        _C,
        None,
        {200: ("the file", "application/octet-stream")},
    ),
    (
        "get",
        "/v1/workflow/{id}/subscribe",
        "Follow a workflow (Server-Sent Events: status, node, output, cause)",
        _C,
        None,
        {200: ("an event stream, closed at a terminal state", "text/event-stream")},
    ),
    (
        "post",
        "/v1/workflow/{id}/rerun",
        "Rerun with new parameters as a new workflow (seed 003)",
        _C,
        _MULTIPART,
        {201: ("the new workflow", _WORKFLOW)},
    ),
    (
        "post",
        "/api/workflow/{id}/rerun",
        "Rerun from a task, in place (seed 000)",
        _C,
        _JSON_BODY,
        {200: ("the workflow id", "text/plain")},
    ),
    (
        "get",
        "/api/workflow/{id}",
        "A workflow with the tasks of every attempt",
        _C,
        None,
        {200: ("it", _WORKFLOW)},
    ),
    (
        "post",
        "/v1/template",
        "Create a template (multipart name, description, body)",
        _C,
        _MULTIPART,
        {201: ("created", _TEMPLATE)},
    ),
    ("get", "/v1/template", "List templates", _C, None, {200: ("a page", _list_of("templates", _TEMPLATE))}),
    (
        "get",
        "/v1/template/{id}",
        "A template and its declared parameters",
        _C,
        None,
        {200: ("it", _TEMPLATE)},
    ),
    ("put", "/v1/template/{id}", "Update a template", _C, _MULTIPART, {200: ("updated", _TEMPLATE)}),
    (
        "post",
        "/v1/template/{id}/run",
        "Run a template with parameters",
        _C,
        _MULTIPART,
        {201: ("the new workflow", _WORKFLOW)},
    ),
    (
        "post",
        "/v1/runner",
        "Register a runner; its token is in this answer only",
        _C,
        _JSON_BODY,
        {201: ("created", _RUNNER)},
    ),
    (
        "get",
        "/v1/runner",
        "List runners with their live state",
        _C,
        None,
        {200: ("a page", _list_of("runners", _RUNNER))},
    ),
    ("get", "/v1/runner/{id}", "A runner with its live state", _C, None, {200: ("it", _RUNNER)}),
    (
        "put",
        "/v1/runner/{id}",
        "Update name, tags or status (disabled drains)",
        _C,
        _JSON_BODY,
        {200: ("updated", _RUNNER)},
    ),
    (
        "delete",
        "/v1/runner/{id}",
        "Delete a runner; its jobs move elsewhere",
        _C,
        None,
        {200: ("deleted", _ANY_OBJECT)},
    ),
    (
        "post",
        "/v1/runner/{id}/interrupt",
        "Interrupt what the runner's ComfyUI runs (through its agent)",
        _C,
        None,
        {200: ("interrupted prompts", _ANY_OBJECT), 504: ("the agent did not answer", _ERROR)},
    ),
    (
        "get",
        "/v1/runner/{id}/stats",
        "Live capacity and ComfyUI system stats (through its agent)",
        _C,
        None,
        {200: ("stats", _ANY_OBJECT), 504: ("the agent did not answer", _ERROR)},
    ),
    ("get", "/v1/user", "The account, its tier, limits and usage", _C, None, {200: ("it", _ANY_OBJECT)}),
    ("get", "/healthz", "Liveness and the database in use", _N, None, {200: ("ok", _ANY_OBJECT)}),
    ("get", "/metrics", "Prometheus metrics", _N, None, {200: ("text exposition format", "text/plain")}),
    ("get", "/openapi.json", "This document", _N, None, {200: ("OpenAPI 3.1", _ANY_OBJECT)}),
    (
        "get",
        "/dashboard",
        "The operator dashboard (HTML; signs in with an operator token)",
        _N,
        None,
        {200: ("the page", "text/html")},
    ),
    (
        "get",
        "/dashboard/assets/{name}",
        "The dashboard's script and style",
        _N,
        None,
        {200: ("the asset", "text/plain")},
    ),
    (
        "get",
        "/v1/dashboard",
        "The fleet as the dashboard shows it",
        _O,
        None,
        {200: ("a snapshot", _ANY_OBJECT)},
    ),
    (
        "get",
        "/v1/dashboard/stream",
        "Dashboard snapshots as they change (Server-Sent Events)",
        _O,
        None,
        {200: ("an event stream", "text/event-stream")},
    ),
    (
        "get",
        "/v1/agent/connect",
        "The agent's websocket (runner token)",
        _R,
        None,
        {101: ("switching protocols", None)},
    ),
    (
        "get",
        "/v1/agent/jobs/{workflow_id}/files/{sha256}",
        "An input file of a job the runner holds",
        _R,
        None,
        {200: ("the file", "application/octet-stream")},
    ),
    (
        "put",
        "/v1/agent/jobs/{workflow_id}/outputs",
        "Upload an output of the current attempt (sha256 checked)",
        _R,
        {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        {201: ("stored", _ANY_OBJECT), 409: ("that attempt is no longer current", _ERROR)},
    ),
]

_COMMON_ERRORS = {
    "400": {"description": "bad input", "content": {"application/json": {"schema": _ERROR}}},
    "401": {
        "description": "missing, invalid or expired token",
        "content": {"application/json": {"schema": _ERROR}},
    },
    "404": {
        "description": "no such object (also another account's)",
        "content": {"application/json": {"schema": _ERROR}},
    },
}


def _response(description: str, body: Any) -> dict[str, Any]:
    if body is None:
        return {"description": description}
    if isinstance(body, str):
        return {"description": description, "content": {body: {}}}
    return {"description": description, "content": {"application/json": {"schema": body}}}


def build_spec() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, summary, auth, body, responses in OPERATIONS:
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {str(code): _response(*answer) for code, answer in responses.items()},
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in (part[1:-1] for part in path.split("/") if part.startswith("{"))
        ]
        if method == "get" and path in ("/v1/workflow", "/v1/runner", "/v1/template"):
            params += _PAGING
        if params:
            operation["parameters"] = params
        if body is not None:
            operation["requestBody"] = {"required": True, "content": body}
        if auth != _N:
            operation["security"] = [{"bearer": []}, {"x_authorization": []}]
            operation["responses"].update(
                {k: v for k, v in _COMMON_ERRORS.items() if k not in operation["responses"]}
            )
            operation["x-token-scope"] = auth
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "comfyfleet control plane", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "x_authorization": {"type": "apiKey", "in": "header", "name": "X-Authorization"},
            },
        },
    }


_SPEC = build_spec()


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(_SPEC)
