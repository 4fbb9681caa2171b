"""The table layer: every table is a Delta Lake table under ``warehouse.root``.

Spark writes and reads them with ``delta-spark`` (the jars are fetched once by
``bin/bootstrap.sh``); pandas, DuckDB and Petastorm read the same tables without a JVM
through ``deltalake`` (delta-rs).  What Delta gives the pipeline:

* a write is one atomic commit to ``_delta_log/``: a crash mid-write leaves no visible
  rows, Spark's task-attempt files never enter a table, and optimistic concurrency makes
  a second writer fail (or retry, for merges and appends) instead of losing a commit;
* incremental updates are ``MERGE`` on the table key (ingest, infer); full rebuilds are
  one overwrite commit;
* time travel: a reader pins the versions one completed run produced (the run manifest,
  :mod:`deepcuts.core.runs`), so tables of two runs are never mixed;
* small files are compacted (``OPTIMIZE``, Z-ordered by the lookup key) and unreferenced
  files removed (``VACUUM``) after ``warehouse.retention_hours``.

Paths: ``Lake.path`` is what pyarrow, boto3 and delta-rs take (a local path or
``s3://``); ``Lake.spark_uri`` is what Spark takes (a local path or ``s3a://``).

S3: a single Spark cluster writing a table is safe with Delta's default S3 log store
(``S3SingleDriverLogStore``: one driver at a time per table).  Several clusters writing
the same table concurrently need a LogStore with a lock (``S3DynamoDBLogStore``); see the
README.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from deepcuts.core.storage import is_s3, s3_endpoint, to_s3, to_s3a
from deepcuts.core.tables import ALL_TABLES, Table, spark_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableVersion:
    """What one write committed: the table, its new Delta version and its row count."""
    table: str
    version: int
    rows: int

    def __str__(self) -> str:
        return f"v{self.version}, {self.rows} rows"


class Lake:
    """The warehouse root: a local folder or ``s3://bucket/prefix``."""

    def __init__(self, root: str):
        if is_s3(root):
            self.root = to_s3(root).rstrip("/")
        else:
            self.root = os.path.abspath(root)

    @property
    def is_local(self) -> bool:
        return not is_s3(self.root)

    def path(self, *parts: str) -> str:
        """Local path or ``s3://`` URI (pyarrow, boto3, delta-rs, model files)."""
        return posixpath.join(self.root, *parts)

    def spark_uri(self, *parts: str) -> str:
        """Local path or ``s3a://`` URI (Spark)."""
        return to_s3a(self.path(*parts))

    def table_path(self, name: str) -> str:
        return self.path(name)

    def table_uri(self, name: str) -> str:
        return self.spark_uri(name)

    # --- delta-rs (no JVM) -------------------------------------------------------------
    def storage_options(self) -> dict[str, str]:
        """delta-rs options for S3: the standard AWS chain, plus an endpoint override
        (``AWS_ENDPOINT_URL``) for S3-compatible stores.  Never logged."""
        if self.is_local:
            return {}
        opts: dict[str, str] = {}
        endpoint = s3_endpoint()
        if endpoint:
            opts["AWS_ENDPOINT_URL"] = endpoint
            if endpoint.startswith("http://"):
                opts["AWS_ALLOW_HTTP"] = "true"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts["AWS_REGION"] = region
        return opts

    def delta(self, name: str, version: int | None = None):
        """The ``deltalake.DeltaTable`` of ``name`` (at ``version``), or None if never written."""
        from deltalake import DeltaTable
        path = self.table_path(name)
        if not DeltaTable.is_deltatable(path, storage_options=self.storage_options() or None):
            return None
        return DeltaTable(path, version=version, storage_options=self.storage_options() or None)

    def exists(self, name: str) -> bool:
        return self.delta(name) is not None

    def version(self, name: str) -> int | None:
        dt = self.delta(name)
        return None if dt is None else dt.version()

    def files(self, name: str, version: int | None = None) -> list[str]:
        """The data files of ``name`` at ``version`` (the latest by default), as local paths
        or ``s3://`` URIs: what Petastorm and pyarrow read.  Never a glob of the folder."""
        dt = self.delta(name, version)
        if dt is None:
            return []
        return sorted(_local_or_s3(uri) for uri in dt.file_uris())

    def _add_actions(self, name: str, version: int | None):
        """The log's add actions (one row per data file) of one version, or None."""
        dt = self.delta(name, version)
        return None if dt is None else _arrow(dt.get_add_actions(flatten=True))

    def file_stats(self, name: str, version: int | None = None) -> tuple[int, int, int]:
        """(rows, files, bytes) of one version, from the Delta log alone."""
        actions = self._add_actions(name, version)
        if actions is None or actions.num_rows == 0:
            return 0, 0, 0
        rows = actions.column("num_records").to_pylist()
        sizes = actions.column("size_bytes").to_pylist()
        return int(sum(r or 0 for r in rows)), actions.num_rows, int(sum(sizes))

    def columns(self, name: str) -> list[str]:
        """The table's column names from its log (no Spark job)."""
        dt = self.delta(name)
        return [] if dt is None else [f.name for f in dt.schema().fields]

    def commit_metadata(self, name: str, version: int | None = None) -> dict:
        """What the writer recorded with the commit of ``version`` (the latest by default):
        ``{"run_id": ...}`` plus anything passed as ``metadata`` to :func:`write_table`."""
        dt = self.delta(name)
        if dt is None:
            return {}
        latest = dt.version()
        version = latest if version is None else version
        # history() is newest first and ignores the loaded version: take the commit of ``version``.
        commits = [c for c in dt.history(latest - version + 1) if c.get("version") == version]
        return parse_user_metadata(commits[0].get("userMetadata")) if commits else {}

    def describe(self) -> list[dict]:
        """One line per table: version, rows, files, bytes, last commit."""
        out = []
        for name in ALL_TABLES:
            dt = self.delta(name)
            if dt is None:
                continue
            rows, files, size = self.file_stats(name)
            last = dt.history(1)[0]
            out.append({"table": name, "version": dt.version(), "rows": rows, "files": files,
                        "bytes": size, "operation": last.get("operation"),
                        "run_id": parse_user_metadata(last.get("userMetadata")).get("run_id"),
                        "committed_at": _iso(last.get("timestamp"))})
        return out


