"""Bench of catalogue scale (issue 17): what each nightly stage costs per item as the catalogue grows.

For each ``--tracks`` size, in one process and one SparkSession (local[cores], Spark's UI on
for its monitoring REST API), on a scratch warehouse of its own:

1. a committed ``mels`` table of N tracks, generated in Spark without decoding audio and
   committed through the library's own write path (``deepcuts.core.lake.write_table``, the
   ingest job's file layout: ingest.rows_per_file, ingest.rows_per_row_group, range-clustered
   by track_id).  Mels are short (``--frames``, default the training crop + 30 frames) and
   structured: each track is its cluster's template (a spectral envelope and a rhythmic
   pattern, ``--clusters`` of them) shifted in time, plus a gain and noise quantised to
   0.5 dB (so zstd compresses it as it would real mels, roughly);
2. play rows (aggregated parquet: user_id, track_id, plays) with Zipf popularity over tracks
   (``--zipf``), ``--plays-per-track`` draws per track from N x ``--users-per-track`` users,
   each user drawing from their own cluster ``--own-cluster`` of the time (so the factors,
   and what the CNN learns, follow the same clusters as the mels); duplicate draws are summed;
3. the real stages through ``deepcuts.core.cli.run_stage``, in the nightly order: factors
   (factors.evaluate on, warm_fraction = sparse_warm_fraction = 0: only the cold-start holdout
   and the upper-bound fit), train (one epoch; the training-set build is timed apart from
   the epoch by wrapping ``deepcuts.stages.train.build_training_set``: "train.build" is the
   stage's start to the end of the build, "train.epoch" the rest: epoch, validation,
   promotion, artifact), baseline (evaluate's baseline predictor), infer (the whole
   catalogue), evaluate (splits cold and validation), neighbours.

Per stage: wall s; CPU s of the whole process tree below this driver (this driver, the JVM
it launched, the JVM's Python workers: utime+stime+cutime+cstime from /proc, sampled every
0.2 s, ``benchutil.TreeCpu``: PySpark's daemon ignores SIGCHLD, so a worker that exits takes
its CPU with it unless its last sample is kept; the driver is a child subreaper so orphaned
workers are reaped into its cutime, ``benchutil.OrphanReaper``; the bench's own samplers are
in it, ~1 %); the JVM's task CPU from
the REST API (executorCpuTime, JVM task threads only: Python UDF time is not in it); shuffle
read + write and the number of tasks of the largest Spark stage (by input + shuffle-read
bytes), from ``/api/v1/applications/<app>/stages``, counting the Spark stages whose id is
above the last one before the stage started; peak memory of this driver, the JVM and the
Python workers (``benchutil.SparkMemory``; each process's VmHWM is reset before every stage,
``/proc/<pid>/clear_refs``, so a peak is that stage's, not the process's lifetime).

Figure: per stage, its CPU cost per item (per play row for factors, per catalogue track for
the others) at the largest size divided by that at the smallest, and the same ratio per x10
of size (ratio ** (1 / log10(largest / smallest))); target <= 1.5 per x10.  Driver peak
memory largest / smallest, target <= 1.2.  Flags a stage whose largest Spark stage ran fewer
tasks than cores x 2, and lists every Spark stage that ran >= 1 s of task time in fewer tasks.

Anchor: the smallest size, same process, same session, same settings.  Sizes run smallest
first, so the smallest also pays the session's warm-up (JIT, Python workers, torch import):
``--warmup TRACKS`` runs a throwaway size first (not reported) to take that out.  At small
sizes fixed costs per stage (planning, Delta commits, model load) dominate and the per-item
ratio reads far below 1: the figure means something from 10^5 tracks up.

    .venv/bin/python bench/scale.py --tracks 10000 100000 [--cores 2] [--plays-per-track 10]
        [--frames 160] [--rank 32] [--iterations 5] [--warmup 0] [--set train.dense_units=512]
        [--json scale.json] [--keep] [--root DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import urllib.request
from urllib.parse import urlparse

import numpy as np

from benchutil import (OrphanReaper, SparkMemory, TreeCpu, _descendants, _proc_status_mb, peak_rss_mb,
                       reset_peak_rss)

STAGES = ("factors", "train", "baseline", "infer", "evaluate", "neighbours")
# Settings the bench's session needs beyond conf/spark-defaults.conf (which turns the UI off).
BENCH_SPARK = {
    "spark.ui.enabled": "true",
    "spark.ui.port": "0",                      # any free port: uiWebUrl says which
    "spark.ui.retainedJobs": "100000",         # every Spark stage of a size stays queryable
    "spark.ui.retainedStages": "100000",
    "spark.sql.ui.retainedExecutions": "2000",
    "spark.scheduler.listenerbus.eventqueue.appStatus.capacity": "100000",   # no dropped events
}
SETTLED = ("COMPLETE", "FAILED", "SKIPPED")
GEN_RUN_ID = "ingest-scale-bench"


# --- the synthetic catalogue ---------------------------------------------------------------
def cluster_of(ids: np.ndarray, clusters: int) -> np.ndarray:
    """A track's cluster: a multiplicative hash of its index (mels and plays agree on it)."""
    return ((np.asarray(ids, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(2 ** 32) >> np.uint64(8)) \
        .astype(np.int64) % clusters


def cluster_templates(seed: int, clusters: int, n_mels: int, n_frames: int) -> np.ndarray:
    """[clusters, n_mels, n_frames] dB templates: a spectral envelope (one or two formant-like
    bumps on a tilt) plus a rhythmic pattern (pulses of a cluster's period in a band range)."""
    rng = np.random.default_rng([seed, 99])
    bands = np.arange(n_mels, dtype=np.float32)[:, None] / n_mels
    frames = np.arange(n_frames, dtype=np.float32)[None, :]
    out = np.empty((clusters, n_mels, n_frames), dtype=np.float32)
    for c in range(clusters):
        env = -50 + 15 * rng.uniform(-1, 1) * bands
        for _ in range(rng.integers(1, 3)):
            env = env + rng.uniform(10, 30) * np.exp(-((bands - rng.uniform(0.05, 0.9)) / rng.uniform(0.03, 0.15)) ** 2)
        period = rng.uniform(6, 30)
        pulse = (np.cos(2 * np.pi * frames / period + rng.uniform(0, 2 * np.pi)) > 0.6).astype(np.float32)
        lo, hi = sorted(rng.uniform(0, 1, 2))
        band_mask = ((bands >= lo) & (bands <= hi + 0.1)).astype(np.float32)
        out[c] = env + rng.uniform(6, 15) * pulse * band_mask
    return out


def mel_batches(seed: int, clusters: int, n_mels: int, n_frames: int):
    """mapInArrow function: track index batches -> ``mels`` rows (float16, 0.5 dB steps)."""
    def generate(batches):
        import pyarrow as pa
        from deepcuts.core.tables import MELS
        templates = cluster_templates(seed, clusters, n_mels, n_frames)
        for batch in batches:
            ids = batch.column(batch.schema.get_field_index("idx")).to_numpy()
            if len(ids) == 0:
                continue
            groups = cluster_of(ids, clusters)
            mels = []
            for i, c in zip(ids.tolist(), groups.tolist()):
                rng = np.random.default_rng([seed, 1, i])
                x = np.roll(templates[c], int(rng.integers(0, n_frames)), axis=1) + rng.normal(0, 2)
                x += rng.standard_normal((n_mels, n_frames), dtype=np.float32) * 3
                mels.append((np.clip(np.round(x * 2) / 2, -80, 0)).astype(np.float16).tobytes())
            n = len(ids)
            text = [str(i) for i in ids.tolist()]
            cols = {"track_id": text, "mel": mels, "n_mels": [n_mels] * n, "n_frames": [n_frames] * n,
                    "sample_rate": [22050] * n, "hop_length": [512] * n, "excerpt_offset_s": [0.0] * n,
                    "duration_s": [(n_frames - 1) * 512 / 22050] * n, "fingerprint": [f"fp-{t}" for t in text],
                    "source_uri": [f"bench://{t}" for t in text], "source_size": [0] * n,
                    "source_version": ["1"] * n, "labels": [None] * n, "ingest_run_id": [GEN_RUN_ID] * n,
                    "truncated_at_s": [None] * n, "warnings": [None] * n}
            yield pa.RecordBatch.from_pydict({f.name: cols[f.name] for f in MELS.schema}, schema=MELS.schema)
    return generate


def write_mels(spark, cfg, n_tracks: int, n_frames: int, clusters: int, seed: int, cores: int):
    """Generate and commit the ``mels`` table (the library's write path, ingest's layout)."""
    from pyspark.sql import functions as F
    from deepcuts.core.lake import lake, write_table
    from deepcuts.core.tables import MELS, spark_schema
    ing = cfg.ingest
    parts = max(4 * cores, math.ceil(n_tracks / ing.rows_per_file))
    ids = (spark.range(n_tracks, numPartitions=max(1, min(parts, n_tracks))).select(F.col("id").alias("idx"))
           .withColumn("track_id", F.col("idx").cast("string")))
    # range-clustered by track_id here (what write_table's cluster=True does), before the
    # generator: write_table's own range sampling would run the generator twice
    ids = ids.repartitionByRange(parts, "track_id").sortWithinPartitions("track_id")
    rows = ids.mapInArrow(mel_batches(seed, clusters, ing.n_mels, n_frames), spark_schema(MELS))
    return write_table(rows, lake(cfg), MELS, GEN_RUN_ID, rows_per_file=ing.rows_per_file,
                       row_group_rows=ing.rows_per_row_group, row_bytes=ing.n_mels * n_frames * 2,
                       cluster=False, retention_hours=cfg.warehouse.retention_hours)


def write_plays(folder: str, n_tracks: int, n_users: int, draws: int, clusters: int, zipf: float,
                own_cluster: float, seed: int, rows_per_file: int = 2_000_000) -> int:
    """Aggregated play rows as parquet files under ``folder``; returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    track_cluster = cluster_of(np.arange(n_tracks), clusters)
    weight = (rng.permutation(n_tracks) + 1.0) ** -zipf       # Zipf over a random order of the tracks
    order = np.argsort(track_cluster, kind="stable")
    bounds = np.searchsorted(track_cluster[order], np.arange(clusters + 1))
    present = np.flatnonzero(np.diff(bounds) > 0)
    cum = []
    for c in range(clusters):
        w = np.cumsum(weight[order[bounds[c]:bounds[c + 1]]])
        cum.append(w / w[-1] if len(w) else w)
    user_cluster = present[rng.integers(0, len(present), n_users)]
    per_user = rng.multinomial(draws, (w := rng.lognormal(0, 1, n_users)) / w.sum())
    ends = np.cumsum(per_user)
    written, part, start_user = 0, 0, 0
    while start_user < n_users:
        # users [start_user, stop_user) hold about rows_per_file draws
        stop_user = max(start_user + 1, int(np.searchsorted(ends, ends[start_user] - per_user[start_user]
                                                            + rows_per_file, side="right")))
        stop_user = min(stop_user, n_users)
        users = np.repeat(np.arange(start_user, stop_user), per_user[start_user:stop_user])
        start_user = stop_user
        if not len(users):
            continue
        chosen = np.where(rng.random(len(users)) < own_cluster, user_cluster[users],
                          present[rng.integers(0, len(present), len(users))])
        tracks = np.empty(len(users), dtype=np.int64)
        u = rng.random(len(users))
        for c in present:
            at = np.flatnonzero(chosen == c)
            pos = np.minimum(np.searchsorted(cum[c], u[at]), len(cum[c]) - 1)
            tracks[at] = order[bounds[c] + pos]
        keys, counts = np.unique(users.astype(np.int64) * n_tracks + tracks, return_counts=True)
        plays = counts * rng.geometric(0.35, len(keys))
        table = pa.table({"user_id": keys // n_tracks, "track_id": keys % n_tracks, "plays": plays.astype(np.int64)})
        pq.write_table(table, os.path.join(folder, f"plays-{part:05d}.parquet"))
        written += table.num_rows
        part += 1
    return written


# --- measuring -----------------------------------------------------------------------------
class SparkRest:
    """The running application's monitoring REST API (the UI's port, on loopback)."""

    def __init__(self, spark):
        sc = spark.sparkContext
        url = sc.uiWebUrl
        if not url:
            raise RuntimeError("Spark's UI is disabled in this session (spark.ui.enabled): no REST API")
        self.base = f"http://127.0.0.1:{urlparse(url).port}/api/v1/applications/{sc.applicationId}"

    def get(self, what: str):
        with urllib.request.urlopen(f"{self.base}/{what}", timeout=60) as r:
            return json.load(r)

    def last_stage_id(self) -> int:
        return max((s["stageId"] for s in self.get("stages")), default=-1)

    def stages_after(self, stage_id: int, wait_s: float = 20.0) -> list[dict]:
        """Every attempt of the Spark stages with id > ``stage_id``, once all have settled
        (the listener bus is asynchronous: a job that just returned may not be complete here)."""
        deadline = time.time() + wait_s
        while True:
            got = [s for s in self.get("stages") if s["stageId"] > stage_id]
            if all(s["status"] in SETTLED for s in got) or time.time() > deadline:
                return got
            time.sleep(0.25)


def spark_figures(stages: list[dict], cores: int) -> dict:
    ran = [s for s in stages if s["status"] != "SKIPPED"]
    largest = max(ran, key=lambda s: (s.get("inputBytes", 0) + s.get("shuffleReadBytes", 0),
                                      s.get("executorRunTime", 0)), default=None)
    # Spark stages that ran >= 1 s of task time in fewer tasks than 2 x cores, grouped by call site
    narrow: dict[str, dict] = {}
    for s in ran:
        if s["numTasks"] < 2 * cores and s.get("executorRunTime", 0) >= 1000:
            g = narrow.setdefault(s.get("name", "")[:80], {"name": s.get("name", "")[:80], "stages": 0, "run_s": 0.0,
                                                           "max_tasks": 0, "stage_ids": []})
            g["stages"] += 1
            g["run_s"] += s["executorRunTime"] / 1e3
            g["max_tasks"] = max(g["max_tasks"], s["numTasks"])
            g["stage_ids"].append(s["stageId"])
    narrow = sorted(narrow.values(), key=lambda g: -g["run_s"])
    return {
        "spark_stages": len(ran), "spark_stages_skipped": len(stages) - len(ran),
        "shuffle_read_bytes": sum(s.get("shuffleReadBytes", 0) for s in ran),
        "shuffle_write_bytes": sum(s.get("shuffleWriteBytes", 0) for s in ran),
        "input_bytes": sum(s.get("inputBytes", 0) for s in ran),
        "task_cpu_s": sum(s.get("executorCpuTime", 0) for s in ran) / 1e9,
        "task_run_s": sum(s.get("executorRunTime", 0) for s in ran) / 1e3,
        "largest": None if largest is None else {
            "stage_id": largest["stageId"], "tasks": largest["numTasks"], "name": largest.get("name", "")[:70],
            "run_s": largest.get("executorRunTime", 0) / 1e3,
            "input_plus_shuffle_read_bytes": largest.get("inputBytes", 0) + largest.get("shuffleReadBytes", 0)},
        "narrow_stages": narrow,
        # the 5 Spark stages that moved the most (input + shuffle read + write): where the bytes go
        "top_stages": [{"stage_id": s["stageId"], "tasks": s["numTasks"], "name": s.get("name", "")[:80],
                        "input_bytes": s.get("inputBytes", 0), "shuffle_read_bytes": s.get("shuffleReadBytes", 0),
                        "shuffle_write_bytes": s.get("shuffleWriteBytes", 0), "run_s": s.get("executorRunTime", 0) / 1e3}
                       for s in sorted(ran, key=lambda s: -(s.get("inputBytes", 0) + s.get("shuffleReadBytes", 0)
                                                            + s.get("shuffleWriteBytes", 0)))[:5]],
    }


class Meter:
    """One measured phase at a time: wall, CPU of the process tree, Spark stages, peak memory."""

    def __init__(self, spark, rest: SparkRest | None, cores: int, reaper: OrphanReaper):
        self.spark, self.rest, self.cores, self.reaper = spark, rest, cores, reaper
        self.jvm_pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
        self.me = os.getpid()
        self.cpu = TreeCpu(self.me)
        self.driver_lifetime_peak_mb = 0.0
        self.hwm_reset = not reset_peak_rss([self.me])
        self._open = None

    def start(self, name: str) -> None:
        pids = [self.me, self.jvm_pid, *_descendants(self.jvm_pid)]
        self.driver_lifetime_peak_mb = max(self.driver_lifetime_peak_mb, _proc_status_mb(self.me, "VmHWM"))
        if reset_peak_rss(pids):
            self.hwm_reset = False
        self._start_rss = (_proc_status_mb(self.me, "VmRSS"), _proc_status_mb(self.jvm_pid, "VmRSS"))
        memory = SparkMemory(self.jvm_pid).__enter__()
        mark = self.rest.last_stage_id() if self.rest else None
        self._open = (name, time.perf_counter(), self.cpu.seconds(), mark, memory)

    def stop(self) -> dict:
        name, wall0, cpu0, mark, memory = self._open
        self._open = None
        self.reaper.reap()       # workers orphaned and exited: their CPU into this process's cutime
        wall, cpu = time.perf_counter() - wall0, self.cpu.seconds() - cpu0
        memory.__exit__(None, None, None)
        out = {"name": name, "wall_s": wall, "cpu_s": cpu, "driver_peak_mb": memory.driver_mb,
               "jvm_peak_mb": memory.jvm_mb, "worker_peak_mb": memory.worker_mb,
               "workers_total_peak_mb": memory.workers_total_mb,
               # what the process held when the phase started (the peak's floor: earlier phases' memory)
               "driver_start_mb": self._start_rss[0], "jvm_start_mb": self._start_rss[1]}
        self.driver_lifetime_peak_mb = max(self.driver_lifetime_peak_mb, memory.driver_mb)
        if cpu < 0 or cpu > wall * (os.cpu_count() or 1) * 1.05 + 1:
            out["cpu_warning"] = f"CPU {cpu:.1f} s over {wall:.1f} s wall: processes left the tree uncounted"
            print(f"WARNING: {name}: {out['cpu_warning']}", flush=True)
        if self.rest is not None:
            try:
                out.update(spark_figures(self.rest.stages_after(mark), self.cores))
            except OSError as exc:
                out["rest_error"] = str(exc)
        return out


def folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# --- one size ------------------------------------------------------------------------------
def size_config(args, root: str, n: int):
    from deepcuts.core.config import load_config
    from deepcuts.nn.trainset import crop_frames_for
    base = os.path.join(root, f"n{n}")
    overrides = {
        "warehouse.root": os.path.join(base, "warehouse"), "spark.checkpoint_dir": os.path.join(base, "checkpoints"),
        "demo.out_dir": os.path.join(base, "demo"), "ingest.source": os.path.join(base, "none.csv"),
        "factors.plays": os.path.join(base, "plays"), "factors.plays_format": "aggregated",
        "factors.evaluate": True, "factors.warm_fraction": 0.0, "factors.sparse_warm_fraction": 0.0,
        "factors.rank": args.rank, "factors.iterations": args.iterations,
        "train.epochs": 1, "evaluate.splits": ["cold", "validation"],
    }
    cfg = load_config(overrides=overrides)
    frames = args.frames or crop_frames_for(cfg) + 30
    cfg = cfg.replace(**{"ingest.excerpt_seconds": round((frames - 1) * cfg.ingest.hop_length
                                                          / cfg.ingest.sample_rate, 3)})
    if args.set:
        cfg = cfg.replace(**dict(args.set))
    return cfg, base, frames


def run_size(spark, meter: Meter, args, root: str, n: int, cores: int, echo) -> dict:
    """Generate a catalogue of ``n`` tracks and run the stages on it; the size's figures.
    A failing stage raises (its figures so far are in ``result``, attached to the error)."""
    from deepcuts.core.cli import run_stage
    from deepcuts.core.lake import lake
    from deepcuts.core.spark import apply_runtime_conf
    from deepcuts.core.tables import MELS
    import deepcuts.stages.train as train_stage

    cfg, base, frames = size_config(args, root, n)
    apply_runtime_conf(spark, cfg)
    n_users = args.users or max(1, int(round(n * args.users_per_track)))
    result = {"tracks": n, "frames": frames, "n_mels": cfg.ingest.n_mels, "users": n_users, "stages": {}}
    echo(f"\n=== {n} tracks: generating mels ({cfg.ingest.n_mels} x {frames}) and plays ({n_users} users) ===")
    meter.start("generate mels")
    committed = write_mels(spark, cfg, n, frames, args.clusters, args.seed, cores)
    gen = meter.stop()
    started = time.perf_counter()
    play_rows = write_plays(cfg.factors.plays, n, n_users, n * args.plays_per_track, args.clusters,
                            args.zipf, args.own_cluster, args.seed)
    lk = lake(cfg)
    rows, files, size = lk.file_stats(MELS.name)
    result.update(play_rows=play_rows, plays_gen_s=time.perf_counter() - started, mels_gen=gen,
                  mels_rows=rows, mels_files=files, mels_bytes=size, mels_version=committed.version,
                  plays_bytes=folder_bytes(cfg.factors.plays))
    echo(f"  mels: {rows} rows in {files} files, {size / 2**20:.1f} MB ({size / max(rows, 1) / 1024:.1f} kB "
         f"a track), {gen['wall_s']:.1f} s; plays: {play_rows} rows, {result['plays_bytes'] / 2**20:.1f} MB, "
         f"{result['plays_gen_s']:.1f} s")
    assert rows == n, f"mels holds {rows} rows, expected {n}"

    original_build = train_stage.build_training_set

    def timed_build(ctx):   # "train.build" ends here, "train.epoch" starts
        built = original_build(ctx)
        result["stages"]["train.build"] = {**meter.stop(), "items": n, "item": "track"}
        meter.start("train.epoch")
        return built

    for name in args.stages:
        items, item = (play_rows, "play row") if name == "factors" else (n, "track")
        meter.start("train.build" if name == "train" else name)
        train_stage.build_training_set = timed_build if name == "train" else original_build
        try:
            summary = run_stage(spark, cfg, name)
        except BaseException as exc:
            figures = meter.stop()
            result["stages"][figures["name"]] = {**figures, "items": items, "item": item, "error": repr(exc)}
            exc.scale_result = result
            raise
        finally:
            train_stage.build_training_set = original_build
        figures = {**meter.stop(), "items": items, "item": item}
        if name == "train":
            result["stages"]["train.epoch"] = figures
            build = result["stages"].get("train.build")
            if build is None:   # the stage skipped the build (not due): all of it is one row
                result["stages"]["train"] = {**figures, "name": "train"}
                del result["stages"]["train.epoch"]
        else:
            result["stages"][name] = figures
        result.setdefault("summaries", {})[name] = summary
    result["warehouse_bytes"] = folder_bytes(cfg.warehouse.root)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return result


# --- printing ------------------------------------------------------------------------------
def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def print_size(res: dict, cores: int) -> None:
    n = res["tracks"]
    print(f"\n{n} tracks ({res['n_mels']} x {res['frames']} mels, {res['play_rows']} play rows, "
          f"{res['users']} users); mels {res['mels_bytes'] / 2**20:.1f} MB on disk "
          f"({res['mels_bytes'] / max(n, 1) / 1024:.1f} kB a track), warehouse {_mb(res.get('warehouse_bytes'))} MB")
    head = (f"{'stage':<12} {'wall s':>8} {'CPU s':>8} {'task CPU s':>10} {'µs CPU/item':>12} {'item':<9} "
            f"{'shuffle MB':>10} {'tasks':>6} {'2xcores':>7} {'driver MB':>9} {'(+MB)':>6} {'JVM MB':>7} {'workers MB':>10}"
            )
    print(head)
    print("-" * len(head))
    for name, s in res["stages"].items():
        largest = s.get("largest") or {}
        shuffle = (s.get("shuffle_read_bytes", 0) + s.get("shuffle_write_bytes", 0)) if "shuffle_read_bytes" in s else None
        tasks = largest.get("tasks")
        flag = " <" if tasks is not None and tasks < 2 * cores else ""
        print(f"{name:<12} {s['wall_s']:8.1f} {s['cpu_s']:8.1f} {s.get('task_cpu_s', float('nan')):10.1f} "
              f"{1e6 * s['cpu_s'] / max(s['items'], 1):12.1f} {s['item']:<9} {_mb(shuffle):>10} "
              f"{'-' if tasks is None else tasks:>6}{flag:2}{2 * cores:>5} {s['driver_peak_mb']:9.0f} "
              f"{s['driver_peak_mb'] - s.get('driver_start_mb', 0):6.0f} {s['jvm_peak_mb']:7.0f} {s['workers_total_peak_mb']:10.0f}" + ("  FAILED" if "error" in s else ""))
    print("  (CPU s: this driver + JVM + Python workers, /proc; task CPU s: JVM task threads, REST executorCpuTime; "
          "tasks: of the Spark stage with the most input + shuffle read, '<' below 2 x cores; driver (+MB): "
          "its peak and the rise over what it held at the stage's start; workers MB: their RSS summed, shared "
          "pages counted in each)")
    if any(s.get("narrow_stages") for s in res["stages"].values()):
        print(f"  Spark stages with >= 1 s of task time in fewer than {2 * cores} tasks (the 3 costliest call sites):")
    for name, s in res["stages"].items():
        for g in s.get("narrow_stages", [])[:3]:
            print(f"    {name:<11} {g['stages']:3d} x <= {g['max_tasks']} task(s), {g['run_s']:6.1f} task-s: {g['name']}")
    for name, summary in (res.get("summaries") or {}).items():
        seconds = summary.get("seconds") if isinstance(summary, dict) else None
        if isinstance(seconds, dict):
            print(f"  {name} summary seconds: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, (int, float)) else
                                                           f"{k} {v}" for k, v in seconds.items()))


def figure(results: list[dict], cores: int) -> dict:
    small, large = results[0], results[-1]
    decades = math.log10(large["tracks"] / small["tracks"]) if large["tracks"] > small["tracks"] else 0
    out = {"smallest": small["tracks"], "largest": large["tracks"], "decades": decades, "stages": {}}
    for name, s_large in large["stages"].items():
        s_small = small["stages"].get(name)
        if s_small is None:
            continue
        per_small = s_small["cpu_s"] / max(s_small["items"], 1)
        per_large = s_large["cpu_s"] / max(s_large["items"], 1)
        wall_ratio = (s_large["wall_s"] / max(s_large["items"], 1)) / max(s_small["wall_s"] / max(s_small["items"], 1), 1e-12)
        ratio = per_large / max(per_small, 1e-12)
        largest = s_large.get("largest") or {}
        tasks = largest.get("tasks")
        out["stages"][name] = {
            "cpu_per_item_ratio": ratio, "wall_per_item_ratio": wall_ratio,
            "cpu_per_item_ratio_per_x10": ratio ** (1 / decades) if decades and ratio > 0 else None,
            "driver_peak_ratio": s_large["driver_peak_mb"] / max(s_small["driver_peak_mb"], 1e-9),
            "driver_rise_mb": [s_small["driver_peak_mb"] - s_small.get("driver_start_mb", 0),
                               s_large["driver_peak_mb"] - s_large.get("driver_start_mb", 0)],
            "jvm_peak_ratio": s_large["jvm_peak_mb"] / max(s_small["jvm_peak_mb"], 1e-9),
            "largest_stage_tasks": tasks, "few_tasks": tasks is not None and tasks < 2 * cores and largest.get("run_s", 0) >= 1.0}
    return out


def print_figure(fig: dict, cores: int) -> None:
    print(f"\nfigure: cost per item at {fig['largest']} tracks / at {fig['smallest']} tracks "
          f"({fig['decades']:.2f} decades; targets: <= 1.5 per x10, driver peak <= 1.2)")
    print(f"{'stage':<12} {'CPU/item':>9} {'per x10':>8} {'wall/item':>9} {'driver pk':>9} {'rise MB':>11} "
          f"{'JVM pk':>7}  flags")
    for name, f in fig["stages"].items():
        per10 = f["cpu_per_item_ratio_per_x10"]
        flags = []
        if per10 is not None and per10 > 1.5:
            flags.append("COST PER ITEM GROWS")
        if f["driver_peak_ratio"] > 1.2:
            flags.append("DRIVER MEMORY GROWS")
        if f["few_tasks"]:
            flags.append(f"largest Spark stage (>= 1 task-s) {f['largest_stage_tasks']} tasks < {2 * cores}")
        print(f"{name:<12} {f['cpu_per_item_ratio']:9.2f} {'-' if per10 is None else f'{per10:.2f}':>8} "
              f"{f['wall_per_item_ratio']:9.2f} {f['driver_peak_ratio']:9.2f} "
              f"{'%.0f->%.0f' % tuple(f['driver_rise_mb']):>11} {f['jvm_peak_ratio']:7.2f}  "
              f"{'; '.join(flags) or 'ok'}")


# --- main ----------------------------------------------------------------------------------
def parse_set(text: str):
    from deepcuts.core.config import parse_override_value
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected section.key=value")
    return key.strip(), parse_override_value(value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracks", type=int, nargs="+", default=[10_000, 100_000], help="catalogue sizes")
    p.add_argument("--cores", type=int, default=2, help="Spark local[cores]")
    p.add_argument("--frames", type=int, default=0, help="mel frames (default: the training crop + 30)")
    p.add_argument("--clusters", type=int, default=16, help="clusters shared by the mels and the plays")
    p.add_argument("--plays-per-track", type=int, default=10, help="play draws per track (duplicates summed)")
    p.add_argument("--users-per-track", type=float, default=0.5, help="users = tracks x this")
    p.add_argument("--users", type=int, default=0, help="users (overrides --users-per-track)")
    p.add_argument("--zipf", type=float, default=0.8, help="track popularity exponent")
    p.add_argument("--own-cluster", type=float, default=0.8, help="share of a user's draws from their cluster")
    p.add_argument("--rank", type=int, default=32, help="factors.rank")
    p.add_argument("--iterations", type=int, default=5, help="factors.iterations")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, run in this order")
    p.add_argument("--set", action="append", type=parse_set, default=[], metavar="KEY=VALUE",
                   help="any config override (TOML value), e.g. train.dense_units=512")
    p.add_argument("--warmup", type=int, default=0, help="tracks of a throwaway first size (not reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default="", help="scratch folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch warehouses")
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args()
    args.tracks = sorted(set(args.tracks))
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    root = args.root or tempfile.mkdtemp(prefix="deepcuts-bench-scale-")
    os.makedirs(root, exist_ok=True)
    try:
        return bench(args, root)
    finally:
        if args.keep:
            print(f"scratch kept in {root}")
        elif not args.root:
            shutil.rmtree(root, ignore_errors=True)


def start_session(cfg, cores: int):
    """``get_session`` as every job gets it, with the UI (and its REST API) on for the bench."""
    import deepcuts.core.spark as dspark
    defaults = dspark.spark_defaults
    dspark.spark_defaults = lambda: {**defaults(), **BENCH_SPARK}
    try:
        spark = dspark.get_session(cfg, "deepcuts-bench-scale", master=f"local[{cores}]")
    finally:
        dspark.spark_defaults = defaults
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def bench(args, root: str) -> int:
    from deepcuts.core.cli import one_line
    echo = lambda line: print(line, flush=True)  # noqa: E731
    cfg0, _, frames = size_config(args, root, args.tracks[0])
    t = cfg0.train
    echo(f"scale bench: sizes {args.tracks}, local[{args.cores}], stages {', '.join(args.stages)}; mels "
         f"{cfg0.ingest.n_mels} x {frames}, {args.plays_per_track} play draws a track, zipf {args.zipf}, "
         f"{args.clusters} clusters; ALS rank {cfg0.factors.rank} x {cfg0.factors.iterations} iterations; "
         f"CNN conv {t.conv_channels}, dense {t.dense_units}, 1 epoch, batch {t.batch_size}"
         + (f"; overrides {dict(args.set)}" if args.set else ""))
    started = time.perf_counter()
    spark = start_session(cfg0, args.cores)
    results, failed, meter = [], None, None
    reaper = OrphanReaper()
    if not reaper.active:
        echo("WARNING: not a child subreaper: CPU of orphaned Python workers may be lost")
    try:
        try:
            rest = SparkRest(spark)
        except RuntimeError as exc:
            echo(f"WARNING: {exc}: shuffle and task figures are missing")
            rest = None
        meter = Meter(spark, rest, args.cores, reaper)
        if not meter.hwm_reset:
            echo("WARNING: peak-RSS marks could not be reset: memory peaks are lifetime peaks")
        sizes = ([args.warmup] if args.warmup else []) + args.tracks
        for i, n in enumerate(sizes):
            size_started = time.perf_counter()
            try:
                res = run_size(spark, meter, args, root, n, args.cores, echo)
            except BaseException as exc:  # noqa: BLE001 - a failing stage ends the bench, non-zero
                failed = {"tracks": n, "error": one_line(exc) if isinstance(exc, Exception) else repr(exc),
                          "traceback": traceback.format_exc()}
                if hasattr(exc, "scale_result"):
                    results.append(exc.scale_result)
                print(failed["traceback"], file=sys.stderr, flush=True)
                echo(f"\nFAILED at {n} tracks: {failed['error']}")
                break
            res["size_wall_s"] = time.perf_counter() - size_started
            if args.warmup and i == 0:
                echo(f"(warm-up size {n}: {res['size_wall_s']:.0f} s, not reported)")
                continue
            results.append(res)
            print_size(res, args.cores)
    finally:
        spark.stop()
        reaper.close()
        if meter is not None:
            meter.cpu.close()
    fig = None
    complete = [r for r in results if all(s in r.get("summaries", {}) for s in args.stages)]
    if failed and results:
        print_size(results[-1], args.cores)
    if len(complete) >= 2:
        fig = figure(complete, args.cores)
        print_figure(fig, args.cores)
    total = time.perf_counter() - started
    print(f"\nmels on disk: " + ", ".join(f"{r['tracks']} tracks {r['mels_bytes'] / 2**20:.1f} MB" for r in results)
          + (f"; at {results[-1]['mels_bytes'] / max(results[-1]['tracks'], 1) / 1024:.1f} kB a track, 10^6 tracks "
             f"~{results[-1]['mels_bytes'] / max(results[-1]['tracks'], 1) * 1e6 / 2**30:.1f} GB (the training set "
             f"copies them once more)" if results else ""))
    lifetime = meter.driver_lifetime_peak_mb if meter else 0.0
    print(f"bench wall {total:.0f} s; driver peak over the run {lifetime:.0f} MB; "
          f"peak RSS (driver + children reaped): {peak_rss_mb():.0f} MB"
          + (" (the driver's mark is reset per stage: the driver peak above is the run's)"
             if meter and meter.hwm_reset else "") + f"; orphaned worker processes reaped: {reaper.reaped}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bench": "scale", "args": {k: v for k, v in vars(args).items()}, "cores": args.cores,
                       "sizes": results, "figure": fig, "failed": failed, "wall_s": total,
                       "driver_lifetime_peak_mb": lifetime, "orphans_reaped": reaper.reaped, "peak_rss_mb": peak_rss_mb()},
                      fh, indent=1, default=str)
        print(f"figures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
