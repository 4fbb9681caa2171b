"""Content-only mode (issue 18): what the stages do with a labels model and without plays.

A catalogue with labels (a manifest's ``labels`` column) and no play counts trains a label
classifier (``train.target = "labels"``); its penultimate layer is a track embedding, and
that is what this mode serves.  The stages call in here:

* ``infer`` with a labels model -> :func:`infer_labels`: every scorable mel gets its
  embedding (unit-normalised: cosine = inner product) in ``audio_embeddings`` and its
  ``infer.top_labels`` most probable labels in ``predicted_labels``.  ``serving_factors`` is
  never touched: it lives in the ALS space, and a label embedding is not in it.
* ``neighbours`` -> :func:`sounds_like_source`: ``sounds_like`` over predicted factors, or
  over the embeddings when there are none (``neighbours.content``), with the same sharded
  search; ``similar_tracks`` and ``user_recommendations`` need ``serving_factors`` /
  ``user_factors`` and are skipped with a reason when those are empty.
* ``evaluate`` -> :func:`label_metrics`: label precision@k of the embeddings' neighbours
  (per label and over all labels) and top-k label accuracy on the model's validation tracks,
  each beside what chance scores (``deepcuts.evaluation.labels``), as rows of
  ``evaluation_results``.
* ``factors`` and ``baseline`` -> :func:`plays_unset`: without plays they have nothing to
  fit and report ``skipped`` (the manifest records status ``skipped``); ``train`` with
  target ``factors`` and no plays is a configuration error.

Cost (the label head adds dim x n_labels multiply-adds per track to infer's forward pass:
nothing beside the convolutions; ``infer``'s executors, ~150 tracks/s per core):
* 1e6 tracks: infer as for factors (~2 core-hours); the tables hold 1e6 x dense_units
  float32 (8 GB at the default 2048 units: a labels model served at scale wants smaller
  dense layers).  Evaluate: at most ``evaluate.label_max_queries`` (2e4) validation queries
  searched exactly against 1e6 embeddings: 2e4 x 1e6 x 2048 = 4e13 multiply-adds, ~30 core-
  minutes; the driver holds one row per label.
* 1e7 tracks: 10x infer; evaluate 10x (the queries stay capped); ``sounds_like`` over 2048-d
  vectors is 32x the 64-d figures of ``stages.neighbours``: use ``neighbours.index = "hnsw"``.
"""
from __future__ import annotations

import logging
import posixpath

import numpy as np
import pandas as pd
import pyarrow as pa

from deepcuts.core.config import ConfigError
from deepcuts.core.tables import (AUDIO_EMBEDDINGS, INFER_REJECTS, MELS, PREDICTED_FACTORS, PREDICTED_LABELS,
                                  SOURCE_AUDIO, VALIDATION_EXAMPLES)
from deepcuts.evaluation import labels as L
from deepcuts.nn.labels import head_parameters, label_probabilities, top_labels, unit_rows

log = logging.getLogger(__name__)

EMBEDDINGS_PREDICTOR = "embeddings"    # evaluation_results.predictor of the neighbours' precision
LABELS_PREDICTOR = "labels"            # ... of the label head's top-k accuracy


# --- no plays ---------------------------------------------------------------------------------
def plays_unset(cfg) -> str | None:
    """Why a stage that needs play counts has none (None: plays are configured)."""
    if not str(cfg.factors.plays or "").strip():
        return "no plays configured (factors.plays unset): content-only mode"
    return None


def check_train_target(cfg) -> None:
    """Target ``factors`` regresses ALS factors, which need play counts."""
    if cfg.train.target == "factors" and plays_unset(cfg):
        raise ConfigError('train.target = "factors" needs play counts but factors.plays is unset; '
                          'set train.target = "labels" for the content-only mode')


def check_model_is_factors(meta: dict, path: str, hint: str = "") -> None:
    """A path that ranks in the ALS space was given a model of another target: a one-line
    configuration error naming the model and its target (exit 2)."""
    if meta.get("target") != "factors":
        raise ConfigError(f"model {meta.get('model_id')} has target {meta.get('target')!r}: {path} needs a "
                          f"model trained on target 'factors'{'; ' + hint if hint else ''}")


# --- infer: the label head in the executors ---------------------------------------------------
LABELLED_SCHEMA = pa.schema([
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("fingerprint", pa.string()),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("probabilities", pa.list_(pa.float32())),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
])


