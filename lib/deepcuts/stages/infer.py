"""The infer stage: score every track of ``mels`` with a trained model, then backfill.

Outputs
  ``predicted_factors``  the model's vector for every scorable track (track_id, factors,
                         fingerprint of the mel it came from, model_id, run_id), in the
                         model's own output space.
  ``infer_rejects``      the tracks that could not be scored this run, with a reason code.
  ``serving_factors``    one row per catalogue track.  ``infer.serving = "blend"`` (the
                         default): source ``usage`` (published ALS factors) for tracks with more
                         than ``infer.blend_max_listeners`` listeners, ``blend`` for tracks with
                         1..that many and an audio vector (one ALS item half-step with the audio
                         vector as prior, :mod:`deepcuts.cf.blend`), ``audio`` for tracks without
                         plays, ``metadata`` for those of them whose album or artist has warm
                         tracks (``infer.metadata_prior``, :mod:`deepcuts.cf.metadata`).
                         ``"threshold"``: the ALS factors where the track has
                         ``infer.min_listeners_for_usage`` listeners, else its audio-predicted
                         factors brought into the ALS space (see ``audio_scale``).

The blend re-reads the published fit's plays (``factors.plays`` validated as factors reads
it, minus ``eval_holdout``), joins ``user_factors`` and solves per track in the executors;
only XᵀX (rank² numbers) reaches the driver.  Cost: one scan + aggregation of the plays (the
same as the factors stage's read), a shuffle of the listener rows of tracks with at most
``blend_max_listeners`` listeners (each carrying a rank-float user vector), and per such
track O(n·rank² + rank³) flops.  Estimated (not yet measured at scale): at 1e6 tracks of
which ~8e5 in the long tail (≤ 50 listeners, ~5 each) ~4e6 rows x 32 floats ≈ 0.5 GB
shuffled and ~1e11 flops (≈ 100 core-seconds); at 1e7 tracks 10x that (~5 GB shuffled, ~1,000 core-seconds), memory per task
bounded by one Arrow batch plus one track.

Scoring runs in the executors, reading from the warehouse what it needs: Spark scans only
the small key columns of ``mels`` (``mel_locations``: track, fingerprint, file, row), groups
the rows to score into units of one row group, spreads the units evenly over the tasks,
and each task reads its row groups with pyarrow (``read_mel_rows``) and scores them
(``mapInPandas``).  The 330 kB mels never pass through the JVM, the Arrow stream and
pandas, a copy chain that cost more than the forward pass.  The model is read from its
warehouse folder once per Python worker (cached by id and weights checksum); torch's
threads are set to the task's cores; CUDA is used when the task has a GPU.
``score_mel_table`` is the pure, Spark-free per-batch function and ``Artifact.embed``
(deepcuts.nn.model) the one function that turns mels into vectors, so Spark and plain-
Python scoring agree.  ``infer.precision = "auto"`` scores in bfloat16 on CPUs with
native bf16 (AMX, AVX512-BF16) and in float16 on CUDA: 2-2.5x float32 on this CPU, with
vectors within 0.4 % of float32 and the same cold-start metrics to 3 decimals.

Scoring a long excerpt: ``infer.scoring = "whole"`` (the default) is one pass over the
stored excerpt (the model pools globally over time); ``"windows"`` averages the vectors of
evenly spread ``window_seconds`` windows, the crop length the model was trained on.  The
default is chosen on the validation split, never on the cold test tracks
(``bench/infer_quality.py``; default demo, 23 validation tracks, 1,368 users): whole
mAP@500 / AUC 0.5094 / 0.8679, windows 0.4896 / 0.8649.
The windows share one pass of the conv stack (``model.Scorer``), so both cost about the same.
A ridge model with pretrained features (``train.transfer = "musicnn"``) adds ~0.5 core-s per
30 s excerpt in float32 whatever the precision (~150 core-hours for a full pass at 10^6
tracks, ~1,500 at 10^7; :mod:`deepcuts.nn.pretrained`).

Incremental mode rescores only tracks whose (fingerprint, model) has no committed
prediction; only the data files holding superseded rows are rewritten.  A new model id
supersedes every row, i.e. rescores everything.
"""
from __future__ import annotations

