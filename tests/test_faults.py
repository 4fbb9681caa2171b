"""The fault-injection switch (core/faults.py): one failed attempt per point, then never again,
and nothing at all when the point is not configured.  Spark's retry of such a failure is
tested on the standalone cluster (tests/test_cluster.py)."""
import pytest

from deepcuts.core.faults import InjectedFault, fail_once


def test_a_configured_point_fails_exactly_once(tmp_path):
    state = str(tmp_path / "faults")
    fail_once("infer.score", ["ingest.decode"], state)            # not configured: nothing
    with pytest.raises(InjectedFault, match="ingest.decode fails this task attempt once"):
        fail_once("ingest.decode", ["ingest.decode"], state)
    for _ in range(3):                                             # the retries pass
        fail_once("ingest.decode", ["ingest.decode"], state)
    with pytest.raises(InjectedFault):                             # each point has its own once
        fail_once("infer.score", ["ingest.decode", "infer.score"], state)
    assert sorted(p.name for p in (tmp_path / "faults").iterdir()) == ["infer.score", "ingest.decode"]
