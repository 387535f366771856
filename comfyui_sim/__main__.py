"""``python -m comfyui_sim --port 8188 --host 127.0.0.1 --data-dir DIR``"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aiohttp import web

from .app import create_app
from .settings import SimSettings


def _pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m comfyui_sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--data-dir", type=Path, required=True, help="input/, output/ and temp/ go here")
    parser.add_argument(
        "--delay",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="make a node (class_type or node id) take this long; repeatable",
    )
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="NAME=MESSAGE",
        help="make a node (class_type or node id) raise this message; repeatable",
    )
    parser.add_argument("--version-string", default="0.3.64", help="reported comfyui_version")
    args = parser.parse_args(argv)
    try:
        delays = {name: float(seconds) for name, seconds in _pairs(args.delay).items()}
        failures = _pairs(args.fail)
    except ValueError as exc:
        parser.error(str(exc))
    settings = SimSettings(
        data_dir=args.data_dir,
        node_delays_s=delays,
        fail_nodes=failures,
        version=args.version_string,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    web.run_app(create_app(settings), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