def _arrow(table_like):
    """A pyarrow Table from delta-rs' arro3 result (Arrow C stream; pyarrow 14 has no
    ``pa.table(obj)`` for it yet)."""
    import pyarrow as pa
    if isinstance(table_like, pa.Table):
        return table_like
    return pa.RecordBatchReader._import_from_c_capsule(table_like.__arrow_c_stream__()).read_all()


def _local_or_s3(uri: str) -> str:
    from urllib.parse import unquote, urlparse
    if uri.startswith("file:"):
        return unquote(urlparse(uri).path)
    return to_s3(uri)


def user_metadata(run_id: str, metadata: dict | None) -> str:
    """The commit's ``userMetadata``: the run id, as JSON with any extra metadata."""
    import json
    return json.dumps({"run_id": run_id, **(metadata or {})}, sort_keys=True, default=str)


def parse_user_metadata(text: str | None) -> dict:
    import json
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"run_id": text}
    return value if isinstance(value, dict) else {"run_id": text}


def _iso(ms) -> str | None:
    if ms is None:
        return None
    from datetime import datetime, timezone
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def lake(cfg) -> Lake:
    return Lake(cfg.warehouse.root)


# --- Spark -----------------------------------------------------------------------------
CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException",
             "ConcurrentDeleteDeleteException", "ConcurrentTransactionException",
             "ConcurrentWriteException", "MetadataChangedException", "ProtocolChangedException",
             "DELTA_CONCURRENT")


def is_conflict(exc: BaseException) -> bool:
    """Delta's optimistic-concurrency failure: another writer committed first."""
    text = f"{type(exc).__name__}: {exc}"
    return any(name in text for name in CONFLICTS)


class TableConflict(RuntimeError):
    """Another run committed to the table between this run's read and its commit."""


def empty_frame(spark, table: Table):
    return spark.createDataFrame([], spark_schema(table))


