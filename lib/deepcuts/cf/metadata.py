"""The metadata prior (issue 13, step 5): a new track by a known album or artist.

A new track by an artist the catalogue already plays is the commonest cold start, and
artist-aware methods more than double recall over content-only ones (Tamm et al. 2026).
When the manifest has ``artist`` / ``album`` columns (the ``track_metadata`` table), a track
without plays whose album (else artist: ``infer.metadata_levels``, most specific first) has
warm tracks (ALS vectors from at least ``infer.min_listeners_for_usage`` listeners) gets

    v = w_l · p + (1 − w_l) · a        p: the mean ALS vector of the group's warm tracks

with ``a`` its audio vector in the ALS space (as infer serves it) and one weight ``w_l`` per
level, fitted on the CNN's validation tracks (warm, never trained on) by least squares:

    w_l = clip( Σ_i ⟨p_i − a_i, y_i − a_i⟩ / Σ_i ‖p_i − a_i‖², 0, 1 )

``y_i`` is the track's own ALS vector and ``p_i`` its group's mean *without* it (leave one
out), so the fit sees what a cold track sees.  A level with fewer validation tracks than
``infer.metadata_min_validation_tracks`` shares the weight fitted on every level's
validation tracks pooled; with fewer than that in all, it is not used (a track of that level
falls through to the next).  Infer serves the result as source ``metadata``; evaluate scores it as its own
predictor ``metadata`` on the cold split, never as the CNN's figure.

``least_squares_weight`` and ``blend`` are pure (no Spark); ``group_priors``,
``fit_weights``, ``prior_vectors`` and ``metadata_vectors`` are the Spark wiring infer and
evaluate share.

Cost: per level one aggregation of the warm tracks' vectors by group (a rank-float sum per
group) and joins keyed by group and track; the driver gets three sums per level.  At 10⁶
tracks ~10⁶ vectors (~130 MB at rank 32) shuffled once per level, at 10⁷ ~1.3 GB: a few
core-minutes; memory per task is bounded by one group's partial sum.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

LEVELS = ("album", "artist")


# --- pure ------------------------------------------------------------------------------------------
def least_squares_weight(cross: float, spread: float) -> float | None:
    """argmin_w Σ‖a + w (p − a) − y‖² = cross / spread, clipped to [0, 1]; None when every
    prior equals its audio vector (spread 0: nothing to fit)."""
    if not spread > 0:
        return None
    return float(min(1.0, max(0.0, cross / spread)))


def blend(audio: np.ndarray, prior: np.ndarray, weight: float) -> np.ndarray:
    """w · prior + (1 − w) · audio (row-wise over [n, rank] arrays, or one vector)."""
    return weight * np.asarray(prior, np.float64) + (1.0 - weight) * np.asarray(audio, np.float64)


def level_fit(cross: float, spread: float, audio_sse: float, n: int, min_tracks: int) -> dict:
    """One level's weight and its validation MSE with and without the prior:
    ‖a + w d − y‖² = w²‖d‖² − 2w⟨d, y − a⟩ + ‖y − a‖² summed over the level's tracks."""
    weight = least_squares_weight(cross, spread) if n >= min_tracks else None
    out = {"weight": None if weight is None else round(weight, 4), "validation_tracks": int(n),
           "audio_mse": round(audio_sse / n, 6) if n else None}
    if weight is not None:
        out["prior_mse"] = round(_sse(weight, cross, spread, audio_sse, n) / n, 6)
    elif n < min_tracks:
        out["why"] = f"{n} validation tracks with this prior (< infer.metadata_min_validation_tracks)"
    return out


# --- Spark -----------------------------------------------------------------------------------------
def _dot(a, b):
    from pyspark.sql import functions as F
    return F.aggregate(F.zip_with(a, b, lambda x, y: x * y), F.lit(0.0).cast("double"), lambda acc, x: acc + x)


def _minus(a, b):
    from pyspark.sql import functions as F
    return F.zip_with(a, b, lambda x, y: x - y)


