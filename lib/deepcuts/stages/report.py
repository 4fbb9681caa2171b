"""The report stage (the nightly run's last): one static HTML page a person opens after the run.

Output: ``<warehouse>/reports/<id>/index.html`` (``id`` = the pipeline run, or this stage run
when run alone) with its audio excerpts in ``audio/`` beside it, and ``reports/LATEST`` naming
it (:mod:`deepcuts.report.publish`: built whole, then published; the newest ``report.keep``
are kept).  No table is written.  The page (:mod:`deepcuts.report.html`) shows

* the evaluation table (``evaluation_results``): each split's latest run, every predictor's
  mAP@k and AUC with the previous run's numbers beside them;
* the training curves of this run's model (``train_metrics``) and the promotion decision (the
  train stage's manifest row in ``runs`` and ``models/LATEST``);
* a 2-D t-SNE map of a hash sample of ``report.map_tracks`` serving vectors, coloured by label
  (``mels.labels``) where tracks have labels, else by source; filled = usage, hollow = audio;
* ``report.playlists`` query tracks (half served from audio where there are such) with their
  ``report.playlist_length`` nearest neighbours from ``similar_tracks``, each with a
  ``report.excerpt_seconds`` excerpt decoded from its source (``mels.source_uri``, confined like
  ingest) by :mod:`deepcuts.audio.decode` and encoded with libsndfile; a track whose audio is
  gone says so instead of playing;
* in content-only mode (a labels model, no plays) the map shows ``audio_embeddings`` and the
  playlists come from ``sounds_like``;
* operations: counts, rejects by reason (every ``*_rejects`` table), each stage's duration,
  status and the table versions it wrote (``runs``), the versions this report read.

Cost.  Everything the driver holds is bounded by the settings, not the catalogue: the map
sample (``map_tracks`` x rank floats) and its t-SNE (~10-30 s for 2,000 points on 2 cores), a
few dozen similar-track rows and decoded excerpts, one row per stage and reject reason.
* 1e6 tracks: one scan of serving_factors for the hash sample (top-N by hash: each task keeps
  N rows) and one for the per-source counts (~0.3 GB at rank 64), key lookups in mels
  (track_id/labels/source_uri columns only: the mel bytes are never read) and similar_tracks
  (data skipping on the Z-ordered track_id), group-bys of the reject tables: well under a
  minute on 16 cores.
* 1e7 tracks: the same scans at 10x (~3 GB of serving vectors), still seconds per core; the
  driver's share is unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from datetime import datetime, timezone

from deepcuts.core.runs import Laps, code_version
from deepcuts.core.tables import (AUDIO_EMBEDDINGS, BASELINE_REJECTS, EVALUATION_RESULTS, INFER_REJECTS, INGEST_REJECTS, MELS,
                                  NEIGHBOUR_REJECTS, PLAYS_REJECTS, RUNS, SERVING_FACTORS, SIMILAR_TRACKS, SOUNDS_LIKE,
                                  TRAIN_METRICS, TRAIN_REJECTS)
from deepcuts.core.tables import COLD_SOURCES
from deepcuts.report import model as M
from deepcuts.report.charts import scatter_map
from deepcuts.report.html import render
from deepcuts.report.publish import publish, retain

log = logging.getLogger(__name__)

REJECT_TABLES = (INGEST_REJECTS, PLAYS_REJECTS, TRAIN_REJECTS, BASELINE_REJECTS, INFER_REJECTS, NEIGHBOUR_REJECTS)
AUDIO_DIR = "audio"


def _iso(ts) -> str | None:
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ts is not None else None


class Frames:
    """Each declared table read once, at its pinned version (a Delta snapshot costs Spark jobs:
    the stage asks for some tables several times); None where the table was never written.
    ``small``: a table bounded by the number of runs (runs, evaluation_results, train_metrics:
    a few dozen rows a night) as Python rows through delta-rs, without a Spark job."""

    def __init__(self, ctx):
        self.ctx, self.frames = ctx, {}

    def __call__(self, table):
        if table.name not in self.frames:
            self.frames[table.name] = self.ctx.read(table) if self.ctx.exists(table) else None
        return self.frames[table.name]

    def small(self, table) -> list[dict]:
        from deepcuts.core.lake import read_arrow
        if not self.ctx.exists(table):
            return []
        self.ctx.files(table)           # checks the declaration and records the version read
        rows = read_arrow(self.ctx.lake, table.name, self.ctx.pinned_version(table)).to_pylist()
        for r in rows:                  # Arrow maps arrive as (key, value) pairs
            for k, v in r.items():
                if isinstance(v, list) and v and isinstance(v[0], tuple):
                    r[k] = dict(v)
        return rows


# --- runs: the stages of this run ------------------------------------------------------------
def stage_line(row: dict) -> M.StageLine:
    rows = dict(row.get("rows_written") or {})
    written = {t: (int(v), rows.get(t)) for t, v in dict(row.get("tables_written") or {}).items() if v is not None}
    return M.StageLine(row["stage"], row["run_id"], row["status"], row.get("duration_s"), _iso(row.get("ended_at")),
                       written, {k: int(v) for k, v in dict(row.get("rejects") or {}).items()}, row.get("error"))


# --- training ------------------------------------------------------------------------------------
def training_input(ctx, read, runs: list[dict]) -> tuple[M.Promotion, str | None, list[dict], int | None]:
    """(promotion decision, model id of the curves, its train_metrics rows, best epoch)."""
    from deepcuts.nn.model import latest_model_id
    served = latest_model_id(ctx.lake)
    train_row = next((r for r in reversed(runs) if r["stage"] == "train"), None)
    promotion = M.promotion_decision(train_row, train_row is not None, served)
    best = None
    if train_row is not None and train_row.get("summary_json"):
        best = json.loads(train_row["summary_json"]).get("best_epoch")
    model_id, rows = M.model_epochs(read.small(TRAIN_METRICS), promotion.model_id or served)
    return promotion, model_id, rows, best


# --- the map ---------------------------------------------------------------------------------------
def map_sample(read, n: int, seed: int) -> tuple[list[dict], str]:
    """(a hash sample of ``n`` vectors with their labels, what they are): serving_factors, or a
    labels model's audio_embeddings where there is no serving table (content-only mode).  Top-n
    by hash: each task keeps n rows, the driver n."""
    from pyspark.sql import functions as F
    if read(SERVING_FACTORS) is not None:
        vectors, what = read(SERVING_FACTORS).select("track_id", "factors", "source"), "serving vectors"
    elif read(AUDIO_EMBEDDINGS) is not None:
        vectors = read(AUDIO_EMBEDDINGS).select("track_id", F.col("embedding").alias("factors"),
                                                F.lit("audio").alias("source"))
        what = "audio embeddings (labels model)"
    else:
        return [], ""
    if n == 0:
        return [], what
    sample = vectors.withColumn("_h", F.xxhash64("track_id", F.lit(seed))).orderBy("_h").limit(n).drop("_h").collect()
    labels = lookup(read, [r["track_id"] for r in sample], ("labels",))
    return [{"track_id": r["track_id"], "factors": r["factors"], "source": r["source"],
             "labels": labels.get(r["track_id"], {}).get("labels")} for r in sample], what


def lookup(read, ids: list[str], columns: tuple[str, ...]) -> dict[str, dict]:
    """mels columns of a few tracks by key (the mel bytes are never read)."""
    from pyspark.sql import functions as F
    if not ids or read(MELS) is None:
        return {}
    rows = read(MELS).select("track_id", *columns).filter(F.col("track_id").isin(list(set(ids)))).collect()
    return {r["track_id"]: r.asDict() for r in rows}


def map_svg(points: list[dict], rc, separator: str, what: str = "serving vectors") -> tuple[str, str]:
    import numpy as np
    if not points:
        return "", ""
    xy, method = M.embed_2d(np.array([p["factors"] for p in points], dtype=np.float32), rc.seed, rc.perplexity)
    groups, by = M.map_groups([p["labels"] for p in points], [p["source"] for p in points], separator)
    titles = [f"{p['track_id']} · {p['labels'] or 'no label'} · {p['source']}" for p in points]
    # Filled: vectors learnt from usage (ALS, or blended with the audio prior); hollow: audio only.
    filled_label = " / ".join(sorted({str(p["source"]) for p in points if p["source"] != "audio"})) or "usage"
    svg = scatter_map([tuple(map(float, v)) for v in xy], groups, [p["source"] != "audio" for p in points], titles,
                      title=f"{what}, {method}, coloured by {by}", filled_label=filled_label)
    note = (f"{len(points):,} tracks (a hash sample of at most report.map_tracks = {rc.map_tracks:,}); "
            f"filled dots: {filled_label} vectors, hollow: predicted from audio. Hover a dot for its track.")
    return svg, note


# --- playlists ---------------------------------------------------------------------------------------
def playlist_input(read, n: int, length: int, seed: int) -> tuple[list[tuple[str, str, list[dict]]], str]:
    """((query id, its source, its neighbour rows by rank) for ``n`` hash-chosen queries, half of
    them served from audio where the catalogue has such tracks; the table they came from):
    similar_tracks, or sounds_like where there is none (content-only mode)."""
    from pyspark.sql import functions as F
    table = SIMILAR_TRACKS if read(SIMILAR_TRACKS) is not None else SOUNDS_LIKE
    if n == 0 or read(table) is None:
        return [], table.name
    similar = read(table)
    firsts = similar.filter(F.col("rank") == 1).withColumn("_h", F.xxhash64("track_id", F.lit(seed)))
    # cold: tracks without usage (served from audio, or audio and their album's / artist's prior)
    pools = {pool: [(r["track_id"], r["track_source"]) for r in firsts.filter(F.col("track_source").isin(*sources))
                    .orderBy("_h").limit(n).select("track_id", "track_source").collect()]
             for pool, sources in (("cold", COLD_SOURCES), ("usage", ("usage",)))}
    cold_n = min(len(pools["cold"]), math.ceil(n / 2))
    chosen = pools["cold"][:cold_n]
    chosen += pools["usage"][:n - len(chosen)]
    chosen += pools["cold"][cold_n:cold_n + n - len(chosen)]
    if not chosen:
        return [], table.name
    rows = similar.filter(F.col("track_id").isin([t for t, _ in chosen]) & (F.col("rank") <= length)).collect()
    by_query: dict[str, list[dict]] = {}
    for r in rows:
        by_query.setdefault(r["track_id"], []).append(r.asDict())
    return [(t, src, sorted(by_query.get(t, []), key=lambda r: r["rank"])) for t, src in chosen], table.name


class Excerpts:
    """Decodes and encodes the playlists' excerpts (each track once), recording why one is missing."""

    def __init__(self, cfg):
        from deepcuts.audio.catalogue import effective_roots
        from deepcuts.audio.decode import MelParams
        rc = cfg.report
        base = MelParams.from_conf(cfg.ingest)
        # A listening excerpt from the middle; never rejected for length or truncation here.
        self.params = dataclasses.replace(base, excerpt="middle", excerpt_seconds=rc.excerpt_seconds,
                                          min_seconds=min(0.1, base.min_seconds), reject_truncated=False)
        self.roots = effective_roots(cfg.ingest.source, cfg.ingest.allowed_roots)
        self.fmt = rc.audio_format
        self.files: dict[str, bytes] = {}
        self.done: dict[str, tuple[str | None, str | None]] = {}     # track -> (href, note)
        self.missing: dict[str, int] = {}
        self._s3 = None

    def get(self, track_id: str, uri: str | None) -> tuple[str | None, str | None]:
        if track_id not in self.done:
            self.done[track_id] = self._make(track_id, uri)
            if self.done[track_id][0] is None:
                key = self.done[track_id][1].split(":")[0]
                self.missing[key] = self.missing.get(key, 0) + 1
        return self.done[track_id]

    def _make(self, track_id: str, uri: str | None) -> tuple[str | None, str | None]:
        from deepcuts.audio import catalogue
        from deepcuts.audio.decode import decode, suffix_of
        from deepcuts.audio.reasons import RejectedAudio
        if not uri:
            return None, "not_in_catalogue: the track has no row in mels"
        try:
            client = None
            if uri.startswith("s3://"):
                self._s3 = self._s3 or catalogue.s3_client()
                client = self._s3
            with catalogue.open_source(uri, client, roots=self.roots,
                                       max_bytes=self.params.max_file_bytes) as (data, fd):
                decoded = decode(data, self.params, suffix_of(uri), fd=fd)
        except FileNotFoundError:
            return None, "source_missing: the audio file is gone"
        except RejectedAudio as rej:
            return None, f"{rej.reason}: {rej.detail}"
        except Exception as exc:  # noqa: BLE001 - a report shows what it could not play, and goes on
            log.warning("report: no excerpt of %s (%s): %s", track_id, uri, exc)
            return None, f"read_error: {type(exc).__name__}"
        name = f"{AUDIO_DIR}/{M.audio_file_name(track_id, self.fmt)}"
        self.files[name] = M.encode_excerpt(decoded.signal, self.params.sample_rate, self.fmt)
        return name, None

    @property
    def mime(self) -> str:
        return M.AUDIO_FORMATS[self.fmt][2]


