"""Fault injection for the fault tests (issue 15); off by default (every list ``[]`` in conf).

Three kinds, each a list of points in ``cfg.faults``, each firing once per ``faults.state_dir``
(a marker file ``<kind>.<point>`` created with ``O_EXCL``, so of all the executors' attempts
exactly one fires):

- ``fail_once``: the task raises :class:`InjectedFault`; Spark's task retry
  (``spark.task.maxFailures``; local mode has none) must then produce the same output;
- ``crash_once``: the Python process exits at once (``os._exit``), as a segfault or an OOM kill
  of a Python worker would; the job recovers by retry or fails with a clear message;
- ``stall_once``: the process sleeps ``stall_seconds`` after writing its marker, so a test can
  see the job is mid-way and SIGKILL the driver there.

The folder must be one every executor sees (a loopback cluster's local disk, a shared mount).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

# Where a fault can fire: the executor-side bodies of the two catalogue-wide passes (ingest's
# decode, infer's scoring), after their rows were handed on, and the training loop in the
# driver (after the first batch of the second epoch: one checkpoint exists, the epoch is half done).
POINTS = ("ingest.decode", "infer.score", "train.batch")
KINDS = ("fail_once", "crash_once", "stall_once")
CRASH_EXIT_CODE = 86   # distinctive in a worker's exit status; any non-zero would do


class InjectedFault(RuntimeError):
    """The failure ``faults.fail_once`` asked for (tests only)."""


@dataclass(frozen=True)
class Switches:
    """The plain values of ``cfg.faults`` a task closure carries to the executors."""
    fail_once: tuple[str, ...] = ()
    crash_once: tuple[str, ...] = ()
    stall_once: tuple[str, ...] = ()
    stall_seconds: float = 0.0
    state_dir: str = ""

    def any(self) -> bool:
        return bool(self.fail_once or self.crash_once or self.stall_once)


OFF = Switches()


def switches(faults_conf) -> Switches:
    """The ``Switches`` of ``cfg.faults``."""
    return Switches(tuple(faults_conf.fail_once), tuple(faults_conf.crash_once), tuple(faults_conf.stall_once),
                    float(faults_conf.stall_seconds), faults_conf.state_dir)


def _first_time(kind: str, point: str, state_dir: str) -> bool:
    os.makedirs(state_dir, exist_ok=True)
    try:
        os.close(os.open(os.path.join(state_dir, f"{kind}.{point}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def inject(point: str, faults: Switches = OFF) -> None:
    """Fire the faults configured at ``point``, each the first time any process reaches it;
    a no-op for a point no list names."""
    if point in faults.fail_once and _first_time("fail_once", point, faults.state_dir):
        raise InjectedFault(f"deepcuts fault injection: {point} fails this task attempt once (faults.fail_once)")
    if point in faults.crash_once and _first_time("crash_once", point, faults.state_dir):
        print(f"deepcuts fault injection: {point} exits this Python process (faults.crash_once)",
              file=sys.stderr, flush=True)
        os._exit(CRASH_EXIT_CODE)
    if point in faults.stall_once and _first_time("stall_once", point, faults.state_dir):
        time.sleep(faults.stall_seconds)
