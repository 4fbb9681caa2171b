"""The factors stage: play counts -> implicit-feedback ALS factors (+ the paper's evaluation).

Weighted matrix factorisation for implicit feedback (Hu, Koren & Volinsky 2008) with Spark
MLlib ALS: preference 1 for every played pair, confidence ``1 + alpha * log(1 + r / eps)``
(van den Oord et al. 2013), obtained by feeding ``log(1 + r / eps)`` as the rating.

Outputs (all ids are the original ids as canonical strings, see ``deepcuts.cf.plays``):

* ``user_factors`` / ``track_factors``: the published fit; tracks with fewer than
  ``factors.min_track_listeners`` listeners get no row (they still inform the fit).
* ``user_index`` / ``track_index``: the dense ALS indices of this run (rebuilt nightly).
* ``plays_rejects``: every unused input row with its reason code.
* With ``factors.evaluate`` (the cold-start protocol): the published fit leaves out every
  play of a stable hash sample of tracks (``cold_fraction``), so those tracks have no ALS
  factors, and their plays go to ``eval_holdout`` (split "cold") for the audio model's
  evaluation.  Two more outputs:

  - ``upper_bound_factors``: WMF fitted on *all* plays (cold tracks included), user and track
    vectors both from that fit (vectors of two different fits live in differently rotated
    spaces, so they are never mixed).  The ceiling for any audio predictor; the evaluate
    stage scores it beside random, the MFCC baseline and the CNN on the same users and
    candidates (``evaluation_results``).
  - ``evaluation_results`` rows warm / als and warm / random: a separate fit without a hash
    sample of the known tracks' plays (``warm_fraction``), scored on those plays with each
    user's training tracks removed from the candidates (a join, not a broadcast); the
    standard CF sanity check.  That model is discarded.

  - the sparse-warm protocol (issue 19): a hash sample (``sparse_warm_fraction``) of the
    other tracks keeps only 1..``sparse_warm_max_listeners`` of its listeners in the fit; the
    rest of its plays go to ``eval_holdout`` (split "sparse_warm", or "sparse_warm_validation"
    for ``sparse_warm_validation_share`` of the sample), scored by the evaluate stage.

  Without ``factors.evaluate`` (production) nothing is held out: ``eval_holdout`` and
  ``upper_bound_factors`` are committed empty, so no later stage evaluates against a stale
  holdout.

* ``factor_alignments``: each fit is rotated onto the previous published one
  (:mod:`deepcuts.cf.align`, orthogonal Procrustes on the shared tracks), users and tracks
  alike, so a model trained on earlier factors keeps serving in the same space; one row per
  fit records the rotation and its residual.

Cost (estimated from ``bench/factors.py``: 1.0 s per iteration for 4e5 pairs at rank 32 on
2 cores, i.e. ~5 core-µs per pair and iteration, plus (users + tracks) x rank³ per solve):
10^6 tracks with 10^8 play pairs, 10 iterations, ~5,000 core-s per fit (~1.4 core-hours),
three fits with ``factors.evaluate`` (the upper bound and the warm check); 10^7 tracks with
10^9 pairs ~14 core-hours per fit.  ALS holds its in/out blocks on the executors, never the
driver.  The alignment adds one join of the new and previous track vectors (128 B each at
rank 32: 128 MB shuffled at 10^6, 1.3 GB at 10^7) and rank² partial sums per partition to the
driver; the rotation is one numpy product per Arrow batch.  Reading and validating the play
rows is Spark SQL (no Python per row): at 10^8-10^9 rows one scan plus one shuffle of the
(user, track, plays) pairs (~40 B each: 4-40 GB).
"""
from __future__ import annotations

import logging
import time

from deepcuts.cf import align
from deepcuts.evaluation import runner as ev
from deepcuts.core.config import Config, FactorsConf
from deepcuts.core.errors import InputMissing
from deepcuts.cf.plays import (aggregate_pairs, dense_index, flag_unknown_tracks, rating_column, read_raw_plays,
                               validate_plays)
