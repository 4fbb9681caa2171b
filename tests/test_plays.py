"""Validation of play rows, canonical ids, the confidence transform, dense indices."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepcuts.cf import plays as P


def _validated(spark, rows, columns=("user_id", "track_id", "plays"), plays_format="aggregated"):
    """``validate_plays`` over text rows, as a list of dicts in input order."""
    frame = spark.createDataFrame([(i, *r) for i, r in enumerate(rows)],
                                  ", ".join(["_row long"] + [f"{c} string" for c in columns]))
    out = P.validate_plays(frame.select(*columns, "_row"), plays_format).toPandas()
    return out.to_dict("records")


@pytest.mark.spark
def test_every_reason_code_of_an_aggregated_row(spark):
    rows = [("u1", "t1", "3"), (None, "t1", "1"), ("  ", "t1", "1"), ("u2", "", "1"), ("u3", "t1", None),
            ("u4", "t1", "abc"), ("u5", "t1", "NaN"), ("u6", "t1", "-2"), ("u7", "t1", "0"),
            ("u8", "t1", "Infinity"), ("u9", "t1", " "), (" u10 ", "t2", "2.5"), ("u11", "t1", "1e999"),
            ("u12", "t1", "1d"), ("u13", "t1", "0x1p3"), ("u14", "t1", "-0"), ("\u00a0u15\t", "t1", " 4e1 "),
            ("u16", "t1", "-inf"), ("u17", "t1", ".5")]
    out = _validated(spark, rows)
    assert [r["reason"] for r in out] == [
        None, P.NULL_USER_ID, P.NULL_USER_ID, P.NULL_TRACK_ID, P.NULL_PLAYS, P.NON_NUMERIC_PLAYS,
        P.NON_FINITE_PLAYS, P.NEGATIVE_PLAYS, P.ZERO_PLAYS, P.NON_FINITE_PLAYS, P.NULL_PLAYS, None,
        P.NON_FINITE_PLAYS, P.NON_NUMERIC_PLAYS, P.NON_NUMERIC_PLAYS, P.ZERO_PLAYS, None,
        P.NON_FINITE_PLAYS, None]
    assert out[0]["plays"] == 3.0 and out[11]["plays"] == 2.5 and out[16]["plays"] == 40.0
    assert out[11]["user_id"] == "u10" and out[16]["user_id"] == "u15"   # Unicode white space too
    assert sum(pd.isna(r["plays"]) for r in out) == 15 == sum(r["reason"] is not None for r in out)   # no count
    assert out[5]["plays_text"] == "abc" and out[16]["plays_text"] == " 4e1 "     # the text as read, for plays_rejects


@pytest.mark.spark
def test_first_failing_check_names_the_row(spark):
    assert [r["reason"] for r in _validated(spark, [(None, None, "-1"), ("u", None, "-1")])] == [
        P.NULL_USER_ID, P.NULL_TRACK_ID]


@pytest.mark.spark
def test_numeric_input_nan_count_is_not_a_missing_count(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "plays.parquet"     # pyarrow, not pandas: pandas would store the NaN as a null
    pq.write_table(pa.table({"user_id": [1, 2], "track_id": [5, 6], "plays": pa.array([float("nan"), 4.0])}), path)
    out = P.validate_plays(P.read_raw_plays(spark, str(path), "aggregated"), "aggregated").toPandas()
    assert out["reason"].tolist() == [P.NON_FINITE_PLAYS, None] and out["plays"].tolist()[1] == 4.0


@pytest.mark.spark
def test_events_count_one_play_per_row_and_still_check_ids(spark):
    out = _validated(spark, [("a", "x"), ("a", "x"), (None, "y")], columns=("user_id", "track_id"),
                     plays_format="events")
    assert [r["reason"] for r in out] == [None, None, P.NULL_USER_ID]
    assert [r["plays"] for r in out][:2] == [1.0, 1.0]


@pytest.mark.spark
def test_canonical_ids_of_any_type(spark, tmp_path):
    """Ids through read_raw_plays + validate_plays: integral numbers as plain integers."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({
        "user_id": pa.array([123, 2 ** 62, 7, 8, 9, 10, 11, 12, 13], pa.int64()),
        "track_id": pa.array([7.0, 7.5, 1e15, float("nan"), None, -3.0, 2.0, 3.0, 4.0], pa.float64()),
        "plays": pa.array(["1"] * 9)}), path)
    out = P.validate_plays(P.read_raw_plays(spark, str(path), "aggregated"), "aggregated").toPandas()
    assert out["user_id"].tolist() == ["123", str(2 ** 62), "7", "8", "9", "10", "11", "12", "13"]
    assert out["track_id"].tolist()[:6] == ["7", "7.5", "1000000000000000", None, None, "-3"]
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"user_id": pa.array([" abc ", "", None, "x"]),
                             "track_id": pa.array([b"xy", b"z", b"w", b"  "], pa.binary()),
                             "plays": pa.array([1, 2, 3, 4], pa.int32())}), text)
    out = P.validate_plays(P.read_raw_plays(spark, str(text), "aggregated"), "aggregated").toPandas()
    assert out["user_id"].tolist() == ["abc", None, None, "x"]
    assert out["track_id"].tolist() == ["xy", "z", "w", None]
    assert out["reason"].tolist() == [None, P.NULL_USER_ID, P.NULL_USER_ID, P.NULL_TRACK_ID]


