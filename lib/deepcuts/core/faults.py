"""Fault injection for the fault tests (issue 15); off by default (``faults.fail_once = []``).

``fail_once(point, ...)`` raises in the first task attempt that reaches ``point``, and never
again for that point: a marker file per point in ``faults.state_dir``, created with
``O_EXCL`` so that of all the executors' attempts exactly one fails.  Spark's task retry
(``spark.task.maxFailures``; local mode has none) must then produce the same output.  The
folder must be one every executor sees (a loopback cluster's local disk, a shared mount).
"""
from __future__ import annotations

import os

# The places a task can be made to fail: the executor-side bodies of the two catalogue-wide
# passes (ingest's decode, infer's scoring).
POINTS = ("ingest.decode", "infer.score")


class InjectedFault(RuntimeError):
    """The failure ``faults.fail_once`` asked for (tests only)."""


def switches(faults_conf) -> tuple[list[str], str]:
    """(``fail_once``, ``state_dir``) of ``cfg.faults``: plain values a task closure carries."""
    return list(faults_conf.fail_once), faults_conf.state_dir


def fail_once(point: str, points, state_dir: str) -> None:
    """Raise ``InjectedFault`` the first time any task reaches ``point``; no-op unless
    ``point`` is in ``points``."""
    if point not in points:
        return
    os.makedirs(state_dir, exist_ok=True)
    try:
        os.close(os.open(os.path.join(state_dir, point), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    raise InjectedFault(f"deepcuts fault injection: {point} fails this task attempt once (faults.fail_once)")
