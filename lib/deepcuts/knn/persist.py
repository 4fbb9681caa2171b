"""Shard index files under the warehouse, with checksums, for the stage and for query by audio.

Layout (``root`` is the warehouse root, a local folder or ``s3://``)::

    indexes/LATEST                               the run id of the last published indexes
    indexes/<run_id>/<name>/manifest.json        the set: type, dim, shards, files, sha256s
    indexes/<run_id>/<name>/shard-00003.faiss    faiss.serialize_index of shard 3
    indexes/<run_id>/<name>/shard-00003.ids.parquet  its item ids (row i = FAISS id i) + payload

Each shard is written by the executor that built it (one PUT per file on S3); the driver
writes the manifest from the S rows the builders return, and ``publish`` swaps ``LATEST``
only once the stage succeeded, so a reader never sees a half-written set.  Every read
checks the file's sha256 against the manifest: a truncated or replaced file is an error,
never a silently wrong answer.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepcuts.core.storage import delete_tree, filesystem_for, read_bytes, write_bytes_atomic

INDEXES_DIR = "indexes"
LATEST = "LATEST"
MANIFEST = "manifest.json"
FORMAT = 1


class IndexFileError(RuntimeError):
    """A persisted index file is missing, or its checksum does not match its manifest."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def indexes_root(root: str) -> str:
    return posixpath.join(str(root).rstrip("/"), INDEXES_DIR)


def index_dir(root: str, run_id: str, name: str) -> str:
    return posixpath.join(indexes_root(root), run_id, name)


def shard_file(shard: int, suffix: str) -> str:
    return f"shard-{shard:05d}.{suffix}"


# --- vectors in Parquet --------------------------------------------------------------------
def vectors_of(column: pa.ChunkedArray | pa.Array, dim: int | None = None) -> np.ndarray:
    """A list<float> Arrow column as float32 [n, dim] (one copy, no Python objects)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    flat = np.asarray(arr.flatten(), dtype=np.float32)
    width = len(flat) // n
    if width * n != len(flat) or (dim is not None and width != dim):
        raise ValueError(f"vectors of unequal length ({len(flat)} values in {n} rows)")
    return flat.reshape(n, width)


def read_parquet_dir(path: str, columns: list[str] | None = None) -> pa.Table:
    """Every ``*.parquet`` file under ``path`` (Spark's folders, or files of ``write_parquet``;
    '_'/'.' files and temp files skipped); an empty table when the folder does not exist."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    fs, inner = filesystem_for(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return pa.table({})
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and not posixpath.basename(i.path).startswith(("_", ".")))
    if not files:
        return pa.table({})
    return ds.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)


def write_parquet(path: str, table: pa.Table) -> None:
    """One Parquet file, written atomically (a rerun of a task replaces it whole)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(path, sink.getvalue())


# --- one shard ----------------------------------------------------------------------------
def write_shard(folder: str, shard: int, index, ids: pa.Table) -> dict:
    """Write one shard's index and ids table; return its manifest entry."""
    import faiss
    if index.ntotal != ids.num_rows:
        raise ValueError(f"shard {shard}: index holds {index.ntotal} vectors, ids {ids.num_rows}")
    index_bytes = faiss.serialize_index(index).tobytes()
    sink = io.BytesIO()
    pq.write_table(ids, sink, compression="zstd")
    ids_bytes = sink.getvalue()
    entry = {"shard": int(shard), "rows": int(index.ntotal),
             "index_file": shard_file(shard, "faiss"), "index_sha256": sha256(index_bytes),
             "index_bytes": len(index_bytes),
             "ids_file": shard_file(shard, "ids.parquet"), "ids_sha256": sha256(ids_bytes),
             "ids_bytes": len(ids_bytes)}
    write_bytes_atomic(posixpath.join(folder, entry["index_file"]), index_bytes)
    write_bytes_atomic(posixpath.join(folder, entry["ids_file"]), ids_bytes)
    return entry


def plain_name(name: str, what: str) -> str:
    """``name`` if it is one path component: names read from a manifest or LATEST never
    lead outside the index folder."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise IndexFileError(f"{what} {name!r} is not a plain file name")
    return name


def _checked(folder: str, name: str, expected: str) -> bytes:
    path = posixpath.join(folder, plain_name(name, "index file"))
    data = read_bytes(path)
    if data is None:
        raise IndexFileError(f"index file {path} is missing")
    digest = sha256(data)
    if digest != expected:
        raise IndexFileError(f"index file {path} is corrupted or replaced: sha256 {digest[:12]}..., "
                             f"the manifest expects {expected[:12]}...")
    return data


def read_shard(folder: str, entry: dict):
    """(index, ids table) of one shard, both checked against ``entry``'s sha256."""
    import faiss
    index = faiss.deserialize_index(np.frombuffer(_checked(folder, entry["index_file"],
                                                           entry["index_sha256"]), dtype=np.uint8))
    ids = pq.read_table(io.BytesIO(_checked(folder, entry["ids_file"], entry["ids_sha256"])))
    if index.ntotal != ids.num_rows or index.ntotal != entry["rows"]:
        raise IndexFileError(f"{folder} shard {entry['shard']}: {index.ntotal} vectors, "
                             f"{ids.num_rows} ids, manifest says {entry['rows']}")
    return index, ids


_CACHE: dict[tuple[str, str], tuple] = {}
_CACHE_LOCK = threading.Lock()


def cached_shard(folder: str, entry: dict, extra=None):
    """``read_shard`` once per Python worker while consecutive tasks search the same shard;
    one shard at a time (a task never holds two).  ``extra(index, ids)`` derives and caches
    more per shard (e.g. the exact view used for recall)."""
    key = (posixpath.join(folder, entry["index_file"]), entry["index_sha256"])
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            index, ids = read_shard(folder, entry)
            _CACHE[key] = (index, ids, {})
        index, ids, derived = _CACHE[key]
        if extra is not None and "extra" not in derived:
            derived["extra"] = extra(index, ids)
        return index, ids, derived.get("extra")


# --- the set: manifest, publication, vacuum --------------------------------------------------
def write_manifest(folder: str, manifest: dict) -> None:
    data = {"format": FORMAT, **manifest, "shards": sorted(manifest["shards"], key=lambda e: e["shard"])}
    write_bytes_atomic(posixpath.join(folder, MANIFEST), json.dumps(data, indent=1, sort_keys=True).encode())


def read_manifest(folder: str) -> dict:
    data = read_bytes(posixpath.join(folder, MANIFEST))
    if data is None:
        raise IndexFileError(f"no index manifest at {folder}/{MANIFEST}")
    return json.loads(data)


def publish(root: str, run_id: str) -> None:
    """Point ``indexes/LATEST`` at ``run_id`` (after every manifest of the run is written)."""
    write_bytes_atomic(posixpath.join(indexes_root(root), LATEST), run_id.encode())


def latest_run(root: str) -> str | None:
    data = read_bytes(posixpath.join(indexes_root(root), LATEST))
    run = data.decode().strip() if data is not None else ""
    return plain_name(run, "the run in indexes/LATEST") if run else None


def vacuum(root: str, keep: int) -> list[str]:
    """Delete index runs beyond the newest ``keep`` (never the published one)."""
    import pyarrow.fs as pafs
    fs, inner = filesystem_for(indexes_root(root))
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    runs = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
    published = latest_run(root)
    doomed = [r for r in runs[:-keep] if r != published] if keep > 0 else [r for r in runs if r != published]
    for run in doomed:
        delete_tree(posixpath.join(indexes_root(root), run))
    return doomed
