"""The CNN's training set, built with Spark and materialised as Parquet sized for Petastorm.

Examples are the tracks that have a target: ALS factors (target "factors": the tracks with
usage) or labels (target "labels").  The cold-start tracks of the evaluation protocol are
kept out entirely.  Train/validation is split by track with a deterministic hash, so a
track never moves between the two from one night to the next.  Bad rows (a mel whose bytes
do not match its shape, too short for a crop, wrong band count, non-finite factors, ...)
go to ``train_rejects`` with a reason code.

With ``train.loss = "wpe"`` (van den Oord et al. 2013's weighted prediction error) the
target of a track i is not its unit ALS factor but y*_i = A_i^-1 b_i, with
``A_i = X^T X + sum_{u in P(i)} (c_ui - 1) x_u x_u^T + reg n_i I`` and
``b_i = sum_{u in P(i)} c_ui x_u`` over the published ``user_factors`` X and the track's n_i
listeners P(i) in the fit, so that ``WPE_i(y) + reg n_i ||y||^2 = sum_u c_ui (p_ui - x_u^T y)^2
+ reg n_i ||y||^2 = (y - y*_i)^T A_i (y - y*_i) + const``: Spark ALS's own item objective
(its regularisation scaled by the item's ratings), whose minimiser y*_i is the track's factors
as ALS would solve them from X.  The
examples then also hold ``target_weight``: the Cholesky factor of ``A_i / n_users``
(flattened), and the loss ``||W_i^T (y - y*_i)||^2`` is WPE_i / n_users up to a constant.

The build is skipped when its inputs (table versions + the keys that shape examples) are
those of the committed training set: a resumed training run then sees the same examples.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

from deepcuts.core.config import Config
from deepcuts.core.errors import InputMissing
from deepcuts.nn.model import frames_for_seconds
from deepcuts.core.lake import Lake
from deepcuts.core.runs import run_summary
from deepcuts.core.spark import partitions_for_bytes
from deepcuts.core.tables import (ALL_TABLES, MELS, TRACK_FACTORS, TRAIN_EXAMPLES, TRAIN_REJECTS, USER_FACTORS,
                     VALIDATION_EXAMPLES)

log = logging.getLogger(__name__)

HASH_BUCKETS = 10_000
COLD_HOLDOUT_TABLE = "eval_holdout"   # written by the factors stage when evaluation is on

# Reason codes of train_rejects.
BAD_MEL_BYTES = "bad_mel_bytes"
WRONG_N_MELS = "wrong_n_mels"
WRONG_MEL_FORMAT = "wrong_mel_format"
TOO_SHORT = "too_short_for_crop"
BAD_TARGET = "bad_factors"
NO_MEL = "no_mel"
NO_PLAYS = "no_plays"        # wpe: the track has factors but no plays by a user with factors

# The split of a row of the build (a column of its one shuffled scan, never written).
TRAIN_SPLIT, VALIDATION_SPLIT, REJECTED_SPLIT = "train", "validation", "rejected"

# wpe: ridge added to A_i before Cholesky, relative to its mean eigenvalue (trace / rank).
WPE_RIDGE = 1e-6
# wpe: a listener row's bytes beside its float32 factors (track id, confidence, UnsafeRow headers).
WPE_ROW_OVERHEAD_BYTES = 48


@dataclass(frozen=True)
class TrainingSet:
    """What the training loop needs to know about a committed training set."""
    run_id: str
    train_rows: int
    validation_rows: int
    train_files: list[str]            # filesystem paths (Petastorm, pyarrow)
    validation_files: list[str]
    target: str
    out_dim: int
    n_mels: int
    crop_frames: int
    source_run_id: str                # the track_factors (or mels) run the targets came from
    label_names: list[str]
    fingerprint: str
    summary: dict
    loss: str = "mse"                 # "wpe": examples carry target_weight, targets are raw-scale


def wpe_partitions(ctx, rank: int) -> int:
    """Partitions of the WPE listener shuffle, from the published fit's pair count (the factors
    run's summary; its pairs include the held-out ones, an upper bound) x a listener row's
    bytes: a hit track's listeners are streamed, but 10^9 pairs in a fixed 16 tasks would
    still spill ~10 GB each."""
    run = ctx.version_info(TRACK_FACTORS)
    pairs = run_summary(ctx.lake, run[0]).get("pairs") if run else None
    return partitions_for_bytes(int(pairs or 0) * (4 * rank + WPE_ROW_OVERHEAD_BYTES), ctx.cfg)


def crop_frames_for(cfg: Config) -> int:
    return frames_for_seconds(cfg.train.crop_seconds, cfg.ingest.sample_rate, cfg.ingest.hop_length)


def is_validation_bucket(bucket: int, validation_fraction: float) -> bool:
    """The split rule (as used in Spark): buckets below the fraction are validation."""
    return bucket < int(round(validation_fraction * HASH_BUCKETS))


def inputs_fingerprint(ctx) -> tuple[str, dict]:
    """Everything that shapes the examples: the pinned input table versions ([run id,
    Delta version]) and the relevant keys."""
    cfg = ctx.cfg
    t = cfg.train
    inputs = {
        "mels": ctx.version_info(MELS),
        "track_factors": ctx.version_info(TRACK_FACTORS) if t.target == "factors" else None,
        "eval_holdout": ctx.version_info(ALL_TABLES[COLD_HOLDOUT_TABLE]),
        "target": t.target, "seed": t.seed, "validation_fraction": t.validation_fraction,
        "crop_frames": crop_frames_for(cfg), "n_mels": cfg.ingest.n_mels,
        "sample_rate": cfg.ingest.sample_rate, "hop_length": cfg.ingest.hop_length,
        "label_separator": t.label_separator if t.target == "labels" else None,
        "rows_per_row_group": t.rows_per_row_group, "rows_per_file": t.rows_per_file,
    }
    if uses_wpe(cfg):
        # Only added for wpe, so the fingerprints of existing mse sets stay valid.
        fc = cfg.factors
        inputs.update(loss="wpe", user_factors=ctx.version_info(USER_FACTORS), plays=fc.plays,
                      plays_format=fc.plays_format, alpha=fc.alpha, epsilon=fc.epsilon, wpe_ridge=WPE_RIDGE,
                      reg=fc.reg, wpe_system="als_item")   # y* with reg n_i I, fit pairs only (issue 17)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return digest, inputs


def committed_training_set(lk: Lake, fingerprint: str | None = None) -> TrainingSet | None:
    """The committed training set, if both splits come from one build (and match
    ``fingerprint``).  Its files are the Delta snapshot's file list, never a glob."""
    train_meta = lk.commit_metadata(TRAIN_EXAMPLES.name)
    val_meta = lk.commit_metadata(VALIDATION_EXAMPLES.name)
    if not train_meta or not val_meta or train_meta.get("run_id") != val_meta.get("run_id"):
        return None
    s = train_meta.get("training_set")
    if not s or (fingerprint is not None and s.get("fingerprint") != fingerprint):
        return None
    return TrainingSet(
        run_id=train_meta["run_id"], train_rows=lk.file_stats(TRAIN_EXAMPLES.name)[0],
        validation_rows=lk.file_stats(VALIDATION_EXAMPLES.name)[0],
        train_files=lk.files(TRAIN_EXAMPLES.name),
        validation_files=lk.files(VALIDATION_EXAMPLES.name),
        target=s["target"], out_dim=int(s["out_dim"]), n_mels=int(s["n_mels"]),
        crop_frames=int(s["crop_frames"]), source_run_id=s["source_run_id"],
        label_names=list(s.get("label_names", [])), fingerprint=s["fingerprint"], summary=s,
        loss=s.get("loss", "mse"))


