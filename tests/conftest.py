"""Shared fixtures: one local Spark session for the whole run, configs rooted in tmp folders,
and one small generated demo catalogue that the stage tests share."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from deepcuts.core.config import Config, load_config  # noqa: E402

# Small enough for 2 CI cores, big enough that learnt factors carry the styles.
SMALL_DEMO = {
    "demo.n_tracks": 96, "demo.n_users": 600, "demo.n_styles": 4,
    "demo.min_seconds": 6.0, "demo.max_seconds": 9.0, "demo.mean_plays_per_user": 40.0,
    "ingest.excerpt_seconds": 8.0, "ingest.rows_per_row_group": 16, "ingest.partitions": 4,
    "spark.shuffle_partitions": 4,
}


def make_config(root: Path, **overrides) -> Config:
    """The conf/ defaults with every path under ``root`` (never the checkout's folders)."""
    base = {
        "warehouse.root": str(root / "warehouse"),
        "demo.out_dir": str(root / "demo"),
        "ingest.source": str(root / "demo" / "catalogue" / "manifest.csv"),
        "factors.plays": str(root / "demo" / "plays.parquet"),
        "spark.checkpoint_dir": str(root / "checkpoints"),
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(overrides=base)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from deepcuts.core.spark import get_session
    cfg = make_config(tmp_path_factory.mktemp("spark"), **SMALL_DEMO)
    session = get_session(cfg, "deepcuts-tests", master="local[2]")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo catalogue + play counts generated once per test session."""
    from deepcuts.demo.generate import generate
    root = tmp_path_factory.mktemp("demo-shared")
    generate(make_config(root, **SMALL_DEMO).demo)
    return root


@pytest.fixture
def small_config(tmp_path, demo_root) -> Config:
    """Config whose inputs are the shared demo catalogue and whose warehouse is fresh."""
    cfg = make_config(tmp_path, **SMALL_DEMO)
    return cfg.replace(**{
        "ingest.source": str(demo_root / "demo" / "catalogue" / "manifest.csv"),
        "factors.plays": str(demo_root / "demo" / "plays.parquet"),
        "demo.out_dir": str(demo_root / "demo"),
    })


@pytest.fixture(scope="session")
def s3_server():
    """A real HTTP S3 endpoint on loopback (moto); boto3 reaches it through the standard
    AWS chain: AWS_ENDPOINT_URL and dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    import uuid
    from deepcuts.audio.catalogue import s3_client
    client = s3_client()
    bucket = f"test-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


# --- the table layer, as the stages use it -----------------------------------------------
def run_stage(spark, cfg: Config, name: str) -> dict:
    """Run a registered stage exactly as a job does: its context, manifest and maintenance."""
    from deepcuts.core.cli import run_stage as run
    return run(spark, cfg, name)


def stage_context(spark, cfg: Config, name: str, run_id: str = "test-run"):
    """The context a stage function gets, for calling its parts directly."""
    from deepcuts.core.registry import STAGES
    from deepcuts.core.runs import StageRun
    return StageRun(spark, cfg, STAGES[name], run_id)


def write_rows(spark, cfg: Config, table, rows, run_id: str = "test"):
    """Commit ``rows`` (a Spark or pandas DataFrame) as ``table``, overwriting it."""
    from deepcuts.core.lake import lake, write_table
    from deepcuts.core.tables import spark_schema
    if not hasattr(rows, "sparkSession"):
        # Columns the test leaves out (nullable ones added later to the schema) are null.
        rows = rows.reindex(columns=table.columns).astype(object).where(rows.reindex(columns=table.columns).notna(), None)
        rows = spark.createDataFrame(rows, schema=spark_schema(table))
    df = rows
    return write_table(df, lake(cfg), table, run_id)


def write_arrow(cfg: Config, table, parts, *, row_group_rows: int | None = None) -> int:
    """Commit pyarrow Tables as ``table`` without Spark (delta-rs): each part becomes one data
    file (an overwrite, then appends), with row groups of ``row_group_rows`` rows (as the
    ingest job sizes mels).  Returns the table's version."""
    from deltalake import WriterProperties, write_deltalake
    from deepcuts.core.lake import lake
    lk = lake(cfg)
    props = WriterProperties(max_row_group_size=row_group_rows) if row_group_rows else None
    import pyarrow as pa
    for n, part in enumerate(parts if isinstance(parts, (list, tuple)) else [parts]):
        # Columns the test leaves out (nullable ones added later to the schema) are null.
        columns = [part.column(f.name).cast(f.type) if f.name in part.column_names else pa.nulls(part.num_rows, f.type)
                   for f in table.schema]
        write_deltalake(lk.table_path(table.name), pa.Table.from_arrays(columns, schema=table.schema),
                        mode="overwrite" if n == 0 else "append", writer_properties=props)
    return lk.version(table.name)
