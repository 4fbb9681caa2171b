"""knn.persist: shard index files with checksums, manifests, publication, vacuum."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

faiss = pytest.importorskip("faiss")

from deepcuts.knn import persist  # noqa: E402
from deepcuts.knn.search import IndexSpec, build_index, search_pair  # noqa: E402


def shard(n=50, dim=8, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    ids = pa.table({"id": [f"t{seed}-{i}" for i in range(n)], "source": ["audio"] * n})
    return x, build_index(x, IndexSpec()), ids


def test_a_shard_round_trips_and_searches_the_same(tmp_path):
    folder = str(tmp_path / "idx")
    x, index, ids = shard()
    entry = persist.write_shard(folder, 3, index, ids)
    assert entry["rows"] == 50 and entry["index_file"] == "shard-00003.faiss"
    back, back_ids = persist.read_shard(folder, entry)
    assert back_ids.equals(ids)
    a = search_pair(index, x[:5], 4, IndexSpec())
    b = search_pair(back, x[:5], 4, IndexSpec())
    np.testing.assert_array_equal(a[1], b[1])


def test_a_corrupted_or_missing_file_is_an_error_not_a_wrong_answer(tmp_path):
    folder = str(tmp_path / "idx")
    _, index, ids = shard()
    entry = persist.write_shard(folder, 0, index, ids)
    path = os.path.join(folder, entry["index_file"])
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(persist.IndexFileError, match="corrupted"):
        persist.read_shard(folder, entry)
    os.remove(os.path.join(folder, entry["ids_file"]))
    with pytest.raises(persist.IndexFileError, match="missing"):
        persist.read_shard(folder, {**entry, "index_sha256": persist.sha256(bytes(data))})


def test_index_and_ids_must_agree(tmp_path):
    _, index, ids = shard()
    with pytest.raises(ValueError):
        persist.write_shard(str(tmp_path), 0, index, ids.slice(0, 10))


def test_manifest_publication_and_latest(tmp_path):
    root = str(tmp_path / "wh")
    folder = persist.index_dir(root, "run-1", "similar_tracks")
    _, index, ids = shard()
    entries = [persist.write_shard(folder, s, index, ids) for s in (2, 0)]
    persist.write_manifest(folder, {"name": "similar_tracks", "shards": entries})
    manifest = persist.read_manifest(folder)
    assert [e["shard"] for e in manifest["shards"]] == [0, 2]
    assert persist.latest_run(root) is None
    persist.publish(root, "run-1")
    assert persist.latest_run(root) == "run-1"
    with pytest.raises(persist.IndexFileError):
        persist.read_manifest(persist.index_dir(root, "run-2", "similar_tracks"))


def test_vacuum_keeps_the_newest_runs_and_the_published_one(tmp_path):
    root = str(tmp_path / "wh")
    _, index, ids = shard(n=3)
    for run in ("r1", "r2", "r3", "r4"):
        persist.write_shard(persist.index_dir(root, run, "x"), 0, index, ids)
    persist.publish(root, "r1")
    assert persist.vacuum(root, keep=2) == ["r2"]
    left = sorted(os.listdir(persist.indexes_root(root)))
    assert left == ["LATEST", "r1", "r3", "r4"]


def test_the_worker_cache_holds_one_shard(tmp_path):
    folder = str(tmp_path / "idx")
    e0 = persist.write_shard(folder, 0, *shard(seed=0)[1:])
    e1 = persist.write_shard(folder, 1, *shard(seed=1)[1:])
    calls = []
    a = persist.cached_shard(folder, e0, lambda i, d: calls.append(1) or "derived")
    b = persist.cached_shard(folder, e0, lambda i, d: calls.append(1) or "derived")
    assert a[0] is b[0] and a[2] == "derived" and len(calls) == 1
    c = persist.cached_shard(folder, e1)
    assert c[1].column("id")[0].as_py() == "t1-0"
    assert len(persist._CACHE) == 1


def test_vectors_of_reads_list_columns_without_python_objects():
    col = pa.chunked_array([pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32())),
                            pa.array([[5.0, 6.0]], pa.list_(pa.float32()))])
    np.testing.assert_array_equal(persist.vectors_of(col), [[1, 2], [3, 4], [5, 6]])
    with pytest.raises(ValueError):
        persist.vectors_of(pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32())))
    assert persist.vectors_of(pa.array([], pa.list_(pa.float32())), 4).shape == (0, 4)


def test_names_from_a_manifest_or_latest_never_leave_the_index_folder(tmp_path):
    for bad in ("../other/shard-00000.faiss", "/etc/passwd", "..", ""):
        with pytest.raises(persist.IndexFileError, match="not a plain file name"):
            persist.plain_name(bad, "index file")
    root = tmp_path / "warehouse"
    (root / "indexes").mkdir(parents=True)
    (root / "indexes" / "LATEST").write_text("../../elsewhere\n")
    with pytest.raises(persist.IndexFileError, match="LATEST"):
        persist.latest_run(str(root))
    (root / "indexes" / "LATEST").write_text("neighbours-20261202T000000-abc\n")
    assert persist.latest_run(str(root)) == "neighbours-20261202T000000-abc"