import logging
import posixpath
import threading
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from deepcuts.audio.decode import mel_view
from deepcuts.cf.align import OTHER_SPACE, current_lineage, model_space
from deepcuts.core.config import Config
from deepcuts.core.errors import InputMissing
from deepcuts.core.faults import OFF, inject, switches
from deepcuts.core.tables import (FACTOR_ALIGNMENTS, INFER_REJECTS, MELS, PREDICTED_FACTORS, SERVING_FACTORS,
                                  SOURCE_AUDIO, SOURCE_BLEND, SOURCE_METADATA, SOURCE_USAGE, TRACK_FACTORS)

log = logging.getLogger(__name__)


# Reason codes of infer_rejects.
MEL_SIZE_MISMATCH = "mel_size_mismatch"     # byte length != n_mels * n_frames float16
N_MELS_MISMATCH = "n_mels_mismatch"         # mel bands differ from what the model was trained on
TOO_SHORT = "too_short"                     # fewer frames than the model's receptive field
NON_FINITE_MEL = "non_finite_mel"           # NaN/inf in the stored spectrogram
NON_FINITE_OUTPUT = "non_finite_output"     # the model produced NaN/inf
MODEL_ERROR = "model_error"                 # the forward pass raised on this track alone
REASONS = (MEL_SIZE_MISMATCH, N_MELS_MISMATCH, TOO_SHORT, NON_FINITE_MEL, NON_FINITE_OUTPUT,
           MODEL_ERROR)

# Columns of mels the scorer reads from the data files.
MEL_INPUT_COLUMNS = ["track_id", "fingerprint", "mel", "n_mels", "n_frames", "sample_rate",
                     "hop_length"]
MEL_INPUT_SCHEMA = pa.schema([MELS.schema.field(c).with_nullable(True) for c in MEL_INPUT_COLUMNS])
# One row per input mel: factors set and reason null, or factors null and reason set.
SCORED_SCHEMA = pa.schema([
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("fingerprint", pa.string()),
    pa.field("factors", pa.list_(pa.float32())),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
])


# --------------------------------------------------------------------------------------
# Pure scoring (no Spark)
# --------------------------------------------------------------------------------------
def _reject(row: dict, model_id: str, reason: str, detail: str) -> dict:
    return {"track_id": row["track_id"], "fingerprint": row["fingerprint"], "factors": None,
            "model_id": model_id, "reason": reason, "detail": detail[:500]}


def _decode_rows(table: pa.Table, n_mels: int, shortest: int,
                 model_id: str) -> tuple[list[dict], list[np.ndarray], list[dict]]:
    """Validate each row and view its mel in place (float16, no copy out of Arrow); bad
    rows become rejects, never exceptions."""
    meta = table.select([c for c in MEL_INPUT_COLUMNS if c != "mel"]).to_pylist()
    mel_column = table.column("mel")
    rows, mels, rejects = [], [], []
    for i, row in enumerate(meta):
        cell = mel_column[i]
        mel_bytes = cell.as_buffer() if cell.is_valid else None
        frames, bands = row["n_frames"] or 0, row["n_mels"] or 0
        if mel_bytes is None or len(mel_bytes) != bands * frames * 2 or frames <= 0:
            got = None if mel_bytes is None else len(mel_bytes)
            rejects.append(_reject(row, model_id, MEL_SIZE_MISMATCH,
                                   f"{got} bytes for {row['n_mels']}x{row['n_frames']} float16"))
            continue
        if bands != n_mels:
            rejects.append(_reject(row, model_id, N_MELS_MISMATCH,
                                   f"mel has {bands} bands, model expects {n_mels}"))
            continue
        if frames < shortest:
            rejects.append(_reject(row, model_id, TOO_SHORT, f"{frames} frames < the model's {shortest}"))
            continue
        mel = mel_view(mel_bytes, bands, frames)
        # A float16 is NaN/inf iff its exponent bits are all set: an integer test is ~20x
        # faster than np.isfinite, which has no float16 fast path.
        exponent = mel.view(np.uint16) & 0x7C00
        if (exponent == 0x7C00).any():
            bad = int((exponent == 0x7C00).sum())
            rejects.append(_reject(row, model_id, NON_FINITE_MEL, f"{bad} non-finite values"))
            continue
        rows.append(row)
        mels.append(mel)
    return rows, mels, rejects


