"""Where the control plane may connect on somebody else's say: a ``$file`` URL it fetches, a
webhook it delivers. The control plane sits inside the operator's network, so every address
such a connection would use is checked, the URL's own and those its name resolves to, and a
private, loopback, link-local or otherwise non-public one is refused unless the operator
allows them."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

MAX_URL_CHARS = 2000
# A name that takes longer to resolve is taken as it is (and checked again as it is used).
_RESOLVE_S = 5.0


class Refused(OSError):
    """A name resolved to an address that is not public."""


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_global and not ip.is_multicast


def private_literal(url: str) -> str | None:
    """The URL's host when it is an address (not a name) that is not public; else ``None``.
    ``ValueError`` unless the URL is http(s) with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a URL must be http:// or https:// with a host, not {url[:200]!r}")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return None  # a name: checked as it resolves
    return None if is_public(str(literal)) else str(literal)


class PublicOnly(AbstractResolver):
    """Resolves as usual and refuses names that lead to a non-public address (checked here,
    where the connection is made, so a name cannot change its answer between a check and
    the connect)."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()
        self.refused: tuple[str, str] | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for result in found:
            if not is_public(result["host"]):
                self.refused = (host, result["host"])
                raise Refused(f"{host} is {result['host']}")
        return found

    async def close(self) -> None:
        await self._inner.close()


async def check_target(url: str, what: str, allow_private: bool, setting: str) -> str:
    """``url`` when the control plane may connect to it on somebody's say: http(s), at most
    2,000 characters, and (unless ``allow_private``, the operator's ``setting``) not a
    non-public address, neither as written nor as its name resolves now (a name that does
    not resolve yet is taken: the connection checks again). ``ValueError`` with the reason."""
    url = url.strip()
    if len(url) > MAX_URL_CHARS or "\x00" in url:
        raise ValueError(f"{what} is a URL of at most {MAX_URL_CHARS} characters")
    try:
        literal = private_literal(url)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if allow_private:
        return url
    host = urlsplit(url).hostname or ""
    if literal is not None:
        raise ValueError(refusal(what, host, literal, setting))
    try:
        async with asyncio.timeout(_RESOLVE_S):
            found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        return url
    for *_, address in found:
        if not is_public(str(address[0])):
            raise ValueError(refusal(what, host, str(address[0]), setting))
    return url


def refusal(what: str, host: str, address: str, setting: str) -> str:
    return (
        f"{what}: {host[:200]} is a private, loopback or link-local address ({address}); the control "
        f"plane connects only to public addresses unless its operator allows others ({setting})"
    )
