"""The neighbours stage (the last of the nightly run): similar tracks, "new music for you", and the indexes for query by audio.

Outputs
  ``similar_tracks``        the ``neighbours.k`` nearest tracks of every serving track: cosine
                            over unit-normalised ``serving_factors`` (usage factors where usage
                            suffices, audio predictions otherwise), the track itself excluded,
                            equal scores ordered by neighbour id (a rerun writes the same table).
  ``sounds_like``           the same over ``predicted_factors`` alone: pure audio content; or
                            over a labels model's ``audio_embeddings`` (``neighbours.content``;
                            content-only mode: no plays, so no serving_factors, and
                            similar_tracks / user_recommendations are skipped with a reason).
  ``user_recommendations``  for every user in ``user_factors``, the ``neighbours.top_n`` tracks
                            by raw x_u . y_i among the tracks the user never played (plays are
                            the factors stage's input, ``factors.plays``): list ``all`` (every
                            serving track) and ``cold`` (tracks without usage: source audio or metadata).
  ``neighbour_metrics``     per table and list: index, recall@k, sizes, timings, audio share.
  ``neighbour_rejects``     vectors left out (null, wrong dimension, NaN/inf, zero length).
  ``<warehouse>/indexes/<run_id>/{similar_tracks,sounds_like}/``  the shard indexes with a
                            sha256 manifest; ``indexes/LATEST`` names the run once the stage
                            succeeded (``python -m deepcuts similar FILE`` searches them).

Every search is the sharded job of :mod:`deepcuts.knn.sharded`: S catalogue shards x B query
blocks, one Spark task per pair running FAISS on its cores, a per-block merge.  The index is
``neighbours.index``: exact ``flat`` (default), or ``ivf`` / ``hnsw``, whose recall@k is
measured every run on a hash sample of ``recall_sample`` queries searched exactly as well;
under ``neighbours.min_recall`` the stage fails before writing any table (and publishes no
index).  Recommendations search the same way with users as the queries, the user's plays in a
shard excluded by over-fetching k + (plays in that shard), the cold list through a FAISS
selector on the shard's tracks without usage.

Cost at 64-d, k = 10, flat (measured in ``bench/neighbours.py``; see ``knn.sharded`` for the
data movement):
* 1e6 tracks: 1e12 multiply-adds per table (all tracks as queries), S = 1, B = 50: a few
  minutes on 16 cores; shuffle ~0.5 GB of candidates; ~1 GB of staged vectors.
* 1e7 tracks: 1e14 multiply-adds (exact is quadratic): ~100x the 1e6 case, S = 10, B = 500;
  candidates ~50 GB shuffled.  ``ivf`` / ``hnsw`` cut the search 10-100x at recall >= 0.95.
Recommendations cost users x tracks x dim (x 2 lists).  The driver holds only manifests, the
IVF training sample (``ivf_train_rows``) and the recall sample's lists.

Declared reads: serving_factors, predicted_factors, user_factors, mels (labels only), and
the plays file ``factors.plays``.  Writes: similar_tracks, sounds_like, user_recommendations,
neighbour_metrics (append), neighbour_rejects.
"""
from __future__ import annotations

import logging
import posixpath
import time

from deepcuts.core.errors import InputMissing
from deepcuts.core.tables import (COLD_SOURCES, MELS, NEIGHBOUR_METRICS, NEIGHBOUR_REJECTS,
                                  SERVING_FACTORS, SIMILAR_TRACKS, SOUNDS_LIKE, USER_FACTORS,
                                  USER_RECOMMENDATIONS)
from deepcuts.knn import persist, sharded
from deepcuts.stages.content import sounds_like_source
from deepcuts.knn.recall import check_recall, sample_fraction
from deepcuts.knn.search import IndexSpec
from deepcuts.knn.shards import plan_from_conf

log = logging.getLogger(__name__)


COLD = "cold"
USER_SOURCE = "user"

