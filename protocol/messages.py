"""Websocket messages between a runner agent and the control plane
(docs/architecture.md, "The agent protocol").

One discriminated union on ``type``; both sides parse with :func:`parse_message` and
serialise with :func:`dump_message`. Unknown types are not an error: they come back as
``None`` so that a newer peer can talk to an older one.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from protocol.capacity import Capacity

# 2: the agent waits for ``proceed`` before it posts a prompt; ``job_ack`` ends a job.
PROTOCOL_VERSION = 2  # what this side speaks
OLDEST_PROTOCOL_VERSION = 2  # the oldest a peer may speak and still be understood


def negotiate(offered: int) -> int | None:
    """The version two sides speak: the older of the two, if this side still understands it
    (the control plane answers it in ``welcome``); ``None`` if they have none in common."""
    if offered < OLDEST_PROTOCOL_VERSION:
        return None
    return min(offered, PROTOCOL_VERSION)


JobStatus = Literal["uploaded", "queued", "running", "completed", "failed", "cancelled", "invalid"]
# Who a failure belongs to. "workflow": the graph's own (ComfyUI rejected the prompt, a node
# raised); final. "infrastructure": the fleet's (ComfyUI unreachable or restarted, the prompt
# lost, a transfer that could not get through, the agent broke); the control plane runs the
# job again as the next attempt, elsewhere where it can. "out_of_memory": a node ran out of GPU
# memory; worth one more try on a runner with more free GPU memory, final otherwise.
FailureKind = Literal["workflow", "infrastructure", "out_of_memory"]


class _Message(BaseModel):
    # Extra fields are kept rather than rejected so a newer peer may add fields.
    model_config = ConfigDict(extra="ignore")


class ComfyUIInfo(BaseModel):
    """What the agent's ComfyUI can run, sent at hello."""

    url: str
    version: str | None = None
    node_classes: list[str] = Field(default_factory=list)
    # loader input name (e.g. "ckpt_name") -> offered model files
    models: dict[str, list[str]] = Field(default_factory=dict)
    devices: list[dict[str, Any]] = Field(default_factory=list)
    # class_type -> input -> INT/FLOAT/BOOLEAN/STRING/COMBO...: lets the control plane
    # convert and check parameter values at submit time.
    input_types: dict[str, dict[str, str]] = Field(default_factory=dict)
    # class_type -> combo input -> its options
    combo_options: dict[str, dict[str, list[str]]] = Field(default_factory=dict)


class HeldJob(BaseModel):
    workflow_id: str
    attempt: int
    # The job ended on the runner and its last report (job_done, or a final job_update) is
    # kept on the agent's disk until the control plane acknowledges it with ``job_ack``.
    finished: bool = False


class Hello(_Message):
    type: Literal["hello"] = "hello"
    protocol_version: int = PROTOCOL_VERSION
    agent_version: str
    capacity: Capacity
    comfyui: ComfyUIInfo
    jobs: list[HeldJob] = Field(default_factory=list)
    healthy: bool = True
    unhealthy_reason: str | None = None


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    protocol_version: int = PROTOCOL_VERSION
    runner_id: str
    name: str
    tags: list[str]
    status: Literal["active", "disabled"]
    heartbeat_s: float
    # Held jobs the control plane no longer wants run (cancelled, reassigned): drop them.
    drop_jobs: list[HeldJob] = Field(default_factory=list)


class Ready(_Message):
    type: Literal["ready"] = "ready"
    free_slots: int


class JobFile(BaseModel):
    """An input file of a job; the agent downloads it from ``url`` with its runner token."""

    name: str  # the $file parameter's name
    filename: str  # the name the client uploaded it under
    url: str
    sha256: str
    size_bytes: int


class Job(_Message):
    type: Literal["job"] = "job"
    workflow_id: str
    attempt: int
    workflow_json: dict[str, Any]
    # text and choice values by parameter name; files are in ``files``
    params: dict[str, str] = Field(default_factory=dict)
    files: list[JobFile] = Field(default_factory=list)
    rerun_from: str | None = None
    # A rerun from a node keeps the previous attempt's seeds ("node.input" -> value) and
    # timestamp, so the unchanged upstream nodes see the same inputs and ComfyUI's cache
    # serves them.
    fixed_random: dict[str, int] = Field(default_factory=dict)
    timestamp_ms: int | None = None


