"""Bench of the inference stage: tracks/s per core scoring 30 s mels, Spark vs a plain loop.

Anchor: a single-process loop over the same Parquet files (pyarrow, a row group at a
time), the same model and the same per-batch function (``deepcuts.stages.infer.score_mel_table``),
one torch thread on one core.  The Spark figure is the stage's scoring job
(``mel_locations`` -> ``predict_vectors``) on local[cores], one torch thread per task,
written to Spark's no-op sink, divided by the cores.  Spark overhead = 1 - spark/loop per
core.  The mels are laid out as ingest writes them (ingest.rows_per_file rows per file,
ingest.rows_per_row_group per row group); the model is FactorCNN with the sizes of
conf/deepcuts.toml [train] (random weights: throughput does not depend on them).

The Spark job has a fixed cost per run (planning, counting the units, scheduling its
stages: about a second or two here) that a nightly run over a catalogue amortises; the
bench reports it, the steady-state rate without it, and the whole job's rate.

    .venv/bin/python bench/infer.py --tracks 8192 --cores 2 [--precision fp32] [--scoring windows]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchutil import peak_rss_mb


def write_synthetic_mels(wh, n_tracks: int, n_mels: int, n_frames: int, rows_per_file: int,
                         rows_per_group: int) -> None:
    """A committed ``mels`` table of random float16 mels (content does not change the cost)."""
    from deepcuts.core.tables import MELS
    rng = np.random.default_rng(0)
    run_id = "ingest-bench"
    folder = wh.local_path(MELS.name, "data", run_id)
    os.makedirs(folder, exist_ok=True)
    for part, first in enumerate(range(0, n_tracks, rows_per_file)):
        path = os.path.join(folder, f"part-{part:05d}.parquet")
        with pq.ParquetWriter(path, MELS.schema, compression="zstd") as writer:
            for start in range(first, min(n_tracks, first + rows_per_file), rows_per_group):
                ids = range(start, min(n_tracks, first + rows_per_file, start + rows_per_group))
                mels = [(rng.standard_normal((n_mels, n_frames), dtype=np.float32) * 10 - 30)
                        .astype(np.float16).tobytes() for _ in ids]
                cols = {"track_id": [f"bench-{i:07d}" for i in ids], "mel": mels,
                        "n_mels": [n_mels] * len(mels), "n_frames": [n_frames] * len(mels),
                        "sample_rate": [22050] * len(mels), "hop_length": [512] * len(mels),
                        "excerpt_offset_s": [0.0] * len(mels), "duration_s": [30.0] * len(mels),
                        "fingerprint": [f"fp-{i}" for i in ids], "source_uri": [f"bench://{i}" for i in ids],
                        "source_size": [0] * len(mels), "source_version": ["1"] * len(mels),
                        "labels": [None] * len(mels), "ingest_run_id": [run_id] * len(mels)}
                writer.write_table(pa.table(cols, schema=MELS.schema), row_group_size=rows_per_group)
    wh.commit(MELS.name, run_id, wh.list_data_files(MELS.name, run_id))


def loop_rate(wh, artifact, cfg) -> tuple[float, int]:
    """Single process, one thread: read each row group with pyarrow, score it; tracks/s."""
    import torch
    from deepcuts.stages.infer import MEL_INPUT_COLUMNS, score_mel_table
    from deepcuts.core.tables import MELS
    torch.set_num_threads(1)
    started, n = time.perf_counter(), 0
    for path in wh.files(MELS.name, local=True):
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=MEL_INPUT_COLUMNS)
            out = score_mel_table(table, artifact, cfg.infer.scoring, cfg.infer.window_seconds,
                                  cfg.infer.batch_size)
            n += int(out["reason"].isna().sum())
    return n / (time.perf_counter() - started), n


def spark_seconds(spark, wh, folder, cfg, only_track: str | None = None) -> float:
    """Wall seconds of the stage's scoring job: locations, units, scoring, no-op sink."""
    from deepcuts.stages.infer import mel_locations, predict_vectors
    started = time.perf_counter()
    locations = mel_locations(spark, wh)
    if only_track is not None:
        locations = locations.where(locations.track_id == only_track)
    predict_vectors(spark, locations, folder, cfg).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracks", type=int, default=8192, help="mels scored (30 s excerpts)")
    p.add_argument("--seconds", type=float, default=30.0, help="excerpt length")
    p.add_argument("--cores", type=int, default=2, help="Spark local[cores]")
    p.add_argument("--scoring", choices=("whole", "windows"), default=None, help="default: conf")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None, help="default: conf")
    args = p.parse_args()

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    root = tempfile.mkdtemp(prefix="deepcuts-bench-infer-")
    try:
        return bench(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)   # the synthetic mels are GBs


