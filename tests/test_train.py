"""The train stage on a catalogue with planted structure: tracks of a style share a spectral
signature and lie near the style's direction in factor space, users prefer one style.

The cold-start AUC is checked against a margin that a model which learnt nothing fails
(its AUC is ~0.5), resume-after-crash must reproduce an uninterrupted run bit for bit, and
damaged checkpoints must be refused by name."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_config, run_stage, stage_context
from deepcuts.stages import train as train_mod
from deepcuts.nn.model import latest_model_id, load_artifact, model_dir
from deepcuts.core.lake import lake, read_table, write_table
from deepcuts.core.tables import (EVAL_HOLDOUT, MELS, TRACK_FACTORS, TRAIN_EXAMPLES, TRAIN_METRICS,
                             TRAIN_REJECTS, USER_FACTORS, VALIDATION_EXAMPLES)
from deepcuts.nn.trainset import build_training_set, committed_training_set
from deepcuts.core.lake import Lake

N_STYLES, RANK, N_MELS, FRAMES = 4, 8, 128, 180
SMALL_MODEL = {"train__conv_channels": [24, 24, 24], "train__dense_units": 48, "train__dropout": 0.1,
               "train__epochs": 6, "train__batch_size": 16, "train__learning_rate": 0.003,
               "train__rows_per_row_group": 16, "train__shuffle_buffer_rows": 64,
               "train__validation_fraction": 0.15, "train__loader_workers": 1, "train__patience": 3,
               "spark__shuffle_partitions": 2, "factors__eval_k": 50}


def planted_catalogue(n_tracks: int = 160, n_users: int = 120, cold_share: float = 0.25, seed: int = 3):
    """(mels, track_factors, user_factors, holdout) pandas frames with a learnable style signal."""
    rng = np.random.default_rng(seed)
    centroids = np.linalg.qr(rng.normal(size=(RANK, RANK)))[0][:N_STYLES]
    band = np.arange(N_MELS)
    mels, factors, styles = [], [], {}
    for i in range(n_tracks):
        track_id, style = f"trk{i:04d}", i % N_STYLES
        styles[track_id] = style
        frames = FRAMES + int(rng.integers(0, 40))
        bump = 18.0 * np.exp(-0.5 * ((band - (16 + 32 * style)) / 6.0) ** 2)
        pulse = 1 + 0.5 * np.sin(np.arange(frames) * (0.2 + 0.1 * style))
        mel = rng.normal(-50, 4, (N_MELS, frames)) + bump[:, None] * pulse[None, :]
        mels.append({"track_id": track_id, "mel": mel.astype(np.float16).tobytes(), "n_mels": N_MELS,
                     "n_frames": frames, "sample_rate": 22050, "hop_length": 512, "excerpt_offset_s": 0.0,
                     "duration_s": frames * 512 / 22050, "fingerprint": f"fp{i}", "source_uri": f"mem://{i}",
                     "source_size": 1, "source_version": "1", "labels": f"style{style}|synthetic",
                     "ingest_run_id": "ingest-test"})
        vec = centroids[style] + 0.25 * rng.normal(size=RANK)
        factors.append({"track_id": track_id, "factors": (vec * 3).astype(np.float32).tolist(),
                        "factors_unit": (vec / np.linalg.norm(vec)).astype(np.float32).tolist(),
                        "n_plays": 10, "n_listeners": 5, "run_id": "factors-test"})
    ids = sorted(styles)
    cold = set(rng.choice(ids, int(cold_share * n_tracks), replace=False))
    users, holdout = [], []
    for u in range(n_users):
        style = u % N_STYLES
        vec = centroids[style] + 0.2 * rng.normal(size=RANK)
        users.append({"user_id": f"u{u}", "factors": vec.astype(np.float32).tolist(), "n_plays": 5,
                      "n_tracks": 5, "run_id": "factors-test"})
        liked = [t for t in cold if styles[t] == style]
        for t in rng.choice(liked, min(4, len(liked)), replace=False):
            holdout.append({"user_id": f"u{u}", "track_id": t, "plays": 3.0, "split": "cold"})
    # A broken mel (bytes do not match the shape) must be rejected, not crash the job.
    mels.append({**mels[0], "track_id": "broken", "mel": b"\x00" * 10, "fingerprint": "fpb"})
    factors.append({**factors[0], "track_id": "broken"})
    factors.append({**factors[1], "track_id": "no-audio"})
    warm = [f for f in factors if f["track_id"] not in cold]
    return (pd.DataFrame(mels), pd.DataFrame(warm), pd.DataFrame(users), pd.DataFrame(holdout), cold)


def _frame(spark, table, rows: pd.DataFrame):
    from deepcuts.core.tables import spark_schema
    rows = rows.reindex(columns=table.columns)          # columns a test leaves out are null
    return spark.createDataFrame(rows.astype(object).where(rows.notna(), None), spark_schema(table))


@pytest.fixture(scope="module")
def planted(spark, tmp_path_factory):
    """A warehouse with planted mels/factors/holdout and its training set built once."""
    root = tmp_path_factory.mktemp("planted")
    cfg = make_config(root, **SMALL_MODEL)
    wh = lake(cfg)
    mels, factors, users, holdout, cold = planted_catalogue()
    for table, rows in ((MELS, mels), (TRACK_FACTORS, factors), (USER_FACTORS, users), (EVAL_HOLDOUT, holdout)):
        write_table(_frame(spark, table, rows), wh, table, f"{table.name}-test")
    ts = build_training_set(stage_context(spark, cfg, "train", "train-20260101T000000-planted"))
    return {"cfg": cfg, "wh": wh, "ts": ts, "cold": cold, "root": root}


@pytest.mark.spark
def test_training_set_keeps_cold_tracks_out_and_rejects_bad_rows(spark, planted):
    cfg, wh, ts, cold = planted["cfg"], planted["wh"], planted["ts"], planted["cold"]
    train_ids = {r[0] for r in read_table(spark, wh, TRAIN_EXAMPLES).select("track_id").collect()}
    val_ids = {r[0] for r in read_table(spark, wh, VALIDATION_EXAMPLES).select("track_id").collect()}
    assert not train_ids & val_ids and not (train_ids | val_ids) & cold
    assert len(train_ids | val_ids) == 160 - len(cold)
    assert 0 < len(val_ids) < 0.35 * len(train_ids)
    rejects = {r["track_id"]: r["reason"] for r in read_table(spark, wh, TRAIN_REJECTS).collect()}
    assert rejects == {"broken": "bad_mel_bytes", "no-audio": "no_mel"}
    assert ts.out_dim == RANK and ts.crop_frames == 130 and ts.source_run_id == "track_factors-test"
    # Row groups sized for Petastorm (one batch per row group): about rows_per_row_group mels.
    import pyarrow.parquet as pq
    sizes = [pq.ParquetFile(f).metadata.row_group(i).num_rows
             for f in ts.train_files for i in range(pq.ParquetFile(f).metadata.num_row_groups)]
    assert max(sizes) <= 2 * cfg.train.rows_per_row_group and np.median(sizes) >= 4
    # Same inputs: the committed set is reused (a resumed run sees the same examples).
    again = build_training_set(stage_context(spark, cfg, "train", "train-20260101T000001-again"))
    assert again.run_id == ts.run_id and committed_training_set(wh).fingerprint == ts.fingerprint


@pytest.mark.spark
@pytest.mark.slow
def test_the_nightly_chain_trains_and_publishes_a_complete_artifact(spark, demo_chain):
    """demo -> ingest -> factors -> train (the shared chain): the artifact records its inputs,
    its per-epoch metrics and a checksum; LATEST names it.  (The CNN against random on the
    cold tracks is the evaluate stage's: tests/test_evaluate.py.)"""
    cfg, summary = demo_chain.cfg, demo_chain.summaries["train"]
    wh = lake(cfg)
    model_id = latest_model_id(wh)
    assert model_id == summary["model_id"]
    meta = load_artifact(model_dir(wh, model_id)).meta
    assert meta["factors_run_id"] == demo_chain.summaries["factors"]["run_id"] and len(meta["mel_mean"]) == 128
    assert meta["out_dim"] == cfg.factors.rank and meta["validation"]["train_rows"] > 40
    assert "evaluate stage" in summary["cold_start"]
    assert read_table(spark, wh, TRAIN_METRICS).where(f"model_id = '{model_id}'").count() == summary["epochs_run"]
    with open(os.path.join(model_dir(wh, model_id), "meta.json")) as fh:
        assert json.load(fh)["weights_sha256"]


@pytest.mark.spark
def test_labels_target_trains_a_classifier_whose_embedding_is_the_penultimate_layer(spark, planted, tmp_path):
    cfg = planted["cfg"].replace(**{"train.target": "labels", "train.epochs": 3,
                                    "warehouse.root": str(tmp_path / "labels-wh")})
    wh = lake(cfg)
    for table in (MELS, EVAL_HOLDOUT):     # labels need no usage: no track_factors at all
        rows = read_table(spark, planted["wh"], table)
        write_table(rows, wh, table, f"{table.name}-labels")
    summary = run_stage(spark, cfg, "train")
    artifact = load_artifact(model_dir(wh, latest_model_id(wh)))
    meta = artifact.meta
    assert meta["target"] == "labels" and meta["label_names"] == [f"style{k}" for k in range(N_STYLES)] + ["synthetic"]
    assert meta["out_dim"] == SMALL_MODEL["train__dense_units"] and meta["n_outputs"] == N_STYLES + 1
    assert "labels target" in summary["cold_start"]
    losses = [r["validation_loss"] for r in
              read_table(spark, wh, TRAIN_METRICS).orderBy("epoch").collect()]
    assert losses[-1] < losses[0]
    vectors = artifact.embed(np.random.default_rng(0).normal(-45, 8, (2, N_MELS, 150)).astype(np.float32))
    assert vectors.shape == (2, SMALL_MODEL["train__dense_units"])


class Crash(RuntimeError):
    pass


@pytest.mark.spark
def test_resume_after_crash_reproduces_an_uninterrupted_run(planted, tmp_path, monkeypatch):
    cfg = planted["cfg"].replace(**{"train.epochs": 3, "train.patience": 10})
    ts = planted["ts"]
    whole = train_mod.train_model(cfg, ts, Lake(str(tmp_path / "a")), "train-x-a", torch.device("cpu"),
                                  echo=lambda s: None)

    wh_b = Lake(str(tmp_path / "b"))
    real_run_epoch = train_mod._run_epoch

    def crash_in_second_epoch(model, reader, epoch, *args, **kwargs):
        if epoch == 1 and kwargs.get("optimizer") is not None:
            raise Crash("simulated crash")
        return real_run_epoch(model, reader, epoch, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_run_epoch", crash_in_second_epoch)
    with pytest.raises(Crash):
        train_mod.train_model(cfg, ts, wh_b, "train-x-b", torch.device("cpu"), echo=lambda s: None)
    monkeypatch.setattr(train_mod, "_run_epoch", real_run_epoch)
    resumed = train_mod.train_model(cfg, ts, wh_b, "train-x-c", torch.device("cpu"), echo=lambda s: None)

    assert resumed.resumed_from_epoch == 0 and whole.resumed_from_epoch is None
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    np.testing.assert_array_equal(whole.mel_mean, resumed.mel_mean)


@pytest.mark.spark
def test_corrupted_checkpoint_is_refused(planted, tmp_path):
    cfg = planted["cfg"].replace(**{"train.epochs": 1})
    wh = Lake(str(tmp_path / "w"))
    result = train_mod.train_model(cfg, planted["ts"], wh, "train-x-d", torch.device("cpu"), echo=lambda s: None)
    folder = Path(result.checkpoint_dir)
    pointer = json.loads((folder / train_mod.CHECKPOINT_POINTER).read_text())
    target = folder / pointer["file"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(train_mod.CheckpointError, match=str(target.name) + ".*corrupted"):
        train_mod.train_model(cfg, planted["ts"], wh, "train-x-e", torch.device("cpu"), echo=lambda s: None)
    target.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(train_mod.CheckpointError, match="truncated"):
        train_mod.load_checkpoint(str(folder))
    # A pointer whose sha matches a file torch cannot read is refused too, by name.
    garbage = b"not a torch archive"
    import hashlib
    target.write_bytes(garbage)
    (folder / train_mod.CHECKPOINT_POINTER).write_text(json.dumps(
        {**pointer, "bytes": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}))
    with pytest.raises(train_mod.CheckpointError, match="cannot be loaded"):
        train_mod.load_checkpoint(str(folder))
    shutil.rmtree(folder)
    assert train_mod.load_checkpoint(str(folder)) is None


def test_checkpoint_key_ignores_operational_keys(tmp_path):
    cfg = make_config(tmp_path)
    key = train_mod.checkpoint_key(cfg.train, "abc")
    assert train_mod.checkpoint_key(cfg.replace(**{"train.loader_workers": 7}).train, "abc") == key
    assert train_mod.checkpoint_key(cfg.replace(**{"train.learning_rate": 0.5}).train, "abc") != key
    assert train_mod.checkpoint_key(cfg.train, "abd") != key