class JobError(BaseModel):
    message: str
    node_id: str | None = None
    node_type: str | None = None
    exception_type: str | None = None
    # ComfyUI's node_errors for an invalid prompt, kept verbatim
    node_errors: dict[str, Any] | None = None
    # An older agent says nothing: its failures are taken as the workflow's own.
    kind: FailureKind = "workflow"


class NodeEvent(BaseModel):
    """One ComfyUI node event, the raw material of task records."""

    node_id: str
    class_type: str | None = None
    event: Literal["executing", "cached", "executed", "progress", "error", "interrupted"]
    value: float | None = None
    max: float | None = None
    at_ms: int | None = None


class JobUpdate(_Message):
    type: Literal["job_update"] = "job_update"
    workflow_id: str
    attempt: int
    status: JobStatus | None = None
    prompt_id: str | None = None
    queue_number: int | None = None
    node: NodeEvent | None = None
    progress: float | None = None  # 0..1 over the whole prompt
    resolved_params: dict[str, Any] | None = None
    error: JobError | None = None


class OutputRef(BaseModel):
    """An output already uploaded over HTTP (``PUT /v1/agent/jobs/{id}/outputs/...``)."""

    output_id: str
    node_id: str
    filename: str
    kind: str  # images, gifs, video, audio, text ...
    content_type: str
    size_bytes: int
    sha256: str


class JobDone(_Message):
    type: Literal["job_done"] = "job_done"
    workflow_id: str
    attempt: int
    outputs: list[OutputRef] = Field(default_factory=list)
    # text outputs (ComfyUI "text" entries) by node id
    texts: dict[str, list[str]] = Field(default_factory=dict)


class Proceed(_Message):
    """Control plane -> agent, the answer to ``job_update`` ``uploaded``: post the prompt now.

    The agent never posts a prompt without it. It is sent from the fenced transaction that
    records ``uploaded``; a workflow cancelled before that gets ``cancel`` instead, so its
    prompt never reaches ComfyUI at all."""

    type: Literal["proceed"] = "proceed"
    workflow_id: str
    attempt: int


class JobAck(_Message):
    """Control plane -> agent: the job's last report is applied (or no longer wanted); the
    agent may forget the job and delete what it kept of it on disk."""

    type: Literal["job_ack"] = "job_ack"
    workflow_id: str
    attempt: int


class Cancel(_Message):
    type: Literal["cancel"] = "cancel"
    workflow_id: str
    attempt: int


class CapacityUpdate(_Message):
    type: Literal["capacity"] = "capacity"
    capacity: Capacity
    # False while the agent's ComfyUI is down or restarting: no work is sent meanwhile.
    healthy: bool = True
    unhealthy_reason: str | None = None


class Interrupt(_Message):
    """Control plane -> agent: interrupt whatever the runner's ComfyUI is running now."""

    type: Literal["interrupt"] = "interrupt"
    request_id: str


class StatsRequest(_Message):
    """Control plane -> agent: live capacity and ComfyUI's /system_stats, answered by Reply."""

    type: Literal["stats_request"] = "stats_request"
    request_id: str


class Reply(_Message):
    """Agent -> control plane: the answer to an Interrupt or a StatsRequest."""

    type: Literal["reply"] = "reply"
    request_id: str
    ok: bool = True
    error: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


# Every message, once: the union parses frames, and its members' ``type`` values are the
# types this side knows.
Message = Annotated[
    Hello
    | Welcome
    | Ready
    | Job
    | JobUpdate
    | JobDone
    | Proceed
    | JobAck
    | Cancel
    | CapacityUpdate
    | Interrupt
    | StatsRequest
    | Reply,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
KNOWN_TYPES = frozenset(m.model_fields["type"].default for m in get_args(get_args(Message)[0]))


class ProtocolError(ValueError):
    """A frame that claims a known type but does not fit it, or is not JSON at all."""


def parse_message(raw: str | bytes) -> Message | None:
    """Parse one frame; ``None`` for a well-formed message of a type this side does not know."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from exc
    except RecursionError:
        raise ProtocolError("frame is nested too deep to be a message") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("frame is not an object with a string 'type'")
    if data["type"] not in KNOWN_TYPES:
        return None
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError(f"bad {data['type']!r} message: {exc}") from exc
    except RecursionError:
        raise ProtocolError(f"bad {data['type']!r} message: nested too deep") from None


def dump_message(message: _Message) -> str:
    return message.model_dump_json()
