"""Report folders under the warehouse: publication and retention.

Layout (``root`` is the warehouse root, a local folder or ``s3://``)::

    reports/LATEST                     the id of the newest complete report
    reports/<id>/index.html            the page
    reports/<id>/audio/<track>.ogg     the playlists' excerpts

A report is built whole before anyone can see it: locally in a hidden staging folder beside
the others, renamed into place in one step; on S3 (no rename) each file is one PUT, and the
folder counts only once ``LATEST`` names it.  ``LATEST`` is replaced last, with the same atomic
write as ``models/LATEST`` (:func:`deepcuts.core.storage.write_bytes_atomic`).
"""
from __future__ import annotations

import os
import posixpath
import re
import shutil
import uuid

import pyarrow.fs as pafs

from deepcuts.core.storage import delete_tree, filesystem_for, is_s3, read_bytes, write_bytes_atomic

REPORTS_DIR = "reports"
LATEST = "LATEST"
INDEX = "index.html"
STAGING_PREFIX = ".staging-"
_STAMP = re.compile(r"(\d{8}T\d{6})")


def reports_root(root: str) -> str:
    return posixpath.join(str(root).rstrip("/"), REPORTS_DIR)


def report_dir(root: str, report_id: str) -> str:
    return posixpath.join(reports_root(root), report_id)


def plain_id(report_id: str) -> str:
    if not report_id or "/" in report_id or report_id in (".", "..") or report_id.startswith("."):
        raise ValueError(f"not a plain report id: {report_id!r}")
    return report_id


def publish(root: str, report_id: str, files: dict[str, bytes]) -> str:
    """Write ``files`` (relative path -> bytes) as ``reports/<report_id>/`` and point LATEST at
    it; returns the path of its ``index.html``."""
    plain_id(report_id)
    if INDEX not in files:
        raise ValueError(f"a report needs {INDEX}")
    final = report_dir(root, report_id)
    if is_s3(root):
        # index.html last: a folder with an index is complete even before LATEST moves.
        for rel in sorted(files, key=lambda r: (r == INDEX, r)):
            write_bytes_atomic(posixpath.join(final, rel), files[rel])
    else:
        base = reports_root(root)
        os.makedirs(base, exist_ok=True)
        staging = os.path.join(base, f"{STAGING_PREFIX}{report_id}-{uuid.uuid4().hex[:8]}")
        try:
            for rel, data in files.items():
                path = os.path.join(staging, *rel.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(data)
            if os.path.isdir(final):            # the same run reported again: replace it whole
                shutil.rmtree(final)
            os.rename(staging, final)
        finally:
            if os.path.isdir(staging):
                shutil.rmtree(staging, ignore_errors=True)
    write_bytes_atomic(posixpath.join(reports_root(root), LATEST), report_id.encode())
    return posixpath.join(final, INDEX)


def latest_report(root: str) -> str | None:
    data = read_bytes(posixpath.join(reports_root(root), LATEST))
    text = data.decode().strip() if data is not None else ""
    return plain_id(text) if text else None


def _order(name: str) -> tuple[str, str]:
    """Reports sort by the UTC stamp in their id (pipeline-... and report-... ids interleave)."""
    m = _STAMP.search(name)
    return (m.group(1) if m else "", name)


def list_reports(root: str) -> list[str]:
    fs, inner = filesystem_for(reports_root(root))
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    names = [posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory]
    return sorted((n for n in names if not n.startswith(".")), key=_order)


def retain(root: str, keep: int) -> list[str]:
    """Delete reports beyond the newest ``keep`` (never the published one), and staging folders
    a crashed run left behind; returns the ids removed."""
    published = latest_report(root)
    names = list_reports(root)
    doomed = [n for n in names[:-keep] if n != published] if keep > 0 else [n for n in names if n != published]
    for name in doomed:
        delete_tree(report_dir(root, name))
    if not is_s3(root) and os.path.isdir(reports_root(root)):
        for name in os.listdir(reports_root(root)):
            if name.startswith(STAGING_PREFIX):
                shutil.rmtree(os.path.join(reports_root(root), name), ignore_errors=True)
    return doomed
