"""Spark wiring shared by every job: the session (Delta Lake, s3a) and Python-worker setup."""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deepcuts.core.config import PROJECT_ROOT, Config

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


def follow_launcher(poll_seconds: float = 1.0) -> bool:
    """Under spark-submit the Python driver is a child of the spark-submit JVM; when that JVM is
    killed (``kill -9``, a lost client machine) nothing tells the Python process, which would go
    on training or scoring for nothing and write model files no manifest will ever name.  A
    daemon thread exits this process once its parent is gone.  Returns whether it watches."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ or getattr(follow_launcher, "watching", False):
        return False
    import threading
    import time
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        try:   # stderr was a pipe through that JVM: it may be gone with it
            print(f"deepcuts: the spark-submit process {parent} is gone; this driver ({os.getpid()}) exits",
                  file=sys.stderr, flush=True)
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="deepcuts-follow-launcher", daemon=True).start()
    follow_launcher.watching = True
    return True


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


def jar_dir() -> Path:
    """Where bin/bootstrap.sh puts the JVM packages of conf/jvm-packages.txt (Delta, s3a)."""
    return Path(os.environ.get("DEEPCUTS_JARS", PROJECT_ROOT / ".venv" / "jars"))


def jars() -> list[str]:
    found = sorted(str(p) for p in jar_dir().glob("*.jar"))
    if not found:
        raise RuntimeError(f"no JVM packages in {jar_dir()}: run bin/bootstrap.sh (it fetches Delta Lake and "
                           "hadoop-aws from Maven Central once)")
    return found


def s3a_settings() -> dict[str, str]:
    """Hadoop s3a settings from the standard AWS environment: credentials through the AWS
    default chain (env, profile, container, instance role), and an endpoint override with
    path-style access for S3-compatible stores.  Holds no secret, so it can be logged."""
    from deepcuts.core.storage import s3_endpoint
    out = {"spark.hadoop.fs.s3a.aws.credentials.provider": "com.amazonaws.auth.DefaultAWSCredentialsProviderChain"}
    endpoint = s3_endpoint()
    if endpoint:
        out.update({"spark.hadoop.fs.s3a.endpoint": endpoint,
                    "spark.hadoop.fs.s3a.path.style.access": "true",
                    "spark.hadoop.fs.s3a.connection.ssl.enabled": str(endpoint.startswith("https")).lower()})
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["spark.hadoop.fs.s3a.endpoint.region"] = region
    return out


def get_session(cfg: Config, app: str | None = None, master: str | None = None):
    """The job's SparkSession, with Delta Lake and s3a.  Under spark-submit the master, the
    jars and spark-defaults come from its command line; from plain Python (tests, notebooks)
    conf/spark-defaults.conf and the jars are applied here and the master falls back to
    $SPARK_MASTER, then local[*]."""
    prepare_environment()
    follow_launcher()
    from pyspark.sql import SparkSession
    builder = SparkSession.builder.appName(app or cfg.spark.app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        for key, value in spark_defaults().items():
            builder = builder.config(key, value)
        builder = builder.config("spark.jars", ",".join(jars()))
        builder = builder.master(master or os.environ.get("SPARK_MASTER", "local[*]"))
    for key, value in s3a_settings().items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    apply_runtime_conf(spark, cfg)
    return spark


def apply_runtime_conf(spark, cfg: Config) -> None:
    spark.conf.set("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    spark.conf.set(ARROW_BATCH_ROWS, str(cfg.spark.arrow_batch_rows))
    spark.sparkContext.setCheckpointDir(checkpoint_dir(cfg))


ARROW_BATCH_ROWS = "spark.sql.execution.arrow.maxRecordsPerBatch"


def partitions_for_bytes(n_bytes: int, cfg: Config) -> int:
    """Partitions of a shuffle of ``n_bytes``: ``spark.shuffle_partitions``, or more so that
    none holds over ``spark.partition_mb``."""
    return max(cfg.spark.shuffle_partitions, -(-int(n_bytes) // (cfg.spark.partition_mb << 20)))


def arrow_batch_rows(cfg: Config, rows: str) -> int:
    """Rows per Arrow batch for ``rows`` = "mel" (a mel is ~330 kB: small batches) or
    "vector" (play pairs, factor vectors: large batches, or the Python work per batch and the
    batch count dominate: 10^10 play rows in 64-row batches would be 1.5 x 10^8 batches)."""
    if rows not in ("mel", "vector"):
        raise ValueError(f"rows must be 'mel' or 'vector', not {rows!r}")
    return cfg.spark.arrow_batch_rows if rows == "mel" else cfg.spark.arrow_batch_rows_vectors


@contextmanager
def arrow_batches(spark, cfg: Config, rows: str) -> Iterator[None]:
    """Spark actions inside use ``arrow_batch_rows(cfg, rows)`` rows per Arrow batch (the
    setting is read when a query runs, so the query must run inside)."""
    saved = spark.conf.get(ARROW_BATCH_ROWS, None)
    spark.conf.set(ARROW_BATCH_ROWS, str(arrow_batch_rows(cfg, rows)))
    try:
        yield
    finally:
        if saved is None:
            spark.conf.unset(ARROW_BATCH_ROWS)
        else:
            spark.conf.set(ARROW_BATCH_ROWS, saved)


def same_rows(a, b) -> bool:
    """Whether two DataFrames of the same columns hold the same multiset of rows (nulls equal)."""
    b = b.select(*a.columns)
    return a.exceptAll(b).isEmpty() and b.exceptAll(a).isEmpty()


def checkpoint_dir(cfg: Config) -> str:
    if cfg.spark.checkpoint_dir:
        return cfg.spark.checkpoint_dir
    from deepcuts.core.lake import lake
    return lake(cfg).spark_uri("_checkpoints")


def _encode_moments(moments: dict) -> bytes:
    import io
    import numpy as np
    buf = io.BytesIO()
    np.savez(buf, **moments)
    return buf.getvalue()


def _decode_moments(blob: bytes) -> dict:
    import io
    import numpy as np
    with np.load(io.BytesIO(blob)) as data:
        return {k: data[k] for k in data.files}


def add_moments(x: dict, y: dict) -> dict:
    """The sum of two partials of the same keys (disjoint row sets add up)."""
    return {key: x[key] + y[key] for key in x}


MOMENT_CHUNK_BYTES = 8 << 20   # a partial crosses the JVM as rows of at most this many bytes


def sum_moments(df, partial) -> dict | None:
    """Sum ``partial(pandas batch) -> dict of arrays`` (e.g. ``cf.baseline.cross_moments``) over
    every row of ``df``: one partial per partition, added pairwise on the executors
    (``treeAggregate``), so the driver receives one sum, never the rows.  None for no rows.

    A partial can be large (d x d doubles: 174 MB at d = 4,658), so it leaves the pandas
    worker in ``MOMENT_CHUNK_BYTES`` rows tagged with the partition's own token and is joined
    again in the Python worker that reduces: the JVM never pickles one huge value (a 174 MB
    row did not fit a 4 GB driver heap in local mode).  The rows are computed once (no
    ``isEmpty`` probe that would run a partition's forward pass twice)."""
    import uuid

    import pandas as pd

    def per_partition(batches):
        python_worker_setup()
        total = None
        for batch in batches:
            if len(batch):
                got = partial(batch)
                total = got if total is None else add_moments(total, got)
        if total is not None:
            blob, token = _encode_moments(total), uuid.uuid4().hex
            for start in range(0, len(blob), MOMENT_CHUNK_BYTES):
                yield pd.DataFrame({"part": [token], "chunk": [blob[start:start + MOMENT_CHUNK_BYTES]]})

    def join_partials(rows):
        chunks: dict[str, list[bytes]] = {}
        for row in rows:                   # one partition's chunks arrive in order
            chunks.setdefault(row["part"], []).append(bytes(row["chunk"]))
        total = None
        for pieces in chunks.values():
            total = combine(total, _decode_moments(b"".join(pieces)))
        if total is not None:
            yield total

    def combine(x, y):
        return y if x is None else x if y is None else add_moments(x, y)

    parts = df.mapInPandas(per_partition, "part string, chunk binary").rdd.mapPartitions(join_partials)
    return parts.treeAggregate(None, combine, combine, depth=2)