def _embed_isolating_failures(artifact, stack: np.ndarray, window: int | None
                              ) -> tuple[np.ndarray | list, list]:
    """Embed a batch; if the batch raises, embed one item at a time so only the culprit
    fails.  Returns (vector or None per item, error text or None per item)."""
    try:
        return artifact.embed(stack, window), [None] * len(stack)
    except Exception:  # noqa: BLE001 - one bad item must not fail the batch
        pass
    vectors, errors = [None] * len(stack), [None] * len(stack)
    for i in range(len(stack)):
        try:
            vectors[i] = artifact.embed(stack[i:i + 1], window)[0]
        except Exception as exc:  # noqa: BLE001
            errors[i] = f"{type(exc).__name__}: {exc}"
    return vectors, errors


def track_window(artifact, scoring: str, window_seconds: float, sample_rate: int,
                 hop_length: int) -> int | None:
    """Frames per window for ``scoring="windows"`` (None: one pass over the excerpt)."""
    if scoring == "whole":
        return None
    if scoring != "windows":
        raise ValueError(f"scoring must be 'whole' or 'windows', not {scoring!r}")
    return max(artifact.model.min_frames, int(round(window_seconds * sample_rate / hop_length)))


def score_mel_table(table: pa.Table, artifact, scoring: str, window_seconds: float,
                    batch_size: int) -> pd.DataFrame:
    """Score an Arrow table of ``mels`` rows (MEL_INPUT_COLUMNS) with ``artifact``.

    ``scoring="whole"``: one forward pass over the stored excerpt (the model pools
    globally over time).  ``"windows"``: the mean of the vectors of evenly spread
    ``window_seconds`` windows covering the excerpt (``model.window_starts``).  Mels of
    equal length are batched together (global pooling must never see padding).
    Returns SCORED_SCHEMA rows, one per input row: a vector, or a reason code and detail.
    """
    model_id = artifact.model_id
    rows, mels, out = _decode_rows(table, int(artifact.meta["n_mels"]), artifact.model.min_frames,
                                   model_id)
    groups: dict[tuple[int, int | None], list[int]] = {}
    for k, (row, mel) in enumerate(zip(rows, mels)):
        window = track_window(artifact, scoring, window_seconds, row["sample_rate"], row["hop_length"])
        groups.setdefault((mel.shape[1], window), []).append(k)
    vectors: list = [None] * len(rows)
    errors: list = [None] * len(rows)
    for (_, window), members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            got, errs = _embed_isolating_failures(artifact, np.stack([mels[k] for k in chunk]), window)
            for j, k in enumerate(chunk):
                vectors[k], errors[k] = got[j], errs[j]
    for row, vector, err in zip(rows, vectors, errors):
        if err is not None:
            out.append(_reject(row, model_id, MODEL_ERROR, err))
        elif not np.isfinite(vector).all():
            out.append(_reject(row, model_id, NON_FINITE_OUTPUT, "model output has NaN/inf"))
        else:
            out.append({"track_id": row["track_id"], "fingerprint": row["fingerprint"],
                        "factors": np.asarray(vector, dtype=np.float32), "model_id": model_id,
                        "reason": None, "detail": None})
    return pd.DataFrame(out, columns=SCORED_SCHEMA.names)


def score_mel_batch(batch: pd.DataFrame, artifact, scoring: str, window_seconds: float,
                    batch_size: int) -> pd.DataFrame:
    """``score_mel_table`` for a pandas frame of ``mels`` rows."""
    table = pa.Table.from_pandas(batch[MEL_INPUT_COLUMNS], schema=MEL_INPUT_SCHEMA, preserve_index=False)
    return score_mel_table(table, artifact, scoring, window_seconds, batch_size)


# --------------------------------------------------------------------------------------
# The model in the executors
# --------------------------------------------------------------------------------------
def pinned_key(meta: dict) -> str:
    """``<model id>@<weights sha256>``: one model id and exactly its weights."""
    return f"{meta['model_id']}@{meta['weights_sha256']}"


