"""The warehouse: versioned, atomically committed tables of immutable Parquet files.

Layout of a table ``<root>/<name>/``::

    data/<run_id>/part-*.parquet     immutable data files, written by one run
    _snapshots/v00000007.json        one committed version: the list of its live files
    _CURRENT                         the name of the committed snapshot (replaced atomically)

A job writes its files into a fresh ``data/<run_id>/`` and then commits: it writes
a new snapshot file and swaps ``_CURRENT``.  Readers only ever see files listed by
a committed snapshot, so a crash mid-run leaves the previous version readable and
complete, and a re-run never duplicates rows.  An incremental run adds files and
names the files it supersedes; untouched files are shared between versions.  This
works the same on a local disk (``os.replace``) and on S3 (a single PUT is atomic).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Sequence

import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

CURRENT = "_CURRENT"
SNAPSHOTS = "_snapshots"
DATA = "data"
# Uncommitted files younger than this are never vacuumed: they may be a running job's output.
VACUUM_GRACE_S = 6 * 3600


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://`` URI."""
    if path.startswith("s3://"):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def path_from_uri(uri: str) -> str:
    """A path for ``filesystem_for`` from a URI as Spark reports it (``_metadata.file_path``,
    ``input_file_name``): ``file:`` URIs are percent-decoded, ``s3a://`` becomes ``s3://``."""
    from urllib.parse import unquote, urlparse
    if uri.startswith("file:"):
        return unquote(urlparse(uri).path)
    for scheme in ("s3a://", "s3n://"):
        if uri.startswith(scheme):
            return "s3://" + uri[len(scheme):]
    return uri


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
        if "does not exist" in str(exc) or "NoSuchKey" in str(exc):
            return None
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    """:func:`write_atomic` for a local path or an ``s3://`` URI."""
    write_atomic(*filesystem_for(path), data)


def read_bytes(path: str) -> bytes | None:
    """:func:`read_from` for a local path or an ``s3://`` URI."""
    return read_from(*filesystem_for(path))


class CommitConflict(RuntimeError):
    """Another writer committed the table between this run's read and its commit."""