from deepcuts.core.runs import Laps
from deepcuts.core.spark import checkpoint_dir
from deepcuts.core.tables import (EVAL_HOLDOUT, EVALUATION_RESULTS, FACTOR_ALIGNMENTS, MELS, PLAYS_REJECTS,
                                  TRACK_FACTORS, TRACK_INDEX, UPPER_BOUND_FACTORS, USER_FACTORS, USER_INDEX,
                                  spark_schema)

log = logging.getLogger(__name__)

UPPER_BOUND = "upper_bound"
RANDOM = "random"
ALS_PREDICTOR = "als"


def num_blocks(spark, fc: FactorsConf) -> int:
    return fc.blocks or spark.sparkContext.defaultParallelism


def fit_als(spark, ratings_df, fc: FactorsConf, **als_params):
    """Implicit ALS on (user_idx, track_idx, rating); returns (model, seconds).
    ``als_params`` override ALS parameters (the bench tunes storage levels with them)."""
    from pyspark.ml.recommendation import ALS
    blocks = num_blocks(spark, fc)
    als = ALS(rank=fc.rank, maxIter=fc.iterations, regParam=fc.reg, alpha=fc.alpha,
              implicitPrefs=True, nonnegative=False, userCol="user_idx", itemCol="track_idx",
              ratingCol="rating", numUserBlocks=blocks, numItemBlocks=blocks,
              checkpointInterval=fc.checkpoint_interval, seed=fc.seed, coldStartStrategy="drop",
              intermediateStorageLevel=fc.intermediate_storage)
    if als_params:
        als.setParams(**als_params)
    started = time.time()
    model = als.fit(ratings_df.select("user_idx", "track_idx", "rating"))
    return model, time.time() - started


