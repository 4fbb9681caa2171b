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
    # Columns an analyst looks rows up by: writes are sorted by them and OPTIMIZE Z-orders them.
    cluster_by: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return self.schema.names


def _table(name: str, key: tuple[str, ...], doc: str, *fields: pa.Field,
           cluster_by: tuple[str, ...] = ()) -> Table:
    return Table(name, pa.schema(list(fields)), key, doc, cluster_by)


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
    # Issue 10: a file whose decodable audio ends well before its header's promise is ingested from
    # what decodes (unless ingest.reject_truncated): where it ends, and why, are kept with the mel.
    F("truncated_at_s", pa.float64()),
    F("warnings", pa.string()),
    cluster_by=("track_id",),
)

TRACK_METADATA = _table(
    "track_metadata", ("track_id",),
    "What the manifest says of each listed track beyond its audio (its optional artist and album "
    "columns; rows with neither are left out). Rewritten whole by every ingest run, so an edited "
    "manifest takes effect without re-decoding; the metadata prior of cold tracks reads it.",
    F("track_id", pa.string(), nullable=False),
    F("artist", pa.string()),
    F("album", pa.string()),
    F("run_id", pa.string(), nullable=False),
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

FACTOR_ALIGNMENTS = _table(
    "factor_alignments", ("factors_run_id",),
    "One row per published ALS fit: the orthogonal rotation that brought it onto the previous "
    "published fit (so models trained on either serve in one space), and the residual. "
    "aligned_to_run_id is null where the fit starts a new space (first fit, rank change, no shared tracks).",
    F("factors_run_id", pa.string(), nullable=False),
    F("aligned_to_run_id", pa.string()),
    F("rank", pa.int32(), nullable=False),
    F("shared_tracks", pa.int64(), nullable=False),
    F("residual", pa.float64()),             # ||Y_new R - Y_prev|| / ||Y_prev|| on the shared tracks
    F("unaligned_residual", pa.float64()),   # the same before rotating: how far the refit turned
    F("rotation", VECTOR),                   # rank x rank, row-major: aligned = raw @ rotation
    F("note", pa.string()),
)

EVAL_HOLDOUT = _table(
    "eval_holdout", ("user_id", "track_id"),
    "Plays hidden from the published ALS fit by the cold-start protocol (split = 'cold'): the "
    "tracks the audio model must predict; and by the sparse-warm protocol (split = 'sparse_warm' / "
    "'sparse_warm_validation'): the plays of tracks that kept only 1..5 listeners. Empty when "
    "factors.evaluate is false.",
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
    cluster_by=("track_id",),
)

# serving_factors.source: where a track's vector came from.
SOURCE_USAGE = "usage"          # its published ALS factors
SOURCE_AUDIO = "audio"          # no usage: the audio model's prediction in the ALS space
SOURCE_BLEND = "blend"          # a little usage: the ALS item half-step with the audio vector as prior
SOURCE_METADATA = "metadata"    # no usage, a known album/artist: the audio vector blended with its warm tracks' mean
COLD_SOURCES = (SOURCE_AUDIO, SOURCE_METADATA)   # no usage at all: the new tracks of user recommendations

SERVING_FACTORS = _table(
    "serving_factors", ("track_id",),
    "One row per catalogue track: ALS factors where usage suffices (source usage), audio-predicted "
    "without usage (audio; metadata where its album or artist has warm tracks), the ALS half-step "
    "with the audio prior for a little usage (blend).",
    F("track_id", pa.string(), nullable=False),
    F("factors", VECTOR, nullable=False),
    F("source", pa.string(), nullable=False),
    F("model_id", pa.string()),
    F("run_id", pa.string(), nullable=False),
    cluster_by=("track_id",),
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

RUNS = _table(
    "runs", ("run_id",),
    "The run manifest: one row per stage run (appended when it ends), with the Delta version of "
    "every table it read and wrote. A stage reads each input at the version the latest succeeded "
    "run wrote, so tables of two runs are never mixed.",
    F("run_id", pa.string(), nullable=False),
    F("stage", pa.string(), nullable=False),
    F("status", pa.string(), nullable=False),          # succeeded | failed | skipped
    F("pipeline_run_id", pa.string()),                 # the nightly/pipeline invocation it belonged to
    F("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
    F("ended_at", pa.timestamp("us", tz="UTC"), nullable=False),
    F("duration_s", pa.float64(), nullable=False),
    F("config_hash", pa.string(), nullable=False),
    F("code_version", pa.string(), nullable=False),
    F("tables_read", pa.map_(pa.string(), pa.int64())),
    F("tables_written", pa.map_(pa.string(), pa.int64())),
    F("rows_written", pa.map_(pa.string(), pa.int64())),
    F("rejects", pa.map_(pa.string(), pa.int64())),    # rejected items by reason code
    F("summary_json", pa.string()),                    # the stage's whole summary, as printed
    F("error", pa.string()),
)


# --- evaluation and the MFCC baseline (issue 12) ------------------------------------------
EVALUATION_RESULTS = _table(
    "evaluation_results", ("run_id", "split", "predictor", "metric", "label"),
    "The paper's evaluation (van den Oord et al. 2013, sec. 5.2): one row per run/split/predictor. "
    "Every predictor of one run is scored on the same user sample and the same candidates "
    "(split 'cold': held-out tracks that have a mel; 'validation': the CNN's validation tracks; "
    "'warm': the factors stage's CF check). Candidates a predictor has no vector for rank last.",
    F("run_id", pa.string(), nullable=False),
    F("split", pa.string(), nullable=False),
    F("predictor", pa.string(), nullable=False),
    F("map_at_k", pa.float64()),
    F("auc", pa.float64()),
    F("k", pa.int32()),
    F("n_users", pa.int64()),                       # scored: >= 1 positive and >= 1 negative
    F("n_users_skipped", pa.int64()),               # sampled, but no positive candidate or no negative
    F("n_users_without_vector", pa.int64()),        # held-out users outside the published fit
    F("n_candidates", pa.int64()),
    F("n_candidates_without_vector", pa.int64()),   # this predictor had no vector: ranked last
    F("n_positives", pa.int64()),
    F("n_positives_without_vector", pa.int64()),    # held-out pairs whose track is no candidate (no mel)
    F("model_id", pa.string()),                     # where the vectors came from: model id or run id
    F("factors_run_id", pa.string()),               # the published ALS fit the users come from
    F("max_users", pa.int64()),
    F("seed", pa.int64()),
    # Issue 18, label metrics of a labels model (null on the ranking rows above): metric is
    # label_precision_at_k (the embeddings' k nearest tracks sharing a query's label) or
    # top<k>_accuracy (a true label among the k most probable); label null = over all labels.
    F("metric", pa.string()),
    F("label", pa.string()),
    F("value", pa.float64()),
    F("chance", pa.float64()),                      # the same metric for a random ranking
    F("n_queries", pa.int64()),                     # tracks scored (with a vector and the label)
)

BASELINE_FACTORS = _table(
    "baseline_factors", ("track_id",),
    "The MFCC bag-of-words baseline's predicted factors (van den Oord et al. 2013, sec. 4.1) for "
    "every track with a usable mel; in_fit marks the tracks its regression was fitted on.",
    F("track_id", pa.string(), nullable=False),
    F("factors", VECTOR, nullable=False),
    F("in_fit", pa.bool_(), nullable=False),
    F("run_id", pa.string(), nullable=False),
    cluster_by=("track_id",),
)

BASELINE_REJECTS = _table(
    "baseline_rejects", ("track_id",),
    "Tracks the MFCC baseline could not featurise, with a reason code.",
    F("track_id", pa.string(), nullable=False),
    F("reason", pa.string(), nullable=False),
    F("detail", pa.string()),
    F("run_id", pa.string(), nullable=False),
)

UPPER_BOUND_FACTORS = _table(
    "upper_bound_factors", ("entity", "entity_id"),
    "The cold-start protocol's upper bound: one WMF fit on all plays, cold tracks included; its user "
    "(entity 'user') and track ('track') vectors, never mixed with another fit's. Empty when "
    "factors.evaluate is false.",
    F("entity", pa.string(), nullable=False),
    F("entity_id", pa.string(), nullable=False),
    F("factors", VECTOR, nullable=False),
    F("run_id", pa.string(), nullable=False),
)



# --- neighbours: similar tracks, recommendations, recall (issue 11) ---------------------------
def _neighbours_table(name: str, doc: str) -> Table:
    return _table(
        name, ("track_id", "rank"), doc,
        F("track_id", pa.string(), nullable=False),
        F("rank", pa.int32(), nullable=False),              # 1 = the nearest
        F("neighbour_id", pa.string(), nullable=False),
        F("score", pa.float32(), nullable=False),           # cosine (inner product of unit vectors)
        F("track_source", pa.string(), nullable=False),     # usage | audio: where each vector came from
        F("neighbour_source", pa.string(), nullable=False),
        F("model_id", pa.string()),                         # the audio model of this run's vectors
        F("run_id", pa.string(), nullable=False),
        cluster_by=("track_id",),
    )


SIMILAR_TRACKS = _neighbours_table(
    "similar_tracks",
    "The k nearest catalogue tracks of every track in serving_factors (cosine; the track itself "
    "excluded; equal scores ordered by neighbour_id). Clustered by track_id: one track's lookup "
    "reads a small part of the table.")

SOUNDS_LIKE = _neighbours_table(
    "sounds_like",
    "Like similar_tracks, over predicted_factors alone: the neighbours by audio content only "
    "(both sources are 'audio').")

USER_RECOMMENDATIONS = _table(
    "user_recommendations", ("user_id", "list", "rank"),
    "For every user with factors, the top-N tracks by x_u . y_i among tracks the user never played: "
    "list 'all' (every serving track) and 'cold' (tracks whose serving vector came from audio).",
    F("user_id", pa.string(), nullable=False),
    F("list", pa.string(), nullable=False),                 # all | cold
    F("rank", pa.int32(), nullable=False),
    F("track_id", pa.string(), nullable=False),
    F("score", pa.float32(), nullable=False),               # raw inner product of ALS-scale vectors
    F("source", pa.string(), nullable=False),               # the track's serving source: usage | audio
    F("run_id", pa.string(), nullable=False),
    cluster_by=("user_id",),
)

NEIGHBOUR_METRICS = _table(
    "neighbour_metrics", ("run_id", "table", "list"),
    "One row per neighbours run, output table and list: the index, its measured recall@k against "
    "exact search on a hash sample of queries (1.0 by construction for index 'flat'), sizes, "
    "timings, and the share of audio-sourced neighbours.",
    F("run_id", pa.string(), nullable=False),
    F("table", pa.string(), nullable=False),
    F("list", pa.string(), nullable=False),
    F("index_type", pa.string(), nullable=False),
    F("k", pa.int32(), nullable=False),
    F("recall_at_k", pa.float64()),
    F("n_queries", pa.int64()),
    F("n_queries_sampled", pa.int64()),
    F("n_items", pa.int64()),
    F("shards", pa.int32()),
    F("blocks", pa.int32()),
    F("nlist", pa.int32()),
    F("nprobe", pa.int32()),
    F("hnsw_m", pa.int32()),
    F("ef_search", pa.int32()),
    F("build_seconds", pa.float64()),
    F("search_seconds", pa.float64()),
    F("seconds", pa.float64()),                             # the table's whole share of the run
    F("audio_share", pa.float64()),                         # share of neighbours without usage (audio, metadata)
    F("model_id", pa.string()),
)

NEIGHBOUR_REJECTS = _table(
    "neighbour_rejects", ("table", "id"),
    "Vectors the neighbours stage left out (of the table it was building), with a reason code.",
    F("table", pa.string(), nullable=False),
    F("id", pa.string(), nullable=False),
    F("reason", pa.string(), nullable=False),
    F("detail", pa.string()),
    F("run_id", pa.string(), nullable=False),
)


# --- content-only mode: a labels model's outputs (issue 18) -------------------------------------
AUDIO_EMBEDDINGS = _table(
    "audio_embeddings", ("track_id",),
    "A labels model's track embedding (its penultimate layer, unit-normalised: cosine = inner "
    "product) for every scorable track. Not in the ALS space: never mixed into serving_factors.",
    F("track_id", pa.string(), nullable=False),
    F("embedding", VECTOR, nullable=False),
    F("fingerprint", pa.string(), nullable=False),      # of the mel it came from
    F("model_id", pa.string(), nullable=False),
    F("run_id", pa.string(), nullable=False),
    cluster_by=("track_id",),
)

PREDICTED_LABELS = _table(
    "predicted_labels", ("track_id",),
    "A labels model's most probable labels per track (infer.top_labels of them, most probable "
    "first) with their probabilities (sigmoid of the label head: labels are multi-label).",
    F("track_id", pa.string(), nullable=False),
    F("labels", pa.list_(pa.string()), nullable=False),
    F("probabilities", VECTOR, nullable=False),
    F("fingerprint", pa.string(), nullable=False),
    F("model_id", pa.string(), nullable=False),
    F("run_id", pa.string(), nullable=False),
    cluster_by=("track_id",),
)


def spark_schema(table: Table):
    """The Spark StructType of ``table`` (imported lazily: pure code needs no pyspark)."""
    from pyspark.sql.pandas.types import from_arrow_schema
    return from_arrow_schema(table.schema)

ALL_TABLES: dict[str, Table] = {t.name: t for t in (
    MELS, TRACK_METADATA, INGEST_REJECTS, PLAYS_REJECTS, USER_INDEX, TRACK_INDEX, USER_FACTORS, TRACK_FACTORS,
    EVAL_HOLDOUT, FACTOR_ALIGNMENTS, PREDICTED_FACTORS, SERVING_FACTORS, INFER_REJECTS, TRAIN_EXAMPLES,
    VALIDATION_EXAMPLES, TRAIN_REJECTS, TRAIN_METRICS, RUNS, EVALUATION_RESULTS, BASELINE_FACTORS,
    BASELINE_REJECTS, UPPER_BOUND_FACTORS, SIMILAR_TRACKS, SOUNDS_LIKE, USER_RECOMMENDATIONS,
    NEIGHBOUR_METRICS, NEIGHBOUR_REJECTS, AUDIO_EMBEDDINGS, PREDICTED_LABELS)}
