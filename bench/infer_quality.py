"""What the inference settings cost in quality: validation and cold-start metrics of each scoring x precision.

Reads a warehouse where the pipeline has run (``./run-demo.sh`` leaves one in ./warehouse),
scores every mel with the latest model (or ``--model``) under each ``infer.scoring`` and
``infer.precision``, and prints mAP@k / AUC of each on the evaluate stage's two splits,
separately: *validation* (the CNN's validation tracks: the split that picks the
``infer.scoring`` default, rule: higher AUC, then mAP) and *cold* (the test tracks: reported,
never used to choose).  Then how far bfloat16 vectors are from float32 ones: cosine,
relative error, top-10 neighbour overlap.  Nothing is written.

    .venv/bin/python bench/infer_quality.py [--root ./warehouse] [--model ID] [--set factors.plays=...]
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, e.g. factors.plays=<the plays the factors run read> (validation)")
    args = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import functions as F
    from deepcuts.core.config import load_config
    from deepcuts.core.registry import STAGES
    from deepcuts.core.runs import StageRun
    from deepcuts.core.spark import get_session
    from deepcuts.core.tables import USER_FACTORS
    from deepcuts.evaluation.runner import evaluate_predictor
    from deepcuts.stages import evaluate as E
    from deepcuts.stages.infer import mel_locations, predict_vectors, resolve_model

    overrides = {"infer.model": args.model, **dict(o.split("=", 1) for o in args.overrides)}
    if args.root:
        overrides["warehouse.root"] = args.root
    cfg = load_config(overrides=overrides)
    spark = get_session(cfg, "deepcuts-bench-infer-quality")
    spark.sparkContext.setLogLevel("ERROR")
    ctx = StageRun(spark, cfg, STAGES["evaluate"], "bench-infer-quality")    # reads only
    model_id, folder = resolve_model(cfg, ctx.lake)
    users = ctx.read(USER_FACTORS).select("user_id", "factors")
    # the evaluate stage's populations: validation chooses, the cold test split is only reported
    populations = {split: E.split_population(ctx, split) for split in ("validation", "cold")}
    vectors: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    table: dict[tuple[str, str, str], dict] = {}
    print(f"model {model_id}, warehouse {ctx.lake.root}")
    scratch = ctx.path("_scratch", "bench-infer-quality")
    try:
        for precision in ("fp32", "auto"):
            for scoring in ("whole", "windows"):
                run_cfg = cfg.replace(**{"infer.precision": precision, "infer.scoring": scoring})
                scored = predict_vectors(spark, mel_locations(ctx), folder, run_cfg) \
                    .where(F.col("reason").isNull()).select("track_id", "factors").toPandas()
                vectors[(precision, scoring)] = dict(zip(scored["track_id"], map(np.asarray, scored["factors"])))
                frame = spark.createDataFrame(scored, "track_id string, factors array<float>")
                for split, pop in populations.items():
                    r = evaluate_predictor(pop, users, frame, predictor="cnn", k=cfg.factors.eval_k,
                                           scratch=scratch, model_id=model_id)
                    table[(split, precision, scoring)] = r
                    print(f"  {split:10s} {precision:5s} {scoring:8s} mAP@{r['k']} {r['map_at_k']:.4f}  "
                          f"AUC {r['auc']:.4f}  ({r['n_candidates']} tracks, {r['n_users']} users)", flush=True)
    finally:
        for pop in populations.values():
            pop.release()
        spark.stop()
    for precision in ("fp32", "auto"):
        val = {s: table[("validation", precision, s)] for s in ("whole", "windows")}
        pick = max(val, key=lambda s: (val[s]["auc"], val[s]["map_at_k"]))
        test = table[("cold", precision, pick)]
        print(f"  {precision}: validation picks infer.scoring = {pick!r} (AUC {val[pick]['auc']:.4f} vs "
              f"{val['windows' if pick == 'whole' else 'whole']['auc']:.4f}); its cold-start test score, "
              f"reported only: mAP {test['map_at_k']:.4f} AUC {test['auc']:.4f}")
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
