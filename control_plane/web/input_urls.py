"""A ``$file`` parameter given as an ``http(s)`` URL: the control plane fetches it, streamed
into the blob store, within the request's size cap and a time limit.

A URL is somebody else's to choose: every address a fetch would connect to is checked, at
each redirect (``public_addresses.py``), and a non-public one is refused unless the
operator allows them (``fetch_private_urls``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp

from control_plane.db.blobs import BlobStore, StoredBlob
from control_plane.model.errors import BadRequest, TooLarge
from control_plane.public_addresses import PublicOnly, private_literal, refusal

MAX_REDIRECTS = 5
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Fetched:
    blob: StoredBlob
    filename: str
    content_type: str | None


def _checked_url(url: str, what: str, allow_private: bool) -> str:
    try:
        literal = private_literal(url)
    except ValueError as exc:
        raise BadRequest(f"{what}: {exc}") from None
    if literal is not None and not allow_private:
        raise BadRequest(_refusal(what, urlsplit(url).hostname or literal, literal))
    return url


def _refusal(what: str, host: str, address: str) -> str:
    return refusal(what, host, address, "fetch_private_urls")


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
    resolver = None if allow_private else PublicOnly()
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