def read_table(spark, lk: Lake, table: Table, version: int | None = None, with_file: bool = False):
    """``table`` at ``version`` (the latest by default); empty, with its schema, if it was
    never written.  Columns are cast to the declared schema; ``with_file`` adds ``_file``,
    the data file holding each row (Spark's URI form)."""
    from pyspark.sql import functions as F
    if not lk.exists(table.name):
        df = empty_frame(spark, table)
        return df.withColumn("_file", F.lit(None).cast("string")) if with_file else df
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", int(version))
    df = reader.load(lk.table_uri(table.name))
    schema = spark_schema(table)
    present = set(df.columns)
    # A column added to the schema after the table was written reads as null until rewritten.
    columns = [(F.col(f.name) if f.name in present else F.lit(None)).cast(f.dataType).alias(f.name)
               for f in schema.fields]
    if with_file:
        columns.append(F.col("_metadata.file_path").alias("_file"))
    return df.select(columns)


def conform(df, table: Table):
    """Select ``table``'s columns, in order, cast to its types; fail on a missing column."""
    from pyspark.sql import functions as F
    schema = spark_schema(table)
    missing = [f.name for f in schema.fields if f.name not in df.columns]
    if missing:
        raise ValueError(f"{table.name}: the frame lacks columns {missing}")
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields])


