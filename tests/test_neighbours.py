"""The neighbours stage on Delta tables: similar tracks, sounds-like, recommendations with
seen-item filtering, the recall gate, metrics, rejects and the persisted indexes."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

faiss = pytest.importorskip("faiss")

from conftest import make_config, write_arrow  # noqa: E402
from deepcuts.core import lake as lakeio  # noqa: E402
from deepcuts.core import tables as T  # noqa: E402
from deepcuts.core.registry import stage  # noqa: E402
from deepcuts.knn import persist  # noqa: E402
from deepcuts.knn.recall import RecallTooLow  # noqa: E402
from deepcuts.stages import neighbours  # noqa: E402

# Every test but the last runs the whole stage on Delta tables (a minute or more on 2 cores).
pytestmark = pytest.mark.spark
slow = pytest.mark.slow

DIM = 8
N_TRACKS = 300
N_USERS = 60
K = 5
TOP_N = 6


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def world(seed: int = 0):
    """A synthetic catalogue: clustered ALS-scale track vectors, half served from audio,
    predicted vectors for every track, users, and the plays of each user."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, DIM)) * 2
    style = rng.integers(0, 5, N_TRACKS)
    serving = (centres[style] + rng.standard_normal((N_TRACKS, DIM))).astype(np.float32)
    predicted = (centres[style] + 0.8 * rng.standard_normal((N_TRACKS, DIM))).astype(np.float32)
    ids = np.array([f"track-{i:04d}" for i in range(N_TRACKS)], dtype=object)
    sources = np.where(rng.random(N_TRACKS) < 0.5, "audio", "usage")
    users = np.array([f"user-{u:03d}" for u in range(N_USERS)], dtype=object)
    ux = (centres[rng.integers(0, 5, N_USERS)] + rng.standard_normal((N_USERS, DIM))).astype(np.float32)
    scores = ux @ serving.T
    plays = []
    for u in range(N_USERS):
        # the user's own favourites, the hardest items to filter, and a few at random
        liked = list(np.argsort(-scores[u])[: int(rng.integers(1, 25))]) + list(rng.choice(N_TRACKS, 5))
        plays += [(users[u], ids[t], float(rng.integers(1, 9))) for t in set(liked)]
    return {"ids": ids, "serving": serving, "sources": sources, "predicted": predicted, "users": users,
            "ux": ux, "plays": pd.DataFrame(plays, columns=["user_id", "track_id", "plays"]),
            "labels": np.array([f"style{s}" for s in style], dtype=object)}


def write_inputs(spark, cfg, w, bad_rows: bool = True, only_serving: bool = False):
    serving = pd.DataFrame({"track_id": w["ids"], "factors": [v.tolist() for v in w["serving"]],
                            "source": w["sources"],
                            "model_id": np.where(w["sources"] == "audio", "model-1", None), "run_id": "infer-0"})
    if bad_rows:
        serving = pd.concat([serving, pd.DataFrame({
            "track_id": ["bad-nan", "bad-dim", "bad-zero"],
            "factors": [[float("nan")] * DIM, [1.0] * (DIM + 1), [0.0] * DIM],
            "source": ["audio"] * 3, "model_id": ["model-1"] * 3, "run_id": ["infer-0"] * 3})])
    predicted = pd.DataFrame({"track_id": w["ids"], "factors": [v.tolist() for v in w["predicted"]],
                              "fingerprint": "fp", "model_id": "model-1", "run_id": "infer-0"})
    users = pd.DataFrame({"user_id": w["users"], "factors": [v.tolist() for v in w["ux"]],
                          "n_plays": 1, "n_tracks": 1, "run_id": "factors-0"})
    mels = pd.DataFrame({"track_id": w["ids"], "mel": [b"\0\0"] * N_TRACKS, "n_mels": 1, "n_frames": 1,
                         "sample_rate": 22050, "hop_length": 512, "excerpt_offset_s": 0.0, "duration_s": 1.0,
                         "fingerprint": "fp", "source_uri": "file:///x", "source_size": 1, "source_version": "1",
                         "labels": w["labels"], "ingest_run_id": "ingest-0"})
    inputs = ((T.SERVING_FACTORS, serving), (T.PREDICTED_FACTORS, predicted), (T.USER_FACTORS, users),
              (T.MELS, mels))
    for table, pdf in inputs[:1] if only_serving else inputs:
        # delta-rs, no Spark write: columns the frame lacks (nullable, added later) are null
        given = pa.schema([f for f in table.schema if f.name in pdf.columns])
        write_arrow(cfg, table, pa.Table.from_pandas(pdf[given.names], schema=given, preserve_index=False))
    os.makedirs(os.path.dirname(cfg.factors.plays), exist_ok=True)
    w["plays"].to_parquet(cfg.factors.plays)


def context(spark, cfg, run_id: str):
    from deepcuts.core.runs import StageRun
    return StageRun(spark, cfg, stage("neighbours"), run_id)


