"""The WPE training objective (van den Oord et al. 2013): train.loss = "wpe".

The loss must equal the brute-force weighted prediction error over every user up to a
per-track constant (checked through loss differences), the A_i/b_i statistics built in
Spark must match numpy on a planted plays table, the weights must reach the batches
aligned with their targets, and a wpe training run must publish a raw-scale model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_config, run_stage, stage_context
from deepcuts.stages import train as train_mod
from deepcuts.stages.infer import predicts_unit_factors
from deepcuts.nn.loader import EpochReader
from deepcuts.nn.model import latest_model_id, load_artifact, model_dir
from deepcuts.cf.plays import confidence
from deepcuts.core.lake import lake, read_table, write_table
from deepcuts.core.tables import (EVAL_HOLDOUT, MELS, TRACK_FACTORS, TRAIN_EXAMPLES, TRAIN_REJECTS,
                             USER_FACTORS, VALIDATION_EXAMPLES)
from deepcuts.nn.trainset import (NO_PLAYS, build_training_set, inputs_fingerprint, listener_sums, wpe_partition,
                                  wpe_track_statistics)
from test_train import RANK, SMALL_MODEL, _frame, planted_catalogue

ALPHA, EPSILON = 2.0, 1.0
REG = 0.05     # factors.reg: Spark ALS scales it by the track's listeners (reg n_i ||y||^2)


def brute_force_wpe(y: np.ndarray, users: np.ndarray, plays: dict[int, float]) -> float:
    """sum over ALL users of c_ui (p_ui - x_u^T y)^2, c = 1 + alpha log(1 + r / eps), plus
    ALS's regularisation REG n_i ||y||^2 (n_i: the track's listeners)."""
    total = REG * len(plays) * float(y @ y)
    for u, x in enumerate(users):
        played = u in plays
        c = float(confidence(plays[u], ALPHA, EPSILON)) if played else 1.0
        total += c * ((1.0 if played else 0.0) - float(x @ y)) ** 2
    return total


def test_wpe_loss_equals_brute_force_up_to_a_constant():
    rng = np.random.default_rng(11)
    n_users, rank = 300, 6
    users = rng.normal(0, 0.5, (n_users, rank))
    gram = users.T @ users
    loss_fn = train_mod.make_loss(make_config_train_wpe())
    assert isinstance(loss_fn, train_mod.WeightedPredictionError)
    tracks = []
    for _ in range(2):
        listeners = rng.choice(n_users, 25, replace=False)
        plays = {int(u): float(rng.integers(1, 40)) for u in listeners}
        conf = confidence(np.array([plays[int(u)] for u in listeners]), ALPHA, EPSILON)
        target, weight = wpe_track_statistics(users[listeners], conf, gram, n_users, REG)
        tracks.append((plays, target, weight))

    def loss(preds):   # a batch of both tracks, as the training loop computes it
        return float(loss_fn(torch.tensor(np.stack(preds)), torch.tensor(np.stack([t[1] for t in tracks])),
                             torch.tensor(np.stack([t[2].ravel() for t in tracks]))))

    y1 = [rng.normal(0, 1, rank) for _ in tracks]
    y2 = [rng.normal(0, 1, rank) for _ in tracks]
    # Mean over the batch of WPE_i / n_users: differences must match the brute force exactly
    # (up to the 1e-6 ridge), the constants cancel.
    brute = [brute_force_wpe(a, users, t[0]) - brute_force_wpe(b, users, t[0]) for a, b, t in zip(y1, y2, tracks)]
    assert loss(y1) - loss(y2) == pytest.approx(np.mean(brute) / n_users, rel=1e-5)
    # y*_i minimises the brute-force WPE: any step away from it costs.
    plays, target, _ = tracks[0]
    for _ in range(5):
        assert brute_force_wpe(target, users, plays) < brute_force_wpe(target + rng.normal(0, 0.05, rank), users, plays)
    # Both tracks at their y*: the loss is 0 (the constant is not in it).
    assert loss([t[1] for t in tracks]) == pytest.approx(0.0, abs=1e-12)


def test_streamed_statistics_equal_the_per_track_ones_across_batches():
    """wpe_partition carries a track's running sums from one Arrow batch to the next: a hit
    track spanning many batches, one-listener tracks and a batch boundary on a track change
    all give the per-track statistics."""
    rng = np.random.default_rng(3)
    n_users, rank = 700, 5
    users = rng.normal(0, 0.4, (n_users, rank))
    gram = users.T @ users
    listeners = {"a-hit": 600, "b-one": 1, "c-few": 7, "d-one": 1, "e-mid": 40}
    rows = [(t, u, 1.0 + rng.uniform(0, 5)) for t, n in listeners.items()
            for u in rng.choice(n_users, n, replace=False)]
    frame = pd.DataFrame({"track_id": [r[0] for r in rows], "factors": [users[r[1]] for r in rows],
                          "confidence": [r[2] for r in rows]})
    batches = [frame.iloc[i:i + 37] for i in range(0, len(frame), 37)]       # 600 % 37 != 0
    out = pd.concat(list(wpe_partition(iter(batches), gram, REG, n_users)), ignore_index=True)
    assert out["track_id"].tolist() == list(listeners) and out["wpe_listeners"].tolist() == list(listeners.values())
    for track_id, target, weight in zip(out["track_id"], out["target"], out["target_weight"]):
        mine = frame[frame["track_id"] == track_id]
        want_t, want_w = wpe_track_statistics(np.stack(mine["factors"]), mine["confidence"].to_numpy(), gram,
                                              n_users, REG)
        np.testing.assert_allclose(target, want_t, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(weight, want_w.ravel(), rtol=2e-5, atol=1e-6)
    # the outer products are summed a chunk of rows at a time: any chunk size, the same sums
    ids, x, c = frame["track_id"].to_numpy(), np.stack(frame["factors"]), frame["confidence"].to_numpy()
    whole = listener_sums(ids, x, c)
    chunked = listener_sums(ids, x, c, chunk_bytes=8 * rank * rank * 3)        # 3 rows a chunk
    assert list(chunked[0]) == list(whole[0]) == list(listeners)
    for got, want in zip(chunked[1:], whole[1:]):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def make_config_train_wpe():
    from deepcuts.core.config import load_config
    return load_config(overrides={"train.loss": "wpe"}).train


def planted_plays(user_ids: list[str], track_styles: dict[str, int], cold: set, skip: str, seed: int = 5):
    """Aggregated plays: every warm track but ``skip`` gets listeners of its style; plus plays
    of cold tracks, of a user without factors, a duplicate pair and a rejected row."""
    rng = np.random.default_rng(seed)
    rows = []
    for track_id, style in track_styles.items():
        if track_id == skip:
            continue
        fans = [u for k, u in enumerate(user_ids) if k % 4 == style]
        for u in rng.choice(fans, int(rng.integers(2, 9)), replace=False):
            rows.append((u, track_id, float(rng.integers(1, 30))))
    warm = sorted(t for t in track_styles if t not in cold and t != skip)
    rows += [(user_ids[0], warm[0], 4.0), (user_ids[0], warm[0], 3.0),     # a duplicate pair: summed
             ("ghost-user", warm[1], 50.0),                                  # no user factors
             (user_ids[1], warm[2], -3.0)]                                   # rejected: negative plays
    return pd.DataFrame(rows, columns=["user_id", "track_id", "plays"])


@pytest.fixture(scope="module")
def wpe_planted(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("wpe")
    cfg = make_config(root, **{**SMALL_MODEL, "train__loss": "wpe", "train__epochs": 2,
                               "factors__alpha": ALPHA, "factors__epsilon": EPSILON, "factors__reg": REG})
    wh = lake(cfg)
    mels, factors, users, holdout, cold = planted_catalogue(n_tracks=96, n_users=100)
    styles = {t: int(t[3:]) % 4 for t in mels["track_id"] if t.startswith("trk")}   # cold ones too
    skip = sorted(t for t in styles if t not in cold)[3]
    plays = planted_plays(users["user_id"].tolist(), styles, cold, skip)
    plays_path = root / "plays.parquet"
    plays.to_parquet(plays_path, index=False)
    cfg = cfg.replace(**{"factors.plays": str(plays_path)})
    for table, rows in ((MELS, mels), (TRACK_FACTORS, factors), (USER_FACTORS, users), (EVAL_HOLDOUT, holdout)):
        write_table(_frame(spark, table, rows), wh, table, f"{table.name}-test")
    ts = build_training_set(stage_context(spark, cfg, "train", "train-20260101T000000-wpe"))
    return {"cfg": cfg, "wh": wh, "ts": ts, "users": users, "plays": plays, "cold": cold, "skip": skip}


@pytest.mark.spark
def test_wpe_training_set_statistics_match_numpy(spark, wpe_planted):
    cfg, wh, ts = wpe_planted["cfg"], wpe_planted["wh"], wpe_planted["ts"]
    assert ts.loss == "wpe" and ts.out_dim == RANK and ts.summary["wpe"]["n_users"] == 100
    examples = pd.concat([read_table(spark, wh, t).select("track_id", "target", "target_weight").toPandas()
                          for t in (TRAIN_EXAMPLES, VALIDATION_EXAMPLES)]).set_index("track_id")
    assert not set(examples.index) & wpe_planted["cold"]
    rejects = {r["track_id"]: r["reason"] for r in read_table(spark, wh, TRAIN_REJECTS).collect()}
    assert rejects[wpe_planted["skip"]] == NO_PLAYS and wpe_planted["skip"] not in examples.index

    users = wpe_planted["users"].set_index("user_id")
    x_all = np.stack(users["factors"].to_numpy()).astype(np.float64)
    plays = wpe_planted["plays"]
    usable = plays[(plays["plays"] > 0) & plays["user_id"].isin(users.index)]
    pairs = usable.groupby(["track_id", "user_id"], as_index=False)["plays"].sum()
    checked = 0
    for track_id, group in pairs.groupby("track_id"):
        if track_id not in examples.index:
            continue
        x = np.stack(users.loc[group["user_id"], "factors"].to_numpy()).astype(np.float64)
        c = 1.0 + ALPHA * np.log1p(group["plays"].to_numpy() / EPSILON)
        a = x_all.T @ x_all + (x * (c - 1)[:, None]).T @ x + np.eye(RANK) * REG * len(x)
        b = x.T @ c
        w = np.asarray(examples.loc[track_id, "target_weight"], dtype=np.float64).reshape(RANK, RANK)
        assert np.allclose(np.triu(w, 1), 0.0)                       # lower-triangular
        np.testing.assert_allclose(w @ w.T * len(users), a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
        np.testing.assert_allclose(examples.loc[track_id, "target"], np.linalg.solve(a, b), rtol=1e-3, atol=1e-4)
        checked += 1
    assert checked == len(examples) > 60
    # The duplicate pair is summed (4 + 3 plays), the ghost user and the negative row ignored:
    # checked above through the same aggregation; the fingerprint keeps mse and wpe sets apart.
    mse_cfg = cfg.replace(**{"train.loss": "mse"})
    assert (inputs_fingerprint(stage_context(spark, mse_cfg, "train"))[0]
            != inputs_fingerprint(stage_context(spark, cfg, "train"))[0] == ts.fingerprint)

    # The loader delivers each track's weight beside its own target.
    weight_of = {tuple(np.float32(v) for v in t): np.asarray(w, np.float32)
                 for t, w in zip(examples["target"], examples["target_weight"])}
    reader = EpochReader(ts.train_files, ts.train_rows, n_mels=ts.n_mels, crop_frames=ts.crop_frames,
                         batch_size=16, train=True, seed=1, workers=1, shuffle_buffer_rows=32,
                         with_target_weight=True)
    rows = 0
    for mel, target, weight in reader.batches(0):
        assert weight.shape == (len(mel), RANK * RANK)
        for t, w in zip(target, weight):
            np.testing.assert_array_equal(weight_of[tuple(t)], w)
        rows += len(mel)
    assert rows == ts.train_rows


@pytest.mark.spark
def test_wpe_training_run_publishes_a_raw_scale_model(spark, wpe_planted):
    cfg, wh = wpe_planted["cfg"], wpe_planted["wh"]
    summary = run_stage(spark, cfg, "train")
    meta = load_artifact(model_dir(wh, latest_model_id(wh))).meta
    assert summary["model_id"] == meta["model_id"] and summary["epochs_run"] == 2
    assert meta["loss"] == "wpe" and meta["train"]["loss"] == "wpe"
    assert meta["target_column"] == "factors" and meta["output_scale"] == "raw_factors"
    assert not predicts_unit_factors(meta)        # infer serves it as is, no unit rescaling
    assert np.isfinite(meta["validation"]["loss"])
    # An mse config refuses the wpe examples rather than training on them without weights.
    with pytest.raises(ValueError, match="built for loss 'wpe'"):
        train_mod.train_model(cfg.replace(**{"train.loss": "mse"}), wpe_planted["ts"], wh, "train-x",
                              torch.device("cpu"), echo=lambda s: None)