def label_rows(scored: pd.DataFrame, weight: np.ndarray, bias: np.ndarray, names, k: int) -> pd.DataFrame:
    """infer's scored rows (``factors`` = the penultimate layer, or a reason) -> LABELLED_SCHEMA
    rows: the unit embedding and the top ``k`` labels with their probabilities."""
    n = len(scored)
    embedding, labels, probs = [None] * n, [None] * n, [None] * n
    ok = np.flatnonzero(scored["reason"].isna().to_numpy())
    if len(ok):
        hidden = np.stack([np.asarray(v, dtype=np.float32) for v in scored["factors"].to_numpy()[ok]])
        top, top_p = top_labels(label_probabilities(hidden, weight, bias), names, k)
        unit = unit_rows(hidden)
        for j, i in enumerate(ok):
            embedding[i], labels[i], probs[i] = unit[j], top[j], top_p[j]
    return pd.DataFrame({"track_id": scored["track_id"].to_numpy(), "fingerprint": scored["fingerprint"].to_numpy(),
                         "embedding": embedding, "labels": labels, "probabilities": probs,
                         "model_id": scored["model_id"].to_numpy(), "reason": scored["reason"].to_numpy(),
                         "detail": scored["detail"].to_numpy()}, columns=LABELLED_SCHEMA.names)


def _label_head(weight: np.ndarray, bias: np.ndarray, names: list[str], k: int):
    def run(batches):
        for batch in batches:
            yield label_rows(batch, weight, bias, names, k)
    return run


def score_labels(spark, locations, artifact_dir: str, cfg):
    """The mels at ``locations`` scored with a labels model: infer's executor scoring for the
    embedding, then the label head (its weights travel in the closure: n_labels x dim floats)."""
    from pyspark.sql.pandas.types import from_arrow_schema
    from deepcuts.nn.model import ModelArtifactError, load_artifact
    from deepcuts.stages.infer import predict_vectors
    artifact = load_artifact(artifact_dir)
    weight, bias = head_parameters(artifact.model)
    names = [str(n) for n in (artifact.meta.get("label_names") or [])]
    if len(names) != weight.shape[0]:
        raise ModelArtifactError(f"model {artifact.model_id}: meta.json names {len(names)} labels, the label "
                                 f"head has {weight.shape[0]} outputs")
    hidden = predict_vectors(spark, locations, artifact_dir, cfg)
    return hidden.mapInPandas(_label_head(weight, bias, names, cfg.infer.top_labels),
                              from_arrow_schema(LABELLED_SCHEMA)), names


