"""The operator's nightly job: one latent space across refits, the promotion gate, exit codes
and quality gates (issue 14).  Real Spark, real Delta tables, the shared demo chain."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from audio_fixtures import write_audio
from conftest import cli_args, copy_chain, run_stage
from deepcuts.core.errors import GateFailed
from deepcuts.core.lake import Lake, lake, read_pandas
from deepcuts.nn.model import latest_model_id

pytestmark = [pytest.mark.spark]


def _vectors(frame):
    return {t: np.asarray(v, np.float64) for t, v in zip(frame["track_id"], frame["factors"])}


@pytest.mark.slow
def test_a_refit_is_rotated_onto_the_last_fit_and_the_old_model_still_serves(spark, demo_chain, tmp_path):
    chain = copy_chain(demo_chain, tmp_path)
    lk = lake(chain.cfg)
    before = read_pandas(lk, "track_factors")
    model_id = latest_model_id(lk)
    refit_cfg = chain.cfg.replace(**{"factors.seed": 7, "factors.evaluate": False})
    refit = run_stage(spark, refit_cfg, "factors")
    alignments = read_pandas(lk, "factor_alignments")
    row = alignments[alignments["factors_run_id"] == refit["run_id"]].iloc[0]
    assert row["aligned_to_run_id"] == demo_chain.summaries["factors"]["run_id"]
    rotation = np.asarray(row["rotation"], np.float64).reshape(row["rank"], row["rank"])
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(row["rank"]), atol=1e-4)
    # Another seed turns the factors; the rotation brings them back (the residual is what a
    # rotation cannot explain), measured the same way from the published tables.
    assert row["residual"] < 0.6 * row["unaligned_residual"], row
    after = _vectors(read_pandas(lk, "track_factors"))
    prev = _vectors(before)
    shared = sorted(set(after) & set(prev))
    a, b = np.stack([after[t] for t in shared]), np.stack([prev[t] for t in shared])
    assert np.linalg.norm(a - b) / np.linalg.norm(b) == pytest.approx(row["residual"], rel=0.02, abs=1e-3)

    served = run_stage(spark, refit_cfg, "infer")
    assert served["model_id"] == model_id and served["model_space"] == "aligned"

    # A fit that starts a new space (alignment off): the old model is refused, by name.
    run_stage(spark, refit_cfg.replace(**{"factors.align": False}), "factors")
    with pytest.raises(GateFailed, match=f"model {model_id} learnt ALS factors run"):
        run_stage(spark, refit_cfg, "infer")
    # The manifest row says it was a gate, so the report lists it with the run's failed gates.
    from deepcuts.report.model import run_gates
    refused = read_pandas(lk, "runs").sort_values("ended_at").iloc[-1].to_dict()
    assert refused["stage"] == "infer" and refused["status"] == "failed"
    assert run_gates([refused], 0.05, nightly=False) == [f"infer: {refused['error'].split(': ', 1)[1]}"]
    assert f"model {model_id} learnt ALS factors run" in run_gates([refused], 0.05, nightly=False)[0]
    # ... and the train stage's policy knows it is due.
    from deepcuts.cf.align import current_lineage, model_space
    from conftest import stage_context
    from deepcuts.core.tables import FACTOR_ALIGNMENTS, TRACK_FACTORS
    from deepcuts.stages.train import served_model
    current, chain_runs = current_lineage(stage_context(spark, refit_cfg, "train"), TRACK_FACTORS, FACTOR_ALIGNMENTS)
    assert model_space(served_model(lk)[1]["factors_run_id"], current, chain_runs) == "other"


@pytest.mark.slow
def test_a_worse_model_is_kept_but_not_served(spark, demo_chain, tmp_path):
    from deepcuts.core.gates import failed_gates
    chain = copy_chain(demo_chain, tmp_path)
    lk = lake(chain.cfg)
    served_before = latest_model_id(lk)
    worse = chain.cfg.replace(**{"train.epochs": 1, "train.learning_rate": 1e-7, "train.promotion_tolerance": 0.0,
                                 "train.require_promotion": True})
    summary = run_stage(spark, worse, "train")
    promotion = summary["promotion"]
    assert promotion["decision"] == "kept, not served", promotion
    assert promotion["current_model"] == served_before
    assert promotion["new_validation_loss"] > promotion["current_validation_loss"]
    assert latest_model_id(lk) == served_before                       # still the served model
    assert (tmp_path / "warehouse" / "models" / summary["model_id"] / "meta.json").is_file()   # kept
    assert failed_gates("train", summary, 0.05) == [f"train: {summary['gate_failed']}"]

    # Not due: a served model younger than the policy's age and an unchanged catalogue.
    skipped = run_stage(spark, worse.replace(**{"train.retrain_every_days": 7}), "train")
    assert skipped["skipped"].startswith("not due: served model " + served_before)


def _nightly(root, settings, *extra, timeout=600):
    summary = root / "summary.json"
    args = [sys.executable, "-m", "deepcuts", "nightly", "--summary-json", str(summary)]
    args += cli_args(settings)
    env = {**os.environ, "SPARK_MASTER": "local[2]"}
    done = subprocess.run(args + list(extra), capture_output=True, text=True, env=env, timeout=timeout)
    return done, (json.loads(summary.read_text()) if summary.exists() else None)


def test_a_bad_config_value_is_exit_2_in_one_line(tmp_path):
    done, summary = _nightly(tmp_path, {"factors.rank": -3})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "configuration error" in done.stderr and "factors.rank" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_missing_plays_is_exit_3_and_too_many_rejects_is_exit_4(tmp_path):
    catalogue = tmp_path / "catalogue"
    for i in range(3):
        write_audio(catalogue / f"good{i}.wav", seconds=4.0, seed=i)
    (catalogue / "broken.mp3").write_bytes(b"<html>not audio</html>" * 50)
    settings = {"warehouse.root": str(tmp_path / "warehouse"), "ingest.source": str(catalogue),
                "spark.checkpoint_dir": str(tmp_path / "ckpt"), "spark.shuffle_partitions": 2,
                "ingest.partitions": 2, "ingest.excerpt_seconds": 3.0,
                "factors.plays": str(tmp_path / "no-such-plays.parquet"), "nightly.max_reject_rate": 0.2}
    done, summary = _nightly(tmp_path, settings, "--stages", "ingest,factors,train")
    # ingest rejected 1 of 4 files (25 % > 20 %): a gate; then factors has no plays: exit 3 wins.
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["outcomes"]["ingest"]["status"] == "gate failed"
    assert summary["outcomes"]["factors"]["status"] == "input missing"
    assert "no-such-plays.parquet does not exist" in summary["stages"]["factors"]["error"]
    assert "train" not in summary["outcomes"]                          # nothing runs on a missing input
    assert "Traceback" not in done.stderr
    assert any("rejected 1 of 4 input items" in g for g in summary["gates_failed"])

    done, summary = _nightly(tmp_path, {**settings, "nightly.max_reject_rate": 0.1}, "--stages", "ingest")
    # the broken file is still rejected (unchanged, not re-decoded): 0 of 0 items tonight, no gate
    assert done.returncode == 0, done.stderr[-3000:]
    (catalogue / "broken2.mp3").write_bytes(b"<html>not audio either</html>" * 50)
    done, summary = _nightly(tmp_path, {**settings, "nightly.max_reject_rate": 0.1}, "--stages", "ingest")
    assert done.returncode == 4, done.stdout[-3000:] + done.stderr[-3000:]
    assert "=== deepcuts nightly: exit 4 (quality gate failed)" in done.stdout
    assert "GATE FAILED ingest: rejected 1 of 1 input items" in done.stdout
    assert len(read_pandas(Lake(settings["warehouse.root"]), "mels")) == 3   # the good files are published