def playlists(read, chosen, excerpts: Excerpts) -> list[M.Playlist]:
    ids = [q for q, _, _ in chosen] + [r["neighbour_id"] for _, _, rows in chosen for r in rows]
    meta = lookup(read, ids, ("labels", "source_uri"))

    def card(track_id: str, source: str, score: float | None = None) -> M.TrackCard:
        m = meta.get(track_id, {})
        href, note = excerpts.get(track_id, m.get("source_uri"))
        return M.TrackCard(track_id, m.get("labels"), source, score, href, excerpts.mime if href else None, note)

    return [M.Playlist(card(q, src), [card(r["neighbour_id"], r["neighbour_source"], float(r["score"]))
                                      for r in rows]) for q, src, rows in chosen]


# --- operations ----------------------------------------------------------------------------------------
def reject_counts(read) -> dict[str, dict[str, int]]:
    """table -> reason -> rows, over every reject table that exists (one Spark job)."""
    from functools import reduce
    from pyspark.sql import functions as F
    parts = [read(t).select(F.lit(t.name).alias("table"), "reason") for t in REJECT_TABLES if read(t) is not None]
    if not parts:
        return {}
    rows = reduce(lambda a, b: a.unionByName(b), parts).groupBy("table", "reason").count().collect()
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["table"], {})[r["reason"]] = int(r["count"])
    return {t.name: out[t.name] for t in REJECT_TABLES if t.name in out}


