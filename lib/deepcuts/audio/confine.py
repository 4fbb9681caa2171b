"""Reading a catalogue file without leaving the catalogue: regular files under the allowed
roots only, never more than ``ingest.max_file_bytes``.

Every check that can be made without opening the file is made first (a FIFO blocks its
reader until a writer comes; ``/dev/zero`` never ends): the path is resolved (symlinks and
``..``), must lie under a root, must be a regular file and not too large.  The file is then
opened without following a final symlink and without blocking, and the opened descriptor is
checked again (type, size, and where it really is, from ``/proc/self/fd``) so a path swapped
between the check and the open is caught too.  Reads are bounded by the limit.
"""
from __future__ import annotations

import contextlib
import os
import stat

from deepcuts.audio.reasons import NOT_A_FILE, OUTSIDE_ROOT, TOO_LARGE, RejectedAudio

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))


def resolve_root(root: str) -> str:
    """A root as compared: an absolute, symlink-free path, or ``s3://bucket/prefix/``."""
    if root.startswith("s3://"):
        return root if root.endswith("/") else root + "/"
    return os.path.realpath(os.path.expanduser(root))


def is_under(path: str, root: str) -> bool:
    """``path`` (resolved) is ``root`` or inside it; "/music" does not contain "/music2"."""
    if root.startswith("s3://"):
        return path.startswith(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def check_uri(uri: str, roots: tuple[str, ...]) -> str:
    """The resolved form of ``uri``; :class:`RejectedAudio` (outside_root) when it leaves every root.
    ``roots`` empty: anywhere.  Touches nothing but the path (``realpath`` reads links)."""
    if uri.startswith("s3://"):
        resolved = uri
        local_roots = [r for r in roots if r.startswith("s3://")]
    else:
        resolved = os.path.realpath(uri)
        local_roots = [r for r in roots if not r.startswith("s3://")]
    if roots and not any(is_under(resolved, r) for r in local_roots):
        where = f" (it resolves to {resolved})" if resolved != uri else ""
        raise RejectedAudio(OUTSIDE_ROOT, f"{uri}{where} is outside the allowed roots {list(roots)}")
    return resolved


def check_local(path: str, roots: tuple[str, ...], max_bytes: int | None) -> tuple[str, os.stat_result]:
    """(resolved path, its stat) of a readable catalogue file, checked without opening it.
    FileNotFoundError when it is gone."""
    resolved = check_uri(path, roots)
    st = os.stat(resolved)
    if not stat.S_ISREG(st.st_mode):
        raise RejectedAudio(NOT_A_FILE, f"{path} is {_kind(st.st_mode)}; only regular files are read")
    if max_bytes and st.st_size > max_bytes:
        raise RejectedAudio(TOO_LARGE, f"{st.st_size} bytes > ingest.max_file_bytes = {max_bytes}")
    return resolved, st


def read_local(path: str, roots: tuple[str, ...], max_bytes: int | None) -> bytes:
    """The bytes of one catalogue file, or :class:`RejectedAudio` (outside_root, not_a_file,
    too_large) without reading it."""
    with open_local(path, roots, max_bytes) as (data, _):
        return data


@contextlib.contextmanager
def open_local(path: str, roots: tuple[str, ...], max_bytes: int | None):
    """(bytes, open descriptor) of one catalogue file, checked like :func:`read_local`; the
    descriptor (blocking; its offset is wherever the read left it) is closed on exit."""
    resolved, _ = check_local(path, roots, max_bytes)
    fd = os.open(resolved, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RejectedAudio(NOT_A_FILE, f"{path} became {_kind(st.st_mode)} when opened")
        if roots:
            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                opened = resolved
            if not any(is_under(opened, r) for r in roots if not r.startswith("s3://")):
                raise RejectedAudio(OUTSIDE_ROOT, f"{path} was swapped for {opened} (outside the allowed roots)")
        limit = max_bytes or st.st_size
        if st.st_size > limit:
            raise RejectedAudio(TOO_LARGE, f"{st.st_size} bytes > ingest.max_file_bytes = {max_bytes}")
        os.set_blocking(fd, True)
        # One read of the size fstat gave (+1 to see growth); a short read (a file being written) loops.
        chunks = [os.read(fd, min(limit, st.st_size) + 1)]
        total = len(chunks[0])
        while total <= limit and chunks[-1]:
            chunks.append(os.read(fd, limit + 1 - total))
            total += len(chunks[-1])
        if max_bytes and total > max_bytes:
            raise RejectedAudio(TOO_LARGE, f"grew past ingest.max_file_bytes = {max_bytes} while read")
        chunks = [c for c in chunks if c]
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        yield data, fd
    finally:
        os.close(fd)
