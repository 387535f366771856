"""A workflow's parameters, typed: what the client sent, the files it uploaded, what the
runner drew for ``$random``/``$timestamp``, and how a rerun from a task is to run. (What a
run produced, files and texts alike, are ``Output`` rows.)

Stored as one JSON column (``Workflow.workflow_params``); read and written only through
:meth:`WorkflowParams.of` and :meth:`WorkflowParams.stored`, so its shape lives here alone.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class FileRef(BaseModel):
    """A ``$file`` parameter's upload, kept in the blob store under its sha256."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    filename: str
    size_bytes: int
    content_type: str


class Resolved(BaseModel):
    """What a run used, as the runner reports it: every value, file name and drawn seed."""

    model_config = ConfigDict(extra="allow")  # kept whole: it is the record of the run

    values: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    random: dict[str, int] = Field(default_factory=dict)  # "node.input" -> seed
    timestamp_ms: int | None = None


class RerunFrom(BaseModel):
    """A Conductor-compatible rerun from a task: the node it starts from, and the seeds and
    timestamp upstream nodes keep so that ComfyUI's cache serves them."""

    # Stored as "from"; a keyword in Python, so the attribute is node_id.
    node_id: str = Field(validation_alias=AliasChoices("from", "node_id"), serialization_alias="from")
    fixed_random: dict[str, int] = Field(default_factory=dict)
    timestamp_ms: int | None = None


class WorkflowParams(BaseModel):
    values: dict[str, str] = Field(default_factory=dict)  # $text and #choice values, by name
    files: dict[str, FileRef] = Field(default_factory=dict)  # $file uploads, by name
    resolved: Resolved | None = None  # set by the runner once the attempt ran
    rerun: RerunFrom | None = None

    @classmethod
    def of(cls, stored: dict[str, Any]) -> WorkflowParams:
        return cls.model_validate(stored)

    def stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def for_new_attempt(self) -> WorkflowParams:
        """The same inputs, nothing the last attempt produced or how it was rerun."""
        return WorkflowParams(values=dict(self.values), files=dict(self.files))
