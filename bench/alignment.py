"""One latent space across ALS refits: what Procrustes alignment buys on the demo (issue 14).

Night 1 runs ingest -> factors -> train -> infer -> evaluate.  Night 2 refits ALS on the
plays with a share of rows dropped (``--drop``) and another ALS seed, as a real night's
refit would differ, then scores the cold-start tracks three ways on the same users and
candidates:

* **last night's model, aligned** — tonight's fit rotated onto last night's (the default,
  ``factors.align = true``); the model is not retrained;
* **last night's model, not aligned** — the bug this fixes: the model's vectors against
  tonight's unrotated user factors (the evaluate stage does not refuse, infer now would);
* **retrained tonight** — the anchor: a model trained on tonight's aligned factors.

It prints mAP@500 / AUC of each on the cold and validation splits, the alignment's
residual before and after the rotation, and peak memory.

    .venv/bin/python bench/alignment.py [--root /tmp/deepcuts-bench-alignment] [--small] [--drop 0.05]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from benchutil import peak_rss_mb

HERE = Path(__file__).resolve().parent.parent
SMALL = {"demo.n_tracks": 96, "demo.n_users": 600, "demo.n_styles": 4, "demo.min_seconds": 6.0,
         "demo.max_seconds": 9.0, "demo.mean_plays_per_user": 40.0, "ingest.excerpt_seconds": 8.0,
         "train.conv_channels": [24, 24, 24], "train.dense_units": 48, "train.epochs": 8,
         "factors.rank": 16}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/deepcuts-bench-alignment")
    p.add_argument("--small", action="store_true", help="the 96-track demo (minutes, noisier)")
    p.add_argument("--drop", type=float, default=0.05, help="share of play rows missing from night 2")
    args = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    import pandas as pd
    from deepcuts.core.cli import run_stage
    from deepcuts.core.config import load_config
    from deepcuts.core.lake import Lake, read_pandas
    from deepcuts.core.spark import get_session
    from deepcuts.demo.generate import demo_data_present, generate

    root = Path(args.root)
    shutil.rmtree(root / "night1", ignore_errors=True)
    demo_dir = root / "demo-small" if args.small else HERE / "demo-data"
    base = {**(SMALL if args.small else {}), "demo.out_dir": str(demo_dir),
            "ingest.source": str(demo_dir / "catalogue" / "manifest.csv"),
            "factors.plays": str(demo_dir / "plays.parquet"),
            "evaluate.predictors": ["random", "cnn", "upper_bound"]}

    def config(night: str, **extra):
        return load_config(overrides={**base, "warehouse.root": str(root / night / "warehouse"),
                                      "spark.checkpoint_dir": str(root / night / "checkpoints"), **extra})

    cfg1 = config("night1")
    if not demo_data_present(cfg1):
        print(f"rendering the demo catalogue into {demo_dir} ...", flush=True)
        generate(cfg1.demo)
    spark = get_session(cfg1, "deepcuts-bench-alignment")
    spark.sparkContext.setLogLevel("ERROR")
    timings: dict[str, float] = {}

    def stage(cfg, name):
        started = time.time()
        summary = run_stage(spark, cfg, name)
        timings[f"{name}"] = timings.get(name, 0.0) + time.time() - started
        return summary

    def scores(cfg, evaluate_summary) -> dict:
        rows = read_pandas(Lake(cfg.warehouse.root), "evaluation_results")
        rows = rows[(rows["run_id"] == evaluate_summary["run_id"]) & (rows["predictor"] == "cnn")]
        return {r["split"]: (r["map_at_k"], r["auc"]) for _, r in rows.iterrows()}

    night1 = {name: stage(cfg1, name) for name in ("ingest", "factors", "train", "infer", "evaluate")}
    night1 = scores(cfg1, night1["evaluate"])

    plays = pd.read_parquet(demo_dir / "plays.parquet")
    tonight = plays.sample(frac=1 - args.drop, random_state=11)
    plays2 = root / "plays-night2.parquet"
    tonight.to_parquet(plays2, index=False)
    for night in ("aligned", "unaligned"):
        shutil.rmtree(root / night, ignore_errors=True)
        shutil.copytree(root / "night1", root / night)
    refit = {"factors.plays": str(plays2), "factors.seed": 4242}
    results = {"night 1 model, night 1 factors": night1}

    cfg_b = config("unaligned", **refit, **{"factors.align": False})
    stage(cfg_b, "factors")
    results["night 1 model, night 2 factors NOT aligned"] = scores(cfg_b, stage(cfg_b, "evaluate"))

    cfg_a = config("aligned", **refit)
    fit = stage(cfg_a, "factors")
    alignment = fit["alignment"]
    stage(cfg_a, "infer")
    results["night 1 model, night 2 factors aligned"] = scores(cfg_a, stage(cfg_a, "evaluate"))
    train = stage(cfg_a, "train")
    stage(cfg_a, "infer")
    results["retrained on night 2 (anchor)"] = scores(cfg_a, stage(cfg_a, "evaluate"))
    spark.stop()

    print(f"\nnight 2: {len(tonight):,} of {len(plays):,} play rows ({100 * args.drop:g} % dropped), ALS seed 4242")
    print(f"alignment: {alignment['shared_tracks']} shared tracks, relative residual before rotation "
          f"{alignment['unaligned_residual']:.4f}, after {alignment['residual']:.4f}")
    print(f"retrained model: {train.get('promotion', {}).get('decision')} "
          f"({train.get('promotion', {}).get('reason')})")
    anchor = results["retrained on night 2 (anchor)"]
    print(f"{'':46s} {'cold mAP@500':>12s} {'cold AUC':>9s} {'val mAP':>8s} {'val AUC':>8s} {'cold AUC / anchor':>18s}")
    for name, r in results.items():
        cold, val = r.get("cold", (float("nan"),) * 2), r.get("validation", (float("nan"),) * 2)
        print(f"{name:46s} {cold[0]:12.4f} {cold[1]:9.4f} {val[0]:8.4f} {val[1]:8.4f} "
              f"{cold[1] / anchor['cold'][1]:18.3f}")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"peak RSS (driver + children reaped): {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
