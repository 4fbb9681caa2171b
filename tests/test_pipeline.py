"""The operator's nightly job through its CLI, `python -m deepcuts nightly`, on a copy of the
session's demo chain: the stages that follow a new night's ingest, their run table, exit code
and summary JSON, then the same night again (which skips what has not changed).  The whole
NIGHTLY order through the CLI from an empty warehouse is tests/test_s3_pipeline.py."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import cli_args, copy_chain
from deepcuts.core.lake import Lake, read_pandas

pytestmark = [pytest.mark.slow, pytest.mark.spark]

STAGES = ("ingest", "infer", "neighbours", "report")


def _run_nightly(root, settings, *extra):
    summary_file = root / f"summary-{len(list(root.glob('summary-*.json')))}.json"
    args = [sys.executable, "-m", "deepcuts", "nightly", "--summary-json", str(summary_file),
            "--stages", ",".join(STAGES)]
    args += cli_args(settings)
    env = {**os.environ, "SPARK_MASTER": "local[2]"}
    done = subprocess.run(args + list(extra), capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout, json.loads(summary_file.read_text())


@pytest.fixture(scope="module")
def nightly(demo_chain, tmp_path_factory):
    chain = copy_chain(demo_chain, tmp_path_factory.mktemp("pipeline"))
    first, first_summary = _run_nightly(chain.root, chain.settings)
    wh = Lake(str(chain.root / "warehouse"))
    tables = {name: read_pandas(wh, name) for name in
              ("mels", "track_factors", "user_factors", "predicted_factors", "serving_factors",
               "evaluation_results", "ingest_rejects")}
    second, second_summary = _run_nightly(chain.root, chain.settings)
    return {"root": chain.root, "demo": chain.cfg.demo.out_dir, "wh": wh, "first": first, "second": second,
            "tables": tables, "first_summary": first_summary, "second_summary": second_summary}


def test_every_stage_ran_and_printed_its_summary(nightly):
    for stage in STAGES:
        assert f"=== deepcuts {stage}: done" in nightly["first"]
    summary = nightly["first_summary"]
    assert summary["exit_code"] == 0 and summary["gates_failed"] == []
    # The chain ran in-process under another config: nothing is skipped on the CLI's first night.
    assert {s: o["status"] for s, o in summary["outcomes"].items() if s in STAGES} == {s: "ok" for s in STAGES}
    assert "retention" in summary["outcomes"]
    assert "=== deepcuts nightly: exit 0 (ok)" in nightly["first"]


def test_every_ingested_track_gets_exactly_one_serving_row(nightly):
    t = nightly["tables"]
    manifest = pd.read_csv(os.path.join(nightly["demo"], "catalogue", "manifest.csv"))
    assert len(t["mels"]) + len(t["ingest_rejects"]) == len(manifest)
    assert len(t["mels"]) >= 0.95 * len(manifest)
    serving = t["serving_factors"]
    assert serving["track_id"].is_unique and set(serving["track_id"]) == set(t["mels"]["track_id"])
    usage = set(serving.loc[serving["source"] == "usage", "track_id"])
    assert usage <= set(t["track_factors"]["track_id"])
    assert serving["source"].isin(["audio", "metadata"]).any() and usage
    assert set(t["predicted_factors"]["track_id"]) == set(t["mels"]["track_id"])


def test_a_second_night_skips_unchanged_work_and_changes_nothing(nightly):
    assert "skipped_unchanged" in nightly["second"]
    outcomes = nightly["second_summary"]["outcomes"]
    assert outcomes["ingest"]["status"] == "ok"          # ingest always looks at its sources
    for stage in ("infer", "neighbours"):                # same tables, config, code and model
        assert outcomes[stage]["status"] == "skipped", outcomes
        assert "inputs unchanged since run" in nightly["second_summary"]["stages"][stage]["skipped"]
    runs = read_pandas(nightly["wh"], "runs")
    assert set(runs.loc[runs["status"] == "skipped", "stage"]) >= {"infer", "neighbours"}
    wh = nightly["wh"]
    again = read_pandas(wh, "serving_factors")
    before = nightly["tables"]["serving_factors"]
    assert len(again) == len(before) and again["track_id"].is_unique
    assert set(again["track_id"]) == set(before["track_id"])
    assert len(read_pandas(wh, "mels")) == len(nightly["tables"]["mels"])
