"""The ingest stage: the catalogue's audio -> the ``mels`` table (+ ``ingest_rejects``).

Incremental: a source whose (uri, size, version) matches the committed ``mels`` row,
or an unchanged file already rejected for a lasting reason, is skipped.  New and
changed files are decoded on the executors (:func:`decode_partition`, one
``mapInPandas`` pass).  ``mels`` is updated by one Delta ``MERGE`` on ``track_id``
(decoded rows upserted, superseded ones deleted), ``ingest_rejects`` by one overwrite.
A manifest's optional ``artist`` / ``album`` columns go to ``track_metadata`` (rewritten
whole when they changed, so an edit needs no re-decode; the metadata prior of cold tracks
reads it; an unchanged manifest makes no commit: two ``exceptAll`` shuffles of ~50-byte rows
tell, ~0.5 GB at 10^7 tracks).

Cost: the driver streams the listing to Parquet in bounded chunks and holds only
counts; executors decode one file at a time.  At 10^6 tracks (30 s excerpts, ~330 kB
each) ``mels`` is ~330 GB and a full ingest ~10^6 / (350 x real time / 30 s) ≈ 24
core-hours of decode; at 10^7, ~3.3 TB and ~240 core-hours.  A nightly incremental run
decodes only new/changed files; its MERGE rewrites only the data files holding changed
keys (Delta prunes by the file statistics of ``track_id``).
"""
from __future__ import annotations

import logging
import os
import posixpath
import time
from typing import Iterator

import pandas as pd
import pyarrow as pa

from deepcuts.audio import decode as audio
from deepcuts.audio import catalogue
from deepcuts.audio.decode import MelParams, RejectedAudio
from deepcuts.core.config import Config, ConfigError
from deepcuts.core.errors import InputMissing
from deepcuts.core.faults import OFF, inject, switches
from deepcuts.core.lake import Lake
from deepcuts.core.spark import python_worker_setup, same_rows
from deepcuts.core.storage import delete_tree, filesystem_for
from deepcuts.core.tables import INGEST_REJECTS, MELS, TRACK_METADATA

log = logging.getLogger(__name__)

# Re-decoded every run even when the file is unchanged: the cause may have been passing.
TRANSIENT_REASONS = (audio.READ_ERROR, audio.INTERNAL_ERROR, audio.SOURCE_MISSING)
# Recomputed from the listing every run.
LISTING_REASONS = (audio.SOURCE_MISSING, catalogue.BAD_MANIFEST_ROW, catalogue.DUPLICATE_TRACK_ID)

DECODED_SCHEMA = pa.schema([f.with_nullable(True) for f in MELS.schema]
                           + [pa.field("reason", pa.string()), pa.field("detail", pa.string())])


# --- executor side (pure: pandas in, pandas out) -------------------------------------------
_S3 = None


def _s3():
    global _S3
    if _S3 is None:
        _S3 = catalogue.s3_client()
    return _S3


def featurise_row(track_id: str, uri: str, labels, size, version, p: MelParams, run_id: str) -> dict:
    """One listing row -> one ``mels`` row, or a row with ``reason``/``detail`` set.

    The file is read confined to ``p.allowed_roots`` and ``p.max_file_bytes`` (outside_root,
    not_a_file, too_large are decided before a byte is read); a truncated file that is still
    ingested carries ``truncated_at_s`` and ``warnings``."""
    row = {"track_id": track_id, "source_uri": uri, "labels": labels, "ingest_run_id": run_id,
           "source_size": None if pd.isna(size) else int(size), "source_version": version,
           "reason": None, "detail": None}
    try:
        if row["source_size"] is not None and p.max_file_bytes and row["source_size"] > p.max_file_bytes:
            raise RejectedAudio(audio.TOO_LARGE, f"{row['source_size']} bytes > ingest.max_file_bytes = "
                                f"{p.max_file_bytes}")
        with catalogue.open_source(uri, _s3() if uri.startswith("s3://") else None,
                                   roots=p.allowed_roots, max_bytes=p.max_file_bytes) as (data, fd):
            row["source_size"] = len(data)
            feats = audio.featurise(data, p, audio.suffix_of(uri), fd=fd)
    except RejectedAudio as rej:
        row.update(reason=rej.reason, detail=rej.detail)
        return row
    except FileNotFoundError:
        row.update(reason=audio.SOURCE_MISSING, detail="listed but gone when read")
        return row
    except OSError as exc:
        row.update(reason=audio.READ_ERROR, detail=f"{type(exc).__name__}: {exc}")
        return row
    except Exception as exc:  # one bad file must never kill the job: record it and go on
        row.update(reason=audio.INTERNAL_ERROR, detail=f"{type(exc).__name__}: {exc}"[:500])
        return row
    row.update(mel=audio.mel_to_bytes(feats.mel), n_mels=feats.mel.shape[0], n_frames=feats.mel.shape[1],
               sample_rate=p.sample_rate, hop_length=p.hop_length,
               excerpt_offset_s=feats.excerpt_offset_s, duration_s=feats.duration_s,
               fingerprint=audio.fingerprint(data), truncated_at_s=feats.truncated_at_s, warnings=feats.warning)
    return row