def serving_counts(read) -> dict[str, int]:
    if read(SERVING_FACTORS) is None:
        return {}
    return {r["source"]: int(r["count"]) for r in read(SERVING_FACTORS).groupBy("source").count().collect()}


# --- the stage -----------------------------------------------------------------------------------------
def run(ctx) -> dict:
    cfg, rc = ctx.cfg, ctx.cfg.report
    laps = Laps()
    report_id = ctx.pipeline_run_id or ctx.run_id
    data = M.ReportData(report_id, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                        ctx.pipeline_run_id, code_version(), ctx.lake.root)

    read = Frames(ctx)
    runs = M.stage_runs(read.small(RUNS), ctx.stage.name, ctx.pipeline_run_id)
    data.stages = [stage_line(r) for r in runs]
    if not ctx.pipeline_run_id:
        data.notes.append("Run outside a pipeline: each stage's latest run is shown.")
    failed = [s.stage for s in data.stages if s.status != "succeeded"]
    if failed:
        data.notes.append(f"Stages not succeeded: {', '.join(failed)}.")
    data.gates_failed = M.run_gates(runs, cfg.nightly.max_reject_rate,
                                    nightly=(ctx.pipeline_run_id or "").startswith("nightly-"))
    if data.gates_failed:
        data.notes.append(f"Quality gates failed: {len(data.gates_failed)} (see Operations).")
    data.evaluation = M.evaluation_rows(read.small(EVALUATION_RESULTS))
    data.promotion, data.model_id, data.epochs, data.best_epoch = training_input(ctx, read, runs)
    laps("tables")

    points, what = map_sample(read, rc.map_tracks, rc.seed)
    laps("map_sample")
    data.map_svg, data.map_note = map_svg(points, rc, cfg.train.label_separator, what)
    laps("map_tsne")

    excerpts = Excerpts(cfg)
    chosen, data.playlists_table = playlist_input(read, rc.playlists, rc.playlist_length, rc.seed)
    data.playlists = playlists(read, chosen, excerpts)
    laps("playlists")

    serving = serving_counts(read)
    data.rejects = reject_counts(read)
    mels_version = ctx.pinned_version(MELS)     # from the Delta log: no Spark job
    data.counts = {"catalogue tracks (mels)": ctx.lake.file_stats(MELS.name, mels_version)[0]
                   if mels_version is not None else 0,
                   **{f"serving vectors: {k}": v for k, v in sorted(serving.items())},
                   "tracks on the map": len(points),
                   "excerpts encoded": len(excerpts.files),
                   "excerpts unavailable": sum(excerpts.missing.values())}
    data.tables_read = dict(ctx.read_versions)
    laps("operations")

    files = {"index.html": render(data).encode(), **excerpts.files}
    path = publish(ctx.lake.root, report_id, files)
    removed = retain(ctx.lake.root, rc.keep)
    laps("publish")
    return {
        "report": path, "report_id": report_id,
        "evaluation_rows": len(data.evaluation),
        "promotion": data.promotion.status if data.promotion else None,
        "gates_failed": len(data.gates_failed),
        "map_tracks": len(points), "playlists": len(data.playlists),
        "excerpts": len(excerpts.files), "excerpts_unavailable": dict(excerpts.missing),
        "bytes": sum(len(b) for b in files.values()), "reports_removed": len(removed),
        "seconds": laps.seconds,
    }
