"""Petastorm -> torch: every Petastorm import of the project lives in this module.

One ``make_batch_reader`` per epoch over the committed example files.  Each row group's
float16 mel bytes are decoded and cropped in one step, so only crop-sized float32 arrays
are made: a random window per track and epoch for training (the offset is a hash of seed,
epoch and track, so it is the same whatever order the threads finish in, and a resumed run
sees the same crops), the middle window for validation.  Rows are mixed across row groups through a bounded shuffle buffer.

Petastorm's thread pool can end an epoch early without an error (shared/README): every
epoch counts its rows against the training set's committed row count and raises
``ShortEpochError`` on a mismatch; an epoch that came back empty is re-read here, a
partly-consumed one is the training loop's to redo from its checkpoint.

Several training processes (``train.processes``): each rank reads one Petastorm shard
(``cur_shard=rank, shard_count=N``: the row groups whose index is rank mod N).  Row groups
make shards uneven, so every rank is given the same number of batches (:func:`epoch_plan`:
the fewest any shard yields; the extra rows of the larger shards are left out of that epoch)
and counts its rows against its shard's planned rows, known up front from the row groups'
metadata (:func:`shard_rows`).
"""
from __future__ import annotations

import functools
import logging
import warnings
import zlib
from typing import Iterator, Sequence

import numpy as np

from deepcuts.audio.decode import mel_view

log = logging.getLogger(__name__)

# Petastorm 0.12 runs on pyarrow's legacy dataset API (the stack's pin, see the README), and
# pyarrow says so on every dataset, piece and reader thread: ~20 lines per epoch that tell an
# operator nothing.  Process-wide (reader threads warn outside any catch_warnings block), and
# only for warnings raised in or through those two packages.
def _silence_legacy_dataset_warnings() -> None:
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(petastorm|pyarrow)(\..*)?$")


_silence_legacy_dataset_warnings()

READ_COLUMNS = ["track_id", "mel", "n_mels", "n_frames", "target"]
# The WPE objective's per-track weight (flattened rank x rank Cholesky factor, see trainset).
TARGET_WEIGHT_COLUMN = "target_weight"


class ShortEpochError(RuntimeError):
    """An epoch delivered a different number of rows than the training set holds."""


def crop_offset(track_id: str, n_frames: int, crop_frames: int, seed: int, epoch: int | None) -> int:
    """The crop's first frame: random per (seed, epoch, track); the middle when ``epoch`` is None."""
    room = n_frames - crop_frames
    if room <= 0:
        return 0
    if epoch is None:
        return room // 2
    return zlib.crc32(f"{seed}:{epoch}:{track_id}".encode()) % (room + 1)


def decode_crops(track_ids: Sequence[str], mels: Sequence[bytes], n_mels: Sequence[int],
                 n_frames: Sequence[int], crop_frames: int, seed: int, epoch: int | None) -> list[np.ndarray]:
    """float16 row-major mel bytes -> float32 [n_mels, crop_frames] crops (only the crop is converted)."""
    out = []
    for track_id, mel, bands, frames in zip(track_ids, mels, n_mels, n_frames):
        bands, frames = int(bands), int(frames)
        if len(mel) != 2 * bands * frames or frames < crop_frames:
            raise ValueError(f"track {track_id}: mel of {len(mel)} bytes does not hold {bands}x{frames} "
                             f"float16 frames covering a {crop_frames}-frame crop")
        start = crop_offset(track_id, frames, crop_frames, seed, epoch)
        full = mel_view(mel, bands, frames)
        out.append(np.ascontiguousarray(full[:, start:start + crop_frames], dtype=np.float32))
    return out


def _crop_transform(crop_frames: int, seed: int, epoch: int | None, with_target_weight: bool = False):
    """The Petastorm transform variant (decode_in_workers): one row group's pandas frame ->
    mel crops + targets (+ target weights).  Kept for bench/train.py's comparison."""
    def transform(frame):
        import numpy as np  # noqa: F811 (process pools import the function by value)
        frame["mel"] = decode_crops(frame["track_id"].tolist(), frame["mel"].tolist(),
                                    frame["n_mels"].tolist(), frame["n_frames"].tolist(),
                                    crop_frames, seed, epoch)
        frame["target"] = [np.asarray(t, dtype=np.float32) for t in frame["target"]]
        if with_target_weight:
            frame["target_weight"] = [np.asarray(w, dtype=np.float32) for w in frame["target_weight"]]
            return frame[["mel", "target", "target_weight"]]
        return frame[["mel", "target"]]
    return transform


