"""The evaluation table end to end on the small demo catalogue (the shared nightly chain:
ingest -> factors -> train -> baseline -> infer -> evaluate), real Spark and audio.

Checked: one run's predictors share users and candidates exactly; the table's numbers equal
the pure-numpy reference on the same population (to 1e-9); random < MFCC baseline < upper
bound by margins; the baseline never fits on a validation or cold track; the CNN's stored
predictions give the same row as scoring on the fly."""
from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import pytest

from conftest import copy_chain
from deepcuts.core import tables as T
from deepcuts.core.lake import lake, read_pandas
from deepcuts.evaluation import metrics as M

pytestmark = [pytest.mark.spark, pytest.mark.slow]

PREDICTORS = ("random", "baseline", "cnn", "upper_bound")
COLD_ONLY = ("metadata",)   # the album/artist prior: scored on cold tracks only (the demo names artists)


def split_predictors(split: str) -> tuple:
    return PREDICTORS + (COLD_ONLY if split == "cold" else ())


@pytest.fixture(scope="module")
def chain(demo_chain):
    lk = lake(demo_chain.cfg)
    results = read_pandas(lk, T.EVALUATION_RESULTS.name)
    run = results[results["run_id"] == demo_chain.summaries["evaluate"]["run_id"]].set_index(["split", "predictor"])
    return {"cfg": demo_chain.cfg, "lk": lk, "summaries": demo_chain.summaries, "results": results, "run": run,
            "chain": demo_chain}


def test_every_predictor_of_a_run_has_the_same_users_and_candidates(chain):
    run, lk = chain["run"], chain["lk"]
    sparse = ("sparse_warm", "sparse_warm_validation")   # usage / audio / threshold / blend: tests/test_blend.py
    assert sorted(i for i in run.index if i[0] not in sparse) == sorted(
        (s, p) for s in ("cold", "validation") for p in split_predictors(s))
    for split in ("cold", "validation"):
        rows = run.loc[split]
        for column in ("n_users", "n_candidates", "n_positives", "n_positives_without_vector",
                       "n_users_without_vector", "n_users_skipped", "k", "max_users", "seed"):
            assert rows[column].nunique() == 1, (split, column, rows[column].to_dict())
        assert (rows["n_candidates_without_vector"] == 0).all()
        assert rows["n_users"].iloc[0] > 100
    holdout = read_pandas(lk, T.EVAL_HOLDOUT.name)
    holdout = holdout[holdout["split"] == "cold"]
    mels = set(read_pandas(lk, T.MELS.name, columns=["track_id"])["track_id"])
    cold = run.loc["cold"].iloc[0]
    assert cold["n_candidates"] == len(set(holdout["track_id"]) & mels)
    assert run.loc[("cold", "cnn"), "model_id"] == chain["summaries"]["train"]["model_id"]
    # the factors stage's warm CF check lands in the same table
    warm = chain["results"][chain["results"]["split"] == "warm"].set_index("predictor")
    assert warm.loc["als", "auc"] > warm.loc["random", "auc"] + 0.1


def test_random_below_baseline_below_upper_bound(chain):
    cold = chain["run"].loc["cold"]
    random, baseline, upper = (cold.loc[p] for p in ("random", "baseline", "upper_bound"))
    assert random["auc"] < 0.6
    assert baseline["auc"] > random["auc"] + 0.1 and baseline["map_at_k"] > random["map_at_k"] + 0.05
    assert upper["auc"] > baseline["auc"] + 0.1 and upper["map_at_k"] > baseline["map_at_k"] + 0.1
    # the CNN learnt the styles: 8 epochs on 58 tracks, so the figure moves with the order the
    # training rows are stored in (cold AUC 0.730, then 0.670 when the training-set layout changed)
    assert cold.loc["cnn", "auc"] > random["auc"] + 0.1


@pytest.mark.xfail(reason="the paper's ordering (MFCC baseline < CNN) does not hold on the small test demo: "
                          "96 synthetic tracks whose styles are spectral envelopes, which MFCC bags of words "
                          "capture, and a CNN trained 8 epochs on 58 tracks (measured: cold AUC baseline "
                          "0.738 vs CNN 0.730); reported, not tuned", strict=False)
def test_baseline_below_the_cnn(chain):
    cold = chain["run"].loc["cold"]
    assert cold.loc["baseline", "auc"] < cold.loc["cnn", "auc"]