# Reason codes of neighbour_rejects.
NULL_VECTOR = "null_vector"
BAD_DIMENSION = "bad_dimension"         # not the length most vectors of the table have
NON_FINITE = "non_finite"
ZERO_VECTOR = "zero_vector"             # no direction: cosine is undefined
REASONS = (NULL_VECTOR, BAD_DIMENSION, NON_FINITE, ZERO_VECTOR)


class NoVectors(InputMissing):
    """The stage has nothing to search: serving_factors is empty."""


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
def common_dimension(df) -> int | None:
    """The vector length most rows of ``df`` (id, vector) have (one small aggregation)."""
    from pyspark.sql import functions as F
    row = (df.where(F.col("vector").isNotNull()).groupBy(F.size("vector").alias("d")).count()
           .orderBy(F.desc("count"), F.asc("d")).first())
    return None if row is None else int(row["d"])


def checked_vectors(df, dim: int | None, table: str, *, needs_direction: bool):
    """(usable rows, rejected rows) of ``df`` (id, vector, ...) by REASONS, first failing wins."""
    from pyspark.sql import functions as F
    v = F.col("vector")
    # A null element counts as non-finite (pandas' NaN can arrive as null).
    finite = F.forall(v, lambda x: F.coalesce(~F.isnan(x) & (F.abs(x) < F.lit(float("inf"))), F.lit(False)))
    norm2 = F.aggregate(v, F.lit(0.0).cast("double"), lambda acc, x: acc + x * x)
    reason = (F.when(v.isNull(), F.lit(NULL_VECTOR))
              .when(F.size(v) != F.lit(dim if dim is not None else -1), F.lit(BAD_DIMENSION))
              .when(~finite, F.lit(NON_FINITE)))
    if needs_direction:
        reason = reason.when(norm2 <= F.lit(0.0), F.lit(ZERO_VECTOR))
    tagged = df.withColumn("_reason", reason)
    good = tagged.where(F.col("_reason").isNull()).drop("_reason")
    bad = tagged.where(F.col("_reason").isNotNull()).select(
        F.lit(table).alias("table"), F.col("id"), F.col("_reason").alias("reason"),
        F.when(F.col("_reason") == BAD_DIMENSION,
               F.concat(F.lit("length "), F.size(v).cast("string"), F.lit(f", expected {dim}")))
        .alias("detail"))
    return good, bad


def serving_model_id(serving) -> str | None:
    from pyspark.sql import functions as F
    row = serving.where(F.col("model_id").isNotNull()).agg(F.max("model_id").alias("m")).first()
    return row["m"] if row else None


def seen_pairs(spark, cfg):
    """(query_id = user_id, item_id = track_id) of every validated play of ``factors.plays``:
    read and validated exactly as the factors stage does (``deepcuts.cf.plays``)."""
    from pyspark.sql import functions as F
    from deepcuts.cf.plays import read_raw_plays, validate_plays
    fc = cfg.factors
    plays = validate_plays(read_raw_plays(spark, fc.plays, fc.plays_format), fc.plays_format)
    return (plays.where(F.col("reason").isNull())
            .select(F.col("user_id").alias("query_id"), F.col("track_id").alias("item_id")).distinct())


