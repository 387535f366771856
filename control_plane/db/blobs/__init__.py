"""Content-addressed blob storage for inputs and outputs: on local disk (the default) or in
an S3-compatible object store (``--blob-url s3://bucket/prefix``)."""

from __future__ import annotations

from pathlib import Path

from control_plane.db.blobs.disk import DiskBlobStore
from control_plane.db.blobs.store import SHA256, BlobStore, BlobWriter, Download, StoredBlob

__all__ = ["SHA256", "BlobStore", "BlobWriter", "DiskBlobStore", "Download", "StoredBlob", "open_blob_store"]


def open_blob_store(blob_url: str, default_dir: Path, *, presign_s: float) -> BlobStore:
    """The store ``blob_url`` names: ``s3://bucket/prefix``, a folder (``file:///srv/blobs``
    or a plain path), or, when empty, ``default_dir``."""
    if blob_url.startswith("s3://"):
        # Imported only when used: the S3 client is a large import a disk store never needs.
        from control_plane.db.blobs.s3 import S3BlobStore

        return S3BlobStore(blob_url, presign_s=presign_s)
    if not blob_url:
        return DiskBlobStore(default_dir)
    return DiskBlobStore(Path(blob_url.removeprefix("file://")))