def model_key(artifact_dir: str) -> str:
    """``pinned_key`` of a model folder, read on the driver: what the executors must load,
    so a folder rewritten under the same id is never mixed in."""
    import json
    from deepcuts.nn.model import META_FILE, ModelArtifactError
    from deepcuts.core.storage import read_bytes
    data = read_bytes(posixpath.join(artifact_dir, META_FILE))
    try:
        return pinned_key(json.loads(data))
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelArtifactError(f"{artifact_dir}/{META_FILE} is missing or has no model_id and "
                                 f"weights checksum: {exc!r}") from exc


_WORKER_MODELS: dict[tuple[str, str, str], object] = {}
_WORKER_LOCK = threading.Lock()


def task_device() -> str:
    """CUDA (the task's assigned GPU when Spark schedules GPUs) when present, else CPU."""
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    try:
        from pyspark import TaskContext
        ctx = TaskContext.get()
        gpu = ctx.resources().get("gpu") if ctx is not None else None
        if gpu is not None and gpu.addresses:
            return f"cuda:{gpu.addresses[0]}"
    except Exception:  # noqa: BLE001 - no task context: a plain Python call
        pass
    return "cuda"


def device_scoring(device: str, batch_size: int, precision: str, gpu_batch_size: int,
                   gpu_precision: str) -> tuple[int, str]:
    """(batch size, precision) for the device a task scores on: ``infer.gpu_batch_size`` /
    ``infer.gpu_precision`` on a CUDA device (the task's GPU resource, see task_device),
    ``infer.batch_size`` / ``infer.precision`` on a CPU."""
    if device.startswith("cuda"):
        return gpu_batch_size, gpu_precision
    return batch_size, precision


def task_cores(default: int = 1) -> int:
    try:
        from pyspark import TaskContext
        ctx = TaskContext.get()
        return max(1, int(ctx.cpus())) if ctx is not None else default
    except Exception:  # noqa: BLE001
        return default


def worker_artifact(key: str, artifact_dir: str, device: str, precision: str):
    """The model, read from the warehouse once per Python worker and device (later tasks
    reuse it), like the mels.  ``key`` (``model_key``) pins the weights the driver saw."""
    from deepcuts.nn.model import ModelArtifactError, load_artifact
    cache_key = (key, device, precision)
    with _WORKER_LOCK:
        if cache_key not in _WORKER_MODELS:
            artifact = load_artifact(artifact_dir, device=device, precision=precision)
            if pinned_key(artifact.meta) != key:
                raise ModelArtifactError(f"model folder {artifact_dir} changed during the run: "
                                         f"the driver planned {key}")
            _WORKER_MODELS.clear()   # one model per worker: a new id evicts the old
            _WORKER_MODELS[cache_key] = artifact
        return _WORKER_MODELS[cache_key]


# --------------------------------------------------------------------------------------
# Reading mels where they are stored
# --------------------------------------------------------------------------------------
LOCATIONS_SCHEMA = "track_id string, fingerprint string, mel_file string, mel_row long"


