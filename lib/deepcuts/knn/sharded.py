"""The sharded k-NN job on Spark: FAISS on the executors, nothing catalogue-sized on the driver.

Steps, each a Spark job whose tasks run the pure functions of ``search`` / ``merge``:

1. ``build_shards``: items (id, vector, source, payload) get a shard by hash; a
   ``groupBy(shard).applyInPandas`` task builds that shard's FAISS index (IVF: from the one
   coarse quantiser trained on the driver over a bounded sample, ``train_rows`` vectors)
   and writes it with its ids under ``persist.index_dir`` (sha256 in the manifest).  When
   the items are also the queries (similar tracks), the same task writes its rows as query
   files of their blocks, so no second pass is needed.  The driver gets S manifest rows.
2. ``stage_queries`` / ``stage_excluded`` (recommendations: users are the queries): queries
   get a block by hash and are written as Parquet partitioned by block; excluded pairs (a
   user's plays) partitioned by (block, shard).  Spark writes them, no Python on the way.
3. ``search``: one task per (block x shard) pair (``spark.range(pairs, numSlices=pairs)``:
   exactly one pair per task), shard-major so that consecutive tasks on a worker reuse its
   cached shard (``persist.cached_shard``).  A task reads its block's queries and its
   shard's index straight from the files (pyarrow, FAISS), searches top-(k + 1) (self is
   excluded in the merge) or top-k minus the user's plays, for each requested list, and
   streams one row per (query, list) holding the shard's best as arrays (``mapInArrow``).
   For the recall check the sampled queries are searched a second time with the exact view
   of the same shard (``exact`` rows).
4. ``merge``: ``groupBy(block, list, exact).applyInPandas(merge_candidates)``: a group is
   one block's candidates from every shard, block_rows x S rows of k + 1.  With one shard
   (``search_merged``) the pair task merges its own output and nothing is shuffled.

Why files and not a cross join or ``cogroup``: replicating each shard to B blocks and each
block to S shards through the shuffle moves (B + S) x the catalogue's vectors through
Spark's serialisers and sort; here each vector is shuffled once (into its shard builder),
written once per role, and read by the S (or B) tasks that need it as a plain Parquet /
FAISS file read, with a worker-level cache for the shard.  The only shuffle of the search
is the candidates: queries x S rows of k + 1 (id, score, source) each.

Cost (64-d vectors, k = 10, defaults shard_rows = 1e6, block_rows = 2e4):
* 1e6 tracks: S = 1, B = 50; vectors 256 MB shuffled once and staged once; 50 tasks each
  read a 256 MB flat index (cached per worker) and search 2e4 queries: 1e12 multiply-adds
  in all, the same FAISS work as one process; no candidate shuffle (one shard).
* 1e7 tracks: S = 10, B = 500; 5,000 pair tasks; 1e14 multiply-adds (exact: ~100x the
  1e6 case, which is why ivf/hnsw exist: see bench/neighbours.py); candidates 1e8 rows of
  11 (~15 GB shuffled), the merge group of one block 2e5 rows.
Peak memory of a task: one shard index + one query block + its results; of the driver:
the S + B manifest entries, the IVF training sample, and the recall sample's lists.
"""
from __future__ import annotations

import json
import posixpath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from deepcuts.knn import merge as knn_merge
from deepcuts.knn import persist
from deepcuts.knn.search import IndexSpec, build_index, exact_view, search_pair, set_threads, task_cores, \
    train_coarse
from deepcuts.knn.shards import block_expr, sample_expr, shard_expr

ALL = "all"

# One row per (query, shard, list): the shard's best candidates of that query, best first.
CANDIDATE_SCHEMA = pa.schema([
    pa.field("block", pa.int32()), pa.field("list", pa.string()), pa.field("exact", pa.bool_()),
    pa.field("query_id", pa.string()), pa.field("query_source", pa.string()),
    pa.field("sampled", pa.bool_()), pa.field("neighbour_ids", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())), pa.field("neighbour_sources", pa.list_(pa.string())),
])
MERGED_SCHEMA = pa.schema([
    pa.field("list", pa.string()), pa.field("exact", pa.bool_()), pa.field("sampled", pa.bool_()),
    pa.field("query_id", pa.string()), pa.field("query_source", pa.string()),
    pa.field("rank", pa.int32()), pa.field("neighbour_id", pa.string()),
    pa.field("score", pa.float32()), pa.field("neighbour_source", pa.string()),
])


def _spark_schema(schema: pa.Schema):
    from pyspark.sql.pandas.types import from_arrow_schema
    return from_arrow_schema(schema)


