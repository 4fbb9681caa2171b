"""Where the catalogue's audio lives: a local folder, a manifest, or an S3 prefix.

Pure Python (no Spark).  A listing is a stream of :class:`CatalogueEntry` rows; the
driver streams it to a Parquet file in bounded chunks (never a list of the whole
catalogue in memory), and the executors read each file's bytes with
:func:`read_source`, confined to the roots of :func:`effective_roots`
(:mod:`deepcuts.audio.confine`: regular files under a root, at most ``max_file_bytes``).  S3 goes through boto3 and the standard AWS credential chain
(``AWS_ENDPOINT_URL`` points it at another endpoint); credentials are never logged.
"""
from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from typing import Iterable, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from deepcuts.audio import confine
from deepcuts.audio.reasons import TOO_LARGE, RejectedAudio
from deepcuts.core.errors import InputMissing

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
    """Every audio file below ``root`` (recursive, sorted; symlinked folders are not entered).

    Every path is resolved: a symlinked file that stays inside the root is listed with its
    target's size and version; one that resolves outside it is listed with the link's own
    (``lstat``: its target is never touched) and the executor rejects it as ``outside_root``,
    as it does FIFOs, devices and sockets (``not_a_file``), so each lands in ``ingest_rejects``."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise InputMissing(f"catalogue folder {root} does not exist")
    real_root = confine.resolve_root(root)
    extensions = tuple(extensions)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or not _has_extension(name, extensions):
                continue
            path = os.path.join(dirpath, name)
            try:
                inside = confine.is_under(os.path.realpath(path), real_root)
                st = os.stat(path) if inside else os.lstat(path)
            except OSError:
                size, version = None, None   # vanished mid-listing, or a dangling link: the executor reports it
            else:
                size = st.st_size if stat.S_ISREG(st.st_mode) else None
                version = str(st.st_mtime_ns) if inside else f"link:{st.st_mtime_ns}"
            yield CatalogueEntry(track_id_from_path(os.path.relpath(path, root)), path, None, size, version)


def effective_roots(source: str, allowed_roots: Iterable[str] = ()) -> tuple[str, ...]:
    """Where the sources of ``ingest.source`` may resolve to, resolved (on the driver).

    ``allowed_roots`` ([] by default) plus the source's own root: the folder of a folder
    source, the bucket of an ``s3://`` source; a manifest's folder only when ``allowed_roots``
    is empty (a manifest usually lists audio kept elsewhere: name it there)."""
    roots = [confine.resolve_root(r) for r in allowed_roots]
    kind = source_kind(source)
    if kind == "folder":
        roots.append(confine.resolve_root(source))
    elif kind == "s3":
        roots.append(f"s3://{split_s3(source)[0]}/")
    elif not roots:
        roots.append(f"s3://{split_s3(source)[0]}/" if source.startswith("s3://")
                     else confine.resolve_root(os.path.dirname(os.path.abspath(source))))
    return tuple(dict.fromkeys(roots))


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


def stat_source(uri: str, client=None, roots: tuple[str, ...] = ()) -> tuple[int, str]:
    """(size, version) of one source; raises FileNotFoundError when it is gone, and
    :class:`RejectedAudio` (outside_root) without touching it when it lies outside ``roots``."""
    confine.check_uri(uri, roots)
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


@contextlib.contextmanager
def open_source(uri: str, client=None, roots: tuple[str, ...] = (), max_bytes: int | None = None):
    """(bytes, descriptor or None) of one source, confined like :func:`read_source`: a local file
    stays open while the caller decodes (libsndfile reads it directly), an S3 object has none."""
    if uri.startswith("s3://"):
        yield read_source(uri, client, roots, max_bytes), None
        return
    with confine.open_local(uri, roots, max_bytes) as opened:
        yield opened


def read_source(uri: str, client=None, roots: tuple[str, ...] = (), max_bytes: int | None = None) -> bytes:
    """The bytes of one source file (local path or s3://), confined to ``roots`` (() = anywhere)
    and ``max_bytes``: :class:`RejectedAudio` (outside_root, not_a_file, too_large) before reading."""
    if uri.startswith("s3://"):
        confine.check_uri(uri, roots)
        bucket, key = split_s3(uri)
        client = client or s3_client()
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(uri) from exc
        size = int(obj.get("ContentLength") or 0)
        if max_bytes and size > max_bytes:
            obj["Body"].close()
            raise RejectedAudio(TOO_LARGE, f"{size} bytes > ingest.max_file_bytes = {max_bytes}")
        return obj["Body"].read()
    return confine.read_local(uri, roots, max_bytes)
