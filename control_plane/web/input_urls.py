"""A ``$file`` parameter given as an ``http(s)`` URL: the control plane fetches it, streamed
into the blob store, within the request's size cap and a time limit.

A URL is somebody else's to choose, and the control plane sits inside the operator's
network: every address a fetch would connect to is checked, the URL's own and those its
name resolves to, at each redirect, and a private, loopback, link-local or otherwise
non-public one is refused unless the operator allows them (``fetch_private_urls``).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from control_plane.db.blobs import BlobStore, StoredBlob
from control_plane.model.errors import BadRequest, TooLarge

MAX_REDIRECTS = 5
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Fetched:
    blob: StoredBlob
    filename: str
    content_type: str | None


class _Refused(OSError):
    pass


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_global and not ip.is_multicast


class _PublicOnly(AbstractResolver):
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
            if not _public(result["host"]):
                self.refused = (host, result["host"])
                raise _Refused(f"{host} is {result['host']}")
        return found

    async def close(self) -> None:
        await self._inner.close()


def _checked_url(url: str, what: str, allow_private: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"{what}: a URL must be http:// or https:// with a host, not {url[:200]!r}")
    host = parts.hostname
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return url  # a name: checked as it resolves
    if not allow_private and not _public(str(literal)):
        raise BadRequest(_refusal(what, host, str(literal)))
    return url


def _refusal(what: str, host: str, address: str) -> str:
    return (
        f"{what}: {host} is a private, loopback or link-local address ({address}); the control "
        "plane fetches only from public addresses unless its operator allows others (fetch_private_urls)"
    )


def _filename(url: str, given: str | None) -> str:
    if given:
        return given
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    return name or "download"


async def fetch(
    url: str,
    what: str,
    blobs: BlobStore,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_private: bool,
    filename: str | None = None,
) -> Fetched:
    """Fetch ``url`` (the parameter ``what``) into the blob store; :class:`BadRequest` with
    the reason when it cannot be had."""
    resolver = None if allow_private else _PublicOnly()
    connector = aiohttp.TCPConnector(resolver=resolver) if resolver is not None else aiohttp.TCPConnector()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            return await _follow(http, url, what, blobs, max_bytes, allow_private, filename)
    except TimeoutError:
        raise BadRequest(f"{what}: {url[:200]} did not answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        if resolver is not None and resolver.refused is not None:
            raise BadRequest(_refusal(what, *resolver.refused)) from None
        raise BadRequest(f"{what}: cannot fetch {url[:200]}: {exc}") from None


async def _follow(
    http: aiohttp.ClientSession,
    url: str,
    what: str,
    blobs: BlobStore,
    max_bytes: int,
    allow_private: bool,
    filename: str | None,
) -> Fetched:
    for _ in range(MAX_REDIRECTS + 1):
        url = _checked_url(url, what, allow_private)
        async with http.get(url, allow_redirects=False) as resp:
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                continue
            if resp.status != 200:
                raise BadRequest(f"{what}: {url[:200]} answered {resp.status}")
            return await _store(resp, url, what, blobs, max_bytes, filename)
    raise BadRequest(f"{what}: {url[:200]} redirects more than {MAX_REDIRECTS} times")


async def _store(
    resp: aiohttp.ClientResponse, url: str, what: str, blobs: BlobStore, max_bytes: int, filename: str | None
) -> Fetched:
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise TooLarge(f"{what}: {url[:200]} is {resp.content_length} bytes, over the limit of {max_bytes}")
    chunks: Any = resp.content.iter_chunked(_CHUNK)
    blob = await blobs.write(chunks, max_bytes=max_bytes)
    content_type = resp.content_type if resp.headers.get("Content-Type") else None
    return Fetched(blob, _filename(url, filename), content_type)
