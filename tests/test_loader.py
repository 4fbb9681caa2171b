"""The Petastorm loader on real Parquet files: crops, epochs, shuffling, the short-epoch guard."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepcuts.nn.loader import EpochReader, ShortEpochError, band_statistics, crop_offset, decode_crops

N_MELS, CROP = 16, 20


@pytest.fixture(scope="module")
def example_files(tmp_path_factory):
    """Two files of examples whose target is the row's index and whose mel encodes it too."""
    folder = tmp_path_factory.mktemp("examples")
    rng = np.random.default_rng(0)
    paths, mels, n = [], {}, 0
    for part, rows in enumerate((45, 38)):
        ids, blobs, frames, targets = [], [], [], []
        for _ in range(rows):
            length = int(rng.integers(CROP, CROP + 30))
            mel = (rng.normal(-40, 8, (N_MELS, length)) + n).astype(np.float16)
            ids.append(f"t{n:03d}")
            blobs.append(mel.tobytes())
            frames.append(length)
            targets.append([float(n), 1.0])
            mels[f"t{n:03d}"] = mel.astype(np.float32)
            n += 1
        table = pa.table({"track_id": ids, "mel": pa.array(blobs, pa.binary()),
                          "n_mels": pa.array([N_MELS] * rows, pa.int32()), "n_frames": pa.array(frames, pa.int32()),
                          "target": pa.array(targets, pa.list_(pa.float32()))})
        path = folder / f"part-{part}.parquet"
        pq.write_table(table, path, row_group_size=8)
        paths.append(str(path))
    return paths, mels


def _reader(paths, rows, **kw):
    args = dict(n_mels=N_MELS, crop_frames=CROP, batch_size=10, train=True, seed=5, workers=2,
                shuffle_buffer_rows=24)
    args.update(kw)
    return EpochReader(paths, rows, **args)


def _epoch(reader, epoch):
    mels, targets = [], []
    for mel, target in reader.batches(epoch):
        assert mel.dtype == np.float32 and mel.shape[1:] == (N_MELS, CROP) and len(mel) <= 10
        mels.append(mel)
        targets.append(target)
    return np.concatenate(mels), np.concatenate(targets)


def test_every_row_once_per_epoch_with_fresh_random_crops(example_files):
    paths, mels = example_files
    reader = _reader(paths, 83)
    first_mel, first_target = _epoch(reader, 0)
    second_mel, second_target = _epoch(reader, 1)
    for targets in (first_target, second_target):
        assert sorted(targets[:, 0].astype(int)) == list(range(83))
    assert not np.array_equal(first_target[:, 0], second_target[:, 0])    # reshuffled
    # Each crop is the window crop_offset names, decoded exactly; offsets change with the epoch.
    moved = 0
    for epoch, (batch_mel, batch_target) in enumerate(((first_mel, first_target), (second_mel, second_target))):
        for mel, target in zip(batch_mel, batch_target):
            track = f"t{int(target[0]):03d}"
            full = mels[track]
            start = crop_offset(track, full.shape[1], CROP, 5, epoch)
            np.testing.assert_array_equal(mel, full[:, start:start + CROP])
            moved += epoch == 1 and start != crop_offset(track, full.shape[1], CROP, 5, 0)
    assert moved > 40


def test_validation_reads_middle_crops_in_file_order(example_files):
    paths, mels = example_files
    reader = _reader(paths, 83, train=False, workers=1)
    mel, target = _epoch(reader, 3)
    assert list(target[:, 0].astype(int)) == list(range(83))
    for row, full in zip(mel, mels.values()):
        start = (full.shape[1] - CROP) // 2
        np.testing.assert_array_equal(row, full[:, start:start + CROP])
    # The Petastorm-transform variant decodes the same crops.
    variant = _reader(paths, 83, train=False, workers=1, decode_in_workers=True)
    np.testing.assert_array_equal(_epoch(variant, 3)[0], mel)


