"""knn.search: one (block x shard) FAISS search, checked against brute-force numpy."""
from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from deepcuts.knn.search import (IndexSpec, build_index, effective_nlist, exact_view, search_pair,  # noqa: E402
                                 set_threads, train_coarse)


def clustered(n: int, dim: int, seed: int, centres: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(queries, items, k, banned=None):
    """Top-k rows and scores by numpy, ``banned`` a bool [nq, n] mask of excluded items."""
    s = queries.astype(np.float64) @ items.astype(np.float64).T
    if banned is not None:
        s = np.where(banned, -np.inf, s)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def test_flat_equals_brute_force():
    items, queries = clustered(500, 16, 0), clustered(40, 16, 1)
    scores, rows = search_pair(build_index(items, IndexSpec()), queries, 7, IndexSpec())
    want_s, want_r = brute(queries, items, 7)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    assert (rows == want_r).mean() > 0.99          # near-ties may swap
    assert scores.dtype == np.float32 and rows.dtype == np.int64


def test_excluded_pairs_are_never_returned_and_the_rest_is_exact():
    items, queries = clustered(300, 8, 2), clustered(25, 8, 3)
    rng = np.random.default_rng(4)
    banned = np.zeros((25, 300), dtype=bool)
    # Some queries exclude a few items, one excludes far more than k (several over-fetch buckets),
    # and the excluded items are each query's *best* ones, the hardest case.
    best = np.argsort(-(queries @ items.T), axis=1)
    for q in range(25):
        n = [0, 1, 3, 9, 40][q % 5] if q != 7 else 200
        banned[q, best[q, :n]] = True
        banned[q, rng.choice(300, 2, replace=False)] = True
    q_rows, i_rows = np.nonzero(banned)
    scores, rows = search_pair(build_index(items, IndexSpec()), queries, 10, IndexSpec(),
                               excluded=(q_rows, i_rows))
    assert not banned[np.arange(25)[:, None], rows].any()
    want_s, _ = brute(queries, items, 10, banned)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    assert (rows >= 0).all()


def test_allowed_mask_searches_only_those_items():
    items, queries = clustered(400, 12, 5), clustered(30, 12, 6)
    allowed = np.random.default_rng(7).random(400) < 0.25
    for spec in (IndexSpec(), IndexSpec(kind="hnsw", hnsw_m=16, ef_search=64)):
        scores, rows = search_pair(build_index(items, spec), queries, 5, spec, allowed=allowed)
        assert allowed[rows].all()
    want_s, _ = brute(queries, items, 5, np.broadcast_to(~allowed, (30, 400)))
    np.testing.assert_allclose(search_pair(build_index(items, IndexSpec()), queries, 5, IndexSpec(),
                                           allowed=allowed)[0], want_s, atol=1e-5)
    none = search_pair(build_index(items, IndexSpec()), queries, 5, IndexSpec(), allowed=np.zeros(400, bool))
    assert (none[1] == -1).all()


def test_k_larger_than_the_shard_pads_with_minus_one():
    items, queries = clustered(6, 8, 8), clustered(3, 8, 9)
    scores, rows = search_pair(build_index(items, IndexSpec()), queries, 10, IndexSpec())
    assert (rows[:, :6] >= 0).all() and (rows[:, 6:] == -1).all()
    assert np.isneginf(scores[:, 6:]).all()
    assert sorted(rows[0, :6]) == list(range(6))
    empty = search_pair(build_index(np.zeros((0, 8), np.float32), IndexSpec()), queries, 4, IndexSpec())
    assert (empty[1] == -1).all()


def test_ivf_shards_share_one_trained_quantiser_and_full_probe_is_exact():
    items = clustered(4000, 16, 10)
    spec = IndexSpec(kind="ivf", nlist=32, nprobe=32)
    coarse = train_coarse(items[::2], spec)
    a, b = build_index(items[:1500], spec, coarse), build_index(items[1500:], spec, coarse)
    qa = faiss.downcast_index(faiss.extract_index_ivf(a).quantizer)
    qb = faiss.downcast_index(faiss.extract_index_ivf(b).quantizer)
    np.testing.assert_array_equal(faiss.rev_swig_ptr(qa.get_xb(), 32 * 16),
                                  faiss.rev_swig_ptr(qb.get_xb(), 32 * 16))
    assert a.ntotal == 1500 and b.ntotal == 2500
    queries = clustered(50, 16, 11)
    scores, _ = search_pair(a, queries, 10, spec)            # nprobe = nlist: every cell
    np.testing.assert_allclose(scores, brute(queries, items[:1500], 10)[0], atol=1e-5)
    with pytest.raises(ValueError, match="coarse"):
        build_index(items, spec)


def test_effective_nlist_caps_cells_for_small_catalogues():
    spec = IndexSpec(kind="ivf", nlist=1024)
    assert effective_nlist(spec, 320) == 8
    assert effective_nlist(spec, 10) == 1
    assert effective_nlist(spec, 10**6) == 1024
    index = faiss.deserialize_index(np.frombuffer(train_coarse(clustered(320, 8, 12), spec), np.uint8))
    assert faiss.extract_index_ivf(index).nlist == 8


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_exact_view_is_exact_for_approximate_indexes(kind):
    items, queries = clustered(2000, 16, 13), clustered(40, 16, 14)
    spec = IndexSpec(kind=kind, nlist=16, nprobe=1, hnsw_m=8, ef_search=16)
    index = build_index(items, spec, train_coarse(items, spec) if kind == "ivf" else None)
    scores, rows = search_pair(exact_view(index), queries, 10, IndexSpec())
    np.testing.assert_allclose(scores, brute(queries, items, 10)[0], atol=1e-5)


def test_hnsw_with_a_wide_beam_finds_nearly_everything():
    items, queries = clustered(3000, 16, 15), clustered(100, 16, 16)
    spec = IndexSpec(kind="hnsw", hnsw_m=16, ef_construction=100, ef_search=200)
    _, rows = search_pair(build_index(items, spec), queries, 10, spec)
    _, want = brute(queries, items, 10)
    hits = sum(len(set(a) & set(b)) for a, b in zip(rows, want))
    assert hits / want.size > 0.97


def test_threads_follow_the_request():
    set_threads(1)
    assert faiss.omp_get_max_threads() == 1
    set_threads(2)
    assert faiss.omp_get_max_threads() == 2


def test_unknown_index_type_is_refused():
    with pytest.raises(ValueError, match="index type"):
        IndexSpec(kind="lsh")
