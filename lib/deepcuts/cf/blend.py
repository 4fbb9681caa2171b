"""Tracks with a little usage: the audio prediction as the prior of their ALS factors.

One extra implicit-ALS item half-step after the fit, user factors X fixed.  Spark's item step
(Hu, Koren & Volinsky 2008, Spark's regularisation scaled by the track's n_i listeners L)
minimises ``Σ_{u∈L} c_ui (1 − x_uᵀy)² + Σ_{u∉L} (0 − x_uᵀy)² + λ n_i ‖y‖²``, i.e. solves
``A_i y = b_i`` with

    A_i = XᵀX + Σ_{u∈L} (c_ui − 1) x_u x_uᵀ + λ n_i I,      b_i = Σ_{u∈L} c_ui x_u

The ``Σ_{u∉L} (x_uᵀy)²`` term - everyone who did not play the track "dislikes" it - is what
shrinks a track with few plays towards zero: for a track of the long tail most of those
users never met it.  The blend replaces that zero by the audio model's guess: a non-listener's
preference target is ``x_uᵀŷ_i`` (ŷ_i: the audio vector, already in the ALS space), and a
prior ``s ‖y − ŷ_i‖²`` pulls towards the audio vector:

    y_i = (A_i + s I)⁻¹ (b_i + (XᵀX − X_LᵀX_L + s I) ŷ_i)

So a track with no plays gets exactly ``ŷ_i`` (A_i = XᵀX), a track with plays a mix weighted
by its listeners' confidences (each play pulls y towards its listener, the audio guess holds
every other direction), ``s -> ∞`` gives ``ŷ_i``, and without an audio vector (ŷ_i = 0) it is
exactly the ALS item step.  ``s`` is ``infer.blend_prior_strength`` times the mean eigenvalue
of XᵀX (trace / rank), so the setting does not scale with the number of users.

Why not the textbook ``(A_i + s I)⁻¹ (b_i + s ŷ_i)`` (the prior only as the λ target): its
no-plays limit is ``(XᵀX + s I)⁻¹ s ŷ_i``, not ``ŷ_i``, and on the small test demo's
sparse-warm validation split it never beat audio alone (a numpy check over s = 0.01 .. 1e4:
best AUC 0.7651 against audio's 0.7658; this form: 0.7714 at the chosen strength).

The pure functions (``item_system``, ``blend_vector``, ``blend_partition``) need no Spark;
``blend_vectors`` is the Spark wiring used by infer (serving) and evaluate (the sparse-warm
split).  Only tracks with at most ``infer.blend_max_listeners`` listeners are solved (one
rank x rank solve each); the groups stay tiny and no per-track pandas frame is made: the
listener rows are sorted by track within partitions and a partition is cut into tracks in
numpy.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

BLEND_SCHEMA = "track_id string, factors array<float>, n_listeners long, has_prior boolean"


# --- pure ----------------------------------------------------------------------------------
def item_system(listener_factors: np.ndarray, confidences: np.ndarray, gram: np.ndarray,
                reg: float) -> tuple[np.ndarray, np.ndarray]:
    """(A_i, b_i) of Spark's implicit item step for one track (module docstring).

    ``listener_factors`` [n, rank] (the user vectors of its listeners), ``confidences`` [n]
    (``1 + alpha * log(1 + plays / epsilon)``), ``gram`` = XᵀX over all users, ``reg`` =
    ``factors.reg`` (Spark multiplies it by the track's n listeners)."""
    x = np.asarray(listener_factors, dtype=np.float64).reshape(-1, gram.shape[0])
    c = np.asarray(confidences, dtype=np.float64)
    a = gram + (x * (c - 1.0)[:, None]).T @ x + np.eye(gram.shape[0]) * (reg * len(x))
    return a, x.T @ c


def prior_precision(gram: np.ndarray, strength: float) -> float:
    """``s`` of the module docstring: ``strength`` x the mean eigenvalue of XᵀX."""
    return float(strength) * float(np.trace(gram)) / gram.shape[0]


def blend_vector(listener_factors: np.ndarray, confidences: np.ndarray, gram: np.ndarray, reg: float,
                 prior: np.ndarray | None, s: float) -> np.ndarray:
    """The blended factors of one track (module docstring; ``s`` absolute, see
    ``prior_precision``).  ``prior`` None: the ALS item half-step; no listeners: the prior
    itself.  A singular system gives NaNs."""
    x = np.asarray(listener_factors, dtype=np.float64).reshape(-1, gram.shape[0])
    if len(x) == 0:
        if prior is None:
            raise ValueError("a track with neither listeners nor a prior has no vector")
        return np.asarray(prior, dtype=np.float64).copy()
    a, b = item_system(x, confidences, gram, reg)
    try:
        if prior is None:
            return np.linalg.solve(a, b)
        eye = np.eye(len(b)) * s
        return np.linalg.solve(a + eye, b + (gram - x.T @ x + eye) @ np.asarray(prior, dtype=np.float64))
    except np.linalg.LinAlgError:
        return np.full(len(b), np.nan)


def _solve_tracks(frame: pd.DataFrame, gram: np.ndarray, reg: float, s: float) -> pd.DataFrame:
    """Every track of ``frame`` (rows sorted by track_id, whole tracks only): one output row each."""
    ids = frame["track_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    vectors = frame["factors"].to_numpy()
    is_prior = frame["is_prior"].to_numpy(dtype=bool)
    conf = frame["confidence"].to_numpy(dtype=np.float64, na_value=np.nan)
    rank = gram.shape[0]
    out_ids, out_vecs, out_n, out_prior = [], [], [], []
    for first, end in zip(starts, ends):
        priors = [vectors[j] for j in range(first, end) if is_prior[j]]
        rows = [j for j in range(first, end) if not is_prior[j]]
        x = np.stack([vectors[j] for j in rows]).astype(np.float64) if rows else np.zeros((0, rank))
        prior = np.asarray(priors[0], dtype=np.float64) if priors else None
        if not rows and prior is None:
            continue
        y = blend_vector(x, conf[rows], gram, reg, prior, s)
        if not np.isfinite(y).all():   # a degenerate system: the audio vector, else nothing
            if prior is None:
                continue
            y = prior
        out_ids.append(ids[first])
        out_vecs.append(y.astype(np.float32))
        out_n.append(len(rows))
        out_prior.append(prior is not None)
    return pd.DataFrame({"track_id": out_ids, "factors": out_vecs, "n_listeners": np.asarray(out_n, np.int64),
                         "has_prior": np.asarray(out_prior, bool)})


def blend_partition(batches: Iterator[pd.DataFrame], gram: np.ndarray, reg: float,
                    s: float) -> Iterator[pd.DataFrame]:
    """mapInPandas body over rows ``track_id, is_prior, factors, confidence`` sorted by track
    within the partition (a track's rows may straddle two Arrow batches: the last track of
    a batch waits for the next).  Listener rows carry a user vector and its confidence;
    the (at most one) prior row of a track carries its audio vector."""
    pending = None
    for batch in batches:
        if len(batch) == 0:
            continue
        if pending is not None:
            batch = pd.concat([pending, batch], ignore_index=True)
        last = batch["track_id"].iloc[-1]
        tail = (batch["track_id"] == last).to_numpy()
        pending = batch[tail]
        done = batch[~tail]
        if len(done):
            yield _solve_tracks(done.reset_index(drop=True), gram, reg, s)
    if pending is not None and len(pending):
        yield _solve_tracks(pending.reset_index(drop=True), gram, reg, s)


# --- Spark wiring ------------------------------------------------------------------------------
def user_gram(users) -> tuple[np.ndarray, int]:
    """(XᵀX, rows) of ``users`` (factors) in one scan: per-partition sums (the WPE statistics'
    ``partial_gram``), only rank x rank numbers reach the driver."""
    from deepcuts.nn.trainset import partial_gram
    partials = users.select("factors").mapInPandas(partial_gram, "gram array<double>, n long").collect()
    if not partials:
        from deepcuts.core.errors import InputMissing
        raise InputMissing("table user_factors is empty: run the factors stage first")
    gram = np.sum([np.asarray(r["gram"], dtype=np.float64) for r in partials], axis=0)
    rank = int(round(np.sqrt(gram.size)))
    return gram.reshape(rank, rank), int(sum(r["n"] for r in partials))


def fit_pairs(spark, fc, holdout=None):
    """(user_id, track_id, plays) the published fit was trained on: ``factors.plays`` read and
    validated as the factors stage reads it, minus the pairs it held out (``eval_holdout``)."""
    from pyspark.sql import functions as F
    from deepcuts.cf.plays import aggregate_pairs, read_raw_plays, validate_plays
    validated = validate_plays(read_raw_plays(spark, fc.plays, fc.plays_format), fc.plays_format)
    pairs = aggregate_pairs(validated.where(F.col("reason").isNull()))
    if holdout is not None:
        pairs = pairs.join(holdout.select("user_id", "track_id"), ["user_id", "track_id"], "left_anti")
    return pairs


def listener_counts(pairs, users):
    """(track_id, n_listeners): listeners with a user vector, per track."""
    return pairs.join(users.select("user_id"), "user_id", "left_semi").groupBy("track_id").count() \
        .withColumnRenamed("count", "n_listeners")


def blend_vectors(pairs, users, priors, *, gram: np.ndarray, fc, strength: float, max_listeners: int,
                  partitions: int):
    """(track_id, factors, n_listeners, has_prior): the blend (``strength``: the relative
    prior strength, ``infer.blend_prior_strength``) of every track with 1 ..
    ``max_listeners`` listeners in ``pairs`` (user_id, track_id, plays) who have a vector in
    ``users`` (user_id, factors).  ``priors`` (track_id, factors): audio vectors in the ALS
    space (a track without one gets its usage half-step, ``has_prior`` false).  The solves
    run in ``partitions`` tasks (``spark.shuffle_partitions``)."""
    from pyspark.sql import functions as F
    from deepcuts.cf.plays import rating_column
    users = users.select("user_id", "factors")
    small = listener_counts(pairs, users).where(F.col("n_listeners") <= max_listeners).select("track_id")
    listeners = (pairs.join(small, "track_id", "left_semi").join(users, "user_id")
                 .select("track_id", F.lit(False).alias("is_prior"), F.col("factors").cast("array<float>"),
                         (1.0 + F.lit(float(fc.alpha)) * rating_column(F.col("plays"), fc.epsilon))
                         .alias("confidence")))
    prior_rows = priors.join(small, "track_id", "left_semi").select(
        "track_id", F.lit(True).alias("is_prior"), F.col("factors").cast("array<float>"),
        F.lit(None).cast("double").alias("confidence"))
    reg, s = float(fc.reg), prior_precision(gram, strength)

    def body(batches):
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        yield from blend_partition(batches, gram, reg, s)

    # An explicit count: without one, adaptive execution coalesces the shuffle by bytes, and
    # listener rows are small while the solve per track is not (2 tasks at 10^5 tracks).
    return (listeners.unionByName(prior_rows).repartition(partitions, "track_id")
            .sortWithinPartitions("track_id", "is_prior").mapInPandas(body, BLEND_SCHEMA))


def serving_rows(ctx, track_factors, audio_vectors, model_id: str, sources: tuple[str, str, str]):
    """infer's ``serving_factors`` rows with ``infer.serving = "blend"`` (or None when its
    inputs are missing) and the summary's ``blend`` entry.

    ``audio_vectors`` (track_id, factors): the model's vectors already in the ALS space.
    ``sources``: the (usage, audio, blend) source names.  Tracks with 1..blend_max_listeners
    listeners in the published fit's plays and an audio vector: blend; other tracks with
    ALS factors: usage (many listeners, or no audio vector); the rest with audio: audio."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from deepcuts.core.tables import EVAL_HOLDOUT, USER_FACTORS
    cfg = ctx.cfg
    ic = cfg.infer
    usage_src, audio_src, blend_src = sources
    if not ctx.exists(USER_FACTORS):
        return None, {"mode": "threshold", "why": "no user_factors table"}
    users = ctx.read(USER_FACTORS).select("user_id", "factors")
    gram, _ = user_gram(users)
    holdout = ctx.read(EVAL_HOLDOUT) if ctx.exists(EVAL_HOLDOUT) else None
    pairs = fit_pairs(ctx.spark, cfg.factors, holdout)
    blended = blend_vectors(pairs, users, audio_vectors.select("track_id", "factors"), gram=gram, fc=cfg.factors,
                            strength=ic.blend_prior_strength, max_listeners=ic.blend_max_listeners,
                            partitions=cfg.spark.shuffle_partitions) \
        .where("has_prior").persist(StorageLevel.MEMORY_AND_DISK)
    null_model = F.lit(None).cast("string").alias("model_id")
    rows = (blended.select("track_id", "factors", F.lit(blend_src).alias("source"), F.lit(model_id).alias("model_id"))
            .unionByName(track_factors.join(blended, "track_id", "left_anti")
                         .select("track_id", "factors", F.lit(usage_src).alias("source"), null_model)))
    audio = audio_vectors.join(rows.select("track_id"), "track_id", "left_anti").select(
        "track_id", "factors", F.lit(audio_src).alias("source"), F.lit(model_id).alias("model_id"))
    listeners = {int(r["n_listeners"]): int(r["count"])
                 for r in blended.groupBy("n_listeners").count().collect()}   # <= blend_max_listeners keys
    info = {"mode": "blend", "prior_strength": ic.blend_prior_strength, "max_listeners": ic.blend_max_listeners,
            "blended_by_listeners": dict(sorted(listeners.items())), "_persisted": blended}
    return rows.unionByName(audio), info
