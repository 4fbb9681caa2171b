"""The evaluation this issue replaced (lib/deepcuts/evaluation/metrics.py at 80c3998), frozen
as bench/evaluation.py's anchor: every candidate vector collected to the driver as Rows and
broadcast, every user's candidates fully sorted.  Not used by the pipeline."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pandas as pd

SCORE_CELLS_PER_CHUNK = 8_000_000


def _positive_ranks(pos_scores: np.ndarray, neg_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For positives sorted by descending score: their 1-based ranks among all candidates
    (negatives tying a positive rank ahead of it) and, per positive, the number of
    negatives it beats (ties counting 1/2)."""
    pos = np.sort(np.asarray(pos_scores, dtype=np.float64))[::-1]
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64))
    below = np.searchsorted(neg, pos, side="left")          # negatives strictly lower
    below_or_tied = np.searchsorted(neg, pos, side="right")
    negatives_ahead = len(neg) - below                       # >= the positive's score
    ranks = np.arange(1, len(pos) + 1) + negatives_ahead
    beaten = below + 0.5 * (below_or_tied - below)
    return ranks, beaten


def _split(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError("scores and positive must be 1-D and of the same length")
    return scores[positive], scores[~positive]


def user_metrics(scores: np.ndarray, positive: np.ndarray, k: int) -> tuple[float, float]:
    """(AP@k, AUC) of one user, sharing one sort; NaNs where undefined."""
    pos, neg = _split(scores, positive)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    ranks, beaten = _positive_ranks(pos, neg)
    hits = ranks <= k
    ap = (np.arange(1, len(pos) + 1)[hits] / ranks[hits]).sum() / min(len(pos), k)
    return float(ap), float(beaten.sum() / (len(pos) * len(neg)))


def score_users(user_vectors: np.ndarray, track_matrix: np.ndarray, track_index: pd.Index,
                positives: Sequence[Sequence[str]], excluded: Sequence[Sequence[str] | None],
                k: int) -> pd.DataFrame:
    """Per-user (ap, auc, n_positives, n_candidates, n_positives_without_vector) for a batch
    of users.

    ``positives``/``excluded`` name track ids per user; positives without a candidate
    vector are left out of the ranking and counted.  Excluded tracks are removed from the user's
    candidates (warm split: the user's training plays)."""
    rows = []
    n_tracks = track_matrix.shape[0]
    step = max(1, SCORE_CELLS_PER_CHUNK // max(1, n_tracks))
    for start in range(0, len(user_vectors), step):
        scores = user_vectors[start:start + step] @ track_matrix.T
        for offset, row in enumerate(scores):
            u = start + offset
            pos_cols = track_index.get_indexer(list(positives[u]))
            missing = int((pos_cols < 0).sum())
            pos_cols = np.unique(pos_cols[pos_cols >= 0])
            keep = np.ones(n_tracks, dtype=bool)
            if excluded[u] is not None and len(excluded[u]):
                ex_cols = track_index.get_indexer(list(excluded[u]))
                keep[ex_cols[ex_cols >= 0]] = False
            keep[pos_cols] = True
            positive = np.zeros(n_tracks, dtype=bool)
            positive[pos_cols] = True
            ap, area = user_metrics(row[keep], positive[keep], k)
            rows.append((ap, area, len(pos_cols), int(keep.sum()), missing))
    return pd.DataFrame(rows, columns=["ap", "auc", "n_positives", "n_candidates",
                                       "n_positives_without_vector"])


def hash_unit(seed: int, *cols):
    """A stable pseudo-random number in [0, 1) per row from ``cols`` (xxhash64, seeded):
    the same ids fall on the same side of a split every night."""
    from pyspark.sql import functions as F
    return F.pmod(F.xxhash64(F.lit(f"deepcuts:{seed}"), *[F.col(c) if isinstance(c, str) else c for c in cols]),
                  F.lit(1_000_003)).cast("double") / F.lit(1_000_003.0)


def _limit_threads(cores: int):
    """BLAS threads = the task's cores, so concurrent tasks don't oversubscribe the node."""
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(limits=max(1, cores))
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn (librosa)
        import contextlib
        return contextlib.nullcontext()


def evaluate_ranking(spark, user_vectors_df, positives_df, candidate_vectors_df, k: int, *,
                     split: str, predictor: str, excluded_df=None, max_users: int = 0,
                     seed: int = 0) -> dict:
    """mAP@k and AUC (module docstring) of ``candidate_vectors_df`` (track_id, factors) for
    the users of ``user_vectors_df`` (user_id, factors) against ``positives_df`` (user_id,
    track_id), optionally removing ``excluded_df`` (user_id, track_id) from each user's
    candidates.  ``max_users`` > 0 scores a stable hash sample of about that many users
    (the counts below then describe the sample).

    Returns split, predictor, map_at_k, auc, k, n_users (scored), n_tracks (candidates),
    n_users_skipped (no positive or no negative), n_users_without_vector,
    n_positives_without_vector (held-out pairs whose track the predictor has no vector for).
    """
    from pyspark import TaskContext
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, DoubleType, LongType, StructField, StructType

    candidates = candidate_vectors_df.select("track_id", "factors").dropDuplicates(["track_id"]).collect()
    track_ids = [r["track_id"] for r in candidates]
    rank = len(candidates[0]["factors"]) if candidates else 0
    matrix = np.asarray([r["factors"] for r in candidates], dtype=np.float32).reshape(len(candidates), rank)
    shared = spark.sparkContext.broadcast((np.asarray(track_ids, dtype=object), matrix))

    by_user = positives_df.select("user_id", "track_id").groupBy("user_id").agg(
        F.collect_set("track_id").alias("positives"))
    if max_users:
        n = by_user.count()
        if n > max_users:
            by_user = by_user.where(hash_unit(seed, "user_id") < F.lit(max_users / n))
    # a left join: users the predictor's space has no vector for are counted, not lost
    scored = by_user.join(user_vectors_df.select("user_id", "factors"), "user_id", "left")
    if excluded_df is not None:
        ex = excluded_df.select("user_id", "track_id").groupBy("user_id").agg(
            F.collect_list("track_id").alias("excluded"))
        scored = scored.join(ex, "user_id", "left")
    else:
        scored = scored.withColumn("excluded", F.lit(None).cast("array<string>"))

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        ids, mat = shared.value
        index = pd.Index(ids)
        ctx = TaskContext.get()
        with _limit_threads(ctx.cpus() if ctx is not None else 1):
            for batch in batches:
                has_vector = batch["factors"].notna().to_numpy()
                with_vec = batch[has_vector]
                vectors = (np.stack(with_vec["factors"].to_numpy()).astype(np.float32) if len(with_vec)
                           else np.zeros((0, mat.shape[1]), np.float32))
                out = score_users(vectors, mat, index, list(with_vec["positives"]),
                                  list(with_vec["excluded"]), k)
                out["has_vector"] = True
                without = batch[~has_vector]
                lost = pd.DataFrame({"ap": np.nan, "auc": np.nan, "n_positives": 0, "n_candidates": 0,
                                     "n_positives_without_vector": without["positives"].map(len).to_numpy(),
                                     "has_vector": False})
                yield pd.concat([out, lost], ignore_index=True)

    schema = StructType([StructField("ap", DoubleType()), StructField("auc", DoubleType()),
                         StructField("n_positives", LongType()), StructField("n_candidates", LongType()),
                         StructField("n_positives_without_vector", LongType()),
                         StructField("has_vector", BooleanType())])
    per_user = scored.select("factors", "positives", "excluded").mapInPandas(score, schema)
    scored_ok = F.col("has_vector") & ~F.isnan("auc")
    agg = per_user.agg(
        F.avg(F.when(scored_ok, F.col("ap"))).alias("map_at_k"),
        F.avg(F.when(scored_ok, F.col("auc"))).alias("auc"),
        F.sum(scored_ok.cast("long")).alias("n_users"),
        F.sum((F.col("has_vector") & F.isnan("auc")).cast("long")).alias("n_users_skipped"),
        F.sum((~F.col("has_vector")).cast("long")).alias("n_users_without_vector"),
        F.sum("n_positives_without_vector").alias("n_positives_without_vector")).first()
    shared.unpersist()
    return {"split": split, "predictor": predictor, "map_at_k": agg["map_at_k"], "auc": agg["auc"], "k": k,
            "n_users": int(agg["n_users"] or 0), "n_tracks": len(track_ids),
            "n_users_skipped": int(agg["n_users_skipped"] or 0),
            "n_users_without_vector": int(agg["n_users_without_vector"] or 0),
            "n_positives_without_vector": int(agg["n_positives_without_vector"] or 0)}

