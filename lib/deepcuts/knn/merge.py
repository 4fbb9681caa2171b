"""Merge each query's per-shard top-k lists into its global top-k.

Every shard returned its best ``k + 1`` (``search.search_pair``); the global top-k of a
query is the top-k of the union of its lists, because any global top-k item is in the
top-k of its own shard.  The merge is exact and deterministic: candidates are ordered by
score (descending), then by neighbour id (ascending), so equal scores always come out in
the same order and a rerun writes the same table.  ``exclude_self`` drops the query's own
id (the ``+ 1`` each shard fetched).  ``faiss.ResultHeap`` does the same for integer ids
(tests check the two agree); the ids here are catalogue track ids, so the merge is a sort.
"""
from __future__ import annotations

import numpy as np


def merge_topk(query: np.ndarray, neighbour: np.ndarray, score: np.ndarray, k: int,
               query_ids: np.ndarray | None = None, exclude_self: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The global top-``k`` per query of candidates pooled from every shard.

    ``query`` (int, the query's row), ``neighbour`` (ids), ``score``: one entry per
    candidate, in any order.  With ``exclude_self``, entries whose neighbour is
    ``query_ids[query]`` are dropped.  Returns (query, rank 1..k, neighbour, score, source
    index) sorted by query then rank, plus the index of each kept entry in the input (to
    carry other per-candidate columns along).
    """
    query = np.asarray(query, dtype=np.int64)
    neighbour = np.asarray(neighbour, dtype=object)
    score = np.asarray(score, dtype=np.float32)
    position = np.arange(len(query))
    if exclude_self:
        if query_ids is None:
            raise ValueError("exclude_self needs query_ids")
        keep = neighbour != np.asarray(query_ids, dtype=object)[query]
        query, neighbour, score, position = query[keep], neighbour[keep], score[keep], position[keep]
    if len(query) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.astype(np.int32), neighbour[:0], score[:0], empty
    # Fixed-width unicode sorts much faster than Python objects, and orders the same.
    order = np.lexsort((neighbour.astype(str), -score, query))
    query, neighbour, score, position = query[order], neighbour[order], score[order], position[order]
    starts = np.flatnonzero(np.r_[True, query[1:] != query[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(query)]))
    rank = np.arange(len(query)) - group_start + 1
    keep = rank <= k
    return query[keep], rank[keep].astype(np.int32), neighbour[keep], score[keep], position[keep]