def decode_partition(batches: Iterator[pd.DataFrame], p: MelParams, run_id: str,
                     cpu_seconds=None, excerpt_seconds=None, faults=OFF) -> Iterator[pd.DataFrame]:
    """mapInPandas body: listing rows in, decoded (or rejected) rows out, batch by batch.

    ``cpu_seconds``/``excerpt_seconds`` (Spark accumulators) let the job report its
    decode speed as a real-time factor per core.  ``faults``: ``cfg.faults``'s switches, tests only."""
    python_worker_setup()
    columns = DECODED_SCHEMA.names
    with _one_blas_thread():
        for batch in batches:
            started = time.process_time()
            rows = [featurise_row(r.track_id, r.uri, r.labels, r.source_size, r.source_version, p, run_id)
                    for r in batch.itertuples(index=False)]
            if cpu_seconds is not None:
                cpu_seconds.add(time.process_time() - started)
                excerpt_seconds.add(sum(r["n_frames"] * p.hop_length / p.sample_rate for r in rows
                                        if r["reason"] is None))
            yield pd.DataFrame(rows, columns=columns)
    # Tests only: fail after every row was handed on, so a failed attempt's rows must not count.
    inject("ingest.decode", faults)


def _one_blas_thread():
    """A task has one core: BLAS threads (the mixdown and mel matmuls) would only spin against
    the other tasks' workers."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                  # optional (it comes with scikit-learn, librosa's dependency)
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def stat_partition(batches: Iterator[pd.DataFrame], base_dir: str | None = None,
                   roots: tuple[str, ...] = ()) -> Iterator[pd.DataFrame]:
    """Resolve manifest URIs against ``base_dir`` (the manifest's folder, made absolute on the
    driver) and fill in (size, version) where the listing could not.  A URI outside ``roots``
    is not stat'ed (decode rejects it as outside_root)."""
    for batch in batches:
        uris = batch["uri"] if base_dir is None else [catalogue.resolve_uri(u, base_dir) for u in batch["uri"]]
        sizes, versions = [], []
        for uri, size, version in zip(uris, batch["source_size"], batch["source_version"]):
            if not pd.isna(size) and version is not None:
                sizes.append(int(size))
                versions.append(version)
                continue
            try:
                s, v = catalogue.stat_source(uri, _s3() if uri.startswith("s3://") else None, roots)
            except Exception:  # gone, unreadable or outside: decode reports why, with the row kept
                s, v = None, None
            sizes.append(s)
            versions.append(v)
        yield batch.assign(uri=list(uris), source_size=pd.array(sizes, dtype="Int64"), source_version=versions)