def new_run_id(prefix: str = "") -> str:
    """Sortable, unique: UTC time + random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{prefix}{stamp}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Snapshot:
    table: str
    version: int
    run_id: str
    files: tuple[str, ...]          # relative to the table folder
    rows: int
    created_at: str
    summary: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"table": self.table, "version": self.version, "run_id": self.run_id,
                           "files": list(self.files), "rows": self.rows,
                           "created_at": self.created_at, "summary": self.summary}, indent=1)

    @staticmethod
    def from_json(text: str) -> "Snapshot":
        d = json.loads(text)
        return Snapshot(d["table"], d["version"], d["run_id"], tuple(d["files"]), d["rows"],
                        d["created_at"], d.get("summary", {}))


class Warehouse:
    """Tables under one root: a local folder or ``s3://bucket/prefix``."""

    def __init__(self, root: str, keep_snapshots: int = 3):
        if root.startswith("s3://"):
            self.root = root.rstrip("/")
            self.fs, self._base = pafs.FileSystem.from_uri(self.root)
        else:
            self.root = os.path.abspath(root)
            self.fs, self._base = pafs.LocalFileSystem(), self.root
        self.keep_snapshots = keep_snapshots

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    # --- paths -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self._base, *parts)

    def uri(self, *parts: str) -> str:
        """A URI for Spark and other readers (``file:`` locally, ``s3a:`` on S3)."""
        if self.is_local:
            return "file://" + self._path(*parts)
        return "s3a://" + self._path(*parts)

    def local_path(self, *parts: str) -> str:
        """The filesystem path (pyarrow, pandas, DuckDB, Petastorm)."""
        return self._path(*parts) if self.is_local else "s3://" + self._path(*parts)

    def data_dir(self, table: str, run_id: str) -> str:
        return self.uri(table, DATA, run_id)

    def list_data_files(self, table: str, run_id: str) -> list[str]:
        """Relative paths of the Parquet files a run wrote into its data folder."""
        base = self._path(table, DATA, run_id)
        info = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
        rel = [posixpath.relpath(i.path, self._path(table)) for i in info
               if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
        return sorted(rel)

    # --- reading -----------------------------------------------------------------------
    def _read_text(self, path: str) -> str | None:
        data = read_from(self.fs, path)
        return None if data is None else data.decode()

    def snapshot(self, table: str) -> Snapshot | None:
        name = self._read_text(self._path(table, CURRENT))
        if name is None:
            return None
        text = self._read_text(self._path(table, SNAPSHOTS, name.strip()))
        if text is None:
            raise RuntimeError(f"table {table}: {CURRENT} names a missing snapshot {name!r}")
        return Snapshot.from_json(text)

    def exists(self, table: str) -> bool:
        return self.snapshot(table) is not None

    def files(self, table: str, local: bool = False) -> list[str]:
        """The committed files of ``table`` (Spark URIs, or filesystem paths with ``local``)."""
        snap = self.snapshot(table)
        if snap is None:
            return []
        to = self.local_path if local else self.uri
        return [to(table, f) for f in snap.files]

    def rel(self, table: str, uri: str) -> str:
        """The table-relative path of one of its data files, from a URI or path."""
        for prefix in (self.uri(table) + "/", self.local_path(table) + "/", "file:" + self._path(table) + "/"):
            if uri.startswith(prefix):
                return uri[len(prefix):]
        raise ValueError(f"{uri} is not a file of table {table}")

    # --- writing -----------------------------------------------------------------------
    def commit(self, table: str, run_id: str, added: Sequence[str], removed: Iterable[str] = (),
               replace: bool = False, summary: dict | None = None,
               expected_version: int | None = None) -> Snapshot:
        """Atomically publish a new version of ``table``.

        ``added``/``removed`` are table-relative data file paths.  With ``replace`` the
        new version holds only ``added``.  ``expected_version`` (the version the run
        read) guards against a concurrent writer.
        """
        parent = self.snapshot(table)
        parent_version = parent.version if parent else 0
        if expected_version is not None and expected_version != parent_version:
            raise CommitConflict(f"table {table} moved from v{expected_version} to v{parent_version}")
        removed = set(removed)
        kept = [] if replace or parent is None else [f for f in parent.files if f not in removed]
        unknown = removed - set(parent.files if parent else ())
        if unknown:
            raise ValueError(f"table {table}: cannot remove files it does not hold: {sorted(unknown)[:3]}")
        kept_set = set(kept)
        new_files = [f for f in added if f not in kept_set]
        files = tuple(kept + new_files)
        # Footers of the changed files only: the kept ones are counted in the parent's rows.
        rows = sum(self._rows(table, f) for f in new_files)
        if kept:
            rows += parent.rows - sum(self._rows(table, f) for f in removed)
        snap = Snapshot(table, parent_version + 1, run_id, files, rows,
                        datetime.now(timezone.utc).isoformat(timespec="seconds"), summary or {})
        snap_name = f"v{snap.version:08d}.json"
        snap_path = self._path(table, SNAPSHOTS, snap_name)
        if self.fs.get_file_info(snap_path).type != pafs.FileType.NotFound:
            raise CommitConflict(f"table {table}: snapshot {snap_name} already exists")
        self.fs.create_dir(self._path(table, SNAPSHOTS), recursive=True)
        write_atomic(self.fs, snap_path, snap.to_json().encode())
        write_atomic(self.fs, self._path(table, CURRENT), snap_name.encode())
        log.info("committed %s v%d: %d files, %d rows (run %s)", table, snap.version, len(files),
                 rows, run_id)
        self.vacuum(table)
        return snap

    def _rows(self, table: str, rel: str) -> int:
        with self.fs.open_input_file(self._path(table, rel)) as fh:
            return pq.ParquetFile(fh).metadata.num_rows

    def vacuum(self, table: str, now: float | None = None) -> list[str]:
        """Drop snapshots beyond ``keep_snapshots`` and data files no kept snapshot lists."""
        now = time.time() if now is None else now
        snap_dir = self._path(table, SNAPSHOTS)
        infos = sorted((i for i in self.fs.get_file_info(pafs.FileSelector(snap_dir, allow_not_found=True))
                        if i.path.endswith(".json")), key=lambda i: i.path)
        doomed = infos[:-self.keep_snapshots]
        live: set[str] = set()
        for info in infos[-self.keep_snapshots:]:
            live.update(Snapshot.from_json(self._read_text(info.path)).files)
        for info in doomed:
            self.fs.delete_file(info.path)
        deleted = []
        data = self.fs.get_file_info(pafs.FileSelector(self._path(table, DATA), allow_not_found=True,
                                                       recursive=True))
        for info in data:
            if info.type != pafs.FileType.File:
                continue
            rel = posixpath.relpath(info.path, self._path(table))
            mtime = info.mtime.timestamp() if info.mtime else now
            if rel not in live and rel.endswith(".parquet") and now - mtime > VACUUM_GRACE_S:
                self.fs.delete_file(info.path)
                deleted.append(rel)
        return deleted

    def describe(self) -> list[dict]:
        """One line per committed table, for the operator and analysts."""
        from deepcuts.core.tables import ALL_TABLES
        out = []
        for name in ALL_TABLES:
            snap = self.snapshot(name)
            if snap is not None:
                out.append({"table": name, "version": snap.version, "rows": snap.rows,
                            "files": len(snap.files), "run_id": snap.run_id,
                            "created_at": snap.created_at})
        return out


def read_pandas(wh: Warehouse, table_name: str, columns: list[str] | None = None):
    """A committed table as a pandas DataFrame (analysts; small tables)."""
    import pyarrow as pa
    from deepcuts.core.tables import ALL_TABLES
    table = ALL_TABLES[table_name]
    files = wh.files(table_name, local=True)
    if not files:
        return table.schema.empty_table().to_pandas()
    fs = None if wh.is_local else wh.fs
    paths = files if wh.is_local else [f[len("s3://"):] for f in files]
    schema = table.schema if columns is None else pa.schema([table.schema.field(c) for c in columns])
    # Cast each file to the declared schema: Spark records nullability differently run to run.
    return pa.concat_tables(pq.read_table(p, columns=columns, filesystem=fs).select(schema.names).cast(schema)
                            for p in paths).to_pandas()


def duckdb_views(con, wh: Warehouse) -> list[str]:
    """Create one DuckDB view per committed table (local warehouses)."""
    made = []
    for name in [d["table"] for d in wh.describe()]:
        files = ", ".join("'" + f.replace("'", "''") + "'" for f in wh.files(name, local=True))
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet([{files}])")
        made.append(name)
    return made
