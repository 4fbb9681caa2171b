"""The factors stage end to end on a small matrix with planted taste groups."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from conftest import make_config, run_stage, stage_context, write_arrow
from deepcuts.cf import plays as P
from deepcuts.cf.plays import rating_column
from deepcuts.core.lake import lake
from deepcuts.core.tables import (EVAL_HOLDOUT, EVALUATION_RESULTS, MELS, PLAYS_REJECTS, TRACK_FACTORS,
                             UPPER_BOUND_FACTORS, USER_FACTORS, USER_INDEX)
from deepcuts.core.lake import read_pandas
from deepcuts.core.runs import run_summary
from deepcuts.core.spark import partitions_for_bytes
from deepcuts.nn import trainset
from deepcuts.nn.trainset import WPE_ROW_OVERHEAD_BYTES, wpe_partitions

N_USERS, N_TRACKS, N_GROUPS = 240, 96, 4
TRACK_ID_BASE = 10 ** 12          # 64-bit integer track ids: exercise the id mapping


def track_id(t: int) -> int:
    return TRACK_ID_BASE + 7 * t


def planted_plays(seed: int = 0) -> pd.DataFrame:
    """Users and tracks in taste groups: 90% of a user's plays are of their group's tracks.
    Two extra tracks have a single listener each (below min_track_listeners = 2)."""
    rng = np.random.default_rng(seed)
    user_group = np.arange(N_USERS) % N_GROUPS
    track_group = np.arange(N_TRACKS) % N_GROUPS
    rows = []
    for u in range(N_USERS):
        own = np.flatnonzero(track_group == user_group[u])
        other = np.flatnonzero(track_group != user_group[u])
        for t in np.concatenate([rng.choice(own, 14, replace=False), rng.choice(other, 2, replace=False)]):
            rows.append((f"user-{u}", track_id(int(t)), int(1 + rng.poisson(3))))
    rows += [("user-0", track_id(N_TRACKS), 2), ("user-1", track_id(N_TRACKS + 1), 1)]
    return pd.DataFrame(rows, columns=["user_id", "track_id", "plays"])


BAD_ROWS_CSV = (
    "user_id,track_id,plays\n"
    f",{track_id(0)},1\n"                  # null_user_id
    "user-1,,1\n"                          # null_track_id
    f"user-1,{track_id(1)},\n"             # null_plays
    f"user-1,{track_id(1)},lots\n"         # non_numeric_plays
    f"user-1,{track_id(1)},NaN\n"          # non_finite_plays
    f"user-1,{track_id(1)},-4\n"           # negative_plays
    f"user-1,{track_id(1)},0\n"            # zero_plays
    "user-1,999,5\n"                       # unknown_track (not in mels)
)


def commit_mels(cfg, track_ids) -> None:
    """A committed `mels` table listing ``track_ids`` (the unknown-track check reads only ids)."""
    n = len(track_ids)
    write_arrow(cfg, MELS, pa.table({
        "track_id": [str(t) for t in track_ids], "mel": [b"\x00\x00"] * n, "n_mels": [1] * n,
        "n_frames": [1] * n, "sample_rate": [22050] * n, "hop_length": [512] * n,
        "excerpt_offset_s": [0.0] * n, "duration_s": [1.0] * n, "fingerprint": ["f"] * n,
        "source_uri": ["x"] * n, "source_size": [1] * n, "source_version": ["1"] * n,
        "labels": pa.nulls(n, pa.string()), "ingest_run_id": ["test"] * n}))


def group_auc(user_factors: pd.DataFrame, track_factors: pd.DataFrame) -> float:
    """Mean over users of the AUC of own-group vs other-group tracks, from the published tables
    (checks that original ids come back attached to the right vectors)."""
    tracks = track_factors[track_factors["track_id"].str.len() > 3]
    t_group = ((tracks["track_id"].astype(np.int64) - TRACK_ID_BASE) // 7) % N_GROUPS
    T = np.stack(tracks["factors"].to_numpy())
    aucs = []
    for uid, vec in zip(user_factors["user_id"], user_factors["factors"]):
        scores = T @ np.asarray(vec)
        own = (t_group == int(uid.split("-")[1]) % N_GROUPS).to_numpy()
        aucs.append(((scores[own][:, None] > scores[~own][None, :]).mean()))
    return float(np.mean(aucs))


def _cold_upper_bound_and_random(spark, wh, cfg):
    """The upper bound (its own user and track vectors) and random vectors on the cold tracks."""
    from pyspark.sql import functions as F
    from deepcuts.core.lake import read_table
    from deepcuts.evaluation import runner
    holdout = read_table(spark, wh, EVAL_HOLDOUT)
    users = read_table(spark, wh, USER_FACTORS).select("user_id", "factors")
    ub = read_table(spark, wh, UPPER_BOUND_FACTORS)
    assert {r[0] for r in ub.select("entity").distinct().collect()} == {"user", "track"}
    pop = runner.build_population(holdout, holdout.select("track_id"), users, split="cold", max_users=0, seed=0,
                                  users_per_task=100, candidates_per_block=1000)
    try:
        side = lambda e, col: ub.where(F.col("entity") == e).select(F.col("entity_id").alias(col), "factors")  # noqa: E731
        scratch = wh.path("_scratch", "test")
        return (runner.evaluate_predictor(pop, side("user", "user_id"), side("track", "track_id"),
                                          predictor="upper_bound", k=cfg.factors.eval_k, scratch=scratch),
                runner.evaluate_predictor(pop, users, runner.random_track_vectors(pop.candidates, cfg.factors.rank, 0),
                                          predictor="random", k=cfg.factors.eval_k, scratch=scratch))
    finally:
        pop.release()


@pytest.fixture
def factors_config(tmp_path):
    folder = tmp_path / "plays"
    folder.mkdir()
    planted_plays().to_parquet(folder / "planted.parquet")
    (folder / "bad.csv").write_text(BAD_ROWS_CSV)
    return make_config(tmp_path, factors__plays=str(folder), factors__rank=8, factors__iterations=8,
                       factors__reg=0.05, factors__eval_k=50, factors__min_track_listeners=2,
                       factors__unknown_tracks="reject", factors__cold_fraction=0.25,
                       factors__sparse_warm_fraction=0.0,   # the sparse-warm protocol: tests/test_blend.py
                       spark__shuffle_partitions=4)


@pytest.mark.spark
def test_rating_column_is_the_pure_transform(spark):
    df = spark.createDataFrame([(1.0,), (3.0,), (250.0,)], "plays double")
    got = [r[0] for r in df.select(rating_column(df["plays"], 2.0)).collect()]
    assert got == pytest.approx(P.confidence_rating(np.array([1.0, 3.0, 250.0]), 2.0).tolist())


@pytest.mark.spark
@pytest.mark.slow
def test_factors_stage_evaluates_rejects_and_reruns_idempotently(spark, factors_config, monkeypatch):
    cfg = factors_config
    wh = lake(cfg)
    commit_mels(cfg, [track_id(t) for t in range(N_TRACKS + 2)])

    summary = run_stage(spark, cfg, "factors")

    # every reason code once, counted in the summary and kept (as text) in plays_rejects
    expected = {r: 1 for r in P.REASONS}
    assert summary["rejected_rows"] == expected
    rejects = read_pandas(wh, PLAYS_REJECTS.name)
    assert rejects["reason"].value_counts().to_dict() == expected
    assert rejects.loc[rejects["reason"] == P.NON_NUMERIC_PLAYS, "plays"].tolist() == ["lots"]

    # the paper's protocol: the warm CF check in evaluation_results; the upper bound's fit (all
    # plays) in upper_bound_factors, far above random on the cold tracks (the evaluate stage's runner)
    metrics = read_pandas(wh, EVALUATION_RESULTS.name).set_index(["split", "predictor"])
    assert sorted(metrics.index) == [("warm", "als"), ("warm", "random")]
    warm = metrics.loc[("warm", "als")]
    assert warm["auc"] > 0.8 and warm["auc"] > metrics.loc[("warm", "random")]["auc"] + 0.25
    ub, rnd = _cold_upper_bound_and_random(spark, wh, cfg)
    assert ub["auc"] > 0.85 and 0.3 < rnd["auc"] < 0.7
    assert ub["map_at_k"] > rnd["map_at_k"] + 0.25
    assert ub["n_users"] > 0.9 * N_USERS and ub["n_users"] == rnd["n_users"]

    # cold tracks: hidden from the published fit, their plays in eval_holdout
    holdout = read_pandas(wh, EVAL_HOLDOUT.name)
    tracks = read_pandas(wh, TRACK_FACTORS.name)
    users = read_pandas(wh, USER_FACTORS.name)
    cold = set(holdout["track_id"])
    assert summary["cold_tracks"] == len(cold) and 10 < len(cold) < 40
    assert not cold & set(tracks["track_id"])
    assert (holdout["split"] == "cold").all() and len(holdout) == summary["cold_pairs"]
    # original ids; single-listener tracks get no factors; unit copy is unit length
    assert str(track_id(N_TRACKS)) not in set(tracks["track_id"])
    assert summary["tracks_below_min_listeners"] >= 1
    assert set(tracks["track_id"]) <= {str(track_id(t)) for t in range(N_TRACKS)}
    norms = np.linalg.norm(np.stack(tracks["factors_unit"].to_numpy()), axis=1)
    assert norms == pytest.approx(np.ones(len(tracks)), abs=1e-5)
    assert group_auc(users, tracks) > 0.9
    assert users["n_tracks"].sum() + len(holdout) == summary["pairs"]

    # the train stage's WPE listener shuffle is sized from this run's pair count, read back
    # from the manifest; 10^9 pairs of rank 32 get ~1,300 partitions of <= 128 MB, not 16
    assert run_summary(wh, summary["run_id"])["pairs"] == summary["pairs"]
    assert run_summary(wh, "no-such-run") == {}
    monkeypatch.setattr(trainset, "WPE_ROW_OVERHEAD_BYTES", 1 << 20)    # rows of ~1 MB: a few thousand partitions
    small = cfg.replace(**{"spark.shuffle_partitions": 1, "spark.partition_mb": 1})
    assert (wpe_partitions(stage_context(spark, small, "train"), cfg.factors.rank)
            == -(-summary["pairs"] * (4 * cfg.factors.rank + (1 << 20)) // (1 << 20)) > summary["pairs"])
    assert partitions_for_bytes(10 ** 9 * (4 * 32 + WPE_ROW_OVERHEAD_BYTES), cfg) == 1312
    assert partitions_for_bytes(0, cfg) == cfg.spark.shuffle_partitions

    # a re-run (production mode) replaces every table: no duplicates, nothing held out
    summary2 = run_stage(spark, cfg.replace(**{"factors.evaluate": False}), "factors")
    users2 = read_pandas(wh, USER_FACTORS.name)
    tracks2 = read_pandas(wh, TRACK_FACTORS.name)
    assert users2["user_id"].is_unique and len(users2) == N_USERS
    assert tracks2["track_id"].is_unique and cold <= set(tracks2["track_id"])
    assert set(tracks2["run_id"]) == {summary2["run_id"]}
    assert len(read_pandas(wh, EVAL_HOLDOUT.name)) == 0
    assert len(read_pandas(wh, PLAYS_REJECTS.name)) == len(P.REASONS)
    assert len(read_pandas(wh, USER_INDEX.name)) == N_USERS
    assert summary2["rejected_rows"] == expected
    assert group_auc(users2, tracks2) > 0.9
    assert len(read_pandas(wh, EVALUATION_RESULTS.name)) == 2      # history kept, not re-evaluated
    assert len(read_pandas(wh, UPPER_BOUND_FACTORS.name)) == 0     # no stale upper bound


@pytest.mark.spark
def test_unknown_track_check_without_mels_keeps_and_says_so(spark, tmp_path):
    plays_file = tmp_path / "plays.csv"
    plays_file.write_text("user_id,track_id\n" + "".join(
        f"u{u},t{(u + i) % 12}\n" for u in range(30) for i in range(4)) + "u1,t1\n")
    cfg = make_config(tmp_path, factors__plays=str(plays_file), factors__plays_format="events",
                      factors__unknown_tracks="reject", factors__evaluate=False, factors__rank=4,
                      factors__iterations=2, spark__shuffle_partitions=2)
    summary = run_stage(spark, cfg, "factors")
    assert summary["unknown_tracks"].startswith("KEPT")
    assert summary["rejected_rows"] == {}
    assert summary["pairs"] == 120 and summary["input_rows"] == 121
    users = read_pandas(lake(cfg), USER_FACTORS.name).set_index("user_id")
    assert users.loc["u1", "n_plays"] == 5 and users.loc["u1", "n_tracks"] == 4
