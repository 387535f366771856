"""``comfyfleet-agent``: run the runner agent in the foreground.

One agent serves one or more ComfyUI instances on its host (``--comfyui URL`` once per GPU,
``--comfyui-gpu INDEX`` for the GPU each uses, ``--slots N`` jobs at once on each), and can
start and supervise them itself (``--comfyui-cmd CMD``, one per ``--comfyui``).

SIGTERM (or SIGINT) drains: no new work is asked for, running jobs get ``shutdown_grace_s``
to finish and report, then the connection closes with 1001 and any supervised ComfyUI is
stopped. A second signal cuts the grace short. ``scripts/install-agent.sh`` installs the
agent as a systemd service that relies on this.

Exit status: 0 after a stop (SIGTERM, SIGINT), 2 for bad settings, 3 when the control plane
refuses the agent for good (bad token, unsupported protocol, runner deleted), which a
service manager should not restart on (systemd: ``RestartPreventExitStatus=2 3``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from runner_agent import __version__
from runner_agent.agent import Agent
from runner_agent.config import AgentSettings, SettingsError, load_settings, parse_header_flag
from runner_agent.connection import GiveUp

log = logging.getLogger("runner_agent")

EXIT_OK = 0
EXIT_SETTINGS = 2
EXIT_GIVE_UP = 3


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """The agent's flags, for this program and for ``comfyfleet agent``. Every flag defaults
    to ``None`` ("not given") so that the environment and the config file can fill it."""
    parser.add_argument(
        "--server",
        dest="server_url",
        metavar="URL[,URL…]",
        help="control-plane base URL, or several to fail over between (env COMFYFLEET_SERVER)",
    )
    parser.add_argument(
        "--token", metavar="TOKEN", help="runner token (env COMFYFLEET_TOKEN); prefer --token-file"
    )
    parser.add_argument(
        "--token-file", metavar="FILE", help="file holding the runner token (env COMFYFLEET_TOKEN_FILE)"
    )
    parser.add_argument(
        "--comfyui",
        dest="comfyui_urls",
        action="append",
        metavar="URL",
        help="a local ComfyUI's URL; repeat for one instance per GPU, each its own slot "
        "(env COMFYFLEET_COMFYUI; default http://127.0.0.1:8188)",
    )
    parser.add_argument(
        "--comfyui-gpu",
        dest="comfyui_gpus",
        action="append",
        type=int,
        metavar="INDEX",
        help="the GPU index each --comfyui instance uses, in the same order (default 0, 1, ...)",
    )
    parser.add_argument(
        "--comfyui-cmd",
        dest="comfyui_cmds",
        action="append",
        metavar="CMD",
        help="start and supervise ComfyUI with this command (split like a shell would), one per "
        "--comfyui; it must listen on that URL. Restarted when it dies, stopped with the agent",
    )
    parser.add_argument(
        "--comfyui-dir",
        dest="comfyui_dirs",
        action="append",
        metavar="DIR",
        help="the folder of each --comfyui instance (holding its input/ and output/), in the same "
        "order, when it runs on this host: a job's files there are removed once it is acknowledged",
    )
    parser.add_argument(
        "--comfyui-header",
        dest="comfyui_headers",
        action="append",
        metavar="'NAME: VALUE'",
        help="header for every ComfyUI request (repeatable), for a ComfyUI behind an authenticating proxy",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (env COMFYFLEET_CONFIG)")
    parser.add_argument(
        "--slots",
        type=int,
        metavar="N",
        help="jobs run at once on each ComfyUI instance (env COMFYFLEET_AGENT_SLOTS; default 1)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the agent's job folders, kept until the control plane has each result "
        "(env COMFYFLEET_AGENT_DATA_DIR)",
    )
    parser.add_argument(
        "--heartbeat-s",
        type=float,
        metavar="S",
        help="capacity report interval; default: the control plane's",
    )
    parser.add_argument(
        "--shutdown-grace-s",
        type=float,
        metavar="S",
        help="on SIGTERM, how long running jobs get to finish (default 30)",
    )
    parser.add_argument(
        "--log-json", action="store_const", const=True, default=None, help="log one JSON object per line"
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("COMFYFLEET_AGENT_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="[COMFYFLEET_AGENT_LOG_LEVEL]",
    )


def build_parser(prog: str = "comfyfleet-agent") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run ComfyUI jobs from a comfyfleet control plane on this host.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_agent_arguments(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    """Flags > environment > config file > defaults. Raises :class:`SettingsError`."""
    flags: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in (
            "server_url",
            "token",
            "token_file",
            "config",
            "slots",
            "data_dir",
            "heartbeat_s",
            "shutdown_grace_s",
            "log_json",
        )
    }
    for name in ("comfyui_urls", "comfyui_gpus", "comfyui_cmds", "comfyui_dirs"):
        values = getattr(args, name, None)
        if values:
            flags[name] = tuple(values)
    headers = getattr(args, "comfyui_headers", None)
    if headers:
        flags["comfyui_headers"] = dict(parse_header_flag(h) for h in headers)
    return load_settings(flags)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(*, json_lines: bool, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def run_agent(settings: AgentSettings) -> int:
    """Run until SIGTERM/SIGINT (graceful stop; a second signal hurries it) or a give-up."""
    agent = Agent(settings)
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Task[None]] = set()

    def on_signal(signame: str) -> None:
        log.info("%s received: stopping", signame)
        task = loop.create_task(agent.stop())
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    handled = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, on_signal, signum.name)
            handled.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            # Not the main thread, or no signals on this platform: stop() is still callable.
            log.debug("cannot handle %s here", signum.name)
    try:
        await agent.run()
    except GiveUp as exc:
        log.error("giving up: %s. Check the runner token and the runner on the control plane.", exc)
        return EXIT_GIVE_UP
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    log.info("agent stopped")
    return EXIT_OK


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point for a parsed command line (``comfyfleet agent`` calls this too)."""
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        configure_logging(json_lines=bool(getattr(args, "log_json", False)))
        log.error("%s", exc)
        return EXIT_SETTINGS
    configure_logging(json_lines=settings.log_json, level=getattr(args, "log_level", "INFO"))
    return asyncio.run(run_agent(settings))


def main(argv: Sequence[str] | None = None, prog: str = "comfyfleet-agent") -> int:
    return run_from_args(build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
