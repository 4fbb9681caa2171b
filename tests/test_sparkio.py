"""Spark plumbing that runs in the executors' Python workers."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest


def test_python_worker_setup_keeps_zip_directories_across_tasks(tmp_path):
    """PySpark invalidates import caches at every task start; on Python < 3.12 that re-read
    every zip on sys.path.  After the setup a zip's directory survives it, imports still work."""
    if sys.version_info >= (3, 12):
        pytest.skip("Python 3.12 invalidates zip caches lazily; the setup does nothing there")
    archive = tmp_path / "lib.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(200):
            zf.writestr(f"pkg{i}.py", f"VALUE = {i}\n")
    script = f"""
import importlib, sys, zipimport
sys.path.insert(0, {str(archive)!r})
import pkg7
before = zipimport._zip_directory_cache[{str(archive)!r}]
importlib.invalidate_caches()
reread = zipimport._zip_directory_cache[{str(archive)!r}] is not before
from deepcuts.core.spark import python_worker_setup
python_worker_setup(); python_worker_setup()
before = zipimport._zip_directory_cache[{str(archive)!r}]
importlib.invalidate_caches()
kept = zipimport._zip_directory_cache[{str(archive)!r}] is before
import pkg123
print(reread, kept, pkg7.VALUE + pkg123.VALUE)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "130"]          # re-read without the setup, kept with it


@pytest.mark.spark
def test_sum_moments_adds_large_partials_once_and_returns_none_for_no_rows(spark):
    """A partial larger than one JVM row (1,200 x 1,200 doubles: 11.5 MB, two chunks) is joined
    again and added over partitions, some empty; each partition is computed once."""
    import numpy as np
    from deepcuts.cf.baseline import cross_moments
    from deepcuts.core.spark import MOMENT_CHUNK_BYTES, sum_moments
    d = 1200
    assert d * d * 8 > MOMENT_CHUNK_BYTES
    rows = spark.range(0, 24, numPartitions=6).where("id < 8 or id >= 16")   # partitions 2 and 3 empty
    calls = spark.sparkContext.accumulator(0)

    def features(ids):
        return np.stack([np.random.default_rng(int(i)).normal(size=d) for i in ids])

    def partial(batch):
        calls.add(1)
        return cross_moments(features(batch["id"]))

    got = sum_moments(rows, partial)
    ids = [r["id"] for r in rows.collect()]
    want = cross_moments(features(ids))
    assert int(got["n"]) == len(ids) == 16
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-9)
    assert calls.value == 4                      # one batch in each non-empty partition, once
    assert sum_moments(rows.where("id < 0"), partial) is None
