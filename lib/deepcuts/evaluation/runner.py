"""The Spark runner of the evaluation protocol (:mod:`deepcuts.evaluation.metrics`: the pure
numpy side, beside it, as Microsoft recommenders keeps python_ and spark_evaluation).

One evaluation of a split is a :class:`Population`, fixed once and shared by every
predictor: a stable hash sample of the users (``factors.eval_max_users``, ``eval_seed``),
their positives, and the candidate tracks.  ``evaluate_predictor`` then scores one
predictor's vectors on exactly those users and candidates, so all rows of one run have the
same ``n_users``, ``n_candidates`` and ``n_positives``; a candidate the predictor has no
vector for is ranked last (``n_candidates_without_vector``), not dropped.

How it runs (nothing catalogue-sized reaches the driver or a broadcast):

1. The candidates, with the predictor's vectors, are written once as Parquet into a scratch
   folder, one folder per candidate block (``candidates_per_block`` tracks); each task reads
   the one block it needs with pyarrow (cached per Python worker).
2. Users are cut into blocks of about ``users_per_task``.  A user row carries its vector, its
   positives' scores (a join of its held-out pairs with the vectors, computed by Spark) and,
   for the warm split, its excluded (training) tracks: a join, never a broadcast.
3. One task per (candidate block, user block) counts, per positive, the block's negatives
   that score >= / > it (``metrics.block_counts``); the counts of a user's blocks are summed
   and turned into AP@k and AUC (``metrics.metrics_from_counts``); Spark averages them.

Cost, 20,000 users at rank 32, on float64 scores (``bench/evaluation.py`` measures the
first line):

* 1e6 candidate tracks: per user 2e6 x 32 flops of gemm plus the >= / > counts of its
  positives over 1e6 scores.  Measured (``bench/evaluation.py``, 2 cores): 496 s wall, 50
  core-ms per user, ~1,000 core-seconds (the first estimate, 300, left out the counting and
  Spark's per-group overhead).  4 blocks of 262,144; per task one block (8 MB of
  float32 on disk, 67 MB as float64) plus 64 MB of scores; shuffle 20k users x 4 blocks x
  (rank + positives) doubles, ~50 MB.  The driver holds counts only.
* 1e7 candidate tracks: 10x the work (~10,000 core-seconds: about 10 minutes on 16
  cores), the same memory per task (39 blocks instead of 4), shuffle ~0.5 GB, scratch
  Parquet 1.3 GB.  The implementation this replaced collected the 1e7 vectors to the driver
  as Python Rows (~12 GB: past a 4 GB driver) and broadcast them to every worker.
"""
from __future__ import annotations

import logging
import math
import posixpath
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from deepcuts.evaluation.metrics import COLD, VALIDATION, WARM, block_counts, metrics_from_counts

log = logging.getLogger(__name__)

__all__ = ["COLD", "VALIDATION", "WARM", "Population", "build_population", "evaluate_predictor",
           "hash_unit", "is_cold_track", "random_track_vectors", "results_frame", "format_results_table"]

RESULT_COLUMNS = ("split", "predictor", "map_at_k", "auc", "k", "n_users", "n_users_skipped",
                  "n_users_without_vector", "n_candidates", "n_candidates_without_vector",
                  "n_positives", "n_positives_without_vector", "model_id")


# --- stable hashing ---------------------------------------------------------------------------
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


SPARSE_WARM = "sparse_warm"                        # the test half of the sparse-warm sample (report only)
SPARSE_WARM_VALIDATION = "sparse_warm_validation"  # the half infer.blend_* are chosen on
SPARSE_SPLITS = (SPARSE_WARM, SPARSE_WARM_VALIDATION)


