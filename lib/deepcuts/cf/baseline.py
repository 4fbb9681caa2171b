"""The paper's baseline (van den Oord, Dieleman & Schrauwen 2013, sec. 4.1), pure numpy: the
standard MIR pipeline the CNN has to beat.

1. Per frame, 13 MFCCs + their first and second time differences (39 numbers), from the
   stored log-mel (``mels``: 10 log10 power, no second decode): an orthonormal DCT-II over
   the mel bands, as ``librosa.feature.mfcc(S=log_mel)``; deltas by Savitzky-Golay as
   ``librosa.feature.delta`` (width 9, ``mode="interp"``).
2. The 39 features are standardised (mean/std of the K-means sample: MFCC 0 is a loudness
   in the hundreds of dB, the deltas are near 0; unscaled, K-means would quantise loudness)
   and vector-quantised against a K-means codebook (the stage fits it with Spark MLlib).
3. Each track is a bag of words: the share of its frames assigned to each codeword.
4. PCA keeps the components explaining ``pca_variance`` of the training tracks' histograms.
5. Closed-form ridge regression from those components to the unit-normalised ALS factors of
   the training tracks; ``ridge`` is relative to the mean variance of the kept components.

Only moments (k x k and smaller) ever cross from the executors to the driver: the stage
sums ``cross_moments`` partials, this module turns them into the PCA basis and the ridge
solution, and ``BaselineModel.predict`` runs in the executors again.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from deepcuts.core.spark import add_moments  # noqa: F401  (partials of cross_moments add up; re-exported)

N_FEATURES_PER_MFCC = 3      # the coefficient, its delta, its delta-delta

# Reason codes of baseline_rejects.
MEL_SIZE_MISMATCH = "mel_size_mismatch"
NON_FINITE_MEL = "non_finite_mel"
TOO_SHORT = "too_short"      # fewer frames than the delta window
REASONS = (MEL_SIZE_MISMATCH, NON_FINITE_MEL, TOO_SHORT)


class RejectedMel(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# --- features --------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def dct_matrix(n_mels: int, n_mfcc: int) -> np.ndarray:
    """[n_mfcc, n_mels] rows of the orthonormal DCT-II (scipy's ``dct(type=2, norm="ortho")``)."""
    n = np.arange(n_mels)
    k = np.arange(n_mfcc)[:, None]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_mels)) * np.sqrt(2.0 / n_mels)
    basis[0] /= np.sqrt(2.0)
    return basis


def mfcc(log_mel: np.ndarray, n_mfcc: int) -> np.ndarray:
    """[n_mfcc, n_frames] MFCCs of a [n_mels, n_frames] log-mel in dB (float64)."""
    log_mel = np.asarray(log_mel, dtype=np.float64)
    return dct_matrix(log_mel.shape[0], n_mfcc) @ log_mel


def delta(data: np.ndarray, width: int, order: int) -> np.ndarray:
    """``librosa.feature.delta(data, width=width, order=order)`` along time (axis -1)."""
    import scipy.signal
    return scipy.signal.savgol_filter(data, width, polyorder=order, deriv=order, axis=-1, mode="interp")


def frame_features(log_mel: np.ndarray, n_mfcc: int, delta_width: int) -> np.ndarray:
    """[n_frames, 3 * n_mfcc] per-frame MFCC, delta, delta-delta (float32)."""
    coeffs = mfcc(log_mel, n_mfcc)
    if coeffs.shape[1] < delta_width:
        raise RejectedMel(TOO_SHORT, f"{coeffs.shape[1]} frames < the delta width {delta_width}")
    stacked = np.concatenate([coeffs, delta(coeffs, delta_width, 1), delta(coeffs, delta_width, 2)], axis=0)
    return np.ascontiguousarray(stacked.T, dtype=np.float32)


def stored_mel_features(mel_bytes, n_mels: int, n_frames: int, n_mfcc: int, delta_width: int) -> np.ndarray:
    """``frame_features`` of a stored mel (float16 bytes, row-major n_mels x n_frames);
    RejectedMel for bytes that do not match the shape, non-finite values, too few frames."""
    n_bytes = 0 if mel_bytes is None else len(mel_bytes)
    if mel_bytes is None or n_mels <= 0 or n_frames <= 0 or n_bytes != 2 * n_mels * n_frames:
        raise RejectedMel(MEL_SIZE_MISMATCH, f"{n_bytes} bytes for {n_mels}x{n_frames} float16")
    mel = np.frombuffer(mel_bytes, dtype=np.float16).reshape(n_mels, n_frames)
    if not np.isfinite(mel).all():
        raise RejectedMel(NON_FINITE_MEL, f"{int((~np.isfinite(mel)).sum())} non-finite values")
    return frame_features(mel, n_mfcc, delta_width)


def sample_frames(n_frames: int, n: int, seed: int, track_id: str) -> np.ndarray:
    """Sorted indices of ``n`` frames of a track, a function of (seed, track id) alone."""
    rng = np.random.default_rng([seed, zlib.crc32(track_id.encode())])
    if n >= n_frames:
        return np.arange(n_frames)
    return np.sort(rng.choice(n_frames, n, replace=False))


