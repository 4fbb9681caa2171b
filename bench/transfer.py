"""Transfer from a pretrained music network (issue 13, step 3a), measured outside the pipeline on
the quality bench's folds: musicnn's MSD_vgg features + ridge into the ALS space, beside the
pipeline's own model and MFCC baseline, and their ensembles.

Reads a ``bench/quality.py`` folder (``--root``: its ``ingest`` warehouse and one
``seed-<s>/default`` warehouse per hold-out seed).  Per track, MSD_vgg (``deepcuts.nn.pretrained``,
what ``train.transfer = "musicnn"`` uses: the weights bootstrap converted from the musicnn wheel's
checkpoint, its input interpolated from the stored mel, so nothing is decoded again) gives
1,970 pooled features; a ridge regression onto the
training tracks' unit ALS factors (penalty chosen on the seed's validation tracks, the CNN's)
predicts every track.  Each predictor is scored with one numpy AUC (per user, mean over users)
on the seed's cold split (the test split: report only) and validation split (where a default
would be chosen); on the pipeline's own vectors it reproduces ``evaluation_results`` (checked
and printed).  Every predictor is unit-normalised (ensembles add the unit vectors), so its "model" row can
differ from evaluate's, which scores the raw vectors.  Nothing is written.

    .venv/bin/python bench/transfer.py --root BENCH_FOLDER
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchutil import peak_rss_mb
from fixtures import game_music

PENALTIES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)       # x the feature count


def user_auc(candidates: list[str], vectors: dict, users: dict, positives) -> float:
    """Mean over users (with a positive and a negative among ``candidates``) of the AUC of
    x_u . v_t, ties at mid-rank: the evaluate stage's measure."""
    import pandas as pd
    matrix = np.stack([np.asarray(vectors[t], np.float64) for t in candidates])
    index = {t: i for i, t in enumerate(candidates)}
    aucs = []
    for user, tracks in positives.groupby("user_id")["track_id"]:
        if user not in users:
            continue
        pos = np.zeros(len(candidates), bool)
        pos[[index[t] for t in tracks if t in index]] = True
        n1, n0 = int(pos.sum()), int((~pos).sum())
        if not n1 or not n0:
            continue
        ranks = pd.Series(matrix @ users[user]).rank().to_numpy()
        aucs.append((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    return float(np.mean(aucs))


def ridge(features: dict, train: list[str], validation: list[str], targets: dict) -> tuple[dict, float, float]:
    """(prediction per track, penalty, validation MSE): standardised features, closed form."""
    x = np.stack([features[t] for t in train])
    y = np.stack([targets[t] for t in train])
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs, offset = (x - mean) / std, y.mean(0)
    xv = (np.stack([features[t] for t in validation]) - mean) / std
    yv = np.stack([targets[t] for t in validation])
    gram, cross = xs.T @ xs, xs.T @ (y - offset)
    best = None
    for penalty in PENALTIES:
        w = np.linalg.solve(gram + penalty * x.shape[1] * np.eye(x.shape[1]), cross)
        mse = float(((xv @ w + offset - yv) ** 2).mean())
        if best is None or mse < best[1]:
            best = (w, mse, penalty)
    w, mse, penalty = best
    ids = list(features)
    pred = (np.stack([features[t] for t in ids]) - mean) / std @ w + offset
    return dict(zip(ids, pred)), penalty, mse


def unit(vectors: dict) -> dict:
    return {t: np.asarray(v, np.float64) / (np.linalg.norm(v) + 1e-12) for t, v in vectors.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="a bench/quality.py folder")
    default_plays = game_music.Paths(game_music.default_cache(), game_music.set_name(game_music.DEFAULT_PACKAGES),
                                     game_music.DEFAULT_LISTENERS, game_music.LISTENER_SEED).plays
    p.add_argument("--plays", default=str(default_plays), help="the plays the bench's factors read")
    args = p.parse_args()
    import pandas as pd
    import torch
    from deepcuts.core.config import load_config
    from deepcuts.core.lake import Lake, read_pandas
    from deepcuts.nn import pretrained

    root = Path(args.root)
    saved = json.loads((root / "results.json").read_text())
    torch.set_num_threads(1)
    started = time.time()
    cfg = load_config()
    mels = read_pandas(Lake(str(root / "ingest")), "mels", columns=["track_id", "mel", "n_mels", "n_frames"])
    n_mels = int(mels["n_mels"].iloc[0])
    net = pretrained.TransferFeatures(n_mels).configure(       # on the stored dB mels: no normalisation
        pretrained.load_weights(cfg.train.transfer_weights), cfg.ingest.sample_rate, cfg.ingest.hop_length,
        np.zeros(n_mels), np.ones(n_mels)).eval()
    with torch.inference_mode():
        features = {r.track_id: net(torch.from_numpy(np.frombuffer(r.mel, np.float16).reshape(
            1, r.n_mels, r.n_frames).astype(np.float32)))[0].numpy() for r in mels.itertuples()}
    featured = time.time() - started
    print(f"musicnn MSD_vgg features: {len(features)} tracks, {featured:.0f} s "
          f"({featured / len(features) * 1000:.0f} ms a track, one thread)", flush=True)

    plays = pd.read_parquet(args.plays, columns=["user_id", "track_id"])
    rows = []
    for seed in saved["seeds"]:
        lk = Lake(str(root / f"seed-{seed}" / "default"))
        factors = read_pandas(lk, "track_factors").set_index("track_id")
        validation = sorted(set(read_pandas(lk, "validation_examples", columns=["track_id"])["track_id"]))
        train = [t for t in factors.index if t not in set(validation) and t in features]
        holdout = read_pandas(lk, "eval_holdout")
        users = {u: np.asarray(f, np.float64) for u, f in read_pandas(lk, "user_factors")[["user_id", "factors"]]
                 .itertuples(index=False)}
        cold = holdout[holdout["split"] == "cold"]
        cold_tracks = sorted(set(cold["track_id"]) & set(features))
        val_positives = plays[plays["track_id"].isin(validation)]     # every play of them, as evaluate takes
        model = read_pandas(lk, "predicted_factors")
        baseline = read_pandas(lk, "baseline_factors")
        preds = {"model": unit(dict(zip(model["track_id"], model["factors"]))),
                 "MFCC baseline": unit(dict(zip(baseline["track_id"], baseline["factors"])))}
        musicnn, penalty, mse = ridge(features, train, validation, dict(zip(factors.index, factors["factors_unit"])))
        preds["musicnn + ridge"] = unit(musicnn)
        ensembles = {"musicnn + model": ("musicnn + ridge", "model"),
                     "model + MFCC": ("model", "MFCC baseline"),
                     "musicnn + model + MFCC": ("musicnn + ridge", "model", "MFCC baseline")}
        for name, parts in ensembles.items():
            preds[name] = {t: sum(preds[q][t] for q in parts) for t in features}
        for name, vectors in preds.items():
            rows.append({"seed": seed, "predictor": name,
                         "cold": user_auc(cold_tracks, vectors, users, cold),
                         "validation": user_auc(validation, vectors, users, val_positives)})
        pipeline = {(r["split"], r["predictor"]): r["auc"] for r in saved["results"]
                    if r["seed"] == seed and r["variant"] == "default"}
        raw = dict(zip(model["track_id"], model["factors"]))       # as the evaluate stage scores them
        print(f"seed {seed}: musicnn ridge penalty {penalty} (validation MSE {mse:.4f}); this AUC vs evaluate's "
              f"on the model's raw vectors: cold {user_auc(cold_tracks, raw, users, cold):.4f} / "
              f"{pipeline.get(('cold', 'cnn'), float('nan')):.4f}, validation "
              f"{user_auc(validation, raw, users, val_positives):.4f} / "
              f"{pipeline.get(('validation', 'cnn'), float('nan')):.4f}", flush=True)
    table = pd.DataFrame(rows)
    upper = np.mean([r["auc"] for r in saved["results"] if r["split"] == "cold" and r["predictor"] == "upper_bound"
                     and r["variant"] == "default"])
    print(f"\n{len(saved['seeds'])} seeds, mean ± sd; gap closed = (AUC - 0.5) / (upper bound {upper:.4f} - 0.5)")
    print(f"{'predictor':26s} {'cold AUC':>17s} {'gap closed':>11s} {'validation AUC':>17s}")
    for name in preds:
        r = table[table["predictor"] == name]
        gap = (r["cold"].mean() - 0.5) / (upper - 0.5)
        print(f"{name:26s} {r['cold'].mean():8.4f} ± {r['cold'].std():.4f} {gap:10.1%} "
              f"{r['validation'].mean():8.4f} ± {r['validation'].std():.4f}")
    print(f"\nwall {time.time() - started:.0f} s; peak RSS {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
