"""An S3-speaking server for the tests: moto's, in a process of its own on a free port of
127.0.0.1, started once per session. Each user of it gets a bucket of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process needs in its environment to use this server as its S3."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "comfyfleet-test",
            "AWS_SECRET_ACCESS_KEY": "comfyfleet-test-secret",
            "AWS_DEFAULT_REGION": REGION,
            # Nothing from a developer's own ~/.aws gets in the way.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def start(self, timeout_s: float = 60.0) -> None:
        moto = Path(sys.executable).with_name("moto_server")
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self._log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not answer within {timeout_s} s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)

    def client(self) -> Any:
        return get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    async def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        async with self.client() as s3:
            await s3.create_bucket(Bucket=name)
        return name

    async def keys(self, bucket: str) -> list[str]:
        """Every object in the bucket, and every upload begun and neither completed nor
        aborted (as ``upload:<key>``)."""
        async with self.client() as s3:
            listed = await s3.list_objects_v2(Bucket=bucket)
            uploads = await s3.list_multipart_uploads(Bucket=bucket)
        found = [o["Key"] for o in listed.get("Contents", [])]
        return sorted(found + [f"upload:{u['Key']}" for u in uploads.get("Uploads", [])])
