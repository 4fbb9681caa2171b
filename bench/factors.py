"""Bench of the factors stage's ALS: Spark MLlib (our fit_als) vs the `implicit` library (CPU).

The anchor is `implicit`'s conjugate-gradient ALS on the same matrix, same rank, same
iterations, same confidence ``1 + alpha * log(1 + r / eps)``: the figure is Spark's seconds
per iteration divided by implicit's (target <= 4) and both models' held-out mAP@k on the
same warm split (target: Spark >= implicit).

Per-iteration time is the slope between a 1-iteration fit and an N-iteration fit, so the
fixed cost (shuffling the ratings into blocks) is reported apart.  Spark's regularisation
is scaled by each row's count (ALS-WR); implicit's is not, so implicit gets
``reg * mean plays per user``.

    .venv/bin/python bench/factors.py --users 20000 --tracks 5000 --per-user 20
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

# implicit runs its own thread per core; a BLAS pool inside each thread oversubscribes (must precede numpy)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from deepcuts.evaluation import metrics as ev  # noqa: E402
from deepcuts.core.config import load_config  # noqa: E402
from deepcuts.stages.factors import fit_als  # noqa: E402
from deepcuts.cf.plays import confidence  # noqa: E402


def generate(n_users: int, n_tracks: int, per_user: int, seed: int) -> pd.DataFrame:
    """Plays from a planted low-rank taste model (16 latent tastes, popularity skew)."""
    rng = np.random.default_rng(seed)
    tastes = 16
    user_taste = rng.dirichlet(np.full(tastes, 0.3), n_users)
    track_taste = rng.integers(0, tastes, n_tracks)
    popularity = rng.pareto(1.5, n_tracks) + 1
    rows_u, rows_t = [], []
    for taste in range(tastes):
        members = np.flatnonzero(track_taste == taste)
        weights = popularity[members] / popularity[members].sum()
        counts = rng.binomial(per_user, user_taste[:, taste])
        for u in np.flatnonzero(counts):
            picks = rng.choice(members, size=min(counts[u], len(members)), replace=False, p=weights)
            rows_u.append(np.full(len(picks), u))
            rows_t.append(picks)
    users, tracks = np.concatenate(rows_u), np.concatenate(rows_t)
    plays = 1 + rng.geometric(0.3, len(users)) - 1 + rng.poisson(1, len(users))
    return pd.DataFrame({"user_idx": users.astype(np.int32), "track_idx": tracks.astype(np.int32),
                         "plays": plays.astype(np.float64)})


def warm_split(df: pd.DataFrame, fraction: float, seed: int):
    held = np.random.default_rng(seed + 1).random(len(df)) < fraction
    return df[~held].reset_index(drop=True), df[held].reset_index(drop=True)


def held_out_map(user_vecs, track_vecs, train, test, k, n_users_eval, seed) -> tuple[float, float]:
    """mAP@k and AUC over a user sample: candidates = all tracks minus the user's training ones."""
    rng = np.random.default_rng(seed)
    users = rng.choice(np.unique(test["user_idx"]), size=min(n_users_eval, test["user_idx"].nunique()),
                       replace=False)
    train_by_user = train.groupby("user_idx")["track_idx"].apply(np.asarray)
    test_by_user = test.groupby("user_idx")["track_idx"].apply(np.asarray)
    aps, aucs = [], []
    for u in users:
        scores = track_vecs @ user_vecs[u]
        keep = np.ones(len(track_vecs), bool)
        keep[train_by_user.get(u, np.array([], int))] = False
        positive = np.zeros(len(track_vecs), bool)
        positive[test_by_user[u]] = True
        keep |= positive
        ap, area = ev.user_metrics(scores[keep], positive[keep], k)
        if not np.isnan(area):
            aps.append(ap)
            aucs.append(area)
    return float(np.mean(aps)), float(np.mean(aucs))


