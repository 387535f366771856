"""Agent settings: one object per process, built from flags, environment and a TOML file.

Precedence: command-line flags > environment > TOML file > defaults. Every setting ``x`` can
be set in the environment as ``COMFYFLEET_AGENT_X``; the four that every deployment needs also
have short names: ``COMFYFLEET_SERVER``, ``COMFYFLEET_TOKEN``, ``COMFYFLEET_COMFYUI`` and
``COMFYFLEET_CONFIG`` (the TOML file). The agent-only names carry ``AGENT_`` so that they
never collide with the control plane's ``COMFYFLEET_DATA_DIR`` and friends on a shared host.
List settings (``comfyui_urls``, ``comfyui_gpus``, ``comfyui_cmds``, ``comfyui_dirs``) take a
JSON array in the environment, or a single value.

The TOML file holds the settings by field name, either at the top level or under an
``[agent]`` table (so one file can configure the control plane and the agent).

One agent serves one or more ComfyUI instances (``comfyui_urls``, one per GPU): each has
``slots`` slots (jobs at once, default 1), uses GPU ``comfyui_gpus[i]`` (default ``i``) and,
when ``comfyui_cmds`` is given (one command per instance), is started and supervised by the
agent. ``comfyui_url`` is the single-instance spelling of ``comfyui_urls``.
"""

from __future__ import annotations

import json
import os
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocol.agent_http import CONNECT_PATH
from runner_agent import __version__

ENV_PREFIX = "COMFYFLEET_AGENT_"
# The settings every deployment sets get short environment names too.
ENV_ALIASES = {
    "server_url": "COMFYFLEET_SERVER",
    "token": "COMFYFLEET_TOKEN",
    "comfyui_url": "COMFYFLEET_COMFYUI",
}
ENV_CONFIG = "COMFYFLEET_CONFIG"
DEFAULT_COMFYUI_URL = "http://127.0.0.1:8188"


class SettingsError(ValueError):
    """A setting is missing or invalid; the message says which and where to set it."""


def connect_url_of(server_url: str) -> str:
    """A control plane's agent websocket, derived from its HTTP base URL."""
    parts = urlsplit(server_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}" + CONNECT_PATH