# --------------------------------------------------------------------------------------
# One table: build, search, merge, measure
# --------------------------------------------------------------------------------------
def neighbour_table(spark, cfg, *, name: str, items, queries, n_items: int, n_queries: int, k: int,
                    normalise: bool, exclude_self: bool, index_folder: str, work: str,
                    lists=((sharded.ALL, None),), excluded=None, payload=(), meta=None) -> dict:
    """Run the sharded search for one output table (``queries`` None: the items are the
    queries); returns its merged rows (persisted) and the facts for neighbour_metrics."""
    from pyspark import StorageLevel
    nc = cfg.neighbours
    spec = IndexSpec.from_conf(nc)
    cores = spark.sparkContext.defaultParallelism
    plan = plan_from_conf(nc, n_items, n_queries, cores)
    fraction = 0.0 if spec.exact else sample_fraction(nc.recall_sample, n_queries)
    started = time.time()
    query_folder = posixpath.join(work, f"{name}-queries")
    same = queries is None          # the items are the queries: their builders stage the blocks
    manifest = sharded.build_shards(items, spec, plan.shards, index_folder, normalise=normalise,
                                    train_rows=nc.ivf_train_rows, seed=nc.seed, n_items=n_items,
                                    payload=tuple(payload), meta={"name": name, **(meta or {})},
                                    query_blocks=plan.blocks if same else None,
                                    query_folder=query_folder, sample_fraction=fraction)
    built = time.time()
    blocks = manifest["blocks"] if same else sharded.stage_queries(queries, plan.blocks, query_folder, fraction)
    excluded_folder = None
    if excluded is not None:
        excluded_folder = posixpath.join(work, f"{name}-excluded")
        sharded.stage_excluded(excluded, plan.blocks, plan.shards, excluded_folder)
    merged = sharded.search_merged(spark, manifest, index_folder, query_folder, blocks, k, spec, lists=lists,
                                   exclude_self=exclude_self, excluded_folder=excluded_folder)
    merged = merged.persist(StorageLevel.MEMORY_AND_DISK)
    merged.count()
    searched = time.time()
    recall = sharded.recall_by_list(merged, k) if not spec.exact else {}
    log.info("%s: %d items in %d shards, %d queries in %d blocks, %s index, recall %s",
             name, n_items, plan.shards, n_queries, plan.blocks, spec.kind, recall or "exact")
    return {"name": name, "merged": merged, "recall": recall, "plan": plan, "spec": spec,
            "manifest": manifest, "k": k, "n_items": n_items, "n_queries": n_queries,
            "lists": [n for n, _ in lists], "build_seconds": built - started,
            "search_seconds": searched - built, "model_id": (meta or {}).get("model_id")}


def audio_shares(merged) -> dict[str, float | None]:
    """list -> share of published neighbours without usage (source audio or metadata)."""
    from pyspark.sql import functions as F
    rows = (merged.where(~F.col("exact")).groupBy("list")
            .agg(F.avg(F.col("neighbour_source").isin(*COLD_SOURCES).cast("double")).alias("share")).collect())
    return {r["list"]: r["share"] for r in rows}


def metrics_rows(result: dict, shares: dict, run_id: str) -> list[dict]:
    spec, plan = result["spec"], result["plan"]
    out = []
    for name in result["lists"]:
        recall, sampled = result["recall"].get(name, (1.0 if spec.exact else None, 0))
        out.append({
            "run_id": run_id, "table": result["name"], "list": name, "index_type": spec.kind,
            "k": result["k"], "recall_at_k": recall, "n_queries": result["n_queries"],
            "n_queries_sampled": sampled, "n_items": result["n_items"], "shards": plan.shards,
            "blocks": plan.blocks, "nlist": result["manifest"].get("nlist"),
            "nprobe": spec.nprobe if spec.kind == "ivf" else None,
            "hnsw_m": spec.hnsw_m if spec.kind == "hnsw" else None,
            "ef_search": spec.ef_search if spec.kind == "hnsw" else None,
            "build_seconds": round(result["build_seconds"], 3),
            "search_seconds": round(result["search_seconds"], 3),
            "seconds": round(result["build_seconds"] + result["search_seconds"], 3),
            "audio_share": shares.get(name), "model_id": result["model_id"]})
    return out


def neighbours_rows(merged, model_id: str | None, run_id: str):
    """similar_tracks / sounds_like rows from the merged rows."""
    from pyspark.sql import functions as F
    return merged.where(~F.col("exact")).select(
        F.col("query_id").alias("track_id"), "rank", "neighbour_id", "score",
        F.col("query_source").alias("track_source"), "neighbour_source",
        F.lit(model_id).cast("string").alias("model_id"), F.lit(run_id).alias("run_id"))


