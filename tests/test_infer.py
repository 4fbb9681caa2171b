"""Inference stage: per-batch scoring (pure), Spark scoring, serving backfill, incremental runs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from deepcuts.stages import infer
from deepcuts.nn.model import FactorCNN, latest_model_id, load_artifact, save_artifact
from deepcuts.core.lake import lake, read_pandas
from deepcuts.core.tables import COLD_SOURCES, INFER_REJECTS, MELS, PREDICTED_FACTORS, SERVING_FACTORS, TRACK_FACTORS

from conftest import copy_chain, make_config, run_stage, stage_context, write_arrow, write_rows

N_MELS = 128
RANK = 32
SMALL_NET = {"train.conv_channels": [16, 16], "train.pool_sizes": [4, 2], "train.dense_units": 32,
             "factors.rank": RANK}


def small_cfg(tmp_path, **overrides):
    return make_config(tmp_path, **{k.replace(".", "__"): v for k, v in SMALL_NET.items()}, **overrides)


def make_artifact(cfg, model_id: str, seed: int, loss: str = "mse", factors_run_id: str = "factors-test") -> str:
    """A random-weight FactorCNN saved like the train stage saves one, as if trained on the
    factors run ``factors_run_id`` (infer serves it only in that run's space)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    train = {**dataclasses.asdict(cfg.train), "loss": loss}
    model = FactorCNN.from_train_conf(train, n_mels=N_MELS, out_dim=cfg.factors.rank)
    rng = np.random.default_rng(seed)
    meta = {"target": "factors", "n_mels": N_MELS, "out_dim": cfg.factors.rank, "train": train,
            "mel_mean": rng.normal(-30, 2, N_MELS).tolist(), "mel_std": rng.uniform(5, 10, N_MELS).tolist(),
            "crop_frames": 130, "factors_run_id": factors_run_id}
    return save_artifact(lake(cfg), model_id, model, meta)


def mel_row(track_id: str, n_frames: int, seed: int, n_mels: int = N_MELS, fingerprint: str | None = None,
            corrupt: str | None = None) -> dict:
    mel = np.random.default_rng(seed).normal(-30, 8, (n_mels, n_frames)).astype(np.float16)
    if corrupt == "nan":
        mel[3, 7] = np.nan
    data = mel.tobytes()
    if corrupt == "truncated":
        data = data[:-10]
    return {"track_id": track_id, "mel": data, "n_mels": n_mels, "n_frames": n_frames,
            "sample_rate": 22050, "hop_length": 512, "excerpt_offset_s": 0.0,
            "duration_s": n_frames * 512 / 22050, "fingerprint": fingerprint or f"fp-{track_id}-{seed}",
            "source_uri": f"file:///audio/{track_id}.wav", "source_size": len(data),
            "source_version": "1", "labels": None, "ingest_run_id": "ingest-test"}


# --------------------------------------------------------------------------------------
# Pure per-batch scoring
# --------------------------------------------------------------------------------------
def test_score_batch_matches_embed_and_rejects_bad_rows_only(tmp_path):
    cfg = small_cfg(tmp_path)
    artifact = load_artifact(make_artifact(cfg, "m1", seed=1))
    rows = [mel_row("a", 345, 1), mel_row("b", 200, 2), mel_row("nan", 345, 3, corrupt="nan"),
            mel_row("short", artifact.model.min_frames - 1, 4), mel_row("cut", 345, 5, corrupt="truncated"),
            mel_row("bands", 345, 6, n_mels=64), mel_row("c", 345, 7)]
    batch = pd.DataFrame(rows)[infer.MEL_INPUT_COLUMNS]
    out = infer.score_mel_batch(batch, artifact, "whole", 3.0, batch_size=2).set_index("track_id")

    assert sorted(out.index) == sorted(r["track_id"] for r in rows)   # one row per input, no drops
    assert out.loc["nan", "reason"] == infer.NON_FINITE_MEL
    assert out.loc["short", "reason"] == infer.TOO_SHORT
    assert out.loc["cut", "reason"] == infer.MEL_SIZE_MISMATCH
    assert out.loc["bands", "reason"] == infer.N_MELS_MISMATCH
    for bad in ("nan", "short", "cut", "bands"):
        assert out.loc[bad, "factors"] is None and out.loc[bad, "detail"]
    for r in rows:
        if r["track_id"] in ("a", "b", "c"):
            expected = artifact.embed(np.frombuffer(r["mel"], np.float16).reshape(1, N_MELS, -1)
                                      .astype(np.float32))[0]
            got = out.loc[r["track_id"]]
            assert got["reason"] is None and got["model_id"] == "m1"
            np.testing.assert_allclose(got["factors"], expected, rtol=1e-5, atol=1e-6)


def test_windows_scoring_is_the_mean_over_windows(tmp_path):
    from deepcuts.nn.model import window_starts
    cfg = small_cfg(tmp_path)
    artifact = load_artifact(make_artifact(cfg, "m1", seed=1))
    row = mel_row("long", 700, 9)
    out = infer.score_mel_batch(pd.DataFrame([row])[infer.MEL_INPUT_COLUMNS], artifact, "windows",
                                3.0, batch_size=4)
    mel = np.frombuffer(row["mel"], np.float16).reshape(N_MELS, -1).astype(np.float32)
    window = int(round(3.0 * 22050 / 512))
    starts = window_starts(700, window, artifact.time_stride)
    parts = [artifact.embed(mel[None, :, s:s + window])[0] for s in starts]
    assert len(parts) == 6
    np.testing.assert_allclose(out["factors"][0], np.mean(parts, axis=0), rtol=1e-5, atol=1e-6)
    whole = infer.score_mel_batch(pd.DataFrame([row])[infer.MEL_INPUT_COLUMNS], artifact, "whole",
                                  3.0, batch_size=4)
    assert not np.allclose(whole["factors"][0], out["factors"][0])


def test_a_row_that_breaks_the_model_is_rejected_alone(tmp_path):
    cfg = small_cfg(tmp_path)
    artifact = load_artifact(make_artifact(cfg, "m1", seed=1))

    class Fragile:
        """Wraps the artifact; raises whenever the poisoned mel is in the batch."""
        model, meta, model_id = artifact.model, artifact.meta, artifact.model_id

        def embed(self, mels, window=None):
            if (mels[:, 0, 0] > 1000).any():
                raise RuntimeError("poisoned input")
            return artifact.embed(mels, window)

    rows = [mel_row(t, 345, i) for i, t in enumerate("abcd")]
    poisoned = np.frombuffer(rows[2]["mel"], np.float16).reshape(N_MELS, -1).copy()
    poisoned[0, 0] = 5000
    rows[2]["mel"] = poisoned.tobytes()
    out = infer.score_mel_batch(pd.DataFrame(rows)[infer.MEL_INPUT_COLUMNS], Fragile(), "whole", 3.0,
                                batch_size=4).set_index("track_id")
    assert out.loc["c", "reason"] == infer.MODEL_ERROR and "poisoned" in out.loc["c", "detail"]
    assert out.drop("c")["reason"].isna().all()


@pytest.mark.spark
def test_unit_predictions_are_served_at_the_als_scale(spark):
    from pyspark.sql import functions as F
    df = spark.createDataFrame([([3.0, 4.0],), ([0.0, 0.0],)], "factors array<float>")
    unit_meta = {"train": {"loss": "mse"}}
    got = [r[0] for r in df.select(infer.audio_to_als_expr(F.col("factors"), unit_meta, 10.0)).collect()]
    np.testing.assert_allclose(got[0], [6.0, 8.0], rtol=1e-6)
    assert got[1] == [0.0, 0.0]                               # a zero vector is left alone, no NaN
    raw_meta = {"train": {"loss": "wpe"}}
    got = [r[0] for r in df.select(infer.audio_to_als_expr(F.col("factors"), raw_meta, 10.0)).collect()]
    assert got[0] == [3.0, 4.0]


# --------------------------------------------------------------------------------------
# The Spark stage
# --------------------------------------------------------------------------------------
def write_mels(spark, cfg, rows: list[dict], run_id: str) -> None:
    write_rows(spark, cfg, MELS, pd.DataFrame(rows), run_id)


def write_track_factors(spark, cfg, listeners: dict[str, int]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    vectors = (rng.normal(0, 1, (len(listeners), RANK)) * rng.uniform(0.5, 2, (len(listeners), 1))) \
        .astype(np.float32)
    pdf = pd.DataFrame({"track_id": list(listeners), "factors": list(vectors),
                        "factors_unit": list(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)),
                        "n_plays": [3 * n for n in listeners.values()],
                        "n_listeners": list(listeners.values()), "run_id": "factors-test"})
    write_rows(spark, cfg, TRACK_FACTORS, pdf, "factors-test")
    return pdf


@pytest.fixture
def catalogue(spark, tmp_path):
    """A warehouse with 24 mels (two lengths, one NaN), ALS factors for part of them and one
    ALS-only track, and a model."""
    cfg = small_cfg(tmp_path, infer__min_listeners_for_usage=5, spark__shuffle_partitions=4)
    rows = [mel_row(f"t{i:02d}", 345 if i % 3 else 260, i) for i in range(24)]
    rows[5] = mel_row("t05", 345, 5, corrupt="nan")
    write_mels(spark, cfg, rows, "ingest-1")
    # t00..t09 heavy users (usage), t10..t15 few listeners (audio), t16.. no ALS at all;
    # t05 (NaN mel) has few listeners: falls back to its ALS vector; "als-only" has no mel.
    listeners = {f"t{i:02d}": (12 if i < 10 else 2) for i in range(16)}
    listeners["t05"] = 1
    listeners["als-only"] = 30
    factors = write_track_factors(spark, cfg, listeners)
    make_artifact(cfg, "model-a", seed=1)
    return cfg, rows, factors


def serving(cfg) -> pd.DataFrame:
    return read_pandas(lake(cfg), SERVING_FACTORS.name).set_index("track_id")


def write_mel_files(cfg, rows: list[dict], run_id: str, rows_per_file: int, row_group_rows: int) -> None:
    """Commit ``rows`` as mels files with exactly these row-group and file sizes."""
    import pyarrow as pa
    write_arrow(cfg, MELS, [pa.Table.from_pylist([{c: r.get(c) for c in MELS.columns} for r in rows[start:start + rows_per_file]],
                                                 schema=MELS.schema)
                            for start in range(0, len(rows), rows_per_file)], row_group_rows=row_group_rows)


@pytest.mark.spark
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_spark_scoring_reads_the_stored_rows_and_equals_plain_python(spark, tmp_path, precision):
    """Units of 4 rows over files of 7 rows in row groups of 3: units straddle row groups
    and files; only the requested rows are scored, each once, as a plain Python call does."""
    import pyarrow.parquet as pq
    cfg = small_cfg(tmp_path / precision, ingest__rows_per_row_group=4, infer__precision=precision)
    folder = make_artifact(cfg, "m1", seed=3)
    rows = [mel_row(f"x{i:02d}", 345 if i % 2 else 300, i) for i in range(20)] \
        + [mel_row("bad", 345, 99, corrupt="nan")]
    write_mel_files(cfg, rows, "ingest-1", rows_per_file=7, row_group_rows=3)
    wh = lake(cfg)
    assert len(wh.files(MELS.name)) == 3
    assert pq.ParquetFile(wh.files(MELS.name)[0]).metadata.num_row_groups == 3

    locations = infer.mel_locations(stage_context(spark, cfg, "infer"))
    assert sorted(locations.columns) == ["fingerprint", "mel_file", "mel_row", "track_id"]
    wanted = locations.where("track_id not in ('x00', 'x03', 'x08', 'x13', 'x14')")
    got = infer.predict_vectors(spark, wanted, folder, cfg).toPandas()
    assert not got["track_id"].duplicated().any()
    got = got.set_index("track_id")
    expected_ids = {r["track_id"] for r in rows} - {"x00", "x03", "x08", "x13", "x14"}
    assert set(got.index) == expected_ids
    assert got.loc["bad", "reason"] == infer.NON_FINITE_MEL and got.loc["bad", "factors"] is None
    local = infer.score_locally(pd.DataFrame(rows), load_artifact(folder, precision=precision), cfg) \
        .set_index("track_id")
    for r in rows:
        tid = r["track_id"]
        if tid in expected_ids and tid != "bad":
            assert got.loc[tid, "fingerprint"] == r["fingerprint"] and got.loc[tid, "reason"] is None
            np.testing.assert_allclose(np.asarray(got.loc[tid, "factors"]), local.loc[tid, "factors"],
                                       rtol=1e-5, atol=1e-6)


def test_reading_stored_rows_checks_what_it_reads(tmp_path):
    cfg = small_cfg(tmp_path)
    artifact = load_artifact(make_artifact(cfg, "m1", seed=3))
    rows = [mel_row(f"y{i}", 300, i) for i in range(5)]
    write_mel_files(cfg, rows, "ingest-1", rows_per_file=5, row_group_rows=2)
    path = lake(cfg).files(MELS.name)[0]              # a Spark-style file: URI
    tables = list(infer.read_mel_rows(path, [4, 1, 0]))
    assert [t.column("track_id").to_pylist() for t in tables] == [["y0", "y1"], ["y4"]]
    out = pd.concat(infer.score_stored_mels(path, [1, 4], ["y1", "y4"], artifact, "whole", 3.0, 8))
    assert out["track_id"].tolist() == ["y1", "y4"] and out["reason"].isna().all()
    with pytest.raises(RuntimeError, match="expected"):
        list(infer.score_stored_mels(path, [1, 4], ["y1", "y3"], artifact, "whole", 3.0, 8))
    with pytest.raises(RuntimeError, match="past its end"):
        list(infer.score_stored_mels(path, [4, 9], ["y4", "y9"], artifact, "whole", 3.0, 8))


def test_workers_load_only_the_weights_the_driver_planned(tmp_path):
    from deepcuts.nn.model import ModelArtifactError
    cfg = small_cfg(tmp_path)
    folder = make_artifact(cfg, "m1", seed=3)
    key = infer.model_key(folder)
    assert key.startswith("m1@") and len(key) == len("m1@") + 64
    artifact = infer.worker_artifact(key, folder, "cpu", "fp32")
    assert infer.worker_artifact(key, folder, "cpu", "fp32") is artifact      # cached per worker
    make_artifact(cfg, "m1", seed=4)                 # the folder rewritten under the same id
    assert infer.model_key(folder) != key
    assert infer.worker_artifact(key, folder, "cpu", "fp32") is artifact      # still the planned weights
    infer._WORKER_MODELS.clear()                     # a fresh worker of the same run
    with pytest.raises(ModelArtifactError, match="changed during the run"):
        infer.worker_artifact(key, folder, "cpu", "fp32")
    with pytest.raises(ModelArtifactError, match="meta.json"):
        infer.model_key(str(tmp_path / "no-such-model"))


@pytest.mark.spark
def test_serving_backfill_sources_and_rejects(spark, catalogue):
    cfg, rows, factors = catalogue
    wh = lake(cfg)
    first = run_stage(spark, cfg, "infer")
    assert first["mode"] == "full" and first["scored"] == 23 and first["rejected"] == {infer.NON_FINITE_MEL: 1}

    served = serving(cfg)
    assert not served.index.duplicated().any()
    assert set(served.index) == {r["track_id"] for r in rows} | {"als-only"}
    by_id = factors.set_index("track_id")
    for tid, row in served.iterrows():
        if tid in by_id.index and (by_id.loc[tid, "n_listeners"] >= 5 or tid == "t05"):
            assert row["source"] == "usage" and row["model_id"] is None
            np.testing.assert_array_equal(row["factors"], by_id.loc[tid, "factors"])
        else:
            assert row["source"] == "audio" and row["model_id"] == "model-a"
    assert first["serving_low_usage_fallback"] == 1            # t05: NaN mel, 1 listener
    # Audio rows are unit predictions rescaled to the median ALS norm.
    median = np.median(np.linalg.norm(np.stack(factors["factors"]), axis=1))
    audio = np.stack(served[served["source"] == "audio"]["factors"])
    np.testing.assert_allclose(np.linalg.norm(audio, axis=1), median, rtol=0.02)
    predicted = read_pandas(wh, PREDICTED_FACTORS.name).set_index("track_id")
    assert len(predicted) == 23 and "t05" not in predicted.index
    rejects = read_pandas(wh, INFER_REJECTS.name)
    assert rejects["track_id"].tolist() == ["t05"] and rejects["reason"].tolist() == [infer.NON_FINITE_MEL]



@pytest.mark.spark
def test_incremental_rescoring_and_new_model(spark, catalogue):
    cfg, rows, _ = catalogue
    wh = lake(cfg)
    first = run_stage(spark, cfg, "infer")
    old = read_pandas(wh, PREDICTED_FACTORS.name).set_index("track_id")

    # Night 2: t20's audio changed, t21 left the catalogue, t05 was fixed, t30 is new.
    changed = [r for r in rows if r["track_id"] != "t21"]
    changed = [mel_row("t20", 345, 1020) if r["track_id"] == "t20" else r for r in changed]
    changed = [mel_row("t05", 345, 1005) if r["track_id"] == "t05" else r for r in changed]
    changed.append(mel_row("t30", 345, 30))
    write_mels(spark, cfg, changed, "ingest-2")
    summary = run_stage(spark, cfg, "infer")
    assert summary["mode"] == "incremental" and summary["scored"] == 3 and summary["rejected"] == {}
    assert wh.delta(PREDICTED_FACTORS.name).history(1)[0]["operation"] == "MERGE"   # not a rewrite
    new = read_pandas(wh, PREDICTED_FACTORS.name).set_index("track_id")
    assert set(new.index) == {r["track_id"] for r in changed}
    assert not new.index.duplicated().any()
    assert not np.allclose(new.loc["t20", "factors"], old.loc["t20", "factors"])
    for tid in set(old.index) - {"t20", "t21"}:                 # untouched rows are kept as they were
        np.testing.assert_array_equal(new.loc[tid, "factors"], old.loc[tid, "factors"])
        assert new.loc[tid, "run_id"] == first["run_id"]
    assert read_pandas(wh, INFER_REJECTS.name).empty
    served = serving(cfg)
    assert "t21" not in served.index and served.loc["t30", "source"] == "audio"
    assert served.loc["t05", "source"] == "audio"              # its mel scores now: audio beats 1 listener

    # A new model rescores everything and replaces every audio row.
    make_artifact(cfg, "model-b", seed=2)
    assert latest_model_id(wh) == "model-b"
    summary = run_stage(spark, cfg, "infer")
    assert summary["scored"] == len(changed)
    served = serving(cfg)
    audio = served[served["source"] == "audio"]
    assert len(audio) and (audio["model_id"] == "model-b").all()
    assert (read_pandas(wh, PREDICTED_FACTORS.name)["model_id"] == "model-b").all()


def test_a_model_outside_the_als_space_is_refused():
    meta = {"model_id": "m1", "target": "factors", "out_dim": RANK}
    infer.check_model_fits_factors(meta, RANK)
    infer.check_model_fits_factors(meta, None)                # no ALS factors yet: nothing to match
    from deepcuts.core.config import ConfigError     # a configuration error: exit 2 (issue 18)
    with pytest.raises(ConfigError, match="rank"):
        infer.check_model_fits_factors({**meta, "out_dim": RANK + 1}, RANK)
    with pytest.raises(ConfigError, match="target"):
        infer.check_model_fits_factors({**meta, "target": "labels"}, RANK)


@pytest.mark.spark
@pytest.mark.slow
def test_demo_catalogue_every_ingested_track_served_once(spark, demo_chain, tmp_path):
    """The real chain on the demo catalogue (a copy of the shared one): ingest -> factors ->
    a new model -> infer rescores and serves every track once."""
    cfg = copy_chain(demo_chain, tmp_path).cfg
    wh = lake(cfg)
    mels = read_pandas(wh, MELS.name)
    als = read_pandas(wh, TRACK_FACTORS.name).set_index("track_id")
    # The median listener count splits the demo into usage-served and audio-served halves.
    threshold = int(np.median(als["n_listeners"])) + 1
    cfg = cfg.replace(**{"infer.min_listeners_for_usage": threshold,
                         "infer.serving": "threshold"})   # the blend on the demo: tests/test_blend.py
    make_artifact(cfg, "model-demo", seed=5, factors_run_id=als["run_id"].iloc[0])
    summary = run_stage(spark, cfg, "infer")
    assert summary["scored"] == len(mels) and summary["rejected"] == {} and summary["unserved_tracks"] == 0

    served = serving(cfg)
    assert not served.index.duplicated().any()
    assert set(mels["track_id"]) <= set(served.index)
    usage = {t for t, n in als["n_listeners"].items() if n >= threshold}
    assert usage and usage != set(mels["track_id"])             # the demo exercises both sources
    for tid, row in served.iterrows():   # a cold track with a known artist may get the metadata prior
        expected = ("usage",) if tid in usage or tid not in set(mels["track_id"]) else COLD_SOURCES
        assert row["source"] in expected, (tid, row["source"])
    assert summary["serving_by_source"] == served["source"].value_counts().to_dict()

    again = run_stage(spark, cfg, "infer")
    assert again["scored"] == 0 and again["unchanged"] == len(mels)
    rerun = serving(cfg)
    assert rerun.index.sort_values().equals(served.index.sort_values())
    for tid in served.index:
        np.testing.assert_array_equal(rerun.loc[tid, "factors"], served.loc[tid, "factors"])