def _spark_path(path: str) -> str:
    from deepcuts.core.storage import to_s3a
    return to_s3a(path)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (callers have rejected zero vectors)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _stack(values) -> np.ndarray:
    if len(values) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(values).astype(np.float32, copy=False)


# --- 1. shards ---------------------------------------------------------------------------
def _builder(spec: IndexSpec, coarse: bytes | None, folder: str, normalise: bool, payload: tuple[str, ...],
             query_folder: str | None):
    def build(pdf: pd.DataFrame) -> pd.DataFrame:
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        set_threads(task_cores())
        shard = int(pdf["shard"].iloc[0])
        # Rows sorted by id: FAISS ids, hence tie order, are the same every run.
        pdf = pdf.sort_values("id", kind="stable")
        x = _stack(pdf["vector"].to_numpy())
        index = build_index(unit(x) if normalise else x, spec, coarse)
        ids = pa.table({"id": pa.array(pdf["id"].to_numpy(), pa.string()),
                        "source": pa.array(pdf["source"].to_numpy(), pa.string()),
                        **{c: pa.array(pdf[c].to_numpy(), pa.string()) for c in payload}})
        entry = persist.write_shard(folder, shard, index, ids)
        blocks: list[int] = []
        if query_folder is not None:
            # The items are the queries too: this shard's rows are also written as their
            # blocks' query files (one per block and shard), saving a second pass and shuffle.
            block_of = pdf["block"].to_numpy()
            for block in np.unique(block_of):
                rows = np.flatnonzero(block_of == block)
                persist.write_parquet(posixpath.join(query_folder, f"block={int(block)}", f"shard-{shard:05d}.parquet"),
                                      pa.table({"id": ids.column("id").take(pa.array(rows)),
                                                "vector": vector_array(x[rows]),
                                                "source": ids.column("source").take(pa.array(rows)),
                                                "sampled": pa.array(pdf["sampled"].to_numpy(dtype=bool)[rows])}))
                blocks.append(int(block))
        return pd.DataFrame({"entry": [json.dumps({**entry, "blocks": blocks})]})
    return build


def vector_array(x: np.ndarray) -> pa.Array:
    """float32 [n, d] as a list<float> Arrow array without Python objects."""
    n, d = x.shape if x.ndim == 2 else (0, 0)
    offsets = pa.array(np.arange(0, n * d + 1, max(d, 1), dtype=np.int32)[: n + 1])
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x, np.float32).reshape(-1)))


def collect_vectors(df, column: str = "vector") -> np.ndarray:
    """A *bounded* frame's vectors on the driver (training / recall samples only)."""
    return _stack(df.select(column).toPandas()[column].to_numpy())


def build_shards(items, spec: IndexSpec, n_shards: int, folder: str, *, normalise: bool,
                 train_rows: int, seed: int, n_items: int | None = None,
                 payload: tuple[str, ...] = (), meta: dict | None = None,
                 query_blocks: int | None = None, query_folder: str | None = None,
                 sample_fraction: float = 0.0) -> dict:
    """Build and persist the S shard indexes of ``items`` (id, vector, source, *payload);
    returns the manifest (also written to ``folder``).  With ``query_blocks`` (the items
    are the queries, as for similar tracks) the builders also stage the query blocks under
    ``query_folder``, as ``stage_queries`` would; the manifest's ``blocks`` lists them."""
    from pyspark.sql import functions as F
    coarse, nlist = None, None
    if spec.kind == "ivf":
        n_items = items.count() if n_items is None else n_items
        fraction = min(1.0, 1.2 * train_rows / max(1, n_items))
        sample = collect_vectors(items.sample(fraction=fraction, seed=seed).limit(train_rows))
        coarse = train_coarse(unit(sample) if normalise else sample, spec)
        nlist = _nlist(coarse)
    staged = query_blocks is not None
    build = _builder(spec, coarse, folder, normalise, tuple(payload), query_folder if staged else None)
    frame = items.select("id", "vector", "source", *payload).withColumn("shard", shard_expr(F.col("id"), n_shards))
    if staged:
        frame = frame.withColumn("block", block_expr(F.col("id"), query_blocks)) \
            .withColumn("sampled", sample_expr(F.col("id"), sample_fraction))
    entries = frame.groupBy("shard").applyInPandas(build, "entry string").collect()
    shards = [json.loads(r["entry"]) for r in entries]
    blocks = sorted({b for e in shards for b in e.pop("blocks")})
    manifest = {**(meta or {}), "index_type": spec.kind, "normalised": normalise, "n_shards": n_shards,
                "nlist": nlist, "spec": spec.__dict__, "rows": sum(e["rows"] for e in shards),
                "shards": shards, **({"blocks": blocks} if staged else {})}
    persist.write_manifest(folder, manifest)
    return persist.read_manifest(folder)


