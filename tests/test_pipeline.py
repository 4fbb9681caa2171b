"""The operator's nightly run, end to end: `python -m deepcuts pipeline` on a small demo
catalogue (every stage of the registry's NIGHTLY order), then the same night again."""
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import SMALL_DEMO
from deepcuts.core.registry import NIGHTLY
from deepcuts.core.lake import Lake, read_pandas

pytestmark = [pytest.mark.slow, pytest.mark.spark]

SMALL_MODEL = {"train.conv_channels": "[32, 32, 32]", "train.dense_units": "64", "train.epochs": "4",
               "train.batch_size": "16", "train.patience": "2"}


def _run_pipeline(root, *extra):
    settings = {**SMALL_DEMO, **SMALL_MODEL,
                "warehouse.root": str(root / "warehouse"), "demo.out_dir": str(root / "demo"),
                "ingest.source": str(root / "demo" / "catalogue" / "manifest.csv"),
                "factors.plays": str(root / "demo" / "plays.parquet"),
                "spark.checkpoint_dir": str(root / "checkpoints")}
    args = [sys.executable, "-m", "deepcuts", "pipeline"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    env = {**os.environ, "SPARK_MASTER": "local[2]"}
    done = subprocess.run(args + list(extra), capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    demo = subprocess.run([sys.executable, "-m", "deepcuts", "demo-catalogue",
                           "--set", f"demo.out_dir={root / 'demo'}"] + [a for k, v in SMALL_DEMO.items()
                                                                      if k.startswith("demo.")
                                                                      for a in ("--set", f"{k}={v}")],
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    first = _run_pipeline(root)
    wh = Lake(str(root / "warehouse"))
    tables = {name: read_pandas(wh, name) for name in
              ("mels", "track_factors", "user_factors", "predicted_factors", "serving_factors",
               "evaluation_results", "ingest_rejects")}
    second = _run_pipeline(root, "--stages", "ingest,infer")
    return {"root": root, "wh": wh, "first": first, "second": second, "tables": tables}


def test_every_stage_ran_and_printed_its_summary(nightly):
    for stage in NIGHTLY:
        assert f"=== deepcuts {stage}: done" in nightly["first"]


def test_every_ingested_track_gets_exactly_one_serving_row(nightly):
    t = nightly["tables"]
    manifest = pd.read_csv(nightly["root"] / "demo" / "catalogue" / "manifest.csv")
    assert len(t["mels"]) + len(t["ingest_rejects"]) == len(manifest)
    assert len(t["mels"]) >= 0.95 * len(manifest)
    serving = t["serving_factors"]
    assert serving["track_id"].is_unique and set(serving["track_id"]) == set(t["mels"]["track_id"])
    usage = set(serving.loc[serving["source"] == "usage", "track_id"])
    assert usage <= set(t["track_factors"]["track_id"])
    assert (serving["source"] == "audio").any() and usage
    assert set(t["predicted_factors"]["track_id"]) == set(t["mels"]["track_id"])


def test_a_second_night_skips_unchanged_work_and_changes_nothing(nightly):
    assert "skipped_unchanged" in nightly["second"]
    wh = nightly["wh"]
    again = read_pandas(wh, "serving_factors")
    before = nightly["tables"]["serving_factors"]
    assert len(again) == len(before) and again["track_id"].is_unique
    assert set(again["track_id"]) == set(before["track_id"])
    assert len(read_pandas(wh, "mels")) == len(nightly["tables"]["mels"])
