"""The paper's metrics: hand-computed cases, the reference against brute force, the block-counting
kernel against the reference, and the Spark runner against the reference (to 1e-9)."""
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


def _brute_ap(scores, positive, k):
    """AP@k from one full sort by (score desc, negatives before positives)."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    order = np.lexsort((positive, -scores))
    ranks = np.flatnonzero(positive[order]) + 1
    hits = ranks <= k
    return (np.arange(1, len(ranks) + 1)[hits] / ranks[hits]).sum() / min(positive.sum(), k)


def test_argpartition_top_k_equals_a_full_sort_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        scores = rng.integers(0, 4, size=n).astype(float)
        positive = rng.random(n) < 0.4
        if not positive.any():
            continue
        k = int(rng.integers(1, n + 3))
        assert ev.average_precision_at_k(scores, positive, k) == pytest.approx(_brute_ap(scores, positive, k),
                                                                               abs=1e-12)


def test_a_candidate_without_vector_ranks_last():
    tracks = np.array([[1.0], [np.nan], [-1.0]])
    scores = ev.score_matrix(np.array([[2.0]]), tracks)[0]
    assert scores.tolist() == [2.0, -np.inf, -2.0]
    # the positive without a vector loses to every negative with one, and ties none
    assert ev.auc(scores, [False, True, False]) == 0.0
    assert ev.auc([-np.inf, -np.inf, 0.0], [True, False, False]) == pytest.approx(0.25)


def _blocked(users, ids, matrix, positives, excluded, k, n_blocks, rng):
    """metrics_from_counts over block_counts summed on a random partition of the candidates."""
    scores = ev.score_matrix(users, matrix)
    block = rng.integers(0, n_blocks, size=len(ids))
    aps, aucs = [], []
    for u in range(len(users)):
        pos = set(positives[u])
        gone = pos | set(excluded[u] or ())
        p = scores[u, [ids.index(t) for t in positives[u]]]
        ge, gt, n_neg = np.zeros(len(p)), np.zeros(len(p)), 0
        for b in range(n_blocks):
            cols = np.flatnonzero(block == b)
            removed = np.array([i for i, c in enumerate(cols) if ids[c] in gone], dtype=np.int64)
            g, t, n = ev.block_counts(users[u:u + 1], [p], [removed], matrix[cols])
            ge, gt, n_neg = ge + g[0], gt + t[0], n_neg + n[0]
        ap, area = ev.metrics_from_counts(p, ge, gt, n_neg, k)
        aps.append(ap)
        aucs.append(area)
    return np.array(aps), np.array(aucs)


def test_block_counts_summed_over_any_partition_equal_the_reference():
    rng = np.random.default_rng(4)
    for trial in range(150):
        n_tracks, rank, n_users = int(rng.integers(2, 50)), 3, 4
        matrix = rng.integers(-2, 3, size=(n_tracks, rank)).astype(float)   # many exact ties
        if trial % 3 == 0:
            matrix[rng.random(n_tracks) < 0.2] = np.nan                      # no vector
        users = rng.integers(-2, 3, size=(n_users, rank)).astype(float)
        ids = [f"t{i}" for i in range(n_tracks)]
        positives = [[ids[j] for j in np.flatnonzero(rng.random(n_tracks) < 0.3)] for _ in range(n_users)]
        excluded = [[ids[j] for j in np.flatnonzero(rng.random(n_tracks) < 0.2)] for _ in range(n_users)]
        k = int(rng.integers(1, 10))
        ref = ev.evaluate_reference(users, ids, matrix, positives, k, excluded)
        aps, aucs = _blocked(users, ids, matrix, positives, excluded, k, int(rng.integers(1, 5)), rng)
        np.testing.assert_allclose(aps, ref["ap"], atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(aucs, ref["aucs"], atol=1e-12, equal_nan=True)


def test_reference_excludes_training_tracks_but_keeps_positives():
    ids = ["a", "b", "c", "d"]
    matrix = np.array([[4.0], [3.0], [2.0], [1.0]])
    users = np.array([[1.0], [1.0]])
    out = ev.evaluate_reference(users, ids, matrix, positives=[["c", "zzz"], ["c"]], k=10,
                                excluded=[["a", "b", "c"], None])
    # user 0: a, b excluded (c is a positive, so it stays) -> c first of {c, d}; user 1: c third
    assert out["ap"].tolist() == pytest.approx([1.0, 1 / 3])
    assert out["aucs"].tolist() == pytest.approx([1.0, 1 / 3])
    assert out["n_users"] == 2 and out["map_at_k"] == pytest.approx((1 + 1 / 3) / 2)


# --- the Spark runner -----------------------------------------------------------------------
def _collect_vectors(df, key):
    return {r[key]: np.asarray(r["factors"], dtype=np.float64) for r in df.collect()}


@pytest.mark.spark
def test_spark_runner_equals_the_numpy_reference_on_blocks_samples_and_exclusions(spark, tmp_path):
    from deepcuts.evaluation import runner
    rng = np.random.default_rng(3)
    n_users, n_tracks, rank = 90, 70, 4
    users = rng.normal(size=(n_users, rank)).astype(np.float32)
    tracks = rng.normal(size=(n_tracks, rank)).astype(np.float32)
    tracks[5] = tracks[6]                         # an exact tie between two candidates
    scores = users.astype(np.float64) @ tracks.astype(np.float64).T
    pairs = [(f"u{u}", f"t{t}") for u in range(n_users)
             for t in set(np.argsort(-scores[u])[:4]) | set(rng.choice(n_tracks, 3))]
    pairs += [("u-only-cold", "t1"), ("u3", "t-no-mel")]          # a user without a vector; a pair off the candidates
    excluded = [(f"u{u}", f"t{t}") for u in range(n_users) for t in rng.choice(n_tracks, 5)]
    user_df = spark.createDataFrame([(f"u{u}", users[u].tolist()) for u in range(n_users)],
                                    "user_id string, factors array<float>")
    # the predictor has no vector for t0..t2
    track_df = spark.createDataFrame([(f"t{t}", tracks[t].tolist()) for t in range(3, n_tracks)],
                                     "track_id string, factors array<float>")
    pairs_df = spark.createDataFrame(pairs, "user_id string, track_id string")
    candidates = spark.createDataFrame([(f"t{t}",) for t in range(n_tracks)], "track_id string")
    excluded_df = spark.createDataFrame(excluded, "user_id string, track_id string")
    pop = runner.build_population(pairs_df, candidates, user_df, split="cold", max_users=60, seed=5,
                                  users_per_task=7, candidates_per_block=16, excluded=excluded_df)
    try:
        assert pop.n_cblocks == 5 and pop.n_ublocks >= 5
        got = runner.evaluate_predictor(pop, user_df, track_df, predictor="planted", k=10,
                                        scratch=str(tmp_path / "scratch"))
        # the numpy reference on the very users the population sampled
        sampled = sorted(r["user_id"] for r in pop.users.collect())
        assert 40 <= len(sampled) <= 80 and "u-only-cold" not in sampled
        ids = [f"t{t}" for t in range(n_tracks)]
        vec = _collect_vectors(track_df, "track_id")
        matrix = np.stack([vec.get(t, np.full(rank, np.nan)) for t in ids])
        by_user = _collect_vectors(user_df, "user_id")
        pos = {u: [] for u in sampled}
        for u, t in pairs:
            if u in pos and t in ids and t not in pos[u]:
                pos[u].append(t)
        ex = {u: [] for u in sampled}
        for u, t in excluded:
            if u in ex:
                ex[u].append(t)
        ref = ev.evaluate_reference(np.stack([by_user[u] for u in sampled]), ids, matrix,
                                    [pos[u] for u in sampled], 10, [ex[u] for u in sampled])
        assert got["n_users"] == ref["n_users"] == len(sampled)
        assert abs(got["map_at_k"] - ref["map_at_k"]) < 1e-9
        assert abs(got["auc"] - ref["auc"]) < 1e-9
        assert got["n_candidates"] == n_tracks and got["n_candidates_without_vector"] == 3
        assert got["n_users_without_vector"] == 1
        assert got["n_positives"] == sum(len(p) for p in pos.values())
        assert got["n_positives_without_vector"] == (1 if "u3" in sampled else 0)
        assert 0.6 < got["auc"] < 1.0
        # one candidate block: the single-pass path gives the same numbers
        one = runner.build_population(pairs_df, candidates, user_df, split="cold", max_users=60, seed=5,
                                      users_per_task=1000, candidates_per_block=1000, excluded=excluded_df)
        same = runner.evaluate_predictor(one, user_df, track_df, predictor="planted", k=10,
                                         scratch=str(tmp_path / "scratch"))
        one.release()
        assert abs(same["map_at_k"] - ref["map_at_k"]) < 1e-9 and abs(same["auc"] - ref["auc"]) < 1e-9
        assert not list((tmp_path / "scratch").iterdir())
        # the same name again with other vectors: nothing of the first call is reused
        flipped = spark.createDataFrame([(f"t{t}", (-tracks[t]).tolist()) for t in range(3, n_tracks)],
                                        "track_id string, factors array<float>")
        again = runner.evaluate_predictor(pop, user_df, flipped, predictor="planted", k=10,
                                          scratch=str(tmp_path / "scratch"))
        ref_flipped = ev.evaluate_reference(np.stack([by_user[u] for u in sampled]), ids, -matrix,
                                            [pos[u] for u in sampled], 10, [ex[u] for u in sampled])
        assert abs(again["auc"] - ref_flipped["auc"]) < 1e-9 and again["auc"] < 0.4
    finally:
        pop.release()


@pytest.mark.spark
def test_random_vectors_depend_on_the_track_alone(spark):
    from deepcuts.evaluation import runner
    ids = spark.createDataFrame([(f"t{i}",) for i in range(400)], "track_id string")
    a = _collect_vectors(runner.random_track_vectors(ids, 8, 1), "track_id")
    b = _collect_vectors(runner.random_track_vectors(ids.repartition(7).orderBy("track_id", ascending=False), 8, 1),
                         "track_id")
    c = _collect_vectors(runner.random_track_vectors(ids, 8, 2), "track_id")
    assert all(np.array_equal(a[t], b[t]) for t in a) and not np.array_equal(a["t0"], c["t0"])
    values = np.concatenate(list(a.values()))
    assert abs(values.mean()) < 0.1 and 0.9 < values.std() < 1.1
