"""The paper's metrics (hand-computed cases) and the Spark scoring of evaluate_ranking."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from deepcuts.evaluation import metrics as ev


def test_average_precision_hand_computed():
    # ranked: p(0.9) n(0.8) p(0.7) n(0.1) -> precisions at the positives: 1/1, 2/3
    scores = [0.9, 0.8, 0.7, 0.1]
    positive = [True, False, True, False]
    assert ev.average_precision_at_k(scores, positive, 500) == pytest.approx((1 + 2 / 3) / 2)
    # truncated at k=2: only the first positive counts, normalised by min(2 positives, k=2)
    assert ev.average_precision_at_k(scores, positive, 2) == pytest.approx(1 / 2)
    # k=1 and 2 positives: min(|P|, k) = 1
    assert ev.average_precision_at_k(scores, positive, 1) == pytest.approx(1.0)


def test_average_precision_order_of_candidates_does_not_matter():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=50)
    positive = rng.random(50) < 0.2
    perm = rng.permutation(50)
    assert ev.average_precision_at_k(scores, positive, 10) == pytest.approx(
        ev.average_precision_at_k(scores[perm], positive[perm], 10))


def test_auc_hand_computed():
    # positives 0.9, 0.7 vs negatives 0.8, 0.1: pairs won 2 + 1 of 4
    assert ev.auc([0.9, 0.8, 0.7, 0.1], [True, False, True, False]) == pytest.approx(3 / 4)
    assert ev.auc([3, 2, 1], [True, False, False]) == 1.0
    assert ev.auc([1, 2, 3], [True, False, False]) == 0.0


def test_ties_count_half_for_auc_and_against_the_positive_for_ap():
    scores = [1.0, 1.0, 1.0, 1.0]
    positive = [True, False, False, True]
    assert ev.auc(scores, positive) == pytest.approx(0.5)
    # both negatives tie and rank ahead: positives at ranks 3 and 4 -> (1/3 + 2/4) / 2
    assert ev.average_precision_at_k(scores, positive, 500) == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_undefined_cases_are_nan():
    assert math.isnan(ev.auc([1.0, 2.0], [True, True]))
    assert math.isnan(ev.auc([1.0, 2.0], [False, False]))
    assert math.isnan(ev.average_precision_at_k([1.0, 2.0], [False, False], 5))
    assert all(math.isnan(v) for v in ev.user_metrics(np.array([1.0]), np.array([True]), 5))


def test_auc_matches_brute_force_pairs():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores = rng.integers(0, 5, size=30).astype(float)     # many ties
        positive = rng.random(30) < 0.3
        if positive.all() or not positive.any():
            continue
        p, n = scores[positive], scores[~positive]
        brute = ((p[:, None] > n[None, :]) + 0.5 * (p[:, None] == n[None, :])).mean()
        assert ev.auc(scores, positive) == pytest.approx(brute)
        ap, area = ev.user_metrics(scores, positive, 7)
        assert area == pytest.approx(brute)
        assert ap == pytest.approx(ev.average_precision_at_k(scores, positive, 7))


def test_score_users_excludes_training_tracks_and_ignores_unknown_ids():
    tracks = pd.Index(["a", "b", "c", "d"])
    matrix = np.array([[4.0], [3.0], [2.0], [1.0]], dtype=np.float32)
    users = np.array([[1.0], [1.0]], dtype=np.float32)
    out = ev.score_users(users, matrix, tracks, positives=[["c", "zzz"], ["c"]],
                         excluded=[["a", "b"], None], k=10)
    # user 0: a, b excluded -> c first of {c, d}; user 1: c third behind a and b
    assert out["ap"].tolist() == pytest.approx([1.0, 1 / 3])
    assert out["auc"].tolist() == pytest.approx([1.0, 1 / 3])
    assert out["n_positives"].tolist() == [1, 1]
    assert out["n_candidates"].tolist() == [2, 4]
    assert out["n_positives_without_vector"].tolist() == [1, 0]


@pytest.mark.spark
def test_evaluate_cold_start_in_spark_matches_numpy(spark):
    rng = np.random.default_rng(3)
    n_users, n_tracks, rank = 40, 30, 4
    users = rng.normal(size=(n_users, rank)).astype(np.float32)
    tracks = rng.normal(size=(n_tracks, rank)).astype(np.float32)
    scores = users @ tracks.T
    # each user's positives: their 5 best tracks + 2 random ones (so AUC is high but not 1)
    positives = {u: set(np.argsort(-scores[u])[:5]) | set(rng.choice(n_tracks, 2)) for u in range(n_users)}
    user_df = spark.createDataFrame([(f"u{u}", users[u].tolist()) for u in range(n_users)],
                                    "user_id string, factors array<float>")
    track_df = spark.createDataFrame([(f"t{t}", tracks[t].tolist()) for t in range(n_tracks)],
                                     "track_id string, factors array<float>")
    holdout = spark.createDataFrame(
        [(f"u{u}", f"t{t}", 1.0, "cold") for u in range(n_users) for t in sorted(positives[u])]
        + [("u-without-vector", "t0", 1.0, "cold"), ("u0", "t1", 1.0, "warm")],
        "user_id string, track_id string, plays double, split string")
    result = ev.evaluate_cold_start(spark, user_df, holdout, track_df, 10, "planted")
    assert result["n_users"] == n_users
    assert result["n_users_without_vector"] == 1
    # candidates are the cold held-out tracks only (t0 via the user without a vector): recompute
    test_tracks = sorted({t for p in positives.values() for t in p} | {0})
    assert result["n_tracks"] == len(test_tracks)
    sub_ap, sub_auc = [], []
    for u in range(n_users):
        mask = np.isin(test_tracks, list(positives[u]))
        ap, area = ev.user_metrics(scores[u, test_tracks], mask, 10)
        sub_ap.append(ap)
        sub_auc.append(area)
    assert result["map_at_k"] == pytest.approx(np.mean(sub_ap), rel=1e-5)
    assert result["auc"] == pytest.approx(np.mean(sub_auc), rel=1e-5)
    assert result["auc"] > 0.8
