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
