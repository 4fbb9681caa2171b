"""The baseline stage: the paper's MFCC bag-of-words predictor of latent factors
(van den Oord et al. 2013, sec. 4.1; the pure parts are :mod:`deepcuts.cf.baseline`).

Reads ``mels``, ``track_factors`` (the unit-normalised ALS factors it regresses) and
``validation_examples`` (the CNN's validation tracks, kept out of the fit so that the
validation split compares like with like); writes ``baseline_factors`` (a prediction for
every track with a usable mel, ``in_fit`` marking the tracks the regression saw) and
``baseline_rejects``.

1. K-means codebook (Spark MLlib) on a sample of standardised frames of the *fit* tracks
   (tracks with ALS factors, minus validation tracks; held-out cold tracks have none), so
   nothing about a test track shapes the baseline.
2. Every track's bag of words (executors); bad mels go to ``baseline_rejects``.
3. PCA and ridge from moments summed in the executors (``treeReduce``): the driver sees
   k x k numbers, never a histogram.
4. Predictions for every track, in the executors.

Cost per track of 30 s (1,292 frames), one core of the 2-core dev VM: MFCC + deltas 8 ms,
quantisation 10 ms at k = 256 (1,292 x k x 39 x 2 flops), 69 ms at the paper's k = 4,000.
At 1e6 tracks: ~5 core-hours at k = 256 (~21 at k = 4,000) plus one read of the mels
(330 GB); at 1e7 tracks ten times that.  K-means is bounded by ``kmeans_max_frames`` x k x
39 per iteration whatever the catalogue.  The driver holds only k x k moments (128 MB at
k = 4,000) and the model; the histograms are persisted (k float32 per track: 10 GB at 1e7
tracks and k = 256, spilled to disk by Spark).
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pandas as pd

from deepcuts.cf import baseline as B
from deepcuts.core.runs import Laps
from deepcuts.core.spark import sum_moments
from deepcuts.core.tables import BASELINE_FACTORS, BASELINE_REJECTS, MELS, TRACK_FACTORS, VALIDATION_EXAMPLES

log = logging.getLogger(__name__)


HIST_SCHEMA = "track_id string, hist array<float>, reason string, detail string"



def _features(row, bc) -> np.ndarray:
    return B.stored_mel_features(row.mel, int(row.n_mels), int(row.n_frames), bc.n_mfcc, bc.delta_width)


def _frame_sampler(bc):
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        for batch in batches:
            out = []
            for row in batch.itertuples(index=False):
                try:
                    features = _features(row, bc)
                except B.RejectedMel:
                    continue   # counted with its reason when the histograms are made
                out.extend(features[B.sample_frames(len(features), bc.kmeans_frames_per_track, bc.seed,
                                                    row.track_id)])
            yield pd.DataFrame({"features": out})
    return run


def _standardise(mean: np.ndarray, std: np.ndarray):
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            x = np.stack(batch["features"].to_numpy()) if len(batch) else np.zeros((0, len(mean)))
            yield pd.DataFrame({"features": list(((x - mean) / std).astype(np.float32))})
    return run


def _bag_of_words(bc, model_bc):
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        model = model_bc.value
        for batch in batches:
            rows = []
            for row in batch.itertuples(index=False):
                try:
                    rows.append((row.track_id, model.bag_of_words(_features(row, bc)), None, None))
                except B.RejectedMel as exc:
                    rows.append((row.track_id, None, exc.reason, exc.detail[:500]))
            yield pd.DataFrame(rows, columns=["track_id", "hist", "reason", "detail"])
    return run


def _predictor(model_bc):
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        model = model_bc.value
        for batch in batches:
            hist = np.stack(batch["hist"].to_numpy()) if len(batch) else np.zeros((0, model.codebook_size))
            yield pd.DataFrame({"track_id": batch["track_id"].to_numpy(), "factors": list(model.predict(hist)),
                                "in_fit": batch["in_fit"].to_numpy()})
    return run


def run(ctx) -> dict:
    """Fit the baseline and predict every track (module docstring); returns the summary."""
    from pyspark import StorageLevel
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F
    from deepcuts.evaluation.runner import hash_unit

    spark, bc = ctx.spark, ctx.cfg.baseline
    from deepcuts.stages.content import plays_unset
    if plays_unset(ctx.cfg):   # content-only mode (issue 18): no ALS factors to regress on
        return {"skipped": f"{plays_unset(ctx.cfg)}: the baseline regresses ALS factors"}
    lap = Laps()
    timings = lap.seconds

    persisted = []
    try:
        mels = ctx.read(MELS).select("track_id", "mel", "n_mels", "n_frames")
        targets = ctx.read(TRACK_FACTORS).select("track_id", F.col("factors_unit").alias("target"))
        held_out_of_fit = 0
        if ctx.exists(VALIDATION_EXAMPLES):
            validation = ctx.read(VALIDATION_EXAMPLES).select("track_id").distinct()
            held_out_of_fit = validation.count()
            targets = targets.join(validation, "track_id", "left_anti")
        fit_ids = targets.select("track_id").persist(StorageLevel.MEMORY_AND_DISK)
        persisted.append(fit_ids)
        n_fit_candidates = fit_ids.count()
        if n_fit_candidates < 2:
            raise RuntimeError("the baseline needs track_factors for at least two tracks with mels: "
                               "run the ingest and factors stages first")

        # 1. the codebook, on frames of the fit tracks only
        per_track = bc.kmeans_frames_per_track
        share = min(1.0, bc.kmeans_max_frames / float(n_fit_candidates * per_track))
        source = mels.join(fit_ids, "track_id", "left_semi")
        if share < 1.0:
            source = source.where(hash_unit(bc.seed, "track_id") < F.lit(share))
        # The sample is bounded (kmeans_max_frames) but sits in the few file splits of mels it
        # came from (3 tasks at 8,000 short tracks): spread it so every K-means pass uses every core.
        frames = source.mapInPandas(_frame_sampler(bc), "features array<float>") \
            .repartition(ctx.cfg.spark.shuffle_partitions).persist(StorageLevel.MEMORY_AND_DISK)
        persisted.append(frames)
        frame_moments = sum_moments(frames, lambda b: B.cross_moments(np.stack(b["features"].to_numpy())))
        if frame_moments is None:
            raise RuntimeError("no usable mel among the tracks with factors: nothing to fit the baseline on")
        mean, std = B.standardiser(frame_moments)
        n_frames = int(frame_moments["n"])
        k = min(bc.codebook_size, n_frames)
        standard = frames.mapInPandas(_standardise(mean, std), "features array<float>") \
            .select(array_to_vector("features").alias("features"))
        kmeans = KMeans(k=k, maxIter=bc.kmeans_iterations, seed=bc.seed, featuresCol="features").fit(standard)
        centroids = np.asarray(kmeans.clusterCenters(), dtype=np.float32)
        lap("codebook")

        # 2. every track's bag of words
        quantiser = B.BaselineModel(bc.n_mfcc, bc.delta_width, mean, std, centroids, np.zeros(len(centroids)),
                                    np.zeros((len(centroids), 0)), np.zeros((0, 0)), np.zeros(0))
        quantiser_bc = spark.sparkContext.broadcast(quantiser)
        hists = mels.mapInPandas(_bag_of_words(bc, quantiser_bc), HIST_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)
        persisted.append(hists)
        ctx.write(hists.where(F.col("reason").isNotNull())
                  .select("track_id", "reason", "detail", F.lit(ctx.run_id).alias("run_id")), BASELINE_REJECTS)
        rejected = {r["reason"]: r["n"] for r in hists.where(F.col("reason").isNotNull())
                    .groupBy("reason").agg(F.count("*").alias("n")).collect()}
        good = hists.where(F.col("reason").isNull()).select("track_id", "hist")
        lap("bag_of_words")

        # 3. PCA and ridge on the fit tracks, from moments
        fit = good.join(targets, "track_id").persist(StorageLevel.MEMORY_AND_DISK)
        persisted.append(fit)
        pca_moments = sum_moments(fit.select("hist"), lambda b: B.cross_moments(np.stack(b["hist"].to_numpy())))
        if pca_moments is None or int(pca_moments["n"]) < 2:
            raise RuntimeError("fewer than two fit tracks have a usable mel: cannot fit the baseline")
        pca_mean, components, eigenvalues = B.pca_basis(pca_moments, bc.pca_variance)

        pca_bc = spark.sparkContext.broadcast((pca_mean, components))   # k x d: not into every closure

        def ridge_partial(batch: pd.DataFrame) -> dict:
            centre, basis = pca_bc.value
            z = (np.stack(batch["hist"].to_numpy()).astype(np.float64) - centre) @ basis
            return B.cross_moments(z, np.stack(batch["target"].to_numpy()))
        weights, intercept = B.ridge_solution(sum_moments(fit, ridge_partial), bc.ridge, eigenvalues)
        model = B.BaselineModel(bc.n_mfcc, bc.delta_width, mean, std, centroids, pca_mean, components, weights,
                                intercept)
        lap("fit")

        # 4. a prediction for every track with a bag of words
        model_bc = spark.sparkContext.broadcast(model)
        in_fit = fit.select("track_id", F.lit(True).alias("in_fit"))
        predictions = (good.join(in_fit, "track_id", "left").fillna({"in_fit": False})
                       .mapInPandas(_predictor(model_bc), "track_id string, factors array<float>, in_fit boolean")
                       .withColumn("run_id", F.lit(ctx.run_id)))
        written = ctx.write(predictions, BASELINE_FACTORS)
        lap("predict")
        total_variance = float(np.trace(pca_moments["aa"] / float(pca_moments["n"])
                                        - np.outer(pca_mean, pca_mean)))
        return {
            "tracks_predicted": written.rows,
            "rejected": rejected,
            "fit_tracks": int(pca_moments["n"]),
            "validation_tracks_kept_out": held_out_of_fit,
            "kmeans": {"codebook_size": k, "frames": n_frames, "iterations": bc.kmeans_iterations,
                       "track_share_sampled": round(share, 4)},
            "pca": {"components": int(components.shape[1]), "of": int(components.shape[0]),
                    "variance_kept": round(float(eigenvalues.sum()) * (pca_moments["n"] - 1)
                                           / pca_moments["n"] / total_variance, 4) if total_variance > 0 else None},
            "ridge": {"relative": bc.ridge, "absolute": float(bc.ridge * np.mean(eigenvalues))},
            "seconds": timings,
        }
    finally:
        for df in persisted:
            df.unpersist()
