"""The nightly job's decisions as pure functions: training due, promotion, gates, skipping."""
from datetime import datetime, timedelta, timezone

import pytest

from deepcuts.core.gates import failed_gates, reject_rate, unchanged_since
from deepcuts.nn.promotion import comparable, promote, training_due

NOW = datetime(2026, 12, 2, tzinfo=timezone.utc)


def served(days_old=1.0, **extra):
    return {"model_id": "cnn-1", "target": "factors", "target_column": "factors_unit", "n_mels": 96,
            "n_outputs": 32, "created_at": (NOW - timedelta(days=days_old)).isoformat(),
            "trained_on": {"catalogue_tracks": 1000, "factor_tracks": 800}, **extra}


def due(current, **kw):
    args = dict(target="factors", space="current", every_days=7, change_fraction=0.1, catalogue_tracks=1000,
                factor_tracks=800, now=NOW)
    return training_due(current, **{**args, **kw})


def test_training_due_for_each_reason_and_not_otherwise():
    assert due(None).due and "no served model" in due(None).reason
    assert due(served(), target="labels").due
    assert due(served(), space="other").due
    assert due(served(), every_days=0).due
    assert due(served(days_old=8)).due and "8.0 days old" in due(served(days_old=8)).reason
    assert due(served(), catalogue_tracks=1200).due and "20.0 %" in due(served(), catalogue_tracks=1200).reason
    assert due(served(), factor_tracks=700).due
    quiet = due(served(), catalogue_tracks=1050, space="aligned")
    assert not quiet.due and quiet.reason.startswith("not due")


def test_promotion_gate():
    assert promote(0.50, 0.50, 0.02, "cnn-1").promoted
    assert promote(0.509, 0.50, 0.02, "cnn-1").promoted                  # within tolerance
    lost = promote(0.52, 0.50, 0.02, "cnn-1")
    assert not lost.promoted and lost.decision == "kept, not served" and "cnn-1" in lost.reason
    assert promote(0.9, None, 0.02, None, "no served model").promoted
    new = served()
    assert comparable(None, new, "current") == "no served model"
    assert comparable(served(), new, "aligned") is None
    assert "n_outputs" in comparable(served(n_outputs=64), new, "current")
    assert "space" in comparable(served(), new, "other")


def test_reject_rate_gate():
    ingest = {"ingested": 90, "rejected": {"corrupt": 5, "too_short": 5}}
    assert reject_rate("ingest", ingest) == (pytest.approx(0.1), 10, 100)
    assert failed_gates("ingest", ingest, 0.2) == []
    [line] = failed_gates("ingest", ingest, 0.05)
    assert "rejected 10 of 100" in line and "max_reject_rate" in line
    assert failed_gates("factors", {"input_rows": 1000, "rejected_rows": {"malformed": 1}}, 0.0)
    assert failed_gates("train", {"gate_failed": "model cnn-2 not promoted"}, 0.05) == [
        "train: model cnn-2 not promoted"]
    assert reject_rate("infer", {"rejected": {"x": 1}}) is None


def test_unchanged_since():
    last = {"run_id": "infer-1", "config_hash": "c", "code_version": "v", "input_fingerprint": "model m1",
            "tables_read": {"mels": 3, "track_factors": 5}, "tables_written": {"serving_factors": 7}}
    same = dict(config_hash="c", code_version="v", fingerprint="model m1",
                current_reads={"mels": 3, "track_factors": 5}, current_writes={"serving_factors": 7})
    assert "infer-1" in unchanged_since(last, **same)
    assert unchanged_since(None, **same) is None
    assert unchanged_since(last, **{**same, "fingerprint": "model m2"}) is None
    assert unchanged_since(last, **{**same, "config_hash": "d"}) is None
    assert unchanged_since(last, **{**same, "current_reads": {"mels": 4, "track_factors": 5}}) is None
    assert unchanged_since(last, **{**same, "current_writes": {"serving_factors": 8}}) is None
    assert unchanged_since(last, **{**same, "current_reads": {"mels": 3, "track_factors": 5,
                                                               "baseline_factors": 0}}) is None


def test_retention_plan_keeps_the_newest_and_the_served_model():
    from deepcuts.core.retention import plan, prune
    entries = [("m1", 1.0), ("m2", 2.0), ("m3", 3.0), ("m4", 4.0)]
    assert plan(entries, 2) == ["m2", "m1"]
    assert plan(entries, 2, protect={"m1"}) == ["m2"]
    assert plan(entries, 10) == []


def test_prune_removes_old_folders_only(tmp_path):
    import os
    from deepcuts.core.retention import prune
    for i, name in enumerate(["a", "b", "c", "_checkpoints"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "LATEST").write_text("a")
    assert prune(str(tmp_path), 1, protect={"a"}, skip={"_checkpoints"}) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "_checkpoints", "a", "c"]