def uses_wpe(cfg: Config) -> bool:
    return cfg.train.target == "factors" and cfg.train.loss == "wpe"


# --- the WPE statistics (pure) ------------------------------------------------------------
def wpe_from_sums(listener_sums: np.ndarray, b: np.ndarray, n: np.ndarray, gram: np.ndarray, reg: float,
                  n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(y*, W) of a stack of k tracks from their listener sums: ``listener_sums`` [k, r, r] =
    sum (c - 1) x x^T, ``b`` [k, r] = sum c x and ``n`` [k] listeners each.

    A = X^T X + listener_sums + reg n I is Spark ALS's own item system (its regularisation is
    scaled by the item's ratings), so y* = A^-1 b is the track's factors as ALS would solve
    them from X.  W is the lower Cholesky factor of A / n_users (+ a tiny ridge).  A track
    whose system is not positive definite (non-finite inputs) gets NaNs (rejected as bad
    factors by the caller)."""
    rank = gram.shape[0]
    eye = np.eye(rank)
    a = gram[None] + listener_sums + eye[None] * (float(reg) * np.asarray(n, dtype=np.float64))[:, None, None]
    trace = np.einsum("kii->k", a) / rank
    a = a + eye[None] * (WPE_RIDGE * np.maximum(np.nan_to_num(trace, nan=1.0), 1e-12))[:, None, None]
    targets = np.full((len(a), rank), np.nan)
    weights = np.full((len(a), rank, rank), np.nan)
    good = np.flatnonzero(np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=1))
    try:   # one batched factorisation; if any track's fails, track by track
        weights[good] = np.linalg.cholesky(a[good])
        targets[good] = np.linalg.solve(a[good], b[good][..., None])[..., 0]
    except np.linalg.LinAlgError:
        for i in good:
            try:
                weights[i], targets[i] = np.linalg.cholesky(a[i]), np.linalg.solve(a[i], b[i])
            except np.linalg.LinAlgError:
                weights[i], targets[i] = np.nan, np.nan
    return targets, weights / np.sqrt(n_users)


def wpe_track_statistics(listener_factors: np.ndarray, confidences: np.ndarray, gram: np.ndarray,
                         n_users: int, reg: float) -> tuple[np.ndarray, np.ndarray]:
    """(y*_i, W_i) of one track from its listeners' factors [n, rank] and confidences c_ui [n]
    (see ``wpe_from_sums``); ``gram`` is X^T X over all ``n_users`` users, ``reg`` = factors.reg."""
    x = np.asarray(listener_factors, dtype=np.float64).reshape(-1, gram.shape[0])
    c = np.asarray(confidences, dtype=np.float64)
    sums = ((x * (c - 1.0)[:, None]).T @ x)[None]
    target, weight = wpe_from_sums(sums, (x.T @ c)[None], np.array([len(x)]), gram, reg, n_users)
    return target[0], weight[0]


def listener_sums(track_ids: np.ndarray, x: np.ndarray, c: np.ndarray,
                  chunk_bytes: int = 16 << 20) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per run of equal ``track_ids`` (rows sorted by track): (ids [k], sum (c-1) x x^T [k, r, r],
    sum c x [k, r], rows [k]).  The outer products are formed a chunk of rows at a time, so
    memory stays at ``chunk_bytes`` whatever the batch size and rank."""
    n_rows, rank = x.shape
    first = np.r_[True, track_ids[1:] != track_ids[:-1]] if n_rows else np.zeros(0, bool)
    segment = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    k = len(starts)
    sums = np.zeros((k, rank, rank))
    weighted = x * (c - 1.0)[:, None]
    step = max(1, chunk_bytes // (8 * rank * rank))
    for lo in range(0, n_rows, step):
        hi = min(n_rows, lo + step)
        outer = np.einsum("ni,nj->nij", weighted[lo:hi], x[lo:hi])
        seg = segment[lo:hi]
        local = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
        sums[seg[local]] += np.add.reduceat(outer, local, axis=0)   # segments are unique per chunk
    b = np.add.reduceat(x * c[:, None], starts, axis=0) if k else np.zeros((0, rank))
    counts = np.diff(np.r_[starts, n_rows])
    return track_ids[starts], sums, b, counts


WPE_SCHEMA = "track_id string, target array<float>, target_weight array<float>, wpe_listeners long"


def wpe_partition(batches, gram: np.ndarray, reg: float, n_users: int):
    """mapInPandas body over (track_id, factors, confidence) rows sorted by track within the
    partition: one output row per track.  A track's rows are streamed (only its running sums
    are carried from one Arrow batch to the next), so a hit track with millions of listeners
    costs no more memory than one with a single listener."""
    import pandas as pd
    carry = None   # (track_id, sums [r, r], b [r], n) of the track the last batch ended in

    def emit(ids, sums, b, n):
        target, weight = wpe_from_sums(sums, b, n, gram, reg, n_users)
        return pd.DataFrame({"track_id": ids, "target": list(target.astype(np.float32)),
                             "target_weight": list(weight.reshape(len(ids), -1).astype(np.float32)),
                             "wpe_listeners": np.asarray(n, dtype=np.int64)})

    def emit_carry():
        track_id, sums, b, n = carry
        return emit(np.array([track_id], dtype=object), sums[None], b[None], np.array([n]))

    for batch in batches:
        if len(batch) == 0:
            continue
        ids, sums, b, n = listener_sums(batch["track_id"].to_numpy(),
                                        np.stack(batch["factors"].to_numpy()).astype(np.float64),
                                        batch["confidence"].to_numpy(dtype=np.float64))
        if carry is not None:
            if ids[0] == carry[0]:
                sums[0] += carry[1]
                b[0] += carry[2]
                n[0] += carry[3]
            else:
                yield emit_carry()
        carry = (ids[-1], sums[-1], b[-1], n[-1])
        if len(ids) > 1:
            yield emit(ids[:-1], sums[:-1], b[:-1], n[:-1])
    if carry is not None:
        yield emit_carry()


def partial_gram(batches):
    """mapInPandas over (factors): one row per partition with its X^T X (flattened) and row count."""
    import pandas as pd
    gram, rows = None, 0
    for batch in batches:
        if len(batch) == 0:
            continue
        x = np.stack(batch["factors"].to_numpy()).astype(np.float64)
        gram = x.T @ x if gram is None else gram + x.T @ x
        rows += len(x)
    if gram is not None:
        yield pd.DataFrame({"gram": [gram.ravel()], "n": [rows]})


def wpe_statistics_frame(ctx, track_ids_df):
    """(track_id, target, target_weight, wpe_listeners) for the tracks of ``track_ids_df``,
    plus {"n_users", "rank"}.  The plays are those the published fit was trained on
    (:func:`deepcuts.cf.blend.fit_pairs`: the factors stage's reading, minus the pairs it held
    out, so no evaluation play becomes a target).  The listener rows are hashed to
    partitions by track and streamed in track order (``wpe_partition``): no per-track pandas
    frame, only X^T X (rank^2 numbers) reaches the driver."""
    from pyspark.sql import functions as F
    from deepcuts.cf.blend import fit_pairs, user_gram
    from deepcuts.cf.plays import rating_column
    from deepcuts.core.tables import EVAL_HOLDOUT
    spark, fc = ctx.spark, ctx.cfg.factors
    users = ctx.read(USER_FACTORS).select("user_id", "factors")
    gram, n_users = user_gram(users)  # gram is shipped to executors inside the closure: rank^2 doubles
    reg = float(fc.reg)
    holdout = ctx.read(EVAL_HOLDOUT) if ctx.exists(EVAL_HOLDOUT) else None
    listened = (fit_pairs(spark, fc, holdout).join(track_ids_df.select("track_id").distinct(), "track_id", "left_semi")
                .join(users, "user_id")
                .select("track_id", F.col("factors").cast("array<float>"),
                        (1.0 + F.lit(float(fc.alpha)) * rating_column(F.col("plays"), fc.epsilon))
                        .alias("confidence")))

    def body(batches):
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        yield from wpe_partition(batches, gram, reg, n_users)

    stats = (listened.repartition(wpe_partitions(ctx, gram.shape[0]), "track_id").sortWithinPartitions("track_id")
             .mapInPandas(body, WPE_SCHEMA))
    return stats, {"n_users": n_users, "rank": gram.shape[0], "reg": reg}


def build_training_set(ctx) -> TrainingSet:
    """Join, split, reject and materialise; reuse the committed set when its inputs are unchanged."""
    persisted: list = []
    try:
        return _build_training_set(ctx, persisted)
    finally:
        for df in persisted:
            df.unpersist()


def _build_training_set(ctx, persisted: list) -> TrainingSet:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from deepcuts.core.spark import arrow_batches

    spark, cfg, run_id = ctx.spark, ctx.cfg, ctx.run_id
    t = cfg.train
    fingerprint, inputs = inputs_fingerprint(ctx)
    existing = committed_training_set(ctx.lake, fingerprint)
    if existing is not None:
        log.info("training set %s is up to date with its inputs: reused", existing.run_id)
        return existing
    if inputs["mels"] is None:
        raise InputMissing("table mels is empty: run the ingest stage first")
    crop_frames = crop_frames_for(cfg)
    n_mels = cfg.ingest.n_mels

    mels = ctx.read(MELS).select(
        "track_id", "mel", "n_mels", "n_frames", "sample_rate", "hop_length", "labels", "ingest_run_id")
    reason = (F.when(F.length("mel") != F.col("n_mels") * F.col("n_frames") * 2, F.lit(BAD_MEL_BYTES))
              .when(F.col("n_mels") != n_mels, F.lit(WRONG_N_MELS))
              .when((F.col("sample_rate") != cfg.ingest.sample_rate)
                    | (F.col("hop_length") != cfg.ingest.hop_length), F.lit(WRONG_MEL_FORMAT))
              .when(F.col("n_frames") < crop_frames, F.lit(TOO_SHORT)))
    detail = F.format_string("%d bytes, %d x %d frames, %d Hz, hop %d; crop needs %d frames",
                             F.length("mel"), F.col("n_mels"), F.col("n_frames"), F.col("sample_rate"),
                             F.col("hop_length"), F.lit(crop_frames))
    mels = mels.withColumn("reason", reason).withColumn("detail", detail)

    # Mel bytes from two columns (no mel read) size the one shuffle below: 10^7 tracks of 30 s
    # mels are ~3.3 TB, and a fixed partition count would put gigabytes in each task.
    size = ctx.read(MELS).select(F.sum(F.col("n_mels") * F.col("n_frames") * 2).alias("bytes"),
                                 F.count("*").alias("rows")).first()
    avg_bytes = (size["bytes"] or 0) / max(1, size["rows"])
    parts = partitions_for_bytes(size["bytes"] or 0, cfg)

    cold_tracks = None
    if inputs["eval_holdout"] is not None and COLD_HOLDOUT_TABLE in ALL_TABLES:
        cold_tracks = (ctx.read(ALL_TABLES[COLD_HOLDOUT_TABLE])
                       .where(F.col("split") == "cold").select("track_id").distinct())

    label_names: list[str] = []
    if t.target == "factors":
        if inputs["track_factors"] is None:
            raise InputMissing("table track_factors is empty: run the factors stage first "
                               "(or set train.target = \"labels\")")
        source_run_id = inputs["track_factors"][0]
        factors = ctx.read(TRACK_FACTORS).select(
            "track_id", F.col("factors_unit").alias("target"))
        if cold_tracks is not None:
            factors = factors.join(cold_tracks, "track_id", "left_anti")
        if uses_wpe(cfg):
            # The WPE target y*_i replaces the unit factors; target_weight carries A_i's factor.
            wpe_stats, wpe_info = wpe_statistics_frame(ctx, factors)
            wpe_stats = wpe_stats.persist()
            persisted.append(wpe_stats)
            with arrow_batches(spark, cfg, "vector"):   # play pairs: large Arrow batches
                wpe_stats.count()
            factors = factors.select("track_id").join(wpe_stats, "track_id", "left")
            no_plays = F.col("wpe_listeners").isNull()
        else:
            wpe_info = None
            factors = factors.withColumn("target_weight", F.lit(None).cast("array<float>"))
            no_plays = F.lit(False)
        finite = F.forall("target", lambda x: ~F.isnan(x) & (F.abs(x) < float("inf")))
        finite_weight = F.coalesce(F.forall("target_weight", lambda x: ~F.isnan(x) & (F.abs(x) < float("inf"))),
                                   F.lit(True))
        factors = factors.withColumn(
            "target_reason", F.when(no_plays, F.lit(NO_PLAYS))
            .when(F.col("target").isNull() | (F.size("target") == 0) | ~finite | ~finite_weight,
                  F.lit(BAD_TARGET)))
        # Both sides hashed by track_id into the byte-sized partition count: the join needs no
        # shuffle of its own, so the mel bytes move once (this is also the final layout).
        joined = (factors.repartition(parts, "track_id")
                  .join(mels.repartition(parts, "track_id"), "track_id", "left"))
        if wpe_info is not None:
            out_dim = wpe_info["rank"]
        else:
            out_dim_row = factors.where(F.col("target_reason").isNull()).select(F.size("target")).first()
            out_dim = int(out_dim_row[0]) if out_dim_row else 0
        joined = joined.withColumn("reason", F.coalesce(
            F.when(F.col("mel").isNull(), F.lit(NO_MEL)), F.col("target_reason"),
            F.when(F.size("target") != out_dim, F.lit(BAD_TARGET)), F.col("reason")))
        joined = joined.withColumn("detail", F.when(F.col("reason") == NO_MEL,
                                                    F.lit("track has factors but no mel"))
                                   .when(F.col("reason") == NO_PLAYS,
                                         F.lit("track has factors but no plays by a user with factors "
                                               "(factors.plays changed since the factors run?)"))
                                   .when(F.col("reason") == BAD_TARGET,
                                         F.lit(f"factors must be {out_dim} finite values"))
                                   .otherwise(F.col("detail")))
    else:
        if cold_tracks is not None:
            mels = mels.join(cold_tracks, "track_id", "left_anti")
        sep = t.label_separator
        split_labels = F.filter(F.transform(F.split("labels", _regex_literal(sep)), F.trim),
                                lambda x: F.length(x) > 0)
        mels = mels.where(F.col("labels").isNotNull()).withColumn("label_list", split_labels) \
                   .where(F.size("label_list") > 0)
        label_names = sorted(r[0] for r in mels.where(F.col("reason").isNull())
                             .select(F.explode("label_list")).distinct().collect())
        if not label_names:
            raise InputMissing("train.target = \"labels\" but no valid mel has labels")
        out_dim = len(label_names)
        vocab = F.array(*[F.lit(n) for n in label_names])
        multi_hot = F.transform(vocab, lambda name: F.array_contains("label_list", name).cast("float"))
        joined = mels.repartition(parts, "track_id").withColumn("target", multi_hot) \
                     .withColumn("target_weight", F.lit(None).cast("array<float>"))
        wpe_info = None
        source_run_id = inputs["mels"][0]

    # One scan of the join: every row gets its split (rejects drop their mel bytes); the join's
    # hash partitions are sorted by a seeded hash (row groups get mixed tracks) and kept on the
    # executors' disks; the three writes only filter them.
    bucket = F.pmod(F.xxhash64(F.lit(str(t.seed)), F.col("track_id")), F.lit(HASH_BUCKETS))
    is_validation = bucket < F.lit(int(round(t.validation_fraction * HASH_BUCKETS)))
    split = (F.when(F.col("reason").isNotNull(), F.lit(REJECTED_SPLIT))
             .when(is_validation, F.lit(VALIDATION_SPLIT)).otherwise(F.lit(TRAIN_SPLIT)))
    order = F.xxhash64(F.col("track_id"), F.lit(t.seed + 1))
    staged = (joined.withColumn("split", split)
              .withColumn("mel", F.when(F.col("split") != REJECTED_SPLIT, F.col("mel")))
              .withColumn("source_run_id", F.lit(source_run_id)).withColumn("run_id", F.lit(run_id))
              .sortWithinPartitions(order)
              .persist(StorageLevel.DISK_ONLY))
    persisted.append(staged)

    def write(table, name):
        return ctx.write(staged.where(F.col("split") == name), table, metadata={"training_set": snapshot_summary},
                         rows_per_file=t.rows_per_file, row_group_rows=t.rows_per_row_group,
                         row_bytes=int(avg_bytes or 1))

    rejects = staged.where(F.col("split") == REJECTED_SPLIT).select(
        "track_id", "reason", "detail", F.lit(run_id).alias("run_id"))
    # One file of a few rows; repartition, not coalesce: coalesce(1) would run the whole
    # factors x mels join (the mel bytes) in a single task.
    reject_committed = ctx.write(rejects.repartition(1), TRAIN_REJECTS)
    reject_counts = {r["reason"]: r["count"] for r in
                     ctx.read(TRAIN_REJECTS).groupBy("reason").count().collect()}
    snapshot_summary = {"fingerprint": fingerprint, "inputs": inputs, "target": t.target,
                        "out_dim": out_dim, "n_mels": n_mels, "crop_frames": crop_frames,
                        "source_run_id": source_run_id, "label_names": label_names,
                        "rejects": reject_counts, "rejects_total": reject_committed.rows,
                        "loss": "wpe" if wpe_info else "mse"}
    if wpe_info:
        # target_weight = chol(A_i) / sqrt(n_users): the loss is WPE per user (see module docstring).
        snapshot_summary["wpe"] = {**wpe_info, "loss_scale": f"1/{wpe_info['n_users']} (1/n_users)",
                                   "alpha": cfg.factors.alpha, "epsilon": cfg.factors.epsilon}
    write(TRAIN_EXAMPLES, TRAIN_SPLIT)
    write(VALIDATION_EXAMPLES, VALIDATION_SPLIT)
    built = committed_training_set(ctx.lake, fingerprint)
    if built is None:
        raise RuntimeError("training set was written but its two splits do not match; "
                           "another train job may be running against this warehouse")
    if built.train_rows == 0:
        # e.g. a catalogue where every track is cold: no ingested track has ALS factors yet
        raise InputMissing(f"the training set is empty: no usable mel of a track with factors (rejects: "
                           f"{reject_counts or 'none'}); no model was trained")
    log.info("training set %s: %d train, %d validation, rejects %s", run_id, built.train_rows,
             built.validation_rows, reject_counts)
    return built


def _regex_literal(text: str) -> str:
    import re
    return re.escape(text)
