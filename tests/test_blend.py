"""The usage/audio blend (deepcuts.cf.blend): its limits in pure numpy, its partition
function against the per-track solve, and (slow, Spark) the sparse-warm table on the demo."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepcuts.cf.blend import blend_partition, blend_vector, item_system, prior_precision

RANK = 6


def _setup(seed=0, n_users=200, n_listeners=4):
    rng = np.random.default_rng(seed)
    users = rng.normal(0, 0.5, (n_users, RANK))
    gram = users.T @ users
    idx = rng.choice(n_users, n_listeners, replace=False)
    conf = 1.0 + 2.0 * np.log1p(rng.integers(1, 20, n_listeners).astype(float))
    prior = rng.normal(0, 1, RANK)
    return users, gram, idx, conf, prior


def test_no_plays_gives_exactly_the_audio_vector():
    _, gram, _, _, prior = _setup()
    for strength in (1e-6, 0.3, 50.0):
        got = blend_vector(np.zeros((0, RANK)), np.zeros(0), gram, 0.1, prior, strength)
        np.testing.assert_array_equal(got, prior)


def _item_step_over_all_users(users, idx, conf, reg, target_others, s=0.0, prior=None):
    """The implicit-ALS item step written out over every user: listeners preference 1 with
    their confidence, the others confidence 1 and preference ``target_others`` (0 in ALS),
    Spark's regularisation reg * n_listeners, plus ``s ||y - prior||^2``."""
    c = np.ones(len(users))
    p = np.asarray(target_others, dtype=float).copy()
    c[idx], p[idx] = conf, 1.0
    rank = users.shape[1]
    a = users.T @ (c[:, None] * users) + (reg * len(idx) + s) * np.eye(rank)
    rhs = users.T @ (c * p) + (s * prior if prior is not None else 0.0)
    return np.linalg.solve(a, rhs)


def test_without_audio_it_is_the_als_item_step():
    users, gram, idx, conf, _ = _setup(1)
    als = _item_step_over_all_users(users, idx, conf, 0.1, np.zeros(len(users)))
    np.testing.assert_allclose(blend_vector(users[idx], conf, gram, 0.1, None, 3.0), als, rtol=1e-10)
    # a zero audio vector and no prior strength: ALS's own zero targets
    np.testing.assert_allclose(blend_vector(users[idx], conf, gram, 0.1, np.zeros(RANK), 0.0), als, rtol=1e-10)


def test_with_audio_the_non_listeners_target_is_the_audio_guess():
    """The closed form against its definition: non-listeners' preference x_u.y_audio, the prior s."""
    users, gram, idx, conf, prior = _setup(5)
    for s in (0.0, 0.7, 40.0):
        direct = _item_step_over_all_users(users, idx, conf, 0.1, users @ prior, s, prior)
        np.testing.assert_allclose(blend_vector(users[idx], conf, gram, 0.1, prior, s), direct, rtol=1e-9)
    # an infinitely strong prior is the audio vector; a finite one moves towards the listeners
    np.testing.assert_allclose(blend_vector(users[idx], conf, gram, 0.1, prior, 1e12), prior, rtol=1e-6)


def test_more_plays_move_the_blend_from_audio_towards_the_listeners():
    users, gram, _, _, prior = _setup(2)
    rng = np.random.default_rng(7)
    taste = rng.normal(0, 1, RANK)
    fans = np.argsort(-(users @ taste))           # the users who like this direction most
    s = prior_precision(gram, 0.5)
    moved, fan_scores = [], []
    for n in (1, 3, 10, 40):
        x = users[fans[:n]]
        y = blend_vector(x, np.full(n, 1.0 + 2.0 * np.log1p(5.0)), gram, 0.1, prior, s)
        moved.append(np.linalg.norm(y - prior))
        fan_scores.append(float(np.mean(users[fans[:40]] @ (y - prior))))
    assert moved == sorted(moved) and fan_scores == sorted(fan_scores) and fan_scores[0] > 0, (moved, fan_scores)
    # the weight follows the precision: a stronger prior stays nearer the audio vector
    x, conf = users[fans[:3]], np.full(3, 4.0)
    near = [np.linalg.norm(blend_vector(x, conf, gram, 0.1, prior, prior_precision(gram, r)) - prior)
            for r in (0.01, 0.1, 1.0, 10.0, 100.0)]
    assert near == sorted(near, reverse=True)


def test_item_system_matches_the_wpe_statistics():
    """The same per-track system as the WPE training statistics (ALS's item step, reg n_i I too)."""
    from deepcuts.nn.trainset import WPE_RIDGE, wpe_track_statistics
    users, gram, idx, conf, _ = _setup(3)
    a, b = item_system(users[idx], conf, gram, 0.3)
    target, _ = wpe_track_statistics(users[idx], conf, gram, len(users), 0.3)
    ridge = np.eye(RANK) * WPE_RIDGE * np.trace(a) / RANK
    np.testing.assert_allclose(np.linalg.solve(a + ridge, b), target, rtol=1e-8)


