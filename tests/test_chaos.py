"""A small chaos run with a fixed seed (``scripts/chaos.py``): every kind of fault (agents and
ComfyUIs SIGKILLed, an agent frozen past the runner timeout, the control plane SIGKILLed once)
while workflows are submitted, on SQLite, on PostgreSQL, and with three control planes on
PostgreSQL behind nginx (one of them SIGKILLed). Nothing may be lost, duplicated or failed,
every output must download intact and every key must answer its own workflow."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from comfyfleet.throwaway_postgres import PgServer

pytestmark = pytest.mark.timeout(300)
CHAOS = Path(__file__).resolve().parents[1] / "scripts" / "chaos.py"


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "postgresql-3-replicas"])
async def test_a_small_chaos_run_loses_duplicates_and_fails_nothing(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    args = ["--workflows", "20", "--hosts", "2", "--job-s", "0.5", "--fault-every-s", "1", "--seed", "7"]
    args += ["--max-faults", "4"]  # one of each kind
    if database.startswith("postgresql"):
        server: PgServer = request.getfixturevalue("pg_server")
        args += ["--database-url", await server.new_database()]
    if database.endswith("replicas"):
        args += ["--replicas", "3"]
    report = tmp_path / "chaos.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHAOS),
        *args,
        "--json",
        str(report),
        "--keep-logs",
        str(tmp_path / "logs"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text
    result = json.loads(report.read_text())
    assert set(result["faults"]) == {"agent-kill", "comfyui-kill", "agent-freeze", "cp-kill"}, text
    assert (result["lost"], result["duplicated"], result["failed"]) == (0, 0, 0), text
    assert result["terminal"]["completed"] == 20 and result["outputs_checked"] == 20
    assert result["replays_wrong"] == [] and result["outputs_bad"] == []