def warm_vectors(track_factors, min_listeners: int):
    """(track_id, factors) of the tracks served their usage: the prior's members."""
    from pyspark.sql import functions as F
    return track_factors.where(F.col("n_listeners") >= min_listeners).select("track_id", "factors")


def group_sums(warm, metadata, level: str):
    """(group, total, n): the sum of the warm vectors of each ``level`` value, and how many."""
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.ml.stat import Summarizer
    from pyspark.sql import functions as F
    keyed = warm.join(metadata.where(F.col(level).isNotNull()).select("track_id", F.col(level).alias("group")),
                      "track_id")
    return keyed.groupBy("group").agg(vector_to_array(Summarizer.sum(array_to_vector("factors"))).alias("total"),
                                      F.count("*").alias("n"))


def group_priors(targets, warm, metadata, levels: Sequence[str]):
    """(track_id, level, prior, group_tracks) for the tracks of ``targets`` (track_id) at the
    first of ``levels`` whose group has a warm track other than the target itself (a warm
    target's own vector is left out of its group's mean)."""
    from pyspark.sql import functions as F
    tracks = (targets.select("track_id").join(metadata.select("track_id", *levels), "track_id")
              .join(warm.select("track_id", F.col("factors").alias("own")), "track_id", "left"))
    per_level = []
    for rank, level in enumerate(levels):
        sums = group_sums(warm, metadata, level).withColumnRenamed("group", level)
        joined = tracks.where(F.col(level).isNotNull()).join(sums, level)
        n = F.col("n") - F.when(F.col("own").isNotNull(), 1).otherwise(0)
        total = F.when(F.col("own").isNotNull(), _minus(F.col("total"), F.col("own"))).otherwise(F.col("total"))
        per_level.append(joined.select(
            "track_id", F.lit(level).alias("level"), F.lit(rank).alias("_rank"), n.alias("group_tracks"),
            F.transform(total, lambda x: x / n).alias("prior")).where(F.col("group_tracks") >= 1))
    union = per_level[0]
    for frame in per_level[1:]:
        union = union.unionByName(frame)
    best = union.groupBy("track_id").agg(
        F.min_by(F.struct("level", "prior", "group_tracks"), F.col("_rank")).alias("b"))   # the most specific
    return best.select("track_id", "b.level", "b.prior", "b.group_tracks")


def fit_weights(validation, audio, truth, warm, metadata, levels: Sequence[str], min_tracks: int) -> dict:
    """level -> :func:`level_fit` over the ``validation`` tracks (track_id) that have a prior at
    that level: ``audio`` their audio vectors in the ALS space, ``truth`` their ALS vectors."""
    from pyspark.sql import functions as F
    priors = group_priors(validation, warm, metadata, levels)
    joined = (priors.join(audio.select("track_id", F.col("factors").alias("a")), "track_id")
              .join(truth.select("track_id", F.col("factors").alias("y")), "track_id"))
    d, r = _minus(F.col("prior"), F.col("a")), _minus(F.col("y"), F.col("a"))
    sums = {row["level"]: (float(row["cross"]), float(row["spread"]), float(row["audio_sse"]), int(row["n"]))
            for row in joined.groupBy("level").agg(
                F.sum(_dot(d, r)).alias("cross"), F.sum(_dot(d, d)).alias("spread"),
                F.sum(_dot(r, r)).alias("audio_sse"), F.count("*").alias("n")).collect()}
    return fits_by_level(sums, levels, min_tracks)


def fits_by_level(sums: Mapping[str, tuple], levels: Sequence[str], min_tracks: int) -> dict:
    """level -> :func:`level_fit` from its (cross, spread, audio_sse, n) sums.  A level with too
    few validation tracks of its own shares the weight fitted on every level's tracks pooled,
    when those are enough (a small catalogue names few albums and artists)."""
    zero = (0.0, 0.0, 0.0, 0)
    pooled = tuple(sum(sums.get(level, zero)[i] for level in levels) for i in range(4))
    shared = level_fit(*pooled, min_tracks)
    out = {}
    for level in levels:
        fit = level_fit(*sums.get(level, zero), min_tracks)
        if fit["weight"] is None and shared["weight"] is not None and sums.get(level, zero)[3]:
            fit = {**level_fit(*sums[level], 1), "weight": shared["weight"],
                   "weight_from": f"all levels pooled ({pooled[3]} validation tracks)"}
            fit["prior_mse"] = round(_sse(shared["weight"], *sums[level]) / sums[level][3], 6)
        out[level] = fit
    return out


