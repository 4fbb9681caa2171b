"""The ingest job on real files in local Spark: rejects with reasons, incremental re-runs,
crash safety, manifests and S3."""
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from audio_fixtures import write_audio, write_hostile_files
from conftest import make_config, run_stage, stage_context
from deepcuts.audio.decode import mel_from_bytes
from deepcuts.core import lake as lakeio
from deepcuts.core.lake import Lake, lake, read_pandas
from deepcuts.core.tables import MELS

pytestmark = pytest.mark.spark

GOOD = {f"good/{i:02d}{ext}": (i, 1 + i % 2) for i, ext in
        enumerate([".wav", ".flac", ".ogg", ".mp3", ".opus", ".mp3"])}


def _config(root, **over):
    return make_config(root, ingest__source=str(root / "cat"), ingest__excerpt_seconds=5.0,
                       ingest__partitions=2, ingest__rows_per_row_group=2, **over)


def _reasons(wh):
    rej = read_pandas(wh, "ingest_rejects")
    return dict(zip(rej["track_id"], rej["reason"]))


@pytest.fixture(scope="module")
def folder_runs(spark, tmp_path_factory):
    """Four runs over one evolving catalogue, shared by the tests below."""
    root = tmp_path_factory.mktemp("ingest")
    cat = root / "cat"
    for rel, (seed, channels) in GOOD.items():
        write_audio(cat / rel, seconds=6.0, channels=channels, seed=seed)
    hostile = write_hostile_files(cat / "bad")
    cfg = _config(root)
    wh = lake(cfg)
    out = {"root": root, "cfg": cfg, "wh": wh, "hostile": hostile}
    out["run1"] = run_stage(spark, cfg, "ingest")
    out["mels1"] = read_pandas(wh, "mels")
    out["rejects1"] = _reasons(wh)
    out["run2"] = run_stage(spark, cfg, "ingest")
    out["mels2"] = read_pandas(wh, "mels")
    # Night 3: one file changed, one added, one deleted, one broken file fixed.
    write_audio(cat / "good/01.flac", seconds=7.0, channels=2, seed=101)
    write_audio(cat / "new/n1.ogg", seconds=6.0, channels=1, seed=7)
    os.remove(cat / "good/02.ogg")
    (cat / "bad/empty.mp3").unlink()
    write_audio(cat / "bad/empty.mp3", seconds=6.0, seed=8)
    out["run3"] = run_stage(spark, cfg, "ingest")
    out["mels3"] = read_pandas(wh, "mels")
    out["rejects3"] = _reasons(wh)
    out["run4"] = run_stage(spark, cfg.replace(**{"ingest.on_missing": "drop"}), "ingest")
    out["mels4"] = read_pandas(wh, "mels")
    return out


