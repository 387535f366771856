"""Control-plane settings: one object per process, validated at start, passed in."""

from __future__ import annotations

import os
import secrets
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from control_plane import failpoints

ENV_PREFIX = "COMFYFLEET_"


@dataclass(frozen=True)
class Tier:
    name: str
    max_parameters: int  # dynamic parameters one request may send
    max_workflows_per_day: int  # submissions and reruns in the last 24 h
    # An attempt that runs longer than its timeout_s is interrupted and the workflow fails
    # with reason "timeout"; a request or template may ask for less, or more up to the max.
    default_timeout_s: int = 3600
    max_timeout_s: int = 4 * 3600
    # A workflow that no runner takes within this long fails with reason "queue_timeout".
    max_queue_s: int = 24 * 3600
    # Submissions (and reruns, and template runs) per second and token, in bursts of so many.
    submits_per_s: float = 10.0
    submit_burst: int = 100
    # A workflow may ask for a priority from 0 (the default) up to this: waiting workflows
    # are dispatched highest priority first, then oldest first.
    max_priority: int = 0
    # A finished workflow's files (inputs, outputs) are removed this many days after it
    # finished; 0 keeps them until the workflow is deleted.
    retention_days: float = 0


DEFAULT_TIERS: dict[str, Tier] = {
    "free": Tier(
        "free",
        max_parameters=20,
        max_workflows_per_day=500,
        default_timeout_s=600,
        max_timeout_s=3600,
        max_queue_s=3600,
        submits_per_s=2.0,
        submit_burst=20,
        max_priority=1,
        retention_days=7,
    ),
    "pro": Tier(
        "pro",
        max_parameters=100,
        max_workflows_per_day=20_000,
        default_timeout_s=1800,
        max_timeout_s=4 * 3600,
        max_queue_s=6 * 3600,
        submits_per_s=20.0,
        submit_burst=200,
        max_priority=5,
        retention_days=30,
    ),
    "enterprise": Tier(
        "enterprise",
        max_parameters=500,
        max_workflows_per_day=1_000_000,
        default_timeout_s=3600,
        max_timeout_s=24 * 3600,
        max_queue_s=24 * 3600,
        submits_per_s=1000.0,
        submit_burst=5000,
        max_priority=10,
        retention_days=90,
    ),
}


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data")
    # Empty means a SQLite file under data_dir.
    database_url: str = ""
    max_request_bytes: int = 50 * 1024 * 1024
    # Agents between connecting and their welcome at once; more are told when to come back,
    # so that a whole fleet reconnecting after a restart is let in at a pace it can take.
    max_handshakes: int = 64
    # Agents waiting for a handshake to free up; beyond them, agents are told to come back.
    # They must be welcomed within the agent's own timeout (15 s by default).
    handshake_queue: int = 1024
    heartbeat_s: float = 10.0
    # A runner that sends nothing for this long is taken for gone and its socket closed.
    runner_timeout_s: float = 30.0
    # A runner whose connection dropped keeps its jobs this long before they are requeued.
    runner_grace_s: float = 30.0
    # Attempts a workflow gets when the fleet fails it (a runner lost, a ComfyUI down, a
    # prompt lost); its own failures are not retried.
    max_attempts: int = 5
    # The pause before a retried attempt is dispatched: this, doubled per attempt, up to 30 s.
    retry_backoff_s: float = 1.0
    # What one attempt of a workflow may upload as outputs, in all.
    max_job_output_bytes: int = 16 * 1024**3
    # How often deadlines (timeouts, queue limits) are looked at.
    deadline_sweep_s: float = 1.0
    # Node and progress reports reach subscribers at once and the store with the job's next
    # report, or this long after they came when none follows (a long node).
    node_report_write_s: float = 0.5
    # A rerun from a node waits this long for the runner whose cache holds its upstream
    # nodes to have a free slot, then goes to any runner that can run it.
    rerun_affinity_wait_s: float = 60.0
    tiers: dict[str, Tier] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    # Names of fail points where the process dies as a crash would (failpoints.py); tests only.
    failpoints: str = ""
    # Who this control plane is to the others on its database (in their messages and logs);
    # host, process and a random part unless set.
    replica_id: str = field(default_factory=lambda: _default_replica_id())
    # A $file parameter given as a URL is fetched by the control plane: within this long,
    # and never from a private, loopback or link-local address unless this allows it.
    input_fetch_timeout_s: float = 30.0
    fetch_private_urls: bool = False
    # Webhooks: never to a private, loopback or link-local address unless this allows it.
    webhook_private_urls: bool = False
    # What a receiver has to answer one delivery attempt in.
    webhook_timeout_s: float = 10.0
    # The pause after a failed attempt: this, doubled per attempt, up to webhook_max_backoff_s;
    # a delivery is given up on (failed) once it is webhook_give_up_s old.
    webhook_backoff_s: float = 5.0
    webhook_max_backoff_s: float = 3600.0
    webhook_give_up_s: float = 24 * 3600.0
    # An endpoint whose every attempt has failed for this long is disabled, with the reason.
    webhook_disable_after_s: float = 24 * 3600.0
    # How often the outbox is looked at when nothing here woke the sender.
    webhook_poll_s: float = 1.0
    # The control plane's address as receivers should see it: outputs' URLs in payloads.
    public_url: str = ""
    # Where inputs and outputs are kept: empty for <data_dir>/blobs, a folder, or
    # s3://bucket/prefix (endpoint, region and credentials from the AWS_* environment).
    blob_url: str = ""
    # Downloads from object storage are presigned URLs valid this long; 0 streams the bytes
    # through the control plane instead (for a store its clients and agents cannot reach).
    blob_presign_s: float = 300.0
    # How often finished workflows past their tier's retention period are looked for.
    retention_sweep_s: float = 300.0

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'comfyfleet.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    def validate(self) -> Settings:
        if self.max_request_bytes <= 0:
            raise ValueError("max_request_bytes must be positive")
        if self.max_handshakes < 1 or self.handshake_queue < 0:
            raise ValueError("max_handshakes must be at least 1 and handshake_queue not negative")
        if self.heartbeat_s <= 0 or self.runner_grace_s < 0:
            raise ValueError("heartbeat_s must be positive and runner_grace_s not negative")
        if self.runner_timeout_s < 2 * self.heartbeat_s:
            raise ValueError("runner_timeout_s must be at least twice heartbeat_s")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        failpoints.parse(self.failpoints)
        if self.node_report_write_s <= 0:
            raise ValueError("node_report_write_s must be positive")
        if self.input_fetch_timeout_s <= 0:
            raise ValueError("input_fetch_timeout_s must be positive")
        self._validate_webhooks()
        self._validate_blobs()
        if self.retry_backoff_s < 0 or self.deadline_sweep_s <= 0:
            raise ValueError("retry_backoff_s must not be negative and deadline_sweep_s must be positive")
        return self

    def _validate_webhooks(self) -> None:
        if min(self.webhook_timeout_s, self.webhook_poll_s, self.webhook_give_up_s) <= 0:
            raise ValueError("webhook_timeout_s, webhook_poll_s and webhook_give_up_s must be positive")
        if self.webhook_backoff_s < 0 or self.webhook_max_backoff_s < self.webhook_backoff_s:
            raise ValueError("webhook_backoff_s must not be negative nor above webhook_max_backoff_s")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ValueError("public_url must start with http:// or https://")

    def _validate_blobs(self) -> None:
        if self.retention_sweep_s <= 0 or any(t.retention_days < 0 for t in self.tiers.values()):
            raise ValueError("retention_sweep_s must be positive and no tier's retention_days negative")
        if self.blob_presign_s < 0:
            raise ValueError("blob_presign_s must not be negative")
        if "://" in self.blob_url and not self.blob_url.startswith(("s3://", "file://")):
            raise ValueError(
                f"blob_url {self.blob_url!r}: use s3://bucket/prefix, a folder or file:///folder"
            )
        if self.blob_url.startswith("s3://") and not self.blob_url.removeprefix("s3://").split("/")[0]:
            raise ValueError(f"blob_url {self.blob_url!r} names no bucket (s3://bucket/prefix)")

    @property
    def base_url(self) -> str:
        """Where receivers reach this control plane: public_url, else its own address."""
        return self.public_url.rstrip("/") if self.public_url else f"http://{self.host}:{self.port}"


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


_SCALARS = {f.name: f for f in fields(Settings) if f.name != "tiers"}


def _coerce(name: str, raw: Any) -> Any:
    kind = _SCALARS[name].type
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
        if kind == "bool":
            return _truth(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"setting {name}: {raw!r} is not a valid {kind}") from exc


def _truth(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{raw!r} is not true or false")


def load_settings(
    overrides: dict[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Defaults < TOML file < COMFYFLEET_* environment < explicit overrides (command-line flags)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or (
        Path(env[f"{ENV_PREFIX}CONFIG"]) if env.get(f"{ENV_PREFIX}CONFIG") else None
    )
    if config_file is not None:
        with open(config_file, "rb") as fh:
            for key, raw in tomllib.load(fh).items():
                if key not in _SCALARS:
                    raise ValueError(f"{config_file}: unknown setting {key!r}")
                values[key] = _coerce(key, raw)
    for name in _SCALARS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw:
            values[name] = _coerce(name, raw)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _coerce(key, raw)
    return Settings(**values).validate()