def stage_config(tmp_path, **settings):
    base = {"neighbours.k": K, "neighbours.top_n": TOP_N, "neighbours.shards": 3, "neighbours.blocks": 2,
            "spark.shuffle_partitions": 4}
    base.update(settings)
    return make_config(tmp_path, **{k.replace(".", "__"): v for k, v in base.items()})


def reference_similar(ids, x, k):
    v = unit(x).astype(np.float32)
    index = faiss.IndexFlatIP(DIM)
    index.add(v)
    scores, rows = index.search(v, k + 1)
    return {ids[q]: [ids[r] for r in rows[q] if r != q][:k] for q in range(len(ids))}


@pytest.fixture(scope="module")
def flat_run(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("neighbours-flat")
    cfg = stage_config(tmp)
    w = world()
    write_inputs(spark, cfg, w)
    summary = neighbours.run(context(spark, cfg, "neighbours-run-1"))
    lk = lakeio.lake(cfg)
    tables = {t.name: lakeio.read_pandas(lk, t.name) for t in stage("neighbours").writes}
    return {"cfg": cfg, "w": w, "summary": summary, "tables": tables, "lk": lk}


@slow
def test_similar_tracks_equal_single_process_exact_search(flat_run):
    sim = flat_run["tables"]["similar_tracks"]
    w = flat_run["w"]
    assert len(sim) == N_TRACKS * K and not (sim["track_id"] == sim["neighbour_id"]).any()
    got = {q: list(g.sort_values("rank")["neighbour_id"]) for q, g in sim.groupby("track_id")}
    want = reference_similar(w["ids"], w["serving"], K)
    agree = np.mean([got[q] == want[q] for q in want])
    assert agree > 0.98                                   # ties aside
    assert all(sorted(g) == list(range(1, K + 1)) for _, g in sim.groupby("track_id")["rank"])
    source = dict(zip(w["ids"], w["sources"]))
    assert (sim["neighbour_source"] == sim["neighbour_id"].map(source)).all()
    assert (sim["track_source"] == sim["track_id"].map(source)).all()
    assert set(sim["model_id"]) == {"model-1"} and set(sim["run_id"]) == {"neighbours-run-1"}
    assert sim["score"].between(-1.0001, 1.0001).all()


@slow
def test_sounds_like_uses_the_audio_vectors_alone(flat_run):
    snd = flat_run["tables"]["sounds_like"]
    w = flat_run["w"]
    got = {q: list(g.sort_values("rank")["neighbour_id"]) for q, g in snd.groupby("track_id")}
    want = reference_similar(w["ids"], w["predicted"], K)
    assert np.mean([got[q] == want[q] for q in want]) > 0.98
    assert set(snd["track_source"]) == set(snd["neighbour_source"]) == {"audio"}


@slow
def test_recommendations_never_hold_a_played_track_and_cold_is_audio_only(flat_run):
    recs = flat_run["tables"]["user_recommendations"]
    w = flat_run["w"]
    played = set(zip(w["plays"]["user_id"], w["plays"]["track_id"]))
    assert not any((u, t) in played for u, t in zip(recs["user_id"], recs["track_id"]))
    assert set(recs["list"]) == {"all", "cold"}
    assert len(recs) == 2 * N_USERS * TOP_N
    cold = recs[recs["list"] == "cold"]
    source = dict(zip(w["ids"], w["sources"]))
    assert (cold["track_id"].map(source) == "audio").all() and (cold["source"] == "audio").all()
    # exactly the best unplayed tracks by raw inner product
    scores = w["ux"] @ w["serving"].T
    pos = {t: i for i, t in enumerate(w["ids"])}
    banned = np.zeros_like(scores, dtype=bool)
    for u, t in played:
        banned[int(u.split("-")[1]), pos[t]] = True
    for name, allowed in (("all", np.ones(N_TRACKS, bool)), ("cold", w["sources"] == "audio")):
        want = np.sort(np.where(banned | ~allowed, -np.inf, scores), axis=1)[:, ::-1][:, :TOP_N]
        got = recs[recs["list"] == name].sort_values(["user_id", "rank"])["score"].to_numpy()
        np.testing.assert_allclose(got.reshape(N_USERS, TOP_N), want, rtol=1e-4, atol=1e-4)


@slow
def test_metrics_rejects_and_summary(flat_run):
    m = flat_run["tables"]["neighbour_metrics"]
    assert set(zip(m["table"], m["list"])) == {("similar_tracks", "all"), ("sounds_like", "all"),
                                               ("user_recommendations", "all"), ("user_recommendations", "cold")}
    assert (m["recall_at_k"] == 1.0).all() and (m["index_type"] == "flat").all()
    assert (m["shards"] == 3).all() and (m["blocks"] == 2).all()
    recs_all = m[(m["table"] == "user_recommendations") & (m["list"] == "all")].iloc[0]
    recs = flat_run["tables"]["user_recommendations"]
    share = (recs[recs["list"] == "all"]["source"] == "audio").mean()
    assert recs_all["audio_share"] == pytest.approx(share)
    s = flat_run["summary"]
    assert s["audio_share_in_all_recommendations"] == pytest.approx(share, abs=1e-4)
    assert s["tracks"] == N_TRACKS and s["users"] == N_USERS
    rejects = flat_run["tables"]["neighbour_rejects"]
    assert dict(zip(rejects["id"], rejects["reason"])) == {
        "bad-nan": "non_finite", "bad-dim": "bad_dimension", "bad-zero": "zero_vector"}
    assert s["rejected"] == {"non_finite": 1, "bad_dimension": 1, "zero_vector": 1}


@slow
def test_indexes_are_published_with_checksums_and_staging_is_gone(flat_run):
    root = flat_run["lk"].path()
    assert persist.latest_run(root) == "neighbours-run-1"
    for name in ("similar_tracks", "sounds_like"):
        folder = persist.index_dir(root, "neighbours-run-1", name)
        manifest = persist.read_manifest(folder)
        assert manifest["rows"] == N_TRACKS and len(manifest["shards"]) == 3
        assert manifest["model_id"] == "model-1"
        _, ids = persist.read_shard(folder, manifest["shards"][0])
        assert set(ids.column_names) == {"id", "source", "labels"}
        assert all(label.startswith("style") for label in ids.column("labels").to_pylist())
    assert not os.path.exists(flat_run["lk"].path("_staging", "neighbours", "neighbours-run-1"))
    assert not os.path.exists(os.path.join(persist.indexes_root(root), "neighbours-run-1",
                                           "user_recommendations"))


@slow
def test_a_rerun_writes_the_same_tables(spark, flat_run):
    neighbours.run(context(spark, flat_run["cfg"], "neighbours-run-2"))
    lk = flat_run["lk"]
    for name, key in (("similar_tracks", ["track_id", "rank"]),
                      ("user_recommendations", ["user_id", "list", "rank"])):
        before = flat_run["tables"][name].drop(columns="run_id").sort_values(key).reset_index(drop=True)
        after = lakeio.read_pandas(lk, name).drop(columns="run_id").sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(before, after)
    assert persist.latest_run(lk.path()) == "neighbours-run-2"
    assert len(lakeio.read_pandas(lk, "neighbour_metrics")) == 8        # appended


@slow
def test_approximate_recall_is_what_the_metrics_report(spark, tmp_path):
    cfg = stage_config(tmp_path, **{"neighbours.index": "hnsw", "neighbours.hnsw_m": 4,
                                    "neighbours.ef_construction": 8, "neighbours.ef_search": 4,
                                    "neighbours.recall_sample": 10_000, "neighbours.min_recall": 0.0,
                                    "neighbours.sounds_like": False, "neighbours.recommendations": False})
    w = world(seed=1)
    write_inputs(spark, cfg, w, bad_rows=False, only_serving=True)
    neighbours.run(context(spark, cfg, "neighbours-hnsw"))
    lk = lakeio.lake(cfg)
    sim = lakeio.read_pandas(lk, "similar_tracks")
    got = {q: set(g["neighbour_id"]) for q, g in sim.groupby("track_id")}
    want = reference_similar(w["ids"], w["serving"], K)
    recall = sum(len(got[q] & set(want[q])) for q in want) / (K * len(want))
    m = lakeio.read_pandas(lk, "neighbour_metrics").iloc[0]
    assert m["index_type"] == "hnsw" and m["n_queries_sampled"] == N_TRACKS
    assert m["recall_at_k"] == pytest.approx(recall, abs=0.005)       # ties aside
    assert m["recall_at_k"] < 1.0                                        # it really is approximate


@slow
def test_recall_under_the_floor_fails_and_publishes_nothing(spark, tmp_path):
    cfg = stage_config(tmp_path, **{"neighbours.index": "ivf", "neighbours.nlist": 16, "neighbours.nprobe": 1,
                                    "neighbours.recall_sample": 200, "neighbours.min_recall": 0.99,
                                    "neighbours.sounds_like": False, "neighbours.recommendations": False})
    write_inputs(spark, cfg, world(seed=2), bad_rows=False, only_serving=True)
    with pytest.raises(RecallTooLow, match=r"similar_tracks \(all list, ivf index\): recall@k 0\.\d+ is below"):
        neighbours.run(context(spark, cfg, "neighbours-ivf"))
    lk = lakeio.lake(cfg)
    for t in stage("neighbours").writes:
        assert not lk.exists(t.name)
    assert persist.latest_run(lk.path()) is None
    assert not os.path.exists(os.path.join(persist.indexes_root(lk.path()), "neighbours-ivf"))


def test_no_serving_factors_is_a_clear_error(spark, tmp_path):
    cfg = stage_config(tmp_path)
    with pytest.raises(neighbours.NoVectors, match="run the infer stage first"):
        neighbours.run(context(spark, cfg, "neighbours-empty"))
