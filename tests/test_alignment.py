"""Procrustes alignment of ALS refits (deepcuts.cf.align): pure numpy, no Spark."""
import numpy as np
import pandas as pd
import pytest

from deepcuts.cf import align


def random_rotation(rank, rng):
    q, r = np.linalg.qr(rng.normal(size=(rank, rank)))
    return q * np.sign(np.diag(r))


def test_recovers_a_rotation_and_keeps_every_dot_product():
    rng = np.random.default_rng(0)
    prev_tracks = rng.normal(size=(500, 8))
    users = rng.normal(size=(50, 8))
    turn = random_rotation(8, rng)
    new_tracks, new_users = prev_tracks @ turn, users @ turn     # a refit: the same model, turned
    found = align.fit(new_tracks, prev_tracks)
    # The residual comes from sums (the square root of ‖a‖² + ‖b‖² − 2·Σσ, a difference of
    # near-equal numbers), so an exact rotation reads as ~sqrt(float64 eps) = 1.5e-8, not 0
    # (2.1e-8 measured here); the rotation itself is checked to 1e-9 below.
    assert found.residual < 1e-7
    assert found.unaligned_residual > 0.5                         # the refit really turned
    np.testing.assert_allclose(new_tracks @ found.rotation, prev_tracks, atol=1e-9)
    np.testing.assert_allclose((new_users @ found.rotation) @ (new_tracks @ found.rotation).T,
                               new_users @ new_tracks.T, atol=1e-9)
    np.testing.assert_allclose(found.rotation.T @ found.rotation, np.eye(8), atol=1e-9)


def test_residual_measures_what_the_rotation_cannot_explain():
    rng = np.random.default_rng(1)
    prev = rng.normal(size=(400, 6))
    noisy = (prev + 0.1 * rng.normal(size=prev.shape)) @ random_rotation(6, rng)
    found = align.fit(noisy, prev)
    direct = np.linalg.norm(noisy @ found.rotation - prev) / np.linalg.norm(prev)
    assert found.residual == pytest.approx(direct, rel=1e-6)
    assert 0.05 < found.residual < 0.15


def test_partition_sums_add_up_to_the_whole():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(90, 4)), rng.normal(size=(90, 4))
    frame = pd.DataFrame({"new": list(a.astype(np.float32)), "prev": list(b.astype(np.float32))})
    parts = [next(align.partial_sums(4)(iter([chunk]))) for chunk in (frame[:30], frame[30:], frame[:0])]
    cross = sum(np.asarray(p["cross"][0]).reshape(4, 4) for p in parts)
    combined = align.procrustes(cross, sum(p["new_sq"][0] for p in parts), sum(p["prev_sq"][0] for p in parts),
                                sum(int(p["n"][0]) for p in parts))
    whole = align.fit(a.astype(np.float32), b.astype(np.float32))
    np.testing.assert_allclose(combined.rotation, whole.rotation, atol=1e-6)
    assert combined.shared_tracks == 90


def test_lineage_and_model_space():
    links = {"f3": "f2", "f2": "f1", "f1": None, "g1": None}
    assert align.lineage(links, "f3") == ["f3", "f2", "f1"]
    assert align.lineage({"a": "b", "b": "a"}, "a") == ["a", "b"]           # a cycle cannot hang
    chain = align.lineage(links, "f3")
    assert align.model_space("f3", "f3", chain) == align.CURRENT_SPACE
    assert align.model_space("f1", "f3", chain) == align.ALIGNED_SPACE
    assert align.model_space("g1", "f3", chain) == align.OTHER_SPACE
    assert align.model_space(None, "f3", chain) == align.UNTRACKED_SPACE


def test_rotate_batch_is_a_matrix_product():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(5, 4)).astype(np.float32)
    turn = random_rotation(4, rng)
    out = align.rotate_batch(pd.Series(list(vectors)), turn)
    np.testing.assert_allclose(np.stack(out.to_numpy()), vectors @ turn, rtol=1e-5, atol=1e-6)
    assert align.rotate_batch(pd.Series([], dtype=object), turn).empty