def test_first_run_ingests_good_files_and_records_every_reject(folder_runs):
    r = folder_runs
    assert r["run1"]["ingested"] == len(GOOD) and r["run1"]["listed"] == len(GOOD) + len(r["hostile"])
    assert r["rejects1"] == {f"bad/{k}": v for k, v in r["hostile"].items()}
    assert sum(r["run1"]["rejected"].values()) == len(r["hostile"])
    mels = r["mels1"]
    assert sorted(mels["track_id"]) == sorted(GOOD)
    row = mels.iloc[0]
    mel = mel_from_bytes(row["mel"], row["n_mels"], row["n_frames"])
    assert mel.shape == (128, 1 + int(5.0 * 22050) // 512) and np.isfinite(mel).all()
    assert set(mels["sample_rate"]) == {22050} and set(mels["hop_length"]) == {512}
    assert (mels["excerpt_offset_s"].round(2) == 0.5).all() and (mels["duration_s"].round(1) == 6.0).all()
    assert mels["fingerprint"].str.len().eq(32).all() and mels["ingest_run_id"].eq(r["run1"]["run_id"]).all()


def test_row_groups_are_sized_for_petastorm(folder_runs):
    """rows_per_row_group=2: files of several mels are split into row groups of ~2 mels
    (parquet-mr's default check every 100 rows would leave one big row group)."""
    wh = folder_runs["wh"]
    sizes = []
    for path in wh.files("mels"):
        meta = pq.ParquetFile(path).metadata
        sizes.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    assert any(len(groups) > 1 for groups in sizes), sizes
    assert max(max(groups) for groups in sizes) <= 3, sizes


def test_second_run_skips_everything(folder_runs):
    r2 = folder_runs["run2"]
    assert r2["ingested"] == 0 and r2["new"] == 0 and r2["changed"] == 0
    assert r2["skipped_unchanged"] == len(GOOD)
    assert r2["skipped_rejected_unchanged"] == len(folder_runs["hostile"])
    assert r2["mels"] == "unchanged"
    assert folder_runs["mels2"]["track_id"].is_unique and len(folder_runs["mels2"]) == len(GOOD)


def test_third_run_processes_only_new_and_changed(folder_runs):
    r3, mels = folder_runs["run3"], folder_runs["mels3"]
    assert (r3["new"], r3["changed"], r3["ingested"]) == (2, 1, 3)    # n1.ogg + fixed empty.mp3; 01.flac
    assert r3["skipped_unchanged"] == len(GOOD) - 2                     # minus changed and deleted
    assert r3["missing_sources"] == 1
    assert mels["track_id"].is_unique
    # kept (on_missing=keep) but reported
    assert "good/02.ogg" in set(mels["track_id"])
    assert folder_runs["rejects3"]["good/02.ogg"] == "source_missing"
    assert "bad/empty.mp3" not in folder_runs["rejects3"]              # fixed: no longer rejected
    changed = mels.set_index("track_id").loc["good/01.flac"]
    before = folder_runs["mels1"].set_index("track_id").loc["good/01.flac"]
    assert changed["ingest_run_id"] == folder_runs["run3"]["run_id"] and changed["fingerprint"] != before["fingerprint"]
    assert changed["duration_s"] == pytest.approx(7.0, abs=0.05)
    untouched = mels.set_index("track_id").loc["good/00.wav"]
    assert untouched["ingest_run_id"] == folder_runs["run1"]["run_id"]
    assert len(mels) == len(GOOD) + 2


def test_on_missing_drop_removes_the_vanished_track(folder_runs):
    mels = folder_runs["mels4"]
    assert "good/02.ogg" not in set(mels["track_id"]) and len(mels) == len(GOOD) + 1
    assert mels["track_id"].is_unique


def test_a_crash_before_commit_leaves_the_previous_version(spark, folder_runs, monkeypatch):
    r = folder_runs
    write_audio(r["root"] / "cat" / "new" / "n2.wav", seconds=5.0, seed=9)
    before = read_pandas(r["wh"], "mels")
    version = r["wh"].version("mels")

    def crash(*a, **k):
        raise RuntimeError("simulated crash")
    monkeypatch.setattr(lakeio, "merge_table", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(spark, r["cfg"], "ingest")
    monkeypatch.undo()
    assert r["wh"].version("mels") == version
    assert read_pandas(r["wh"], "mels").sort_values("track_id").reset_index(drop=True)[["track_id", "fingerprint"]].equals(
        before.sort_values("track_id").reset_index(drop=True)[["track_id", "fingerprint"]])
    summary = run_stage(spark, r["cfg"], "ingest")
    assert summary["new"] == 1 and summary["ingested"] == 1
    mels = read_pandas(r["wh"], "mels")
    assert mels["track_id"].is_unique and "new/n2.wav" in set(mels["track_id"])


def test_a_crash_between_two_commits_is_invisible_to_readers_and_the_rerun_completes(spark, folder_runs,
                                                                                     monkeypatch):
    """mels committed, ingest_rejects and the manifest not: readers keep the previous run's
    mels (pinned by the manifest); the rerun redoes the work without duplicating a row."""
    r = folder_runs
    write_audio(r["root"] / "cat" / "new" / "n3.wav", seconds=5.0, seed=10)
    pinned = stage_context(spark, r["cfg"], "ingest").pinned_version(MELS)
    real_write = lakeio.write_table

    def crash_on_rejects(df, lk, table, *a, **k):
        if table.name == "ingest_rejects":
            raise RuntimeError("simulated crash")
        return real_write(df, lk, table, *a, **k)
    monkeypatch.setattr(lakeio, "write_table", crash_on_rejects)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(spark, r["cfg"], "ingest")
    monkeypatch.undo()
    assert r["wh"].version("mels") == pinned + 1                          # committed ...
    assert stage_context(spark, r["cfg"], "ingest").pinned_version(MELS) == pinned   # ... but not published
    runs = read_pandas(r["wh"], "runs").sort_values("ended_at")
    assert runs["status"].iloc[-1] == "failed" and "simulated crash" in runs["error"].iloc[-1]
    summary = run_stage(spark, r["cfg"], "ingest")
    assert summary["new"] == 1
    mels = read_pandas(r["wh"], "mels")
    assert mels["track_id"].is_unique and "new/n3.wav" in set(mels["track_id"])
    assert stage_context(spark, r["cfg"], "ingest").pinned_version(MELS) == r["wh"].version("mels")


def test_manifest_source_with_labels_metadata_bad_rows_and_duplicates(spark, tmp_path):
    cat = tmp_path / "cat"
    write_audio(cat / "audio/a.mp3", seconds=5.0, seed=1)
    write_audio(cat / "audio/b.flac", seconds=5.0, seed=2)
    manifest = ("track_id,uri,labels,artist,album\n"
                "ta,audio/a.mp3,rock,  The Band ,First\n"
                f"tb,{cat / 'audio/b.flac'},jazz,,\n"
                "tb,audio/a.mp3,dup,Dup Artist,\n"
                ",audio/a.mp3,no-id,x,y\n"
                "tc,,no-uri,,\n"
                "td,audio/missing.ogg,gone,,Lost Album\n")
    (cat / "manifest.csv").write_text(manifest)
    cfg = _config(tmp_path).replace(**{"ingest.source": str(cat / "manifest.csv")})
    summary = run_stage(spark, cfg, "ingest")
    wh = lake(cfg)
    mels = read_pandas(wh, "mels").set_index("track_id")
    assert sorted(mels.index) == ["ta", "tb"]
    assert mels.loc["ta", "labels"] == "rock" and mels.loc["tb", "labels"] == "jazz"
    assert mels.loc["ta", "source_uri"] == str(cat / "audio/a.mp3")
    rej = read_pandas(wh, "ingest_rejects")
    assert sorted(rej["reason"]) == ["bad_manifest_row", "bad_manifest_row", "duplicate_track_id", "source_missing"]
    assert set(rej.loc[rej.reason == "source_missing", "track_id"]) == {"td"}
    assert summary["rejected"] == {"bad_manifest_row": 2, "duplicate_track_id": 1, "source_missing": 1}
    # track_metadata: the first row of each listed id that names an artist or album, trimmed,
    # blank = null (a duplicate row's artist is not taken; a missing file's metadata is kept)
    meta = read_pandas(wh, "track_metadata").set_index("track_id")
    assert sorted(meta.index) == ["ta", "td"]
    assert meta.loc["ta", "artist"] == "The Band" and meta.loc["ta", "album"] == "First"
    assert meta.loc["td", "artist"] is None and meta.loc["td", "album"] == "Lost Album"
    assert summary["track_metadata"]["with_artist"] == 1 and summary["track_metadata"]["albums"] == 2
    # An edited manifest: the metadata follows at once, no audio is decoded again.
    (cat / "manifest.csv").write_text(manifest.replace("  The Band ,First", "Another Band,").replace(
        f"tb,{cat / 'audio/b.flac'},jazz,,", f"tb,{cat / 'audio/b.flac'},jazz,Trio,"))
    again = run_stage(spark, cfg, "ingest")
    assert again["ingested"] == 0 and again["skipped_unchanged"] == 2
    assert len(read_pandas(wh, "ingest_rejects")) == 4
    meta = read_pandas(wh, "track_metadata").set_index("track_id")
    assert meta.loc["ta", "artist"] == "Another Band" and meta.loc["ta", "album"] is None
    assert meta.loc["tb", "artist"] == "Trio" and len(meta) == 3
    # The same manifest again: no commit, so the stages reading track_metadata can skip.
    version = wh.version("track_metadata")
    third = run_stage(spark, cfg, "ingest")
    assert third["track_metadata"]["table"] == "unchanged" and wh.version("track_metadata") == version


@pytest.mark.s3
@pytest.mark.slow
def test_ingest_from_s3_through_the_cli(tmp_path, s3_bucket):
    """The operator's path: `python -m deepcuts ingest` on an s3:// prefix, credentials from the env."""
    client, bucket = s3_bucket
    for i, ext in enumerate([".mp3", ".flac"]):
        client.put_object(Bucket=bucket, Key=f"music/{i}{ext}",
                          Body=write_audio(tmp_path / f"src{i}{ext}", seconds=5.0, seed=i).read_bytes())
    client.put_object(Bucket=bucket, Key="music/broken.mp3", Body=b"")
    wh_root = tmp_path / "wh"
    args = [sys.executable, "-m", "deepcuts", "ingest", "--set", f"ingest.source=s3://{bucket}/music",
            "--set", f"warehouse.root={wh_root}", "--set", "ingest.excerpt_seconds=4.0",
            "--set", f"spark.checkpoint_dir={tmp_path / 'ckpt'}"]
    env = {**os.environ, "SPARK_MASTER": "local[2]"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ingested" in done.stdout and "empty_file=1" in done.stdout
    assert "testing" not in done.stdout + done.stderr.replace("AWS_ACCESS_KEY_ID", "")  # no secrets logged
    wh = Lake(str(wh_root))
    mels = read_pandas(wh, "mels")
    assert sorted(mels["track_id"]) == ["0.mp3", "1.flac"]
    assert all(u.startswith(f"s3://{bucket}/music/") for u in mels["source_uri"])
    assert list(read_pandas(wh, "ingest_rejects")["reason"]) == ["empty_file"]