def infer_labels(ctx, model_id: str, artifact_dir: str, meta: dict) -> dict:
    """infer with a labels model: ``audio_embeddings`` + ``predicted_labels`` (+ ``infer_rejects``),
    full or incremental as for predicted factors; ``serving_factors`` is left as it is."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from deepcuts.stages.infer import mel_locations, scoring_summary
    spark, cfg, run_id = ctx.spark, ctx.cfg, ctx.run_id
    n_labels = len(meta.get("label_names") or [])
    kept = min(cfg.infer.top_labels, n_labels)
    locations = mel_locations(ctx).persist(StorageLevel.MEMORY_AND_DISK)
    current = locations.select("track_id", "fingerprint")
    full = not cfg.infer.incremental or not ctx.exists(AUDIO_EMBEDDINGS) or not ctx.exists(PREDICTED_LABELS)
    if full:
        to_score, gone = locations, None
    else:
        keys = ["track_id", "fingerprint"]
        embedded = ctx.read(AUDIO_EMBEDDINGS)
        labelled = ctx.read(PREDICTED_LABELS)
        valid = (embedded.where(F.col("model_id") == model_id).select(*keys)
                 .join(labelled.where((F.col("model_id") == model_id) & (F.size("labels") == kept)).select(*keys),
                       keys, "left_semi")
                 .join(current, keys, "left_semi"))
        to_score = locations.join(valid, keys, "left_anti")
        gone = (embedded.select("track_id").unionByName(labelled.select("track_id")).distinct()
                .join(current.select("track_id"), "track_id", "left_anti"))

    scored, _ = score_labels(spark, to_score, artifact_dir, cfg)
    scored = scored.withColumn("run_id", F.lit(run_id)).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {r["reason"]: r["n"] for r in scored.groupBy("reason").agg(F.count("*").alias("n")).collect()}
        n_scored = counts.pop(None, 0)
        good = scored.where(F.col("reason").isNull())
        emb_rows = good.select(*AUDIO_EMBEDDINGS.columns)
        lab_rows = good.select(*PREDICTED_LABELS.columns)
        if full:
            emb = ctx.write(emb_rows, AUDIO_EMBEDDINGS)
            lab = ctx.write(lab_rows, PREDICTED_LABELS)
        elif n_scored or gone.limit(1).count():
            emb = ctx.merge(AUDIO_EMBEDDINGS, emb_rows, deletes=gone)
            lab = ctx.merge(PREDICTED_LABELS, lab_rows, deletes=gone)
        else:
            emb = lab = None
        ctx.write(scored.where(F.col("reason").isNotNull()), INFER_REJECTS)
        n_mels = locations.count()
    finally:
        scored.unpersist()
        locations.unpersist()
    return {
        **scoring_summary(model_id, cfg, full, n_mels, n_scored, counts),
        "target": "labels",
        "wrote": f"{AUDIO_EMBEDDINGS.name} ({meta.get('out_dim')}-d, unit) and {PREDICTED_LABELS.name} "
                 f"(top {kept} of {n_labels} labels)",
        AUDIO_EMBEDDINGS.name: str(emb) if emb else "unchanged",
        PREDICTED_LABELS.name: str(lab) if lab else "unchanged",
        "serving_factors": f"not written: model {model_id} has target 'labels' (not in the ALS space)",
    }


# --- neighbours: which content vectors ------------------------------------------------------------
def latest_model_of(df) -> str | None:
    """The model id of the newest run in a table with ``model_id`` and ``run_id`` (one small
    aggregation: a row per model)."""
    from pyspark.sql import functions as F
    rows = df.groupBy("model_id").agg(F.max("run_id").alias("run")).collect()
    return max(rows, key=lambda r: (r["run"] or "", r["model_id"]))["model_id"] if rows else None


def sounds_like_source(ctx, choice: str, serving_model_id: str | None):
    """(vectors (id, vector, source), model id, table name) for ``sounds_like``.

    ``predicted_factors``: the serving model's rows (all rows when nothing is served from
    audio); ``audio_embeddings``: the newest labels model's rows; ``auto``: predicted factors
    where there are any, else the embeddings (content-only mode)."""
    from pyspark.sql import functions as F
    predicted = ctx.read(PREDICTED_FACTORS)
    if serving_model_id is not None:
        predicted = predicted.where(F.col("model_id") == serving_model_id)
    if choice == "predicted_factors" or (choice == "auto" and predicted.limit(1).count()):
        return (predicted.select(F.col("track_id").alias("id"), F.col("factors").alias("vector"),
                                 F.lit(SOURCE_AUDIO).alias("source")), serving_model_id, PREDICTED_FACTORS.name)
    embedded = ctx.read(AUDIO_EMBEDDINGS)
    model_id = latest_model_of(embedded)
    vectors = embedded.where(F.col("model_id") == model_id).select(
        F.col("track_id").alias("id"), F.col("embedding").alias("vector"), F.lit(SOURCE_AUDIO).alias("source"))
    return vectors, model_id, AUDIO_EMBEDDINGS.name


# --- evaluate: label metrics -----------------------------------------------------------------------
class LabelSkip(Exception):
    """Label metrics whose inputs are missing: reported, not an error."""


def label_list(column, separator: str):
    """A mels ``labels`` string -> its trimmed, non-empty labels (the training set's rule)."""
    import re
    from pyspark.sql import functions as F
    return F.filter(F.transform(F.split(column, re.escape(separator)), F.trim), lambda x: F.length(x) > 0)


def _validation_queries(ctx, meta: dict):
    """(track_id, truth: array of label names) of the model's validation tracks, hash-sampled
    to ``evaluate.label_max_queries``; and the sampled count."""
    from pyspark.sql import functions as F
    from deepcuts.evaluation.runner import hash_unit
    if not ctx.exists(VALIDATION_EXAMPLES):
        raise LabelSkip("no validation_examples: run the train stage first")
    val = ctx.read(VALIDATION_EXAMPLES)
    first = val.select("run_id").limit(1).collect()
    if not first:
        raise LabelSkip("validation_examples is empty (too few labelled tracks for a validation split)")
    built, trained = first[0]["run_id"], meta.get("training_set_run_id")
    if trained and built != trained:
        raise LabelSkip(f"validation_examples are training set {built}; model {meta.get('model_id')} was "
                        f"trained on {trained}: retrain, or evaluate the model that set belongs to")
    names = [str(n) for n in meta.get("label_names") or []]
    vocab = F.array(*[F.lit(n) for n in names])
    truth = F.filter(F.transform(F.sequence(F.lit(0), F.lit(len(names) - 1)),
                                 lambda i: F.when(F.element_at("target", i + 1) > 0.5, F.element_at(vocab, i + 1))),
                     lambda x: x.isNotNull())
    queries = val.select("track_id", truth.alias("truth"))
    cap = ctx.cfg.evaluate.label_max_queries
    n = queries.count()
    if cap and n > cap:
        queries = queries.where(hash_unit(ctx.cfg.factors.eval_seed, "track_id") < F.lit(cap / n))
        n = queries.count()
    return queries, n


def accuracy_rows(ctx, model_id: str, meta: dict, queries, n_queries: int) -> list[dict]:
    """top-k accuracy rows: the stored ``predicted_labels`` of this model and the current mel
    (a track without one counts as a miss, in ``n_candidates_without_vector``)."""
    from pyspark.sql import functions as F
    ks = sorted(set(ctx.cfg.evaluate.label_accuracy_at))
    n_labels = len(meta.get("label_names") or [])
    predicted = (ctx.read(PREDICTED_LABELS).where(F.col("model_id") == model_id)
                 .join(ctx.read(MELS).select("track_id", "fingerprint"), ["track_id", "fingerprint"], "left_semi")
                 .select("track_id", "labels"))
    joined = queries.join(predicted, "track_id", "left")
    hits = [F.sum((F.coalesce(F.size(F.array_intersect(F.slice("labels", 1, k), "truth")), F.lit(0)) > 0)
                  .cast("long")).alias(f"hit{k}") for k in ks]
    by_m = joined.groupBy(F.size("truth").alias("m")).agg(
        F.count("*").alias("n"), F.sum(F.col("labels").isNull().cast("long")).alias("missing"), *hits).collect()
    total = sum(r["n"] for r in by_m)
    missing = sum(r["missing"] for r in by_m)
    rows = []
    for k in ks:
        rows.append({
            "split": "validation", "predictor": LABELS_PREDICTOR, "metric": L.accuracy_metric(k), "label": None,
            "value": sum(r[f"hit{k}"] for r in by_m) / total if total else None,
            "chance": sum(r["n"] * L.topk_chance(n_labels, r["m"], k) for r in by_m) / total if total else None,
            "k": k, "n_queries": total, "n_candidates": n_labels, "n_candidates_without_vector": missing,
            "model_id": model_id})
    return rows


def precision_rows(ctx, model_id: str, queries, scratch: str) -> list[dict]:
    """label precision@k rows: the validation queries' k nearest tracks among every embedding
    of this model (exact search, the query excluded), per label and over all labels."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from deepcuts.knn import sharded
    from deepcuts.knn.search import IndexSpec
    from deepcuts.knn.shards import plan_from_conf
    cfg = ctx.cfg
    k = cfg.evaluate.label_k
    items = (ctx.read(AUDIO_EMBEDDINGS).where(F.col("model_id") == model_id)
             .join(ctx.read(MELS).select("track_id", "fingerprint"), ["track_id", "fingerprint"], "left_semi")
             .select(F.col("track_id").alias("id"), F.col("embedding").alias("vector"),
                     F.lit(SOURCE_AUDIO).alias("source"))
             .where(F.col("vector").isNotNull() & (F.size("vector") > 0))
             .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        n_items = items.count()
        if n_items < 2:
            raise LabelSkip(f"audio_embeddings holds {n_items} current rows of model {model_id}: run infer")
        query_vectors = items.join(queries.select(F.col("track_id").alias("id")), "id", "left_semi")
        n_queries = query_vectors.count()
        n_asked = queries.count()
        labels = (ctx.read(MELS).select(F.col("track_id").alias("id"),
                                        F.explode(label_list(F.col("labels"), cfg.train.label_separator))
                                        .alias("label"))
                  .join(items.select("id"), "id", "left_semi").distinct().persist(StorageLevel.MEMORY_AND_DISK))
        spec = IndexSpec(kind="flat")    # an evaluation is exact, whatever neighbours.index serves
        plan = plan_from_conf(cfg.neighbours, n_items, n_queries, ctx.spark.sparkContext.defaultParallelism)
        index_folder, query_folder = posixpath.join(scratch, "index"), posixpath.join(scratch, "queries")
        manifest = sharded.build_shards(items, spec, plan.shards, index_folder, normalise=True,
                                        train_rows=1, seed=0, n_items=n_items, meta={"name": "label_precision"})
        blocks = sharded.stage_queries(query_vectors, plan.blocks, query_folder, 0.0)
        merged = sharded.search_merged(ctx.spark, manifest, index_folder, query_folder, blocks, k, spec,
                                       exclude_self=True).where(~F.col("exact"))
        found = merged.groupBy("query_id").agg(F.count("*").alias("found"))
        query_labels = labels.select(F.col("id").alias("query_id"), "label")
        hit = labels.select(F.col("id").alias("neighbour_id"), "label", F.lit(1).alias("hit"))
        per_query = (merged.select("query_id", "neighbour_id").join(query_labels, "query_id")
                     .join(hit, ["neighbour_id", "label"], "left")
                     .groupBy("query_id", "label").agg(F.sum(F.coalesce("hit", F.lit(0))).alias("hits"))
                     .join(found, "query_id")
                     .select("label", (F.col("hits") / F.col("found")).alias("precision")))
        per_label = {r["label"]: (r["p"], r["n"]) for r in per_query.groupBy("label").agg(
            F.sum("precision").alias("p"), F.count("*").alias("n")).collect()}
        with_label = {r["label"]: r["n"] for r in labels.groupBy("label").agg(F.count("*").alias("n")).collect()}
        labels.unpersist()
    finally:
        items.unpersist()
    base = {"split": "validation", "predictor": EMBEDDINGS_PREDICTOR, "metric": L.PRECISION, "k": k,
            "n_candidates": n_items, "n_candidates_without_vector": n_asked - n_queries, "model_id": model_id}
    rows = []
    for label in sorted(per_label):
        total, n = per_label[label]
        rows.append({**base, "label": label, "value": total / n, "n_queries": n,
                     "chance": L.precision_chance(with_label.get(label, 0), n_items)})
    pairs = sum(n for _, n in per_label.values())
    if pairs:
        rows.insert(0, {**base, "label": None, "value": sum(t for t, _ in per_label.values()) / pairs,
                        "n_queries": pairs,
                        "chance": sum(n * (L.precision_chance(with_label.get(lab, 0), n_items) or 0.0)
                                      for lab, (_, n) in per_label.items()) / pairs})
    return rows


def label_metrics(ctx, cnn) -> tuple[list[dict], dict]:
    """(``evaluation_results`` rows, summary lines) of the labels model ``cnn`` (model id,
    folder, meta); nothing for a factors model."""
    from deepcuts.core.storage import delete_tree
    if cnn is None or cnn[2].get("target") != "labels":
        return [], {}
    model_id, _, meta = cnn
    scratch = ctx.path("_scratch", "evaluate", ctx.run_id, "labels")
    try:
        queries, n_queries = _validation_queries(ctx, meta)
        if n_queries == 0:
            raise LabelSkip("no validation track left to score (evaluate.label_max_queries)")
        rows = accuracy_rows(ctx, model_id, meta, queries, n_queries)
        try:
            rows += precision_rows(ctx, model_id, queries, scratch)
        except LabelSkip as why:
            return rows, {"labels": _lines(rows), "skipped_labels": f"precision: {why}"}
    except LabelSkip as why:
        return [], {"skipped_labels": str(why)}
    finally:
        delete_tree(scratch)
    return rows, {"labels": _lines(rows)}


def _lines(rows: list[dict]) -> dict:
    """summary: metric[/label] -> 'value (chance c, n)'."""
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"
    return {f"{r['predictor']}/{r['metric']}" + (f"/{r['label']}" if r["label"] else ""):
            f"{f(r['value'])} (chance {f(r['chance'])}, {r['n_queries']} queries)" for r in rows}


def format_label_table(rows: list[dict]) -> str:
    lines = [f"{'split':<10} {'predictor':<11} {'metric':<22} {'label':<14} {'value':>7} {'chance':>7} "
             f"{'k':>3} {'queries':>7}  model"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        c = "n/a" if r["chance"] is None else f"{r['chance']:.4f}"
        lines.append(f"{r['split']:<10} {r['predictor']:<11} {r['metric']:<22} {(r['label'] or '(all)'):<14} "
                     f"{v:>7} {c:>7} {r['k']:>3} {r['n_queries']:>7}  {r['model_id']}")
    return "\n".join(lines)
