"""Choose ``infer.blend_prior_strength`` on the sparse-warm validation split; report the test split.

Reads a warehouse where the pipeline has run with the sparse-warm protocol on
(``factors.sparse_warm_fraction`` > 0; ``./run-demo.sh`` leaves one in ./warehouse).  On
``sparse_warm_validation`` (half of the sampled tracks, each keeping 1..5 listeners in the
fit) it scores usage-only, audio-only, the threshold switch and the blend at every prior
strength of ``--grid``; the strength with the best AUC (then mAP) is chosen, and only then
are the four predictors scored on ``sparse_warm`` (the other half: reported, never used to
choose).  Also: whether the blend wins on validation at all (the rule for making it the
default serving path).  Nothing is written.

    .venv/bin/python bench/blend_prior.py [--root ./warehouse] [--grid 0.1,1,10] [--set factors.plays=...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from benchutil import peak_rss_mb


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="warehouse root (default: conf)")
    p.add_argument("--grid", default="0,0.3,1,2,3,5,10,30",
                   help="comma-separated relative prior strengths (x the mean eigenvalue of XᵀX)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, e.g. factors.plays=<the plays the factors run read>")
    args = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from deepcuts.core.config import load_config
    from deepcuts.core.registry import stage
    from deepcuts.core.runs import StageRun
    from deepcuts.core.spark import get_session
    from deepcuts.evaluation import runner as ev
    from deepcuts.stages import evaluate as E

    overrides = dict(o.split("=", 1) for o in args.overrides)
    if args.root:
        overrides["warehouse.root"] = args.root
    cfg = load_config(overrides=overrides)
    grid = [float(g) for g in args.grid.split(",") if g.strip()]
    spark = get_session(cfg, "deepcuts-bench-blend-prior")
    spark.sparkContext.setLogLevel("ERROR")
    ctx = StageRun(spark, cfg, stage("evaluate"), "bench-blend-prior")    # reads only
    cnn = E.resolve_cnn(ctx)
    scratch = ctx.path("_scratch", "bench-blend-prior")
    k = cfg.factors.eval_k

    def score(pop, predictor, strength=None):
        users, tracks, model_id = E.sparse_vectors(ctx, predictor, pop, cnn, strength)
        started = time.time()
        r = ev.evaluate_predictor(pop, users, tracks, predictor=predictor, k=k, scratch=scratch, model_id=model_id)
        label = predictor if strength is None else f"{predictor} s={strength:g}"
        print(f"  {pop.split:23s} {label:18s} mAP@{k} {r['map_at_k']:.4f}  AUC {r['auc']:.4f}  "
              f"({r['n_candidates']} tracks, {r['n_users']} users, {time.time() - started:.1f} s)", flush=True)
        return r

    print(f"model {cnn[0] if cnn else None}, warehouse {ctx.lake.root}")
    try:
        val = E.split_population(ctx, ev.SPARSE_WARM_VALIDATION)
        try:
            fixed = {p: score(val, p) for p in ("usage", "audio", "threshold")}
            blends = {s: score(val, "blend", s) for s in grid}
        finally:
            val.release()
        best = max(blends, key=lambda s: (blends[s]["auc"], blends[s]["map_at_k"]))
        rival = max(fixed, key=lambda p: fixed[p]["auc"])
        wins = blends[best]["auc"] >= fixed[rival]["auc"]
        print(f"  validation picks blend_prior_strength = {best:g} (AUC {blends[best]['auc']:.4f}); best other: "
              f"{rival} {fixed[rival]['auc']:.4f}: the blend {'wins' if wins else 'does NOT win'}")
        test = E.split_population(ctx, ev.SPARSE_WARM)
        try:
            results = [score(test, p) for p in ("usage", "audio", "threshold")] + [score(test, "blend", best)]
        finally:
            test.release()
        print(ev.format_results_table(results))
    finally:
        spark.stop()
    print(f"  peak RSS (driver + children reaped): {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
