"""One stage run: the context a stage function gets, and the manifest it leaves.

A stage is ``run(ctx) -> summary``.  Through ``ctx`` it reads the tables it declared in
the registry (:mod:`deepcuts.core.registry`) and writes the ones it declared; reading or
writing any other table is a programming error, caught at once.

Pinned reads: ``ctx.read(T)`` returns ``T`` at the version that the latest *succeeded*
run wrote (from the ``runs`` manifest), not simply the latest version: if a stage died
after committing one of its tables and before the others, the next reader still sees the
previous run's consistent set.  A table this run has already written is read at that new
version.  A table no manifest mentions (written by hand, or by a test) is read at its
latest version.

The manifest row (``runs`` table, appended when the stage ends, succeeded or failed)
holds the run id, stage, config hash, code version, the Delta version of every table read
and written, row counts, rejects by reason, the summary and the duration.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from deepcuts.core import lake as lakeio
from deepcuts.core.config import PROJECT_ROOT, Config, to_dict
from deepcuts.core.tables import RUNS, Table, spark_schema

log = logging.getLogger(__name__)

SUCCEEDED, FAILED, SKIPPED = "succeeded", "failed", "skipped"


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """The package version and, in a git checkout, the commit (``+dirty`` if modified)."""
    from deepcuts import __version__
    try:
        sha = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--", "lib"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{__version__}+{sha}{'.dirty' if dirty else ''}" if sha else __version__


def published_versions(lk: lakeio.Lake) -> dict[str, int]:
    """table -> the newest version a succeeded run wrote (the pins readers use).  Read from
    the small ``runs`` table through delta-rs: no Spark job per stage."""
    dt = lk.delta(RUNS.name)
    if dt is None:
        return {}
    manifest = dt.to_pyarrow_dataset().to_table(columns=["status", "tables_written"]).to_pydict()
    pins: dict[str, int] = {}
    for status, written in zip(manifest["status"], manifest["tables_written"]):
        if status != SUCCEEDED:
            continue
        for table, version in (written or []):
            if version is not None:
                pins[table] = max(pins.get(table, -1), int(version))
    return pins


def last_succeeded(lk: lakeio.Lake, stage: str) -> dict | None:
    """The newest succeeded manifest row of ``stage`` (delta-rs; None if it never succeeded),
    with ``input_fingerprint`` taken from its summary."""
    dt = lk.delta(RUNS.name)
    if dt is None:
        return None
    rows = dt.to_pyarrow_dataset().to_table(
        columns=["run_id", "stage", "status", "ended_at", "config_hash", "code_version", "tables_read",
                 "tables_written", "summary_json"]).to_pylist()
    done = [r for r in rows if r["stage"] == stage and r["status"] == SUCCEEDED]
    if not done:
        return None
    last = max(done, key=lambda r: r["ended_at"])
    summary = _summary(last["summary_json"])
    return {**last, "tables_read": dict(last["tables_read"] or []), "tables_written": dict(last["tables_written"] or []),
            "input_fingerprint": summary.get("input_fingerprint")}


def run_summary(lk: lakeio.Lake, run_id: str) -> dict:
    """The summary a stage run recorded in the manifest ({} if the run or its summary is not there)."""
    dt = lk.delta(RUNS.name)
    if dt is None or not run_id:
        return {}
    import pyarrow.dataset as ds
    rows = dt.to_pyarrow_dataset().to_table(columns=["summary_json"],
                                            filter=ds.field("run_id") == run_id).column("summary_json")
    texts = [t for t in rows.to_pylist() if t]
    return _summary(texts[-1] if texts else None)


def _summary(text: str | None) -> dict:
    """A manifest row's ``summary_json`` as a dict ({} if empty or unreadable)."""
    try:
        return json.loads(text or "{}")
    except ValueError:
        return {}