def _nlist(coarse: bytes) -> int:
    import faiss
    return int(faiss.extract_index_ivf(faiss.deserialize_index(np.frombuffer(coarse, np.uint8))).nlist)


# --- 2. staging ---------------------------------------------------------------------------
def stage_queries(queries, n_blocks: int, folder: str, sample_fraction: float) -> list[int]:
    """Write queries (id, vector, source) partitioned by block; the non-empty block ids."""
    from pyspark.sql import functions as F
    staged = queries.select("id", "vector", "source", block_expr(F.col("id"), n_blocks).alias("block"),
                            sample_expr(F.col("id"), sample_fraction).alias("sampled"))
    # One file per block: every block lands whole in one partition.
    staged.repartition(n_blocks, "block").write.mode("overwrite").partitionBy("block") \
        .parquet(_spark_path(folder))
    return _partition_values(folder, "block")


def stage_excluded(pairs, n_blocks: int, n_shards: int, folder: str) -> None:
    """Write excluded (query_id, item_id) pairs partitioned by (block, shard) of their query
    and item: a pair task reads only its own."""
    from pyspark.sql import functions as F
    staged = pairs.select("query_id", "item_id",
                          block_expr(F.col("query_id"), n_blocks).alias("block"),
                          shard_expr(F.col("item_id"), n_shards).alias("shard"))
    staged.repartition(max(1, min(n_blocks * n_shards, 4 * n_blocks)), "block", "shard") \
        .write.mode("overwrite").partitionBy("block", "shard").parquet(_spark_path(folder))


def _partition_values(folder: str, key: str) -> list[int]:
    import pyarrow.fs as pafs
    from deepcuts.core.storage import filesystem_for
    fs, inner = filesystem_for(folder)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    prefix = f"{key}="
    return sorted(int(posixpath.basename(i.path)[len(prefix):]) for i in infos
                  if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith(prefix))


# --- 3. the pair search (pure given files: the tests drive it without Spark) ----------------
def read_block(folder: str, block: int) -> pa.Table:
    return persist.read_parquet_dir(posixpath.join(folder, f"block={block}"),
                                    columns=["id", "vector", "source", "sampled"])


def read_excluded(folder: str | None, block: int, shard: int) -> pa.Table | None:
    if folder is None:
        return None
    table = persist.read_parquet_dir(posixpath.join(folder, f"block={block}", f"shard={shard}"),
                                     columns=["query_id", "item_id"])
    return table if table.num_columns else None


def _excluded_rows(excluded: pa.Table | None, query_ids: np.ndarray, item_ids: np.ndarray):
    """(query rows, item rows) of the excluded pairs that fall in this block and shard."""
    if excluded is None or excluded.num_rows == 0:
        return None
    q = pd.Index(query_ids).get_indexer(excluded.column("query_id").to_numpy(zero_copy_only=False))
    i = pd.Index(item_ids).get_indexer(excluded.column("item_id").to_numpy(zero_copy_only=False))
    keep = (q >= 0) & (i >= 0)
    return q[keep].astype(np.int64), i[keep].astype(np.int64)


