"""Hostile inputs to whole stages (issue 15): each ends in its documented outcome and exit
code with a message, never a stack trace of a bug, and publishes nothing (or, where the stage
can go on, everything with counts that add up to its input).  In-process on the shared session
(the CLI maps the same exceptions to exit codes: ``cli.exit_code_of``); the bad configurations
through ``cli.main`` itself, which refuses them before Spark starts."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import copy_chain, make_config, run_stage
from deepcuts.core.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_INPUT, exit_code_of, main, one_line
from deepcuts.core.lake import lake, read_pandas

pytestmark = [pytest.mark.spark]


def _outcome(spark, cfg, stage):
    with pytest.raises(Exception) as info:
        run_stage(spark, cfg, stage)
    return exit_code_of(info.value), str(info.value)


def test_a_catalogue_with_no_files_is_input_missing(spark, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = make_config(tmp_path, ingest__source=str(tmp_path / "empty"))
    code, message = _outcome(spark, cfg, "ingest")
    assert code == EXIT_INPUT and "lists no audio files" in message and "nothing was published" in message
    assert not lake(cfg).exists("mels")


@pytest.mark.parametrize("case", ["no rows", "every track unknown"])
def test_plays_with_nothing_usable_are_input_missing(spark, tmp_path, case):
    from test_factors import commit_mels
    plays = tmp_path / "plays.parquet"
    if case == "no rows":
        pd.DataFrame({"user_id": pd.Series([], dtype=str), "track_id": pd.Series([], dtype=str),
                      "plays": pd.Series([], dtype=float)}).to_parquet(plays)
    else:
        pd.DataFrame({"user_id": ["u1", "u2", "u3"], "track_id": ["x1", "x2", "x1"],
                      "plays": [3.0, 1.0, 2.0]}).to_parquet(plays)
    cfg = make_config(tmp_path, factors__plays=str(plays), factors__unknown_tracks="reject",
                      factors__rank=4, factors__iterations=2, spark__shuffle_partitions=2)
    commit_mels(cfg, [101, 102])                        # the catalogue knows other tracks only
    code, message = _outcome(spark, cfg, "factors")
    assert code == EXIT_INPUT and "no usable play rows" in message, message
    assert not lake(cfg).exists("track_factors") and not lake(cfg).exists("user_factors")
    failed = read_pandas(lake(cfg), "runs").iloc[-1]
    assert failed["status"] == "failed" and failed["error"].startswith("input missing: InputMissing: "), failed
    if case == "every track unknown":
        assert "unknown_track" in message                 # the rejects are counted in the message
        rejects = read_pandas(lake(cfg), "plays_rejects")   # ... and kept, for the operator to fix
        assert sorted(rejects["user_id"]) == ["u1", "u2", "u3"] and set(rejects["reason"]) == {"unknown_track"}
        assert dict(failed["tables_written"]) == {"plays_rejects": 0}
    else:
        assert not lake(cfg).exists("plays_rejects")


def _plays(path, rows):
    pd.DataFrame(rows, columns=["user_id", "track_id", "plays"]).astype({"plays": float}).to_parquet(path)
    return str(path)


def test_users_with_a_single_play_get_factors_and_the_counts_add_up(spark, tmp_path):
    from test_factors import commit_mels
    tracks = [f"t{i}" for i in range(12)]
    rows = [(f"once-{n}", tracks[n % 12], 1 + n % 3) for n in range(30)]             # one play each
    rows += [(f"fan-{u}", t, 2) for u in range(6) for t in tracks]                   # a few heavy users
    rows += [("once-x", "not-in-mels", 1), ("once-y", "t1", -4)]                      # two rejects
    cfg = make_config(tmp_path, factors__plays=_plays(tmp_path / "plays.parquet", rows),
                      factors__unknown_tracks="reject", factors__rank=4, factors__iterations=3,
                      factors__evaluate=False, spark__shuffle_partitions=2)
    commit_mels(cfg, tracks)
    summary = run_stage(spark, cfg, "factors")
    assert summary["input_rows"] == len(rows)
    assert sum(summary["rejected_rows"].values()) == 2 and summary["pairs"] == len(rows) - 2, summary
    users = read_pandas(lake(cfg), "user_factors")
    assert set(users["user_id"]) == {f"once-{n}" for n in range(30)} | {f"fan-{u}" for u in range(6)}
    assert np.isfinite(np.stack(users["factors"].to_numpy())).all()
    rejects = read_pandas(lake(cfg), "plays_rejects")
    assert sorted(rejects["user_id"]) == ["once-x", "once-y"]


def test_a_catalogue_where_every_track_is_cold_trains_no_model_and_says_why(spark, demo_chain, tmp_path):
    # Plays exist, but only of tracks the catalogue does not hold (kept: they may be ingested
    # later): ALS fits them, and no ingested track has factors to learn from.
    warehouse = tmp_path / "warehouse"
    shutil.copytree(demo_chain.root / "warehouse" / "mels", warehouse / "mels")
    rows = [(f"u{u}", f"elsewhere-{t}", 1 + (u * t) % 4) for u in range(40) for t in range(10) if (u + t) % 3]
    cfg = demo_chain.cfg.replace(**{"warehouse.root": str(warehouse), "spark.checkpoint_dir": str(tmp_path / "ck"),
                                    "factors.plays": _plays(tmp_path / "plays.parquet", rows),
                                    "factors.evaluate": False, "factors.rank": 4, "factors.iterations": 2})
    summary = run_stage(spark, cfg, "factors")
    assert summary["tracks_with_factors"] == 10 and summary["unknown_tracks"].startswith("kept")
    code, message = _outcome(spark, cfg, "train")
    assert code == EXIT_INPUT and "the training set is empty" in message, message
    assert not (warehouse / "models").exists() or not any((warehouse / "models").iterdir())
    code, message = _outcome(spark, cfg, "infer")                 # a cold-start backfill needs a model
    assert code == EXIT_INPUT and "no trained model" in message, message
    assert not lake(cfg).exists("serving_factors")


def test_a_corrupted_model_is_refused_by_name_and_nothing_is_served(spark, demo_chain, tmp_path):
    from deepcuts.nn.model import latest_model_id, model_dir
    chain = copy_chain(demo_chain, tmp_path)
    lk = lake(chain.cfg)
    model_id = latest_model_id(lk)
    weights = f"{model_dir(lk, model_id)}/model.pt"
    with open(weights, "r+b") as fh:                       # one flipped byte half way in
        fh.seek(fh.seek(0, 2) // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    before = {t: lk.version(t) for t in ("predicted_factors", "serving_factors")}
    for stage in ("infer", "evaluate"):
        code, message = _outcome(spark, chain.cfg, stage)
        assert code == EXIT_INPUT and model_id in message and "corrupted or truncated" in message, message
    assert {t: lk.version(t) for t in before} == before


def test_a_model_of_another_rank_is_refused_by_name(spark, demo_chain, tmp_path):
    from deepcuts.nn.model import latest_model_id
    chain = copy_chain(demo_chain, tmp_path)
    refit = chain.cfg.replace(**{"factors.rank": 8, "factors.iterations": 2, "factors.evaluate": False,
                                 "factors.align": False})
    run_stage(spark, refit, "factors")                   # tonight's factors: rank 8, the model predicts 16
    before = lake(refit).version("serving_factors")
    code, message = _outcome(spark, refit, "infer")
    assert code == EXIT_CONFIG, message
    assert f"model {latest_model_id(lake(refit))} predicts 16 factors but track_factors has rank 8" in message
    assert lake(refit).version("serving_factors") == before


def test_a_python_worker_that_dies_fails_the_stage_with_a_clear_line_and_publishes_nothing(spark, demo_chain,
                                                                                           tmp_path):
    # Local mode has no task retries (the cluster tier shows the retry): the stage must fail
    # cleanly, say why in one line, and leave the served tables as they were.
    chain = copy_chain(demo_chain, tmp_path)
    lk = lake(chain.cfg)
    before = {t: lk.version(t) for t in ("predicted_factors", "serving_factors")}
    crash = {"infer.incremental": False, "faults.crash_once": ["infer.score"],
             "faults.state_dir": str(tmp_path / "faults")}
    with pytest.raises(Exception) as info:
        run_stage(spark, chain.cfg.replace(**crash), "infer")
    line = one_line(info.value)
    assert exit_code_of(info.value) == EXIT_FAILED
    assert line.startswith("Spark job aborted: Task ") and "Python worker exited unexpectedly" in line, line
    assert {t: lk.version(t) for t in before} == before
    runs = read_pandas(lk, "runs")
    failed = runs[(runs["stage"] == "infer") & (runs["status"] == "failed")]
    assert len(failed) == 1 and failed["error"].iloc[0].startswith("stage failed: Spark job aborted: ")


@pytest.mark.parametrize("setting, reason", [
    ("factors.rank=-3", "factors.rank = -3: expected int; >= 1"),
    ("factors.rnak=3", "unknown key factors.rnak"),
    ("train.epochs='ten'", "train.epochs = 'ten': expected int"),
    ("infer.serving='best'", "infer.serving = 'best': expected str; one of 'blend', 'threshold'"),
    ("warehouse.root=''", "warehouse.root is empty"),
    ("ingest.source=''", "ingest.source is empty"),
    ("nosuchsection.key=1", "nosuchsection"),
    ("faults.crash_once=['infer.score']", "faults.crash_once needs faults.state_dir"),
    ("warehouse.root='s3://deepcuts-nightly/wh'", "warehouse.root is on S3"),
])
def test_a_bad_configuration_is_exit_2_in_one_line_before_anything_starts(setting, reason, tmp_path, capsys,
                                                                           monkeypatch):
    # No credentials anywhere in the AWS chain (the S3 case): no variables, no files, no role.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)                           # ./warehouse would appear here
    code = main("nightly", ["--set", setting, "--set", f"demo.out_dir={tmp_path / 'demo'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_CONFIG
    assert len(err) == 1 and err[0].startswith("deepcuts nightly: configuration error: ") and reason in err[0], err
    assert not any(tmp_path.iterdir())                        # nothing written: no warehouse, no demo
