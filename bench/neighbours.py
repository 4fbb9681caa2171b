"""Bench of the neighbours stage: the sharded Spark k-NN job vs single-process FAISS, and
approximate indexes vs exact.

Vectors: clustered unit vectors (a mixture of ``n / 200`` gaussian clusters on the sphere,
rank 64), not uniform noise, which makes IVF look bad and exact look easy.

Part A (``--tracks``, default 200k, every track a query, k = 10): the stage's exact job
(``knn.sharded``: build shards, stage the query blocks, one Spark task per (block x shard)
pair, per-block merge, written to Parquet) on ``local[cores]``, against the anchor: one
process, ``IndexFlatIP`` over the same vectors, ``faiss.omp_set_num_threads(cores)``,
search k + 1.  Same run, same cores.  Target: wall ratio <= 1.3x.  The Spark result is
checked against the anchor on a sample of queries (the same work was done).

Part B (``--big``, default 1M tracks, ``--sample`` queries): IVF and HNSW (the project's
``knn.search`` functions, one process, all cores) against exact IndexFlatIP on the same
queries: recall@10 and search speed-up over exact, in wall time (each search the fastest of
3, exact re-timed before every configuration, its fastest used) and in CPU time (all
threads: the work done, which other jobs on a shared machine do not change).  Target: recall@10 >= 0.95 at >= 10x.
Build times are reported beside (paid once per run, per shard).

Then peak memory (this driver process, the JVM, the Python workers) and the per-track cost
with the projected wall time for 1e7 tracks on N cores.

    .venv/bin/python bench/neighbours.py [--tracks 200000] [--big 1000000] [--cores 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchutil import SparkMemory, peak_rss_mb

DIM = 64
K = 10


def clustered_unit(n: int, dim: int, seed: int, per_cluster: int = 200) -> np.ndarray:
    """Unit vectors from a mixture of gaussian clusters on the sphere (chunked: bounded memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per_cluster), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        # spread: within-cluster cosines ~0.5, so near neighbours also come from nearby clusters
        x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, dim)).astype(np.float32) * 0.125
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_vectors(path: str, x: np.ndarray) -> None:
    ids = pa.array([f"t{i:08d}" for i in range(len(x))], pa.string())
    vectors = pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32)),
                                       pa.array(x.reshape(-1)))
    pq.write_table(pa.table({"id": ids, "vector": vectors, "source": pa.array(["audio"] * len(x))}), path,
                   row_group_size=50_000)


def anchor_flat(x: np.ndarray, cores: int) -> tuple[float, np.ndarray, np.ndarray]:
    import faiss
    faiss.omp_set_num_threads(cores)
    started = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, rows = index.search(x, K + 1)
    return time.perf_counter() - started, scores, rows


def spark_flat(spark, data_path: str, work: str, n: int, cores: int, shards: int = 0) -> tuple[float, dict, str]:
    from deepcuts.core.config import load_config
    from deepcuts.knn import sharded
    from deepcuts.knn.search import IndexSpec
    from deepcuts.knn.shards import plan_from_conf
    nc = load_config(overrides={"neighbours.shards": shards}).neighbours
    plan = plan_from_conf(nc, n, n, cores)
    spec = IndexSpec()
    out = os.path.join(work, "merged")
    started = time.perf_counter()
    items = spark.read.parquet(data_path)
    # As the stage runs similar_tracks: the shard builders also stage the query blocks.
    manifest = sharded.build_shards(items, spec, plan.shards, os.path.join(work, "idx"), normalise=True,
                                    train_rows=nc.ivf_train_rows, seed=nc.seed, n_items=n,
                                    query_blocks=plan.blocks, query_folder=os.path.join(work, "q"))
    built = time.perf_counter()
    sharded.search_merged(spark, manifest, os.path.join(work, "idx"), os.path.join(work, "q"), manifest["blocks"],
                          K, spec, exclude_self=True).write.mode("overwrite").parquet(out)
    seconds = time.perf_counter() - started
    return seconds, {"shards": plan.shards, "blocks": plan.blocks, "build_s": built - started,
                     "search_merge_write_s": time.perf_counter() - built}, out