def sparse_warm_holdout(ratings, fraction: float, max_listeners: int, validation_share: float, seed: int):
    """(user_id, track_id, split) of the pairs the sparse-warm protocol hides from the fit.

    A stable hash sample (``fraction``) of the non-cold tracks of ``ratings`` (user_id,
    track_id, cold) keeps k = 1..``max_listeners`` listeners (k and the listeners hashed per
    track), the rest of its pairs are returned; ``validation_share`` of the sample (by track
    hash) is split ``sparse_warm_validation``, the rest ``sparse_warm``.  The window sorts
    only the sample's pairs."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    sampled = ratings.where(~F.col("cold") & (hash_unit(seed + 2, "track_id") < F.lit(fraction)))
    keep = (F.floor(hash_unit(seed + 3, "track_id") * max_listeners) + 1).cast("int")
    order = Window.partitionBy("track_id").orderBy(hash_unit(seed + 4, "user_id", "track_id"), "user_id")
    split = F.when(hash_unit(seed + 5, "track_id") < F.lit(validation_share), F.lit(SPARSE_WARM_VALIDATION)) \
        .otherwise(F.lit(SPARSE_WARM))
    return (sampled.select("user_id", "track_id", F.row_number().over(order).alias("_rank"), keep.alias("_keep"))
            .where(F.col("_rank") > F.col("_keep")).select("user_id", "track_id", split.alias("split")))


def _bucket(salt: str, col: str, n: int):
    from pyspark.sql import functions as F
    return F.pmod(F.xxhash64(F.lit(salt), F.col(col)), F.lit(max(1, n))).cast("int")


def random_track_vectors(track_ids_df, rank: int, seed: int):
    """(track_id, factors): standard gaussian vectors (Box-Muller over two xxhash64 uniforms
    per dimension), a function of (seed, track_id) alone: the random predictor gets the same
    vector for a track whatever the partitioning, in Spark and in a numpy check alike."""
    from pyspark.sql import functions as F
    modulus = 2 ** 31 - 1

    def uniform(tag: str, j: int):
        h = F.pmod(F.xxhash64(F.lit(f"deepcuts:random:{seed}:{j}:{tag}"), F.col("track_id")), F.lit(modulus))
        return (h.cast("double") + F.lit(1.0)) / F.lit(float(modulus) + 1.0)     # in (0, 1]

    dims = [F.sqrt(F.lit(-2.0) * F.log(uniform("a", j))) * F.cos(F.lit(2 * math.pi) * uniform("b", j))
            for j in range(rank)]
    return track_ids_df.select("track_id").distinct().select(
        "track_id", F.array(*dims).cast("array<float>").alias("factors"))


# --- the population of one split -------------------------------------------------------------
@dataclass
class Population:
    """The users, positives and candidates every predictor of a split is scored on."""
    split: str
    users: Any                  # user_id, ublock: sampled users with >= 1 positive candidate
    positives: Any              # user_id, track_id: their held-out pairs on candidates
    candidates: Any             # track_id, cblock
    excluded: Any | None        # user_id, track_id: removed from that user's candidates (warm)
    n_ublocks: int
    n_cblocks: int
    counts: dict = field(default_factory=dict)
    persisted: list = field(default_factory=list)

    def release(self) -> None:
        for df in self.persisted:
            df.unpersist()
        self.persisted.clear()


def build_population(pairs, candidate_tracks, users_with_vector, *, split: str, max_users: int, seed: int,
                     users_per_task: int, candidates_per_block: int, excluded=None) -> Population:
    """The shared population of one split.

    ``pairs`` (user_id, track_id): the split's held-out plays.  ``candidate_tracks``
    (track_id): the candidates (cold: held-out tracks that have a mel).  Pairs whose track is
    not a candidate are ``n_positives_without_vector``.  ``users_with_vector`` (user_id):
    the users the published fit has a vector for; held-out users outside it are
    ``n_users_without_vector`` and are not sampled.  ``max_users`` > 0: a stable hash sample
    of about that many of the others (``seed``).  ``excluded`` (user_id, track_id): tracks
    removed from each user's candidates (warm split: their training plays)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    keep = []

    def persist(df):
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        keep.append(df)
        return df

    candidates = persist(candidate_tracks.select("track_id").where(F.col("track_id").isNotNull()).distinct()
                         .withColumn("is_candidate", F.lit(True)))
    n_candidates = candidates.count()
    # one row per held-out user: its pairs, those on candidates, and whether the fit has it
    per_user = persist(
        pairs.select("user_id", "track_id").distinct().join(candidates, "track_id", "left")
        .groupBy("user_id").agg(F.count("*").alias("n_pairs"),
                                F.count("is_candidate").alias("n_on_candidates"))
        .join(users_with_vector.select("user_id").distinct().withColumn("has_vector", F.lit(True)),
              "user_id", "left"))
    totals = per_user.agg(F.count("*").alias("holders"), F.count("has_vector").alias("eligible")).first()
    n_holders, n_eligible = int(totals["holders"]), int(totals["eligible"])
    sampled = per_user.where(F.col("has_vector").isNotNull())
    if max_users and n_eligible > max_users:
        sampled = sampled.where(hash_unit(seed, "user_id") < F.lit(max_users / n_eligible))
    sampled = persist(sampled)
    got = sampled.agg(F.count("*").alias("users"), F.sum("n_pairs").alias("pairs"),
                      F.sum("n_on_candidates").alias("positives"),
                      F.sum((F.col("n_on_candidates") > 0).cast("long")).alias("with_positive")).first()
    n_sampled_users, n_users = int(got["users"]), int(got["with_positive"] or 0)
    n_sampled_pairs, n_positives = int(got["pairs"] or 0), int(got["positives"] or 0)
    n_ublocks = max(1, math.ceil(n_users / users_per_task))
    n_cblocks = max(1, math.ceil(n_candidates / candidates_per_block))
    users = sampled.where(F.col("n_on_candidates") > 0).select(
        "user_id", _bucket(f"deepcuts:ublock:{seed}", "user_id", n_ublocks).alias("ublock"))
    positives = persist(pairs.select("user_id", "track_id").distinct()
                        .join(users.select("user_id"), "user_id", "left_semi")
                        .join(candidates, "track_id", "left_semi"))
    candidates = candidates.select("track_id", _bucket(f"deepcuts:cblock:{seed}", "track_id", n_cblocks)
                                   .alias("cblock"))
    if excluded is not None:
        excluded = persist(excluded.select("user_id", "track_id").join(users.select("user_id"), "user_id",
                                                                       "left_semi"))
    counts = {"n_candidates": n_candidates, "n_positives": n_positives,
              "n_positives_without_vector": n_sampled_pairs - n_positives,
              "n_users_without_vector": n_holders - n_eligible,
              "n_users_sampled": n_sampled_users,
              "n_users_without_positive": n_sampled_users - n_users}
    return Population(split, users, positives, candidates, excluded, n_ublocks, n_cblocks, counts, keep)


