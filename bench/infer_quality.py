"""What the inference settings cost in quality: cold-start metrics of each scoring x precision.

Reads a warehouse where the pipeline has run (``./run-demo.sh`` leaves one in ./warehouse),
scores every mel with the latest model (or ``--model``) under each ``infer.scoring`` and
``infer.precision``, and prints the factors stage's cold-start mAP@k / AUC of each (the
protocol that picks the ``infer.scoring`` default), then how far bfloat16 vectors are from
float32 ones: cosine, relative error, top-10 neighbour overlap.  Nothing is written.

    .venv/bin/python bench/infer_quality.py [--root ./warehouse] [--model ID]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchutil import peak_rss_mb


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each track's top-k cosine neighbours that two sets of vectors agree on."""
    def top(v):
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        return np.argsort(-(unit @ unit.T), axis=1)[:, 1:k + 1]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top(a), top(b))]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="warehouse root (default: conf)")
    p.add_argument("--model", default="", help="model id (default: the latest)")
    args = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import functions as F
    from deepcuts.core.config import load_config
    from deepcuts.evaluation.metrics import evaluate_cold_start
    from deepcuts.stages.infer import mel_locations, predict_vectors, resolve_model
    from deepcuts.core.spark import get_session, read_table, warehouse
    from deepcuts.core.tables import EVAL_HOLDOUT, USER_FACTORS

    overrides = {"infer.model": args.model}
    if args.root:
        overrides["warehouse.root"] = args.root
    cfg = load_config(overrides=overrides)
    wh = warehouse(cfg)
    model_id, folder = resolve_model(cfg, wh)
    spark = get_session(cfg, "deepcuts-bench-infer-quality")
    spark.sparkContext.setLogLevel("ERROR")
    holdout = read_table(spark, wh, EVAL_HOLDOUT).where(F.col("split") == "cold")
    users = read_table(spark, wh, USER_FACTORS).select("user_id", "factors")
    vectors: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    print(f"model {model_id}, warehouse {wh.root}")
    try:
        for precision in ("fp32", "auto"):
            for scoring in ("whole", "windows"):
                run_cfg = cfg.replace(**{"infer.precision": precision, "infer.scoring": scoring})
                scored = predict_vectors(spark, mel_locations(spark, wh), folder, run_cfg) \
                    .where(F.col("reason").isNull()).select("track_id", "factors").toPandas()
                vectors[(precision, scoring)] = dict(zip(scored["track_id"], map(np.asarray, scored["factors"])))
                cold = evaluate_cold_start(spark, users, holdout, spark.createDataFrame(scored),
                                           cfg.factors.eval_k, "cnn")
                print(f"  {precision:5s} {scoring:8s} cold-start mAP@{cold['k']} {cold['map_at_k']:.4f}  "
                      f"AUC {cold['auc']:.4f}  ({cold['n_tracks']} tracks, {cold['n_users']} users)",
                      flush=True)
    finally:
        spark.stop()
    for scoring in ("whole", "windows"):
        full, reduced = vectors[("fp32", scoring)], vectors[("auto", scoring)]
        ids = sorted(full)
        a, b = np.stack([full[t] for t in ids]), np.stack([reduced[t] for t in ids])
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        relative = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
        print(f"  auto vs fp32, {scoring}: {len(ids)} tracks, cosine min {cosine.min():.5f}, relative "
              f"error median {np.median(relative):.4f} max {relative.max():.4f}, top-10 neighbour "
              f"overlap {neighbour_overlap(a, b):.3f}")
    print(f"  peak RSS (driver + children reaped): {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
