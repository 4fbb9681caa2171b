"""The evaluation protocol of van den Oord, Dieleman & Schrauwen (NIPS 2013, sec. 5.2), in
pure numpy: the reference metrics, and the counting kernel that the Spark runner
(:mod:`deepcuts.evaluation.runner`) executes block by block.

Per user ``u`` with a latent vector ``x_u``:

* Candidates ``C_u``: the split's candidate tracks (cold split: the held-out tracks that have
  a mel; validation: the CNN's validation tracks; warm: every known track minus the ones
  ``u`` played in training).  Each candidate ``i`` is scored ``s_ui = x_u . y_i``; a
  candidate the predictor has no vector for scores ``-inf`` (it ranks last, and the
  predictor is not excused from it).
* Positives ``P_u``: the candidates ``u`` played in the held-out data; the other candidates
  are negatives ``N_u``.  Users without a positive or without a negative are skipped (AUC is
  undefined for them) and counted.
* Ranking: candidates by descending score; a negative that ties a positive ranks ahead of it
  (pessimistic: a constant predictor cannot look good).
* ``AP@k(u) = 1 / min(|P_u|, k) * sum over positives i ranked <= k of precision@rank(i)``,
  ``precision@r`` being the share of positives among the top ``r``.
* ``AUC(u)``: the share of (positive, negative) pairs where the positive scores higher, ties
  counting one half (the Mann-Whitney statistic).
* ``mAP@k`` and ``AUC``: the means of ``AP@k(u)`` and ``AUC(u)`` over the scored users.

Two implementations, tested against each other (to 1e-9):

* The reference (``average_precision_at_k``, ``auc``, ``user_metrics``,
  ``evaluate_reference``) states the definitions directly: AP@k from the top k found with
  ``argpartition`` (O(C)), AUC from the midranks of all candidates (one sort, O(C log C)).
* The scalable kernel needs only, per positive ``j`` of ``u``, the number of negatives that
  score ``>= s_uj`` and ``> s_uj``.  Those counts *add up over any partition of the
  candidates*, so candidates are cut into blocks: ``block_counts`` counts one block for a
  chunk of users (one sort of each score row, O(m log m) for a block of m candidates), and
  ``metrics_from_counts`` turns the summed counts into AP@k (the exact rank of positive j
  is ``j + 1 + negatives >= s_uj``) and AUC.  No task ever holds more than one block.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

COLD = "cold"
VALIDATION = "validation"
WARM = "warm"

# Scores held at once by the kernel (float64): 4e6 cells = 32 MB, plus the sorted copy.
SCORE_CELLS_PER_CHUNK = 4_000_000


# --- the reference: one user, every candidate in memory -------------------------------------
def _inputs(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError("scores and positive must be 1-D and of the same length")
    return np.where(np.isnan(scores), -np.inf, scores), positive


def average_precision_at_k(scores, positive, k: int) -> float:
    """AP@k of one user's candidates (module docstring); NaN without a positive.

    The top k by ``argpartition``; ties at the k-th score are filled negatives first, and
    the top k ordered by (score descending, negatives before positives)."""
    scores, positive = _inputs(scores, positive)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    k_eff = min(int(k), len(scores))
    kth = scores[np.argpartition(-scores, k_eff - 1)[k_eff - 1]]
    above = np.flatnonzero(scores > kth)
    tied = np.flatnonzero(scores == kth)
    tied = tied[np.argsort(positive[tied], kind="stable")]          # negatives first
    top = np.concatenate([above, tied[:k_eff - len(above)]])
    top = top[np.lexsort((positive[top], -scores[top]))]             # score desc, negatives first
    ranks = np.flatnonzero(positive[top]) + 1
    hits = np.arange(1, len(ranks) + 1)
    return float((hits / ranks).sum() / min(n_pos, int(k)))


def auc(scores, positive) -> float:
    """AUC of one user's candidates (module docstring) from midranks; NaN without a positive
    or a negative."""
    scores, positive = _inputs(scores, positive)
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])   # -inf == -inf: one group
    ends = np.r_[starts[1:], len(ordered)]
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)   # 1-based midranks
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def user_metrics(scores, positive, k: int) -> tuple[float, float]:
    """(AP@k, AUC) of one user; both NaN where AUC is undefined (no positive or no negative)."""
    area = auc(scores, positive)
    if np.isnan(area):
        return float("nan"), float("nan")
    return average_precision_at_k(scores, positive, k), area


def score_matrix(user_vectors: np.ndarray, track_matrix: np.ndarray) -> np.ndarray:
    """``users x tracks`` scores in float64; tracks without a vector (NaN rows) score -inf."""
    tracks = np.asarray(track_matrix, dtype=np.float64)
    missing = np.isnan(tracks).any(axis=1)
    scores = np.asarray(user_vectors, dtype=np.float64) @ np.where(missing[:, None], 0.0, tracks).T
    scores[:, missing] = -np.inf
    return scores


def evaluate_reference(user_vectors: np.ndarray, track_ids: Sequence[str], track_matrix: np.ndarray,
                       positives: Sequence[Sequence[str]], k: int,
                       excluded: Sequence[Sequence[str] | None] | None = None) -> dict:
    """The protocol over whole score rows: mAP@k, AUC, n_users (scored), n_users_skipped,
    and per-user ``ap``/``auc`` arrays (NaN for skipped users).

    ``track_ids``/``track_matrix``: the candidates (NaN rows: no vector).  ``positives``:
    per user, track ids (ids outside the candidates are ignored).  ``excluded``: per user,
    track ids removed from the candidates (positives stay)."""
    index = {t: i for i, t in enumerate(track_ids)}
    n_tracks = len(track_ids)
    aps, aucs = [], []
    for u, row in enumerate(score_matrix(np.atleast_2d(user_vectors), track_matrix)):
        positive = np.zeros(n_tracks, dtype=bool)
        positive[[index[t] for t in positives[u] if t in index]] = True
        keep = np.ones(n_tracks, dtype=bool)
        if excluded is not None and excluded[u] is not None:
            keep[[index[t] for t in excluded[u] if t in index]] = False
        keep |= positive
        ap, area = user_metrics(row[keep], positive[keep], k)
        aps.append(ap)
        aucs.append(area)
    aps, aucs = np.asarray(aps, dtype=np.float64), np.asarray(aucs, dtype=np.float64)
    ok = ~np.isnan(aucs)
    return {"map_at_k": float(aps[ok].mean()) if ok.any() else None,
            "auc": float(aucs[ok].mean()) if ok.any() else None,
            "n_users": int(ok.sum()), "n_users_skipped": int((~ok).sum()), "ap": aps, "aucs": aucs}


# --- the scalable kernel: counts that add up over candidate blocks --------------------------
def block_counts(user_vectors: np.ndarray, positive_scores: Sequence[np.ndarray],
                 removed: Sequence[np.ndarray], block: np.ndarray
                 ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per user of a chunk, against one block of candidates: for each positive ``j``, the
    block's negatives scoring ``>= positive_scores[u][j]`` and ``>`` it, and the number of
    the block's negatives.

    ``block``: [m, rank] candidate vectors (NaN rows: no vector, score -inf).  ``removed[u]``:
    column indices into the block that are not negatives of ``u`` (its positives and its
    excluded tracks that lie in this block).  Scores are float64; users are processed in
    chunks of at most ``SCORE_CELLS_PER_CHUNK`` cells."""
    users = np.atleast_2d(np.asarray(user_vectors, dtype=np.float64))
    m = block.shape[0]
    ge_all: list[np.ndarray] = []
    gt_all: list[np.ndarray] = []
    n_neg = np.zeros(len(users), dtype=np.int64)
    step = max(1, SCORE_CELLS_PER_CHUNK // max(1, m))
    for start in range(0, len(users), step):
        scores = score_matrix(users[start:start + step], block)
        ordered = np.sort(scores, axis=1)
        for offset in range(len(scores)):
            u = start + offset
            p = np.asarray(positive_scores[u], dtype=np.float64)
            cols = np.unique(np.asarray(removed[u], dtype=np.int64))
            gone = scores[offset, cols]
            # counts over the whole row, minus the row's non-negatives (same values: exact)
            ge = (m - np.searchsorted(ordered[offset], p, side="left")
                  - (gone[None, :] >= p[:, None]).sum(axis=1))
            gt = (m - np.searchsorted(ordered[offset], p, side="right")
                  - (gone[None, :] > p[:, None]).sum(axis=1))
            ge_all.append(ge.astype(np.int64))
            gt_all.append(gt.astype(np.int64))
            n_neg[u] = m - len(cols)
    return ge_all, gt_all, n_neg


def metrics_from_counts(positive_scores: np.ndarray, ge: np.ndarray, gt: np.ndarray, n_neg: int,
                        k: int) -> tuple[float, float]:
    """(AP@k, AUC) of one user from the counts of ``block_counts`` summed over every block:
    ``ge[j]`` / ``gt[j]`` negatives score ``>=`` / ``>`` positive j, ``n_neg`` negatives in
    all.  NaN, NaN where AUC is undefined."""
    p = np.asarray(positive_scores, dtype=np.float64)
    n_pos = len(p)
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    ge = np.asarray(ge, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    ranks = np.arange(1, n_pos + 1) + ge[order]          # positives ahead + negatives ahead
    hits = ranks <= k
    ap = (np.arange(1, n_pos + 1)[hits] / ranks[hits]).sum() / min(n_pos, int(k))
    beaten = (n_neg - ge) + 0.5 * (ge - gt)               # strictly below, ties half
    return float(ap), float(beaten.sum() / (n_pos * n_neg))
