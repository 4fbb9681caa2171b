"""Stage 4, inference: score every track of ``mels`` with a trained model, then backfill.

Outputs
  ``predicted_factors``  the model's vector for every scorable track (track_id, factors,
                         fingerprint of the mel it came from, model_id, run_id), in the
                         model's own output space.
  ``infer_rejects``      the tracks that could not be scored this run, with a reason code.
  ``serving_factors``    one row per catalogue track: the ALS factors where the track has
                         ``infer.min_listeners_for_usage`` listeners, else its audio-predicted
                         factors brought into the ALS space (see ``audio_scale``).

Scoring runs in the executors (``mapInPandas``): the model files are broadcast once,
each Python worker loads them once (cached by model id), sets torch's threads to the
task's cores and uses CUDA when the task has a GPU.  ``score_mel_batch`` is the pure,
Spark-free per-batch function; ``Artifact.embed`` (deepcuts.model) is the one function
that turns mels into vectors, so Spark and plain-Python scoring agree.

Scoring a long excerpt: ``infer.scoring = "windows"`` (the default) averages the vectors
of evenly spread ``window_seconds`` windows, the crop length the model was trained on;
``"whole"`` is one pass over the excerpt (global pooling).  Windows evaluated slightly
better on the cold-start protocol of the demo (mAP@500 0.367 vs 0.356, AUC 0.730 vs
0.724, 37 cold tracks) at the same cost (the windows tile the excerpt once).

Incremental mode rescores only tracks whose (fingerprint, model) has no committed
prediction; only the data files holding superseded rows are rewritten.  A new model id
supersedes every row, i.e. rescores everything.
"""
from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import threading
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from .audio import mel_from_bytes
from .config import Config
from .tables import INFER_REJECTS, MELS, PREDICTED_FACTORS, SERVING_FACTORS, TRACK_FACTORS

log = logging.getLogger(__name__)

SOURCE_USAGE = "usage"
SOURCE_AUDIO = "audio"

# Reason codes of infer_rejects.
MEL_SIZE_MISMATCH = "mel_size_mismatch"     # byte length != n_mels * n_frames float16
N_MELS_MISMATCH = "n_mels_mismatch"         # mel bands differ from what the model was trained on
TOO_SHORT = "too_short"                     # fewer frames than the model's receptive field
NON_FINITE_MEL = "non_finite_mel"           # NaN/inf in the stored spectrogram
NON_FINITE_OUTPUT = "non_finite_output"     # the model produced NaN/inf
MODEL_ERROR = "model_error"                 # the forward pass raised on this track alone
REASONS = (MEL_SIZE_MISMATCH, N_MELS_MISMATCH, TOO_SHORT, NON_FINITE_MEL, NON_FINITE_OUTPUT,
           MODEL_ERROR)

