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


def python_processes(pids) -> list[int]:
    """The Python ones of ``pids``: the JVM also forks short-lived ``jspawnhelper`` children
    (to start commands), whose VmHWM reads as the JVM's own for the instant before their exec."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().startswith("python"):
                    out.append(pid)
        except OSError:
            pass
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
            workers = python_processes(_descendants(self.jvm_pid))
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


def reset_peak_rss(pids) -> list[int]:
    """Reset the kernel's peak-RSS mark (VmHWM) of each process to its current RSS
    (``echo 5 > /proc/<pid>/clear_refs``, Linux >= 4.0), so a later VmHWM is one phase's peak.
    Returns the pids that could not be reset (the mark there stays the lifetime peak)."""
    failed = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            failed.append(pid)
    return failed


class OrphanReaper:
    """Keeps the CPU of a process tree whole: makes this process a child subreaper
    (``prctl(PR_SET_CHILD_SUBREAPER)``), so a process orphaned below it (e.g. a Python
    daemon's workers when the JVM stops that daemon: they are not waited for) is reparented
    here rather than to init, and reaps such adopted processes once they exit, so their CPU
    lands in this process's cutime (:class:`TreeCpu`).  Children this process
    started itself (subprocess, multiprocessing) are never reaped here: only a zombie child
    first seen below another parent.  Samples every ``interval`` s in a daemon thread."""

    def __init__(self, interval: float = 0.2):
        import ctypes
        import os
        import threading
        self.me, self.interval = os.getpid(), interval
        try:
            self.active = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0   # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            self.active = False
        self._adopted: set[int] = set()
        self._born_here: set[int] = set()
        self.reaped = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.active:
            self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.reap()
            self._stop.wait(self.interval)

    def reap(self) -> None:
        import os
        with self._lock:
            seen = set(_descendants(self.me))
            self._adopted &= seen        # a pid gone from the tree may be reused: forget it
            self._born_here &= seen
            for pid in seen:
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        head, tail = fh.read().rsplit(")", 1)
                except OSError:
                    continue
                state, ppid = tail.split()[0], int(tail.split()[1])
                if ppid != self.me:
                    if pid not in self._born_here:
                        self._adopted.add(pid)
                    continue
                if pid not in self._adopted:
                    self._born_here.add(pid)
                elif state == "Z":
                    try:
                        if os.waitpid(pid, os.WNOHANG)[0] == pid:
                            self.reaped += 1
                    except ChildProcessError:
                        pass
                    self._adopted.discard(pid)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _sigchld_ignored(pid: int) -> bool:
    """Whether ``pid`` ignores SIGCHLD (SigIgn bit 17): its children are reaped by the kernel
    and their CPU never reaches its cutime (PySpark's daemon.py does this)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << 16))
    except (OSError, ValueError):
        pass
    return False


class TreeCpu:
    """CPU seconds of a process tree that stay whole when processes exit: utime + stime +
    cutime + cstime of ``root`` and every process below it (/proc/<pid>/stat; a process reaped
    by a parent in the tree is in that parent's cutime), plus the last-seen CPU of every process that left the
    tree under a parent that ignores SIGCHLD (PySpark's daemon: its workers are auto-reaped,
    so a worker the JVM stops takes its CPU with it).  Samples every ``interval`` s; a
    process's CPU after its last sample before it exits is lost (at most ``interval`` each)."""

    def __init__(self, root: int, interval: float = 0.2):
        import threading
        self.root, self.interval = root, interval
        self.lost = 0.0                     # CPU of auto-reaped processes, folded in
        self._last: dict[tuple[int, int], tuple[float, int]] = {}   # (pid, start) -> (cpu, ppid)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.scan()
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.scan()

    def scan(self) -> float:
        """Fold in processes gone since the last scan; returns the tree's CPU seconds now."""
        import os
        tick = os.sysconf("SC_CLK_TCK")
        with self._lock:
            now: dict[tuple[int, int], tuple[float, int]] = {}
            total = 0.0
            for pid in [self.root, *_descendants(self.root)]:
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        fields = fh.read().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                cpu = sum(int(v) for v in fields[11:15]) / tick     # utime stime cutime cstime
                now[(pid, int(fields[19]))] = (cpu, int(fields[1]))  # starttime tells reused pids apart
                total += cpu
            ignoring: dict[int, bool] = {}
            for key, (cpu, ppid) in self._last.items():
                if key not in now:
                    if ppid not in ignoring:
                        ignoring[ppid] = _sigchld_ignored(ppid)
                    if ignoring[ppid]:
                        self.lost += cpu
            self._last = now
            return total + self.lost

    def seconds(self) -> float:
        return self.scan()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