def recommendation_rows(merged, run_id: str):
    from pyspark.sql import functions as F
    return merged.where(~F.col("exact")).select(
        F.col("query_id").alias("user_id"), "list", "rank", F.col("neighbour_id").alias("track_id"),
        "score", F.col("neighbour_source").alias("source"), F.lit(run_id).alias("run_id"))


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------
def run(ctx) -> dict:
    """Build every table (see the module docstring), check recall, then publish."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from deepcuts.core.storage import delete_tree
    spark, cfg, run_id = ctx.spark, ctx.cfg, ctx.run_id
    nc = cfg.neighbours
    root = ctx.path()
    work = ctx.path("_staging", "neighbours", run_id)
    started = time.time()
    results: list[dict] = []
    rejects = []
    persisted = []
    published = False
    summary: dict = {}
    try:
        serving_raw = ctx.read(SERVING_FACTORS).select(
            F.col("track_id").alias("id"), F.col("factors").alias("vector"), "source", "model_id")
        dim = common_dimension(serving_raw)
        model_id = serving_model_id(serving_raw) if dim is not None else None
        labels = ctx.read(MELS).select(F.col("track_id").alias("id"), "labels")
        # Content-only mode (no plays, a labels model): no serving space, sounds_like alone.
        content_vectors, content_model, content_table = (sounds_like_source(ctx, nc.content, model_id)
                                                          if nc.sounds_like else (None, None, None))
        if nc.sounds_like:
            summary["sounds_like_vectors"] = f"{content_table} (model {content_model})"
        n_tracks = 0
        if dim is None and not (nc.sounds_like and common_dimension(content_vectors) is not None):
            raise NoVectors("serving_factors is empty and there are no content vectors: run the infer stage first")
        if dim is None:
            summary[SIMILAR_TRACKS.name] = "skipped: serving_factors is empty (content-only mode: no plays)"
        else:
            serving, bad = checked_vectors(serving_raw, dim, SIMILAR_TRACKS.name, needs_direction=True)
            rejects.append(bad)
            serving = serving.select("id", "vector", "source").persist(StorageLevel.MEMORY_AND_DISK)
            persisted.append(serving)
            n_tracks = serving.count()
            results.append(neighbour_table(
                spark, cfg, name=SIMILAR_TRACKS.name, items=serving.join(labels, "id", "left"), queries=None,
                n_items=n_tracks, n_queries=n_tracks, k=nc.k, normalise=True, exclude_self=True,
                index_folder=persist.index_dir(root, run_id, SIMILAR_TRACKS.name), work=work,
                payload=("labels",), meta={"model_id": model_id, "vectors": SERVING_FACTORS.name, "dim": dim}))

        if nc.sounds_like:
            # predicted_factors of the serving model, or a labels model's audio_embeddings
            # (neighbours.content; deepcuts.stages.content)
            predicted = content_vectors
            pdim = common_dimension(predicted)
            if pdim is not None:
                audio, bad = checked_vectors(predicted, pdim, SOUNDS_LIKE.name, needs_direction=True)
                rejects.append(bad)
                audio = audio.persist(StorageLevel.MEMORY_AND_DISK)
                persisted.append(audio)
                n_audio = audio.count()
                results.append(neighbour_table(
                    spark, cfg, name=SOUNDS_LIKE.name, items=audio.join(labels, "id", "left"), queries=None,
                    n_items=n_audio, n_queries=n_audio, k=nc.k, normalise=True, exclude_self=True,
                    index_folder=persist.index_dir(root, run_id, SOUNDS_LIKE.name), work=work,
                    payload=("labels",),
                    meta={"model_id": content_model, "vectors": content_table, "dim": pdim}))
            else:
                summary[SOUNDS_LIKE.name] = f"skipped: {content_table} is empty"

        if nc.recommendations and dim is None:
            summary[USER_RECOMMENDATIONS.name] = "skipped: serving_factors is empty (content-only mode: no plays)"
        elif nc.recommendations:
            users_raw = ctx.read(USER_FACTORS).select(F.col("user_id").alias("id"),
                                                      F.col("factors").alias("vector"),
                                                      F.lit(USER_SOURCE).alias("source"))
            users, bad = checked_vectors(users_raw, dim, USER_RECOMMENDATIONS.name, needs_direction=False)
            rejects.append(bad)
            users = users.persist(StorageLevel.MEMORY_AND_DISK)
            persisted.append(users)
            n_users = users.count()
            summary["users"] = n_users
            if n_users:
                results.append(neighbour_table(
                    spark, cfg, name=USER_RECOMMENDATIONS.name, items=serving, queries=users,
                    n_items=n_tracks, n_queries=n_users, k=nc.top_n, normalise=False, exclude_self=False,
                    index_folder=posixpath.join(work, "recommendations-index"), work=work,
                    lists=((sharded.ALL, None), (COLD, COLD_SOURCES)), excluded=seen_pairs(spark, cfg),
                    meta={"model_id": model_id}))
            else:
                summary[USER_RECOMMENDATIONS.name] = "skipped: user_factors is empty"

        # The gate: an approximate index under the floor publishes nothing at all.
        for r in results:
            for name, (recall, _) in sorted(r["recall"].items()):
                check_recall(recall, nc.min_recall, f"{r['name']} ({name} list, {r['spec'].kind} index)")

        metrics = []
        writers = {SIMILAR_TRACKS.name: (SIMILAR_TRACKS, lambda m: neighbours_rows(m, model_id, run_id)),
                   SOUNDS_LIKE.name: (SOUNDS_LIKE, lambda m: neighbours_rows(m, content_model, run_id)),
                   USER_RECOMMENDATIONS.name: (USER_RECOMMENDATIONS, lambda m: recommendation_rows(m, run_id))}
        for r in results:
            table, rows = writers[r["name"]]
            written = ctx.write(rows(r["merged"]), table)
            shares = audio_shares(r["merged"])
            metrics.extend(metrics_rows(r, shares, run_id))
            summary[r["name"]] = describe(r, shares, written.rows)
        ctx.write(spark.createDataFrame(metrics, _spark_schema(NEIGHBOUR_METRICS)), NEIGHBOUR_METRICS,
                  mode="append")
        all_rejects = rejects[0]
        for more in rejects[1:]:
            all_rejects = all_rejects.unionByName(more)
        all_rejects = all_rejects.withColumn("run_id", F.lit(run_id))
        counts = {r["reason"]: r["n"]
                  for r in all_rejects.groupBy("reason").agg(F.count("*").alias("n")).collect()}
        ctx.write(all_rejects, NEIGHBOUR_REJECTS)

        persist.publish(root, run_id)
        published = True
        removed = persist.vacuum(root, nc.keep_index_runs)
        recs = next((m for m in metrics if m["table"] == USER_RECOMMENDATIONS.name and m["list"] == sharded.ALL),
                    None)
        return {
            "tracks": n_tracks,
            **summary,
            "index": nc.index,
            "recall_at_k": {f"{m['table']}/{m['list']}": None if m["recall_at_k"] is None
                            else round(m["recall_at_k"], 4) for m in metrics},
            "audio_share_in_all_recommendations": None if recs is None or recs["audio_share"] is None
            else round(recs["audio_share"], 4),
            "rejected": counts,
            "index_run": run_id,
            "index_runs_removed": len(removed),
            "seconds": round(time.time() - started, 1),
        }
    finally:
        for r in results:
            r["merged"].unpersist()
        for df in persisted:
            df.unpersist()
        delete_tree(work)
        if not published:
            delete_tree(posixpath.join(persist.indexes_root(root), run_id))


def describe(result: dict, shares: dict, rows: int) -> str:
    """One summary line per table."""
    plan = result["plan"]
    parts = [f"{rows} rows", f"{plan.shards} shards x {plan.blocks} blocks",
             f"build {result['build_seconds']:.1f} s, search {result['search_seconds']:.1f} s"]
    for name in result["lists"]:
        recall, sampled = result["recall"].get(name, (None, 0))
        share = shares.get(name)
        text = f"{name}: audio share {share:.3f}" if share is not None else f"{name}: empty"
        if recall is not None:
            text += f", recall@{result['k']} {recall:.4f} on {sampled} queries"
        parts.append(text)
    return "; ".join(parts)


def _spark_schema(table):
    from deepcuts.core.tables import spark_schema
    return spark_schema(table)