def http_base_url_of(server_url: str) -> str:
    parts = urlsplit(server_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "comfyfleet-agent"


@dataclass(frozen=True)
class AgentSettings:
    server_url: str
    token: str = field(repr=False)
    # The first instance; given alone it means ``comfyui_urls = (comfyui_url,)``.
    comfyui_url: str | None = None
    # One ComfyUI per GPU; each is its own slot(s).
    comfyui_urls: tuple[str, ...] = ()
    # The GPU index each instance uses (default 0..n-1), to tell its capacity apart.
    comfyui_gpus: tuple[int, ...] = ()
    # Shell-style commands the agent starts and supervises, one per instance (or none).
    comfyui_cmds: tuple[str, ...] = ()
    # Each instance's own folder (holding input/ and output/), one per instance, when it
    # runs on this host: a job's files there are removed once the job is acknowledged.
    comfyui_dirs: tuple[str, ...] = ()
    # Sent with every request to ComfyUI, for one behind an authenticating proxy.
    comfyui_headers: dict[str, str] = field(default_factory=dict, repr=False)
    # Jobs run at once on each instance.
    slots: int = 1
    data_dir: Path = field(default_factory=_default_data_dir)
    # None: use the heartbeat the control plane asks for in its welcome.
    heartbeat_s: float | None = None
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Fraction of each backoff delay that is randomised, so a fleet does not reconnect in step.
    reconnect_jitter: float = 0.5
    welcome_timeout_s: float = 15.0
    history_poll_slow_s: float = 2.0
    history_poll_fast_s: float = 0.2
    # A job whose ComfyUI stays unreachable (not answering, rather than refusing) this long
    # while it runs is handed back to the control plane to run elsewhere.
    comfyui_down_grace_s: float = 120.0
    # How long input downloads, output uploads and the wait for the control plane's
    # go-ahead keep trying while the control plane is away (a restart, a network cut).
    transfer_retry_s: float = 600.0
    # Job folders older than this are removed at start, whatever they hold.
    state_keep_s: float = 7 * 24 * 3600.0
    # On stop, running jobs get this long to finish before they are abandoned.
    shutdown_grace_s: float = 30.0
    # Per-read timeout on HTTP calls to ComfyUI and the control plane.
    http_read_timeout_s: float = 300.0
    # A supervised ComfyUI gets this long to answer /system_stats after its start.
    comfyui_start_timeout_s: float = 300.0
    # Restarts of a supervised ComfyUI back off up to this delay.
    comfyui_restart_max_s: float = 30.0
    # On stop, a supervised ComfyUI gets this long after SIGTERM before SIGKILL.
    comfyui_stop_grace_s: float = 10.0
    # A stats request waits this long for each instance's /system_stats.
    stats_timeout_s: float = 1.0
    agent_version: str = __version__
    log_json: bool = False

    def __post_init__(self) -> None:
        # comfyui_urls wins over comfyui_url; afterwards both are set and agree, so the
        # single-instance code paths and dataclasses.replace() keep working.
        urls = tuple(self.comfyui_urls) or (self.comfyui_url or DEFAULT_COMFYUI_URL,)
        object.__setattr__(self, "comfyui_urls", urls)
        object.__setattr__(self, "comfyui_url", urls[0])
        gpus = tuple(self.comfyui_gpus) or tuple(range(len(urls)))
        object.__setattr__(self, "comfyui_gpus", gpus)
        object.__setattr__(self, "comfyui_cmds", tuple(self.comfyui_cmds))
        object.__setattr__(self, "comfyui_dirs", tuple(self.comfyui_dirs))

    @property
    def total_slots(self) -> int:
        return self.slots * len(self.comfyui_urls)

    @property
    def server_urls(self) -> tuple[str, ...]:
        """The control planes to dial, in order: ``server_url`` may list several, comma
        separated (replicas, each reachable on its own); the agent fails over between them."""
        return tuple(url.strip() for url in self.server_url.split(",") if url.strip())

    @property
    def connect_url(self) -> str:
        """The first control plane's agent websocket (see :func:`connect_url_of`)."""
        return connect_url_of(self.server_urls[0])

    @property
    def http_base_url(self) -> str:
        return http_base_url_of(self.server_urls[0])

    def validate(self) -> AgentSettings:
        # The order decides which complaint a user with several mistakes sees first.
        self._check_control_plane()
        self._check_instances()
        self._check_numbers()
        return self

    def _check_control_plane(self) -> None:
        if not self.server_urls:
            raise SettingsError("no control-plane URL: pass --server URL or set COMFYFLEET_SERVER")
        if not self.token:
            raise SettingsError(
                "no runner token: pass --token TOKEN, --token-file FILE or set COMFYFLEET_TOKEN"
            )
        for url in self.server_urls:
            _check_url("server_url (--server, COMFYFLEET_SERVER)", url, ("http", "https", "ws", "wss"))
        if len(set(self.server_urls)) != len(self.server_urls):
            raise SettingsError(f"server_url (--server) lists a URL twice: {self.server_url}")

    def _check_instances(self) -> None:
        for url in self.comfyui_urls:
            _check_url("comfyui_urls (--comfyui, COMFYFLEET_COMFYUI)", url, ("http", "https"))
        if len(set(self.comfyui_urls)) != len(self.comfyui_urls):
            raise SettingsError(f"comfyui_urls (--comfyui) lists a URL twice: {list(self.comfyui_urls)}")
        if len(self.comfyui_gpus) != len(self.comfyui_urls):
            raise SettingsError(
                f"comfyui_gpus (--comfyui-gpu) names {len(self.comfyui_gpus)} GPU(s) for "
                f"{len(self.comfyui_urls)} ComfyUI instance(s): give one per --comfyui, or none"
            )
        if any(gpu < 0 for gpu in self.comfyui_gpus):
            raise SettingsError(f"comfyui_gpus must not be negative, got {list(self.comfyui_gpus)}")
        if self.comfyui_cmds and len(self.comfyui_cmds) != len(self.comfyui_urls):
            raise SettingsError(
                f"comfyui_cmds (--comfyui-cmd) has {len(self.comfyui_cmds)} command(s) for "
                f"{len(self.comfyui_urls)} ComfyUI instance(s): give one per --comfyui, or none"
            )
        for cmd in self.comfyui_cmds:
            _check_command(cmd)
        if self.comfyui_dirs and len(self.comfyui_dirs) != len(self.comfyui_urls):
            raise SettingsError(
                f"comfyui_dirs (--comfyui-dir) has {len(self.comfyui_dirs)} folder(s) for "
                f"{len(self.comfyui_urls)} ComfyUI instance(s): give one per --comfyui, or none"
            )

    def _check_numbers(self) -> None:
        if self.slots < 1:
            raise SettingsError(f"slots must be at least 1, got {self.slots}")
        for name in _POSITIVE_SETTINGS:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        for name in _NON_NEGATIVE_SETTINGS:
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.heartbeat_s is not None and self.heartbeat_s <= 0:
            raise SettingsError(f"heartbeat_s must be positive, got {self.heartbeat_s}")
        if not 0 <= self.reconnect_jitter <= 1:
            raise SettingsError(f"reconnect_jitter must be within 0..1, got {self.reconnect_jitter}")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise SettingsError("reconnect_max_s must not be below reconnect_initial_s")


# Timeouts, intervals and delays: zero would be an instant timeout or a busy loop.
_POSITIVE_SETTINGS = (
    "reconnect_initial_s",
    "reconnect_max_s",
    "welcome_timeout_s",
    "history_poll_slow_s",
    "history_poll_fast_s",
    "http_read_timeout_s",
    "comfyui_start_timeout_s",
    "comfyui_restart_max_s",
    "stats_timeout_s",
    "transfer_retry_s",
    "state_keep_s",
)
# Grace periods, where zero is allowed: no grace at all.
_NON_NEGATIVE_SETTINGS = ("comfyui_down_grace_s", "shutdown_grace_s", "comfyui_stop_grace_s")


def _check_url(what: str, url: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.netloc:
        raise SettingsError(f"{what}: {url!r} is not a {'/'.join(schemes)} URL")


def _check_command(cmd: str) -> None:
    try:
        words = shlex.split(cmd)
    except ValueError as exc:
        raise SettingsError(f"comfyui_cmds (--comfyui-cmd): cannot split {cmd!r}: {exc}") from exc
    if not words:
        raise SettingsError("comfyui_cmds (--comfyui-cmd): an empty command")


_FIELDS = {f.name: f for f in fields(AgentSettings)}
# Two spellings of one setting: a layer that gives either replaces both from lower layers.
_URL_KEYS = ("comfyui_url", "comfyui_urls")
# The token is read from a file named by token_file, which is not a field of its own.
_EXTRA_KEYS = ("token_file",)


def _coerce(name: str, raw: Any, source: str) -> Any:
    """Turn a raw value from TOML, the environment or a flag into the field's type."""
    kind = str(_FIELDS[name].type)
    try:
        if kind == "int":
            return _to_int(raw)
        if kind in ("float", "float | None"):
            if isinstance(raw, bool):
                raise ValueError("a boolean is not a number")
            return float(raw)
        if kind == "bool":
            return _to_bool(raw)
        if kind == "Path":
            return Path(str(raw)).expanduser()
        if kind == "dict[str, str]":
            return _to_headers(raw)
        if kind == "tuple[str, ...]":
            return tuple(_to_str(item) for item in _to_list(raw))
        if kind == "tuple[int, ...]":
            return tuple(_to_int(item) for item in _to_list(raw))
        return _to_str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}: {name} = {raw!r} is not valid: {exc}") from exc


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("a boolean is not a number")
    return int(raw)


def _to_str(raw: Any) -> str:
    if isinstance(raw, (dict, list, tuple)):
        raise ValueError("expected a string")
    return str(raw)


def _to_list(raw: Any) -> list[Any]:
    """A TOML array or a flag's list as is; from the environment a JSON array, or one value."""
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if isinstance(raw, str) and raw.lstrip().startswith("["):
        return list(json.loads(raw))
    return [raw]


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _to_headers(raw: Any) -> dict[str, str]:
    # The environment carries headers as a JSON object.
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ValueError("expected a table of header name to string value")
    return dict(raw)


def parse_header_flag(text: str) -> tuple[str, str]:
    """``"Name: value"`` from a ``--comfyui-header`` flag."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise SettingsError(f"--comfyui-header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    if isinstance(data.get("agent"), dict):
        # A shared file: the other tables belong to other programs.
        data = data["agent"]
    if all(key in data for key in _URL_KEYS):
        raise SettingsError(f"config file {path}: set comfyui_urls or comfyui_url, not both")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key in _EXTRA_KEYS:
            values[key] = str(raw)
        elif key in _FIELDS:
            values[key] = _coerce(key, raw, f"config file {path}")
        else:
            allowed = ", ".join(sorted([*_FIELDS, *_EXTRA_KEYS]))
            raise SettingsError(f"config file {path}: unknown setting {key!r} (known: {allowed})")
    return values


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _FIELDS:
        for var in (ENV_PREFIX + name.upper(), ENV_ALIASES.get(name)):
            if var and env.get(var):
                values[name] = _coerce(name, env[var], f"environment {var}")
                break
    token_file = env.get(ENV_PREFIX + "TOKEN_FILE") or env.get("COMFYFLEET_TOKEN_FILE")
    if token_file:
        values["token_file"] = token_file
    if all(key in values for key in _URL_KEYS):
        raise SettingsError("environment: set COMFYFLEET_AGENT_COMFYUI_URLS or COMFYFLEET_COMFYUI, not both")
    return values


def _read_token_file(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"cannot read token file {path}: {exc.strerror}") from exc


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> AgentSettings:
    """Merge the layers and validate. ``flags`` maps field names (plus ``config`` and
    ``token_file``) to values from the command line; ``None`` means "not given"."""
    env = os.environ if environ is None else environ
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    config = given.pop("config", None) or env.get(ENV_CONFIG)

    values: dict[str, Any] = {}
    for layer in (
        _from_file(Path(config).expanduser()) if config else {},
        _from_env(env),
        {k: v if k in _EXTRA_KEYS else _coerce(k, v, "command line") for k, v in given.items()},
    ):
        # A token given directly at a layer beats a token file given at a lower one, and
        # the other way round.
        if "token" in layer:
            values.pop("token_file", None)
        if "token_file" in layer:
            values.pop("token", None)
        if any(key in layer for key in _URL_KEYS):
            for key in _URL_KEYS:
                values.pop(key, None)
        values.update(layer)

    token_file = values.pop("token_file", None)
    if token_file and not values.get("token"):
        values["token"] = _read_token_file(token_file)
    values.setdefault("server_url", "")
    values.setdefault("token", "")
    return AgentSettings(**values).validate()


def with_overrides(settings: AgentSettings, **changes: Any) -> AgentSettings:
    """A validated copy with some fields changed (tests, the top-level CLI)."""
    return replace(settings, **changes).validate()
