"""Where the client finds its server and token: flags, then the environment, then the file
``comfyfleet login`` writes.

The variables are ``COMFYFLEET_CLIENT_*``: ``COMFYFLEET_SERVER`` and ``COMFYFLEET_TOKEN``
already configure the runner agent (with a runner's token), and other ``COMFYFLEET_*``
configure ``comfyfleet serve``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

CONFIG_ENV = "COMFYFLEET_CLIENT_CONFIG"
SERVER_ENV = "COMFYFLEET_CLIENT_URL"
TOKEN_ENV = "COMFYFLEET_CLIENT_TOKEN"
DEFAULT_SERVER = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class ClientConfig:
    server: str
    token: str | None


def config_path() -> Path:
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "comfyfleet" / "client.json"


def load_file(path: Path | None = None) -> dict[str, str]:
    """What the file holds (``server``, ``token``); empty when there is none."""
    path = path or config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the client configuration {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"the client configuration {path} is not a JSON object")
    return {k: v for k, v in data.items() if k in ("server", "token") and isinstance(v, str)}


def save_file(server: str, token: str, path: Path | None = None) -> Path:
    """Write the file readable by its owner only (0600), replacing it whole: a reader never
    sees half of it, and the token is never on disk with looser rights, even briefly."""
    path = path or config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".client-", suffix=".json")  # created 0600
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"server": server, "token": token}, out, indent=2)
            out.write("\n")
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return path


def resolve(server: str | None = None, token: str | None = None) -> ClientConfig:
    """The server and token to use: each from its flag, else its variable, else the file."""
    stored = load_file()
    chosen_server = server or os.environ.get(SERVER_ENV) or stored.get("server")
    chosen_token = token or os.environ.get(TOKEN_ENV) or stored.get("token")
    return ClientConfig(chosen_server or DEFAULT_SERVER, chosen_token or None)