def file_urls(paths: Sequence[str]) -> list[str]:
    return [p if "://" in p else "file://" + p for p in paths]


def row_group_rows(files: Sequence[str]) -> list[int]:
    """Rows of every row group, in the order Petastorm numbers them (files as given, then row
    groups within a file): read from the Parquet footers only."""
    import pyarrow.parquet as pq
    from deepcuts.core.storage import filesystem_for
    counts: list[int] = []
    for path in files:
        fs, inner = filesystem_for(path)
        with fs.open_input_file(inner) as fh:
            meta = pq.ParquetFile(fh).metadata
        counts.extend(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return counts


def shard_rows(group_rows: Sequence[int], shard: int, shard_count: int) -> int:
    """Rows of Petastorm's shard ``shard`` of ``shard_count``: row groups whose index is shard mod count."""
    return int(sum(n for i, n in enumerate(group_rows) if i % shard_count == shard))


def epoch_plan(shard_row_counts: Sequence[int], batch_size: int) -> tuple[int, list[int]]:
    """(batches every rank runs, rows each rank then delivers) for shards of these sizes.

    Every batch of an epoch is full but a shard's last, so a shard of r rows yields
    ceil(r / B) batches; all ranks stop at the fewest (no rank waits alone at an all-reduce),
    which delivers min(r, batches * B) rows of each shard.  The rest is this epoch's drop."""
    batches = min(-(-int(r) // batch_size) for r in shard_row_counts)
    return batches, [min(int(r), batches * batch_size) for r in shard_row_counts]


# Petastorm resolves ``s3://`` through fsspec's s3fs (another S3 client, with its own
# credential and endpoint handling).  S3 files are given to it under a private scheme instead,
# with the project's pyarrow S3 filesystem (the standard AWS chain, the endpoint override)
# wrapped as the fsspec filesystem it takes.
PETASTORM_S3_SCHEME = "deepcuts-s3"


@functools.lru_cache(maxsize=None)
def _project_s3_class():
    """The fsspec class Petastorm resolves :data:`PETASTORM_S3_SCHEME` to (registered once)."""
    import fsspec
    from fsspec.implementations.arrow import ArrowFSWrapper

    class ProjectS3(ArrowFSWrapper):
        @classmethod
        def _strip_protocol(cls, path):
            return path.split("://", 1)[1] if "://" in path else path

    fsspec.register_implementation(PETASTORM_S3_SCHEME, ProjectS3, clobber=True)
    return ProjectS3


def petastorm_source(urls: Sequence[str]):
    """(urls, filesystem) for ``make_batch_reader``: local files as they are (Petastorm opens
    them itself, filesystem None); ``s3://`` files under :data:`PETASTORM_S3_SCHEME` with the
    project's S3 filesystem."""
    from deepcuts.core.storage import filesystem_for, is_s3
    if not urls or not is_s3(urls[0]):
        return list(urls), None
    project_s3 = _project_s3_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Petastorm reads through pyarrow's legacy ParquetDataset, which takes only the legacy
        # filesystem interface: pyarrow's own wrapper of an fsspec filesystem.
        from pyarrow.filesystem import S3FSWrapper
        filesystem = S3FSWrapper(project_s3(filesystem_for(urls[0])[0]))
    return [f"{PETASTORM_S3_SCHEME}://{u.split('://', 1)[1]}" for u in urls], filesystem


class EpochReader:
    """Batches of (mel crops float32 [B, n_mels, crop_frames], targets float32 [B, out_dim]), or
    with ``with_target_weight`` (the WPE objective) triples ending in the per-track weights
    float32 [B, out_dim * out_dim] of the examples' ``target_weight`` column."""

    def __init__(self, files: Sequence[str], expected_rows: int, n_mels: int, crop_frames: int,
                 batch_size: int, *, train: bool, seed: int, workers: int = 2,
                 shuffle_buffer_rows: int = 256, empty_epoch_retries: int = 2,
                 decode_in_workers: bool = False, with_target_weight: bool = False,
                 cur_shard: int | None = None, shard_count: int | None = None, max_batches: int | None = None):
        """``cur_shard``/``shard_count``: read only that Petastorm shard, whose planned rows
        ``expected_rows`` is (see :func:`epoch_plan`); ``max_batches``: end every epoch after
        that many batches."""
        self.urls = file_urls(files)
        self.expected_rows = expected_rows
        self.cur_shard = cur_shard if shard_count and shard_count > 1 else None
        self.shard_count = shard_count if self.cur_shard is not None else None
        self.max_batches = max_batches
        self.n_mels = n_mels
        self.crop_frames = crop_frames
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.workers = workers
        self.shuffle_buffer_rows = max(shuffle_buffer_rows, batch_size) if train else batch_size
        self.empty_epoch_retries = empty_epoch_retries
        # Decoding in a Petastorm transform costs two pandas<->Arrow round trips of the crops
        # per row group: measured 2.5x slower than decoding the raw bytes here (bench/train.py).
        self.decode_in_workers = decode_in_workers
        self.with_target_weight = with_target_weight
        self.columns = READ_COLUMNS + ([TARGET_WEIGHT_COLUMN] if with_target_weight else [])
        self.last_epoch_rows = 0

    def _row_groups(self, epoch: int) -> Iterator[tuple[np.ndarray, ...]]:
        from petastorm import make_batch_reader
        from petastorm.transform import TransformSpec
        crop_epoch = epoch if self.train else None
        spec = None
        weighted = self.with_target_weight
        if self.decode_in_workers:
            edit_fields = [("mel", np.float32, (self.n_mels, self.crop_frames), False),
                           ("target", np.float32, (None,), False)]
            if weighted:
                edit_fields.append((TARGET_WEIGHT_COLUMN, np.float32, (None,), False))
            spec = TransformSpec(
                _crop_transform(self.crop_frames, self.seed, crop_epoch, weighted),
                edit_fields=edit_fields, selected_fields=[f[0] for f in edit_fields])
        with warnings.catch_warnings():
            # Our names are exact: "target" no longer prefix-matching "target_weight" is wanted.
            warnings.filterwarnings("ignore", message="schema_fields behavior has changed")
            urls, filesystem = petastorm_source(self.urls)
            reader = make_batch_reader(urls, schema_fields=self.columns, reader_pool_type="thread",
                                       workers_count=self.workers, num_epochs=1,
                                       # Petastorm's default queues 50 row groups (~0.5 GB of mels): a few suffice.
                                       results_queue_size=2 * self.workers + 2,
                                       shuffle_row_groups=self.train, seed=self.seed * 100_003 + epoch,
                                       transform_spec=spec, filesystem=filesystem,
                                       cur_shard=self.cur_shard, shard_count=self.shard_count)
        with reader:
            for batch in reader:
                if self.decode_in_workers:
                    arrays = (batch.mel, batch.target)
                else:
                    crops = decode_crops(batch.track_id, batch.mel, batch.n_mels, batch.n_frames,
                                         self.crop_frames, self.seed, crop_epoch)
                    arrays = (np.stack(crops), _float_matrix(batch.target))
                if weighted:
                    arrays += (_float_matrix(batch.target_weight),)
                yield arrays

    def batches(self, epoch: int) -> Iterator[tuple[np.ndarray, ...]]:
        """One epoch.  Raises ShortEpochError after the last batch if rows went missing."""
        for attempt in range(self.empty_epoch_retries + 1):
            rows = 0
            batches = self._shuffled(self._row_groups(epoch), epoch)
            try:
                for count, arrays in enumerate(batches, start=1):
                    rows += len(arrays[0])
                    yield arrays
                    if count == self.max_batches:
                        break
            finally:
                batches.close()   # stops Petastorm's threads when an epoch ends at max_batches
            self.last_epoch_rows = rows
            if rows == self.expected_rows:
                return
            if rows == 0 and attempt < self.empty_epoch_retries:
                log.warning("Petastorm ended epoch %d with 0 of %d rows: re-reading it (attempt %d)",
                            epoch, self.expected_rows, attempt + 2)
                continue
            break
        shard = "" if self.cur_shard is None else f" (shard {self.cur_shard} of {self.shard_count})"
        raise ShortEpochError(f"epoch {epoch} delivered {self.last_epoch_rows} rows, the training set{shard} "
                              f"holds {self.expected_rows} ({len(self.urls)} files)")

    def track_ids(self) -> list[str]:
        """The track ids this reader's shard holds (one pass over the ``track_id`` column):
        which tracks a rank trains on."""
        from petastorm import make_batch_reader
        urls, filesystem = petastorm_source(self.urls)
        ids: list[str] = []
        with make_batch_reader(urls, schema_fields=["track_id"], reader_pool_type="thread",
                               workers_count=self.workers, num_epochs=1, shuffle_row_groups=False,
                               filesystem=filesystem, cur_shard=self.cur_shard,
                               shard_count=self.shard_count) as reader:
            for batch in reader:
                ids.extend(str(t) for t in batch.track_id)
        return ids

    def _shuffled(self, groups: Iterator[tuple[np.ndarray, ...]], epoch: int):
        """Mix rows of several row groups, then cut batches; memory stays ~shuffle_buffer_rows.
        Each group is a tuple of row-aligned arrays (mels, targets[, weights]), kept aligned."""
        rng = np.random.default_rng([self.seed, epoch])
        pending: list[tuple[np.ndarray, ...]] = []
        held = 0
        for arrays in groups:
            pending.append(arrays)
            held += len(arrays[0])
            if held >= self.shuffle_buffer_rows:
                joined = [np.concatenate(parts) for parts in zip(*pending)]
                order = rng.permutation(held) if self.train else np.arange(held)
                full = held - held % self.batch_size
                for start in range(0, full, self.batch_size):
                    idx = order[start:start + self.batch_size]
                    yield tuple(a[idx] for a in joined)
                pending = [tuple(a[order[full:]] for a in joined)]
                held -= full
        if held:
            joined = [np.concatenate(parts) for parts in zip(*pending)]
            order = rng.permutation(held) if self.train else np.arange(held)
            for start in range(0, held, self.batch_size):
                idx = order[start:start + self.batch_size]
                yield tuple(a[idx] for a in joined)


def _float_matrix(lists) -> np.ndarray:
    """A column of equal-length float lists -> float32 [rows, width]."""
    return np.asarray(lists, dtype=np.float32)


def band_statistics(files: Sequence[str], expected_rows: int, n_mels: int, crop_frames: int, seed: int,
                    workers: int = 2, empty_epoch_retries: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std over the training set's middle crops, computed once: one streamed
    pass with float64 running sums (memory of one row group), row count checked like an epoch."""
    return band_statistics_from_sums(*band_sums(files, expected_rows, n_mels, crop_frames, seed, workers,
                                                empty_epoch_retries), crop_frames)


def band_statistics_from_sums(total: np.ndarray, total_sq: np.ndarray, rows: int,
                              crop_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per band from the float64 sums of :func:`band_sums` (summed over shards)."""
    count = rows * crop_frames
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def band_sums(files: Sequence[str], expected_rows: int, n_mels: int, crop_frames: int, seed: int,
              workers: int = 2, empty_epoch_retries: int = 2, cur_shard: int | None = None,
              shard_count: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum, sum of squares per band, rows) over the middle crops of the files (or of one
    shard, whose rows ``expected_rows`` is); the row count is checked like an epoch's."""
    reader = EpochReader(files, expected_rows=expected_rows, n_mels=n_mels, crop_frames=crop_frames,
                         batch_size=1, train=False, seed=seed, workers=workers,
                         empty_epoch_retries=empty_epoch_retries, cur_shard=cur_shard, shard_count=shard_count)
    for attempt in range(empty_epoch_retries + 1):
        total = np.zeros(n_mels, dtype=np.float64)
        total_sq = np.zeros(n_mels, dtype=np.float64)
        rows = 0
        for mel, *_ in reader._row_groups(epoch=0):
            x = mel.astype(np.float64)
            total += x.sum(axis=(0, 2))
            total_sq += np.square(x).sum(axis=(0, 2))
            rows += x.shape[0]
        if rows == expected_rows and rows > 0:
            return total, total_sq, rows
        if rows != 0:
            break
        log.warning("Petastorm read 0 of %d rows for the band statistics: re-reading (attempt %d)",
                    expected_rows, attempt + 2)
    raise ShortEpochError(f"band statistics read {rows} rows, the training set holds {expected_rows}")
