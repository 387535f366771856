"""scripts/install-agent.sh against a temporary root: the files a systemd install needs, with
the right content and permissions, a config the agent itself loads, an uninstall that leaves
nothing behind, and a clear refusal of every bad command line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from runner_agent.config import load_settings

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-agent.sh"
VENV = Path(sys.prefix)
TOKEN = "cf_runner_0123456789abcdef"

CONFIG = Path("etc/comfyfleet/agent.toml")
TOKEN_FILE = Path("etc/comfyfleet/agent.token")
UNIT = Path("etc/systemd/system/comfyfleet-agent.service")


@pytest.fixture
def fake_systemctl(tmp_path: Path) -> Path:
    """A systemctl first on PATH that records being called: under --root it must not be."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl-calls"
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    systemctl.chmod(0o755)
    return calls


def run(tmp_path: Path, *args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30, user=user
    )


def install_args(root: Path, token_file: Path, *extra: str) -> list[str]:
    return [
        "install",
        "--root",
        str(root),
        "--server",
        "https://fleet.example.com",
        "--token-file",
        str(token_file),
        "--comfyui",
        "http://127.0.0.1:8188",
        "--venv",
        str(VENV),
        *extra,
    ]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "runner.token"
    path.write_text(f"{TOKEN}\n")
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_writes_config_token_and_unit(tmp_path: Path, token_file: Path, fake_systemctl: Path) -> None:
    root = tmp_path / "root"
    result = run(
        tmp_path,
        *install_args(
            root,
            token_file,
            "--comfyui",
            "http://127.0.0.1:8189",
            "--comfyui-gpu",
            "0",
            "--comfyui-gpu",
            "1",
            "--comfyui-cmd",
            "/opt/comfyui/venv/bin/python main.py --port 8188 --cuda-device 0",
            "--comfyui-cmd",
            '/opt/comfyui/venv/bin/python "main.py" --port 8189 --cuda-device 1',
            "--user",
            "nobody",
            "--shutdown-grace",
            "45",
            "--log-json",
        ),
    )
    assert result.returncode == 0, result.stderr

    assert (root / TOKEN_FILE).read_text() == f"{TOKEN}\n"
    assert mode(root / TOKEN_FILE) == 0o600
    assert mode(root / CONFIG) in (0o640, 0o644)
    assert mode(root / UNIT) == 0o644
    assert not fake_systemctl.exists()  # a --root install leaves systemd alone
    assert TOKEN not in (root / CONFIG).read_text() + (root / UNIT).read_text()

    config = tomllib.loads((root / CONFIG).read_text())
    assert config["token_file"] == "/etc/comfyfleet/agent.token"  # where it lives once installed
    # The agent's own loader reads it (the token file from under the test root).
    settings = load_settings({"config": str(root / CONFIG), "token_file": str(root / TOKEN_FILE)}, environ={})
    assert settings.server_url == "https://fleet.example.com" and settings.token == TOKEN
    assert settings.comfyui_urls == ("http://127.0.0.1:8188", "http://127.0.0.1:8189")
    assert settings.comfyui_gpus == (0, 1)
    assert settings.comfyui_cmds[1] == '/opt/comfyui/venv/bin/python "main.py" --port 8189 --cuda-device 1'
    assert settings.shutdown_grace_s == 45 and settings.log_json is True
    assert str(settings.data_dir) == "/var/lib/comfyfleet-agent"

    unit = (root / UNIT).read_text().splitlines()
    assert f"ExecStart={VENV.resolve()}/bin/comfyfleet-agent --config /etc/comfyfleet/agent.toml" in unit
    assert "User=nobody" in unit
    assert "Restart=on-failure" in unit
    assert "KillSignal=SIGTERM" in unit
    prevent = next(line for line in unit if line.startswith("RestartPreventExitStatus="))
    assert "3" in prevent.split("=", 1)[1].split()
    timeout = next(line for line in unit if line.startswith("TimeoutStopSec="))
    assert int(timeout.split("=", 1)[1]) > 45
    assert "WantedBy=multi-user.target" in unit


def test_reinstall_replaces_and_uninstall_removes_everything(
    tmp_path: Path, token_file: Path, fake_systemctl: Path
) -> None:
    root = tmp_path / "root"
    assert run(tmp_path, *install_args(root, token_file)).returncode == 0
    token_file.write_text("cf_runner_rotated")
    again = run(tmp_path, *install_args(root, token_file, "--comfyui", "http://127.0.0.1:8189"))
    assert again.returncode == 0, again.stderr
    assert (root / TOKEN_FILE).read_text() == "cf_runner_rotated\n"
    assert mode(root / TOKEN_FILE) == 0o600
    assert "http://127.0.0.1:8189" in (root / CONFIG).read_text()
    # Without --comfyui-cmd there are no commands, and the single-instance GPU default holds.
    assert "comfyui_cmds" not in (root / CONFIG).read_text()
    assert not any(p.name.startswith(".") for p in (root / "etc/comfyfleet").iterdir())  # no temp files

    work = root / "var/lib/comfyfleet-agent/jobs"
    work.mkdir(parents=True)
    (work / "input.png").write_bytes(b"a job's input")
    removed = run(tmp_path, "uninstall", "--root", str(root))
    assert removed.returncode == 0, removed.stderr
    for path in (CONFIG, TOKEN_FILE, UNIT, Path("var/lib/comfyfleet-agent"), Path("etc/comfyfleet")):
        assert not (root / path).exists(), path
    assert not fake_systemctl.exists()

    twice = run(tmp_path, "uninstall", "--root", str(root))
    assert twice.returncode == 0 and "nothing to remove" in twice.stdout