def search_block_shard(block: int, queries: pa.Table, index, ids: pa.Table, k: int, spec: IndexSpec, *,
                       lists: tuple[tuple[str, str | tuple[str, ...] | None], ...] = ((ALL, None),),
                       exclude_self: bool = False, normalise: bool = False,
                       excluded: pa.Table | None = None, exact_index=None) -> pa.Table:
    """Every requested list's candidates of one (block x shard) pair, as CANDIDATE_SCHEMA rows.

    ``lists``: (name, allowed source(s) or None): "cold" searches only items of those sources.
    ``exclude_self``: fetch k + 1 (the merge drops the query itself).  ``excluded``: the
    (query_id, item_id) pairs never returned.  ``exact_index`` (approximate indexes): the
    sampled queries are searched again exactly, as ``exact`` rows."""
    query_ids = queries.column("id").to_numpy(zero_copy_only=False)
    item_ids = ids.column("id").to_numpy(zero_copy_only=False)
    item_sources = ids.column("source")
    x = persist.vectors_of(queries.column("vector"))
    if normalise and len(x):
        x = unit(x)
    sampled = np.asarray(queries.column("sampled").to_numpy(zero_copy_only=False), dtype=bool)
    ex = _excluded_rows(excluded, query_ids, item_ids)
    fetch = k + 1 if exclude_self else k
    out = []
    runs = [(False, index, np.arange(len(x)))]
    if exact_index is not None and sampled.any():
        runs.append((True, exact_index, np.flatnonzero(sampled)))
    for name, source in lists:
        allowed = None
        if source is not None:
            sources = pa.array([source] if isinstance(source, str) else list(source), pa.string())
            allowed = np.asarray(pc.is_in(item_sources, value_set=sources).fill_null(False)
                                 .to_numpy(zero_copy_only=False), dtype=bool)
        for exact, idx, members in runs:
            sub_ex = ex
            if ex is not None and len(members) != len(x):
                remap = np.full(len(x), -1, dtype=np.int64)
                remap[members] = np.arange(len(members))
                keep = remap[ex[0]] >= 0
                sub_ex = (remap[ex[0][keep]], ex[1][keep])
            scores, rows = search_pair(idx, x[members], fetch, spec, excluded=sub_ex, allowed=allowed)
            valid = rows >= 0
            offsets = pa.array(np.r_[0, np.cumsum(valid.sum(axis=1))].astype(np.int32))
            item = pa.array(rows[valid])
            n = len(members)
            out.append(pa.table({
                "block": pa.array(np.full(n, block, dtype=np.int32)),
                "list": pa.array([name] * n, pa.string()),
                "exact": pa.array(np.full(n, exact)),
                "query_id": queries.column("id").take(pa.array(members)),
                "query_source": queries.column("source").take(pa.array(members)),
                "sampled": pa.array(sampled[members]),
                "neighbour_ids": pa.ListArray.from_arrays(offsets, ids.column("id").combine_chunks().take(item)),
                "scores": pa.ListArray.from_arrays(offsets, pa.array(scores[valid], pa.float32())),
                "neighbour_sources": pa.ListArray.from_arrays(offsets, item_sources.combine_chunks().take(item)),
            }, schema=CANDIDATE_SCHEMA))
    return pa.concat_tables(out) if out else CANDIDATE_SCHEMA.empty_table()


def _pair_task(pairs: list[tuple[int, int]], manifest: dict, index_folder: str, query_folder: str,
               k: int, spec: IndexSpec, lists, exclude_self: bool, excluded_folder: str | None,
               merge_here: bool = False):
    entries = {e["shard"]: e for e in manifest["shards"]}
    normalise = bool(manifest.get("normalised"))

    def run(batches):
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        set_threads(task_cores())
        for batch in batches:
            for pair in batch.column(0).to_pylist():
                block, shard = pairs[pair]
                derive = None if spec.exact else (lambda index, ids: exact_view(index))
                index, ids, exact_idx = persist.cached_shard(index_folder, entries[shard], derive)
                table = search_block_shard(block, read_block(query_folder, block), index, ids, k, spec,
                                           lists=lists, exclude_self=exclude_self, normalise=normalise,
                                           excluded=read_excluded(excluded_folder, block, shard),
                                           exact_index=exact_idx)
                if merge_here:   # one shard: this pair's lists are the queries' whole candidates
                    table = pa.Table.from_pandas(merge_candidates(table.to_pandas(), k, exclude_self),
                                                 schema=MERGED_SCHEMA, preserve_index=False)
                yield from table.to_batches(max_chunksize=65536)
    return run


def search(spark, manifest: dict, index_folder: str, query_folder: str, blocks: list[int], k: int,
           spec: IndexSpec, *, lists=((ALL, None),), exclude_self: bool = False,
           excluded_folder: str | None = None):
    """The candidates DataFrame (CANDIDATE_SCHEMA): one task per (block x shard) pair."""
    shards = [e["shard"] for e in manifest["shards"]]
    pairs = [(b, s) for s in shards for b in blocks]   # shard-major: workers reuse a cached shard
    if not pairs:
        return spark.createDataFrame([], _spark_schema(CANDIDATE_SCHEMA))
    task = _pair_task(pairs, manifest, index_folder, query_folder, k, spec, tuple(lists), exclude_self,
                      excluded_folder)
    return spark.range(0, len(pairs), 1, len(pairs)).mapInArrow(task, _spark_schema(CANDIDATE_SCHEMA))


