"""Bench of the evaluation at catalogue scale: the blocked Spark runner against the
implementation it replaced (bench/legacy_evaluation.py: collect + broadcast + full sorts).

Generated in Spark (nothing catalogue-sized is built on the driver): ``--tracks`` candidate
tracks and ``--users`` users with gaussian vectors of ``--rank``, each user with
``--positives`` held-out tracks (half drawn near the user's own direction, so the metrics
are not trivial).  Both implementations score the same users against all the candidates;
their mAP/AUC are printed side by side (the legacy one scores in float32).

Peak memory: the driver's Python process, the JVM (driver and, in local mode, the
executors), and the largest Python worker (executor side), from /proc (VmHWM), polled.

    .venv/bin/python bench/evaluation.py --tracks 1000000 --users 20000 --rank 32
    .venv/bin/python bench/evaluation.py ... --skip-legacy      # the new runner alone
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from benchutil import SparkMemory, peak_rss_mb


def generate(spark, n_tracks: int, n_users: int, rank: int, positives: int, seed: int):
    from pyspark.sql import functions as F
    tracks = spark.range(n_tracks).select(
        F.format_string("t%09d", "id").alias("track_id"),
        F.array(*[F.randn(seed * 1000 + j) for j in range(rank)]).cast("array<float>").alias("factors"))
    users = spark.range(n_users).select(
        F.format_string("u%07d", "id").alias("user_id"),
        F.array(*[F.randn(seed * 1000 + 500 + j) for j in range(rank)]).cast("array<float>").alias("factors"))
    # positives: random tracks (ids from a hash of user and slot); a planted signal comes from
    # giving half of each user's positives a vector near the user's
    slots = spark.range(positives).select(F.col("id").alias("slot"))
    pairs = (users.select("user_id").crossJoin(slots)
             .select("user_id", "slot", F.format_string("t%09d", F.pmod(F.xxhash64("user_id", "slot"),
                                                                        F.lit(n_tracks))).alias("track_id")))
    tracks = tracks.localCheckpoint()
    users = users.localCheckpoint()
    near = (pairs.where(F.col("slot") % 2 == 0).join(users.withColumnRenamed("factors", "u"), "user_id")
            .groupBy("track_id").agg(F.first("u").alias("u")))
    tracks = (tracks.join(near, "track_id", "left")
              .select("track_id", F.when(F.col("u").isNull(), F.col("factors"))
                      .otherwise(F.zip_with("u", "factors", lambda a, b: a + 0.7 * b)).alias("factors"))
              .localCheckpoint())
    return tracks, users, pairs.select("user_id", "track_id").distinct().localCheckpoint()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracks", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--positives", type=int, default=20)
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--skip-legacy", action="store_true")
    p.add_argument("--master", default=os.environ.get("SPARK_MASTER", "local[*]"))
    args = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from deepcuts.core.config import load_config
    from deepcuts.core.spark import get_session
    from deepcuts.evaluation import runner

    scratch = tempfile.mkdtemp(prefix="deepcuts-bench-eval-")
    cfg = load_config(overrides={"warehouse.root": os.path.join(scratch, "warehouse"),
                                 "spark.checkpoint_dir": os.path.join(scratch, "checkpoints")})
    spark = get_session(cfg, "deepcuts-bench-evaluation", master=args.master)
    spark.sparkContext.setLogLevel("ERROR")
    jvm_pid = spark.sparkContext._gateway.proc.pid
    cores = spark.sparkContext.defaultParallelism
    print(f"{args.tracks} candidate tracks x {args.users} users, rank {args.rank}, {args.positives} positives "
          f"per user, k={args.k}, {args.master} ({cores} cores)", flush=True)
    try:
        started = time.time()
        tracks, users, pairs = generate(spark, args.tracks, args.users, args.rank, args.positives, args.seed)
        print(f"  generated in {time.time() - started:.1f} s ({pairs.count()} held-out pairs)", flush=True)

        ec = cfg.evaluate
        with SparkMemory(jvm_pid) as mem:
            started = time.time()
            pop = runner.build_population(pairs, tracks.select("track_id"), users.select("user_id"), split="bench",
                                          max_users=0, seed=args.seed, users_per_task=ec.users_per_task,
                                          candidates_per_block=ec.candidates_per_block)
            population_s = time.time() - started
            new = runner.evaluate_predictor(pop, users, tracks, predictor="bench", k=args.k,
                                            scratch=os.path.join(scratch, "blocks"))
            new_s = time.time() - started
            pop.release()
        print(f"  blocked runner: {new_s:.1f} s wall ({population_s:.1f} s population), "
              f"{new_s * cores / args.users * 1000:.1f} core-ms per user; {pop.n_cblocks} candidate blocks x "
              f"{pop.n_ublocks} user blocks; mAP@{args.k} {new['map_at_k']:.6f} AUC {new['auc']:.6f} "
              f"({new['n_users']} users); peak JVM {mem.jvm_mb:.0f} MB, largest Python worker {mem.worker_mb:.0f} MB",
              flush=True)
        if not args.skip_legacy:
            here = os.path.dirname(os.path.abspath(__file__))
            sys.path.insert(0, here)
            # its UDFs are unpickled in the Python workers, which do not have bench/ on their path
            spark.sparkContext.addPyFile(os.path.join(here, "legacy_evaluation.py"))
            import legacy_evaluation as legacy
            with SparkMemory(jvm_pid) as mem_old:
                started = time.time()
                try:
                    old = legacy.evaluate_ranking(spark, users, pairs, tracks, args.k, split="bench",
                                                  predictor="legacy")
                    old_s = time.time() - started
                    print(f"  legacy (collect + broadcast): {old_s:.1f} s wall, {old_s * cores / args.users * 1000:.1f} "
                          f"core-ms per user; mAP@{args.k} {old['map_at_k']:.6f} AUC {old['auc']:.6f} "
                          f"({old['n_users']} users); peak JVM {mem_old.jvm_mb:.0f} MB, largest Python worker "
                          f"{mem_old.worker_mb:.0f} MB", flush=True)
                    print(f"  ratio new / legacy wall: {new_s / old_s:.2f}; |mAP diff| "
                          f"{abs(new['map_at_k'] - old['map_at_k']):.2e}, |AUC diff| {abs(new['auc'] - old['auc']):.2e}")
                except Exception as exc:  # noqa: BLE001 - the anchor not fitting is a result
                    print(f"  legacy did not complete after {time.time() - started:.1f} s: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        print(f"  peak RSS of the driver's Python process (+ largest reaped child): {peak_rss_mb():.0f} MB")
    finally:
        spark.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
