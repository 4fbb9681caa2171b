"""Plain files under the warehouse (model artifacts, checkpoints, index files): atomic
writes and reads on a local disk or S3, and the URI forms each engine wants.

Tables are Delta tables (:mod:`deepcuts.core.lake`); this module is for the few objects
that are files, not tables.
"""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

import pyarrow.fs as pafs

S3_SCHEMES = ("s3://", "s3a://", "s3n://")


def is_s3(path: str) -> bool:
    return path.startswith(S3_SCHEMES)


def to_s3(path: str) -> str:
    """``s3a://b/k`` (Spark's form) -> ``s3://b/k`` (boto3, pyarrow, delta-rs)."""
    for scheme in S3_SCHEMES:
        if path.startswith(scheme):
            return "s3://" + path[len(scheme):]
    return path


def to_s3a(path: str) -> str:
    """``s3://b/k`` -> ``s3a://b/k`` (the Hadoop connector Spark uses)."""
    return "s3a://" + to_s3(path)[len("s3://"):] if is_s3(path) else path


def s3_endpoint() -> str | None:
    """An endpoint override for S3-compatible stores, from the standard AWS variables."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_settings(settings: dict, prefix: str = "") -> list[str]:
    """The keys (``section.key``) of a nested settings dict whose value is an S3 URI."""
    found = []
    for key, value in settings.items():
        if isinstance(value, dict):
            found += s3_settings(value, f"{prefix}{key}.")
        elif isinstance(value, str) and is_s3(value):
            found.append(f"{prefix}{key}")
    return found


def s3_credentials_missing(settings: dict) -> str | None:
    """Why the configured S3 paths cannot be reached, or None: an ``s3://`` path with no
    credentials anywhere in the standard AWS chain (environment, shared credentials and config
    files, container or instance role) would otherwise fail deep inside the first Spark or
    delta-rs read with a Java stack.  Only whether credentials exist is checked, never logged."""
    keys = s3_settings(settings)
    if not keys:
        return None
    import boto3
    if boto3.session.Session().get_credentials() is not None:
        return None
    return (f"{keys[0]} is on S3 ({', '.join(keys)}) but the standard AWS chain has no credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, or a container/instance role)")


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://`` URI.  Credentials come
    from the standard AWS chain; an endpoint override from ``AWS_ENDPOINT_URL``."""
    if is_s3(path):
        from urllib.parse import urlparse
        endpoint = s3_endpoint()
        kwargs = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), to_s3(path)[len("s3://"):]
    if path.startswith("file:"):
        from urllib.parse import unquote, urlparse
        path = unquote(urlparse(path).path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def path_from_uri(uri: str) -> str:
    """A path for ``filesystem_for`` from a URI as Spark reports it (``_metadata.file_path``,
    ``input_file_name``): ``file:`` URIs are percent-decoded, ``s3a://`` becomes ``s3://``."""
    from urllib.parse import unquote, urlparse
    if uri.startswith("file:"):
        return unquote(urlparse(uri).path)
    return to_s3(uri)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Readers never see half a file: locally temp file + fsync + rename; on S3 one PUT."""
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as fh:
            fh.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_from(fs: pafs.FileSystem, path: str) -> bytes | None:
    """A file's bytes, or None when it does not exist."""
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:  # pyarrow's S3 reports a missing key as OSError
        if "does not exist" in str(exc) or "NoSuchKey" in str(exc) or "Path does not exist" in str(exc):
            return None
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    """:func:`write_atomic` for a local path or an ``s3://`` URI."""
    write_atomic(*filesystem_for(path), data)


def read_bytes(path: str) -> bytes | None:
    """:func:`read_from` for a local path or an ``s3://`` URI."""
    return read_from(*filesystem_for(path))


def delete_tree(path: str) -> None:
    """Remove a folder (local or S3 prefix) if it exists."""
    fs, inner = filesystem_for(path)
    try:
        fs.delete_dir(inner)
    except (FileNotFoundError, OSError):
        pass


def new_run_id(prefix: str = "") -> str:
    """Sortable, unique: UTC time + random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{prefix}{stamp}-{uuid.uuid4().hex[:8]}"