def row_positions(files: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """mapInPandas body: for each mels data file, the row index of every track in it
    (only the small ``track_id`` column is read)."""
    import pyarrow.parquet as pq
    from deepcuts.core.spark import python_worker_setup
    from deepcuts.core.storage import filesystem_for, path_from_uri
    python_worker_setup()
    for batch in files:
        for uri in batch["mel_file"]:
            fs, path = filesystem_for(path_from_uri(uri))
            with fs.open_input_file(path) as fh:
                ids = pq.ParquetFile(fh).read(columns=["track_id"]).column("track_id").to_pylist()
            yield pd.DataFrame({"mel_file": uri, "track_id": ids, "mel_row": np.arange(len(ids), dtype=np.int64)})


def mel_locations(ctx):
    """``track_id, fingerprint, mel_file, mel_row`` of every mel of the pinned ``mels`` version.

    Spark scans only these small columns; the scorers read the mels themselves from the
    files, so 330 kB per track never passes through the JVM, Arrow and pandas on the way
    (that copy chain cost more than the forward pass).  Delta exposes a row's file but not
    its position, so one pass over the files' ``track_id`` columns finds the rows (tables
    are written without deletion vectors: every row of a live file is live)."""
    from pyspark.sql import functions as F
    if not ctx.exists(MELS):
        return ctx.spark.createDataFrame([], LOCATIONS_SCHEMA)
    keys = ctx.read(MELS, with_file=True).select("track_id", "fingerprint", F.col("_file").alias("mel_file"))
    positions = keys.select("mel_file").distinct().mapInPandas(
        row_positions, "mel_file string, track_id string, mel_row long")
    return keys.join(positions, ["mel_file", "track_id"]).select("track_id", "fingerprint", "mel_file", "mel_row")


def read_mel_rows(file_uri: str, rows: list[int]) -> Iterator[pa.Table]:
    """The MEL_INPUT_COLUMNS of ``rows`` (row indexes in the file) of one mels data file,
    one table per row group: only the row groups holding them are read."""
    import pyarrow.parquet as pq
    from deepcuts.core.storage import filesystem_for, path_from_uri
    fs, path = filesystem_for(path_from_uri(file_uri))
    wanted = np.sort(np.asarray(rows, dtype=np.int64))
    with fs.open_input_file(path) as fh:
        parquet = pq.ParquetFile(fh)
        first = 0
        for group in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            local = wanted[(wanted >= first) & (wanted < first + n)] - first
            first += n
            if len(local):
                table = parquet.read_row_group(group, columns=MEL_INPUT_COLUMNS)
                yield table if len(local) == n else table.take(local)


def score_stored_mels(file_uri: str, rows: list[int], track_ids: list[str], artifact, scoring: str,
                      window_seconds: float, batch_size: int) -> Iterator[pd.DataFrame]:
    """Score the given rows of one mels data file, a row group at a time."""
    expected = dict(zip(rows, track_ids))
    order = sorted(expected)
    done = 0
    for table in read_mel_rows(file_uri, order):
        got = table.column("track_id").to_pylist()
        want = [expected[r] for r in order[done:done + len(got)]]
        if got != want:   # data files are immutable: this is a bug, never a reason to guess
            raise RuntimeError(f"{file_uri}: rows {order[done]}.. hold {got[:3]}..., expected {want[:3]}...")
        done += len(got)
        yield score_mel_table(table, artifact, scoring, window_seconds, batch_size)
    if done != len(order):
        raise RuntimeError(f"{file_uri}: {len(order) - done} of the requested rows are past its end")


# --------------------------------------------------------------------------------------
# Scoring in the executors
# --------------------------------------------------------------------------------------
def _scorer(key: str, artifact_dir: str, scoring: str, window_seconds: float, batch_size: int,
            precision: str, gpu_batch_size: int | None = None, gpu_precision: str | None = None,
            faults=OFF):
    def score_partition(units: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        torch.set_num_threads(task_cores())   # the task's cores, or executors oversubscribe
        device = task_device()
        scoring_batch, dtype = device_scoring(device, batch_size, precision, gpu_batch_size or batch_size,
                                              gpu_precision or precision)
        artifact = worker_artifact(key, artifact_dir, device, dtype)
        for batch in units:
            for file_uri, rows in zip(batch["mel_file"], batch["rows"]):
                yield from score_stored_mels(file_uri, [int(r["mel_row"]) for r in rows],
                                             [r["track_id"] for r in rows], artifact, scoring,
                                             window_seconds, scoring_batch)
        # Tests only (cfg.faults): fail after the rows were handed on.
        inject("infer.score", faults)
    return score_partition


def predict_vectors(spark, locations, artifact_path: str, cfg: Config):
    """Score the mels at ``locations`` (``mel_locations``, or a subset of it) with the model
    in ``artifact_path``.

    The rows are grouped into units of one mels row group (``ingest.rows_per_row_group``
    rows), the units spread evenly over the tasks, and each task reads its row groups
    straight from the files.  Returns a lazy DataFrame with one row per location:
    ``track_id, fingerprint, factors (array<float>), model_id, reason, detail``.
    ``reason`` is null and ``factors`` set for scored tracks; for a track that could
    not be scored ``factors`` is null and ``reason``/``detail`` say why (REASONS).
    The vectors are the model's embed output (its own space); ``serving_factors``
    rescales them to the ALS scale.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema
    key = model_key(artifact_path)
    rows_per_unit = cfg.ingest.rows_per_row_group
    units = locations.groupBy("mel_file", F.floor(F.col("mel_row") / rows_per_unit).alias("unit")).agg(
        F.collect_list(F.struct("mel_row", "track_id")).alias("rows"))
    # One task per unit up to 4 per core: the last wave stays short.  The units (keys
    # only) are materialised once so that counting them for an exact round-robin split
    # does not scan and aggregate the locations a second time.
    units = units.localCheckpoint(eager=True)
    n_units = units.count()
    parallelism = spark.sparkContext.defaultParallelism
    units = units.repartition(max(1, min(n_units, 4 * parallelism)))
    score = _scorer(key, artifact_path, cfg.infer.scoring, cfg.infer.window_seconds,
                    cfg.infer.batch_size, cfg.infer.precision, cfg.infer.gpu_batch_size, cfg.infer.gpu_precision,
                    switches(cfg.faults))
    return units.select("mel_file", "rows").mapInPandas(score, from_arrow_schema(SCORED_SCHEMA))


def score_locally(mels: pd.DataFrame, artifact, cfg: Config) -> pd.DataFrame:
    """Plain-Python scoring of a pandas frame of ``mels`` rows (same path as the executors)."""
    return score_mel_batch(mels[MEL_INPUT_COLUMNS], artifact, cfg.infer.scoring,
                           cfg.infer.window_seconds, cfg.infer.batch_size)


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------
def resolve_model(cfg: Config, lk) -> tuple[str, str]:
    """(model_id, model folder) of ``infer.model`` or of the latest model."""
    from deepcuts.nn.model import latest_model_id, model_dir
    model_id = cfg.infer.model or latest_model_id(lk)
    if not model_id:
        raise InputMissing(f"no trained model under {lk.root}/models: run the train stage first "
                           "(or set infer.model)")
    return model_id, model_dir(lk, model_id)


def audio_to_als_expr(column, meta: dict, scale: float | None):
    """Spark expression bringing predicted vectors into the ALS space of ``track_factors``.

    A model trained on unit-normalised factors predicts directions only: they are
    unit-normalised and multiplied by ``scale`` (the median norm of the ALS track
    factors), so dot products with user factors are comparable with usage rows.  A
    model trained on raw factors already predicts that scale and is served as is.
    """
    from pyspark.sql import functions as F
    if not predicts_unit_factors(meta) or scale is None:
        return column
    norm = F.sqrt(F.aggregate(column, F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    return F.when(norm > 0, F.transform(column, lambda x: (x * F.lit(scale) / norm).cast("float"))) \
        .otherwise(column)


def predicts_unit_factors(meta: dict) -> bool:
    """Whether the model learnt ``factors_unit`` (directions) rather than raw ALS factors."""
    column = meta.get("target_column") or meta.get("factors_column")
    if column:
        return column == "factors_unit"
    return (meta.get("train") or {}).get("loss", "mse") == "mse"   # conf: mse on unit factors, wpe on raw factors




def check_model_fits_factors(meta: dict, rank: int | None) -> None:
    """Audio rows are served beside ALS rows: the model must predict vectors of that space."""
    from deepcuts.core.config import ConfigError   # a mismatch of model and stage: exit 2, one line
    if meta.get("target") != "factors":
        raise ConfigError(f"model {meta.get('model_id')} has target {meta.get('target')!r}: "
                          "serving_factors needs a model trained on target 'factors'")
    if rank is not None and int(meta["out_dim"]) != rank:
        raise ConfigError(f"model {meta.get('model_id')} predicts {meta['out_dim']} factors but "
                          f"track_factors has rank {rank}: retrain the model on the current factors")


def check_model_space(meta: dict, current_run: str | None, chain: list[str]) -> str:
    """The model's ALS space against the current factors (:func:`deepcuts.cf.align.model_space`);
    a model of any other space is refused: its vectors would be served in the wrong space."""
    from deepcuts.core.errors import GateFailed
    space = model_space(meta.get("factors_run_id"), current_run, chain)
    if space == OTHER_SPACE:
        raise GateFailed(
            f"model {meta.get('model_id')} learnt ALS factors run {meta.get('factors_run_id')}, but the current "
            f"factors run {current_run} is not aligned to it (its space starts at {chain[-1]}: see the "
            "factor_alignments table): retrain (the train stage) or set infer.model to a model of this space")
    return space


def median_als_norm(track_factors) -> float | None:
    """The median L2 norm of the ALS track vectors (the scale audio rows are served at)."""
    from pyspark.sql import functions as F
    norm = F.sqrt(F.aggregate("factors", F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    value = track_factors.select(F.percentile_approx(norm, 0.5, 10000).alias("m")).first()["m"]
    return float(value) if value is not None else None


def run(ctx) -> dict:
    """Score the catalogue (or its changes), then rebuild serving_factors."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from deepcuts.nn.model import load_artifact

    spark, cfg, run_id = ctx.spark, ctx.cfg, ctx.run_id
    model_id, artifact_dir = resolve_model(cfg, ctx.lake)
    meta = load_artifact(artifact_dir).meta   # a broken artifact stops here, before Spark work
    if meta.get("target") == "labels":   # embeddings + predicted labels; serving_factors untouched
        from deepcuts.stages.content import infer_labels
        return infer_labels(ctx, model_id, artifact_dir, meta)
    track_factors = ctx.read(TRACK_FACTORS)
    first = track_factors.select(F.size("factors").alias("rank")).first()
    check_model_fits_factors(meta, first["rank"] if first else None)
    factors_run, chain = current_lineage(ctx, TRACK_FACTORS, FACTOR_ALIGNMENTS)
    space = check_model_space(meta, factors_run, chain)
    locations = mel_locations(ctx).persist(StorageLevel.MEMORY_AND_DISK)
    current_keys = locations.select("track_id", "fingerprint")

    # Incremental: score only mels without a prediction by this model for this fingerprint;
    # one MERGE upserts them and deletes the predictions of tracks that left ``mels``.
    full = not cfg.infer.incremental or not ctx.exists(PREDICTED_FACTORS)
    if full:
        to_score, gone = locations, None
    else:
        existing = ctx.read(PREDICTED_FACTORS)
        valid = existing.filter(F.col("model_id") == model_id) \
            .join(current_keys, ["track_id", "fingerprint"], "left_semi")
        to_score = locations.join(valid.select("track_id", "fingerprint"), ["track_id", "fingerprint"],
                                  "left_anti")
        gone = existing.select("track_id").join(current_keys.select("track_id"), "track_id", "left_anti")

    scored = predict_vectors(spark, to_score, artifact_dir, cfg) \
        .withColumn("run_id", F.lit(run_id)).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {r["reason"]: r["n"] for r in scored.groupBy("reason").agg(F.count("*").alias("n"))
                  .collect()}
        n_scored = counts.pop(None, 0)
        new_rows = scored.filter(F.col("reason").isNull()).select(*PREDICTED_FACTORS.columns)
        if full:
            predicted = ctx.write(new_rows, PREDICTED_FACTORS)
        else:
            n_gone = gone.count()
            predicted = ctx.merge(PREDICTED_FACTORS, new_rows, deletes=gone) if n_scored or n_gone else None
        # The current rejects: every unscored track is retried each run, so this run's
        # rejects are the complete list.
        ctx.write(scored.filter(F.col("reason").isNotNull()), INFER_REJECTS)
    finally:
        scored.unpersist()

    serving = write_serving(ctx, model_id, meta, locations, track_factors)
    n_mels = locations.count()
    locations.unpersist()
    return {
        **scoring_summary(model_id, cfg, full, n_mels, n_scored, counts),
        "predicted_factors": str(predicted) if predicted else "unchanged",
        "model_factors_run": meta.get("factors_run_id"),
        "current_factors_run": factors_run,
        "model_space": space,
        **serving,
    }


def scoring_summary(model_id: str, cfg: Config, full: bool, n_mels: int, n_scored: int, rejected: dict) -> dict:
    """The scoring half of the stage summary (a factors or a labels model alike)."""
    return {"model_id": model_id, "scoring": cfg.infer.scoring, "mode": "full" if full else "incremental",
            "mels": n_mels, "scored": n_scored, "unchanged": n_mels - n_scored - sum(rejected.values()),
            "rejected": rejected}


def write_serving(ctx, model_id: str, meta: dict, locations, track_factors) -> dict:
    """One row per catalogue track (every mel, plus ALS-only tracks): ALS factors with
    enough listeners, else the audio prediction rescaled to the ALS scale, else (no
    usable audio) whatever ALS vector exists.  Rebuilt whole and committed in one
    overwrite, so a new model replaces every audio row at once."""
    from pyspark.sql import functions as F

    cfg, run_id = ctx.cfg, ctx.run_id
    threshold = cfg.infer.min_listeners_for_usage
    scale = median_als_norm(track_factors)
    als = track_factors.select("track_id", "factors",
                               (F.col("n_listeners") >= threshold).alias("enough_usage"))
    usage = als.filter("enough_usage").select(
        "track_id", "factors", F.lit(SOURCE_USAGE).alias("source"),
        F.lit(None).cast("string").alias("model_id"))
    predicted = ctx.read(PREDICTED_FACTORS).filter(F.col("model_id") == model_id)
    audio = predicted.join(usage.select("track_id"), "track_id", "left_anti").select(
        "track_id", audio_to_als_expr(F.col("factors"), meta, scale).alias("factors"),
        F.lit(SOURCE_AUDIO).alias("source"), "model_id")
    # Little usage and no audio vector (e.g. its mel was rejected): the ALS vector is all
    # there is, and it is still a better answer than no row.
    fallback = als.filter(~F.col("enough_usage")) \
        .join(predicted.select("track_id"), "track_id", "left_anti").select(
            "track_id", "factors", F.lit(SOURCE_USAGE).alias("source"),
            F.lit(None).cast("string").alias("model_id"))
    serving = usage.unionByName(audio).unionByName(fallback)
    audio_vectors = predicted.select("track_id", audio_to_als_expr(F.col("factors"), meta, scale).alias("factors"))
    blend_info = None
    if cfg.infer.serving == "blend":   # issue 19: little usage -> the ALS half-step with the audio prior
        from deepcuts.cf.blend import serving_rows
        blended, blend_info = serving_rows(ctx, track_factors, audio_vectors, model_id,
                                           (SOURCE_USAGE, SOURCE_AUDIO, SOURCE_BLEND))
        serving = blended if blended is not None else serving
    metadata_info: dict = {"why": "infer.metadata_prior = false"}
    if cfg.infer.metadata_prior:   # issue 13: no plays, a known album / artist -> blended with its warm tracks
        from deepcuts.cf.metadata import metadata_vectors, warm_vectors, with_metadata_rows
        without_usage = audio_vectors.join(warm_vectors(track_factors, threshold), "track_id", "left_anti")
        prior_rows, metadata_info = metadata_vectors(ctx, audio_vectors, without_usage)
        if prior_rows is not None:
            serving = with_metadata_rows(serving, prior_rows, SOURCE_AUDIO, SOURCE_METADATA)
    committed = ctx.write(serving.withColumn("run_id", F.lit(run_id)), SERVING_FACTORS,
                          metadata={"min_listeners_for_usage": threshold, "audio_scale": scale,
                                    "model_id": model_id, "serving": cfg.infer.serving,
                                    "blend_prior_strength": cfg.infer.blend_prior_strength,
                                    "metadata_prior": metadata_info.get("levels")})
    if blend_info and "_persisted" in blend_info:
        blend_info.pop("_persisted").unpersist()

    written = ctx.read(SERVING_FACTORS)
    by_source = {r["source"]: r["n"] for r in written.groupBy("source")
                 .agg(F.count("*").alias("n")).collect()}
    unserved = locations.select("track_id").join(written.select("track_id"), "track_id", "left_anti").count()
    return {
        "serving_rows": committed.rows,
        "serving_by_source": by_source,
        "serving_low_usage_fallback": fallback.count() if not blend_info or blend_info["mode"] != "blend" else None,
        "serving_blend": blend_info or {"mode": "threshold"},
        "serving_metadata_prior": metadata_info,
        "unserved_tracks": unserved,
        "audio_scale": None if scale is None else round(scale, 4),
    }
