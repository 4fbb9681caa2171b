"""The MFCC bag-of-words baseline's pure parts: MFCCs and deltas against librosa, quantisation,
PCA and ridge against direct numpy, and the whole chain on planted spectra."""
from __future__ import annotations

import numpy as np
import pytest

from deepcuts.audio.decode import log_mel
from deepcuts.cf import baseline as B


def _real_log_mel(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A stored-style log-mel (10 log10 power, float16 round trip) of a chirp over noise."""
    rng = np.random.default_rng(seed)
    sr = 22050
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * (220 + 300 * t) * t) + 0.05 * rng.normal(size=len(t))
    mel = log_mel(y.astype(np.float32), sr, 1024, 512, 128)
    return mel.astype(np.float16).astype(np.float32)


def test_mfcc_and_deltas_match_librosa_on_a_stored_log_mel():
    import librosa
    S = _real_log_mel()
    ours = B.mfcc(S, 13)
    theirs = librosa.feature.mfcc(S=S.astype(np.float64), n_mfcc=13)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-7)
    for order in (1, 2):
        np.testing.assert_allclose(B.delta(ours, 9, order), librosa.feature.delta(theirs, width=9, order=order),
                                   rtol=1e-9, atol=1e-7)
    features = B.frame_features(S, 13, 9)
    assert features.shape == (S.shape[1], 39) and features.dtype == np.float32
    np.testing.assert_allclose(features[:, 13:26].T, librosa.feature.delta(theirs, width=9), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(features[:, 26:].T, librosa.feature.delta(theirs, width=9, order=2),
                               rtol=1e-4, atol=1e-3)


def test_stored_mel_features_reject_bad_mels_with_a_reason():
    S = _real_log_mel(1.0)
    good = S.astype(np.float16).tobytes()
    assert B.stored_mel_features(good, 128, S.shape[1], 13, 9).shape == (S.shape[1], 39)
    with pytest.raises(B.RejectedMel) as bad:
        B.stored_mel_features(good[:-2], 128, S.shape[1], 13, 9)
    assert bad.value.reason == B.MEL_SIZE_MISMATCH
    broken = S.copy()
    broken[3, 4] = np.nan
    with pytest.raises(B.RejectedMel) as bad:
        B.stored_mel_features(broken.astype(np.float16).tobytes(), 128, S.shape[1], 13, 9)
    assert bad.value.reason == B.NON_FINITE_MEL
    with pytest.raises(B.RejectedMel) as bad:
        B.stored_mel_features(S[:, :5].astype(np.float16).tobytes(), 128, 5, 13, 9)
    assert bad.value.reason == B.TOO_SHORT


def test_frame_sample_is_a_function_of_seed_and_track():
    a = B.sample_frames(1000, 50, 3, "t1")
    assert len(a) == 50 and len(set(a)) == 50 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, B.sample_frames(1000, 50, 3, "t1"))
    assert not np.array_equal(a, B.sample_frames(1000, 50, 3, "t2"))
    assert np.array_equal(B.sample_frames(20, 50, 3, "t1"), np.arange(20))


def test_assign_and_histogram():
    rng = np.random.default_rng(1)
    x, c = rng.normal(size=(5000, 39)), rng.normal(size=(64, 39))
    brute = np.argmin(((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2), axis=1)
    got = B.assign(x, c, chunk=1000)
    assert (got == brute).mean() > 0.999       # float32 distances: a near-tie may flip
    h = B.histogram(np.array([0, 0, 1, 3]), 5)
    assert h.tolist() == [0.5, 0.25, 0.0, 0.25, 0.0]


def test_moments_add_up_and_standardise():
    rng = np.random.default_rng(2)
    a = rng.normal(3.0, 2.0, size=(1000, 4))
    whole = B.cross_moments(a)
    parts = B.add_moments(B.cross_moments(a[:300]), B.cross_moments(a[300:]))
    for key in whole:
        np.testing.assert_allclose(parts[key], whole[key])
    mean, std = B.standardiser(whole)
    np.testing.assert_allclose(mean, a.mean(axis=0))
    np.testing.assert_allclose(std, a.std(axis=0))


def test_pca_keeps_the_planted_subspace_and_ridge_recovers_the_map():
    rng = np.random.default_rng(3)
    latent = rng.normal(size=(800, 3)) * [5.0, 3.0, 2.0]
    mixing = np.linalg.qr(rng.normal(size=(20, 3)))[0]
    x = latent @ mixing.T + 0.01 * rng.normal(size=(800, 20)) + 7.0
    mean, components, eig = B.pca_basis(B.cross_moments(x), 0.95)
    assert components.shape == (20, 3) and len(eig) == 3
    # the kept subspace is the planted one
    assert np.linalg.svd(mixing.T @ components, compute_uv=False).min() > 0.999
    z = (x - mean) @ components
    w_true = rng.normal(size=(3, 4))
    y = z @ w_true + 0.5
    w, b = B.ridge_solution(B.cross_moments(z, y), 0.0, eig)
    np.testing.assert_allclose(w, w_true, atol=1e-8)
    np.testing.assert_allclose(b, 0.5, atol=1e-8)
    # ridge > 0 equals the direct normal equations with lam = ridge * mean(eig)
    w2, b2 = B.ridge_solution(B.cross_moments(z, y), 0.5, eig)
    lam = 0.5 * eig.mean()
    zc, yc = z - z.mean(axis=0), y - y.mean(axis=0)
    direct = np.linalg.solve(zc.T @ zc / len(z) + lam * np.eye(3), zc.T @ yc / len(z))
    np.testing.assert_allclose(w2, direct, atol=1e-10)
    assert np.abs(w2).sum() < np.abs(w_true).sum()


def test_the_whole_chain_separates_planted_spectra():
    """Tracks of two "styles" (a band of energy low or high): the chain's predictions point
    towards their style's factor direction, for tracks it was not fitted on."""
    from sklearn.cluster import KMeans
    rng = np.random.default_rng(4)
    band = np.arange(128)

    def track(style):
        centre = 30 if style == 0 else 90
        bump = 25.0 * np.exp(-0.5 * ((band - centre) / 8.0) ** 2)
        return (rng.normal(-60, 3, (128, 120)) + bump[:, None]).astype(np.float16).astype(np.float32)

    styles = np.arange(60) % 2
    feats = [B.frame_features(track(s), 13, 9) for s in styles]
    sample = np.concatenate([f[B.sample_frames(len(f), 30, 0, str(i))] for i, f in enumerate(feats)])
    mean, std = B.standardiser(B.cross_moments(sample))
    centroids = KMeans(16, n_init=2, random_state=0).fit((sample - mean) / std).cluster_centers_
    hist = np.stack([B.histogram(B.assign((f - mean) / std, centroids), 16) for f in feats])
    targets = np.where(styles[:, None] == 0, [1.0, 0.0], [0.0, 1.0])
    fit = np.arange(60) < 40
    pmean, comps, eig = B.pca_basis(B.cross_moments(hist[fit]), 0.95)
    w, b = B.ridge_solution(B.cross_moments((hist[fit] - pmean) @ comps, targets[fit]), 0.1, eig)
    model = B.BaselineModel(13, 9, mean, std, centroids, pmean, comps, w, b)
    np.testing.assert_allclose(model.bag_of_words(feats[0]), hist[0])
    pred = model.predict(hist[~fit])
    right = (pred.argmax(axis=1) == styles[~fit]).mean()
    assert right == 1.0 and pred.dtype == np.float32
