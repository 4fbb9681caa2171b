"""Recall of an approximate neighbour search on a sample of queries.

recall@k = sum over sampled queries of |exact_k(q) & approx_k(q)| / sum of |exact_k(q)|,
where exact_k is the exact search's top-k (what ``IndexFlatIP`` returns) and approx_k the
approximate index's.  Pooled over queries (not a mean of per-query ratios), so a query
with fewer than k candidates weighs what it holds.  The sample is a stable hash sample of
the query ids (``sample_fraction``), the same queries every run on the same catalogue.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from deepcuts.core.errors import GateFailed


def recall_at_k(exact: Mapping[object, Sequence], approx: Mapping[object, Sequence], k: int
                ) -> tuple[float | None, int]:
    """(recall@k, queries scored).  ``exact``/``approx``: query -> neighbour ids, best first
    (only the first ``k`` of each count).  A query absent from ``approx`` scores 0 hits;
    recall is None when no sampled query has an exact neighbour."""
    hits = total = queries = 0
    for q, truth in exact.items():
        truth = list(truth)[:k]
        if not truth:
            continue
        queries += 1
        total += len(truth)
        hits += len(set(truth) & set(list(approx.get(q, ()))[:k]))
    return (hits / total if total else None), queries


def lists_by_query(rows: Iterable[tuple[object, int, object]]) -> dict[object, list]:
    """query -> neighbour ids ordered by rank, from (query, rank, neighbour) rows."""
    grouped: dict[object, list[tuple[int, object]]] = {}
    for q, rank, neighbour in rows:
        grouped.setdefault(q, []).append((rank, neighbour))
    return {q: [n for _, n in sorted(v, key=lambda t: t[0])] for q, v in grouped.items()}


def sample_fraction(n_sample: int, n_queries: int) -> float:
    """The hash-sample fraction that scores about ``n_sample`` of ``n_queries`` queries."""
    if n_queries <= 0 or n_sample <= 0:
        return 0.0
    return min(1.0, n_sample / n_queries)


def check_recall(recall: float | None, min_recall: float, what: str) -> None:
    """Raise ``RecallTooLow`` when an approximate search misses the floor."""
    if recall is not None and recall < min_recall:
        raise RecallTooLow(f"{what}: recall@k {recall:.4f} is below neighbours.min_recall = {min_recall}; "
                           "nothing was published (raise nprobe / ef_search, or use index = 'flat')")


class RecallTooLow(GateFailed):
    """An approximate index's measured recall is under ``neighbours.min_recall``."""
