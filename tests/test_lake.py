"""The Delta table layer: commits, merges, concurrent writers, a killed driver, pinned reads
through the run manifest, and the same rows from Spark, pandas, DuckDB and Spark SQL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pandas as pd
import pytest

from conftest import make_config, run_stage, stage_context
from deepcuts.core import lake as lakeio
from deepcuts.core.lake import Lake, TableConflict, lake, read_pandas
from deepcuts.core.runs import SUCCEEDED
from deepcuts.core.tables import INGEST_REJECTS, MELS, TRACK_INDEX

pytestmark = pytest.mark.spark


def index_rows(spark, ids, offset=0):
    return spark.createDataFrame([(str(t), i + offset) for i, t in enumerate(ids)], "track_id string, track_idx int")


# --- pure -------------------------------------------------------------------------------
def test_vacuum_is_due_only_past_the_retention_window_and_the_interval():
    hour = 3600 * 1000
    history = [{"timestamp": 0, "operation": "WRITE"}]
    assert not lakeio.vacuum_due(history, 100 * hour, retention_hours=168, interval_hours=24)
    assert lakeio.vacuum_due(history, 200 * hour, retention_hours=168, interval_hours=24)
    history.append({"timestamp": 190 * hour, "operation": "VACUUM END"})
    assert not lakeio.vacuum_due(history, 200 * hour, retention_hours=168, interval_hours=24)
    assert lakeio.vacuum_due(history, 215 * hour, retention_hours=168, interval_hours=24)
    assert not lakeio.vacuum_due([], 1e12, 0, 0)


def test_user_metadata_round_trip_and_legacy_text():
    text = lakeio.user_metadata("run-1", {"training_set": {"fingerprint": "ab"}})
    assert lakeio.parse_user_metadata(text) == {"run_id": "run-1", "training_set": {"fingerprint": "ab"}}
    assert lakeio.parse_user_metadata("plain-run-id") == {"run_id": "plain-run-id"}
    assert lakeio.parse_user_metadata(None) == {}


def test_paths_for_each_engine():
    s3 = Lake("s3a://bucket/prefix/")
    assert s3.path("mels") == "s3://bucket/prefix/mels" and s3.spark_uri("mels") == "s3a://bucket/prefix/mels"
    local = Lake("relative/wh")
    assert local.path("mels") == os.path.abspath("relative/wh/mels") == local.spark_uri("mels")


# --- Spark ------------------------------------------------------------------------------
def test_overwrite_merge_and_delete_are_single_commits(spark, tmp_path):
    lk = Lake(str(tmp_path / "wh"))
    first = lakeio.write_table(index_rows(spark, range(10)), lk, TRACK_INDEX, "run-a")
    assert (first.version, first.rows) == (0, 10)
    merged = lakeio.merge_table(spark, lk, TRACK_INDEX, "run-b", index_rows(spark, [8, 9, 10, 11], offset=100),
                                deletes=spark.createDataFrame([("0",), ("1",), ("9",)], "track_id string"))
    assert (merged.version, merged.rows) == (1, 10)      # 10 - 2 deleted + 2 new; 9 upserted, not deleted
    got = read_pandas(lk, TRACK_INDEX.name).set_index("track_id")["track_idx"].to_dict()
    assert got["8"] == 100 and got["9"] == 101 and got["11"] == 103 and "0" not in got and "1" not in got
    assert lk.commit_metadata(TRACK_INDEX.name)["run_id"] == "run-b"
    assert lk.commit_metadata(TRACK_INDEX.name, 0)["run_id"] == "run-a"
    assert len(read_pandas(lk, TRACK_INDEX.name, version=0)) == 10       # time travel
    rows, files, size = lk.file_stats(TRACK_INDEX.name)
    assert rows == 10 and files >= 1 and size > 0
    assert [d["table"] for d in lk.describe()] == [TRACK_INDEX.name]


def test_two_concurrent_merges_of_disjoint_keys_both_land(spark, tmp_path):
    """Delta's optimistic concurrency: the loser of the race gets a conflict and retries
    against the new version; no commit is lost."""
    lk = Lake(str(tmp_path / "wh"))
    lakeio.write_table(index_rows(spark, ["seed"]), lk, TRACK_INDEX, "run-0")
    errors = []

    def writer(name, ids):
        try:
            lakeio.merge_table(spark, lk, TRACK_INDEX, name, index_rows(spark, ids), retries=5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"run-{n}", [f"{n}-{i}" for i in range(20)])) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ids = set(read_pandas(lk, TRACK_INDEX.name)["track_id"])
    assert ids == {"seed"} | {f"{n}-{i}" for n in (1, 2) for i in range(20)}
    history = lk.delta(TRACK_INDEX.name).history()
    assert sorted(h["version"] for h in history) == [0, 1, 2]      # both merges committed, one each


def test_an_overwrite_that_loses_a_race_fails_loudly(spark, tmp_path, monkeypatch):
    lk = Lake(str(tmp_path / "wh"))
    lakeio.write_table(index_rows(spark, range(3)), lk, TRACK_INDEX, "run-0")
    calls = []
    real = lakeio.file_layout

    def race(*a, **k):
        # Another run commits between this writer's read of the table and its commit.
        if not calls:
            calls.append(1)
            lakeio.merge_table(spark, lk, TRACK_INDEX, "intruder", index_rows(spark, ["x"]))
        return real(*a, **k)
    monkeypatch.setattr(lakeio, "file_layout", race)
    # A plain overwrite is a blind write in Delta: it wins, and the table holds exactly its rows.
    lakeio.write_table(index_rows(spark, range(5)), lk, TRACK_INDEX, "run-1")
    assert sorted(read_pandas(lk, TRACK_INDEX.name)["track_id"]) == [str(i) for i in range(5)]
    assert lakeio.is_conflict(RuntimeError("io.delta.exceptions.ConcurrentAppendException: Files were added"))
    assert issubclass(TableConflict, RuntimeError)


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import pandas as pd
    from deepcuts.core.config import load_config
    from deepcuts.core.lake import Lake, write_table
    from deepcuts.core.spark import get_session
    from deepcuts.core.tables import TRACK_INDEX
    root, slow = sys.argv[1], sys.argv[2] == "slow"
    spark = get_session(load_config(overrides={"warehouse.root": root, "spark.checkpoint_dir": root + "-ckpt"}),
                        "killed-writer", "local[2]")
    def rows(batches):
        for b in batches:
            if slow:
                time.sleep(3)          # the first tasks' files land, the commit is far off
            yield b
    df = spark.range(0, 4000, 1, 8).selectExpr("cast(id as string) as track_id", "cast(id as int) as track_idx")
    df = df.mapInPandas(rows, df.schema)
    write_table(df, Lake(root), TRACK_INDEX, "big-run")
    print("committed")
""")


