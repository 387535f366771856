"""A throwaway nginx in front of control planes, for local runs and the tests: Debian's binary,
the project's own site configuration (``deploy/nginx.conf``) filled in, everything else under
/tmp, a free port on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from comfyfleet.processes import free_port

SITE = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"

# The http context around the site: no daemon, no access log, every file under the root.
_MAIN = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    include {root}/site.conf;
}}
"""


def _binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )
    if found is None:
        raise RuntimeError("nginx is missing: run scripts/bootstrap.sh --with-nginx")
    return found


def site_config(upstreams: list[str], listen: str) -> str:
    """``deploy/nginx.conf`` with its two blanks filled in."""
    servers = "\n    ".join(f"server {address};" for address in upstreams)
    # The comments name the blanks too: they stay as they are.
    lines = [
        line
        if line.lstrip().startswith("#")
        else line.replace("{{servers}}", servers).replace("{{listen}}", listen)
        for line in SITE.read_text(encoding="utf-8").splitlines(keepends=True)
    ]
    return "".join(lines)


class NginxServer:
    """nginx on 127.0.0.1 proxying to ``upstreams`` (``host:port`` each). Started and
    stopped outside any event loop: plain subprocess calls."""

    def __init__(self, upstreams: list[str]) -> None:
        self.binary = _binary()
        self.root = Path(tempfile.mkdtemp(prefix="comfyfleet-nginx-"))
        # Run as root, nginx's workers are another user: they must reach its temp folders.
        self.root.chmod(0o755)
        self.port = free_port()
        self.upstreams = upstreams
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        (self.root / "site.conf").write_text(
            site_config(self.upstreams, f"127.0.0.1:{self.port}"), encoding="utf-8"
        )
        (self.root / "nginx.conf").write_text(_MAIN.format(root=self.root), encoding="utf-8")
        # -p: its prefix, so that nothing of the system's nginx (logs, pid) is touched.
        command = [self.binary, "-p", str(self.root), "-c", str(self.root / "nginx.conf")]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused its configuration: {check.stderr}")
        self._proc = subprocess.Popen(command, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"nginx exited: {self._proc.stderr.read().decode() if self._proc.stderr else ''}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)  # the poll's pace while nginx binds its port
        raise RuntimeError(f"nginx did not listen on port {self.port} within {timeout_s:g} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
