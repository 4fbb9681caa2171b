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
