"""``comfyfleet``: one command line for the whole fleet.

    comfyfleet serve       the control plane
    comfyfleet agent       a runner agent (same flags as ``comfyfleet-agent``)
    comfyfleet simulator   the ComfyUI simulator
    comfyfleet demo        all three, plus a sample workflow run through them
    comfyfleet admin token create --account NAME ...

Every flag can also be given as a ``COMFYFLEET_*`` environment variable (``--data-dir`` is
``COMFYFLEET_DATA_DIR``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from comfyfleet import logs
from control_plane.db.refusals import BlobStoreUnusable, DatabaseInUse, SchemaTooNew


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("COMFYFLEET_" + name, default)


def _add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the control plane")
    p.add_argument("--host", default=None, help="listen address [COMFYFLEET_HOST, 127.0.0.1]")
    p.add_argument("--port", type=int, default=None, help="listen port [COMFYFLEET_PORT, 8080]")
    p.add_argument("--data-dir", default=None, help="SQLite file and blobs [COMFYFLEET_DATA_DIR, ./data]")
    p.add_argument("--database-url", default=None, help="e.g. postgresql://… [COMFYFLEET_DATABASE_URL]")
    p.add_argument(
        "--blob-url",
        default=None,
        help="where inputs and outputs go: s3://bucket/prefix (AWS_* environment) or a folder "
        "[COMFYFLEET_BLOB_URL, <data-dir>/blobs]",
    )
    p.add_argument("--config", type=Path, default=None, help="TOML settings file [COMFYFLEET_CONFIG]")
    p.add_argument("--log-json", action="store_true", default=_env("LOG_JSON") == "1")
    p.add_argument(
        "--access-log",
        action="store_true",
        default=_env("ACCESS_LOG") == "1",
        help="log every HTTP request: who, what, status, bytes, time [COMFYFLEET_ACCESS_LOG=1]",
    )


def _add_simulator(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("simulator", help="run the ComfyUI simulator")
    p.add_argument("--host", default=_env("SIMULATOR_HOST", "127.0.0.1"))
    # Not ComfyUI's own 8188: a simulator must not stand in the way of a real ComfyUI.
    p.add_argument("--port", type=int, default=_env("SIMULATOR_PORT", "8288"))
    p.add_argument("--data-dir", default=_env("SIMULATOR_DATA_DIR", "data/simulator"))


def _add_demo(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="control plane + simulator + agent, and a sample workflow")
    p.add_argument("--port", type=int, default=_env("PORT", "8080"))
    # Not 8188: that is where a real ComfyUI on this machine would be.
    p.add_argument("--simulator-port", type=int, default=_env("DEMO_SIMULATOR_PORT", "8288"))
    p.add_argument("--data-dir", default=_env("DATA_DIR", "data/demo"))
    p.add_argument(
        "--exit-after-run",
        action="store_true",
        default=_env("EXIT_AFTER_RUN") == "1",
        help="stop once the sample workflow finished [COMFYFLEET_EXIT_AFTER_RUN=1]",
    )


def _add_admin(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("admin", help="accounts and tokens")
    admin = p.add_subparsers(dest="admin_cmd", required=True)
    token = admin.add_parser("token", help="API tokens").add_subparsers(dest="token_cmd", required=True)
    create = token.add_parser("create", help="create a token (and its account when needed)")
    account = _env("ACCOUNT")
    create.add_argument("--account", required=account is None, default=account, help="[COMFYFLEET_ACCOUNT]")
    create.add_argument("--tier", default=_env("TIER"), help="free, pro or enterprise [COMFYFLEET_TIER]")
    create.add_argument(
        "--scope",
        choices=("client", "operator", "admin"),
        default=_env("SCOPE", "client"),
        help="client: act for the account; operator: watch its fleet; admin: watch every account's",
    )
    create.add_argument("--expires-in-days", type=float, default=_env("EXPIRES_IN_DAYS"))
    listing = token.add_parser("list", help="list tokens (never the tokens themselves)")
    listing.add_argument("--account", default=None, help="only this account's")
    revoke = token.add_parser("revoke", help="revoke a token by its id (from 'token list')")
    revoke.add_argument("token_id")
    for command in (create, listing, revoke):
        command.add_argument("--data-dir", default=None)
        command.add_argument("--database-url", default=None)


def build_parser() -> argparse.ArgumentParser:
    from comfyfleet.commands_client import add_client_commands

    parser = argparse.ArgumentParser(prog="comfyfleet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_serve(sub)
    sub.add_parser("agent", help="run a runner agent (see comfyfleet agent --help)", add_help=False)
    _add_simulator(sub)
    _add_demo(sub)
    _add_admin(sub)
    add_client_commands(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from control_plane.app import create_app
    from control_plane.settings import load_settings

    settings = load_settings(
        {
            "host": args.host,
            "port": args.port,
            "data_dir": args.data_dir,
            "database_url": args.database_url,
            "blob_url": args.blob_url,
        },
        config_file=args.config,
    )
    logs.configure(json_lines=args.log_json)
    log = logging.getLogger("comfyfleet.serve")
    # run_app calls ``print`` once its sockets listen: the moment to say where we are.
    access = logging.getLogger("comfyfleet.access")
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=lambda _: log.info("control plane listening on http://%s:%d", settings.host, settings.port),
        access_log=access if args.access_log else None,
        access_log_format='%a "%r" %s %b %Tf s "%{User-Agent}i"',
    )
    return 0


def _simulator(args: argparse.Namespace) -> int:
    from aiohttp import web

    from comfyui_sim import SimSettings, create_app

    logs.configure()
    app = create_app(SimSettings(data_dir=Path(args.data_dir)))
    print(f"ComfyUI simulator on http://{args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0


def _admin(args: argparse.Namespace) -> int:
    from comfyfleet.admin import create_token, list_tokens, revoke_token
    from control_plane.settings import load_settings

    settings = load_settings({"data_dir": args.data_dir, "database_url": args.database_url})
    if args.token_cmd == "list":
        rows = asyncio.run(list_tokens(settings, args.account))
        print(f"{'id':36}  {'account':20}  {'scope':8}  {'created':20}  {'expires':20}  last used")
        for row in rows:
            when = {
                k: row[k].strftime("%Y-%m-%d %H:%M:%S") if row[k] else "-" for k in row if k.endswith("_at")
            }
            print(
                f"{row['id']:36}  {row['account'][:20]:20}  {row['scope']:8}  {when['created_at']:20}  "
                f"{when['expires_at']:20}  {when['last_used_at']}"
            )
        return 0
    if args.token_cmd == "revoke":
        if not asyncio.run(revoke_token(settings, args.token_id)):
            print(f"comfyfleet: error: no token {args.token_id}", file=sys.stderr)
            return 1
        print(f"revoked token {args.token_id}")
        return 0
    raw = asyncio.run(create_token(settings, args.account, args.tier, args.scope, args.expires_in_days))
    article = "an" if args.scope[0] in "aeiou" else "a"
    print(f"created {article} {args.scope} token for account {args.account!r}; it is shown only once:")
    print(raw)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        from runner_agent.__main__ import main as agent_main

        return agent_main(argv[1:], prog="comfyfleet agent")
    args = build_parser().parse_args(argv)
    if getattr(args, "client_command", None) is not None:
        return int(args.client_command(args))
    try:
        if args.cmd == "serve":
            return _serve(args)
        if args.cmd == "simulator":
            return _simulator(args)
        if args.cmd == "admin":
            return _admin(args)
        if args.cmd == "demo":
            from comfyfleet.demo import run_demo

            return run_demo(args)
    except (DatabaseInUse, SchemaTooNew, BlobStoreUnusable) as exc:
        print(f"comfyfleet: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # settings and arguments that do not validate
        print(f"comfyfleet: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # most often: the port is taken
        print(
            f"comfyfleet: error: cannot listen: {exc.strerror or exc} (choose another --port)",
            file=sys.stderr,
        )
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