def unit_vector(col):
    """``col / ||col||`` for an array<float> column (a zero vector stays zero)."""
    from pyspark.sql import functions as F
    norm = F.sqrt(F.aggregate(col, F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    return F.transform(col, lambda x: F.when(norm > 0, x / norm).otherwise(F.lit(0.0)).cast("float"))


def model_vectors(model, user_index, track_index):
    """(user_id, factors) and (track_id, factors) of a fitted model, with original ids."""
    from pyspark.sql import functions as F
    users = model.userFactors.join(user_index, F.col("id") == F.col("user_idx")) \
        .select("user_id", F.col("features").alias("factors"))
    tracks = model.itemFactors.join(track_index, F.col("id") == F.col("track_idx")) \
        .select("track_id", F.col("features").alias("factors"))
    return users, tracks


def published_tables(model, fit_ratings, user_index, track_index, min_listeners: int, run_id: str,
                     rotation=None):
    """The ``user_factors`` and ``track_factors`` frames of the published fit, turned by
    ``rotation`` (see :mod:`deepcuts.cf.align`) when given."""
    from pyspark.sql import functions as F
    users, tracks = model_vectors(model, user_index, track_index)
    if rotation is not None:
        users = users.withColumn("factors", align.rotate(F.col("factors"), rotation))
        tracks = tracks.withColumn("factors", align.rotate(F.col("factors"), rotation))
    user_counts = fit_ratings.groupBy("user_id").agg(
        F.round(F.sum("plays")).cast("long").alias("n_plays"), F.count("*").alias("n_tracks"))
    track_counts = fit_ratings.groupBy("track_id").agg(
        F.round(F.sum("plays")).cast("long").alias("n_plays"), F.count("*").alias("n_listeners"))
    user_factors = users.join(user_counts, "user_id").withColumn("run_id", F.lit(run_id))
    track_factors = (tracks.join(track_counts, "track_id")
                     .where(F.col("n_listeners") >= min_listeners)
                     .withColumn("factors_unit", unit_vector(F.col("factors")))
                     .withColumn("run_id", F.lit(run_id)))
    return user_factors, track_factors


def align_to_previous(ctx, model, user_index, track_index, rank: int) -> tuple:
    """(rotation or None, the ``factor_alignments`` row) of this fit onto the previous
    published one (:mod:`deepcuts.cf.align`)."""
    from pyspark.sql import functions as F
    row = {"factors_run_id": ctx.run_id, "aligned_to_run_id": None, "rank": rank, "shared_tracks": 0,
           "residual": None, "unaligned_residual": None, "rotation": None, "note": None}
    if not ctx.cfg.factors.align:
        return None, {**row, "note": "not aligned (factors.align = false): a new space"}
    if not ctx.exists(TRACK_FACTORS):
        return None, {**row, "note": "first fit: it defines the space"}
    previous = ctx.read(TRACK_FACTORS)
    first = previous.select(F.size("factors").alias("rank"), "run_id").first()
    if first is None:
        return None, {**row, "note": "previous fit is empty: a new space"}
    if first["rank"] != rank:
        return None, {**row, "note": f"rank changed {first['rank']} -> {rank}: a new space (retrain the model)"}
    found = align.align_to(model_vectors(model, user_index, track_index)[1], previous, rank)
    if found is None:
        return None, {**row, "note": f"no track shared with fit {first['run_id']}: a new space"}
    return found.rotation, {**row, "aligned_to_run_id": first["run_id"], "shared_tracks": found.shared_tracks,
                            "residual": found.residual, "unaligned_residual": found.unaligned_residual,
                            "rotation": found.rotation.ravel().astype("float32").tolist(),
                            "note": f"aligned to {first['run_id']}"}


def _metric_line(r: dict) -> str:
    if r["map_at_k"] is None:
        return f"no users to score ({r['n_candidates']} candidate tracks)"
    return (f"mAP@{r['k']}={r['map_at_k']:.4f} AUC={r['auc']:.4f} users={r['n_users']} "
            f"tracks={r['n_candidates']}")


def upper_bound_rows(users, tracks, run_id: str):
    """``upper_bound_factors`` rows: the all-plays fit's user and track vectors."""
    from pyspark.sql import functions as F
    return (users.select(F.lit("user").alias("entity"), F.col("user_id").alias("entity_id"), "factors")
            .unionByName(tracks.select(F.lit("track").alias("entity"), F.col("track_id").alias("entity_id"),
                                       "factors"))
            .withColumn("run_id", F.lit(run_id)))


def evaluate_protocol(ctx, fc: FactorsConf, ratings, user_index, track_index) -> tuple:
    """(the upper bound's ``upper_bound_factors`` rows or None, the warm (ALS, random) results);
    see the module docstring.  ``ratings`` holds every usable pair with its ``cold`` flag."""
    from pyspark.sql import functions as F
    spark, ec = ctx.spark, ctx.cfg.evaluate
    k, seed, max_users = fc.eval_k, fc.eval_seed, fc.eval_max_users
    upper, results = None, []
    if fc.cold_fraction > 0:
        full_model, _ = fit_als(spark, ratings, fc)
        upper = upper_bound_rows(*model_vectors(full_model, user_index, track_index), ctx.run_id)
    if fc.warm_fraction > 0:
        known = ratings.where(~F.col("cold") & F.col("sparse").isNull())
        held = ev.hash_unit(seed + 1, "user_id", "track_id") < F.lit(fc.warm_fraction)
        warm_train = known.where(~held)
        warm_test = known.where(held)
        warm_model, _ = fit_als(spark, warm_train, fc)
        warm_users, warm_tracks = model_vectors(warm_model, user_index, track_index)
        warm_tracks = warm_tracks.persist()
        pop = ev.build_population(warm_test, warm_tracks.select("track_id"), warm_users, split=ev.WARM,
                                  max_users=max_users, seed=seed, users_per_task=ec.users_per_task,
                                  candidates_per_block=ec.candidates_per_block, excluded=warm_train)
        try:
            for name, vectors in ((ALS_PREDICTOR, warm_tracks),
                                  (RANDOM, ev.random_track_vectors(warm_tracks.select("track_id"), fc.rank, seed))):
                results.append(ev.evaluate_predictor(pop, warm_users, vectors, predictor=name, k=k,
                                                     scratch=ctx.path("_scratch", "factors", ctx.run_id),
                                                     model_id=ctx.run_id))
        finally:
            pop.release()
            warm_tracks.unpersist()
    return upper, results


def run(ctx) -> dict:
    """The factors stage (see the module docstring); returns the operator's summary."""
    from pyspark.sql import functions as F
    spark, cfg, run_id = ctx.spark, ctx.cfg, ctx.run_id
    fc = cfg.factors
    from deepcuts.stages.content import plays_unset
    if plays_unset(cfg):   # content-only mode (issue 18): nothing to fit; the manifest says "skipped"
        return {"skipped": plays_unset(cfg)}
    spark.sparkContext.setCheckpointDir(checkpoint_dir(cfg))  # else ALS ignores checkpointInterval
    summary: dict = {}
    persisted = []
    lap = Laps()
    timings = lap.seconds

    def keep(df):
        persisted.append(df)
        return df

    try:
        validated = validate_plays(read_raw_plays(spark, fc.plays, fc.plays_format), fc.plays_format)
        if fc.unknown_tracks == "reject":
            if ctx.exists(MELS):
                validated = flag_unknown_tracks(validated, ctx.read(MELS).select("track_id"))
                summary["unknown_tracks"] = "rejected (checked against mels)"
            else:
                summary["unknown_tracks"] = "KEPT: no committed mels table to check against"
        else:
            summary["unknown_tracks"] = "kept (factors.unknown_tracks = keep)"
        validated = keep(validated.persist())
        counts = {r["reason"]: r["count"] for r in validated.groupBy("reason").count().collect()}
        summary["input_rows"] = sum(counts.values())
        summary["rejected_rows"] = {reason: counts[reason] for reason in sorted(r for r in counts if r is not None)}

        pairs = keep(aggregate_pairs(validated.where(F.col("reason").isNull())).persist())
        user_index = keep(dense_index(pairs, "user_id", "user_idx"))
        track_index = keep(dense_index(pairs, "track_id", "track_idx"))
        ratings = (pairs.join(user_index, "user_id").join(track_index, "track_id")
                   .withColumn("rating", rating_column(F.col("plays"), fc.epsilon)))
        if fc.evaluate:
            ratings = ratings.withColumn("cold", ev.is_cold_track(fc.cold_fraction, fc.eval_seed))
        else:
            ratings = ratings.withColumn("cold", F.lit(False))
        # the sparse-warm protocol (issue 19): "sparse" names the split of a pair hidden from the fit
        if fc.evaluate and fc.sparse_warm_fraction > 0:
            sparse = ev.sparse_warm_holdout(ratings, fc.sparse_warm_fraction, fc.sparse_warm_max_listeners,
                                            fc.sparse_warm_validation_share, fc.eval_seed)
            ratings = ratings.join(sparse.withColumnRenamed("split", "sparse"), ["user_id", "track_id"], "left")
        else:
            ratings = ratings.withColumn("sparse", F.lit(None).cast("string"))
        ratings = keep(ratings.persist())
        fit_ratings = ratings.where(~F.col("cold") & F.col("sparse").isNull())
        holdout = ratings.where(F.col("cold")).select("user_id", "track_id", "plays",
                                                      F.lit(ev.COLD).alias("split")) \
            .unionByName(ratings.where(F.col("sparse").isNotNull())
                         .select("user_id", "track_id", "plays", F.col("sparse").alias("split")))
        stats = ratings.agg(F.count("*").alias("pairs"), F.countDistinct("user_id").alias("users"),
                            F.countDistinct("track_id").alias("tracks"),
                            F.sum(F.col("cold").cast("int")).alias("cold_pairs"),
                            F.countDistinct(F.when(F.col("cold"), F.col("track_id"))).alias("cold_tracks"),
                            F.countDistinct(F.when(~F.col("cold"), F.col("track_id"))).alias("fitted_tracks"),
                            F.count("sparse").alias("sparse_pairs"),
                            F.countDistinct("sparse", "track_id").alias("sparse_tracks")).first()
        summary.update(pairs=stats["pairs"], users=stats["users"], tracks=stats["tracks"],
                       cold_tracks=stats["cold_tracks"] or 0, cold_pairs=stats["cold_pairs"] or 0)
        summary.update(sparse_warm_tracks=stats["sparse_tracks"] or 0, sparse_warm_pairs=stats["sparse_pairs"] or 0)
        rejects = validated.where(F.col("reason").isNotNull()).select(
            "user_id", "track_id", F.col("plays_text").alias("plays"), "reason", F.lit(run_id).alias("run_id"))
        if not stats["pairs"]:
            # The rejected rows still land in their reasons table: an operator fixes them from there.
            kept = ""
            if summary["rejected_rows"]:
                kept = f"; the rows are in plays_rejects v{ctx.write(rejects, PLAYS_REJECTS).version}"
            raise InputMissing(f"factors.plays {fc.plays}: no usable play rows of {summary['input_rows']} "
                               f"(rejected: {summary['rejected_rows'] or 'none'}){kept}; no factors were published")
        lap("read_validate_index")

        model, seconds = fit_als(spark, fit_ratings, fc)
        lap("fit")
        summary["als"] = {"rank": fc.rank, "iterations": fc.iterations, "blocks": num_blocks(spark, fc),
                          "seconds": round(seconds, 1)}
        rotation, alignment = align_to_previous(ctx, model, user_index, track_index, fc.rank)
        summary["alignment"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in alignment.items()
                                if k not in ("rotation", "factors_run_id", "rank")}
        lap("align")
        user_factors, track_factors = published_tables(model, fit_ratings, user_index, track_index,
                                                       fc.min_track_listeners, run_id, rotation)

        snaps = {
            USER_FACTORS.name: ctx.write(user_factors, USER_FACTORS),
            TRACK_FACTORS.name: ctx.write(track_factors, TRACK_FACTORS),
            USER_INDEX.name: ctx.write(user_index, USER_INDEX),
            TRACK_INDEX.name: ctx.write(track_index, TRACK_INDEX),
            PLAYS_REJECTS.name: ctx.write(rejects, PLAYS_REJECTS),
            EVAL_HOLDOUT.name: ctx.write(holdout, EVAL_HOLDOUT),
        }
        ctx.write(spark.createDataFrame([alignment], spark_schema(FACTOR_ALIGNMENTS)), FACTOR_ALIGNMENTS,
                  mode="append")
        summary["users_with_factors"] = snaps[USER_FACTORS.name].rows
        summary["tracks_with_factors"] = snaps[TRACK_FACTORS.name].rows
        summary["tracks_below_min_listeners"] = stats["fitted_tracks"] - snaps[TRACK_FACTORS.name].rows
        lap("write")

        upper, results = (evaluate_protocol(ctx, fc, ratings, user_index, track_index) if fc.evaluate
                          else (None, []))
        if upper is None:   # no stale upper bound outlives its holdout
            from deepcuts.core.lake import empty_frame
            upper = empty_frame(spark, UPPER_BOUND_FACTORS)
        ctx.write(upper, UPPER_BOUND_FACTORS)
        if results:
            ctx.write(ev.results_frame(spark, results, run_id,
                                       {"factors_run_id": run_id, "max_users": fc.eval_max_users,
                                        "seed": fc.eval_seed}), EVALUATION_RESULTS, mode="append")
            print(ev.format_results_table(results), flush=True)
        summary["metrics"] = ({f"{r['split']}/{r['predictor']}": _metric_line(r) for r in results} if fc.evaluate
                              else "not evaluated (factors.evaluate = false)")
        lap("evaluate")
        summary["seconds"] = timings
        return summary
    finally:
        for df in persisted:
            df.unpersist()