def search_merged(spark, manifest: dict, index_folder: str, query_folder: str, blocks: list[int], k: int,
                  spec: IndexSpec, *, lists=((ALL, None),), exclude_self: bool = False,
                  excluded_folder: str | None = None):
    """The merged per-query top-k (MERGED_SCHEMA): ``search`` then ``merge``; with a single
    shard a pair task already holds every candidate of its queries, so it merges them itself
    (the same ``merge_candidates``) and no candidate is shuffled."""
    if len(manifest["shards"]) != 1:
        cands = search(spark, manifest, index_folder, query_folder, blocks, k, spec, lists=lists,
                       exclude_self=exclude_self, excluded_folder=excluded_folder)
        return merge(cands, k, exclude_self)
    pairs = [(b, manifest["shards"][0]["shard"]) for b in blocks]
    if not pairs:
        return spark.createDataFrame([], _spark_schema(MERGED_SCHEMA))
    task = _pair_task(pairs, manifest, index_folder, query_folder, k, spec, tuple(lists), exclude_self,
                      excluded_folder, merge_here=True)
    return spark.range(0, len(pairs), 1, len(pairs)).mapInArrow(task, _spark_schema(MERGED_SCHEMA))


# --- 4. merge -----------------------------------------------------------------------------
def _flat(column: pd.Series, dtype) -> np.ndarray:
    """The concatenated cells of a list column (pandas holds each cell as an array)."""
    cells = column.to_numpy(dtype=object)
    return np.concatenate(cells).astype(dtype, copy=False) if len(cells) else np.zeros(0, dtype)


def merge_candidates(pdf: pd.DataFrame, k: int, exclude_self: bool) -> pd.DataFrame:
    """``merge.merge_topk`` over candidate rows (CANDIDATE_SCHEMA, any mix of shards, lists
    and exact flags: each (list, exact, query) is merged on its own); MERGED_SCHEMA rows."""
    codes, _ = pd.MultiIndex.from_frame(pdf[["list", "exact", "query_id"]]).factorize()
    counts = pdf["neighbour_ids"].map(len).to_numpy(dtype=np.int64)
    row_of = np.repeat(np.arange(len(pdf)), counts)       # candidate -> its (query, shard) row
    query_ids = pdf["query_id"].to_numpy(dtype=object)
    q, rank, neighbour, score, pos = knn_merge.merge_topk(
        codes[row_of], _flat(pdf["neighbour_ids"], object), _flat(pdf["scores"], np.float32), k,
        query_ids=_first_by_code(codes, query_ids), exclude_self=exclude_self)
    row = row_of[pos]
    return pd.DataFrame({
        "list": pdf["list"].to_numpy(dtype=object)[row], "exact": pdf["exact"].to_numpy(dtype=bool)[row],
        "sampled": pdf["sampled"].to_numpy(dtype=bool)[row], "query_id": query_ids[row],
        "query_source": pdf["query_source"].to_numpy(dtype=object)[row],
        "rank": rank, "neighbour_id": neighbour, "score": score,
        "neighbour_source": _flat(pdf["neighbour_sources"], object)[pos]})


def _first_by_code(codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[first row of each code], indexed by code."""
    out = np.empty(int(codes.max()) + 1 if len(codes) else 0, dtype=object)
    out[codes] = values          # every row of a code holds the same query id
    return out


def merge(candidates, k: int, exclude_self: bool):
    """Per-query global top-k (MERGED_SCHEMA) from the pair tasks' candidates."""
    def run(pdf: pd.DataFrame) -> pd.DataFrame:
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        return merge_candidates(pdf, k, exclude_self)
    return candidates.groupBy("block", "list", "exact").applyInPandas(run, _spark_schema(MERGED_SCHEMA))


# --- recall -------------------------------------------------------------------------------
def recall_by_list(merged, k: int) -> dict[str, tuple[float | None, int]]:
    """list -> (recall@k, sampled queries) from the merged rows of the sampled queries
    (a bounded set: recall_sample x k x 2 rows reach the driver)."""
    from deepcuts.knn.recall import lists_by_query, recall_at_k
    rows = merged.where("sampled").select("list", "exact", "query_id", "rank", "neighbour_id").collect()
    by: dict[tuple[str, bool], list] = {}
    for r in rows:
        by.setdefault((r["list"], r["exact"]), []).append((r["query_id"], r["rank"], r["neighbour_id"]))
    out = {}
    for name in sorted({name for name, _ in by}):
        exact = lists_by_query(by.get((name, True), []))
        approx = lists_by_query(by.get((name, False), []))
        out[name] = recall_at_k(exact, approx, k)
    return out
