"""Label metrics of a labels model (content-only mode), and what chance scores on them.

* **label precision@k** of the embeddings' neighbours, per label L: over the query tracks
  that carry L, the mean share of their k nearest tracks (by cosine over the unit
  embeddings, the query excluded) that carry L too.  Over all labels: the same over every
  (query, label of the query) pair.  A random neighbour list of a query with L draws from
  the N - 1 other tracks, n_L - 1 of which carry L: chance is (n_L - 1) / (N - 1).
* **top-k label accuracy**: the share of tracks with at least one true label among their k
  most probable labels.  A random ranking of the V labels misses all m true labels of a
  track with probability C(V - m, k) / C(V, k): chance is 1 minus that.

The Spark side (``deepcuts.stages.content``) aggregates counts in the executors and calls
the chance formulas on the driver with per-label counts only; the numpy references below are
what the tests check it against.
"""
from __future__ import annotations

from math import comb
from typing import Iterable, Mapping, Sequence

PRECISION = "label_precision_at_k"


def accuracy_metric(k: int) -> str:
    return f"top{int(k)}_accuracy"


def precision_chance(n_with_label: int, n_items: int) -> float | None:
    """Expected share of a random neighbour list of a track with label L that carries L:
    (n_L - 1) / (N - 1), the query itself excluded (None when N < 2)."""
    if n_items < 2:
        return None
    return max(0, n_with_label - 1) / (n_items - 1)


def topk_chance(n_labels: int, n_true: int, k: int) -> float:
    """P(at least one of ``n_true`` true labels among the first ``k`` of a random ranking of
    ``n_labels``) = 1 - C(V - m, k) / C(V, k)."""
    v, m = int(n_labels), min(int(n_true), int(n_labels))
    k = min(int(k), v)
    if m <= 0 or v <= 0:
        return 0.0
    return 1.0 - comb(v - m, k) / comb(v, k)


# --- numpy / plain-Python references ----------------------------------------------------------
def label_precision_at_k(neighbours: Mapping[str, Sequence[str]], labels: Mapping[str, Iterable[str]],
                         k: int) -> tuple[dict[str, tuple[float, int]], tuple[float | None, int]]:
    """({label: (precision@k, n_queries)}, (over all labels, n_pairs)) of ``neighbours``
    (query -> neighbour ids, nearest first).  A query's precision divides by the neighbours
    it has (at most k): a catalogue smaller than k + 1 still scores a full list as 1."""
    per: dict[str, list[float]] = {}
    for query, found in neighbours.items():
        found = list(found)[:k]
        if not found:
            continue
        for label in set(labels.get(query, ())):
            hits = sum(1 for n in found if label in set(labels.get(n, ())))
            per.setdefault(label, []).append(hits / len(found))
    out = {label: (sum(v) / len(v), len(v)) for label, v in per.items()}
    pairs = [x for v in per.values() for x in v]
    return out, ((sum(pairs) / len(pairs)) if pairs else None, len(pairs))


def topk_accuracy(ranked: Sequence[Sequence[str]], truth: Sequence[Iterable[str]], k: int) -> float | None:
    """Share of tracks with a true label among their first ``k`` ranked labels."""
    rows = [(list(r)[:k], set(t)) for r, t in zip(ranked, truth) if set(t)]
    if not rows:
        return None
    return sum(1 for r, t in rows if t.intersection(r)) / len(rows)
