import os

import pyarrow.parquet as pq
import pytest

from deepcuts.audio import catalogue
from deepcuts.audio.catalogue import CatalogueEntry


def test_track_ids_are_relative_posix_paths():
    assert catalogue.track_id_from_path("a/b/c.mp3") == "a/b/c.mp3"
    assert catalogue.track_id_from_path("./x.wav") == "x.wav"
    assert catalogue.track_id_from_path(os.path.join("d", "e.ogg")) == "d/e.ogg"


def test_source_kinds():
    assert catalogue.source_kind("/data/audio") == "folder"
    assert catalogue.source_kind("cat/manifest.CSV") == "manifest"
    assert catalogue.source_kind("x/m.parquet") == "manifest"
    assert catalogue.source_kind("s3://bucket/prefix") == "s3"


def test_list_folder_is_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b/2.mp3", "a/1.WAV", "a/.hidden.mp3", "a/notes.txt", "c.flac"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * 3)
    entries = list(catalogue.list_folder(str(tmp_path), [".mp3", ".wav", ".flac"]))
    assert [e.track_id for e in entries] == ["c.flac", "a/1.WAV", "b/2.mp3"]
    assert all(e.source_size == 3 and e.source_version for e in entries)
    with pytest.raises(FileNotFoundError):
        list(catalogue.list_folder(str(tmp_path / "nope"), [".mp3"]))


def test_resolve_uri():
    assert catalogue.resolve_uri("audio/x.mp3", "/cat") == "/cat/audio/x.mp3"
    assert catalogue.resolve_uri("/abs/x.mp3", "/cat") == "/abs/x.mp3"
    assert catalogue.resolve_uri("file:///abs/x.mp3", "/cat") == "/abs/x.mp3"
    assert catalogue.resolve_uri("s3://b/k.mp3", "/cat") == "s3://b/k.mp3"
    assert catalogue.resolve_uri("k.mp3", "s3://b/p") == "s3://b/p/k.mp3"


def test_write_listing_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(catalogue, "LISTING_CHUNK", 7)
    entries = (CatalogueEntry(f"t{i}", f"/x/{i}.mp3", None, i, str(i)) for i in range(30))
    path = str(tmp_path / "listing.parquet")
    assert catalogue.write_listing(entries, path) == 30
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 30 and meta.num_row_groups == 5     # 7+7+7+7+2: never all in memory


@pytest.mark.s3
def test_s3_listing_stat_and_read(s3_bucket):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="cat/a/1.mp3", Body=b"abc")
    client.put_object(Bucket=bucket, Key="cat/2.flac", Body=b"defg")
    client.put_object(Bucket=bucket, Key="cat/readme.txt", Body=b"no")
    client.put_object(Bucket=bucket, Key="other/3.mp3", Body=b"no")
    entries = list(catalogue.list_s3(f"s3://{bucket}/cat", [".mp3", ".flac"], client))
    assert [(e.track_id, e.uri, e.source_size) for e in entries] == [
        ("2.flac", f"s3://{bucket}/cat/2.flac", 4), ("a/1.mp3", f"s3://{bucket}/cat/a/1.mp3", 3)]
    assert catalogue.read_source(f"s3://{bucket}/cat/2.flac", client) == b"defg"
    assert catalogue.stat_source(f"s3://{bucket}/cat/2.flac", client)[0] == 4
    with pytest.raises(FileNotFoundError):
        catalogue.read_source(f"s3://{bucket}/cat/gone.mp3", client)
    with pytest.raises(FileNotFoundError):
        catalogue.stat_source(f"s3://{bucket}/cat/gone.mp3", client)


# --- confinement: regular files under the root only (issue 10) --------------------------------
import threading  # noqa: E402

from deepcuts.audio import confine  # noqa: E402
from deepcuts.audio.reasons import RejectedAudio  # noqa: E402


def _within(seconds, fn, *args, **kwargs):
    """fn(*args) run in a thread that must finish in ``seconds`` (a FIFO opened for reading
    blocks until a writer comes, /dev/zero never ends): the test fails instead of hanging."""
    out = {}

    def target():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            out["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _reason(fn, *args, **kwargs) -> str:
    with pytest.raises(RejectedAudio) as err:
        _within(5, fn, *args, **kwargs)
    assert err.value.detail
    return err.value.reason


@pytest.fixture
def hostile_tree(tmp_path):
    """A catalogue root with a good file, a symlink inside, symlinks out, to /dev/zero and a
    dangling one, a FIFO, a socket, an oversized file, and a symlinked folder pointing out."""
    root, outside = tmp_path / "cat", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "good.wav").write_bytes(b"R" * 100)
    (root / "sub" / "in_link.wav").symlink_to(root / "good.wav")
    (outside / "secret.wav").write_bytes(b"S" * 100)
    (root / "out_link.wav").symlink_to(outside / "secret.wav")
    (root / "dotdot_link.wav").symlink_to("../elsewhere/secret.wav")
    (root / "zero.wav").symlink_to("/dev/zero")
    (root / "dangling.wav").symlink_to(root / "nothing.wav")
    os.mkfifo(root / "fifo.wav")
    (root / "big.wav").write_bytes(b"B" * 5000)
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    import socket
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.wav"))
    yield root, outside
    sock.close()