def spark_vectors(model, n_users, n_tracks, rank):
    users = np.zeros((n_users, rank), np.float32)
    tracks = np.zeros((n_tracks, rank), np.float32)
    for row in model.userFactors.toLocalIterator():
        users[row["id"]] = row["features"]
    for row in model.itemFactors.toLocalIterator():
        tracks[row["id"]] = row["features"]
    return users, tracks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=20000)
    p.add_argument("--tracks", type=int, default=5000)
    p.add_argument("--per-user", type=int, default=20)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--blocks", default="0", help="comma-separated ALS block counts to try; 0 = default parallelism")
    p.add_argument("--storage", default="MEMORY_AND_DISK",
                   help="comma-separated intermediate storage levels to try")
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--eval-users", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--master", default="local[*]")
    args = p.parse_args()

    threads = os.cpu_count() or 1
    data = generate(args.users, args.tracks, args.per_user, args.seed)
    train, test = warm_split(data, 0.2, args.seed)
    fc = load_config().factors
    fc_dict = {"factors.rank": args.rank, "factors.iterations": args.iterations}
    print(f"matrix: {args.users} users x {args.tracks} tracks, {len(data)} pairs "
          f"({len(train)} train / {len(test)} held out); rank {args.rank}, {args.iterations} iterations; "
          f"alpha {fc.alpha}, eps {fc.epsilon}, reg {fc.reg}; {threads} cores", flush=True)

    # --- implicit (anchor) ---------------------------------------------------------------
    from implicit.cpu.als import AlternatingLeastSquares
    conf_values = confidence(train["plays"].to_numpy(), fc.alpha, fc.epsilon).astype(np.float32)
    user_items = sp.csr_matrix((conf_values, (train["user_idx"], train["track_idx"])),
                               shape=(args.users, args.tracks))
    implicit_reg = fc.reg * len(train) / args.users
    timings = {}
    for iters in (1, args.iterations):
        model = AlternatingLeastSquares(factors=args.rank, regularization=implicit_reg, alpha=1.0,
                                        iterations=iters, num_threads=threads, random_state=args.seed)
        started = time.perf_counter()
        model.fit(user_items, show_progress=False)
        timings[iters] = time.perf_counter() - started
    imp_iter = (timings[args.iterations] - timings[1]) / max(1, args.iterations - 1)
    imp_map, imp_auc = held_out_map(model.user_factors, model.item_factors, train, test, args.k,
                                    args.eval_users, args.seed)
    print(f"implicit: {timings[args.iterations]:.2f} s total, {imp_iter:.3f} s/iteration, "
          f"mAP@{args.k} {imp_map:.4f}, AUC {imp_auc:.4f}", flush=True)

    # --- Spark ---------------------------------------------------------------------------
    from deepcuts.cf.plays import rating_column
    from deepcuts.core.spark import get_session
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides={"warehouse.root": tmp, "spark.checkpoint_dir": tmp + "/ckpt", **fc_dict})
        spark = get_session(cfg, "bench-factors", master=args.master)
        spark.sparkContext.setLogLevel("ERROR")
        jvm_pid = spark.sparkContext._gateway.proc.pid
        from pyspark.sql import functions as F
        ratings = (spark.createDataFrame(train[["user_idx", "track_idx", "plays"]])
                   .withColumn("rating", rating_column(F.col("plays"), fc.epsilon))
                   .repartition(spark.sparkContext.defaultParallelism).persist())
        ratings.count()
        # warm the JVM (class loading, JIT) so the first timed configuration is not penalised
        fit_als(spark, ratings, cfg.replace(**{"factors.iterations": 1}).factors)[0].userFactors.count()
        best = None
        for blocks in [int(b) for b in args.blocks.split(",")]:
            for storage in args.storage.split(","):
                fcb = cfg.replace(**{"factors.blocks": blocks}).factors
                times = {}
                for iters in (1, args.iterations):
                    fci = cfg.replace(**{"factors.blocks": blocks, "factors.iterations": iters}).factors
                    model, times[iters] = fit_als(spark, ratings, fci, intermediateStorageLevel=storage)
                    model.userFactors.count()
                per_iter = (times[args.iterations] - times[1]) / max(1, args.iterations - 1)
                users, tracks = spark_vectors(model, args.users, args.tracks, args.rank)
                s_map, s_auc = held_out_map(users, tracks, train, test, args.k, args.eval_users, args.seed)
                print(f"spark blocks={fcb.blocks or spark.sparkContext.defaultParallelism} storage={storage}: "
                      f"{times[args.iterations]:.2f} s total, {per_iter:.3f} s/iteration "
                      f"(fixed {times[1] - per_iter:.2f} s), mAP@{args.k} {s_map:.4f}, AUC {s_auc:.4f}; "
                      f"ratio per iteration spark/implicit {per_iter / imp_iter:.2f}x, "
                      f"total {times[args.iterations] / timings[args.iterations]:.2f}x", flush=True)
                if best is None or per_iter < best[0]:
                    best = (per_iter, blocks, storage, s_map)
        with open(f"/proc/{jvm_pid}/status") as fh:
            jvm_peak = next((line.split()[1] for line in fh if line.startswith("VmHWM")), "0")
        spark.stop()
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"best spark: {best[0]:.3f} s/iteration = {best[0] / imp_iter:.2f}x implicit "
          f"(target <= 4x) with blocks={best[1]} storage={best[2]}; mAP spark {best[3]:.4f} vs implicit "
          f"{imp_map:.4f}")
    print(f"peak memory: python {self_peak / 1024:.0f} MiB, JVM {int(jvm_peak) / 1024:.0f} MiB, "
          f"other children {child_peak / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
