"""The ``comfyfleet`` command line, run as a user runs it: a real process."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import aiohttp

from comfyfleet.processes import free_port

COMFYFLEET = [sys.executable, "-m", "comfyfleet"]


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *COMFYFLEET, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_admin_token_create_prints_the_token_last(tmp_path: Path) -> None:
    code, out, err = await run(
        "admin", "token", "create", "--account", "acme", "--tier", "pro", "--data-dir", str(tmp_path)
    )
    assert code == 0, err
    token = out.strip().splitlines()[-1]
    assert token.startswith("cf_") and len(token) > 30
    code, out, err = await run(
        "admin", "token", "create", "--account", "acme", "--tier", "gold", "--data-dir", str(tmp_path)
    )
    assert code == 2
    assert "unknown tier 'gold'" in err


async def test_serve_takes_its_settings_from_the_environment(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, out, _ = await run("admin", "token", "create", "--account", "acme", "--data-dir", str(tmp_path))
    token = out.strip().splitlines()[-1]
    env = {**os.environ, "COMFYFLEET_PORT": str(port), "COMFYFLEET_DATA_DIR": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        *COMFYFLEET, "serve", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while b"control plane listening on" not in await proc.stderr.readline():
                pass
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            async with http.get(
                f"http://127.0.0.1:{port}/v1/user", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert (await resp.json())["account"]["name"] == "acme"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "COMFYFLEET_PORT": "eighty"}
    code, _, err = await run("serve", "--data-dir", str(tmp_path), env=env)
    assert code == 2
    assert "port" in err and "'eighty'" in err


async def serving(data_dir: Path, port: int, *args: str) -> asyncio.subprocess.Process:
    """``comfyfleet serve`` on ``data_dir`` (and ``args``), once it listens."""
    proc = await asyncio.create_subprocess_exec(
        *COMFYFLEET,
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while b"control plane listening on" not in await proc.stderr.readline():
            pass
    return proc


async def test_a_second_control_plane_on_the_same_sqlite_file_says_so_and_stops(tmp_path: Path) -> None:
    first = await serving(tmp_path, port := free_port())
    try:
        code, _, err = await run("serve", "--data-dir", str(tmp_path), "--port", str(free_port()))
        assert code == 2
        assert f"another control plane (pid {first.pid}) already serves" in err
        assert "PostgreSQL" in err
        # Short commands still open the database beside it; the first one serves on.
        code, _, err = await run("admin", "token", "create", "--account", "acme", "--data-dir", str(tmp_path))
        assert code == 0, err
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
    finally:
        first.terminate()
        assert await asyncio.wait_for(first.wait(), 20) == 0
    # Once it has gone, another may serve the file.
    second = await serving(tmp_path, free_port())
    second.terminate()
    assert await asyncio.wait_for(second.wait(), 20) == 0


async def test_serve_logs_each_request_when_asked(tmp_path: Path) -> None:
    proc = await serving(tmp_path, port := free_port(), "--access-log")
    try:
        assert proc.stderr is not None
        url = f"http://127.0.0.1:{port}/healthz"
        async with aiohttp.ClientSession() as http, http.get(url, headers={"User-Agent": "probe/1"}) as resp:
            assert resp.status == 200
        async with asyncio.timeout(30):
            line = b""
            while b'"GET /healthz HTTP/1.1" 200' not in line:
                line = await proc.stderr.readline()
                assert line, "serve ended without logging the request"
        assert b"127.0.0.1" in line and b'"probe/1"' in line
    finally:
        proc.terminate()
        await proc.wait()
