"""Every table of the pipeline: its name and schema, defined once.

Schemas are Arrow schemas (what pandas, DuckDB and Petastorm see); ``spark_schema``
derives the Spark one, so the two can never drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Table:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    doc: str

    @property
    def columns(self) -> list[str]:
        return self.schema.names


def _table(name: str, key: tuple[str, ...], doc: str, *fields: pa.Field) -> Table:
    return Table(name, pa.schema(list(fields)), key, doc)


F = pa.field
VECTOR = pa.list_(pa.float32())

MELS = _table(
    "mels", ("track_id",),
    "One log-mel spectrogram per catalogue track (float16 bytes, row-major n_mels x n_frames).",
    F("track_id", pa.string(), nullable=False),
    F("mel", pa.binary(), nullable=False),
    F("n_mels", pa.int32(), nullable=False),
    F("n_frames", pa.int32(), nullable=False),
    F("sample_rate", pa.int32(), nullable=False),
    F("hop_length", pa.int32(), nullable=False),
    F("excerpt_offset_s", pa.float64(), nullable=False),
    F("duration_s", pa.float64(), nullable=False),
    F("fingerprint", pa.string(), nullable=False),
    F("source_uri", pa.string(), nullable=False),
    F("source_size", pa.int64(), nullable=False),
    F("source_version", pa.string(), nullable=False),
    F("labels", pa.string()),
    F("ingest_run_id", pa.string(), nullable=False),
)

INGEST_REJECTS = _table(
    "ingest_rejects", ("track_id",),
    "The current rejected or vanished catalogue items, one row per track, with a reason code.",
    F("track_id", pa.string(), nullable=False),
    F("source_uri", pa.string()),
    F("source_size", pa.int64()),
    F("source_version", pa.string()),
    F("reason", pa.string(), nullable=False),
    F("detail", pa.string()),
    F("run_id", pa.string(), nullable=False),
)

PLAYS_REJECTS = _table(
    "plays_rejects", (),
    "Play-count rows that were not used, with a reason code (all columns kept as text).",
    F("user_id", pa.string()),
    F("track_id", pa.string()),
    F("plays", pa.string()),
    F("reason", pa.string(), nullable=False),
    F("run_id", pa.string(), nullable=False),
)

USER_INDEX = _table(
    "user_index", ("user_id",),
    "Original user id <-> dense int index used by ALS (rebuilt every run: join on the ids, never "
    "keep indices across runs). Ids are text: integral ids in plain decimal (see deepcuts.cf.plays).",
    F("user_id", pa.string(), nullable=False),
    F("user_idx", pa.int32(), nullable=False),
)

TRACK_INDEX = _table(
    "track_index", ("track_id",),
    "Original track id <-> dense int index used by ALS (rebuilt every run, like user_index).",
    F("track_id", pa.string(), nullable=False),
    F("track_idx", pa.int32(), nullable=False),
)

USER_FACTORS = _table(
    "user_factors", ("user_id",),
    "ALS user latent factors of the published fit (original ids as text), with the plays and "
    "distinct tracks they were fitted on.",
    F("user_id", pa.string(), nullable=False),
    F("factors", VECTOR, nullable=False),
    F("n_plays", pa.int64(), nullable=False),
    F("n_tracks", pa.int64(), nullable=False),
    F("run_id", pa.string(), nullable=False),
)

TRACK_FACTORS = _table(
    "track_factors", ("track_id",),
    "ALS track latent factors (and their unit-normalised copy for similarity); tracks with fewer "
    "than factors.min_track_listeners listeners, and cold-start holdout tracks, have no row.",
    F("track_id", pa.string(), nullable=False),
    F("factors", VECTOR, nullable=False),
    F("factors_unit", VECTOR, nullable=False),
    F("n_plays", pa.int64(), nullable=False),
    F("n_listeners", pa.int64(), nullable=False),
    F("run_id", pa.string(), nullable=False),
)

FACTOR_METRICS = _table(
    "factor_metrics", ("run_id", "split", "predictor"),
    "Evaluation of factors (van den Oord et al. 2013, sec. 5.2), one row per run/split/predictor.",
    F("run_id", pa.string(), nullable=False),
    F("split", pa.string(), nullable=False),
    F("predictor", pa.string(), nullable=False),
    F("map_at_k", pa.float64()),
    F("auc", pa.float64()),
    F("k", pa.int32()),
    F("n_users", pa.int64()),
    F("n_tracks", pa.int64()),
)

EVAL_HOLDOUT = _table(
    "eval_holdout", ("user_id", "track_id"),
    "Plays hidden from the published ALS fit by the cold-start protocol (split = 'cold'): the "
    "tracks the audio model must predict. Empty when factors.evaluate is false.",
    F("user_id", pa.string(), nullable=False),
    F("track_id", pa.string(), nullable=False),
    F("plays", pa.float64(), nullable=False),
    F("split", pa.string(), nullable=False),
)

PREDICTED_FACTORS = _table(
    "predicted_factors", ("track_id",),
    "Factors predicted from audio for every ingested track.",
    F("track_id", pa.string(), nullable=False),
    F("factors", VECTOR, nullable=False),
    F("fingerprint", pa.string(), nullable=False),
    F("model_id", pa.string(), nullable=False),
    F("run_id", pa.string(), nullable=False),
)

SERVING_FACTORS = _table(
    "serving_factors", ("track_id",),
    "One row per catalogue track: ALS factors where usage suffices, audio-predicted otherwise.",
    F("track_id", pa.string(), nullable=False),
    F("factors", VECTOR, nullable=False),
    F("source", pa.string(), nullable=False),
    F("model_id", pa.string()),
    F("run_id", pa.string(), nullable=False),
)

INFER_REJECTS = _table(
    "infer_rejects", ("track_id",),
    "Tracks that could not be scored, with a reason code.",
    F("track_id", pa.string(), nullable=False),
    F("reason", pa.string(), nullable=False),
    F("detail", pa.string()),
    F("model_id", pa.string()),
    F("run_id", pa.string(), nullable=False),
)


def _examples_table(name: str, doc: str) -> Table:
    return _table(
        name, ("track_id",), doc,
        F("track_id", pa.string(), nullable=False),
        F("mel", pa.binary(), nullable=False),
        F("n_mels", pa.int32(), nullable=False),
        F("n_frames", pa.int32(), nullable=False),
        F("target", VECTOR, nullable=False),
        # train.loss = "wpe" only: the track's flattened (row-major) rank x rank lower-triangular
        # Cholesky factor of its WPE weight matrix, scaled by 1/sqrt(n_users); null for mse/labels.
        F("target_weight", VECTOR),
        F("source_run_id", pa.string(), nullable=False),
        F("run_id", pa.string(), nullable=False),
    )


TRAIN_EXAMPLES = _examples_table(
    "train_examples",
    "The CNN's training split: mel + target (unit factors or multi-hot labels), row groups sized "
    "for Petastorm; source_run_id is the track_factors (or mels) run the targets came from.")

VALIDATION_EXAMPLES = _examples_table(
    "validation_examples",
    "The CNN's validation split (same build run as train_examples, disjoint tracks by hash).")

TRAIN_REJECTS = _table(
    "train_rejects", ("track_id",),
    "Tracks left out of the training set, with a reason code.",
    F("track_id", pa.string(), nullable=False),
    F("reason", pa.string(), nullable=False),
    F("detail", pa.string()),
    F("run_id", pa.string(), nullable=False),
)

TRAIN_METRICS = _table(
    "train_metrics", ("model_id", "epoch"),
    "One row per training epoch of every model: losses, throughput, learning rate.",
    F("model_id", pa.string(), nullable=False),
    F("epoch", pa.int32(), nullable=False),
    F("train_loss", pa.float64()),
    F("validation_loss", pa.float64()),
    F("train_rows", pa.int64()),
    F("validation_rows", pa.int64()),
    F("crops_per_s", pa.float64()),
    F("learning_rate", pa.float64()),
    F("seconds", pa.float64()),
    F("run_id", pa.string(), nullable=False),
)

ALL_TABLES: dict[str, Table] = {t.name: t for t in (
    MELS, INGEST_REJECTS, PLAYS_REJECTS, USER_INDEX, TRACK_INDEX, USER_FACTORS, TRACK_FACTORS,
    FACTOR_METRICS, EVAL_HOLDOUT, PREDICTED_FACTORS, SERVING_FACTORS, INFER_REJECTS,
    TRAIN_EXAMPLES, VALIDATION_EXAMPLES, TRAIN_REJECTS, TRAIN_METRICS)}


def spark_schema(table: Table):
    """The Spark StructType of ``table`` (imported lazily: pure code needs no pyspark)."""
    from pyspark.sql.pandas.types import from_arrow_schema
    return from_arrow_schema(table.schema)
