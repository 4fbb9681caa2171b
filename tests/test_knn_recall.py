"""knn.recall: pooled recall@k of approximate lists against exact ones."""
from __future__ import annotations

import pytest

from deepcuts.knn.recall import RecallTooLow, check_recall, lists_by_query, recall_at_k, sample_fraction


def test_recall_is_pooled_over_queries_not_a_mean_of_ratios():
    exact = {"q1": ["a", "b", "c", "d"], "q2": ["e"]}
    approx = {"q1": ["a", "b", "x", "y"], "q2": ["z"]}
    # pooled: (2 + 0) / (4 + 1) = 0.4; a mean of ratios would say (0.5 + 0) / 2 = 0.25
    assert recall_at_k(exact, approx, 4) == (pytest.approx(0.4), 2)


def test_only_the_first_k_count_and_order_inside_k_does_not():
    exact = {"q": ["a", "b", "c", "d"]}
    assert recall_at_k(exact, {"q": ["b", "a", "d", "c"]}, 2) == (1.0, 1)
    assert recall_at_k(exact, {"q": ["c", "d", "a", "b"]}, 2) == (0.0, 1)


def test_a_query_missing_from_the_approximate_side_scores_zero():
    assert recall_at_k({"q1": ["a"], "q2": ["b"]}, {"q1": ["a"]}, 1) == (0.5, 2)


def test_no_exact_neighbours_means_no_recall():
    assert recall_at_k({}, {"q": ["a"]}, 3) == (None, 0)
    assert recall_at_k({"q": []}, {"q": ["a"]}, 3) == (None, 0)


def test_lists_are_ordered_by_rank():
    rows = [("q", 2, "b"), ("q", 1, "a"), ("r", 1, "c"), ("q", 3, "z")]
    assert lists_by_query(rows) == {"q": ["a", "b", "z"], "r": ["c"]}


def test_sample_fraction():
    assert sample_fraction(1000, 10_000) == 0.1
    assert sample_fraction(1000, 10) == 1.0
    assert sample_fraction(0, 10) == 0.0 and sample_fraction(5, 0) == 0.0


def test_the_floor_fails_with_a_clear_message():
    check_recall(0.95, 0.9, "similar_tracks")
    check_recall(None, 0.9, "similar_tracks")
    with pytest.raises(RecallTooLow, match="similar_tracks: recall@k 0.8000 is below neighbours.min_recall"):
        check_recall(0.8, 0.9, "similar_tracks")
