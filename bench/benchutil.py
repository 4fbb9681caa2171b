"""What every bench reports beside its figure (benches run as scripts: bench/ is on sys.path)."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process plus that of its largest reaped child (ru_maxrss), MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def _proc_status_mb(pid: int, field: str) -> float:
    """``field`` (VmHWM: peak resident, VmRSS: resident now) of a process from /proc, MB."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``.  Children are listed per thread: the JVM forks its Python
    daemon from a worker thread, not its main one."""
    import glob
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = []
        for listing in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                with open(listing) as fh:
                    kids += [int(c) for c in fh.read().split()]
            except OSError:
                pass
        out += kids
        todo += kids
    return out


class SparkMemory:
    """While a phase runs, samples every ``interval`` s the peaks of this driver process, the
    JVM (driver + executors in local mode) and its Python workers (its descendants: the
    largest one's peak, and the most they held together)."""

    def __init__(self, jvm_pid: int, interval: float = 0.25):
        import os
        import threading
        self.jvm_pid, self.interval, self._me = jvm_pid, interval, os.getpid()
        self.jvm_mb = self.worker_mb = self.workers_total_mb = self.driver_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.driver_mb = max(self.driver_mb, _proc_status_mb(self._me, "VmHWM"))
            self.jvm_mb = max(self.jvm_mb, _proc_status_mb(self.jvm_pid, "VmHWM"))
            workers = _descendants(self.jvm_pid)
            if workers:
                self.worker_mb = max(self.worker_mb, max(_proc_status_mb(p, "VmHWM") for p in workers))
                self.workers_total_mb = max(self.workers_total_mb, sum(_proc_status_mb(p, "VmRSS") for p in workers))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
