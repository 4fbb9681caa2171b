"""FAISS search of one (query block x shard) pair: build a shard's index, search it.

Three index types (``neighbours.index``), all over inner product (unit vectors: cosine):

* ``flat``: ``IndexFlatIP``, exact; deterministic.
* ``ivf``: ``IndexIVFFlat`` whose coarse quantiser is trained *once* on a sample of the
  catalogue (``train_coarse``, on the driver) and copied into every shard, so a query's
  nprobe cells mean the same thing in every shard.  Each shard adds its own vectors.
* ``hnsw``: ``IndexHNSWFlat`` (M, efConstruction), built by each shard on its vectors.

``search_pair`` is the one function the Spark task and the single-process tests call: it
returns each query's top-k of one shard, minus *excluded* (query, item) pairs (the plays a
user already has), plus an optional *allowed* mask over the shard's items (the cold-start
list searches audio-sourced tracks only, through a FAISS ``IDSelectorBitmap``).  Excluded
pairs are honoured by over-fetching: a query with e excluded items in the shard is searched
with k + e' results, e' = e rounded up to a power of two, so a block needs at most
log2(max e) + 1 FAISS calls and never more than twice the results it keeps.

Threads: FAISS parallelises with OpenMP (its BLAS too); a Spark task sets them to its own
cores (``set_threads(task_cores())``), or tasks oversubscribe the executor and get slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INDEX_TYPES = ("flat", "ivf", "hnsw")
# faiss k-means wants at least this many training points per centroid (it warns below it).
MIN_POINTS_PER_CELL = 39


@dataclass(frozen=True)
class IndexSpec:
    """What a shard index is: the type and its parameters (from ``neighbours.*``)."""
    kind: str = "flat"
    nlist: int = 1024
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self):
        if self.kind not in INDEX_TYPES:
            raise ValueError(f"index type {self.kind!r}: expected one of {INDEX_TYPES}")

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    @staticmethod
    def from_conf(nc) -> "IndexSpec":
        return IndexSpec(kind=nc.index, nlist=nc.nlist, nprobe=nc.nprobe, hnsw_m=nc.hnsw_m,
                         ef_construction=nc.ef_construction, ef_search=nc.ef_search)


def set_threads(n: int) -> None:
    import faiss
    faiss.omp_set_num_threads(max(1, int(n)))


def task_cores(default: int = 1) -> int:
    """The cores of the running Spark task (``spark.task.cpus``), else ``default``."""
    try:
        from pyspark import TaskContext
        ctx = TaskContext.get()
        return max(1, int(ctx.cpus())) if ctx is not None else default
    except Exception:  # noqa: BLE001 - no task context: a plain Python call
        return default


def as_matrix(vectors) -> np.ndarray:
    """float32, C-contiguous [n, d]: what FAISS reads without a copy."""
    return np.ascontiguousarray(vectors, dtype=np.float32)


def effective_nlist(spec: IndexSpec, n_train: int) -> int:
    """``spec.nlist`` capped so that k-means has enough points per cell (small catalogues)."""
    return max(1, min(spec.nlist, n_train // MIN_POINTS_PER_CELL))


def train_coarse(sample: np.ndarray, spec: IndexSpec) -> bytes:
    """An empty, trained ``IndexIVFFlat`` (its coarse quantiser), serialised: every shard
    starts from a copy of it.  ``sample``: the training vectors (a sample of the catalogue)."""
    import faiss
    sample = as_matrix(sample)
    if len(sample) == 0:
        raise ValueError("cannot train an IVF quantiser on zero vectors")
    dim = sample.shape[1]
    quantiser = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantiser, dim, effective_nlist(spec, len(sample)),
                               faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    return faiss.serialize_index(index).tobytes()


def build_index(vectors: np.ndarray, spec: IndexSpec, coarse: bytes | None = None):
    """The index of one shard: its vectors added in row order (FAISS id = local row)."""
    import faiss
    vectors = as_matrix(vectors)
    dim = vectors.shape[1]
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "ivf":
        if coarse is None:
            raise ValueError("an ivf shard needs the shared coarse quantiser (train_coarse)")
        index = faiss.deserialize_index(np.frombuffer(coarse, dtype=np.uint8))
        if index.d != dim:
            raise ValueError(f"coarse quantiser has dimension {index.d}, the shard's vectors {dim}")
    else:
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
    if len(vectors):
        index.add(vectors)
    return index


def exact_view(index):
    """An exact ``IndexFlatIP`` over the same vectors, same row ids (the recall baseline)."""
    import faiss
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return index
    if isinstance(index, faiss.IndexHNSW):
        return faiss.downcast_index(index.storage)
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
        flat = faiss.IndexFlatIP(index.d)
        if index.ntotal:
            flat.add(index.reconstruct_n(0, index.ntotal))
        return flat
    raise TypeError(f"no exact view of {type(index).__name__}")


def _params(index, spec: IndexSpec, k: int, selector):
    import faiss
    kind = type(faiss.downcast_index(index))
    if issubclass(kind, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=spec.nprobe, sel=selector) if selector is not None \
            else faiss.SearchParametersIVF(nprobe=spec.nprobe)
    if issubclass(kind, faiss.IndexHNSW):
        ef = max(spec.ef_search, k)
        return faiss.SearchParametersHNSW(efSearch=ef, sel=selector) if selector is not None \
            else faiss.SearchParametersHNSW(efSearch=ef)
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def search_pair(index, queries: np.ndarray, k: int, spec: IndexSpec,
                excluded: tuple[np.ndarray, np.ndarray] | None = None,
                allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top-``k`` items of one shard.

    ``excluded``: (query rows, item rows), pairs never returned (a user's plays).
    ``allowed``: a bool mask over the shard's items; only those are searched.
    Returns (scores float32 [nq, k], item rows int64 [nq, k]), best first; where fewer
    than k items qualify, the row ends with score -inf and item -1.
    """
    import faiss
    queries = as_matrix(queries)
    nq, n_items = len(queries), index.ntotal
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    rows = np.full((nq, k), -1, dtype=np.int64)
    if nq == 0 or n_items == 0 or k <= 0:
        return scores, rows
    selector, bits = None, None
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if len(allowed) != n_items:
            raise ValueError(f"allowed mask has {len(allowed)} entries for {n_items} items")
        if not allowed.any():
            return scores, rows
        if not allowed.all():
            bits = np.packbits(allowed, bitorder="little")      # kept alive during the search
            selector = faiss.IDSelectorBitmap(n_items, faiss.swig_ptr(bits))
    params = _params(index, spec, k, selector)
    if excluded is not None and len(excluded[0]):
        ex_q = np.asarray(excluded[0], dtype=np.int64)
        ex_i = np.asarray(excluded[1], dtype=np.int64)
        counts = np.bincount(ex_q, minlength=nq)
        # Over-fetch by the excluded count rounded up to a power of two: few FAISS calls.
        extra = np.where(counts > 0, 1 << np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64), 0)
        ex_keys = np.unique(ex_q * n_items + ex_i)
    else:
        extra = np.zeros(nq, dtype=np.int64)
        ex_keys = None
    for more in np.unique(extra):
        members = np.flatnonzero(extra == more)
        fetch = int(min(k + more, n_items))
        got_scores, got_rows = index.search(queries[members], fetch, params=params) if params is not None \
            else index.search(queries[members], fetch)
        valid = got_rows >= 0
        if ex_keys is not None and more > 0:
            keys = members[:, None] * n_items + got_rows
            valid &= ~np.isin(keys, ex_keys)
        # Keep the valid results in their order (stable), drop the rest, keep k.
        order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
        take_valid = np.take_along_axis(valid, order, axis=1)
        width = order.shape[1]
        scores[members, :width] = np.where(take_valid, np.take_along_axis(got_scores, order, axis=1), -np.inf)
        rows[members, :width] = np.where(take_valid, np.take_along_axis(got_rows, order, axis=1), -1)
    return scores, rows
