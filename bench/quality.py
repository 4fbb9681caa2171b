"""Cold-start quality on real music (issue 13): random / MFCC baseline / CNN / upper bound on the
game-music catalogue, over several cold hold-outs.

The catalogue is the soundtracks of Debian game packages with simulated listeners whose taste
follows the game (``bench/fixtures/game_music.py``, run here when its files are missing).  One
command ingests it once, then for each hold-out seed (``factors.eval_seed``: which tracks are
cold, ``factors.cold_fraction`` of them) runs factors -> train -> baseline -> infer -> evaluate,
each ``--variant`` of the CNN on the same seeds and folds, and prints per predictor:

* cold-start AUC and mAP@k (``evaluation_results``, split ``cold``), mean +- sd over seeds;
* the share of the AUC gap closed, (AUC - random) / (upper bound - random), per seed;
* label precision@k of the predictor's track vectors (label = the game), cosine neighbours of
  each cold track among the cold tracks, beside chance; and the same with the whole catalogue
  as the neighbour pool (cold queries), which still means something when few tracks are cold.

The validation split (the CNN's validation tracks, where the pipeline chooses its defaults) is
printed too, below the cold table.  Then wall time per stage and peak memory.

    .venv/bin/python bench/quality.py [--seeds 3] [--root DIR] [--set section.key=value ...]
        [--variant NAME="section.key=value;section.key=value" ...] [--small | --large | --packages a,b]
        [--listeners 5000]
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
from pathlib import Path

import numpy as np

from benchutil import SparkMemory, peak_rss_mb
from fixtures import game_music

PER_SEED_STAGES = ("factors",)
PER_VARIANT_STAGES = ("train", "baseline", "infer", "evaluate")
PREDICTORS = ("random", "baseline", "cnn", "metadata", "upper_bound")
PREDICTOR_NAMES = {"random": "random", "baseline": "MFCC baseline", "cnn": "CNN", "upper_bound": "upper bound",
                   "metadata": "CNN + metadata prior"}
# A variant compares CNNs on the same catalogue, plays and folds: keys that would change those are refused.
FOLD_SECTIONS = ("ingest.", "factors.", "evaluate.", "warehouse.")


def parse_pairs(pairs, where: str) -> dict[str, str]:
    """``section.key=value`` pairs as the jobs' ``--set`` reads them (``deepcuts.core.cli.overrides``)."""
    from deepcuts.core.cli import overrides
    from deepcuts.core.config import ConfigError
    try:
        out = overrides(pairs)
    except ConfigError as e:   # its message names --set already
        raise SystemExit(str(e) if where == "--set" else f"{where} {e}")
    undotted = [k for k in out if "." not in k]
    if undotted:
        raise SystemExit(f"{where} {undotted}: expected section.key=value")
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--variant {text!r}: expected NAME=section.key=value[;section.key=value ...]")
    overrides = parse_pairs([p for p in rest.split(";") if p.strip()], f"--variant {name}:")
    folds = [k for k in overrides if k.startswith(FOLD_SECTIONS)]
    if folds:
        raise SystemExit(f"--variant {name}: {folds} would change the catalogue, plays or folds; "
                         "variants may only change the model (use --set for every stage)")
    return name.strip(), overrides


def seeds_of(text: str, base: int) -> list[int]:
    """``3`` -> three seeds from the configured eval_seed on; ``1,7,9`` -> those."""
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return [base + i for i in range(int(text))]


