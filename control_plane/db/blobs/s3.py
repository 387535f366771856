"""Blobs in an S3-compatible object store, at ``<prefix>/<sha256[:2]>/<sha256>`` in one bucket.

``--blob-url s3://bucket/prefix``; the endpoint, region and credentials come from the usual
environment (``AWS_ENDPOINT_URL``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile or an instance role), as every S3
tool reads them.

Nothing is held whole in memory. A write keeps at most one part (``PART_BYTES``) buffered:
a blob smaller than that is stored with one PUT under its digest; a larger one is sent as a
multipart upload to a temporary key while it is hashed, then copied under its digest inside
the store. Downloads are presigned URLs the reader fetches from the store itself, valid for
``presign_s``; with ``presign_s`` 0 (a store the readers cannot reach) the control plane
streams the bytes through.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from botocore.exceptions import BotoCoreError, ClientError

from control_plane.db.blobs.store import (
    BlobStore,
    BlobWriter,
    Download,
    StoredBlob,
    checked_sha256,
    digest_of,
)
from control_plane.db.refusals import BlobStoreUnusable
from control_plane.model.errors import NotFound, Unavailable

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

# S3's smallest part but the last; what one write keeps in memory at most.
PART_BYTES = 5 * 1024**2
CHUNK_BYTES = 256 * 1024
# A multipart upload to a temporary key that was never completed (its writer's process
# died) is aborted when a control plane starts, once it is this old.
STALE_UPLOAD = timedelta(days=1)
_MISSING = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ("bucket", "some/prefix/"); the prefix may be empty."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"blob_url {url!r} names no bucket (s3://bucket/prefix)")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3BlobStore(BlobStore):
    def __init__(self, url: str, *, presign_s: float) -> None:
        super().__init__()
        self.bucket, self.prefix = parse_s3_url(url)
        self.presign_s = presign_s
        self._exit = contextlib.AsyncExitStack()
        self._client: S3Client | None = None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def client(self) -> S3Client:
        assert self._client is not None, "S3BlobStore.setup() was not called"
        return self._client

    def key(self, sha256: str) -> str:
        sha = checked_sha256(sha256)
        return f"{self.prefix}{sha[:2]}/{sha}"

    def temporary_key(self) -> str:
        return f"{self.prefix}tmp/{uuid.uuid4().hex}"

    async def setup(self) -> None:
        session = get_session()
        config = AioConfig(
            # Presigned URLs signed as every current store expects (not the old version 2).
            signature_version="s3v4",
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=64,
        )
        self._client = await self._exit.enter_async_context(
            session.create_client("s3", region_name=os.environ.get("AWS_REGION") or None, config=config)
        )
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            await self.close()
            raise BlobStoreUnusable(f"blob store {self.describe()} cannot be used: {exc}") from exc
        await self._abort_stale_uploads()

    async def _abort_stale_uploads(self) -> None:
        listing = await self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=f"{self.prefix}tmp/")
        before = datetime.now(UTC) - STALE_UPLOAD
        for upload in listing.get("Uploads", []):
            if upload["Initiated"] < before:
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                log.info("aborted an unfinished upload to %s from %s", upload["Key"], upload["Initiated"])

    async def close(self) -> None:
        self._client = None
        await self._exit.aclose()

    async def exists(self, sha256: str) -> bool:
        return await self.key_exists(self.key(sha256))

    async def key_exists(self, key: str) -> bool:
        with _unavailable("look up"):
            try:
                await self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return False
                raise
        return True

    async def put(self, data: bytes, *, max_bytes: int, expected_sha256: str | None = None) -> StoredBlob:
        sha = digest_of(data, max_bytes, expected_sha256)
        return StoredBlob(sha256=sha, size_bytes=len(data), created=await self.put_new(sha, data))

    async def put_new(self, sha256: str, data: bytes | io.BytesIO) -> bool:
        key = self.key(sha256)
        if await self.key_exists(key):
            return False
        with _unavailable("store"):
            await self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return True

    async def open_writer(self, max_bytes: int) -> BlobWriter:
        return _S3Writer(self, max_bytes)

    async def delete(self, sha256: str) -> None:
        with _unavailable("delete"):
            await self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    async def response(self, request: web.Request, sha256: str, download: Download) -> web.StreamResponse:
        if self.presign_s > 0:
            return web.Response(status=302, headers={"Location": await self.presigned_url(sha256, download)})
        return await self._stream(request, sha256, download)

    async def presigned_url(self, sha256: str, download: Download) -> str:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self.key(sha256),
            "ResponseContentType": download.content_type,
        }
        if download.content_disposition:
            params["ResponseContentDisposition"] = download.content_disposition
        # Signed here, without a request to the store.
        return await self.client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=max(1, int(self.presign_s))
        )

    async def _stream(self, request: web.Request, sha256: str, download: Download) -> web.StreamResponse:
        with _unavailable("read"):
            try:
                obj = await self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    raise NotFound("no such file") from exc
                raise
        headers = {"Content-Type": download.content_type, **dict(download.headers)}
        if download.content_disposition:
            headers["Content-Disposition"] = download.content_disposition
        resp = web.StreamResponse(headers=headers)
        resp.content_length = obj["ContentLength"]
        async with obj["Body"] as body:
            await resp.prepare(request)
            async for chunk in body.iter_chunks(CHUNK_BYTES):
                await resp.write(chunk)
        await resp.write_eof()
        return resp


class _S3Writer(BlobWriter):
    """Up to one part in memory; past the first part, a multipart upload to a temporary key."""

    def __init__(self, store: S3BlobStore, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self._store = store
        # One buffer, grown in place and sent from as a file: a part is never copied whole
        # (bytes handed to a socket that cannot take them at once would be).
        self._part = io.BytesIO()
        self._key = store.temporary_key()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []

    async def _write(self, chunk: bytes) -> None:
        self._part.write(chunk)
        if self._part.tell() >= PART_BYTES:
            await self._send_part()

    def _take_part(self) -> io.BytesIO:
        part, self._part = self._part, io.BytesIO()
        part.seek(0)
        return part

    async def _send_part(self) -> None:
        s3, bucket = self._store.client, self._store.bucket
        with _unavailable("store"):
            if self._upload_id is None:
                started = await s3.create_multipart_upload(Bucket=bucket, Key=self._key)
                self._upload_id = started["UploadId"]
            number = len(self._parts) + 1
            sent = await s3.upload_part(
                Bucket=bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=self._take_part(),
            )
        self._parts.append({"ETag": sent["ETag"], "PartNumber": number})

    async def _finish(self, sha256: str) -> bool:
        if self._upload_id is None:  # it all fit in one part
            return await self._store.put_new(sha256, self._take_part())
        if self._part.tell():
            await self._send_part()
        s3, bucket = self._store.client, self._store.bucket
        with _unavailable("store"):
            await s3.complete_multipart_upload(
                Bucket=bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
            )
            self._upload_id = None
            try:
                final = self._store.key(sha256)
                if await self._store.key_exists(final):
                    return False
                # Inside the store: no byte comes back through the control plane. One copy
                # takes up to 5 GB, more than any input or output may be.
                await s3.copy_object(
                    Bucket=bucket, Key=final, CopySource={"Bucket": bucket, "Key": self._key}
                )
                return True
            finally:
                await s3.delete_object(Bucket=bucket, Key=self._key)

    async def abort(self) -> None:
        self._part = io.BytesIO()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            await self._store.client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._key, UploadId=upload_id
            )
        except (ClientError, BotoCoreError) as exc:
            # The start-up sweep of stale uploads gets it later.
            log.warning("could not abort the upload to %s: %s", self._key, exc)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """The store's own failures (after botocore's retries) as a 503 with what failed."""
    try:
        yield
    except ClientError as exc:
        if _code(exc) in _MISSING:
            raise
        raise Unavailable(f"object storage could not {what} a file: {exc}") from exc
    except BotoCoreError as exc:
        raise Unavailable(f"object storage could not {what} a file: {exc}") from exc