def test_short_epochs_are_retried_when_empty_and_refused_when_partial(example_files, monkeypatch, caplog):
    paths, _ = example_files
    with pytest.raises(ShortEpochError, match="delivered 83 rows, the training set holds 90"):
        _epoch(_reader(paths, 90), 0)

    reader = _reader(paths, 83)
    real = EpochReader._row_groups
    calls = {"n": 0}

    def empty_first_time(self, epoch):
        calls["n"] += 1
        if calls["n"] == 1:
            return iter(())                     # Petastorm's silent empty epoch
        return real(self, epoch)

    monkeypatch.setattr(EpochReader, "_row_groups", empty_first_time)
    with caplog.at_level(logging.WARNING, logger="deepcuts.nn.loader"):
        _, targets = _epoch(reader, 0)
    assert len(targets) == 83 and calls["n"] == 2 and "0 of 83 rows" in caplog.text

    def always_partial(self, epoch):
        groups = real(self, epoch)
        yield next(groups)

    monkeypatch.setattr(EpochReader, "_row_groups", always_partial)
    with pytest.raises(ShortEpochError, match="delivered 8 rows"):
        _epoch(reader, 1)


def test_band_statistics_match_numpy(example_files):
    paths, mels = example_files
    mean, std = band_statistics(paths, 83, N_MELS, CROP, seed=5, workers=2)
    crops = np.stack([m[:, (m.shape[1] - CROP) // 2:(m.shape[1] - CROP) // 2 + CROP] for m in mels.values()])
    np.testing.assert_allclose(mean, crops.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, crops.std(axis=(0, 2)), rtol=1e-4)
    with pytest.raises(ShortEpochError):
        band_statistics(paths, 84, N_MELS, CROP, seed=5)


def test_decode_crops_refuses_bad_rows():
    good = np.zeros((4, 30), np.float16).tobytes()
    assert decode_crops(["a"], [good], [4], [30], 10, 0, None)[0].shape == (4, 10)
    with pytest.raises(ValueError, match="track b"):
        decode_crops(["b"], [good[:-2]], [4], [30], 10, 0, None)
    with pytest.raises(ValueError, match="10-frame crop"):
        decode_crops(["c"], [np.zeros((4, 8), np.float16).tobytes()], [4], [8], 10, 0, 1)


@pytest.mark.s3
def test_petastorm_reads_training_files_from_s3_through_the_project_filesystem(example_files, s3_bucket):
    """Files on S3 (a real endpoint on loopback) read as the local ones do, without s3fs."""
    client, bucket = s3_bucket
    paths, _ = example_files
    uris = []
    for path in paths:
        key = f"warehouse/train_examples/{path.rsplit('/', 1)[1]}"
        client.upload_file(path, bucket, key)
        uris.append(f"s3://{bucket}/{key}")
    local_mels, local_targets = _epoch(_reader(paths, 83, train=False), 0)
    s3_mels, s3_targets = _epoch(_reader(uris, 83, train=False), 0)
    # Row groups arrive in the reader threads' order: compare row by row (the target is the row's index).
    local, remote = np.argsort(local_targets[:, 0]), np.argsort(s3_targets[:, 0])
    np.testing.assert_array_equal(s3_targets[remote], local_targets[local])
    np.testing.assert_array_equal(s3_mels[remote], local_mels[local])
    assert len(s3_targets) == 83


def test_petastorm_reads_print_no_pyarrow_deprecation_noise(tmp_path):
    """Every epoch used to print ~20 FutureWarnings from pyarrow's legacy dataset API."""
    import warnings

    import pyarrow as pa
    import pyarrow.parquet as pq

    import deepcuts.nn.loader  # noqa: F401 - installs the filters
    from petastorm import make_batch_reader
    pq.write_table(pa.table({"a": list(range(10))}), tmp_path / "x.parquet")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        deepcuts.nn.loader._silence_legacy_dataset_warnings()
        with make_batch_reader("file://" + str(tmp_path), num_epochs=1, workers_count=1) as reader:
            assert sum(len(b.a) for b in reader) == 10
    noisy = [w for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert noisy == []
