"""Reason codes of the ``ingest_rejects`` table, and the exception that carries one.

Stable strings: analysts group by them, and the incremental logic keys on them.
"""
from __future__ import annotations

EMPTY = "empty_file"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated"          # only with ingest.reject_truncated = true; else a warning on the mel
BAD_FORMAT = "bad_format"
TOO_SHORT = "too_short"
SILENT = "silent"
NOT_FINITE = "not_finite"
READ_ERROR = "read_error"
SOURCE_MISSING = "source_missing"
INTERNAL_ERROR = "internal_error"
OUTSIDE_ROOT = "outside_root"    # resolves (symlinks, "..") outside the catalogue root / ingest.allowed_roots
NOT_A_FILE = "not_a_file"        # a FIFO, device, socket or directory: never opened
TOO_LARGE = "too_large"          # over ingest.max_file_bytes: never read
REASONS = (EMPTY, UNDECODABLE, TRUNCATED, BAD_FORMAT, TOO_SHORT, SILENT, NOT_FINITE, READ_ERROR,
           SOURCE_MISSING, INTERNAL_ERROR, OUTSIDE_ROOT, NOT_A_FILE, TOO_LARGE)


class RejectedAudio(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
