"""nginx in front of control planes on this machine, with the project's ``deploy/nginx.conf``:
one address for clients and agents, the REST API, event streams and agent websockets proxied
to the control planes named (``HOST:PORT`` each). Runs until interrupted.

    .venv/bin/python scripts/local_nginx.py 127.0.0.1:8080 [127.0.0.1:8081 ...]
"""

from __future__ import annotations

import argparse
import signal
import sys

from comfyfleet.throwaway_nginx import NginxServer


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("upstreams", nargs="+", metavar="HOST:PORT", help="a control plane")
    args = parser.parse_args()
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # taken by sigwait below, not by handlers
    server = NginxServer(args.upstreams)
    server.start()
    print(f"nginx on {server.url} in front of {', '.join(args.upstreams)}; Ctrl-C stops it", flush=True)
    try:
        signal.sigwait(stops)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
