"""Reading a multipart/form-data body part by part, cheaply and within limits.

python-multipart's streaming parser finds the parts (a dozen times less work per part than
aiohttp's reader, which matters when a form is hostile); this module turns its callbacks into
parts: the name, file name and type from each part's headers, then its data, a file part's
straight into the blob store. The body is fed in small pieces and the event loop gets a turn
after each, so that a huge form never holds up other requests for long. Anything malformed
(no boundary, a part cut short, headers past their limits, a part with no name) is a 400
that says what.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from control_plane.db.blobs import BlobStore, BlobWriter
from control_plane.model.errors import BadRequest

# The body goes to the parser in pieces this big; the loop gets a turn between pieces.
_PIECE_BYTES = 8 * 1024
# A file part's data is written out in pieces this big (fewer trips to the disk thread).
_FLUSH_BYTES = 256 * 1024
MAX_HEADERS = 16
MAX_HEADER_BYTES = 8 * 1024


@dataclass
class Part:
    """A part as its headers say it: text (read into ``text_bytes``) or a file."""

    name: str
    filename: str | None
    content_type: str
    text_bytes: bytearray = field(default_factory=bytearray)
    file: BlobWriter | None = None
    pending: bytearray = field(default_factory=bytearray)


@dataclass
class _Events:
    """What the parser's callbacks report, collected between two pieces of the body."""

    found: list[tuple[str, object]] = field(default_factory=list)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    field_name: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)
    header_bytes: int = 0
    ended: bool = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._grow(self.field_name, data[start:end]),
            "on_header_value": lambda data, start, end: self._grow(self.value, data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": lambda: self.found.append(("headers", dict(self.headers))),
            "on_part_data": lambda data, start, end: self.found.append(("data", bytes(data[start:end]))),
            "on_part_end": lambda: self.found.append(("end", None)),
            "on_end": self._end,
        }

    def _begin(self) -> None:
        self.headers.clear()
        self.header_bytes = 0
        self.found.append(("begin", None))

    def _grow(self, buffer: bytearray, data: bytes) -> None:
        self.header_bytes += len(data)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise MultipartParseError(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
        buffer += data

    def _header_end(self) -> None:
        if len(self.headers) >= MAX_HEADERS:
            raise MultipartParseError(f"a part has more than {MAX_HEADERS} headers")
        self.headers[bytes(self.field_name).strip().lower()] = bytes(self.value).strip()
        self.field_name.clear()
        self.value.clear()

    def _end(self) -> None:
        self.ended = True

    def take(self) -> list[tuple[str, object]]:
        found, self.found = self.found, []
        return found


def media_type(content_type: str) -> str:
    """``multipart/form-data`` of ``multipart/form-data; boundary=…``, lower-cased (aiohttp's
    ``request.content_type`` runs the email package's header parser: a tenth of a submit)."""
    return parse_options_header(content_type)[0].decode("latin-1").lower()


def boundary_of(content_type: str) -> bytes:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise BadRequest("malformed multipart body: the Content-Type names no boundary")
    if len(boundary) > 70:
        raise BadRequest("malformed multipart body: the boundary is longer than 70 characters")
    return boundary


def _part_from_headers(headers: dict[bytes, bytes]) -> Part:
    disposition, options = parse_options_header(headers.get(b"content-disposition", b"").decode("latin-1"))
    name = options.get(b"name")
    if disposition != b"form-data" or not name:
        raise BadRequest('every part needs a name (Content-Disposition: form-data; name="...")')
    filename = options.get(b"filename")
    try:
        return Part(
            name=name.decode(),
            filename=filename.decode() if filename is not None else None,
            content_type=headers.get(b"content-type", b"application/octet-stream").decode(),
        )
    except UnicodeDecodeError:
        raise BadRequest("a part's name, file name or type is not UTF-8") from None


@dataclass
class _Limits:
    max_parts: int
    max_file_bytes: int
    max_text_bytes: int


class _Reader:
    """The parser and the part being read, fed one piece of the body at a time."""

    def __init__(
        self, content_type: str, blobs: BlobStore, limits: _Limits, is_file: Callable[[Part], bool]
    ) -> None:
        self.events = _Events()
        self.parser = MultipartParser(boundary_of(content_type), self.events.callbacks())  # type: ignore[arg-type]
        self.blobs, self.limits, self.is_file = blobs, limits, is_file
        self.current: Part | None = None
        self.count = 0

    async def feed(self, piece: bytes) -> list[Part]:
        """The parts this piece completed."""
        try:
            self.parser.write(piece)
        except MultipartParseError as exc:
            raise BadRequest(f"malformed multipart body: {exc}"[:300]) from None
        done: list[Part] = []
        for kind, value in self.events.take():
            finished = await self._on(kind, value)
            if finished is not None:
                done.append(finished)
        return done

    async def _on(self, kind: str, value: object) -> Part | None:
        if kind == "begin":
            self.count += 1
            if self.count > self.limits.max_parts:
                raise BadRequest(f"a form has at most {self.limits.max_parts} parts on this account's tier")
        elif kind == "headers":
            assert isinstance(value, dict)
            self.current = _part_from_headers(value)
            if self.is_file(self.current):
                self.current.file = await self.blobs.open_writer(self.limits.max_file_bytes)
        elif kind == "data" and self.current is not None:
            assert isinstance(value, bytes)
            await _take_data(self.current, value, self.limits.max_text_bytes)
        elif kind == "end" and self.current is not None:
            part, self.current = self.current, None
            if part.file is not None and part.pending:
                await part.file.write(bytes(part.pending))
                part.pending.clear()
            return part
        return None

    def finish(self) -> None:
        self.parser.finalize()
        if not self.events.ended:
            raise BadRequest("malformed multipart body: it ends before its closing boundary")

    async def abort(self) -> None:
        """A part cut off in the middle leaves nothing in the blob store."""
        if self.current is not None and self.current.file is not None:
            await self.current.file.abort()


async def parts(
    chunks: AsyncIterator[bytes],
    content_type: str,
    blobs: BlobStore,
    *,
    max_parts: int,
    max_file_bytes: int,
    max_text_bytes: int,
    is_file: Callable[[Part], bool],
) -> AsyncIterator[Part]:
    """Each part once it is complete: text parts with their bytes, file parts (those for which
    ``is_file(part)`` holds) already written to a :class:`BlobWriter`, to be finished or
    aborted by the caller."""
    reader = _Reader(content_type, blobs, _Limits(max_parts, max_file_bytes, max_text_bytes), is_file)
    try:
        async for chunk in chunks:
            for start in range(0, len(chunk), _PIECE_BYTES):
                for part in await reader.feed(chunk[start : start + _PIECE_BYTES]):
                    yield part
                await asyncio.sleep(0)  # a turn for everyone else
        reader.finish()
    finally:
        await reader.abort()


async def _take_data(part: Part, data: bytes, max_text_bytes: int) -> None:
    if part.file is None:
        part.text_bytes += data
        if len(part.text_bytes) > max_text_bytes:
            raise BadRequest(f"field {part.name!r} is larger than {max_text_bytes} bytes")
        return
    part.pending += data
    if len(part.pending) >= _FLUSH_BYTES:
        await part.file.write(bytes(part.pending))
        part.pending.clear()
