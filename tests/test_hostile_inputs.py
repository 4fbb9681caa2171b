"""Hostile inputs to whole stages (issue 15): each ends in its documented outcome and exit
code with a message, never a stack trace of a bug, and publishes nothing.  In-process on the
shared session (the CLI maps the same exceptions to exit codes: ``cli.exit_code_of``)."""
from __future__ import annotations

import pandas as pd
import pytest

from conftest import make_config, run_stage
from deepcuts.core.cli import EXIT_INPUT, exit_code_of
from deepcuts.core.lake import lake

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
    if case == "every track unknown":
        assert "unknown_track" in message                 # the rejects are counted in the message