@pytest.mark.slow
def test_a_driver_killed_between_files_and_commit_leaves_the_table_unchanged(spark, tmp_path):
    root = str(tmp_path / "wh")
    lk = Lake(root)
    lakeio.write_table(index_rows(spark, range(7)), lk, TRACK_INDEX, "small-run")
    table_dir = tmp_path / "wh" / TRACK_INDEX.name
    before_files = set(os.listdir(table_dir))
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, root, "slow"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if any(f.endswith(".parquet") for f in set(os.listdir(table_dir)) - before_files):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the writer never wrote a data file")
    os.killpg(proc.pid, signal.SIGKILL)            # spark-submit and its JVM, mid-write
    proc.wait(timeout=60)
    assert lk.version(TRACK_INDEX.name) == 0
    assert sorted(read_pandas(lk, TRACK_INDEX.name)["track_id"]) == sorted(str(i) for i in range(7))
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, root, "fast"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert "committed" in done.stdout, done.stderr[-2000:]
    after = read_pandas(lk, TRACK_INDEX.name)
    assert len(after) == 4000 and after["track_id"].is_unique       # the orphan files never count


# --- the run manifest -------------------------------------------------------------------
def test_a_manifest_pins_what_readers_see(spark, tmp_path, monkeypatch):
    """A later run that commits a table but dies before its manifest stays invisible to
    pinned readers; a reader of a run's manifest sees that run's rows after later runs."""
    cfg = make_config(tmp_path)
    ctx = stage_context(spark, cfg, "ingest", "ingest-1")
    rejects = spark.createDataFrame([("t1", None, None, None, "silent", "quiet", "ingest-1")],
                                    "track_id string, source_uri string, source_size long, source_version string, "
                                    "reason string, detail string, run_id string")
    ctx.write(rejects, INGEST_REJECTS)
    ctx.record(SUCCEEDED, time.time(), {"n": 1})
    runs = read_pandas(lake(cfg), "runs")
    assert dict(runs.loc[0, "tables_written"]) == {"ingest_rejects": 0}
    assert runs.loc[0, "config_hash"] and runs.loc[0, "code_version"].startswith("0.1.0")

    later = stage_context(spark, cfg, "ingest", "ingest-2")
    from pyspark.sql import functions as F
    later.write(rejects.withColumn("track_id", F.lit("t2")), INGEST_REJECTS)
    # ... and dies: no manifest row.
    reader = stage_context(spark, cfg, "ingest", "reader")
    assert lake(cfg).version(INGEST_REJECTS.name) == 1
    assert reader.pinned_version(INGEST_REJECTS) == 0
    assert [r["track_id"] for r in reader.read(INGEST_REJECTS).collect()] == ["t1"]
    assert reader.read_versions == {INGEST_REJECTS.name: 0}
    with pytest.raises(RuntimeError, match="without declaring"):
        reader.read(TRACK_INDEX)


@pytest.mark.slow
def test_stage_runs_record_manifests_and_every_engine_reads_the_same_rows(spark, small_config):
    cfg = small_config
    summary = run_stage(spark, cfg, "ingest")
    lk = lake(cfg)
    runs = read_pandas(lk, "runs")
    row = runs[runs["run_id"] == summary["run_id"]].iloc[0]
    assert row["status"] == SUCCEEDED and row["stage"] == "ingest"
    assert dict(row["tables_written"]) == {"mels": 0, "ingest_rejects": 0, "track_metadata": 0}
    assert dict(row["rows_written"])["mels"] == summary["ingested"]

    import duckdb
    from deepcuts.core.catalog import register_tables, rewrite_time_travel
    con = duckdb.connect()
    made = lakeio.duckdb_views(con, lk)
    register_tables(spark, lk)
    for name in ("mels", "ingest_rejects", "runs"):
        assert name in made
        key = "run_id" if name == "runs" else "track_id"
        ids_pandas = sorted(read_pandas(lk, name)[key])
        ids_duck = sorted(r[0] for r in con.execute(f"select {key} from {name}").fetchall())
        ids_sql = sorted(r[0] for r in spark.sql(f"select {key} from deepcuts.{name}").collect())
        ids_spark = sorted(r[0] for r in lakeio.read_table(spark, lk, lakeio.ALL_TABLES[name]).select(key).collect())
        assert ids_pandas == ids_duck == ids_sql == ids_spark
    at_v0 = spark.sql(rewrite_time_travel("select count(*) from deepcuts.mels@v0", lk)).first()[0]
    assert at_v0 == summary["ingested"]
