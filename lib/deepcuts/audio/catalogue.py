"""Where the catalogue's audio lives: a local folder, a manifest, or an S3 prefix.

Pure Python (no Spark).  A listing is a stream of :class:`CatalogueEntry` rows; the
driver streams it to a Parquet file in bounded chunks (never a list of the whole
catalogue in memory), and the executors read each file's bytes with
:func:`read_source`.  S3 goes through boto3 and the standard AWS credential chain
(``AWS_ENDPOINT_URL`` points it at another endpoint); credentials are never logged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

# Reason codes for catalogue-level problems (beside deepcuts.audio.decode's decode reasons).
BAD_MANIFEST_ROW = "bad_manifest_row"
DUPLICATE_TRACK_ID = "duplicate_track_id"

LISTING_SCHEMA = pa.schema([
    ("track_id", pa.string()), ("uri", pa.string()), ("labels", pa.string()),
    ("source_size", pa.int64()), ("source_version", pa.string()),
])
LISTING_CHUNK = 10_000


@dataclass(frozen=True)
class CatalogueEntry:
    track_id: str
    uri: str
    labels: str | None = None
    source_size: int | None = None      # None: unknown until stat'ed on an executor
    source_version: str | None = None   # mtime_ns locally, ETag on S3


def source_kind(source: str) -> str:
    """"s3", "manifest" or "folder"."""
    if source.startswith("s3://"):
        return "manifest" if source.lower().endswith((".csv", ".parquet")) else "s3"
    if source.lower().endswith((".csv", ".parquet")):
        return "manifest"
    return "folder"


def track_id_from_path(relative_path: str) -> str:
    """A stable id from a path relative to the catalogue root: forward slashes, no leading ./"""
    rel = relative_path.replace(os.sep, "/")
    while rel.startswith("./"):
        rel = rel[2:]
    return rel.lstrip("/")


def _has_extension(name: str, extensions: Iterable[str]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in extensions))


def list_folder(root: str, extensions: Iterable[str]) -> Iterator[CatalogueEntry]:
    """Every audio file below ``root`` (recursive, sorted, symlinked files followed)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"catalogue folder {root} does not exist")
    extensions = tuple(extensions)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or not _has_extension(name, extensions):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                size, version = None, None   # vanished mid-listing: the executor reports it
            else:
                size, version = st.st_size, str(st.st_mtime_ns)
            yield CatalogueEntry(track_id_from_path(os.path.relpath(path, root)), path, None, size, version)


def s3_client():
    """A boto3 S3 client from the standard credential chain (env, profile, instance role)."""
    import boto3
    return boto3.session.Session().client("s3")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def list_s3(uri: str, extensions: Iterable[str], client=None) -> Iterator[CatalogueEntry]:
    """Every audio object under ``s3://bucket/prefix``, paginated (ids relative to the prefix)."""
    client = client or s3_client()
    bucket, prefix = split_s3(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    extensions = tuple(extensions)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/") or not _has_extension(key, extensions):
                continue
            yield CatalogueEntry(track_id_from_path(key[len(prefix):]), f"s3://{bucket}/{key}", None,
                                 int(obj["Size"]), obj["ETag"].strip('"'))


def resolve_uri(uri: str, base_dir: str) -> str:
    """Manifest URIs may be absolute, s3://, file://, or relative to the manifest's folder."""
    if uri.startswith("s3://") or os.path.isabs(uri):
        return uri
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if base_dir.startswith("s3://"):
        return base_dir.rstrip("/") + "/" + uri
    return os.path.normpath(os.path.join(base_dir, uri))


def write_listing(entries: Iterable[CatalogueEntry], path: str, filesystem=None) -> int:
    """Stream a listing to one Parquet file in bounded chunks; returns the row count."""
    rows = 0
    with pq.ParquetWriter(path, LISTING_SCHEMA, filesystem=filesystem) as writer:
        chunk: list[CatalogueEntry] = []
        for entry in entries:
            chunk.append(entry)
            if len(chunk) >= LISTING_CHUNK:
                writer.write_table(_chunk_table(chunk))
                rows += len(chunk)
                chunk = []
        if chunk:
            writer.write_table(_chunk_table(chunk))
            rows += len(chunk)
    return rows


def _chunk_table(chunk: list[CatalogueEntry]) -> pa.Table:
    return pa.table({
        "track_id": [e.track_id for e in chunk], "uri": [e.uri for e in chunk],
        "labels": [e.labels for e in chunk], "source_size": [e.source_size for e in chunk],
        "source_version": [e.source_version for e in chunk],
    }, schema=LISTING_SCHEMA)


def stat_source(uri: str, client=None) -> tuple[int, str]:
    """(size, version) of one source; raises FileNotFoundError when it is gone."""
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        client = client or s3_client()
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(uri) from exc
            raise
        return int(head["ContentLength"]), head["ETag"].strip('"')
    st = os.stat(uri)
    return st.st_size, str(st.st_mtime_ns)


def read_source(uri: str, client=None) -> bytes:
    """The bytes of one source file (local path or s3://)."""
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        client = client or s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(uri) from exc
    with open(uri, "rb") as fh:
        return fh.read()