@contextlib.contextmanager
def file_layout(spark, rows_per_file: int | None = None, row_group_rows: int | None = None,
                row_bytes: int | None = None) -> Iterator[None]:
    """Session settings for the files of one write (Delta's writer and OPTIMIZE read them
    from the session, not from writer options): rows per file, and Parquet row groups of
    ``row_group_rows`` rows of about ``row_bytes`` each (one Petastorm batch / one infer
    unit of mels)."""
    settings = {}
    if rows_per_file:
        settings["spark.sql.files.maxRecordsPerFile"] = str(rows_per_file)
    if row_group_rows and row_bytes:
        # parquet-mr checks a row group's size only every 100+ rows by default: far too coarse
        # for rows of ~300 kB.
        settings["parquet.block.size"] = str(max(row_group_rows * row_bytes, 64 * 1024))
        settings["parquet.page.size.row.check.min"] = str(max(1, row_group_rows // 4))
    saved = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


def _table_properties(retention_hours: int) -> dict[str, str]:
    return {"delta.logRetentionDuration": f"interval {retention_hours} hours",
            "delta.deletedFileRetentionDuration": f"interval {retention_hours} hours"}


def _with_retries(what: str, attempt, retries: int):
    for n in range(retries + 1):
        try:
            return attempt()
        except Exception as exc:  # noqa: BLE001 - Delta's conflicts arrive as Py4J/captured errors
            if not is_conflict(exc) or n == retries:
                if is_conflict(exc):
                    raise TableConflict(f"{what}: another run committed first, {retries} retries "
                                        f"exhausted: {str(exc).splitlines()[0][:300]}") from exc
                raise
            wait = 0.5 * (2 ** n)
            log.warning("%s: concurrent commit, retrying in %.1f s (%d/%d)", what, wait, n + 1, retries)
            time.sleep(wait)


def _logged_rows(dt) -> int | None:
    """Rows of a loaded ``DeltaTable`` version from its files' statistics in the log (None
    when a file has none, e.g. written by a tool that skips them)."""
    actions = _arrow(dt.get_add_actions(flatten=True))
    rows = actions.column("num_records").to_pylist() if actions.num_rows else []
    return None if any(r is None for r in rows) else int(sum(rows))


def _commit_version(spark, lk: Lake, table: Table, run_id: str) -> TableVersion:
    """The version this run just committed and the table's rows there, from the Delta log
    alone (delta-rs: no Spark job).  A concurrent writer may have committed after us, so the
    version is the newest commit carrying this run's id, not simply the latest."""
    dt = lk.delta(table.name)
    version = dt.version()
    for commit in dt.history(16):
        if parse_user_metadata(commit.get("userMetadata")).get("run_id") == run_id:
            version = int(commit["version"])
            break
    # the log is loaded once: again only when a concurrent commit came after ours
    rows = _logged_rows(dt if version == dt.version() else lk.delta(table.name, version))
    if rows is None:   # a file written without statistics: count it
        rows = spark.read.format("delta").option("versionAsOf", version).load(lk.table_uri(table.name)).count()
    return TableVersion(table.name, int(version), int(rows))


def write_table(df, lk: Lake, table: Table, run_id: str, *, mode: str = "overwrite",
                rows_per_file: int | None = None, row_group_rows: int | None = None,
                row_bytes: int | None = None, cluster: bool = True, retention_hours: int = 168,
                retries: int = 3, metadata: dict | None = None) -> TableVersion:
    """Write ``df`` as one Delta commit: ``mode="overwrite"`` replaces the table (a full
    rebuild), ``"append"`` adds rows (retried on a concurrent commit; an overwrite is not:
    the loser fails with :class:`TableConflict`).  A table that declares ``cluster_by`` is
    range-partitioned and sorted by it, so a lookup by key reads few files.  ``metadata``
    (small, JSON) is kept with the commit (:meth:`Lake.commit_metadata`)."""
    spark = df.sparkSession
    out = conform(df, table)
    if cluster and table.cluster_by and mode == "overwrite":
        parts = max(1, out.rdd.getNumPartitions())
        out = out.repartitionByRange(parts, *table.cluster_by).sortWithinPartitions(*table.cluster_by)
    writer = (out.write.format("delta").mode(mode).option("userMetadata", user_metadata(run_id, metadata))
              .option("mergeSchema", "true"))
    exists = lk.exists(table.name)
    if not exists:
        for key, value in _table_properties(retention_hours).items():
            writer = writer.option(key, value)

    def attempt():
        with file_layout(spark, rows_per_file, row_group_rows, row_bytes):
            writer.save(lk.table_uri(table.name))
    _with_retries(f"write {table.name}", attempt, retries if mode == "append" else 0)
    committed = _commit_version(spark, lk, table, run_id)
    log.info("committed %s %s (%s, run %s)", table.name, committed, mode, run_id)
    return committed


def merge_table(spark, lk: Lake, table: Table, run_id: str, upserts, deletes=None, *,
                key: Iterable[str] | None = None, rows_per_file: int | None = None,
                row_group_rows: int | None = None, row_bytes: int | None = None,
                retention_hours: int = 168, retries: int = 3) -> TableVersion:
    """One ``MERGE`` commit on the table key: rows of ``upserts`` replace or add the row
    with their key, keys in ``deletes`` (a frame with the key columns) are removed.  The
    first write of a table is an overwrite.  Retried on a concurrent commit (Delta re-checks
    the merge against the new version)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F
    key = tuple(key or table.key)
    if not key:
        raise ValueError(f"{table.name} declares no key: it cannot be merged")
    rows = conform(upserts, table).withColumn("_delete", F.lit(False))
    if deletes is not None:
        gone = deletes.select(*key).join(rows.select(*key), list(key), "left_anti").distinct()
        filler = [F.lit(None).cast(f.dataType).alias(f.name) for f in spark_schema(table).fields
                  if f.name not in key]
        rows = rows.unionByName(gone.select(*[F.col(k) for k in key], *filler).withColumn("_delete", F.lit(True)))
    if not lk.exists(table.name):
        return write_table(rows.where(~F.col("_delete")).drop("_delete"), lk, table, run_id,
                           rows_per_file=rows_per_file, row_group_rows=row_group_rows,
                           row_bytes=row_bytes, retention_hours=retention_hours)
    add_missing_columns(spark, lk, table)
    columns = spark_schema(table).names
    condition = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in key)

    def attempt():
        spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", user_metadata(run_id, None))
        try:
            with file_layout(spark, rows_per_file, row_group_rows, row_bytes):
                (DeltaTable.forPath(spark, lk.table_uri(table.name)).alias("t")
                 .merge(rows.alias("s"), condition)
                 .whenMatchedDelete(condition="s._delete")
                 .whenMatchedUpdate(set={c: f"s.`{c}`" for c in columns})
                 .whenNotMatchedInsert(condition="NOT s._delete", values={c: f"s.`{c}`" for c in columns})
                 .execute())
        finally:
            spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
    _with_retries(f"merge {table.name}", attempt, retries)
    committed = _commit_version(spark, lk, table, run_id)
    log.info("committed %s %s (merge, run %s)", table.name, committed, run_id)
    return committed


def add_missing_columns(spark, lk: Lake, table: Table) -> list[str]:
    """Schema evolution for a MERGE: nullable columns added to the declared schema since the
    table was created are added to the Delta table first (one metadata-only commit)."""
    present = set(lk.columns(table.name))
    missing = [f for f in spark_schema(table).fields if f.name not in present]
    if missing:
        cols = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        spark.sql(f"ALTER TABLE delta.`{lk.table_uri(table.name)}` ADD COLUMNS ({cols})")
        log.info("%s: added columns %s", table.name, [f.name for f in missing])
    return [f.name for f in missing]


def compact(spark, lk: Lake, table: Table, *, min_small_files: int, small_file_bytes: int,
            row_group_rows: int | None = None, row_bytes: int | None = None) -> bool:
    """``OPTIMIZE`` (Z-ordered by ``cluster_by``) once the table holds ``min_small_files``
    files under ``small_file_bytes``: merges and per-task writes leave many small files.
    Returns whether it ran."""
    from delta.tables import DeltaTable
    dt = lk.delta(table.name)
    if dt is None:
        return False
    sizes = _arrow(dt.get_add_actions(flatten=True)).column("size_bytes").to_pylist()
    if sum(1 for s in sizes if s < small_file_bytes) < min_small_files:
        return False
    with file_layout(spark, row_group_rows=row_group_rows, row_bytes=row_bytes):
        builder = DeltaTable.forPath(spark, lk.table_uri(table.name)).optimize()
        if table.cluster_by:
            builder.executeZOrderBy(*table.cluster_by)
        else:
            builder.executeCompaction()
    log.info("compacted %s (%d small files)", table.name, len(sizes))
    return True


def vacuum_due(history: list[dict], now_ms: float, retention_hours: int, interval_hours: int) -> bool:
    """Whether a VACUUM can remove anything and is due: the table is older than the
    retention window (younger files are never removed, so it would only list) and the
    last VACUUM is at least ``interval_hours`` old.  ``history``: Delta commit infos."""
    if not history:
        return False
    created = min(h["timestamp"] for h in history)
    vacuums = [h["timestamp"] for h in history if str(h.get("operation", "")).startswith("VACUUM")]
    hour = 3600 * 1000
    if now_ms - created < retention_hours * hour:
        return False
    return not vacuums or now_ms - max(vacuums) >= interval_hours * hour


def vacuum(spark, lk: Lake, table: Table, retention_hours: int, interval_hours: int) -> bool:
    """Delete files no version inside the retention window references (time travel and
    pinned readers stay safe for ``retention_hours``), when due (:func:`vacuum_due`: a
    VACUUM lists the whole table, so it runs at most every ``interval_hours``)."""
    from delta.tables import DeltaTable
    dt = lk.delta(table.name)
    if dt is None or not vacuum_due(dt.history(1000), time.time() * 1000, retention_hours, interval_hours):
        return False
    DeltaTable.forPath(spark, lk.table_uri(table.name)).vacuum(float(retention_hours))
    log.info("vacuumed %s (retention %d h)", table.name, retention_hours)
    return True


# --- without a JVM ---------------------------------------------------------------------
def read_arrow(lk: Lake, name: str, version: int | None = None, columns: list[str] | None = None):
    """A table as a pyarrow Table (delta-rs), cast to its declared schema."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    table = ALL_TABLES[name]
    schema = table.schema if columns is None else pa.schema([table.schema.field(c) for c in columns])
    dt = lk.delta(name, version)
    if dt is None:
        return schema.empty_table()
    data = dt.to_pyarrow_dataset()
    present = set(data.schema.names)
    got = data.to_table(columns=[c for c in schema.names if c in present]) if isinstance(data, pads.Dataset) \
        else data
    cols = [got.column(f.name).cast(f.type) if f.name in present else pa.nulls(got.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema.remove_metadata())


def read_pandas(lk: Lake, name: str, version: int | None = None, columns: list[str] | None = None):
    """A table as a pandas DataFrame (analysts; small tables)."""
    return read_arrow(lk, name, version, columns).to_pandas()


def duckdb_views(con, lk: Lake) -> list[str]:
    """One DuckDB view per table, over the current Delta snapshot (delta-rs' file list,
    never a glob of the folder)."""
    made = []
    for row in lk.describe():
        dataset = lk.delta(row["table"]).to_pyarrow_dataset()
        con.register(f"_{row['table']}_dataset", dataset)
        con.execute(f"CREATE OR REPLACE VIEW {row['table']} AS SELECT * FROM _{row['table']}_dataset")
        made.append(row["table"])
    return made
