"""Shared fixtures: one local Spark session for the whole run, configs rooted in tmp folders,
and one small generated demo catalogue that the stage tests share."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from deepcuts.config import Config, load_config  # noqa: E402

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
    from deepcuts.sparkio import get_session
    cfg = make_config(tmp_path_factory.mktemp("spark"), **SMALL_DEMO)
    session = get_session(cfg, "deepcuts-tests", master="local[2]")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo catalogue + play counts generated once per test session."""
    from deepcuts.demo import generate
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
