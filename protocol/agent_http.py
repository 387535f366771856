"""The agent's HTTP side of the protocol: where it downloads a job's input files and uploads its
outputs (blobs never travel on the websocket), and what an upload is answered with."""

from __future__ import annotations

from pydantic import BaseModel

CONNECT_PATH = "/v1/agent/connect"  # the websocket
FILE_PATH = "/v1/agent/jobs/{workflow_id}/files/{sha256}"  # GET: an input file of a job
OUTPUTS_PATH = "/v1/agent/jobs/{workflow_id}/outputs"  # PUT ?attempt&node_id&filename[&kind]
# The upload's body must hash to this header's value (hex sha256), or nothing is kept.
SHA256_HEADER = "X-Content-SHA256"


def file_path(workflow_id: str, sha256: str) -> str:
    return FILE_PATH.format(workflow_id=workflow_id, sha256=sha256)


def outputs_path(workflow_id: str) -> str:
    return OUTPUTS_PATH.format(workflow_id=workflow_id)


class UploadReceipt(BaseModel):
    """The answer to an output upload: 201 when recorded now, 200 when the same file was
    already recorded for that attempt (a retry)."""

    output_id: str
    size_bytes: int
    sha256: str
