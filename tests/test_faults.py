"""The fault-injection switches (core/faults.py): each kind fires once per point, then never
again, and nothing fires at a point no list names.  What the pipeline does under each fault is
tested where it happens: Spark's retry on the standalone cluster (tests/test_cluster.py), a dead
Python worker in tests/test_hostile_inputs.py, a killed driver in tests/test_driver_kill.py."""
import subprocess
import sys
import time

import pytest

from deepcuts.core.faults import CRASH_EXIT_CODE, OFF, InjectedFault, Switches, inject


def test_a_configured_point_fails_exactly_once(tmp_path):
    state = str(tmp_path / "faults")
    inject("infer.score", Switches(fail_once=("ingest.decode",), state_dir=state))   # not listed: nothing
    faults = Switches(fail_once=("ingest.decode", "infer.score"), state_dir=state)
    with pytest.raises(InjectedFault, match="ingest.decode fails this task attempt once"):
        inject("ingest.decode", faults)
    for _ in range(3):                                             # the retries pass
        inject("ingest.decode", faults)
    with pytest.raises(InjectedFault):                             # each point has its own once
        inject("infer.score", faults)
    assert sorted(p.name for p in (tmp_path / "faults").iterdir()) == ["fail_once.infer.score",
                                                                       "fail_once.ingest.decode"]
    inject("ingest.decode", OFF)                                   # the default: nothing, no folder needed


def test_a_crash_exits_the_process_once_and_a_stall_sleeps_once(tmp_path):
    state = str(tmp_path / "faults")
    crash = (f"from deepcuts.core.faults import Switches, inject\n"
             f"inject('infer.score', Switches(crash_once=('infer.score',), state_dir={state!r}))\n"
             f"print('survived')")
    first = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60)
    assert first.returncode == CRASH_EXIT_CODE and "survived" not in first.stdout
    assert "deepcuts fault injection: infer.score exits this Python process" in first.stderr
    again = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "survived" in again.stdout              # once per state_dir

    stall = Switches(stall_once=("train.batch",), stall_seconds=0.5, state_dir=state)
    started = time.monotonic()
    inject("train.batch", stall)
    assert time.monotonic() - started >= 0.5 and (tmp_path / "faults" / "stall_once.train.batch").exists()
    started = time.monotonic()
    inject("train.batch", stall)
    assert time.monotonic() - started < 0.4


def test_spark_failures_read_as_one_line_that_says_which_task_and_why():
    from deepcuts.core.cli import one_line

    class Py4JJavaError(Exception):          # py4j's, by name: its text is the Java exception's
        pass

    class PythonException(Exception):        # pyspark's: a task's Python traceback
        pass

    aborted = ("An error occurred while calling o47.save.\n: org.apache.spark.SparkException: Job aborted due to "
               "stage failure: Task 1 in stage 3.0 failed 4 times, most recent failure: Lost task 1.3 in stage 3.0 "
               "(TID 9) (10.0.0.5 executor 2): org.apache.spark.SparkException: [TASK_WRITE_FAILED] Task failed "
               "while writing rows to s3a://b/t.\n\tat org.apache.spark.sql.errors...\nCaused by: "
               "org.apache.spark.SparkException: Python worker exited unexpectedly (crashed)\n\tat ...")
    assert one_line(Py4JJavaError(aborted)) == (
        "Spark job aborted: Task 1 in stage 3.0 failed 4 times (last on executor 2): Python worker exited "
        "unexpectedly (crashed): a Python worker died (see that executor's stderr)")
    assert one_line(Py4JJavaError(aborted.replace("Python worker exited unexpectedly (crashed)", "disk full"))) == (
        "Spark job aborted: Task 1 in stage 3.0 failed 4 times (last on executor 2): [TASK_WRITE_FAILED] Task "
        "failed while writing rows to s3a://b/t.")
    assert one_line(Py4JJavaError("An error occurred while calling o5.load.\n: java.io.IOException: "
                                  "No FileSystem for scheme \"s4\"\n\tat ...")) == (
        'Spark: java.io.IOException: No FileSystem for scheme "s4"')
    assert one_line(PythonException("\n  An exception was thrown from the Python worker. Please see the stack "
                                    "trace below.\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                                    "ValueError: bad mel\n")) == "a Spark task raised ValueError: bad mel"
    assert one_line(ValueError("first line\nsecond")) == "ValueError: first line"