def mean_sd(values) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def _num(value) -> float | None:
    """A plain float for results.json (NaN and None stay None)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# ---------------------------------------------------------------- label precision
def unit_rows(vectors: dict[str, np.ndarray], ids: list[str]) -> np.ndarray:
    m = np.stack([np.asarray(vectors[t], dtype=np.float64) for t in ids])
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def label_precision(vectors: dict[str, np.ndarray], queries: list[str], pool: list[str],
                    game_of: dict[str, str], k: int) -> tuple[float | None, float | None, int]:
    """(precision@k, chance, k used) of cosine neighbours of ``queries`` in ``pool`` (the query
    excluded), label = the game (deepcuts.evaluation.labels)."""
    from deepcuts.evaluation.labels import label_precision_at_k, precision_chance
    queries = [q for q in queries if q in vectors]
    pool = [t for t in pool if t in vectors]
    k = min(k, len(pool) - 1)
    if not queries or k < 1:
        return None, None, k
    q, p = unit_rows(vectors, queries), unit_rows(vectors, pool)
    scores = q @ p.T
    neighbours = {}
    for i, query in enumerate(queries):
        order = [pool[j] for j in np.argsort(-scores[i], kind="stable") if pool[j] != query]
        neighbours[query] = order[:k]
    labels = {t: (game_of[t],) for t in set(queries) | set(pool)}
    _, (precision, _) = label_precision_at_k(neighbours, labels, k)
    counts = {}
    for t in pool:
        counts[game_of[t]] = counts.get(game_of[t], 0) + 1
    # every query is in its pool (the cold tracks, or the catalogue): chance is (n_L - 1) / (N - 1)
    chances = [precision_chance(counts[game_of[x]], len(pool)) for x in queries]
    return precision, float(np.mean(chances)), k


def read_vectors(lake, spark, predictor: str, model_id: str | None, eval_seed: int, track_ids: list[str]):
    """{track_id: vector} of ``predictor`` as the evaluate stage scored it."""
    import pandas as pd
    from deepcuts.core.lake import read_pandas
    if predictor == "random":
        from deepcuts.evaluation.runner import random_track_vectors
        rank = len(read_pandas(lake, "user_factors", columns=["factors"])["factors"].iloc[0])
        frame = spark.createDataFrame([(t,) for t in track_ids], "track_id string")
        rows = random_track_vectors(frame, rank, eval_seed).toPandas()
        return dict(zip(rows["track_id"], rows["factors"]))
    if predictor == "baseline":
        rows = read_pandas(lake, "baseline_factors", columns=["track_id", "factors", "run_id"])
        rows = rows[rows["run_id"] == model_id] if model_id else rows
    elif predictor in ("cnn", "metadata"):
        rows = read_pandas(lake, "predicted_factors", columns=["track_id", "factors", "model_id"])
        rows = rows[rows["model_id"] == model_id]
        if predictor == "metadata":   # the served prior where a cold track has one (cosine: scale-free)
            served = read_pandas(lake, "serving_factors", columns=["track_id", "factors", "source"])
            served = served[served["source"] == "metadata"]
            rows = pd.concat([rows[~rows["track_id"].isin(served["track_id"])], served])
    elif predictor == "upper_bound":
        rows = read_pandas(lake, "upper_bound_factors", columns=["entity", "entity_id", "factors", "run_id"])
        rows = rows[(rows["entity"] == "track") & ((rows["run_id"] == model_id) if model_id else True)] \
            .rename(columns={"entity_id": "track_id"})
    else:
        raise ValueError(predictor)
    return dict(zip(rows["track_id"], rows["factors"]))


# ---------------------------------------------------------------- the run
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="3", help="N hold-out seeds from factors.eval_seed on, or a list: 1,2,3")
    p.add_argument("--root", default=None, help="bench folder (warehouses); default: a new temp folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override passed to every stage (repeatable)")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="K=V;K=V"',
                   help="a CNN variant run on the same seeds and folds (repeatable; 'default' always runs)")
    p.add_argument("--cold-fraction", type=float, default=0.2, help="factors.cold_fraction")
    p.add_argument("--label-k", type=int, default=10, help="label precision@k")
    p.add_argument("--splits", default="cold,validation", help="evaluate.splits (cold is the table)")
    game_music.add_package_arguments(p)
    p.add_argument("--listeners", type=int, default=game_music.DEFAULT_LISTENERS)
    p.add_argument("--cache", default=None, help="the game-music cache (default ~/.cache/deepcuts/game-music)")
    p.add_argument("--keep", action="store_true", help="keep the temp bench folder")
    p.add_argument("--report", metavar="RESULTS_JSON", help="only print the tables of an earlier run's results.json")
    args = p.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        import pandas as pd
        report(saved["results"], saved["labels"], [tuple(v) for v in saved["variants"]], saved["seeds"],
               pd.DataFrame(saved["tracks"]), saved["ingest"], pd.DataFrame(saved["rejects"]), args)
        return 0
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    started = time.time()

    games = game_music.packages_of(args)
    cache = Path(args.cache or game_music.default_cache()).expanduser().resolve()
    paths = game_music.Paths(cache, game_music.set_name(games), args.listeners, game_music.LISTENER_SEED)
    if not paths.complete():
        paths = game_music.build(games, cache, args.listeners)
    import pandas as pd
    tracks = pd.read_csv(paths.tracks)
    game_of = dict(zip(tracks["track_id"], tracks["game"]))

    common = parse_pairs(args.overrides, "--set")
    if "factors.eval_seed" in common:
        raise SystemExit("--set factors.eval_seed: the bench sets it per seed (use --seeds)")
    variants = [("default", {})] + [parse_variant(v) for v in args.variant]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("--variant names must be distinct (and not 'default')")

    from deepcuts.core.cli import run_stage
    from deepcuts.core.config import load_config
    from deepcuts.core.lake import Lake, read_pandas
    from deepcuts.core.spark import get_session

    temp = args.root is None
    root = Path(args.root or tempfile.mkdtemp(prefix="deepcuts-quality-")).resolve()
    base = {"ingest.source": str(paths.manifest), "factors.plays": str(paths.plays),
            "factors.cold_fraction": args.cold_fraction, "spark.checkpoint_dir": "",
            "evaluate.splits": [s.strip() for s in args.splits.split(",") if s.strip()], **common}

    def config(warehouse: Path, **extra):
        return load_config(overrides={**base, "warehouse.root": str(warehouse), **extra})

    seeds = seeds_of(args.seeds, load_config(overrides=base).factors.eval_seed)
    print(f"catalogue {paths.manifest} ({len(tracks)} tracks, {tracks['seconds'].sum() / 60:.1f} min, "
          f"{args.listeners} listeners); seeds {seeds}; variants {[n for n, _ in variants]}; bench folder {root}",
          flush=True)
    ingest_wh = root / "ingest"
    shutil.rmtree(ingest_wh, ignore_errors=True)
    cfg0 = config(ingest_wh)
    spark = get_session(cfg0, "deepcuts-bench-quality")
    spark.sparkContext.setLogLevel("ERROR")
    jvm_pid = spark.sparkContext._gateway.proc.pid
    timings: dict[str, float] = {}

    def stage(cfg, name):
        t0 = time.time()
        summary = run_stage(spark, cfg, name)
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        return summary

    results: list[dict] = []       # one row per (seed, variant, split, predictor)
    labels: list[dict] = []        # one row per (seed, variant, predictor, pool)
    with SparkMemory(jvm_pid) as memory:
        ingest = stage(cfg0, "ingest")
        lake0 = Lake(str(ingest_wh))
        mel_ids = set(read_pandas(lake0, "mels", columns=["track_id"])["track_id"])
        rejects = read_pandas(lake0, "ingest_rejects") if lake0.exists("ingest_rejects") else pd.DataFrame()
        for seed in seeds:
            seed_dir = root / f"seed-{seed}"
            shutil.rmtree(seed_dir, ignore_errors=True)
            shutil.copytree(ingest_wh, seed_dir / "factors")
            stage(config(seed_dir / "factors", **{"factors.eval_seed": seed}), "factors")
            for name, overrides in variants:
                warehouse = seed_dir / name
                shutil.copytree(seed_dir / "factors", warehouse)
                cfg = config(warehouse, **{"factors.eval_seed": seed, **overrides})
                summaries = {s: stage(cfg, s) for s in PER_VARIANT_STAGES}
                lake = Lake(str(warehouse))
                rows = read_pandas(lake, "evaluation_results")
                rows = rows[(rows["run_id"] == summaries["evaluate"]["run_id"]) & rows["metric"].isna()]
                for _, r in rows.iterrows():
                    results.append({"seed": seed, "variant": name, "split": r["split"], "predictor": r["predictor"],
                                    "auc": _num(r["auc"]), "map": _num(r["map_at_k"]), "k": int(r["k"]),
                                    "users": int(r["n_users"]), "candidates": int(r["n_candidates"]),
                                    "model_id": None if pd.isna(r["model_id"]) else str(r["model_id"])})
                holdout = read_pandas(lake, "eval_holdout", columns=["track_id", "split"])
                cold = sorted(set(holdout.loc[holdout["split"] == "cold", "track_id"]) & mel_ids)
                catalogue = sorted(mel_ids)
                cold_rows = rows[rows["split"] == "cold"].set_index("predictor")
                for predictor in PREDICTORS:
                    if predictor not in cold_rows.index:
                        continue
                    vectors = read_vectors(lake, spark, predictor, cold_rows.loc[predictor, "model_id"], seed,
                                           catalogue)
                    for pool_name, pool in (("cold", cold), ("catalogue", catalogue)):
                        precision, chance, k = label_precision(vectors, cold, pool, game_of, args.label_k)
                        labels.append({"seed": seed, "variant": name, "predictor": predictor, "pool": pool_name,
                                       "precision": _num(precision), "chance": _num(chance), "k": int(k),
                                       "queries": len(cold)})
                cnn = cold_rows.loc["cnn"] if "cnn" in cold_rows.index else None
                prior = summaries["infer"].get("serving_metadata_prior", {}).get("levels") or {}
                print(f"seed {seed} {name}: {len(cold)} cold tracks, CNN cold AUC "
                      f"{cnn['auc'] if cnn is not None else float('nan'):.4f}; metadata prior served to "
                      f"{summaries['infer'].get('serving_by_source', {}).get('metadata', 0)} tracks, weights "
                      + ", ".join(f"{lv} {f.get('weight')} ({f.get('validation_tracks')} validation tracks)"
                                  for lv, f in prior.items()), flush=True)
                # after every variant, so a later failure keeps what was measured (--report re-prints it)
                (root / "results.json").write_text(json.dumps({
                    "results": results, "labels": labels, "variants": variants, "seeds": seeds,
                    "tracks": tracks.to_dict("records"), "ingest": {"ingested": ingest.get("ingested")},
                    "rejects": rejects.drop(columns=[c for c in rejects.columns if c not in
                                                     ("track_id", "reason", "detail")]).to_dict("records"),
                    "label_k": args.label_k}, default=str, indent=1))
    spark.stop()

    report(results, labels, variants, seeds, tracks, ingest, rejects, args)
    wall = time.time() - started
    print("\nstage seconds (all seeds and variants): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"wall {wall / 60:.1f} min; peak memory: JVM {memory.jvm_mb / 1024:.2f} GB, largest Python worker "
          f"{memory.worker_mb / 1024:.2f} GB (workers together {memory.workers_total_mb / 1024:.2f} GB), "
          f"driver {memory.driver_mb / 1024:.2f} GB; peak RSS (driver + children reaped) {peak_rss_mb():.0f} MB")
    if temp and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"warehouses and results.json kept under {root}")
    return 0


def report(results, labels, variants, seeds, tracks, ingest, rejects, args) -> None:
    import pandas as pd
    res = pd.DataFrame(results)
    lab = pd.DataFrame(labels)
    per_game = tracks.groupby("game").agg(tracks=("track_id", "count"), minutes=("seconds", lambda s: s.sum() / 60))
    print("\ncatalogue: " + ", ".join(f"{g} {int(r.tracks)} ({r.minutes:.1f} min)" for g, r in per_game.iterrows())
          + f"; {len(tracks)} tracks, {tracks['seconds'].sum() / 60:.1f} min")
    print(f"ingest: {ingest.get('ingested', ingest.get('mels', '?'))} ingested; rejected: "
          + ("none" if rejects.empty else "; ".join(f"{r.track_id} ({r.reason}: {r.detail})"
                                                    for r in rejects.itertuples())))

    def rows_of(split):
        """(label, variant, predictor) in table order: the shared predictors once, a CNN row per variant."""
        out = [(PREDICTOR_NAMES["random"], "default", "random"), (PREDICTOR_NAMES["baseline"], "default", "baseline")]
        out += [("CNN" if n == "default" else f"CNN [{n}]", n, "cnn") for n, _ in variants]
        out.append((PREDICTOR_NAMES["metadata"], "default", "metadata"))
        out.append((PREDICTOR_NAMES["upper_bound"], "default", "upper_bound"))
        return out

    for split in dict.fromkeys(res["split"]) if not res.empty else ():
        s = res[res["split"] == split]
        k = int(s["k"].iloc[0])
        random_auc = s[s["predictor"] == "random"].set_index(["seed", "variant"])["auc"]
        upper_auc = s[s["predictor"] == "upper_bound"].set_index(["seed", "variant"])["auc"]
        per_seed = s.groupby("seed").agg(users=("users", "max"), candidates=("candidates", "max"))
        print(f"\nsplit {split} ({'the test split' if split == 'cold' else 'where defaults are chosen'}): "
              f"{s['seed'].nunique()} of {len(seeds)} seeds, candidates per seed {list(per_seed['candidates'])}, users {list(per_seed['users'])}"
              f"; mean ± sd over seeds")
        header = f"{'predictor':22s} {'AUC':>17s} {f'mAP@{k}':>17s} {'AUC gap closed':>17s}"
        if split == "cold":
            header += f" {f'P@{args.label_k} cold pool':>17s} {'chance':>7s} {f'P@{args.label_k} catalogue':>17s} {'chance':>7s}"
        print(header)
        for label, variant, predictor in rows_of(split):
            r = s[(s["variant"] == variant) & (s["predictor"] == predictor)]
            if r.empty:
                continue
            gaps = [(row.auc - random_auc[(row.seed, variant)]) / (upper_auc[(row.seed, variant)] - random_auc[(row.seed, variant)])
                    for row in r.itertuples()]
            line = f"{label:22s} {mean_sd(r['auc']):>17s} {mean_sd(r['map']):>17s} {mean_sd(gaps):>17s}"
            if split == "cold":
                for pool in ("cold", "catalogue"):
                    lp = lab[(lab["variant"] == variant) & (lab["predictor"] == predictor) & (lab["pool"] == pool)]
                    line += f" {mean_sd(lp['precision']):>17s} {np.mean(lp['chance']):7.3f}"
            print(line)
        if split == "cold" and not lab.empty:
            pools = lab[(lab["pool"] == "cold") & (lab["variant"] == "default") & (lab["predictor"] == "random")]
            sizes, ks = list(pools["queries"]), list(pools["k"])
            if any(k >= n - 2 for k, n in zip(ks, sizes)):
                # with k = N - 1 every list is the whole pool: precision is chance whatever the vectors
                print(f"  cold pool: {sizes} cold tracks per seed, k used {ks}: a list of N - 1 or N - 2 of them is "
                      "(nearly) the whole pool, so that column is chance by construction; read the catalogue pool")
        shared = s[s["predictor"].isin(["random", "baseline", "upper_bound"])].groupby(["seed", "predictor"])["auc"]
        spread = (shared.max() - shared.min()).max()
        if len(variants) > 1 and spread > 1e-9:
            print(f"  note: random / baseline / upper bound differ across variants by up to {spread:.2e} AUC "
                  "(a variant changed the baseline's inputs); the table shows the default variant's")


if __name__ == "__main__":
    sys.exit(main())