def _sse(weight: float, cross: float, spread: float, audio_sse: float, n: int) -> float:
    return weight * weight * spread - 2 * weight * cross + audio_sse


def prior_vectors(targets_audio, warm, metadata, weights: Mapping[str, dict]):
    """(track_id, factors, level) for the tracks of ``targets_audio`` (track_id, factors: audio
    in the ALS space) with a prior at a level whose weight was fitted; None when none was."""
    from pyspark.sql import functions as F
    used = [level for level, fit in weights.items() if fit.get("weight") is not None]
    if not used:
        return None
    priors = group_priors(targets_audio, warm, metadata, used)
    weight = F.lit(None).cast("double")
    for level in used:
        weight = F.when(F.col("level") == level, F.lit(weights[level]["weight"])).otherwise(weight)
    joined = priors.join(targets_audio.select("track_id", F.col("factors").alias("a")), "track_id") \
        .withColumn("w", weight)
    mixed = F.zip_with(F.col("prior"), F.col("a"), lambda p, x: (F.col("w") * p + (1 - F.col("w")) * x).cast("float"))
    return joined.select("track_id", mixed.alias("factors"), "level")


def metadata_vectors(ctx, audio_vectors, targets):
    """(the prior's vectors for ``targets`` (track_id, factors, level) or None, a summary).

    ``audio_vectors`` (track_id, factors): the audio model's vectors in the ALS space, for the
    targets and the CNN's validation tracks (where the weights are fitted)."""
    from pyspark.sql import functions as F
    from deepcuts.core.tables import TRACK_FACTORS, TRACK_METADATA, VALIDATION_EXAMPLES
    ic = ctx.cfg.infer
    if not ctx.exists(TRACK_METADATA):
        return None, {"why": "no track_metadata table (run ingest on a manifest with artist/album columns)"}
    metadata = ctx.read(TRACK_METADATA).select("track_id", *LEVELS)
    if not metadata.limit(1).count():
        return None, {"why": "track_metadata is empty: the manifest names no artist or album"}
    if not ctx.exists(VALIDATION_EXAMPLES):
        return None, {"why": "no validation_examples: the weights are fitted on the CNN's validation tracks"}
    track_factors = ctx.read(TRACK_FACTORS)
    warm = warm_vectors(track_factors, ic.min_listeners_for_usage)
    validation = ctx.read(VALIDATION_EXAMPLES).select("track_id")
    weights = fit_weights(validation, audio_vectors, track_factors.select("track_id", "factors"), warm, metadata,
                          ic.metadata_levels, ic.metadata_min_validation_tracks)
    targets_audio = audio_vectors.join(targets.select("track_id"), "track_id", "left_semi")
    return prior_vectors(targets_audio, warm, metadata, weights), {"levels": weights}


def with_metadata_rows(serving, blended, audio_source: str, metadata_source: str):
    """``serving`` (track_id, factors, source, model_id) with each ``audio_source`` row that has a
    prior in ``blended`` replaced by it, as ``metadata_source`` (one left join, no re-scan)."""
    from pyspark.sql import functions as F
    replace = (F.col("source") == audio_source) & F.col("_prior").isNotNull()
    return (serving.join(blended.select("track_id", F.col("factors").alias("_prior")), "track_id", "left")
            .select("track_id", F.when(replace, F.col("_prior")).otherwise(F.col("factors")).alias("factors"),
                    F.when(replace, F.lit(metadata_source)).otherwise(F.col("source")).alias("source"),
                    "model_id"))
