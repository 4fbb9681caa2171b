import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepcuts.core.warehouse import CommitConflict, Warehouse, duckdb_views, read_pandas


def _write(wh, table, run_id, name, ids):
    folder = os.path.join(wh.root, table, "data", run_id)
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"user_id": ids, "user_idx": list(range(len(ids)))},
                            schema=pa.schema([("user_id", pa.string()), ("user_idx", pa.int32())])),
                   os.path.join(folder, name))
    return f"data/{run_id}/{name}"


def test_commit_add_remove_replace(tmp_path):
    wh = Warehouse(str(tmp_path), keep_snapshots=10)
    assert wh.snapshot("user_index") is None and wh.files("user_index") == []
    a = _write(wh, "user_index", "r1", "a.parquet", ["u1", "u2"])
    s1 = wh.commit("user_index", "r1", [a])
    assert (s1.version, s1.rows) == (1, 2)
    b = _write(wh, "user_index", "r2", "b.parquet", ["u3"])
    s2 = wh.commit("user_index", "r2", [b], removed=[a], replace=False)
    assert s2.files == (b,) and s2.rows == 1
    c = _write(wh, "user_index", "r3", "c.parquet", ["u4", "u5", "u6"])
    s3 = wh.commit("user_index", "r3", [c], replace=False)
    assert set(s3.files) == {b, c} and s3.rows == 4
    assert sorted(read_pandas(wh, "user_index")["user_id"]) == ["u3", "u4", "u5", "u6"]
    with pytest.raises(ValueError, match="cannot remove files it does not hold"):
        wh.commit("user_index", "r4", [], removed=[a], replace=False)


def test_uncommitted_files_are_invisible_and_a_stale_writer_is_refused(tmp_path):
    wh = Warehouse(str(tmp_path))
    a = _write(wh, "user_index", "r1", "a.parquet", ["u1"])
    wh.commit("user_index", "r1", [a])
    _write(wh, "user_index", "crashed", "x.parquet", ["ghost"])   # a run that died before commit
    assert list(read_pandas(wh, "user_index")["user_id"]) == ["u1"]
    with pytest.raises(CommitConflict):
        wh.commit("user_index", "r2", [], expected_version=0)


def test_vacuum_keeps_recent_snapshots_and_their_files(tmp_path):
    wh = Warehouse(str(tmp_path), keep_snapshots=2)
    files = []
    for i in range(4):
        files.append(_write(wh, "user_index", f"r{i}", "p.parquet", [f"u{i}"]))
        wh.commit("user_index", f"r{i}", [files[-1]], replace=True)
    # Data files are only vacuumed after a grace period (a running job may own them).
    deleted = wh.vacuum("user_index", now=10**12)
    assert sorted(deleted) == sorted(files[:2])
    assert len(os.listdir(tmp_path / "user_index" / "_snapshots")) == 2
    assert list(read_pandas(wh, "user_index")["user_id"]) == ["u3"]


def test_duckdb_views_query_the_committed_version(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    wh = Warehouse(str(tmp_path))
    wh.commit("user_index", "r1", [_write(wh, "user_index", "r1", "a.parquet", ["u1", "u2"])])
    _write(wh, "user_index", "crashed", "x.parquet", ["ghost"])
    con = duckdb.connect()
    assert duckdb_views(con, wh) == ["user_index"]
    assert con.execute("select count(*) from user_index").fetchone()[0] == 2


def test_spark_file_uris_map_back_to_paths():
    from deepcuts.core.warehouse import path_from_uri
    # Spark's _metadata.file_path percent-encodes a local path.
    assert path_from_uri("file:/tmp/a%20b%25c/x%20y.parquet") == "/tmp/a b%c/x y.parquet"
    assert path_from_uri("file:///tmp/wh/t.parquet") == "/tmp/wh/t.parquet"
    assert path_from_uri("s3a://bucket/wh/mels/data/r/part-0.parquet") == "s3://bucket/wh/mels/data/r/part-0.parquet"
    assert path_from_uri("s3://bucket/k") == "s3://bucket/k" and path_from_uri("/plain/path") == "/plain/path"