# --- driver side (Spark wiring) -----------------------------------------------------------
def _read_manifest(spark, path: str):
    """Manifest rows (track_id, uri as written, labels), its bad rows as rejects, and its
    metadata (track_id, artist, album: the optional columns, rows naming either).  URIs are
    resolved by :func:`stat_partition` against the folder :func:`list_catalogue` passes."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window
    if path.lower().endswith(".csv"):
        raw = spark.read.option("header", True).option("inferSchema", False).csv(path)
    else:
        raw = spark.read.parquet(path)
    missing = {"track_id", "uri"} - set(raw.columns)
    if missing:
        raise ConfigError(f"manifest {path} lacks column(s) {sorted(missing)}; "
                          "needs track_id, uri[, labels, artist, album]")

    def optional(name):   # blank = absent
        if name not in raw.columns:
            return F.lit(None).cast("string").alias(name)
        return F.nullif(F.trim(F.col(name).cast("string")), F.lit("")).alias(name)
    labels = F.col("labels").cast("string") if "labels" in raw.columns else F.lit(None).cast("string")
    rows = raw.select(F.trim(F.col("track_id").cast("string")).alias("track_id"),
                      F.trim(F.col("uri").cast("string")).alias("uri"), labels.alias("labels"),
                      optional("artist"), optional("album"), F.monotonically_increasing_id().alias("_row"))
    bad = F.col("track_id").isNull() | (F.col("track_id") == "") | F.col("uri").isNull() | (F.col("uri") == "")
    bad_rows = rows.filter(bad).select(
        F.coalesce(F.nullif(F.col("track_id"), F.lit("")),
                   F.concat(F.lit("<manifest row "), F.col("_row").cast("string"), F.lit(">"))).alias("track_id"),
        F.col("uri").alias("source_uri"), F.lit(catalogue.BAD_MANIFEST_ROW).alias("reason"),
        F.lit("manifest row without track_id or uri").alias("detail"))
    good = rows.filter(~bad)
    ranked = good.withColumn("_rank", F.row_number().over(Window.partitionBy("track_id").orderBy("_row")))
    dupes = ranked.filter(F.col("_rank") > 1).select(
        "track_id", F.col("uri").alias("source_uri"), F.lit(catalogue.DUPLICATE_TRACK_ID).alias("reason"),
        F.lit("track_id listed more than once in the manifest; its first row is ingested").alias("detail"))
    first = ranked.filter(F.col("_rank") == 1)
    listing = first.select(
        "track_id", "uri", "labels", F.lit(None).cast("long").alias("source_size"),
        F.lit(None).cast("string").alias("source_version"))
    metadata = first.where(F.col("artist").isNotNull() | F.col("album").isNotNull()) \
        .select("track_id", "artist", "album")
    return listing, bad_rows.unionByName(dupes), metadata


def list_catalogue(spark, cfg: Config, lk: Lake, run_id: str):
    """(listing, catalogue-level rejects, metadata (track_id, artist, album)) DataFrames for
    ``ingest.source``; only a manifest carries metadata."""
    from pyspark.sql.types import StructType
    from pyspark.sql.pandas.types import from_arrow_schema
    source = cfg.ingest.source
    kind = catalogue.source_kind(source)
    reject_schema = "track_id string, source_uri string, reason string, detail string"
    no_metadata = spark.createDataFrame([], "track_id string, artist string, album string")
    if kind == "manifest":
        if source.startswith("s3://"):
            raise ConfigError("ingest.source: a manifest on S3 is not supported; list the s3:// prefix instead")
        listing, rejects, metadata = _read_manifest(spark, source)
        listing_schema: StructType = from_arrow_schema(catalogue.LISTING_SCHEMA)
        # Relative URIs are relative to the manifest: its folder, absolute here on the driver
        # (an executor's working directory is not the operator's).
        base_dir = os.path.dirname(os.path.abspath(source))
        roots = catalogue.effective_roots(source, cfg.ingest.allowed_roots)
        listing = listing.mapInPandas(lambda it: stat_partition(it, base_dir, roots), listing_schema)
        return listing, rejects, metadata
    entries = (catalogue.list_s3(source, cfg.ingest.extensions) if kind == "s3"
               else catalogue.list_folder(source, cfg.ingest.extensions))
    fs, staging = filesystem_for(lk.path("_staging", run_id))
    fs.create_dir(staging, recursive=True)
    n = catalogue.write_listing(entries, posixpath.join(staging, "listing.parquet"), filesystem=fs)
    log.info("listed %d audio files under %s", n, source)
    listing = spark.read.parquet(lk.spark_uri("_staging", run_id, "listing.parquet"))
    return listing, spark.createDataFrame([], reject_schema), no_metadata


def mel_bytes_estimate(cfg: Config) -> int:
    """Stored size of one mel excerpt (float16), for sizing Parquet row groups."""
    ing = cfg.ingest
    seconds = ing.whole_max_seconds if ing.excerpt == "whole" else ing.excerpt_seconds
    return ing.n_mels * (int(seconds * ing.sample_rate / ing.hop_length) + 1) * 2


def run(ctx) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    spark, cfg, run_id = ctx.spark, ctx.cfg, ctx.run_id
    params = MelParams.from_conf(cfg.ingest)
    listing, catalogue_rejects, metadata = list_catalogue(spark, cfg, ctx.lake, run_id)
    listing = listing.persist(StorageLevel.MEMORY_AND_DISK)

    prev = ctx.read(MELS).select(
        "track_id", F.col("source_uri").alias("prev_uri"), F.col("source_size").alias("prev_size"),
        F.col("source_version").alias("prev_version"))
    prev_rejects = ctx.read(INGEST_REJECTS)
    lasting_rejects = prev_rejects.filter(~F.col("reason").isin(*TRANSIENT_REASONS)).select(
        "track_id", F.col("source_uri").alias("rej_uri"), F.col("source_size").alias("rej_size"),
        F.col("source_version").alias("rej_version"))

    same = lambda a, b, c: ((F.col("uri") == F.col(a)) & (F.col("source_size") == F.col(b))  # noqa: E731
                            & (F.col("source_version") == F.col(c)))
    # One row per track listed now or ingested before: its fate this run.
    plan = (listing.join(prev, "track_id", "full_outer").join(lasting_rejects, "track_id", "left")
            .withColumn("status", F.when(F.col("uri").isNull(), "missing")
                        .when(same("prev_uri", "prev_size", "prev_version"), "unchanged")
                        .when(same("rej_uri", "rej_size", "rej_version"), "rejected_unchanged")
                        .when(F.col("prev_uri").isNotNull(), "changed")
                        .otherwise("new"))
            .persist(StorageLevel.MEMORY_AND_DISK))
    status_counts = {r["status"]: r["count"] for r in plan.groupBy("status").count().collect()}
    todo = plan.filter(F.col("status").isin("new", "changed")).select(*catalogue.LISTING_SCHEMA.names)
    n_todo = status_counts.get("new", 0) + status_counts.get("changed", 0)
    missing = plan.filter(F.col("status") == "missing")
    n_missing = status_counts.pop("missing", 0)
    if not sum(status_counts.values()) and not catalogue_rejects.take(1):
        plan.unpersist()
        listing.unpersist()
        raise InputMissing(f"ingest.source {cfg.ingest.source} lists no audio files "
                           f"({cfg.ingest.extensions}); nothing was published")

    partitions = cfg.ingest.partitions or 4 * spark.sparkContext.defaultParallelism
    cpu_acc, audio_acc = spark.sparkContext.accumulator(0.0), spark.sparkContext.accumulator(0.0)
    faults = switches(cfg.faults)
    decoded = (todo.repartition(max(1, min(partitions, n_todo)), "track_id")
               .mapInPandas(lambda it: decode_partition(it, params, run_id, cpu_acc, audio_acc, faults),
                            from_arrow_schema(DECODED_SCHEMA))
               .persist(StorageLevel.DISK_ONLY))   # decode once; both tables read it
    reason_counts = {r["reason"]: r["count"] for r in decoded.groupBy("reason").count().collect()}
    n_warned = decoded.filter(F.col("reason").isNull() & F.col("warnings").isNotNull()).count()
    n_ok = reason_counts.pop(None, 0)

    # Mels: one MERGE on track_id.  Decoded rows replace or add theirs; superseded rows
    # (changed sources that no longer decode; vanished ones when on_missing=drop) are deleted.
    superseded = plan.filter(F.col("status") == "changed").select("track_id")
    if cfg.ingest.on_missing == "drop":
        superseded = superseded.unionByName(missing.select("track_id"))
    n_superseded = superseded.count()
    mels_summary = "unchanged"
    if n_ok or n_superseded:
        ok_rows = decoded.filter(F.col("reason").isNull()).drop("reason", "detail")
        committed = ctx.merge(MELS, ok_rows, deletes=superseded,
                              rows_per_file=cfg.ingest.rows_per_file, row_group_rows=cfg.ingest.rows_per_row_group,
                              row_bytes=mel_bytes_estimate(cfg))
        mels_summary = str(committed)

    # Rejects: the current problems, one row per track (replaced whole each run: small).
    run_lit = F.lit(run_id)
    carried = (prev_rejects.filter(~F.col("reason").isin(*LISTING_REASONS))
               .join(todo.select("track_id"), "track_id", "left_anti")
               .join(listing.select("track_id"), "track_id", "left_semi"))
    new_rejects = decoded.filter(F.col("reason").isNotNull()).select(
        "track_id", "source_uri", "source_size", "source_version", "reason", "detail", run_lit.alias("run_id"))
    missing_rows = missing.select(
        "track_id", F.col("prev_uri").alias("source_uri"), F.col("prev_size").alias("source_size"),
        F.col("prev_version").alias("source_version"), F.lit(audio.SOURCE_MISSING).alias("reason"),
        F.lit(f"source no longer in the catalogue; its mel was {'dropped' if cfg.ingest.on_missing == 'drop' else 'kept'}"
              ).alias("detail"), run_lit.alias("run_id"))
    listing_rejects = catalogue_rejects.select(
        "track_id", "source_uri", F.lit(None).cast("long").alias("source_size"),
        F.lit(None).cast("string").alias("source_version"), "reason", "detail", run_lit.alias("run_id"))
    n_catalogue_rejects = {r["reason"]: r["count"] for r in catalogue_rejects.groupBy("reason").count().collect()}
    all_rejects = carried.unionByName(new_rejects).unionByName(missing_rows).unionByName(listing_rejects)
    # One file; repartition, not coalesce, which would read all of the cached decode output
    # (mel bytes included) in a single task to find its rejects.
    rej_committed = ctx.write(all_rejects.repartition(1), INGEST_REJECTS)
    # Metadata: what the manifest says now, whole (an edited artist needs no re-decode); no
    # commit when it is what the table holds, so an unchanged night leaves infer skippable.
    # Persisted: compared, maybe written and counted, it would re-read and re-rank the manifest each time.
    metadata = metadata.persist(StorageLevel.MEMORY_AND_DISK)
    meta_committed = "unchanged"
    if not ctx.exists(TRACK_METADATA) or not same_rows(metadata, ctx.read(TRACK_METADATA).drop("run_id")):
        meta_committed = ctx.write(metadata.withColumn("run_id", run_lit), TRACK_METADATA)
    meta_counts = metadata.agg(F.count("artist").alias("artist"), F.count("album").alias("album"),
                               F.countDistinct("artist").alias("artists"),
                               F.countDistinct("album").alias("albums")).first().asDict()

    decoded.unpersist()
    plan.unpersist()
    listing.unpersist()
    metadata.unpersist()
    delete_tree(ctx.path("_staging", run_id))
    rejected = dict(sorted({**reason_counts, **n_catalogue_rejects}.items()))
    return {
        "listed": sum(status_counts.values()),
        "new": status_counts.get("new", 0),
        "changed": status_counts.get("changed", 0),
        "skipped_unchanged": status_counts.get("unchanged", 0),
        "skipped_rejected_unchanged": status_counts.get("rejected_unchanged", 0),
        "ingested": n_ok,
        "ingested_with_warnings": n_warned,
        "rejected": rejected,
        "missing_sources": n_missing,
        "decode_cpu_s": round(cpu_acc.value, 2),
        "decoded_audio_s": round(audio_acc.value, 1),
        "realtime_x_per_core": round(audio_acc.value / cpu_acc.value, 1) if cpu_acc.value else None,
        "mels": mels_summary,
        "ingest_rejects": str(rej_committed),
        "track_metadata": {"table": str(meta_committed), "with_artist": meta_counts["artist"],
                           "with_album": meta_counts["album"], "artists": meta_counts["artists"],
                           "albums": meta_counts["albums"]},
    }