def test_confidence_is_the_papers():
    plays = np.array([1.0, 3.0, 100.0])
    assert P.confidence_rating(plays, 1.0) == pytest.approx(np.log(1 + plays))
    assert P.confidence(plays, alpha=2.0, epsilon=0.5) == pytest.approx(1 + 2.0 * np.log(1 + plays / 0.5))
    # every played pair must stay a positive preference for Spark (rating > 0), even one play
    assert (P.confidence_rating(np.array([1e-3, 1.0]), 10.0) > 0).all()


def test_list_plays_files(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/p1.parquet", "a/p2.csv", "a/_SUCCESS", "a/.p3.parquet.crc", "a/notes.txt"):
        (tmp_path / name).write_text("x")
    assert [f.rsplit("/", 1)[1] for f in P.list_plays_files(str(tmp_path / "a"))] == ["p1.parquet", "p2.csv"]
    assert P.list_plays_files(str(tmp_path / "a" / "p2.csv")) == ["file://" + str(tmp_path / "a" / "p2.csv")]
    with pytest.raises(FileNotFoundError):
        P.list_plays_files(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        P.list_plays_files(str(tmp_path / "a" / "notes.txt"))


@pytest.mark.spark
def test_csv_and_parquet_read_validate_and_index_round_trip(spark, tmp_path):
    folder = tmp_path / "plays"
    folder.mkdir()
    (folder / "part1.csv").write_text(
        "user_id,track_id,plays\n"
        "u1,100,3\n"
        "u1,100,2\n"           # duplicate pair: summed
        "u2,200,abc\n"
        ",200,1\n"
        "u3,300,-1\n")
    pd.DataFrame({"user_id": ["u2", "u4"], "track_id": [200.0, 400.0], "plays": [4, 0]}) \
        .to_parquet(folder / "part2.parquet")
    raw = P.read_raw_plays(spark, str(folder), "aggregated")
    validated = P.validate_plays(raw, "aggregated").toPandas()
    reasons = validated["reason"].fillna("ok").value_counts().to_dict()
    assert reasons == {"ok": 3, P.NON_NUMERIC_PLAYS: 1, P.NULL_USER_ID: 1, P.NEGATIVE_PLAYS: 1,
                       P.ZERO_PLAYS: 1}
    assert set(validated["track_id"].dropna()) == {"100", "200", "300", "400"}   # 200.0 -> "200"

    usable = P.validate_plays(raw, "aggregated").where("reason is null")
    pairs = P.aggregate_pairs(usable)
    assert sorted(map(tuple, pairs.toPandas()[["user_id", "track_id", "plays"]].values.tolist())) == [
        ("u1", "100", 5.0), ("u2", "200", 4.0)]

    ids = spark.createDataFrame([(f"user-{i}",) for i in range(50)] * 2, "user_id string").repartition(3)
    index = P.dense_index(ids, "user_id", "user_idx").toPandas()
    assert sorted(index["user_idx"]) == list(range(50))
    assert sorted(index["user_id"]) == sorted(f"user-{i}" for i in range(50))


@pytest.mark.spark
def test_missing_required_column_is_an_error_not_a_reject(spark, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("user,track_id,plays\nu1,t1,1\n")
    with pytest.raises(ValueError, match="lack columns"):
        P.read_raw_plays(spark, str(path), "aggregated")