def test_partition_cuts_tracks_across_batches_like_the_per_track_solve():
    users, gram, _, _, _ = _setup(4)
    rng = np.random.default_rng(4)
    rows, expected = [], {}
    for t in range(9):
        tid = f"t{t}"
        n = int(rng.integers(0, 6))
        idx = rng.choice(len(users), n, replace=False)
        conf = 1.0 + rng.uniform(0, 4, n)
        prior = rng.normal(0, 1, RANK) if t % 3 else None     # t0, t3, t6: no audio vector
        if n == 0 and prior is None:
            continue
        for j, c in zip(idx, conf):
            rows.append((tid, False, users[j].astype(np.float32), c))
        if prior is not None:
            rows.append((tid, True, prior.astype(np.float32), np.nan))
        expected[tid] = (blend_vector(users[idx].astype(np.float32), conf, gram, 0.1,
                                      None if prior is None else prior.astype(np.float32), 2.0), n)
    frame = pd.DataFrame(rows, columns=["track_id", "is_prior", "factors", "confidence"]) \
        .sort_values(["track_id", "is_prior"], kind="stable").reset_index(drop=True)
    cuts = [0, 1, 5, 6, 13, len(frame)]                 # batches that split tracks, one of one row
    batches = [frame.iloc[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    got = pd.concat(list(blend_partition(iter(batches), gram, 0.1, 2.0)), ignore_index=True)
    assert sorted(got["track_id"]) == sorted(expected) and got["track_id"].is_unique
    for _, row in got.iterrows():
        vector, n = expected[row["track_id"]]
        np.testing.assert_allclose(row["factors"], vector, rtol=1e-4, atol=1e-5)
        assert row["n_listeners"] == n and row["has_prior"] == (int(row["track_id"][1:]) % 3 != 0)


# --- the demo chain (slow, Spark) ----------------------------------------------------------------
SPARSE = ("sparse_warm", "sparse_warm_validation")
SPARSE_PREDICTORS = ("usage", "audio", "threshold", "blend")


@pytest.fixture(scope="module")
def demo(demo_chain):
    from deepcuts.core import tables as T
    from deepcuts.core.lake import lake, read_pandas
    lk = lake(demo_chain.cfg)
    results = read_pandas(lk, T.EVALUATION_RESULTS.name)
    run = results[results["run_id"] == demo_chain.summaries["evaluate"]["run_id"]]
    return {"lk": lk, "chain": demo_chain, "run": run.set_index(["split", "predictor"]),
            "tables": {t.name: read_pandas(lk, t.name) for t in (T.EVAL_HOLDOUT, T.TRACK_FACTORS,
                                                                 T.SERVING_FACTORS)}}


@pytest.mark.slow
@pytest.mark.spark
def test_sparse_warm_tracks_keep_one_to_five_listeners(demo):
    holdout, tracks = demo["tables"]["eval_holdout"], demo["tables"]["track_factors"].set_index("track_id")
    summary = demo["chain"].summaries["factors"]
    sparse = holdout[holdout["split"].isin(SPARSE)]
    assert set(holdout["split"]) == {"cold", *SPARSE} and summary["sparse_warm_pairs"] == len(sparse)
    ids = set(sparse["track_id"])
    assert summary["sparse_warm_tracks"] == len(ids) >= 6
    assert not ids & set(holdout.loc[holdout["split"] == "cold", "track_id"])
    assert sparse.groupby("track_id")["split"].nunique().max() == 1         # a track is in one half
    kept = tracks.loc[sorted(ids), "n_listeners"]
    assert kept.between(1, 5).all() and kept.nunique() > 1


@pytest.mark.slow
@pytest.mark.spark
def test_blend_beats_usage_and_audio_on_the_sparse_warm_split(demo):
    run = demo["run"]
    assert "sparse_warm_validation" not in run.index.get_level_values(0)   # the chain scores the test half only
    for split in ("sparse_warm",):
        rows = run.loc[split]
        assert sorted(rows.index) == sorted(SPARSE_PREDICTORS)
        for column in ("n_users", "n_candidates", "n_positives"):
            assert rows[column].nunique() == 1, (split, column)
        assert (rows["n_candidates_without_vector"] == 0).all() and rows["n_users"].iloc[0] > 100
        print(f"\n{split}:\n{rows[['map_at_k', 'auc', 'n_users', 'n_candidates']].to_string()}")
    test = run.loc["sparse_warm"]
    assert test.loc["blend", "auc"] >= max(test.loc["usage", "auc"], test.loc["audio", "auc"])


@pytest.mark.slow
@pytest.mark.spark
def test_infer_serves_blend_rows_for_tracks_with_few_listeners(demo):
    served = demo["tables"]["serving_factors"].set_index("track_id")
    holdout, tracks = demo["tables"]["eval_holdout"], demo["tables"]["track_factors"].set_index("track_id")
    summary = demo["chain"].summaries["infer"]
    assert summary["serving_blend"]["mode"] == "blend"
    assert summary["serving_by_source"] == served["source"].value_counts().to_dict()
    blended = served.index[served["source"] == "blend"]
    sparse = set(holdout.loc[holdout["split"].isin(SPARSE), "track_id"])
    cold = set(holdout.loc[holdout["split"] == "cold", "track_id"])
    assert sparse <= set(blended) and not cold & set(blended)                # 1..5 listeners: blend
    assert served.loc[sorted(cold & set(served.index)), "source"].isin(["audio", "metadata"]).all()
    by_n = summary["serving_blend"]["blended_by_listeners"]
    assert sum(by_n.values()) == len(blended) and max(int(n) for n in by_n) <= 50
    many = tracks.index[tracks["n_listeners"] > 50]
    assert (served.loc[many, "source"] == "usage").all()
    np.testing.assert_allclose(np.stack(served.loc[many, "factors"]), np.stack(tracks.loc[many, "factors"]))