# --- moments (summed over partitions by the stage) -------------------------------------------
def cross_moments(a: np.ndarray, b: np.ndarray | None = None) -> dict:
    """Partial sums of rows of ``a`` (and ``b``): n, sum(a), a^T a, and sum(b), a^T b, b^T b.
    Partials of disjoint row sets add up (``add_moments``)."""
    a = np.asarray(a, dtype=np.float64)
    out = {"n": np.array(float(len(a))), "sa": a.sum(axis=0), "aa": a.T @ a}
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        out.update(sb=b.sum(axis=0), ab=a.T @ b, bb=b.T @ b)
    return out


def standardiser(moments: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per feature from ``cross_moments`` (std floored: constant features stay 0)."""
    n = float(moments["n"])
    mean = moments["sa"] / n
    var = np.maximum(np.diag(moments["aa"]) / n - mean ** 2, 0.0)
    return mean, np.maximum(np.sqrt(var), 1e-6)


# --- quantisation ----------------------------------------------------------------------------
def assign(features: np.ndarray, centroids: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean) of every row of ``features``."""
    features = np.asarray(features, dtype=np.float32)
    centroids = np.asarray(centroids, dtype=np.float32)
    c_norm = (centroids ** 2).sum(axis=1)
    out = np.empty(len(features), dtype=np.int64)
    for start in range(0, len(features), chunk):
        block = features[start:start + chunk]
        # ||x||^2 is the same for every centroid of a row: argmin of ||c||^2 - 2 x.c
        out[start:start + chunk] = np.argmin(c_norm[None, :] - 2.0 * (block @ centroids.T), axis=1)
    return out


def histogram(assignments: np.ndarray, k: int) -> np.ndarray:
    """The bag of words: the share of the track's frames on each of the ``k`` codewords."""
    counts = np.bincount(np.asarray(assignments, dtype=np.int64), minlength=k)[:k].astype(np.float32)
    return counts / max(1.0, float(counts.sum()))


# --- PCA and ridge ---------------------------------------------------------------------------
def pca_basis(moments: dict, variance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [k], components [k, d], eigenvalues [d]) keeping the fewest leading components
    whose share of the total variance reaches ``variance``."""
    n = float(moments["n"])
    if n < 2:
        raise ValueError("PCA needs at least two training tracks")
    mean = moments["sa"] / n
    cov = (moments["aa"] - n * np.outer(mean, mean)) / (n - 1)
    eigenvalues, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = np.maximum(eigenvalues[order], 0.0), vectors[:, order]
    total = eigenvalues.sum()
    if total <= 0:
        raise ValueError("the training histograms do not vary: nothing for PCA to keep")
    d = int(np.searchsorted(np.cumsum(eigenvalues) / total, variance - 1e-12) + 1)
    d = min(d, len(eigenvalues))
    return mean, vectors[:, :d], eigenvalues[:d]


def ridge_solution(moments: dict, ridge: float, eigenvalues: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weights [d, r], intercept [r]) of ridge regression from ``cross_moments(z, y)``.

    Minimises ``mean ||y - z W - b||^2 + lam ||W||^2`` with ``lam = ridge * mean(eigenvalues)``
    (the kept components' mean variance): components much weaker than that are shrunk."""
    n = float(moments["n"])
    zm, ym = moments["sa"] / n, moments["sb"] / n
    zz = moments["aa"] / n - np.outer(zm, zm)
    zy = moments["ab"] / n - np.outer(zm, ym)
    lam = ridge * float(np.mean(eigenvalues)) if len(eigenvalues) else ridge
    weights = np.linalg.solve(zz + lam * np.eye(len(zz)), zy)
    return weights, ym - zm @ weights


@dataclass(frozen=True)
class BaselineModel:
    """Everything ``predict`` needs: small (codebook k x 39, PCA k x d, ridge d x rank)."""
    n_mfcc: int
    delta_width: int
    feature_mean: np.ndarray
    feature_std: np.ndarray
    centroids: np.ndarray
    pca_mean: np.ndarray
    components: np.ndarray
    weights: np.ndarray
    intercept: np.ndarray

    @property
    def codebook_size(self) -> int:
        return len(self.centroids)

    def bag_of_words(self, features: np.ndarray) -> np.ndarray:
        standard = (features - self.feature_mean) / self.feature_std
        return histogram(assign(standard, self.centroids), self.codebook_size)

    def project(self, histograms: np.ndarray) -> np.ndarray:
        return (np.asarray(histograms, dtype=np.float64) - self.pca_mean) @ self.components

    def predict(self, histograms: np.ndarray) -> np.ndarray:
        """[n, rank] predicted (unit-scale) factors of [n, k] histograms (float32)."""
        return (self.project(histograms) @ self.weights + self.intercept).astype(np.float32)