def check_against_anchor(out: str, rows: np.ndarray, scores: np.ndarray, n_check: int = 500) -> float:
    """Share of sampled queries whose Spark list equals the anchor's (ties aside: scores match)."""
    import pyarrow.dataset as ds
    got = ds.dataset(out, format="parquet").to_table(columns=["query_id", "rank", "neighbour_id", "score"])
    got = got.to_pandas()
    picks = set(f"t{i:08d}" for i in np.random.default_rng(0).choice(len(rows), n_check, replace=False))
    got = got[got["query_id"].isin(picks)].sort_values(["query_id", "rank"])
    same = 0
    for q, g in got.groupby("query_id"):
        i = int(q[1:])
        want = [f"t{r:08d}" for r in rows[i] if r != i][:K]
        want_s = [s for r, s in zip(rows[i], scores[i]) if r != i][:K]
        if list(g["neighbour_id"]) == want or np.allclose(g["score"], want_s, atol=1e-5):
            same += 1
    return same / max(1, got["query_id"].nunique())


CPU_TIMES: list[float] = []      # process CPU seconds of the last ``timed`` call's fastest run


def timed(fn, repeats: int):
    """(result, the fastest of ``repeats`` wall times): robust to other jobs on the machine.
    The CPU seconds (all threads) of that run go to CPU_TIMES: the work, whatever the load."""
    best, cpu, out = float("inf"), 0.0, None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - t
        if wall < best:
            best, cpu = wall, time.process_time() - c
    CPU_TIMES.append(cpu)
    return out, best


def recall_at_k(truth: np.ndarray, got: np.ndarray, k: int = K) -> float:
    hits = sum(len(set(t[:k]) & set(g[:k])) for t, g in zip(truth, got))
    return hits / (k * len(truth))


