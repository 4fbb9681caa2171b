"""Shared fixtures: one local Spark session for the whole run, configs rooted in tmp folders,
and one small generated demo catalogue that the stage tests share."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
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
    # The stage tests exercise the CNN's training loop (epochs, resume, processes, faults); the
    # default (train.model = "auto": ridge at this size) runs in test_ridge.py.
    "train.model": "cnn",
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


# The small demo through every nightly stage, once per session: the chain tests of train,
# baseline/evaluate and neighbours read it (a chain costs minutes on 2 cores; each module
# running its own was most of the suite's time).  A test that changes tables works on a copy
# (``copy_chain``).
CHAIN_SETTINGS = {
    **SMALL_DEMO,
    "train.conv_channels": [24, 24, 24], "train.dense_units": 48, "train.dropout": 0.1, "train.epochs": 8,
    "train.batch_size": 16, "train.learning_rate": 0.003, "train.patience": 4, "train.rows_per_row_group": 16,
    "train.shuffle_buffer_rows": 64, "train.validation_fraction": 0.15, "train.loader_workers": 1,
    "factors.rank": 16, "factors.iterations": 6,
    # the small demo's ~60 fit tracks: a codebook of 64 words, K-means on 3k frames
    "baseline.codebook_size": 64, "baseline.kmeans_frames_per_track": 50, "baseline.kmeans_iterations": 15,
    # several candidate and user blocks even on the small demo (the multi-block path)
    "evaluate.candidates_per_block": 12, "evaluate.users_per_task": 100,
    "neighbours.top_n": 10,
    # the sparse-warm test split only: its validation half (where infer.blend_prior_strength is
    # chosen, bench/blend_prior.py) would double the chain's added evaluation time
    "evaluate.splits": ["cold", "validation", "sparse_warm"],
}


@dataclass
class DemoChain:
    cfg: Config
    root: Path
    settings: dict              # every setting that differs from conf/ (for CLI --set)
    summaries: dict             # stage -> its summary


@pytest.fixture(scope="session")
def demo_chain(spark, demo_root, tmp_path_factory) -> DemoChain:
    """ingest -> factors -> train -> baseline -> infer -> evaluate -> neighbours on the small
    demo catalogue, in the shared session, exactly as the nightly job runs them."""
    from deepcuts.core.registry import NIGHTLY
    root = tmp_path_factory.mktemp("demo-chain")
    settings = {**CHAIN_SETTINGS, "ingest.source": str(demo_root / "demo" / "catalogue" / "manifest.csv"),
                "factors.plays": str(demo_root / "demo" / "plays.parquet"),
                "demo.out_dir": str(demo_root / "demo"), "warehouse.root": str(root / "warehouse"),
                "spark.checkpoint_dir": str(root / "checkpoints")}
    cfg = make_config(root).replace(**settings)
    summaries = {name: run_stage(spark, cfg, name) for name in NIGHTLY}
    return DemoChain(cfg, root, settings, summaries)


def copy_chain(chain: DemoChain, dest: Path) -> DemoChain:
    """A private copy of the chain's warehouse (Delta tables are self-contained folders)."""
    import shutil
    shutil.copytree(chain.root / "warehouse", dest / "warehouse")
    settings = {**chain.settings, "warehouse.root": str(dest / "warehouse"),
                "spark.checkpoint_dir": str(dest / "checkpoints")}
    return DemoChain(chain.cfg.replace(**{k: settings[k] for k in ("warehouse.root", "spark.checkpoint_dir")}),
                     dest, settings, chain.summaries)


@pytest.fixture
def small_config(tmp_path, demo_root) -> Config:
    """Config whose inputs are the shared demo catalogue and whose warehouse is fresh."""
    cfg = make_config(tmp_path, **SMALL_DEMO)
    return cfg.replace(**{
        "ingest.source": str(demo_root / "demo" / "catalogue" / "manifest.csv"),
        "factors.plays": str(demo_root / "demo" / "plays.parquet"),
        "demo.out_dir": str(demo_root / "demo"),
    })


def cli_args(settings: dict) -> list[str]:
    """``--set key=value`` for each setting, as an operator would type them (lists as TOML)."""
    import json
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, (list, bool)) else value}"]
    return args


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts: moto, a Spark master)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real HTTP S3 endpoint on loopback (moto's server, in its own process: delta-rs and
    pyarrow in this process block on it while holding the GIL, which a server thread here
    would need to answer); boto3, pyarrow, delta-rs and Spark reach it through the standard
    AWS chain: AWS_ENDPOINT_URL and dummy credentials in the environment."""
    import socket
    import subprocess
    import time
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    # A secret no log line could contain by chance: the S3 tier greps every log for it.
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIADEEPCUTSTEST",
           "AWS_SECRET_ACCESS_KEY": "dc-secret-" + os.urandom(8).hex(), "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.terminate()
    server.wait(timeout=30)


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
