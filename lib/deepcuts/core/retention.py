"""What the nightly run removes after itself: old models, training checkpoints and the ALS
checkpoint folders (reports keep their own count, ``report.keep``).

``plan`` is pure: given the entries of one folder (name, modification time), it keeps the
newest ``keep`` and every protected name (the served model: never removed, however old).
"""
from __future__ import annotations

import posixpath

import pyarrow.fs as pafs

from deepcuts.core.storage import delete_tree, filesystem_for


def plan(entries: list[tuple[str, float]], keep: int, protect: set[str] = frozenset()) -> list[str]:
    """The names to remove: all but the ``keep`` newest, never a protected one."""
    newest_first = sorted(entries, key=lambda e: (e[1], e[0]), reverse=True)
    return [name for name, _ in newest_first[keep:] if name not in protect]


def _subfolders(folder: str) -> tuple[list[tuple[str, float]], str]:
    fs, inner = filesystem_for(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    except OSError:
        return [], folder
    found = []
    for info in infos:
        if info.type != pafs.FileType.Directory:
            continue
        mtime = info.mtime.timestamp() if info.mtime is not None else _newest_mtime(fs, info.path)
        found.append((info.base_name, mtime))
    return found, folder


def _newest_mtime(fs, path: str) -> float:
    """S3 prefixes have no time of their own: their newest object's."""
    times = [i.mtime.timestamp() for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if i.mtime is not None]
    return max(times, default=0.0)


def prune(folder: str, keep: int, protect: set[str] = frozenset(), skip: set[str] = frozenset()) -> list[str]:
    """Remove the old subfolders of ``folder`` (see ``plan``); returns their names."""
    entries, _ = _subfolders(folder)
    removed = plan([e for e in entries if e[0] not in skip and not e[0].startswith(".")], keep, protect)
    for name in removed:
        delete_tree(posixpath.join(folder, name))
    return removed


def apply(cfg, lk) -> dict:
    """The nightly job's clean-up: ``nightly.keep_runs`` models (the served one always),
    training checkpoints and ALS checkpoint folders.  Returns counts for the run summary."""
    from deepcuts.core.spark import checkpoint_dir
    from deepcuts.core.storage import path_from_uri
    from deepcuts.nn.model import latest_model_id
    from deepcuts.stages.train import CHECKPOINTS_DIR
    keep = cfg.nightly.keep_runs
    served = latest_model_id(lk)
    models = prune(lk.path("models"), keep, protect={served} if served else set(), skip={CHECKPOINTS_DIR})
    checkpoints = prune(lk.path("models", CHECKPOINTS_DIR), keep)
    als = prune(path_from_uri(checkpoint_dir(cfg)), keep)
    return {"models_removed": len(models), "training_checkpoints_removed": len(checkpoints),
            "als_checkpoints_removed": len(als), "kept": keep, "served_model": served}
