"""The evaluation protocol of van den Oord, Dieleman & Schrauwen (NIPS 2013, sec. 5.2).

Metrics, per user ``u`` with a latent vector ``x_u``:

* Candidates ``C_u``: the test tracks (cold split: every held-out track that has a vector
  from the predictor under test; warm split: every track of the model except the ones
  ``u`` played in training).  Each candidate ``i`` is scored ``s_ui = x_u . y_i``.
* Positives ``P_u``: the candidates ``u`` played in the held-out data; the other
  candidates are negatives ``N_u``.  Users with no positive or no negative are skipped
  (AUC is undefined for them) and counted.
* Ranking: candidates by descending score; a negative that ties a positive is ranked
  ahead of it (pessimistic: a constant predictor cannot look good).
* ``AP@k(u) = 1 / min(|P_u|, k) * sum over positives i ranked <= k of precision@rank(i)``
  where ``precision@r`` is the share of positives among the top ``r``.
* ``AUC(u)`` = the share of (positive, negative) pairs where the positive scores higher,
  ties counting one half (the Mann-Whitney statistic).
* ``mAP@k`` and ``AUC`` are the means of ``AP@k(u)`` and ``AUC(u)`` over the scored users.

The Spark side never brings users x tracks to the driver: the candidate vectors (the test
tracks) are broadcast and each executor scores its users in batches (``mapInPandas``);
only per-user metrics are averaged by Spark.  ``evaluate_cold_start`` is the public entry
point the train stage uses for its CNN-predicted vectors.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pandas as pd

COLD = "cold"
WARM = "warm"
# Scores of at most this many user x candidate cells are held at once per task.
SCORE_CELLS_PER_CHUNK = 8_000_000


# --- pure metrics --------------------------------------------------------------------------
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


def average_precision_at_k(scores, positive, k: int) -> float:
    """AP@k of one user's candidates (see the module docstring); NaN without a positive."""
    pos, neg = _split(scores, positive)
    if len(pos) == 0:
        return float("nan")
    ranks, _ = _positive_ranks(pos, neg)
    hits = ranks <= k
    precision = np.arange(1, len(pos) + 1)[hits] / ranks[hits]
    return float(precision.sum() / min(len(pos), k))


def auc(scores, positive) -> float:
    """AUC of one user's candidates (see the module docstring); NaN without a positive or a negative."""
    pos, neg = _split(scores, positive)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    _, beaten = _positive_ranks(pos, neg)
    return float(beaten.sum() / (len(pos) * len(neg)))


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


# --- Spark wiring --------------------------------------------------------------------------
def hash_unit(seed: int, *cols):
    """A stable pseudo-random number in [0, 1) per row from ``cols`` (xxhash64, seeded):
    the same ids fall on the same side of a split every night."""
    from pyspark.sql import functions as F
    return F.pmod(F.xxhash64(F.lit(f"deepcuts:{seed}"), *[F.col(c) if isinstance(c, str) else c for c in cols]),
                  F.lit(1_000_003)).cast("double") / F.lit(1_000_003.0)


def is_cold_track(fraction: float, seed: int, track_col: str = "track_id"):
    """True for the tracks the cold-start protocol holds out (deterministic hash split)."""
    from pyspark.sql import functions as F
    return hash_unit(seed, track_col) < F.lit(fraction)


def random_track_vectors(track_ids_df, rank: int, seed: int):
    """(track_id, factors): standard gaussian vectors, the random baseline's predictor."""
    from pyspark.sql import functions as F
    return track_ids_df.select(
        "track_id", F.array(*[F.randn(seed * 7919 + j) for j in range(rank)]).cast("array<float>").alias("factors"))


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


def evaluate_cold_start(spark, user_factors_df, holdout_df, track_vectors_df, k: int,
                        predictor_name: str, *, max_users: int = 0, seed: int = 0) -> dict:
    """The paper's cold-start evaluation of one predictor of track vectors.

    ``user_factors_df``: (user_id, factors), the published ALS fit (``user_factors``), fitted
    without the cold tracks' plays.  ``holdout_df``: ``eval_holdout`` (user_id, track_id[,
    split]); rows with split != "cold" are ignored.  ``track_vectors_df``: (track_id,
    factors), the predictor's vectors, in the same latent space as ``user_factors_df``.
    The candidates are the held-out tracks that have a vector; each user's positives are
    the held-out tracks they played.  Returns the dict of ``evaluate_ranking`` (split "cold").
    """
    from pyspark.sql import functions as F
    holdout = holdout_df
    if "split" in holdout.columns:
        holdout = holdout.where(F.col("split") == COLD)
    test_tracks = holdout.select("track_id").distinct()
    candidates = track_vectors_df.select("track_id", "factors").join(test_tracks, "track_id")
    return evaluate_ranking(spark, user_factors_df, holdout, candidates, k, split=COLD,
                            predictor=predictor_name, max_users=max_users, seed=seed)


METRIC_COLUMNS = ("split", "predictor", "map_at_k", "auc", "k", "n_users", "n_tracks")


def metrics_frame(spark, results: Sequence[dict], run_id: str):
    """``factor_metrics`` rows (one per result dict) as a Spark DataFrame."""
    from deepcuts.core.tables import FACTOR_METRICS, spark_schema
    rows = [{"run_id": run_id, **{c: r.get(c) for c in METRIC_COLUMNS}} for r in results]
    return spark.createDataFrame(rows, spark_schema(FACTOR_METRICS))


def format_metrics_table(results: Sequence[dict]) -> str:
    """A small fixed-width table for the operator's log."""
    lines = [f"{'split':<6} {'predictor':<12} {'mAP@k':>8} {'AUC':>7} {'k':>5} {'users':>8} {'tracks':>8}"]
    for r in results:
        fmt = (lambda v: f"{v:.4f}" if v is not None else "n/a")
        lines.append(f"{r['split']:<6} {r['predictor']:<12} {fmt(r['map_at_k']):>8} {fmt(r['auc']):>7} "
                     f"{r['k']:>5} {r['n_users']:>8} {r['n_tracks']:>8}")
    return "\n".join(lines)
