"""Spark wiring shared by every job: the session, and reading/committing warehouse tables."""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable

from deepcuts.core.config import PROJECT_ROOT, Config
from deepcuts.core.tables import Table, spark_schema
from deepcuts.core.warehouse import Snapshot, Warehouse

log = logging.getLogger(__name__)


def prepare_environment() -> None:
    """Python workers must run this interpreter (else they miss pyarrow/torch), on loopback."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def python_worker_setup() -> None:
    """Call first in every partition function that runs in a Spark Python worker.

    PySpark calls ``importlib.invalidate_caches()`` at the start of every task, and on
    Python 3.10/3.11 that re-reads the whole directory of every zip on ``sys.path``
    (pyspark.zip, py4j's zip, the job's --py-files): 0.3-0.4 s per task here, a fifth of
    a 2 s inference task (CPython gh-103200, fixed in 3.12; SPARK-54744).  Those zips
    never change while a worker lives, so their directories are kept.  Idempotent."""
    import zipimport
    if sys.version_info >= (3, 12) or getattr(zipimport.zipimporter.invalidate_caches, "kept", False):
        return

    def keep_zip_directory(self) -> None:
        pass

    keep_zip_directory.kept = True
    zipimport.zipimporter.invalidate_caches = keep_zip_directory


def spark_defaults() -> dict[str, str]:
    """conf/spark-defaults.conf as a dict (the one place Spark defaults live)."""
    path = PROJECT_ROOT / "conf" / "spark-defaults.conf"
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                key, _, value = line.partition(" ")
                out[key] = value.strip()
    return out


def get_session(cfg: Config, app: str | None = None, master: str | None = None):
    """The job's SparkSession.  Under spark-submit the master and spark-defaults come from
    its command line; from plain Python (tests, notebooks) conf/spark-defaults.conf is
    applied here and the master falls back to $SPARK_MASTER, then local[*]."""
    prepare_environment()
    from pyspark.sql import SparkSession
    builder = SparkSession.builder.appName(app or cfg.spark.app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        for key, value in spark_defaults().items():
            builder = builder.config(key, value)
        builder = builder.master(master or os.environ.get("SPARK_MASTER", "local[*]"))
    spark = builder.getOrCreate()
    apply_runtime_conf(spark, cfg)
    return spark


def apply_runtime_conf(spark, cfg: Config) -> None:
    spark.conf.set("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.spark.arrow_batch_rows))
    spark.sparkContext.setCheckpointDir(checkpoint_dir(cfg))


def checkpoint_dir(cfg: Config) -> str:
    if cfg.spark.checkpoint_dir:
        return cfg.spark.checkpoint_dir
    return warehouse(cfg).uri("_checkpoints")


def warehouse(cfg: Config) -> Warehouse:
    return Warehouse(cfg.warehouse.root, cfg.warehouse.keep_snapshots)


def empty_frame(spark, table: Table):
    return spark.createDataFrame([], spark_schema(table))


def read_table(spark, wh: Warehouse, table: Table, with_file: bool = False):
    """The committed version of ``table`` (empty, with its schema, if never written).

    ``with_file`` adds ``_file``, the table-relative data file of each row (for
    incremental rewrites)."""
    from pyspark.sql import functions as F
    files = wh.files(table.name)
    if not files:
        df = empty_frame(spark, table)
        return df.withColumn("_file", F.lit(None).cast("string")) if with_file else df
    df = spark.read.schema(spark_schema(table)).parquet(*files)
    if with_file:
        df = df.withColumn("_file", F.input_file_name())
    return df


def files_holding(wh: Warehouse, table: Table, rows_with_file) -> list[str]:
    """Table-relative data files holding any of ``rows_with_file`` (read with ``with_file``):
    what an incremental run rewrites to drop superseded rows.  One row per file reaches
    the driver, never the rows themselves."""
    return sorted({wh.rel(table.name, r["_file"]) for r in rows_with_file.select("_file").distinct().collect()})


def conform(df, table: Table):
    """Select ``table``'s columns, in order, cast to its types; fail on a missing column."""
    from pyspark.sql import functions as F
    schema = spark_schema(table)
    missing = [f.name for f in schema.fields if f.name not in df.columns]
    if missing:
        raise ValueError(f"{table.name}: the frame lacks columns {missing}")
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields])


def write_table(df, wh: Warehouse, table: Table, run_id: str, *, replace: bool = True,
                removed: Iterable[str] = (), summary: dict | None = None,
                rows_per_file: int | None = None, row_group_rows: int | None = None,
                row_bytes: int | None = None, expected_version: int | None = None) -> Snapshot:
    """Write ``df`` as new immutable files of ``table`` and commit them atomically.

    ``row_group_rows`` (with ``row_bytes``, the expected size of one row) sizes Parquet row
    groups, e.g. one Petastorm batch of mels."""
    out = conform(df, table).write.mode("overwrite")
    if rows_per_file:
        out = out.option("maxRecordsPerFile", rows_per_file)
    if row_group_rows and row_bytes:
        # parquet-mr checks a row group's size only every 100+ rows by default: far too coarse
        # for rows of ~300 kB.  (It checks row groups with the page-size key in 1.13.)
        out = (out.option("parquet.block.size", max(row_group_rows * row_bytes, 64 * 1024))
               .option("parquet.page.size.row.check.min", max(1, row_group_rows // 4)))
    out.parquet(wh.data_dir(table.name, run_id))
    added = wh.list_data_files(table.name, run_id)
    return wh.commit(table.name, run_id, added, removed=removed, replace=replace, summary=summary,
                     expected_version=expected_version)