def bench(args, root: str) -> int:
    """Build the synthetic catalogue and model under ``root``, time the loop and Spark."""
    import torch
    from deepcuts.core.config import load_config
    from deepcuts.nn.model import FactorCNN, frames_for_seconds, load_artifact, save_artifact
    from deepcuts.core.spark import get_session, warehouse

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
    write_synthetic_mels(wh, args.tracks, n_mels, n_frames, cfg.ingest.rows_per_file,
                         cfg.ingest.rows_per_row_group)
    artifact = load_artifact(folder, precision=cfg.infer.precision)
    print(f"infer bench: {args.tracks} mels of {n_mels}x{n_frames} ({args.seconds:g} s), "
          f"model {params / 1e6:.1f} M params (conv {train['conv_channels']}, dense "
          f"{train['dense_units']}), scoring={cfg.infer.scoring}, precision={cfg.infer.precision} "
          f"({str(artifact.dtype).replace('torch.', '')}), batch {cfg.infer.batch_size}, "
          f"torch {torch.__version__}", flush=True)
    loop_per_core, scored = loop_rate(wh, artifact, cfg)
    assert scored == args.tracks, f"loop scored {scored} of {args.tracks}"
    print(f"  loop (1 process, 1 thread):       {loop_per_core:8.1f} tracks/s per core", flush=True)

    spark = get_session(cfg, "deepcuts-bench-infer", master=f"local[{args.cores}]")
    spark.sparkContext.setLogLevel("ERROR")
    try:
        cold = spark_seconds(spark, wh, folder, cfg)           # fresh Python workers, model load
        warm = spark_seconds(spark, wh, folder, cfg)
        # Per job, whatever the catalogue size: planning, the units count, stage scheduling.
        fixed = min(spark_seconds(spark, wh, folder, cfg, only_track="bench-0000000") for _ in range(2))
    finally:
        spark.stop()
    per_core = {name: args.tracks / seconds / args.cores for name, seconds in
                (("cold", cold), ("warm", warm), ("steady", max(warm - fixed, 1e-9)))}
    overhead = {name: 100 * (1 - rate / loop_per_core) for name, rate in per_core.items()}
    print(f"  spark local[{args.cores}] cold job (worker start, model load): {per_core['cold']:8.1f} "
          f"tracks/s per core ({cold:.1f} s)")
    print(f"  spark local[{args.cores}] warm job:                            {per_core['warm']:8.1f} "
          f"tracks/s per core ({warm:.1f} s)")
    print(f"  spark fixed cost per job (1 track): {fixed:.2f} s;  steady state {per_core['steady']:8.1f} "
          f"tracks/s per core")
    print(f"  spark overhead vs loop: warm job {overhead['warm']:5.1f} %, steady state "
          f"{overhead['steady']:5.1f} %, cold job {overhead['cold']:5.1f} %   (target <= 20 %)")
    print(f"  target >= 100 tracks/s per core: loop {'met' if loop_per_core >= 100 else 'NOT met'}, "
          f"spark warm job {'met' if per_core['warm'] >= 100 else 'NOT met'}")
    print(f"  peak RSS (driver + children reaped): {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
