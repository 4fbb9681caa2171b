"""Validation of play rows, canonical ids, the confidence transform, dense indices."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepcuts.cf import plays as P


def test_every_reason_code_of_an_aggregated_row():
    frame = pd.DataFrame({
        "user_id": ["u1", None, "  ", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9", " u10 "],
        "track_id": ["t1", "t1", "t1", "", "t1", "t1", "t1", "t1", "t1", "t1", "t1", "t2"],
        "plays": ["3", "1", "1", "1", None, "abc", "NaN", "-2", "0", "Infinity", " ", "2.5"],
    })
    out = P.validate_rows(frame, "aggregated")
    assert out["reason"].tolist() == [
        None, P.NULL_USER_ID, P.NULL_USER_ID, P.NULL_TRACK_ID, P.NULL_PLAYS, P.NON_NUMERIC_PLAYS,
        P.NON_FINITE_PLAYS, P.NEGATIVE_PLAYS, P.ZERO_PLAYS, P.NON_FINITE_PLAYS, P.NULL_PLAYS, None]
    assert out.loc[0, "plays"] == 3.0 and out.loc[11, "plays"] == 2.5
    assert out.loc[11, "user_id"] == "u10"
    assert out["plays"].isna().sum() == 10           # a rejected row carries no count
    assert out.loc[5, "plays_text"] == "abc"          # the text survives for plays_rejects


def test_first_failing_check_names_the_row():
    out = P.validate_rows(pd.DataFrame({"user_id": [None], "track_id": [None], "plays": ["-1"]}),
                          "aggregated")
    assert out["reason"].tolist() == [P.NULL_USER_ID]


def test_numeric_input_nan_count_is_not_a_missing_count():
    frame = pd.DataFrame({"user_id": [1, 2], "track_id": [5, 6], "plays": [float("nan"), 4.0]})
    assert P.validate_rows(frame, "aggregated")["reason"].tolist() == [P.NON_FINITE_PLAYS, None]


def test_events_count_one_play_per_row_and_still_check_ids():
    frame = pd.DataFrame({"user_id": ["a", "a", None], "track_id": ["x", "x", "y"],
                          "timestamp": [1, 2, 3]})
    out = P.validate_rows(frame, "events")
    assert out["reason"].tolist() == [None, None, P.NULL_USER_ID]
    assert out["plays"].tolist()[:2] == [1.0, 1.0]


def test_canonical_ids_of_any_type():
    values = pd.Series([123, np.int64(2 ** 62), 7.0, 7.5, " abc ", "", None, float("nan"), b"xy"],
                       dtype=object)
    assert P.canonical_id_text(values).tolist() == [
        "123", str(2 ** 62), "7", "7.5", "abc", None, None, None, "xy"]


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
