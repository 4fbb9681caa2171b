"""The nightly run's quality gates and its skip rule: pure functions over stage summaries
and manifest rows (the CLI applies them; a failed gate is exit 4).

Gates:
* a stage's summary names one (``gate_failed``: e.g. a model not promoted while
  ``train.require_promotion``);
* a stage rejected more than ``nightly.max_reject_rate`` of the items it read this run
  (ingest: audio files decoded this run; factors: play rows);
* (raised inside a stage, as ``GateFailed``) neighbour recall under its floor, a model of
  another factors space.

Skipping (``nightly.skip_unchanged``): a stage whose last succeeded run read the same
table versions, with the same config, code and extra inputs (e.g. the served model), and
whose outputs are still the versions that run wrote, has nothing new to compute.
"""
from __future__ import annotations

# (rejected, total) of the items a stage handled this run, from its summary.
REJECT_COUNTS = {
    "ingest": lambda s: (_total(s.get("rejected")), (s.get("ingested") or 0) + _total(s.get("rejected"))),
    "factors": lambda s: (_total(s.get("rejected_rows")), s.get("input_rows") or 0),
}


def _total(counts) -> int:
    return sum(int(v) for v in counts.values() if isinstance(v, (int, float))) if isinstance(counts, dict) else 0


def reject_rate(stage: str, summary: dict) -> tuple[float, int, int] | None:
    """(rate, rejected, total) of the stage's input this run; None where it has no such count."""
    count = REJECT_COUNTS.get(stage)
    if count is None or not isinstance(summary, dict):
        return None
    rejected, total = count(summary)
    return (rejected / total if total else 0.0), rejected, total


def failed_gates(stage: str, summary: dict, max_reject_rate: float) -> list[str]:
    """The gates a finished stage failed, one line each."""
    out = []
    if isinstance(summary.get("gate_failed"), str):
        out.append(f"{stage}: {summary['gate_failed']}")
    rate = reject_rate(stage, summary)
    if rate is not None and rate[0] > max_reject_rate:
        out.append(f"{stage}: rejected {rate[1]:,} of {rate[2]:,} input items ({100 * rate[0]:.1f} %), over "
                   f"nightly.max_reject_rate = {max_reject_rate:g} (reasons in the stage's rejects table)")
    return out


def unchanged_since(last: dict | None, *, config_hash: str, code_version: str, fingerprint: str | None,
                    current_reads: dict[str, int | None], current_writes: dict[str, int | None]) -> str | None:
    """Why the stage can be skipped (a line for its summary), or None when it must run.
    ``last``: its last succeeded manifest row; ``current_*``: table -> pinned version now."""
    if last is None:
        return None
    if last.get("config_hash") != config_hash or last.get("code_version") != code_version:
        return None
    if (last.get("input_fingerprint") or None) != (fingerprint or None):
        return None
    read_then, written_then = last.get("tables_read") or {}, last.get("tables_written") or {}
    for table, version in current_reads.items():
        if version != read_then.get(table):
            return None
    for table, version in current_writes.items():
        if table in written_then and version != written_then[table]:
            return None
    return (f"inputs unchanged since run {last.get('run_id')}: the same table versions, config, code"
            + (f" and {fingerprint}" if fingerprint else ""))