@dataclass
class StageRun:
    """What a stage function works with (see the module docstring)."""
    spark: Any
    cfg: Config
    stage: Any                      # registry.Stage
    run_id: str
    pipeline_run_id: str | None = None
    lake: lakeio.Lake = field(init=False)
    read_versions: dict[str, int] = field(default_factory=dict)
    written: dict[str, lakeio.TableVersion] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)
    _pins: dict[str, int] | None = None

    def __post_init__(self):
        self.lake = lakeio.lake(self.cfg)

    # --- declarations ------------------------------------------------------------------
    def _check(self, table: Table, declared: tuple[Table, ...], verb: str) -> None:
        if table.name not in {t.name for t in declared}:
            raise RuntimeError(f"stage {self.stage.name} {verb} table {table.name} without declaring it "
                               f"in deepcuts.core.registry")

    # --- reading -----------------------------------------------------------------------
    def pinned_version(self, table: Table) -> int | None:
        """The version ``read`` uses (None: the table does not exist)."""
        if table.name in self.written:
            return self.written[table.name].version
        if self._pins is None:
            self._pins = published_versions(self.lake)
        latest = self.lake.version(table.name)
        if latest is None:
            return None
        pinned = self._pins.get(table.name)
        return latest if pinned is None or pinned > latest else pinned

    def read(self, table: Table, with_file: bool = False):
        """``table`` as a Spark DataFrame at its pinned version (empty if never written);
        ``with_file`` adds ``_file``, each row's data file."""
        self._check(table, self.stage.reads + self.stage.writes, "reads")
        version = self.pinned_version(table)
        if version is not None and table.name not in self.written:
            self.read_versions[table.name] = version
        return lakeio.read_table(self.spark, self.lake, table, version, with_file=with_file)

    def exists(self, table: Table) -> bool:
        return self.pinned_version(table) is not None

    def files(self, table: Table) -> list[str]:
        """The data files of ``table`` at its pinned version (Petastorm, pyarrow)."""
        self._check(table, self.stage.reads + self.stage.writes, "reads")
        version = self.pinned_version(table)
        if version is None:
            return []
        if table.name not in self.written:
            self.read_versions[table.name] = version
        return self.lake.files(table.name, version)

    def path(self, *parts: str) -> str:
        """A path under the warehouse root for plain files (local or ``s3://``)."""
        return self.lake.path(*parts)

    # --- writing -----------------------------------------------------------------------
    def _store(self, committed: lakeio.TableVersion) -> lakeio.TableVersion:
        self.written[committed.table] = committed
        return committed

    def write(self, df, table: Table, mode: str = "overwrite", metadata: dict | None = None,
              **layout) -> lakeio.TableVersion:
        """One Delta commit of ``df`` (overwrite: a full rebuild; append); ``metadata`` is kept
        with the commit."""
        self._check(table, self.stage.writes, "writes")
        wc = self.cfg.warehouse
        return self._store(lakeio.write_table(df, self.lake, table, self.run_id, mode=mode,
                                              retention_hours=wc.retention_hours,
                                              retries=wc.commit_retries, metadata=metadata, **layout))

    def version_info(self, table: Table) -> list | None:
        """[run id, version] of the pinned version of ``table`` (None if absent): what a
        derived artifact records about its input."""
        version = self.pinned_version(table)
        if version is None:
            return None
        return [self.lake.commit_metadata(table.name, version).get("run_id"), version]

    def merge(self, table: Table, upserts, deletes=None, **layout) -> lakeio.TableVersion:
        """One ``MERGE`` commit on the table key (upserts, and keys to delete)."""
        self._check(table, self.stage.writes, "writes")
        wc = self.cfg.warehouse
        return self._store(lakeio.merge_table(self.spark, self.lake, table, self.run_id, upserts, deletes,
                                              retention_hours=wc.retention_hours,
                                              retries=wc.commit_retries, **layout))

    def maintain(self) -> None:
        """Compact and vacuum what this run wrote (``[warehouse]`` settings)."""
        wc = self.cfg.warehouse
        for name in self.written:
            table = next(t for t in self.stage.writes if t.name == name)
            layout = self.stage.layout(self.cfg).get(name, {}) if self.stage.layout else {}
            lakeio.compact(self.spark, self.lake, table, min_small_files=wc.compact_min_files,
                           small_file_bytes=wc.small_file_mb * 1024 * 1024,
                           row_group_rows=layout.get("row_group_rows"), row_bytes=layout.get("row_bytes"))
            lakeio.vacuum(self.spark, self.lake, table, wc.retention_hours, wc.vacuum_interval_hours)

    # --- skipping --------------------------------------------------------------------
    def unchanged_reason(self, fingerprint: str | None) -> str | None:
        """Why this stage has nothing new to do (:func:`deepcuts.core.gates.unchanged_since`);
        when it has not, None.  A skipped run's manifest records the versions it found."""
        from deepcuts.core.gates import unchanged_since
        writes = {t.name for t in self.stage.writes}
        reads = {t.name: self.pinned_version(t) for t in self.stage.reads if t.name not in writes}
        reason = unchanged_since(last_succeeded(self.lake, self.stage.name), config_hash=config_hash(self.cfg),
                                 code_version=code_version(), fingerprint=fingerprint, current_reads=reads,
                                 current_writes={t.name: self.pinned_version(t) for t in self.stage.writes})
        if reason is not None:
            self.read_versions.update({k: v for k, v in reads.items() if v is not None})
        return reason

    # --- the manifest ------------------------------------------------------------------
    def record(self, status: str, started: float, summary: dict | None, error: str | None = None) -> None:
        """Append this run's manifest row to ``runs`` (one small Delta append)."""
        now = time.time()
        row = {
            "run_id": self.run_id, "stage": self.stage.name, "status": status,
            "pipeline_run_id": self.pipeline_run_id,
            "started_at": datetime.fromtimestamp(started, timezone.utc),
            "ended_at": datetime.fromtimestamp(now, timezone.utc),
            "duration_s": round(now - started, 3),
            "config_hash": config_hash(self.cfg), "code_version": code_version(),
            "tables_read": dict(self.read_versions),
            "tables_written": {k: v.version for k, v in self.written.items()},
            "rows_written": {k: v.rows for k, v in self.written.items()},
            "rejects": {str(k): int(v) for k, v in self.rejects.items()},
            "summary_json": json.dumps(summary or {}, default=str, sort_keys=True),
            "error": error,
        }
        df = self.spark.createDataFrame([row], spark_schema(RUNS))
        lakeio.write_table(df, self.lake, RUNS, self.run_id, mode="append",
                           retention_hours=self.cfg.warehouse.retention_hours,
                           retries=self.cfg.warehouse.commit_retries)


class Laps:
    """Wall seconds of a stage's named steps, for its summary: ``lap("fit")`` closes the step
    that started at the previous call (or at construction)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.time()

    def __call__(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now


def rejects_of(summary: dict) -> dict[str, int]:
    """Rejected items by reason from a stage summary's ``rejected`` / ``rejected_rows``."""
    out: dict[str, int] = {}
    for key in ("rejected", "rejected_rows"):
        value = summary.get(key)
        if isinstance(value, dict):
            for reason, count in value.items():
                if isinstance(count, (int, float)):
                    out[str(reason)] = out.get(str(reason), 0) + int(count)
    return out