def test_listing_resolves_every_path_and_never_follows_out(hostile_tree):
    root, _ = hostile_tree
    entries = {e.track_id: e for e in _within(5, lambda: list(catalogue.list_folder(str(root), [".wav"])))}
    assert sorted(entries) == ["big.wav", "dangling.wav", "dotdot_link.wav", "fifo.wav", "good.wav", "out_link.wav",
                               "sock.wav", "sub/in_link.wav", "zero.wav"]      # linked_dir/ is not entered
    assert entries["sub/in_link.wav"].source_size == 100                     # inside: the target's stat
    assert entries["out_link.wav"].source_version.startswith("link:")       # outside: the link's own
    assert entries["out_link.wav"].source_size != 100
    assert entries["fifo.wav"].source_size is None and entries["dangling.wav"].source_version is None


def test_reading_rejects_what_leaves_the_root_or_is_no_regular_file_quickly(hostile_tree):
    root, _ = hostile_tree
    roots = catalogue.effective_roots(str(root))
    read = lambda name, **kw: catalogue.read_source(str(root / name), roots=roots, **kw)  # noqa: E731
    assert _within(5, read, "good.wav") == b"R" * 100
    assert _within(5, read, "sub/in_link.wav") == b"R" * 100
    assert _reason(read, "out_link.wav") == "outside_root"
    assert _reason(read, "dotdot_link.wav") == "outside_root"
    assert _reason(read, "zero.wav") == "outside_root"
    assert _reason(read, "fifo.wav") == "not_a_file"
    assert _reason(read, "sock.wav") == "not_a_file"
    assert _reason(read, "big.wav", max_bytes=4096) == "too_large"
    assert _within(5, read, "big.wav", max_bytes=5000) == b"B" * 5000
    with pytest.raises(FileNotFoundError):
        _within(5, read, "dangling.wav")
    # Anywhere allowed: /dev/zero is still never read (a device, not a file).
    assert _reason(catalogue.read_source, str(root / "zero.wav"), roots=()) == "not_a_file"
    assert _reason(catalogue.stat_source, str(root / "out_link.wav"), roots=roots) == "outside_root"


def test_a_path_swapped_after_the_check_is_caught_on_the_opened_file(hostile_tree, monkeypatch):
    root, outside = hostile_tree
    real_check = confine.check_local

    def check_then_swap(path, roots, max_bytes):      # the race: checked, then replaced by a link out
        resolved, st = real_check(path, roots, max_bytes)
        os.replace(root / "swap_tmp.wav", root / "good.wav")
        return resolved, st
    os.symlink(outside / "secret.wav", root / "swap_tmp.wav")
    monkeypatch.setattr(confine, "check_local", check_then_swap)
    # O_NOFOLLOW refuses the link that now sits at the checked path
    with pytest.raises((RejectedAudio, OSError)):
        _within(5, confine.read_local, str(root / "good.wav"), (confine.resolve_root(str(root)),), None)


def test_effective_roots_per_source_kind(tmp_path):
    (tmp_path / "cat").mkdir()
    assert catalogue.effective_roots(str(tmp_path / "cat")) == (str((tmp_path / "cat").resolve()),)
    assert catalogue.effective_roots(str(tmp_path / "cat" / "m.csv")) == (str((tmp_path / "cat").resolve()),)
    assert catalogue.effective_roots(str(tmp_path / "cat" / "m.csv"), ["/data/audio", "s3://b/p"]) == (
        "/data/audio", "s3://b/p/")
    assert catalogue.effective_roots("s3://bucket/prefix") == ("s3://bucket/",)
    assert confine.is_under("/music/a.mp3", "/music") and not confine.is_under("/music2/a.mp3", "/music")
    manifest_dir = str(tmp_path / "cat")
    escaped = catalogue.resolve_uri("../../etc/passwd", manifest_dir)
    with pytest.raises(RejectedAudio) as err:
        confine.check_uri(escaped, catalogue.effective_roots(str(tmp_path / "cat" / "m.csv")))
    assert err.value.reason == "outside_root"
    with pytest.raises(RejectedAudio):
        confine.check_uri("s3://other/x.mp3", ("s3://bucket/",))
    assert confine.check_uri("s3://bucket/x.mp3", ("s3://bucket/",)) == "s3://bucket/x.mp3"


@pytest.mark.s3
def test_s3_reads_are_confined_and_bounded(s3_bucket):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="cat/a.mp3", Body=b"x" * 300)
    roots = catalogue.effective_roots(f"s3://{bucket}/cat")
    assert catalogue.read_source(f"s3://{bucket}/cat/a.mp3", client, roots=roots, max_bytes=300) == b"x" * 300
    with pytest.raises(RejectedAudio) as err:
        catalogue.read_source(f"s3://{bucket}/cat/a.mp3", client, roots=roots, max_bytes=299)
    assert err.value.reason == "too_large"
    with pytest.raises(RejectedAudio) as err:
        catalogue.read_source(f"s3://{bucket}-other/cat/a.mp3", client, roots=roots)
    assert err.value.reason == "outside_root"


def test_a_folder_swapped_for_a_link_after_the_check_is_caught_by_where_the_file_really_is(tmp_path, monkeypatch):
    root, outside = tmp_path / "cat", tmp_path / "elsewhere"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (root / "d" / "f.wav").write_bytes(b"in")
    (outside / "f.wav").write_bytes(b"out")
    real_check = confine.check_local

    def check_then_swap(path, roots, max_bytes):
        checked = real_check(path, roots, max_bytes)
        os.rename(root / "d", root / "d_old")
        os.symlink(outside, root / "d")                 # O_NOFOLLOW guards the last component only
        return checked
    monkeypatch.setattr(confine, "check_local", check_then_swap)
    with pytest.raises(RejectedAudio) as err:
        _within(5, confine.read_local, str(root / "d" / "f.wav"), (confine.resolve_root(str(root)),), None)
    assert err.value.reason == "outside_root" and "swapped" in err.value.detail