def part_b(x: np.ndarray, sample: int, cores: int, nlist: int, nprobes: list[int], hnsw_m: int,
           ef_construction: int, ef_searches: list[int], skip_hnsw: bool) -> dict:
    """Recall@10 and speed-up over exact of IVF and HNSW.  The exact search is timed again
    before every approximate configuration and the speed-ups use its fastest time, so load
    from other jobs can only make the speed-up look smaller, never larger."""
    import faiss
    from deepcuts.knn.search import IndexSpec, build_index, search_pair, train_coarse
    faiss.omp_set_num_threads(cores)
    rng = np.random.default_rng(1)
    q = x[rng.choice(len(x), sample, replace=False)]
    flat = build_index(x, IndexSpec())
    exact_times = []

    exact_cpu = []

    def time_exact():
        out, secs = timed(lambda: search_pair(flat, q, K, IndexSpec()), 1)
        exact_times.append(secs)
        exact_cpu.append(CPU_TIMES[-1])
        return out[1]

    truth = time_exact()
    out = {"n": len(x), "queries": sample, "ivf": [], "hnsw": []}
    configs = []
    spec = IndexSpec(kind="ivf", nlist=nlist)
    t = time.perf_counter()
    coarse = train_coarse(x[rng.choice(len(x), min(len(x), 50 * nlist), replace=False)], spec)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    ivf = build_index(x, spec, coarse)
    t_add = time.perf_counter() - t
    out["ivf_build_s"] = t_train + t_add
    print(f"  ivf nlist={nlist}: train {t_train:.1f} s (on {min(len(x), 50 * nlist)} vectors), add {t_add:.1f} s",
          flush=True)
    def sweep(kind: str, index, setting: str, values, spec_of) -> None:
        """Recall and search time of ``index`` for each value of one search setting (exact re-timed before each)."""
        for value in values:
            time_exact()
            spec_now = spec_of(value)
            (_, got), secs = timed(lambda: search_pair(index, q, K, spec_now), 3)
            configs.append((kind, {setting: value, "recall": recall_at_k(truth, got), "seconds": secs,
                                   "cpu_s": CPU_TIMES[-1]}))

    sweep("ivf", ivf, "nprobe", nprobes, lambda v: IndexSpec(kind="ivf", nlist=nlist, nprobe=v))
    del ivf
    if not skip_hnsw:
        spec = IndexSpec(kind="hnsw", hnsw_m=hnsw_m, ef_construction=ef_construction)
        t = time.perf_counter()
        hnsw = build_index(x, spec)
        out["hnsw_build_s"] = time.perf_counter() - t
        print(f"  hnsw M={hnsw_m} efConstruction={ef_construction}: build {out['hnsw_build_s']:.1f} s", flush=True)
        sweep("hnsw", hnsw, "ef_search", ef_searches, lambda v: IndexSpec(kind="hnsw", hnsw_m=hnsw_m, ef_search=v))
    t_exact = min(exact_times)
    cpu_exact = float(np.median(exact_cpu))
    out.update(exact_s=t_exact, exact_ms_per_query=1000 * t_exact / sample,
               exact_s_all=[round(v, 2) for v in exact_times], exact_cpu_s=cpu_exact)
    print(f"  exact IndexFlatIP: {1000 * t_exact / sample:.3f} ms/query ({sample} queries over {len(x)}; "
          f"fastest of {len(exact_times)} timings: {', '.join(f'{v:.1f}' for v in exact_times)} s)")
    for kind, row in configs:
        row.update(speedup=t_exact / row["seconds"], ms_per_query=1000 * row["seconds"] / sample,
                   cpu_speedup=cpu_exact / max(row["cpu_s"], 1e-9))
        out[kind].append(row)
        knob = f"nprobe={row['nprobe']:<4}" if kind == "ivf" else f"efSearch={row['ef_search']:<4}"
        ok = "target met" if row["recall"] >= 0.95 and min(row["speedup"], row["cpu_speedup"]) >= 10 else ""
        print(f"  {kind:<4} {knob} recall@10 {row['recall']:.4f}  speed-up {row['speedup']:6.1f}x wall, "
              f"{row['cpu_speedup']:6.1f}x CPU  ({row['ms_per_query']:.3f} ms/query) {ok}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracks", type=int, default=200_000, help="part A: catalogue = queries")
    p.add_argument("--big", type=int, default=1_000_000, help="part B: catalogue size")
    p.add_argument("--sample", type=int, default=2000, help="part B: queries")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--shards", type=int, default=0, help="part A: shards (0 = derived, as the stage)")
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--nprobe", default="8,16,32")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=64)
    p.add_argument("--ef-search", default="32,64")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--skip-hnsw", action="store_true")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    work = tempfile.mkdtemp(prefix="deepcuts-bench-neighbours-")
    figures: dict = {"cores": args.cores}
    try:
        print(f"neighbours bench: rank {DIM}, k {K}, {args.cores} cores, load {os.getloadavg()[0]:.1f}",
              flush=True)
        if not args.skip_a:
            figures["a"] = bench_a(args, work)
        if not args.skip_b:
            print(f"B. {args.big} clustered unit vectors, {args.sample} sampled queries, one process", flush=True)
            x = clustered_unit(args.big, DIM, seed=2)
            figures["b"] = part_b(x, args.sample, args.cores, args.nlist,
                                  [int(v) for v in args.nprobe.split(",")], args.hnsw_m, args.ef_construction,
                                  [int(v) for v in args.ef_search.split(",")], args.skip_hnsw)
            del x
        project(figures)
        figures["bench_peak_rss_mb"] = peak_rss_mb()
        print(f"peak RSS of this process (+ reaped children): {figures['bench_peak_rss_mb']:.0f} MB")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(figures, fh, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def bench_a(args, work: str) -> dict:
    from deepcuts.core.config import load_config
    from deepcuts.core.spark import get_session
    n, cores = args.tracks, args.cores
    print(f"A. {n} clustered unit vectors, all {n} as queries, exact, k={K}", flush=True)
    x = clustered_unit(n, DIM, seed=1)
    data = os.path.join(work, "vectors.parquet")
    write_vectors(data, x)
    cfg = load_config(overrides={"warehouse.root": os.path.join(work, "wh"),
                                 "spark.checkpoint_dir": os.path.join(work, "ck")})
    # The anchor runs before and after the Spark job and the ratio uses the faster of the two:
    # load from other jobs on the machine can then only make Spark look worse, never better.
    anchor_first, scores, rows = anchor_flat(x, cores)
    print(f"  single-process IndexFlatIP ({cores} threads), before the Spark job: {anchor_first:.1f} s", flush=True)
    del scores, rows
    spark = get_session(cfg, "deepcuts-bench-neighbours", master=f"local[{cores}]")
    spark.sparkContext.setLogLevel("ERROR")
    try:
        # Warm the JVM and the Python workers on a small catalogue first: a nightly job pays that
        # once (earlier stages), not per table.  Reported, not counted.
        warm_n = min(n, 10_000)
        write_vectors(os.path.join(work, "warm.parquet"), x[:warm_n])
        warm_s, _, _ = spark_flat(spark, os.path.join(work, "warm.parquet"), os.path.join(work, "warm"), warm_n, cores)
        print(f"  spark warm-up job on {warm_n} tracks (fresh JVM and workers): {warm_s:.1f} s", flush=True)
        jvm_pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
        with SparkMemory(jvm_pid) as memory:
            spark_s, plan, out = spark_flat(spark, data, work, n, cores, args.shards)
    finally:
        spark.stop()
    print(f"  spark sharded job ({plan['shards']} shards x {plan['blocks']} blocks, local[{cores}]): "
          f"{spark_s:.1f} s (shard build + query staging {plan['build_s']:.1f} s, "
          f"search + merge + write {plan['search_merge_write_s']:.1f} s)", flush=True)
    anchor_second, scores, rows = anchor_flat(x, cores)
    print(f"  single-process IndexFlatIP ({cores} threads), after the Spark job: {anchor_second:.1f} s", flush=True)
    anchor_s = min(anchor_first, anchor_second)
    same = check_against_anchor(out, rows, scores)
    ratio = spark_s / anchor_s
    print(f"  wall ratio spark / single process (the faster anchor): {ratio:.2f}x   (target <= 1.3x: "
          f"{'met' if ratio <= 1.3 else 'NOT met'});  sampled lists equal to the anchor: {100 * same:.1f} %")
    print(f"  peak memory during the Spark job: driver Python {memory.driver_mb:.0f} MB (it generated the "
          f"vectors), JVM (driver + executor) {memory.jvm_mb:.0f} MB, Python workers {memory.worker_mb:.0f} MB "
          f"the largest, {memory.workers_total_mb:.0f} MB together")
    return {"n": n, "spark_s": spark_s, "warmup_s": warm_s, "warmup_n": warm_n, "anchor_s": anchor_s,
            "ratio": ratio, "same_share": same,
            "jvm_peak_mb": memory.jvm_mb, "worker_peak_mb": memory.worker_mb,
            "workers_total_peak_mb": memory.workers_total_mb, "driver_peak_mb": memory.driver_mb,
            "anchor_first_s": anchor_first, "anchor_second_s": anchor_second, **plan}


def project(figures: dict) -> None:
    """Per-track cost and the projected wall time of 1e7 tracks (all as queries) on N cores."""
    cores = figures["cores"]
    lines = []
    if "a" in figures:
        a = figures["a"]
        # exact: cost ~ queries x items; per (query x 1e6 items) on one core, through the Spark job
        per_pair_core_s = a["spark_s"] * cores / (a["n"] * a["n"])
        figures["exact_core_s_per_query_per_million_items"] = per_pair_core_s * 1e6
        lines.append(f"  exact, via the Spark job: {per_pair_core_s * 1e6 * 1e3:.3f} core-ms per query per "
                     f"1e6 catalogue tracks ({a['spark_s'] * cores / a['n'] * 1e3:.3f} core-ms per track "
                     f"at {a['n']})")
        overhead = a["ratio"]
    else:
        overhead = 1.3
    b = figures.get("b")
    n_big = 1e7
    for n_cores in (16, 64, 256):
        parts = []
        if "a" in figures:
            exact = figures["exact_core_s_per_query_per_million_items"] * n_big * (n_big / 1e6) / n_cores
            parts.append(f"exact {exact / 3600:.1f} h")
        if b:
            # sharded: S = 10 shards of 1e6; every query searches every shard at the 1e6 cost measured
            for name, rows in (("ivf", b["ivf"]), ("hnsw", b["hnsw"])):
                good = [r for r in rows if r["recall"] >= 0.95]
                if good:
                    best = min(good, key=lambda r: r["ms_per_query"])
                    core_s = best["ms_per_query"] / 1000 * cores * 10 * n_big * overhead / n_cores
                    knob = f"nprobe {best['nprobe']}" if name == "ivf" else f"ef {best['ef_search']}"
                    parts.append(f"{name} ({knob}, recall {best['recall']:.3f}) {core_s / 60:.1f} min")
        lines.append(f"  1e7 tracks on {n_cores} cores: " + ", ".join(parts))
    print("projection (1e7 tracks all as queries; shards of 1e6; Spark overhead = the measured ratio):")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
