"""``python -m deepcuts similar FILE [FILE...] [--k K] [--json]``: query the catalogue by audio.

Each file is decoded and turned into a log-mel exactly as ``ingest`` does (``featurise`` with
``[ingest]``), scored by the model the persisted indexes were built with, exactly as ``infer``
does (``score_mel_table`` with ``[infer]``: same excerpt, float16 mel, scoring and precision),
unit-normalised, and searched against every shard of the latest published index set
(``indexes/LATEST``; ``sounds_like`` by default: the model's own space, so a catalogue
track's own file finds itself first).  Index files are checked against their manifest's
sha256 before use.  Works for files that are not in the catalogue (Liapatis et al. 2024).
No Spark: the indexes are plain FAISS files.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from deepcuts.knn import persist
from deepcuts.knn.merge import merge_topk
from deepcuts.knn.search import IndexSpec, search_pair

INDEX_NAMES = ("sounds_like", "similar_tracks")


class QueryError(RuntimeError):
    """Nothing to search: no published index, or no model to embed the query with."""


def embed_files(cfg, artifact, paths: Sequence[str]) -> tuple[list[np.ndarray | None], list[str | None]]:
    """(vector or None, error or None) per file, through ingest's and infer's own functions."""
    import pyarrow as pa
    from deepcuts.audio.decode import MelParams, RejectedAudio, featurise, mel_to_bytes, suffix_of
    from deepcuts.core.storage import read_bytes
    # The infer stage's per-batch scorer: the query must be embedded exactly like the catalogue.
    from deepcuts.stages.infer import MEL_INPUT_SCHEMA, score_mel_table
    params = MelParams.from_conf(cfg.ingest)
    vectors, errors = [], []
    for path in paths:
        data = read_bytes(path)
        if data is None:
            vectors.append(None)
            errors.append("file not found")
            continue
        try:
            features = featurise(data, params, suffix_of(path))
        except RejectedAudio as exc:
            vectors.append(None)
            errors.append(f"{exc.reason}: {exc.detail}")
            continue
        mel = features.mel
        row = {"track_id": path, "fingerprint": "query", "mel": mel_to_bytes(mel), "n_mels": mel.shape[0],
               "n_frames": mel.shape[1], "sample_rate": params.sample_rate, "hop_length": params.hop_length}
        scored = score_mel_table(pa.Table.from_pylist([row], schema=MEL_INPUT_SCHEMA), artifact,
                                 cfg.infer.scoring, cfg.infer.window_seconds, cfg.infer.batch_size)
        first = scored.iloc[0]
        if first["reason"] is not None:
            vectors.append(None)
            errors.append(f"{first['reason']}: {first['detail']}")
        else:
            vectors.append(np.asarray(first["factors"], dtype=np.float32))
            errors.append(None)
    return vectors, errors


def search_index(root: str, name: str, queries: np.ndarray, k: int, run_id: str | None = None) -> list[list[dict]]:
    """The top-``k`` catalogue tracks of each (unit) query vector over every shard of the
    published index set ``name``: [{rank, track_id, score, source, labels}] per query."""
    run_id = run_id or persist.latest_run(root)
    if run_id is None:
        raise QueryError(f"no published neighbour indexes under {persist.indexes_root(root)}: "
                         "run the neighbours stage first")
    folder = persist.index_dir(root, run_id, name)
    manifest = persist.read_manifest(folder)
    spec = IndexSpec(**manifest["spec"])
    q_all, id_all, s_all, payload = [], [], [], []
    for entry in manifest["shards"]:
        index, ids = persist.read_shard(folder, entry)
        scores, rows = search_pair(index, queries, k, spec)
        valid = rows >= 0
        q_all.append(np.nonzero(valid)[0])
        id_all.append(np.asarray(ids.column("id").to_pylist(), dtype=object)[rows[valid]])
        s_all.append(scores[valid])
        extra = ids.select([c for c in ("source", "labels") if c in ids.column_names]).to_pylist()
        payload.extend(extra[r] for r in rows[valid])
    if not q_all:
        return [[] for _ in range(len(queries))]
    q, rank, neighbour, score, pos = merge_topk(np.concatenate(q_all), np.concatenate(id_all),
                                                np.concatenate(s_all), k)
    out: list[list[dict]] = [[] for _ in range(len(queries))]
    for i, r, n, s, p in zip(q, rank, neighbour, score, pos):
        out[i].append({"rank": int(r), "track_id": n, "score": round(float(s), 6), **payload[p]})
    return out


def query_files(cfg, paths: Sequence[str], k: int, name: str = "sounds_like") -> list[dict]:
    """One result per file: {file, neighbours: [...]} or {file, error}."""
    from deepcuts.core.lake import lake
    from deepcuts.nn.model import latest_model_id, load_artifact, model_dir
    lk = lake(cfg)
    root = lk.path()
    run_id = persist.latest_run(root)
    if run_id is None:
        raise QueryError(f"no published neighbour indexes under {persist.indexes_root(root)}: "
                         "run the neighbours stage first")
    manifest = persist.read_manifest(persist.index_dir(root, run_id, name))
    model_id = manifest.get("model_id") or latest_model_id(lk)
    if not model_id:
        raise QueryError("the indexes name no model and there is no trained model: run train and infer")
    artifact = load_artifact(model_dir(lk, model_id), precision=cfg.infer.precision)
    vectors, errors = embed_files(cfg, artifact, paths)
    good = [i for i, v in enumerate(vectors) if v is not None]
    results = [{"file": p, "error": e} if e else {"file": p} for p, e in zip(paths, errors)]
    if good:
        x = np.stack([vectors[i] for i in good]).astype(np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)
        found = search_index(root, name, x, k, run_id)
        for i, neighbours in zip(good, found):
            results[i].update({"model_id": model_id, "index": name, "index_run": run_id,
                               "neighbours": neighbours})
    return results


def format_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(r["file"])
        if "error" in r:
            lines.append(f"  error: {r['error']}")
            continue
        for n in r["neighbours"]:
            labels = n.get("labels") or ""
            lines.append(f"  {n['rank']:>3}  {n['score']:+.4f}  {n['track_id']}  "
                         f"[{n.get('source', '')}]  {labels}")
    return "\n".join(lines)


def similar_main(argv: Sequence[str] | None = None) -> int:
    """The ``similar`` command; exit 0, 1 if a file could not be queried, 2 on a config error."""
    from deepcuts.core.cli import add_config_args, config_from_args
    from deepcuts.core.config import ConfigError
    p = argparse.ArgumentParser(prog="deepcuts similar",
                                description="the catalogue tracks that sound most like each audio FILE")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (local paths or s3://)")
    p.add_argument("--k", type=int, default=None, help="neighbours per file (default: neighbours.k)")
    p.add_argument("--index", choices=INDEX_NAMES, default=INDEX_NAMES[0],
                   help="sounds_like: audio content only (default); similar_tracks: the serving space")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"deepcuts similar: configuration error: {exc}", file=sys.stderr)
        return 2
    k = args.k if args.k is not None else cfg.neighbours.k
    if k < 1:
        print("deepcuts similar: --k must be >= 1", file=sys.stderr)
        return 2
    try:
        results = query_files(cfg, args.files, k, args.index)
    except (QueryError, persist.IndexFileError) as exc:
        print(f"deepcuts similar: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=1) if args.json else format_text(results))
    return 1 if any("error" in r for r in results) else 0
