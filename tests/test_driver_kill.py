"""The driver killed mid-stage (issue 15): ``./spark-submit.sh <stage>`` is SIGKILLed while its
tasks (or its training loop) are half way, as ``kill -9`` or a lost client machine would.

Each test stalls the stage at a fault point (``faults.stall_once``: the first task to get there
writes its marker and sleeps), SIGKILLs the spark-submit JVM once the marker is there, and
checks: every process the submission started is gone (the Python driver follows its JVM:
``core.spark.follow_launcher``; the Python workers their daemon); the tables are exactly the
versions before the kill; the rerun completes them, nothing duplicated, nothing lost (row sets
compared with the session's uninterrupted chain).  Training resumes from its last checkpoint and
ends with the configured number of epochs."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_args, copy_chain, run_stage
from deepcuts.core.lake import lake, read_pandas

pytestmark = [pytest.mark.spark, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _processes_under(pid: int) -> set[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += children.get(p, [])
    return found


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(p)
    return out


def submit_and_kill(job: str, settings: dict, marker: Path, log: Path, timeout: float = 420) -> None:
    """Submit ``job`` in local mode, SIGKILL its spark-submit JVM once ``marker`` exists, and
    assert that every process it started is gone within 30 s."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(ROOT / "spark-submit.sh"), job, *cli_args(settings), "--", "--master", "local[2]"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not marker.exists():
            assert proc.poll() is None, f"{job} ended ({proc.returncode}) before the fault point:\n" \
                                        + log.read_text()[-4000:]
            assert time.time() < deadline, f"{job} never reached {marker.name}:\n" + log.read_text()[-4000:]
            time.sleep(0.5)
        tree = _processes_under(proc.pid)
        assert len(tree) >= 2, tree          # the JVM and at least the Python driver
        os.kill(proc.pid, signal.SIGKILL)    # spark-submit execs the JVM: this pid is the JVM
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while _alive(tree) and time.time() < deadline:
            time.sleep(0.2)
        left = _alive(tree)
        assert not left, f"still running after the spark-submit JVM was killed: {sorted(left)}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stall(point: str, root: Path) -> dict:
    return {"faults.stall_once": [point], "faults.stall_seconds": 600, "faults.state_dir": str(root / "faults")}


def _versions(cfg, *tables) -> dict:
    lk = lake(cfg)
    return {t: lk.version(t) for t in tables}


def _succeeded_runs(cfg, stage: str) -> int:
    runs = read_pandas(lake(cfg), "runs")
    return int(((runs["stage"] == stage) & (runs["status"] == "succeeded")).sum())


def _keyed(frame, columns):
    assert not frame["track_id"].duplicated().any()                      # nothing twice
    return frame.set_index("track_id")[list(columns)].sort_index()


def test_a_driver_killed_mid_ingest_leaves_the_last_mels_and_the_rerun_completes_them(spark, demo_chain, demo_root,
                                                                                      tmp_path):
    # Last night ingested half the catalogue; tonight's run (the whole of it) is killed mid-decode.
    catalogue = tmp_path / "catalogue"
    shutil.copytree(demo_root / "demo" / "catalogue", catalogue)
    with open(catalogue / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(catalogue / "last-night.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[::2])
    settings = {**demo_chain.settings, "warehouse.root": str(tmp_path / "warehouse"),
                "spark.checkpoint_dir": str(tmp_path / "checkpoints"), "ingest.source": str(catalogue / "manifest.csv")}
    cfg = demo_chain.cfg.replace(**{k: settings[k] for k in ("warehouse.root", "spark.checkpoint_dir", "ingest.source")})
    run_stage(spark, cfg.replace(**{"ingest.source": str(catalogue / "last-night.csv")}), "ingest")
    before = _versions(cfg, "mels", "ingest_rejects")
    mels_before = read_pandas(lake(cfg), "mels", columns=["track_id", "fingerprint"])

    submit_and_kill("ingest", {**settings, **_stall("ingest.decode", tmp_path)},
                    tmp_path / "faults" / "stall_once.ingest.decode", tmp_path / "ingest.log")
    assert _versions(cfg, "mels", "ingest_rejects") == before                  # nothing committed
    after_kill = read_pandas(lake(cfg), "mels", columns=["track_id", "fingerprint"])
    assert _keyed(after_kill, ["fingerprint"]).equals(_keyed(mels_before, ["fingerprint"]))
    assert _succeeded_runs(cfg, "ingest") == 1

    run_stage(spark, cfg, "ingest")                                            # the rerun
    columns = ["mel", "n_frames", "fingerprint", "excerpt_offset_s"]
    got = _keyed(read_pandas(lake(cfg), "mels"), columns)
    want = _keyed(read_pandas(lake(demo_chain.cfg), "mels"), columns)
    assert got.index.tolist() == want.index.tolist() and got.equals(want)     # every track once, byte-equal
    reasons = lambda c: sorted(map(tuple, read_pandas(lake(c), "ingest_rejects")[["track_id", "reason"]].values))
    assert reasons(cfg) == reasons(demo_chain.cfg)


def test_a_driver_killed_mid_infer_leaves_the_served_vectors_and_the_rerun_completes_them(spark, demo_chain,
                                                                                         tmp_path):
    chain = copy_chain(demo_chain, tmp_path)
    tables = ("predicted_factors", "serving_factors")
    before = _versions(chain.cfg, *tables)
    full = {"infer.incremental": False}              # score the whole catalogue again: the kill lands mid-scoring
    submit_and_kill("infer", {**chain.settings, **full, **_stall("infer.score", tmp_path)},
                    tmp_path / "faults" / "stall_once.infer.score", tmp_path / "infer.log")
    assert _versions(chain.cfg, *tables) == before

    run_stage(spark, chain.cfg.replace(**full), "infer")
    for table in tables:
        got, want = (read_pandas(lake(c), table) for c in (chain.cfg, demo_chain.cfg))
        key = [c for c in ("source", "model_id") if c in got.columns]
        assert _keyed(got, key).equals(_keyed(want, key)), table              # the same rows, each once
        g, w = (np.stack(f.sort_values("track_id")["factors"].to_numpy()) for f in (got, want))
        np.testing.assert_allclose(g, w, atol=1e-6, err_msg=table)


def test_training_killed_mid_epoch_resumes_from_its_checkpoint_to_the_same_epochs(spark, demo_chain, tmp_path):
    from deepcuts.nn.model import latest_model_id
    chain = copy_chain(demo_chain, tmp_path)
    short = {"train.epochs": 3, "train.patience": 10}
    served = latest_model_id(lake(chain.cfg))
    models = set(os.listdir(lake(chain.cfg).path("models")))
    # The stall: after the first batch of the second epoch, one checkpoint written.
    submit_and_kill("train", {**chain.settings, **short, **_stall("train.batch", tmp_path)},
                    tmp_path / "faults" / "stall_once.train.batch", tmp_path / "train.log")
    assert "train: epoch 1/3" in (tmp_path / "train.log").read_text()
    assert set(os.listdir(lake(chain.cfg).path("models"))) == models        # no model published
    assert latest_model_id(lake(chain.cfg)) == served

    summary = run_stage(spark, chain.cfg.replace(**short), "train")
    assert summary["resumed_after_epoch"] == 1 and summary["epochs_run"] == 3, summary
