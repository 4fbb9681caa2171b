"""Keep every ALS fit in one latent space: orthogonal Procrustes onto the previous fit.

Implicit ALS factors are defined only up to a rotation: refit on tonight's plays and the
factors are as good but turned, so a CNN trained on last night's factors would predict
vectors in the wrong space.  Each new fit is rotated onto the previous published one,

    R = argmin_{RᵀR = I} ‖Y_new R − Y_prev‖_F  over the tracks both fits share,
    R = U Vᵀ where Y_newᵀ Y_prev = U S Vᵀ,

and R is applied to the users and the tracks alike, so every xᵀy (every recommendation) is
unchanged.  Everything needed is one pass of sums over the shared tracks: the cross
product Y_newᵀY_prev (rank × rank) and the two squared norms; the relative residual
‖Y_new R − Y_prev‖ / ‖Y_prev‖ follows from them (‖A‖² + ‖B‖² − 2 tr S).  The sums are
partial per partition and summed on the driver: rank² numbers per partition, whatever the
catalogue's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Alignment:
    rotation: np.ndarray        # rank x rank, orthogonal: aligned = factors @ rotation
    residual: float             # ‖Y_new R − Y_prev‖_F / ‖Y_prev‖_F over the shared tracks
    unaligned_residual: float   # the same without the rotation (how far the refit turned)
    shared_tracks: int


def procrustes(cross: np.ndarray, new_sq: float, prev_sq: float, shared: int) -> Alignment:
    """The rotation and residuals from the sums (see the module docstring)."""
    u, s, vt = np.linalg.svd(cross)
    rotation = u @ vt
    scale = max(prev_sq, 1e-30)
    residual = np.sqrt(max(new_sq + prev_sq - 2.0 * s.sum(), 0.0) / scale)
    unaligned = np.sqrt(max(new_sq + prev_sq - 2.0 * np.trace(cross), 0.0) / scale)
    return Alignment(rotation.astype(np.float64), float(residual), float(unaligned), int(shared))


def fit(new: np.ndarray, prev: np.ndarray) -> Alignment:
    """Procrustes of two (n, rank) arrays of the same tracks (the in-memory form, for tests)."""
    new, prev = np.asarray(new, np.float64), np.asarray(prev, np.float64)
    return procrustes(new.T @ prev, float((new * new).sum()), float((prev * prev).sum()), len(new))


def partial_sums(rank: int):
    """A ``mapInPandas`` function over (new, prev) vector pairs -> one row of partial sums."""
    def sums(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        cross = np.zeros((rank, rank))
        new_sq = prev_sq = 0.0
        n = 0
        for batch in batches:
            if batch.empty:
                continue
            a = np.stack(batch["new"].to_numpy()).astype(np.float64)
            b = np.stack(batch["prev"].to_numpy()).astype(np.float64)
            cross += a.T @ b
            new_sq += float((a * a).sum())
            prev_sq += float((b * b).sum())
            n += len(a)
        yield pd.DataFrame({"cross": [cross.ravel().tolist()], "new_sq": [new_sq], "prev_sq": [prev_sq],
                            "n": [n]})
    return sums


SUMS_SCHEMA = "cross array<double>, new_sq double, prev_sq double, n long"


def align_to(new_tracks, prev_tracks, rank: int) -> Alignment | None:
    """The alignment of the Spark frame ``new_tracks`` (track_id, factors) onto ``prev_tracks``;
    None when they share no track."""
    from pyspark.sql import functions as F
    pairs = new_tracks.select("track_id", F.col("factors").alias("new")) \
        .join(prev_tracks.select("track_id", F.col("factors").alias("prev")), "track_id") \
        .select("new", "prev")
    parts = pairs.mapInPandas(partial_sums(rank), SUMS_SCHEMA).collect()  # one small row per partition
    n = sum(int(r["n"]) for r in parts)
    if n == 0:
        return None
    cross = sum(np.asarray(r["cross"], np.float64).reshape(rank, rank) for r in parts if r["n"])
    return procrustes(cross, sum(r["new_sq"] for r in parts), sum(r["prev_sq"] for r in parts), n)


def rotate_batch(vectors: pd.Series, rotation: np.ndarray) -> pd.Series:
    """A batch of vectors times ``rotation`` (the pure core of :func:`rotate`)."""
    if vectors.empty:
        return pd.Series([], dtype=object)
    turned = np.stack(vectors.to_numpy()).astype(np.float64) @ rotation
    return pd.Series(list(turned.astype(np.float32)))


def rotate(column, rotation: np.ndarray):
    """Spark expression: the array<float> ``column`` times ``rotation``.  A vectorised pandas
    UDF (one matrix product per Arrow batch): 3x faster here than the same product in SQL
    higher-order functions, which interpret rank² multiply-adds per row."""
    from pyspark.sql.functions import pandas_udf
    matrix = np.asarray(rotation, np.float64)

    @pandas_udf("array<float>")
    def turn(vectors: pd.Series) -> pd.Series:
        return rotate_batch(vectors, matrix)
    return turn(column)


def lineage(links: dict[str, str | None], current: str) -> list[str]:
    """The factors runs whose space ``current`` is in: itself, the run it was aligned to, that
    run's own, ... until a fit that started a new space.  ``links``: run -> aligned_to_run_id."""
    chain, run = [], current
    while run is not None and run not in chain:
        chain.append(run)
        run = links.get(run)
    return chain


def current_lineage(ctx, factors_table, alignments_table) -> tuple[str | None, list[str]]:
    """(the current factors run, the runs in its space) for a stage that declared both tables:
    one small row per factors run is read."""
    info = ctx.version_info(factors_table)
    current = info[0] if info else None
    if not current or not ctx.exists(alignments_table):
        return current, [current] if current else []
    links = {r["factors_run_id"]: r["aligned_to_run_id"]
             for r in ctx.read(alignments_table).select("factors_run_id", "aligned_to_run_id").collect()}
    return current, lineage(links, current)


CURRENT_SPACE, ALIGNED_SPACE, UNTRACKED_SPACE, OTHER_SPACE = "current", "aligned", "untracked", "other"


def model_space(model_run: str | None, current: str | None, chain: list[str]) -> str:
    """Where a model trained on factors run ``model_run`` stands against the current fit:
    "current", "aligned" (an earlier fit of the same space), "untracked" (either is unknown)
    or "other" (a space the current fit was not aligned to: not servable)."""
    if not model_run or not current:
        return UNTRACKED_SPACE
    if model_run == current:
        return CURRENT_SPACE
    return ALIGNED_SPACE if model_run in chain else OTHER_SPACE