def test_the_baseline_fits_on_training_tracks_only(chain):
    lk = chain["lk"]
    base = read_pandas(lk, T.BASELINE_FACTORS.name)
    mels = read_pandas(lk, T.MELS.name, columns=["track_id"])
    assert set(base["track_id"]) == set(mels["track_id"])
    fitted = set(base.loc[base["in_fit"], "track_id"])
    validation = set(read_pandas(lk, T.VALIDATION_EXAMPLES.name, columns=["track_id"])["track_id"])
    holdout = read_pandas(lk, T.EVAL_HOLDOUT.name)
    cold = set(holdout.loc[holdout["split"] == "cold", "track_id"])
    assert fitted and not fitted & validation and not fitted & cold
    assert fitted == set(read_pandas(lk, T.TRAIN_EXAMPLES.name, columns=["track_id"])["track_id"])
    summary = chain["summaries"]["baseline"]
    assert summary["kmeans"]["codebook_size"] == 64 and 0 < summary["pca"]["components"] < 64


def test_the_table_equals_the_numpy_reference_on_the_demo(spark, chain):
    """Population and vectors collected from the stage's own inputs, scored by
    ``metrics.evaluate_reference`` (whole score rows, argpartition top-k, midrank AUC)."""
    from deepcuts.core.registry import stage
    from deepcuts.core.runs import StageRun
    from deepcuts.stages import evaluate as E
    ctx = StageRun(spark, chain["cfg"], stage("evaluate"), "reference-check")
    cnn = E.resolve_cnn(ctx)
    for split in ("cold", "validation"):
        pop = E.split_population(ctx, split)
        try:
            users = sorted(r["user_id"] for r in pop.users.collect())
            ids = sorted(r["track_id"] for r in pop.candidates.collect())
            positives = {u: [] for u in users}
            for r in pop.positives.collect():
                positives[r["user_id"]].append(r["track_id"])
            for predictor in split_predictors(split):
                user_df, track_df, _ = E.predictor_vectors(ctx, predictor, split, pop, cnn)
                uvec = {r["user_id"]: np.asarray(r["factors"], float) for r in user_df.collect()}
                tvec = {r["track_id"]: np.asarray(r["factors"], float)
                        for r in track_df.join(pop.candidates, "track_id", "left_semi").collect()}
                ref = M.evaluate_reference(np.stack([uvec[u] for u in users]), ids,
                                           np.stack([tvec[t] for t in ids]), [positives[u] for u in users],
                                           chain["cfg"].factors.eval_k)
                row = chain["run"].loc[(split, predictor)]
                assert row["n_users"] == ref["n_users"], (split, predictor)
                assert abs(row["map_at_k"] - ref["map_at_k"]) < 1e-9, (split, predictor, row["map_at_k"], ref)
                assert abs(row["auc"] - ref["auc"]) < 1e-9, (split, predictor, row["auc"], ref["auc"])
        finally:
            pop.release()


def test_evaluate_command_scores_on_the_fly_what_infer_stored_and_prints_the_table(spark, chain, tmp_path):
    """The nightly evaluate read the CNN's vectors from predicted_factors; the command, on a
    copy whose predicted_factors is empty, scores the model itself: the same numbers."""
    from deepcuts.core.lake import empty_frame, write_table
    from deepcuts.stages.evaluate import evaluate_main
    copy = copy_chain(chain["chain"], tmp_path)
    lk = lake(copy.cfg)
    write_table(empty_frame(spark, T.PREDICTED_FACTORS), lk, T.PREDICTED_FACTORS, "emptied-by-test")
    args = ["--model", chain["summaries"]["train"]["model_id"], "--splits", "cold"]
    for key, value in copy.settings.items():
        args += ["--set", f"{key}={value}"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert evaluate_main(args) == 0
    printed = out.getvalue()
    assert "cold       cnn" in printed and "upper_bound" in printed
    results = read_pandas(lk, T.EVALUATION_RESULTS.name)
    evaluate_runs = results[results["run_id"].str.startswith("evaluate-")]["run_id"]
    latest = results[results["run_id"] == evaluate_runs.max()].set_index("predictor")
    assert evaluate_runs.max() != chain["summaries"]["evaluate"]["run_id"]
    assert set(latest.index) == set(split_predictors("cold")) and (latest["split"] == "cold").all()
    first = chain["run"].loc["cold"]
    for predictor in split_predictors("cold"):   # same population, same vectors: the same numbers
        assert latest.loc[predictor, "map_at_k"] == pytest.approx(first.loc[predictor, "map_at_k"], abs=1e-9)
        assert latest.loc[predictor, "n_users"] == first.loc[predictor, "n_users"]