# --- scoring one predictor ---------------------------------------------------------------------
_BLOCKS: dict = {}
_BLOCKS_LOCK = threading.Lock()


def _read_block(path: str, cblock: int, rank: int) -> tuple[pd.Index, np.ndarray]:
    """(track ids, [m, rank] float64 vectors with NaN rows where there is none) of one
    candidate block, read once per Python worker (groups arrive sorted by block)."""
    import pyarrow.parquet as pq
    from deepcuts.core.storage import filesystem_for
    key = (path, cblock)
    with _BLOCKS_LOCK:
        if key not in _BLOCKS:
            fs, inner = filesystem_for(path)
            folder = posixpath.join(inner, f"cblock={cblock}")
            try:
                table = pq.read_table(folder, filesystem=fs, columns=["track_id", "factors"])
            except (FileNotFoundError, OSError):   # a block the hash left empty
                table = None
            if table is None or table.num_rows == 0:
                ids, matrix = [], np.zeros((0, rank))
            else:
                ids = table.column("track_id").to_pylist()
                column = table.column("factors").combine_chunks()
                valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
                matrix = np.full((len(ids), rank), np.nan)
                flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
                matrix[valid] = flat.reshape(int(valid.sum()), rank)
            _BLOCKS.clear()   # one block per worker: bounded memory
            _BLOCKS[key] = (pd.Index(ids), matrix)
        return _BLOCKS[key]


def _limit_threads():
    """BLAS threads = the task's cores, so concurrent tasks don't oversubscribe the node."""
    from threadpoolctl import threadpool_limits
    from pyspark import TaskContext
    ctx = TaskContext.get()
    return threadpool_limits(limits=max(1, ctx.cpus() if ctx is not None else 1))


PARTIAL_SCHEMA = ("ublock int, user_id string, has_vector boolean, p array<double>, ge array<long>, "
                  "gt array<long>, n_neg long")
PER_USER_SCHEMA = "user_id string, has_vector boolean, ap double, auc double, n_pos long, n_neg long"


def _block_task(path: str, rank: int, k: int, final: bool):
    """The (candidate block, user block) task; ``final`` (one block only) finishes the metrics."""
    def run(key, frame: pd.DataFrame) -> pd.DataFrame:
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        cblock = int(key[0])
        index, block = _read_block(path, cblock, rank)
        users = (np.stack(frame["x"].to_numpy()).astype(np.float64) if len(frame)
                 else np.zeros((0, rank)))
        if users.shape[1] != rank:
            raise ValueError(f"user vectors of rank {users.shape[1]} against track vectors of rank {rank}")
        scores = [np.asarray(p, dtype=np.float64) for p in frame["p"]]
        removed = []
        for ids, excluded in zip(frame["pos_ids"], frame["excluded"]):
            wanted = list(ids) + (list(excluded) if excluded is not None else [])
            cols = index.get_indexer(wanted) if len(index) and wanted else np.zeros(0, dtype=np.int64)
            removed.append(cols[cols >= 0])
        with _limit_threads():
            ge, gt, n_neg = block_counts(users, scores, removed, block)
        if final:
            metrics = [metrics_from_counts(p, g, t, n, k) for p, g, t, n in zip(scores, ge, gt, n_neg)]
            return pd.DataFrame({"user_id": frame["user_id"].to_numpy(), "has_vector": frame["has_vector"].to_numpy(),
                                 "ap": [m[0] for m in metrics], "auc": [m[1] for m in metrics],
                                 "n_pos": [len(p) for p in scores], "n_neg": n_neg})
        return pd.DataFrame({"ublock": frame["ublock"].to_numpy(), "user_id": frame["user_id"].to_numpy(),
                             "has_vector": frame["has_vector"].to_numpy(), "p": scores, "ge": ge, "gt": gt,
                             "n_neg": n_neg})
    return run


