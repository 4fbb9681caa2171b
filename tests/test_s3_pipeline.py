"""The S3 tier: the whole pipeline with the warehouse on a real S3 endpoint on loopback
(moto), the catalogue's audio read from the bucket, the model artifact written there, and
no secret in any log line."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest

from conftest import SMALL_DEMO
from deepcuts.core.registry import NIGHTLY

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.spark]

# The smallest settings that still run every stage's code path on S3 (the quality of what
# they produce is the other tiers' business): a tiny net, no cold-start protocol (the
# evaluate stage still scores the validation split), a small codebook.
TINY = {"train.conv_channels": "[16, 16]", "train.pool_sizes": "[4, 2]", "train.dense_units": "32",
        "train.epochs": "2", "train.batch_size": "16", "factors.iterations": "4", "factors.rank": "8",
        "factors.evaluate": "false", "baseline.codebook_size": "16", "baseline.kmeans_frames_per_track": "20",
        "baseline.kmeans_iterations": "5", "neighbours.top_n": "5"}


def test_whole_pipeline_with_the_warehouse_on_s3(tmp_path, demo_root, s3_bucket):
    client, bucket = s3_bucket
    catalogue = demo_root / "demo" / "catalogue"
    rows = list(csv.DictReader(open(catalogue / "manifest.csv")))
    for row in rows:
        client.upload_file(str(catalogue / row["uri"]), bucket, f"audio/{row['uri']}")
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=list(rows[0]))   # the demo manifest's columns, artist too
        out.writeheader()
        for row in rows:
            out.writerow({**row, "uri": f"s3://{bucket}/audio/{row['uri']}"})
    settings = {**{k: v for k, v in SMALL_DEMO.items() if not k.startswith("demo.")}, **TINY,
                "warehouse.root": f"s3://{bucket}/warehouse", "ingest.source": str(manifest),
                "ingest.allowed_roots": f'["s3://{bucket}/audio"]',
                "factors.plays": str(demo_root / "demo" / "plays.parquet")}
    args = [sys.executable, "-m", "deepcuts", "pipeline"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    started = time.time()
    done = subprocess.run(args, capture_output=True, text=True, timeout=2400,
                          env={**os.environ, "SPARK_MASTER": "local[2]"})
    seconds = time.time() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for stage in NIGHTLY:
        assert f"=== deepcuts {stage}: done" in done.stdout
    log = done.stdout + done.stderr
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in log
    print(f"S3 pipeline: {seconds:.0f} s")

    from deepcuts.core.lake import Lake, read_pandas
    lk = Lake(f"s3://{bucket}/warehouse")
    mels = read_pandas(lk, "mels")
    assert len(mels) + len(read_pandas(lk, "ingest_rejects")) == len(rows)
    assert all(u.startswith(f"s3://{bucket}/audio/") for u in mels["source_uri"])
    named = {r["track_id"] for r in rows if r.get("artist")}
    assert named and set(read_pandas(lk, "track_metadata")["track_id"]) == named
    serving = read_pandas(lk, "serving_factors")
    assert serving["track_id"].is_unique and set(mels["track_id"]) <= set(serving["track_id"])
    runs = read_pandas(lk, "runs")
    assert set(runs["stage"]) == set(NIGHTLY) and (runs["status"] == "succeeded").all()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="warehouse/models/")["Contents"]]
    assert any(k.endswith("/model.pt") for k in keys) and "warehouse/models/LATEST" in keys
    assert any(k.startswith("warehouse/mels/_delta_log/") for k in
               (o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="warehouse/mels/")["Contents"]))
