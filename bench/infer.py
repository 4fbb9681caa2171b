"""Bench of the inference stage: tracks/s per core scoring 30 s mels, Spark vs a plain loop.

Anchor: a single-process loop over the same Parquet files, the same model and the same
per-batch function (``deepcuts.infer.score_mel_batch``), one torch thread on one core.
The Spark figure is ``predict_vectors`` on local[cores] (one torch thread per task),
written to Spark's no-op sink, divided by the cores.  Spark overhead = 1 - spark/loop
per core.  The model is FactorCNN with the sizes of conf/deepcuts.toml [train] (random
weights: throughput does not depend on them).

    .venv/bin/python bench/infer.py --tracks 512 --cores 2
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def write_synthetic_mels(wh, n_tracks: int, n_mels: int, n_frames: int, rows_per_group: int) -> None:
    """A committed ``mels`` table of random float16 mels (content does not change the cost)."""
    from deepcuts.tables import MELS
    rng = np.random.default_rng(0)
    run_id = "ingest-bench"
    folder = wh.local_path(MELS.name, "data", run_id)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "part-00000.parquet")
    with pq.ParquetWriter(path, MELS.schema, compression="zstd") as writer:
        for start in range(0, n_tracks, rows_per_group):
            ids = range(start, min(n_tracks, start + rows_per_group))
            mels = [rng.normal(-30, 10, (n_mels, n_frames)).astype(np.float16).tobytes() for _ in ids]
            cols = {"track_id": [f"bench-{i:07d}" for i in ids], "mel": mels,
                    "n_mels": [n_mels] * len(mels), "n_frames": [n_frames] * len(mels),
                    "sample_rate": [22050] * len(mels), "hop_length": [512] * len(mels),
                    "excerpt_offset_s": [0.0] * len(mels), "duration_s": [30.0] * len(mels),
                    "fingerprint": [f"fp-{i}" for i in ids], "source_uri": [f"bench://{i}" for i in ids],
                    "source_size": [0] * len(mels), "source_version": ["1"] * len(mels),
                    "labels": [None] * len(mels), "ingest_run_id": [run_id] * len(mels)}
            writer.write_table(pa.table(cols, schema=MELS.schema), row_group_size=rows_per_group)
    wh.commit(MELS.name, run_id, wh.list_data_files(MELS.name, run_id))


def loop_rate(wh, artifact, cfg, batch_rows: int) -> tuple[float, int]:
    """Single process, one thread: read Parquet batches, score them; tracks/s."""
    import torch
    from deepcuts.infer import MEL_INPUT_COLUMNS, score_mel_batch
    from deepcuts.tables import MELS
    torch.set_num_threads(1)
    started, n = time.perf_counter(), 0
    for path in wh.files(MELS.name, local=True):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=MEL_INPUT_COLUMNS):
            out = score_mel_batch(batch.to_pandas(), artifact, cfg.infer.scoring,
                                  cfg.infer.window_seconds, cfg.infer.batch_size)
            n += int(out["reason"].isna().sum())
    return n / (time.perf_counter() - started), n


def spark_rate(spark, wh, folder, cfg) -> tuple[float, float]:
    """tracks/s of the Spark scoring job (cold: first run in fresh workers; then warm)."""
    from deepcuts.infer import predict_vectors
    from deepcuts.sparkio import read_table
    from deepcuts.tables import MELS
    n = wh.snapshot(MELS.name).rows
    rates = []
    for _ in range(2):
        started = time.perf_counter()
        mels = read_table(spark, wh, MELS)
        predict_vectors(spark, mels, folder, cfg).write.format("noop").mode("overwrite").save()
        rates.append(n / (time.perf_counter() - started))
    return rates[0], rates[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracks", type=int, default=256, help="mels scored (30 s excerpts)")
    p.add_argument("--seconds", type=float, default=30.0, help="excerpt length")
    p.add_argument("--cores", type=int, default=2, help="Spark local[cores]")
    p.add_argument("--scoring", choices=("whole", "windows"), default=None, help="default: conf")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: conf")
    args = p.parse_args()

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    import torch
    from deepcuts.config import load_config
    from deepcuts.model import FactorCNN, frames_for_seconds, load_artifact, save_artifact
    from deepcuts.sparkio import get_session, warehouse

    root = tempfile.mkdtemp(prefix="deepcuts-bench-infer-")
    overrides = {"warehouse.root": os.path.join(root, "warehouse"),
                 "spark.checkpoint_dir": os.path.join(root, "checkpoints")}
    if args.scoring:
        overrides["infer.scoring"] = args.scoring
    if args.precision:
        overrides["infer.precision"] = args.precision
    cfg = load_config(overrides=overrides)
    wh = warehouse(cfg)
    n_mels = cfg.ingest.n_mels
    n_frames = frames_for_seconds(args.seconds, cfg.ingest.sample_rate, cfg.ingest.hop_length)
    train = dataclasses.asdict(cfg.train)
    model = FactorCNN.from_train_conf(train, n_mels=n_mels, out_dim=cfg.factors.rank)
    meta = {"target": "factors", "n_mels": n_mels, "out_dim": cfg.factors.rank, "train": train,
            "mel_mean": [-30.0] * n_mels, "mel_std": [10.0] * n_mels, "crop_frames": 130,
            "factors_run_id": "bench"}
    folder = save_artifact(wh, "bench-model", model, meta)
    params = sum(p.numel() for p in model.parameters())
    write_synthetic_mels(wh, args.tracks, n_mels, n_frames, cfg.ingest.rows_per_row_group)
    print(f"infer bench: {args.tracks} mels of {n_mels}x{n_frames} ({args.seconds:g} s), "
          f"model {params / 1e6:.1f} M params (conv {train['conv_channels']}, dense "
          f"{train['dense_units']}), scoring={cfg.infer.scoring}, precision={cfg.infer.precision}, torch {torch.__version__}, "
          f"batch {cfg.infer.batch_size}", flush=True)

    artifact = load_artifact(folder, precision=cfg.infer.precision)
    loop_per_core, scored = loop_rate(wh, artifact, cfg, cfg.spark.arrow_batch_rows)
    assert scored == args.tracks, f"loop scored {scored} of {args.tracks}"
    print(f"  loop (1 process, 1 thread):       {loop_per_core:8.1f} tracks/s per core", flush=True)

    spark = get_session(cfg, "deepcuts-bench-infer", master=f"local[{args.cores}]")
    spark.sparkContext.setLogLevel("ERROR")
    # One task per row group: the single bench file is spread over the cores, no empty splits.
    row_group_bytes = 2 * n_mels * n_frames * cfg.ingest.rows_per_row_group
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(row_group_bytes))
    try:
        cold, warm = spark_rate(spark, wh, folder, cfg)
    finally:
        spark.stop()
    cold_pc, warm_pc = cold / args.cores, warm / args.cores
    print(f"  spark local[{args.cores}] cold (worker start, model load): {cold_pc:8.1f} tracks/s per core")
    print(f"  spark local[{args.cores}] warm:                            {warm_pc:8.1f} tracks/s per core")
    print(f"  spark overhead vs loop (warm):  {100 * (1 - warm_pc / loop_per_core):6.1f} %   "
          f"(cold: {100 * (1 - cold_pc / loop_per_core):.1f} %)   target <= 20 %")
    print(f"  target >= 100 tracks/s per core: loop {'met' if loop_per_core >= 100 else 'NOT met'}, "
          f"spark {'met' if warm_pc >= 100 else 'NOT met'}")
    print(f"  peak RSS (driver + children reaped): {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
