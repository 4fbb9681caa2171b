"""The metadata prior (deepcuts.cf.metadata): the weight's closed form against a search, the
Spark priors (leave-one-out, level fall-through, minimum tracks) against numpy, and (slow) the
demo chain serving and scoring it as its own source and predictor."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepcuts.cf.metadata import blend, least_squares_weight, level_fit

RANK = 4


def test_least_squares_weight_is_the_best_blend_and_clipped():
    rng = np.random.default_rng(0)
    audio, truth = rng.normal(size=(50, RANK)), rng.normal(size=(50, RANK))
    prior = truth + 0.5 * rng.normal(size=(50, RANK))          # a good prior: weight near 1
    d, r = prior - audio, truth - audio
    w = least_squares_weight(float((d * r).sum()), float((d * d).sum()))
    grid = np.linspace(0, 1, 1001)
    sse = [((blend(audio, prior, g) - truth) ** 2).sum() for g in grid]
    assert 0 < w < 1 and abs(w - grid[int(np.argmin(sse))]) < 1e-3
    fit = level_fit(float((d * r).sum()), float((d * d).sum()), float((r * r).sum()), 50, min_tracks=5)
    assert fit["prior_mse"] == pytest.approx(((blend(audio, prior, w) - truth) ** 2).sum() / 50, rel=1e-4)
    assert fit["prior_mse"] < fit["audio_mse"] == pytest.approx((r * r).sum() / 50, rel=1e-4)
    # a prior pointing away from the truth is not used at all; one beyond it is capped at 1
    assert least_squares_weight(-3.0, 2.0) == 0.0 and least_squares_weight(5.0, 2.0) == 1.0
    assert least_squares_weight(1.0, 0.0) is None
    assert level_fit(1.0, 2.0, 3.0, 4, min_tracks=5)["weight"] is None       # too few validation tracks
    np.testing.assert_allclose(blend(audio[0], prior[0], 0.25), 0.25 * prior[0] + 0.75 * audio[0])


def _frame(spark, rows, schema):
    return spark.createDataFrame(rows, schema)


@pytest.mark.spark
def test_priors_leave_the_track_out_fall_through_levels_and_match_numpy(spark):
    from deepcuts.cf import metadata as md
    rng = np.random.default_rng(1)
    vec = {f"w{i}": rng.normal(size=RANK).astype(np.float32) for i in range(6)}
    # w0..w2 album A (artist X); w3, w4 artist X, no album; w5 artist Y alone
    meta = [("w0", "X", "A"), ("w1", "X", "A"), ("w2", "X", "A"), ("w3", "X", None), ("w4", "X", None),
            ("w5", "Y", None), ("c0", "X", "A"), ("c1", "X", "B"), ("c2", "Y", None), ("c3", "Z", None)]
    metadata = _frame(spark, meta, "track_id string, artist string, album string")
    warm = _frame(spark, [(t, v.tolist()) for t, v in vec.items()], "track_id string, factors array<float>")
    targets = _frame(spark, [(t,) for t in ("w0", "w5", "c0", "c1", "c2", "c3", "nobody")], "track_id string")
    got = {r["track_id"]: r for r in md.group_priors(targets, warm, metadata, ["album", "artist"]).collect()}
    mean = lambda ids: np.mean([vec[i] for i in ids], axis=0)   # noqa: E731
    expected = {"w0": ("album", ["w1", "w2"]), "c0": ("album", ["w0", "w1", "w2"]),
                "c1": ("artist", ["w0", "w1", "w2", "w3", "w4"]),   # album B has no warm track
                "c2": ("artist", ["w5"])}
    # w5 is its artist's only warm track (nothing left once it is out), c3's artist has none
    assert sorted(got) == sorted(expected)
    for track, (level, members) in expected.items():
        assert got[track]["level"] == level and got[track]["group_tracks"] == len(members), track
        np.testing.assert_allclose(got[track]["prior"], mean(members), rtol=1e-5, atol=1e-6)

    # The fit over "validation" tracks w0..w4 with audio = truth + noise, against numpy.
    audio = {t: v + rng.normal(0, 1.0, RANK).astype(np.float32) for t, v in vec.items()}
    audio_df = _frame(spark, [(t, v.tolist()) for t, v in audio.items()], "track_id string, factors array<float>")
    validation = _frame(spark, [(f"w{i}",) for i in range(5)], "track_id string")
    weights = md.fit_weights(validation, audio_df, warm, warm, metadata, ["album", "artist"], min_tracks=2)
    loo = {"w0": ["w1", "w2"], "w1": ["w0", "w2"], "w2": ["w0", "w1"]}          # album level
    art = {"w3": ["w0", "w1", "w2", "w4"], "w4": ["w0", "w1", "w2", "w3"]}       # artist level (no album)
    for level, members in (("album", loo), ("artist", art)):
        d = np.stack([mean(m) - audio[t] for t, m in members.items()])
        r = np.stack([vec[t] - audio[t] for t in members])
        assert weights[level]["validation_tracks"] == len(members)
        assert weights[level]["weight"] == pytest.approx(
            least_squares_weight(float((d * r).sum()), float((d * d).sum())), abs=1e-4)
    # 3 album + 2 artist validation tracks: with 3 needed, the artist level shares the weight
    # fitted on all 5 pooled; with 6 needed, neither level has a weight.
    strict = md.fit_weights(validation, audio_df, warm, warm, metadata, ["album", "artist"], min_tracks=3)
    d = np.stack([mean(m) - audio[t] for t, m in {**loo, **art}.items()])
    r = np.stack([vec[t] - audio[t] for t in {**loo, **art}])
    pooled = least_squares_weight(float((d * r).sum()), float((d * d).sum()))
    assert strict["album"]["weight"] == weights["album"]["weight"] and "weight_from" not in strict["album"]
    assert strict["artist"]["weight"] == pytest.approx(pooled, abs=1e-4) and "pooled" in strict["artist"]["weight_from"]
    none = md.fit_weights(validation, audio_df, warm, warm, metadata, ["album", "artist"], min_tracks=6)
    assert none["album"]["weight"] is None and none["artist"]["weight"] is None and "why" in none["artist"]

    # Blending: only levels with a weight; c1 (album B unknown, artist level unfitted) keeps no prior.
    cold_audio = _frame(spark, [(t, rng.normal(size=RANK).tolist()) for t in ("c0", "c1", "c2")],
                        "track_id string, factors array<float>")
    strict = {"album": strict["album"], "artist": {"weight": None}}
    rows = {r["track_id"]: r for r in md.prior_vectors(cold_audio, warm, metadata, strict).collect()}
    assert sorted(rows) == ["c0"] and rows["c0"]["level"] == "album"
    a = np.asarray([r["factors"] for r in cold_audio.collect() if r["track_id"] == "c0"][0])
    np.testing.assert_allclose(rows["c0"]["factors"], blend(a, mean(["w0", "w1", "w2"]), strict["album"]["weight"]),
                               rtol=1e-5, atol=1e-5)
    assert md.prior_vectors(cold_audio, warm, metadata, {"album": {"weight": None}}) is None


@pytest.fixture(scope="module")
def served(demo_chain):
    from deepcuts.core import tables as T
    from deepcuts.core.lake import lake, read_pandas
    lk = lake(demo_chain.cfg)
    tables = {t.name: read_pandas(lk, t.name) for t in (T.SERVING_FACTORS, T.TRACK_METADATA, T.TRACK_FACTORS,
                                                       T.PREDICTED_FACTORS, T.EVAL_HOLDOUT, T.EVALUATION_RESULTS,
                                                       T.USER_RECOMMENDATIONS)}
    return {"chain": demo_chain, "lk": lk, **tables}


@pytest.mark.slow
@pytest.mark.spark
def test_the_demo_serves_cold_tracks_of_known_artists_their_prior_and_scores_it_apart(served):
    """The small demo's manifest names artists (demo.artists_per_style): ingest keeps them,
    infer serves every cold track of an artist with warm tracks as source metadata, exactly
    w x its artist's warm mean + (1 - w) x its audio vector, and evaluate scores it as its own
    cold-split row (not on validation, where w was fitted)."""
    chain = served["chain"]
    cfg = chain.cfg
    meta = served["track_metadata"].set_index("track_id")
    assert meta["album"].isna().all() and meta["artist"].nunique() == 4 * cfg.demo.artists_per_style
    info = chain.summaries["infer"]["serving_metadata_prior"]["levels"]
    assert info["album"]["validation_tracks"] == 0 and info["album"]["weight"] is None
    w = info["artist"]["weight"]
    assert w is not None and 0.0 < w <= 1.0 and info["artist"]["validation_tracks"] >= 5
    assert info["artist"]["prior_mse"] <= info["artist"]["audio_mse"]

    serving = served["serving_factors"].set_index("track_id")
    tracks = served["track_factors"].set_index("track_id")
    holdout = served["eval_holdout"]
    cold = sorted(set(holdout.loc[holdout["split"] == "cold", "track_id"]) & set(serving.index))
    warm = tracks[tracks["n_listeners"] >= cfg.infer.min_listeners_for_usage]
    artist_of = meta["artist"]
    known = {artist_of[t] for t in warm.index if t in artist_of.index}
    with_prior = [t for t in cold if artist_of.get(t) in known]
    assert len(with_prior) >= 0.8 * len(cold) > 0
    assert (serving.loc[with_prior, "source"] == "metadata").all()
    assert (serving.loc[sorted(set(cold) - set(with_prior)), "source"] == "audio").all()
    cold = with_prior
    predicted = served["predicted_factors"].set_index("track_id")["factors"]
    scale = chain.summaries["infer"]["audio_scale"]
    for track in cold[:5]:
        members = [t for t in warm.index if artist_of.get(t) == artist_of[track]]
        prior = np.mean(np.stack(warm.loc[members, "factors"]), axis=0)
        a = np.asarray(predicted[track], float)
        a = a * scale / np.linalg.norm(a)                         # the ALS scale infer serves audio at
        np.testing.assert_allclose(serving.loc[track, "factors"], w * prior + (1 - w) * a, rtol=2e-3, atol=2e-3)
    assert chain.summaries["infer"]["serving_by_source"]["metadata"] == int((serving["source"] == "metadata").sum())

    results = served["evaluation_results"]
    run = results[(results["run_id"] == chain.summaries["evaluate"]["run_id"]) & results["metric"].isna()]
    rows = run.set_index(["split", "predictor"])
    assert ("cold", "metadata") in rows.index and ("validation", "metadata") not in rows.index
    assert "validation/metadata" in chain.summaries["evaluate"]["skipped"]
    cold_rows = rows.loc["cold"]
    assert cold_rows.loc["metadata", "n_candidates"] == cold_rows.loc["cnn", "n_candidates"]
    print(f"\nartist weight {w}; cold AUC cnn {cold_rows.loc['cnn', 'auc']:.4f} "
          f"metadata {cold_rows.loc['metadata', 'auc']:.4f} upper bound {cold_rows.loc['upper_bound', 'auc']:.4f}")
    # The demo's listeners follow styles and its artists share a style: the prior must help.
    assert cold_rows.loc["metadata", "auc"] > cold_rows.loc["cnn", "auc"]

    # Cold tracks served through their prior still make the user -> new-track lists.
    recs = served["user_recommendations"]
    assert set(recs.loc[recs["list"] == "cold", "track_id"]) & set(cold)