def _finish_task(k: int):
    """Sum a user block's counts over the candidate blocks, then AP@k and AUC per user."""
    def run(key, frame: pd.DataFrame) -> pd.DataFrame:
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        rows = []
        for user_id, part in frame.groupby("user_id", sort=False):
            p = np.asarray(part["p"].iloc[0], dtype=np.float64)
            ge = np.sum(np.stack(part["ge"].to_numpy()), axis=0) if len(p) else np.zeros(0)
            gt = np.sum(np.stack(part["gt"].to_numpy()), axis=0) if len(p) else np.zeros(0)
            n_neg = int(part["n_neg"].sum())
            ap, area = metrics_from_counts(p, ge, gt, n_neg, k)
            rows.append((user_id, bool(part["has_vector"].iloc[0]), ap, area, len(p), n_neg))
        return pd.DataFrame(rows, columns=["user_id", "has_vector", "ap", "auc", "n_pos", "n_neg"])
    return run


def _dot(x, y):
    from pyspark.sql import functions as F
    return F.aggregate(F.zip_with(x, y, lambda a, b: a * b), F.lit(0.0).cast("double"), lambda acc, v: acc + v)


def evaluate_predictor(population: Population, user_vectors, track_vectors, *, predictor: str, k: int,
                       scratch: str, model_id: str | None = None) -> dict:
    """mAP@k and AUC of one predictor on ``population`` (module docstring).

    ``user_vectors`` (user_id, factors) and ``track_vectors`` (track_id, factors) are the
    predictor's, in one latent space.  ``scratch``: a folder (local path or ``s3://``) for
    the candidate blocks, removed afterwards.  Returns a dict with ``RESULT_COLUMNS``."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from deepcuts.core.storage import delete_tree, to_s3a
    pop = population
    spark = pop.candidates.sparkSession
    vectors = track_vectors.select("track_id", F.col("factors").cast("array<float>").alias("factors")) \
        .dropDuplicates(["track_id"])
    # persisted: read by the counts, the block files and the positives' scores (a CNN's
    # vectors may be computed on the fly: once, not three times)
    candidates = pop.candidates.join(vectors, "track_id", "left").persist(StorageLevel.MEMORY_AND_DISK)
    users = user_vectors.select("user_id", F.col("factors").cast("array<double>").alias("x")) \
        .dropDuplicates(["user_id"])

    def size(c):   # size(null) is -1 in Spark
        return F.when(F.col(c).isNotNull(), F.size(c))
    stats = candidates.agg(F.sum(F.col("factors").isNull().cast("long")).alias("missing"),
                           F.max(size("factors")).alias("rank"), F.min(size("factors")).alias("min_rank")).first()
    rank = stats["rank"]
    if rank is None:   # no candidate has a vector: the users say what the rank is
        rank = users.select(size("x").alias("r")).where(F.col("r").isNotNull()).first()
        rank = rank["r"] if rank else None
    if rank is None or rank != (stats["min_rank"] or rank):
        candidates.unpersist()
        raise ValueError(f"{predictor}: track vectors of one rank needed, got {stats['min_rank']}..{rank}")

    # a fresh folder per call: workers cache blocks by path, so a reused path would serve the
    # previous call's vectors
    path = posixpath.join(scratch, f"{pop.split}-{predictor}-{uuid.uuid4().hex[:12]}")
    delete_tree(path)
    (candidates.select("cblock", "track_id", "factors").repartition(pop.n_cblocks, "cblock")
     .write.mode("overwrite").partitionBy("cblock").parquet(to_s3a(path)))
    try:
        user_rows = pop.users.join(users, "user_id", "left").select(
            "user_id", "ublock", F.col("x").isNotNull().alias("has_vector"),
            F.coalesce("x", F.array_repeat(F.lit(0.0).cast("double"), rank)).alias("x")) \
            .persist(StorageLevel.MEMORY_AND_DISK)
        scored_pairs = (pop.positives.join(candidates.select("track_id", F.col("factors").alias("y")), "track_id")
                        .join(user_rows.select("user_id", "x"), "user_id")
                        .select("user_id", "track_id",
                                F.when(F.col("y").isNull(), F.lit(float("-inf")))
                                .otherwise(_dot(F.col("x"), F.col("y").cast("array<double>"))).alias("p")))
        by_user = scored_pairs.groupBy("user_id").agg(F.sort_array(F.collect_list(F.struct("track_id", "p")))
                                                      .alias("pos"))
        rows = user_rows.join(by_user, "user_id").select(
            "ublock", "user_id", "has_vector", "x", F.col("pos.track_id").alias("pos_ids"), F.col("pos.p").alias("p"))
        if pop.excluded is not None:
            ex = pop.excluded.groupBy("user_id").agg(F.collect_list("track_id").alias("excluded"))
            rows = rows.join(ex, "user_id", "left")
        else:
            rows = rows.withColumn("excluded", F.lit(None).cast("array<string>"))
        blocks = spark.range(pop.n_cblocks).select(F.col("id").cast("int").alias("cblock"))
        # One (cblock, ublock) group a task: adaptive execution would coalesce this shuffle by
        # bytes, and user rows are small while scoring one against a block is not (2 tasks at
        # 10^5 tracks, 20,000 users); an explicit hash partitioning is kept, and the groupBy reuses it.
        tasks = rows.crossJoin(blocks).repartition(pop.n_ublocks * pop.n_cblocks, "cblock", "ublock")
        final = pop.n_cblocks == 1
        partial = tasks.groupBy("cblock", "ublock").applyInPandas(
            _block_task(path, rank, k, final), PER_USER_SCHEMA if final else PARTIAL_SCHEMA)
        per_user = partial if final else partial.groupBy("ublock").applyInPandas(_finish_task(k), PER_USER_SCHEMA)
        ok = ~F.isnan("auc")
        agg = per_user.agg(F.avg(F.when(ok, F.col("ap"))).alias("map_at_k"),
                           F.avg(F.when(ok, F.col("auc"))).alias("auc"),
                           F.sum(ok.cast("long")).alias("n_users"),
                           F.sum((~ok).cast("long")).alias("no_negative"),
                           F.sum((~F.col("has_vector")).cast("long")).alias("no_user_vector")).first()
    finally:
        delete_tree(path)
        candidates.unpersist()
        if "user_rows" in locals():
            user_rows.unpersist()
    c = pop.counts
    return {"split": pop.split, "predictor": predictor, "map_at_k": agg["map_at_k"], "auc": agg["auc"], "k": k,
            "n_users": int(agg["n_users"] or 0),
            "n_users_skipped": int(agg["no_negative"] or 0) + c["n_users_without_positive"],
            # held-out users outside the published fit, plus sampled users this predictor has no vector for
            "n_users_without_vector": c["n_users_without_vector"] + int(agg["no_user_vector"] or 0),
            "n_candidates": c["n_candidates"], "n_candidates_without_vector": int(stats["missing"] or 0),
            "n_positives": c["n_positives"], "n_positives_without_vector": c["n_positives_without_vector"],
            "model_id": model_id}


# --- results ------------------------------------------------------------------------------------
def results_frame(spark, results: Sequence[dict], run_id: str, extra: dict | None = None):
    """``evaluation_results`` rows (one per result dict) as a Spark DataFrame."""
    from deepcuts.core.tables import EVALUATION_RESULTS, spark_schema
    columns = EVALUATION_RESULTS.columns
    rows = [{c: {"run_id": run_id, **(extra or {}), **r}.get(c) for c in columns} for r in results]
    return spark.createDataFrame(rows, spark_schema(EVALUATION_RESULTS))


def format_results_table(results: Sequence[dict]) -> str:
    """A fixed-width table for the operator's log and ``python -m deepcuts evaluate``."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else "n/a"
    lines = [f"{'split':<10} {'predictor':<12} {'mAP@k':>7} {'AUC':>7} {'k':>4} {'users':>7} {'cands':>8} "
             f"{'cands w/o vec':>13} {'positives':>9} {'pos w/o vec':>11}  model"]
    for r in results:
        lines.append(f"{r['split']:<10} {r['predictor']:<12} {fmt(r['map_at_k']):>7} {fmt(r['auc']):>7} "
                     f"{r['k']:>4} {r['n_users']:>7} {r['n_candidates']:>8} {r['n_candidates_without_vector']:>13} "
                     f"{r['n_positives']:>9} {r['n_positives_without_vector']:>11}  {r.get('model_id') or ''}")
    return "\n".join(lines)
