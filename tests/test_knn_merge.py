"""knn.merge: per-query top-k of pooled shard lists, deterministic ties, self excluded."""
from __future__ import annotations

import numpy as np
import pytest

from deepcuts.knn.merge import merge_topk


def test_equals_faiss_result_heap_on_integer_ids():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    nq, k, shards = 30, 6, 5
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    q_all, id_all, s_all = [], [], []
    next_id = 0
    for _ in range(shards):
        width = int(rng.integers(1, 9))       # some shards return fewer than k
        scores = np.sort(rng.random((nq, width)).astype(np.float32), axis=1)[:, ::-1].copy()
        ids = next_id + np.arange(nq * width).reshape(nq, width)
        next_id += nq * width
        heap.add_result(scores, ids)
        q_all.append(np.repeat(np.arange(nq), width))
        id_all.append(ids.reshape(-1))
        s_all.append(scores.reshape(-1))
    heap.finalize()
    q, rank, neighbour, score, _ = merge_topk(np.concatenate(q_all), np.concatenate(id_all).astype(str),
                                              np.concatenate(s_all), k)
    for query in range(nq):
        mine = q == query
        want = [str(i) for i in heap.I[query] if i >= 0]
        assert list(neighbour[mine]) == want
        np.testing.assert_allclose(score[mine], heap.D[query][: len(want)])
        assert list(rank[mine]) == list(range(1, len(want) + 1))


def test_ties_are_broken_by_neighbour_id_whatever_the_input_order():
    q = np.array([0, 0, 0, 0, 1, 1, 1])
    ids = np.array(["t9", "t1", "t5", "t3", "b", "a", "c"], dtype=object)
    scores = np.array([0.5, 0.5, 0.9, 0.5, 0.1, 0.1, 0.1], dtype=np.float32)
    first = merge_topk(q, ids, scores, 3)
    assert list(first[2]) == ["t5", "t1", "t3", "a", "b", "c"]
    rng = np.random.default_rng(1)
    for _ in range(5):
        p = rng.permutation(len(q))
        again = merge_topk(q[p], ids[p], scores[p], 3)
        assert list(again[2]) == list(first[2]) and list(again[0]) == list(first[0])


def test_self_is_excluded_wherever_it_ranks():
    q = np.array([0, 0, 0, 1, 1, 1])
    ids = np.array(["x", "a", "b", "c", "y", "d"], dtype=object)
    scores = np.array([1.0, 0.8, 0.7, 0.9, 0.85, 0.2], dtype=np.float32)
    q_out, rank, neighbour, score, pos = merge_topk(q, ids, scores, 2, query_ids=np.array(["x", "y"]),
                                                    exclude_self=True)
    assert list(neighbour) == ["a", "b", "c", "d"]
    assert list(rank) == [1, 2, 1, 2] and list(q_out) == [0, 0, 1, 1]
    assert list(ids[pos]) == list(neighbour)          # positions carry other columns along
    with pytest.raises(ValueError):
        merge_topk(q, ids, scores, 2, exclude_self=True)


def test_fewer_candidates_than_k_and_nothing_at_all():
    q, rank, neighbour, _, _ = merge_topk(np.array([3, 3]), np.array(["a", "b"], dtype=object),
                                          np.array([0.1, 0.2], np.float32), 10)
    assert list(neighbour) == ["b", "a"] and list(rank) == [1, 2] and list(q) == [3, 3]
    empty = merge_topk(np.zeros(0, int), np.zeros(0, object), np.zeros(0, np.float32), 5)
    assert all(len(a) == 0 for a in empty)