def test_token_given_directly_is_written_to_the_token_file(tmp_path: Path, fake_systemctl: Path) -> None:
    root = tmp_path / "root"
    args = install_args(root, Path("unused"))
    index = args.index("--token-file")
    args[index : index + 2] = ["--token", f"  {TOKEN}  "]
    result = run(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert (root / TOKEN_FILE).read_text() == f"{TOKEN}\n"
    assert mode(root / TOKEN_FILE) == 0o600


@pytest.mark.parametrize(
    ("change", "code", "needle"),
    [
        (lambda a: _drop(a, "--server"), 2, "missing --server URL"),
        (lambda a: _drop(a, "--token-file"), 2, "missing --token-file FILE (or --token TOKEN)"),
        (lambda a: _drop(a, "--comfyui"), 2, "missing --comfyui URL"),
        (lambda a: [*a, "--token", "t"], 2, "give --token or --token-file, not both"),
        (lambda a: _set(a, "--server", "fleet.example.com"), 2, "is not an http(s) or ws(s) URL"),
        (
            lambda a: _set(a, "--comfyui", "127.0.0.1:8188"),
            2,
            "--comfyui 127.0.0.1:8188 is not an http(s) URL",
        ),
        (lambda a: [*a, "--comfyui-gpu", "0", "--comfyui-gpu", "1"], 2, "2 --comfyui-gpu for 1 --comfyui"),
        (lambda a: [*a, "--comfyui-gpu", "first"], 2, "--comfyui-gpu first is not a GPU index"),
        (lambda a: [*a, "--comfyui-cmd", "a", "--comfyui-cmd", "b"], 2, "2 --comfyui-cmd for 1 --comfyui"),
        (lambda a: [*a, "--shutdown-grace", "soon"], 2, "--shutdown-grace soon is not a whole number"),
        (lambda a: [*a, "--comfyui-cmd", "python\nmain.py"], 2, "a value holds a control character"),
        (lambda a: [*a, "--slots", "2"], 2, "unknown option for install: --slots"),
        (lambda a: [*a, "--user"], 2, "--user needs a value"),
        (lambda a: [*a, "--user", "no-such-user-here"], 1, "no such user: no-such-user-here"),
        (
            lambda a: _set(a, "--token-file", "/nonexistent/token"),
            1,
            "cannot read the token file /nonexistent",
        ),
        (lambda a: _set(a, "--venv", "/nonexistent/venv"), 1, "no virtual environment at /nonexistent/venv"),
        (lambda a: _set(a, "--venv", "/tmp"), 1, "no comfyfleet-agent in /tmp/bin"),
    ],
)
def test_bad_install_options_are_refused_before_anything_is_written(
    tmp_path: Path, token_file: Path, fake_systemctl: Path, change: object, code: int, needle: str
) -> None:
    root = tmp_path / "root"
    args = change(install_args(root, token_file))  # type: ignore[operator]
    result = run(tmp_path, *args)
    assert result.returncode == code, result.stderr
    assert needle in result.stderr
    assert not (root / "etc").exists()


def test_an_empty_token_is_refused(tmp_path: Path, fake_systemctl: Path) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("\n \n")
    result = run(tmp_path, *install_args(tmp_path / "root", empty))
    assert result.returncode == 1 and f"the runner token from {empty} is empty" in result.stderr
    assert not (tmp_path / "root" / "etc").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "missing subcommand: install or uninstall"),
        (["upgrade"], "unknown subcommand: upgrade"),
        (["uninstall", "--purge"], "unknown option for uninstall: --purge"),
        (["uninstall", "--root"], "--root needs a value"),
        (["uninstall", "--root", "/"], "--root / is a real install"),
    ],
)
def test_bad_subcommands_are_refused(
    tmp_path: Path, fake_systemctl: Path, args: list[str], needle: str
) -> None:
    result = run(tmp_path, *args)
    assert result.returncode == 2 and needle in result.stderr
    assert "install-agent.sh --help" in result.stderr


def test_help_lists_the_options(tmp_path: Path) -> None:
    result = run(tmp_path, "--help")
    assert result.returncode == 0
    for option in ("--server", "--token-file", "--comfyui-cmd", "--user", "--venv", "--root", "uninstall"):
        assert option in result.stdout


def test_a_real_install_needs_root(tmp_path: Path, token_file: Path, fake_systemctl: Path) -> None:
    # Without --root the files go to /etc: only root may. As root here, run it as nobody.
    args = install_args(tmp_path, token_file)
    args[1:3] = []  # no --root
    # nobody cannot read the test's private temporary folder: the token comes on the command line.
    args = [*_drop(args, "--token-file"), "--token", TOKEN]
    result = run(tmp_path, *args, user=65534 if os.getuid() == 0 else None)
    assert result.returncode == 1, result.stderr
    assert "run as root (sudo) to install a system service, or pass --root DIR" in result.stderr
    assert not fake_systemctl.exists()


def _drop(args: list[str], option: str) -> list[str]:
    index = args.index(option)
    return args[:index] + args[index + 2 :]


def _set(args: list[str], option: str, value: str) -> list[str]:
    index = args.index(option)
    return [*args[: index + 1], value, *args[index + 2 :]]