# Columns of mels the scorer needs (the rest of the row never leaves the JVM).
MEL_INPUT_COLUMNS = ["track_id", "fingerprint", "mel", "n_mels", "n_frames", "sample_rate",
                     "hop_length"]
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
def window_starts(n_frames: int, window: int) -> list[int]:
    """Start frames of ceil(n/window) windows spread evenly from the first to the last
    frame: every frame is covered, none is padded, tails are not dropped."""
    if n_frames <= window:
        return [0]
    count = -(-n_frames // window)
    return [int(round(s)) for s in np.linspace(0, n_frames - window, count)]


def _reject(row, model_id: str, reason: str, detail: str) -> dict:
    return {"track_id": row.track_id, "fingerprint": row.fingerprint, "factors": None,
            "model_id": model_id, "reason": reason, "detail": detail[:500]}


def _decode_rows(batch: pd.DataFrame, n_mels: int, shortest: int,
                 model_id: str) -> tuple[list, list[np.ndarray], list[dict]]:
    """Validate and decode each row; bad rows become rejects, never exceptions."""
    rows, mels, rejects = [], [], []
    for row in batch.itertuples(index=False):
        mel_bytes = row.mel
        expected = int(row.n_mels) * int(row.n_frames) * 2
        if mel_bytes is None or len(mel_bytes) != expected or row.n_frames <= 0:
            got = None if mel_bytes is None else len(mel_bytes)
            rejects.append(_reject(row, model_id, MEL_SIZE_MISMATCH,
                                   f"{got} bytes for {row.n_mels}x{row.n_frames} float16"))
            continue
        if int(row.n_mels) != n_mels:
            rejects.append(_reject(row, model_id, N_MELS_MISMATCH,
                                   f"mel has {row.n_mels} bands, model expects {n_mels}"))
            continue
        if int(row.n_frames) < shortest:
            rejects.append(_reject(row, model_id, TOO_SHORT,
                                   f"{row.n_frames} frames < the model's {shortest}"))
            continue
        mel = mel_from_bytes(mel_bytes, int(row.n_mels), int(row.n_frames))
        if not np.isfinite(mel).all():
            bad = int((~np.isfinite(mel)).sum())
            rejects.append(_reject(row, model_id, NON_FINITE_MEL, f"{bad} non-finite values"))
            continue
        rows.append(row)
        mels.append(mel)
    return rows, mels, rejects


def _embed_isolating_failures(artifact, stack: np.ndarray) -> tuple[np.ndarray | None, list]:
    """Embed a batch; if the batch raises, embed one item at a time so only the culprit
    fails.  Returns (vectors or None per item, error text or None per item)."""
    try:
        return artifact.embed(stack), [None] * len(stack)
    except Exception:  # noqa: BLE001 - one bad item must not fail the batch
        if len(stack) == 1:
            raise
    vectors, errors = [None] * len(stack), [None] * len(stack)
    for i in range(len(stack)):
        try:
            vectors[i] = artifact.embed(stack[i:i + 1])[0]
        except Exception as exc:  # noqa: BLE001
            errors[i] = f"{type(exc).__name__}: {exc}"
    return vectors, errors


def _embed_groups(artifact, inputs: list[np.ndarray], batch_size: int
                  ) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Embed arrays of shape [n_mels, T] with varying T: equal lengths are batched
    together (global pooling must never see padding)."""
    vectors: list = [None] * len(inputs)
    errors: list = [None] * len(inputs)
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(inputs):
        by_length.setdefault(x.shape[1], []).append(i)
    for idx in by_length.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            stack = np.stack([inputs[i] for i in chunk])
            try:
                out, errs = _embed_isolating_failures(artifact, stack)
            except Exception as exc:  # noqa: BLE001 - single item that raised
                out, errs = [None], [f"{type(exc).__name__}: {exc}"]
            for j, i in enumerate(chunk):
                vectors[i] = None if out[j] is None else np.asarray(out[j], dtype=np.float32)
                errors[i] = errs[j]
    return vectors, errors


def score_mel_batch(batch: pd.DataFrame, artifact, scoring: str, window_seconds: float,
                    batch_size: int) -> pd.DataFrame:
    """Score a pandas batch of ``mels`` rows (MEL_INPUT_COLUMNS) with ``artifact``.

    ``scoring="whole"``: one forward pass over the stored excerpt (the model pools
    globally over time).  ``"windows"``: the mean of the vectors of evenly spread
    ``window_seconds`` windows covering the excerpt.  Returns SCORED_SCHEMA rows, one
    per input row: a vector, or a reason code and detail.
    """
    model_id = artifact.model_id
    shortest = artifact.model.min_frames
    rows, mels, out = _decode_rows(batch, int(artifact.meta["n_mels"]), shortest, model_id)
    if scoring == "whole":
        inputs, owner = mels, list(range(len(mels)))
    elif scoring == "windows":
        inputs, owner = [], []
        for k, (row, mel) in enumerate(zip(rows, mels)):
            window = max(shortest, int(round(window_seconds * row.sample_rate / row.hop_length)))
            for s in window_starts(mel.shape[1], window):
                inputs.append(mel[:, s:s + window])
                owner.append(k)
    else:
        raise ValueError(f"scoring must be 'whole' or 'windows', not {scoring!r}")
    vectors, errors = _embed_groups(artifact, inputs, batch_size)
    per_track: list[list[np.ndarray]] = [[] for _ in rows]
    failed: list[str | None] = [None] * len(rows)
    for k, vec, err in zip(owner, vectors, errors):
        if err is not None:
            failed[k] = failed[k] or err
        else:
            per_track[k].append(vec)
    for row, parts, err in zip(rows, per_track, failed):
        if err is not None:
            out.append(_reject(row, model_id, MODEL_ERROR, err))
            continue
        vector = parts[0] if len(parts) == 1 else np.mean(parts, axis=0, dtype=np.float32)
        if not np.isfinite(vector).all():
            out.append(_reject(row, model_id, NON_FINITE_OUTPUT, "model output has NaN/inf"))
            continue
        out.append({"track_id": row.track_id, "fingerprint": row.fingerprint,
                    "factors": vector.astype(np.float32), "model_id": model_id,
                    "reason": None, "detail": None})
    return pd.DataFrame(out, columns=SCORED_SCHEMA.names)


# --------------------------------------------------------------------------------------
# Shipping the model to the executors
# --------------------------------------------------------------------------------------
def read_artifact_files(artifact_dir: str) -> dict[str, bytes]:
    """The files of a model folder (local path or s3://...), read on the driver."""
    import pyarrow.fs as pafs
    if "://" in artifact_dir:
        fs, base = pafs.FileSystem.from_uri(artifact_dir)
    else:
        fs, base = pafs.LocalFileSystem(), os.path.abspath(artifact_dir)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    files = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as fh:
                files[posixpath.basename(info.path)] = fh.read()
    if not files:
        from .model import ModelArtifactError
        raise ModelArtifactError(f"model folder {artifact_dir} is missing or empty")
    return files


_WORKER_MODELS: dict[tuple[str, str], object] = {}
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


def task_cores(default: int = 1) -> int:
    try:
        from pyspark import TaskContext
        ctx = TaskContext.get()
        return max(1, int(ctx.cpus())) if ctx is not None else default
    except Exception:  # noqa: BLE001
        return default


def worker_artifact(model_key: str, files_broadcast, device: str, precision: str = "fp32"):
    """The model, loaded once per Python worker and device (later tasks reuse it).
    ``model_key`` is the model id plus its weights' checksum: a model folder rewritten
    under the same id is never served from a stale cache."""
    key = (model_key, device, precision)
    with _WORKER_LOCK:
        if key not in _WORKER_MODELS:
            from .model import load_artifact
            tmp = tempfile.mkdtemp(prefix="deepcuts-model-")
            try:
                for name, data in files_broadcast.value.items():
                    with open(os.path.join(tmp, name), "wb") as fh:
                        fh.write(data)
                _WORKER_MODELS.clear()   # one model per worker: a new id evicts the old
                _WORKER_MODELS[key] = load_artifact(tmp, device=device, precision=precision)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return _WORKER_MODELS[key]


def _scorer(model_key: str, files_broadcast, scoring: str, window_seconds: float, batch_size: int,
            precision: str = "fp32"):
    def score_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch
        cores = task_cores()
        torch.set_num_threads(cores)   # the task's cores, or executors oversubscribe
        artifact = worker_artifact(model_key, files_broadcast, task_device(), precision)
        for batch in batches:
            if len(batch):
                yield score_mel_batch(batch, artifact, scoring, window_seconds, batch_size)
    return score_partition


def predict_vectors(spark, mels_df, artifact_path: str, cfg: Config):
    """Score ``mels_df`` (rows of ``mels``) with the model in ``artifact_path``.

    Returns a lazy DataFrame with one row per input mel:
    ``track_id, fingerprint, factors (array<float>), model_id, reason, detail``.
    ``reason`` is null and ``factors`` set for scored tracks; for a track that could
    not be scored ``factors`` is null and ``reason``/``detail`` say why (REASONS).
    Filter on ``reason IS NULL`` for the vectors.  The vectors are the model's embed
    output (its own space); ``serving_factors`` rescales them to the ALS scale.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema
    files = read_artifact_files(artifact_path)
    model_key = _artifact_key(files, artifact_path)
    if "fingerprint" not in mels_df.columns:
        mels_df = mels_df.withColumn("fingerprint", F.lit(None).cast("string"))
    files_broadcast = spark.sparkContext.broadcast(files)
    score = _scorer(model_key, files_broadcast, cfg.infer.scoring, cfg.infer.window_seconds,
                    cfg.infer.batch_size, cfg.infer.precision)
    return mels_df.select(*MEL_INPUT_COLUMNS).mapInPandas(score, from_arrow_schema(SCORED_SCHEMA))


def _artifact_key(files: dict[str, bytes], artifact_path: str) -> str:
    import json
    from .model import META_FILE, ModelArtifactError
    try:
        meta = json.loads(files[META_FILE])
        return f"{meta['model_id']}@{meta.get('weights_sha256', '')}"
    except (KeyError, ValueError) as exc:
        raise ModelArtifactError(f"{artifact_path}/meta.json is missing or has no model_id: "
                                 f"{exc}") from exc


def score_locally(mels: pd.DataFrame, artifact, cfg: Config) -> pd.DataFrame:
    """Plain-Python scoring of a pandas frame of ``mels`` rows (same path as the executors)."""
    return score_mel_batch(mels[MEL_INPUT_COLUMNS], artifact, cfg.infer.scoring,
                           cfg.infer.window_seconds, cfg.infer.batch_size)


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------
def resolve_model(cfg: Config, wh) -> tuple[str, str]:
    """(model_id, model folder) of ``infer.model`` or of the latest model."""
    from .model import latest_model_id, model_dir
    model_id = cfg.infer.model or latest_model_id(wh)
    if not model_id:
        raise RuntimeError(f"no trained model under {wh.root}/models: run the train stage first "
                           "(or set infer.model)")
    return model_id, model_dir(wh, model_id)


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
    if meta.get("target") != "factors":
        raise RuntimeError(f"model {meta.get('model_id')} has target {meta.get('target')!r}: "
                           "serving_factors needs a model trained on target 'factors'")
    if rank is not None and int(meta["out_dim"]) != rank:
        raise RuntimeError(f"model {meta.get('model_id')} predicts {meta['out_dim']} factors but "
                           f"track_factors has rank {rank}: retrain the model on the current factors")


def superseded_files(wh, existing, current_keys, model_id: str) -> list[str]:
    """Data files of predicted_factors holding a row that no longer holds: its track left
    ``mels``, its mel changed (fingerprint) or another model made it."""
    from pyspark.sql import functions as F
    from .sparkio import files_holding
    stale = existing.join(current_keys, ["track_id", "fingerprint"], "left_anti") \
        .unionByName(existing.filter(F.col("model_id") != model_id))
    return files_holding(wh, PREDICTED_FACTORS, stale)


def median_als_norm(track_factors) -> float | None:
    """The median L2 norm of the ALS track vectors (the scale audio rows are served at)."""
    from pyspark.sql import functions as F
    norm = F.sqrt(F.aggregate("factors", F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    value = track_factors.select(F.percentile_approx(norm, 0.5, 10000).alias("m")).first()["m"]
    return float(value) if value is not None else None


def run(spark, cfg: Config, run_id: str) -> dict:
    """Score the catalogue (or its changes), then rebuild serving_factors."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from .model import load_artifact
    from .sparkio import read_table, warehouse, write_table

    wh = warehouse(cfg)
    model_id, artifact_dir = resolve_model(cfg, wh)
    meta = load_artifact(artifact_dir).meta   # a broken artifact stops here, before Spark work
    track_factors = read_table(spark, wh, TRACK_FACTORS)
    first = track_factors.select(F.size("factors").alias("rank")).first()
    check_model_fits_factors(meta, first["rank"] if first else None)
    mels = read_table(spark, wh, MELS)
    current_keys = mels.select("track_id", "fingerprint")

    # Incremental: score only mels without a prediction by this model for this fingerprint,
    # and rewrite only the files that hold superseded rows.
    full = not cfg.infer.incremental or not wh.exists(PREDICTED_FACTORS.name)
    removed: list[str] = []
    if not full:
        existing = read_table(spark, wh, PREDICTED_FACTORS, with_file=True)
        removed = superseded_files(wh, existing, current_keys, model_id)
        full = len(removed) == len(wh.snapshot(PREDICTED_FACTORS.name).files)
    if full:
        to_score, carried, removed = mels, None, []
    else:
        valid = existing.filter(F.col("model_id") == model_id) \
            .join(current_keys, ["track_id", "fingerprint"], "left_semi")
        to_score = mels.join(valid.select("track_id", "fingerprint"), ["track_id", "fingerprint"],
                             "left_anti")
        removed_uris = [wh.uri(PREDICTED_FACTORS.name, f) for f in removed]
        carried = valid.filter(F.col("_file").isin(removed_uris)).select(*PREDICTED_FACTORS.columns)

    scored = predict_vectors(spark, to_score, artifact_dir, cfg) \
        .withColumn("run_id", F.lit(run_id)).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {r["reason"]: r["n"] for r in scored.groupBy("reason").agg(F.count("*").alias("n"))
                  .collect()}
        n_scored = counts.pop(None, 0)
        new_rows = scored.filter(F.col("reason").isNull()).select(*PREDICTED_FACTORS.columns)
        if carried is not None:
            new_rows = new_rows.unionByName(carried)
        if full or n_scored or removed:
            write_table(new_rows, wh, PREDICTED_FACTORS, run_id, replace=full, removed=removed,
                        summary={"model_id": model_id, "scored": n_scored, "rejected": counts})
        # The current rejects: every unscored track is retried each run, so this run's
        # rejects are the complete list.
        write_table(scored.filter(F.col("reason").isNotNull()), wh, INFER_REJECTS, run_id,
                    replace=True, summary={"model_id": model_id, "rejected": counts})
    finally:
        scored.unpersist()

    serving = write_serving(spark, cfg, wh, run_id, model_id, meta, mels, track_factors)
    n_mels = wh.snapshot(MELS.name).rows if wh.exists(MELS.name) else 0
    n_rejected = sum(counts.values())
    return {
        "model_id": model_id,
        "scoring": cfg.infer.scoring,
        "mode": "full" if full else "incremental",
        "mels": n_mels,
        "scored": n_scored,
        "unchanged": n_mels - n_scored - n_rejected,
        "rejected": counts,
        "rewritten_files": len(removed),
        "predicted_rows": wh.snapshot(PREDICTED_FACTORS.name).rows
        if wh.exists(PREDICTED_FACTORS.name) else 0,
        **serving,
    }


def write_serving(spark, cfg: Config, wh, run_id: str, model_id: str, meta: dict, mels,
                  track_factors) -> dict:
    """One row per catalogue track (every mel, plus ALS-only tracks): ALS factors with
    enough listeners, else the audio prediction rescaled to the ALS scale, else (no
    usable audio) whatever ALS vector exists.  Rebuilt whole and committed in one swap,
    so a new model replaces every audio row at once."""
    from pyspark.sql import functions as F
    from .sparkio import read_table, write_table

    threshold = cfg.infer.min_listeners_for_usage
    scale = median_als_norm(track_factors)
    als = track_factors.select("track_id", "factors",
                               (F.col("n_listeners") >= threshold).alias("enough_usage"))
    usage = als.filter("enough_usage").select(
        "track_id", "factors", F.lit(SOURCE_USAGE).alias("source"),
        F.lit(None).cast("string").alias("model_id"))
    predicted = read_table(spark, wh, PREDICTED_FACTORS).filter(F.col("model_id") == model_id)
    audio = predicted.join(usage.select("track_id"), "track_id", "left_anti").select(
        "track_id", audio_to_als_expr(F.col("factors"), meta, scale).alias("factors"),
        F.lit(SOURCE_AUDIO).alias("source"), "model_id")
    # Little usage and no audio vector (e.g. its mel was rejected): the ALS vector is all
    # there is, and it is still a better answer than no row.
    fallback = als.filter(~F.col("enough_usage")) \
        .join(predicted.select("track_id"), "track_id", "left_anti").select(
            "track_id", "factors", F.lit(SOURCE_USAGE).alias("source"),
            F.lit(None).cast("string").alias("model_id"))
    serving = usage.unionByName(audio).unionByName(fallback).withColumn("run_id", F.lit(run_id))
    summary = {"min_listeners_for_usage": threshold, "audio_scale": scale, "model_id": model_id}
    snap = write_table(serving, wh, SERVING_FACTORS, run_id, replace=True, summary=summary)

    written = read_table(spark, wh, SERVING_FACTORS)
    by_source = {r["source"]: r["n"] for r in written.groupBy("source")
                 .agg(F.count("*").alias("n")).collect()}
    unserved = mels.select("track_id").join(written.select("track_id"), "track_id", "left_anti").count()
    factors_run = wh.snapshot(TRACK_FACTORS.name).run_id if wh.exists(TRACK_FACTORS.name) else None
    if factors_run and meta.get("factors_run_id") and meta["factors_run_id"] != factors_run:
        log.warning("model %s learnt factors run %s but track_factors is run %s: audio rows are "
                    "in an older ALS space until the model is retrained", model_id,
                    meta["factors_run_id"], factors_run)
    return {
        "serving_rows": snap.rows,
        "serving_by_source": by_source,
        "serving_low_usage_fallback": fallback.count(),
        "unserved_tracks": unserved,
        "audio_scale": None if scale is None else round(scale, 4),
        "model_factors_run": meta.get("factors_run_id"),
        "current_factors_run": factors_run,
    }
