"""The evaluate stage: one table, ``evaluation_results``, with every predictor of the paper's
comparison (van den Oord et al. 2013, Table 2) scored on the same users and candidates.

Predictors (``evaluate.predictors``):

* ``random``: gaussian track vectors (a function of the track id), the floor;
* ``baseline``: the MFCC bag-of-words regression (``baseline_factors``, the baseline stage);
* ``cnn``: the model's predictions (``evaluate.model``, else ``infer.model``, else the latest):
  its ``predicted_factors`` rows where they match the current mels, the rest scored here;
* ``metadata`` (cold split only): as infer serves a track without plays, the CNN's vector in
  the ALS space blended with its album's / artist's warm tracks where ``track_metadata`` has
  one (:mod:`deepcuts.cf.metadata`; weights fitted on the validation tracks, so the
  validation split cannot score it); its own row, never the CNN's figure;
* ``upper_bound``: cold split: WMF on all plays (``upper_bound_factors``, from the factors
  stage of the same run as ``user_factors``: vectors of two fits are never mixed);
  validation split: the published ALS vectors of those tracks, which were fitted on these
  very plays (an in-sample ceiling).

Splits (``evaluate.splits``), each a shared :class:`~deepcuts.evaluation.runner.Population`:

* ``cold`` (the test split, reported, never tuned on): the plays of ``eval_holdout``; the
  candidates are its tracks that have a mel; pairs of tracks without one are
  ``n_positives_without_vector``.
* ``validation`` (where defaults are chosen, e.g. ``infer.scoring``): the CNN's validation
  tracks (``validation_examples``; the baseline keeps them out of its fit too) ranked for
  the users who played them, positives from the play counts (read and validated as the
  factors stage reads them).

* ``sparse_warm`` (test) and ``sparse_warm_validation`` (where ``infer.blend_prior_strength``
  is chosen, ``bench/blend_prior.py``): tracks that kept only 1..5 listeners in the published
  fit (the factors stage's sparse-warm protocol), ranked for the users of their held-out plays
  (the kept listeners' pairs are excluded from candidates); predictors ``usage`` (published
  ALS), ``audio`` (the CNN in the ALS space, as infer serves it), ``threshold``
  (``infer.min_listeners_for_usage``) and ``blend`` (:mod:`deepcuts.cf.blend`).

Users: the published ``user_factors`` users with a positive, hash-sampled to
``factors.eval_max_users`` (``eval_seed``), the same for every predictor of a split.

Reads ``mels``, ``user_factors``, ``track_factors``, ``eval_holdout``,
``upper_bound_factors``, ``baseline_factors``, ``predicted_factors``,
``validation_examples``, ``track_metadata`` (and ``factors.plays``); appends to ``evaluation_results``.

Cost: per split and predictor one scoring pass (``deepcuts.evaluation.runner``: 20k users x
1e6 candidates ~1,000 core-seconds measured, x 1e7 ~10,000 core-seconds, memory per task bounded by one
candidate block); the cold split holds ``factors.cold_fraction`` of the catalogue (2e5
candidates at 1e6 tracks, 2e6 at 1e7), validation ``train.validation_fraction`` of the rest.
The sparse-warm splits hold ``factors.sparse_warm_fraction`` of the non-cold tracks (1.6e5
candidates at 1e6 tracks, 1.6e6 at 1e7), four predictors each; the blend adds one scan of
the plays and a solve per candidate (``deepcuts.cf.blend``, infer's cost).
The CNN scores the candidates it has no stored prediction for (infer's executors, ~150
tracks/s per core).
"""
from __future__ import annotations

import logging
import sys

from deepcuts.core.tables import (BASELINE_FACTORS, EVAL_HOLDOUT, EVALUATION_RESULTS, MELS, PREDICTED_FACTORS,
                                  TRACK_FACTORS, UPPER_BOUND_FACTORS, USER_FACTORS, VALIDATION_EXAMPLES)
from deepcuts.evaluation import runner as ev
from deepcuts.stages import content

log = logging.getLogger(__name__)


RANDOM, BASELINE, CNN, UPPER_BOUND = "random", "baseline", "cnn", "upper_bound"
METADATA = "metadata"   # the CNN's vectors with the metadata prior where a cold track has one (issue 13)
# The sparse-warm splits' predictors (issue 19): how a track with 1..5 listeners is served.
USAGE, AUDIO, THRESHOLD, BLEND = "usage", "audio", "threshold", "blend"
SPARSE_PREDICTORS = (USAGE, AUDIO, THRESHOLD, BLEND)


class Skip(Exception):
    """A predictor or split whose inputs are not there: reported, not an error."""



# --- the splits --------------------------------------------------------------------------------
def _mel_tracks(ctx):
    return ctx.read(MELS).select("track_id")


def split_pairs(ctx, split: str):
    """(held-out pairs (user_id, track_id), candidate tracks (track_id)) of ``split``."""
    from pyspark.sql import functions as F
    if split == ev.COLD:
        if not ctx.exists(EVAL_HOLDOUT):
            raise Skip("no eval_holdout: run the factors stage with factors.evaluate = true")
        pairs = ctx.read(EVAL_HOLDOUT).where(F.col("split") == ev.COLD).select("user_id", "track_id")
        if pairs.limit(1).count() == 0:
            raise Skip("eval_holdout is empty (factors.evaluate = false in the last factors run)")
        candidates = pairs.select("track_id").distinct().join(_mel_tracks(ctx), "track_id", "left_semi")
        return pairs, candidates
    if split == ev.VALIDATION:
        from deepcuts.cf.plays import aggregate_pairs, read_raw_plays, validate_plays
        if not ctx.exists(VALIDATION_EXAMPLES):
            raise Skip("no validation_examples: run the train stage first")
        tracks = ctx.read(VALIDATION_EXAMPLES).select("track_id").distinct()
        fc = ctx.cfg.factors
        plays = validate_plays(read_raw_plays(ctx.spark, fc.plays, fc.plays_format), fc.plays_format)
        pairs = aggregate_pairs(plays.where(F.col("reason").isNull())).select("user_id", "track_id") \
            .join(tracks, "track_id", "left_semi")
        return pairs, tracks.join(_mel_tracks(ctx), "track_id", "left_semi")
    if split in ev.SPARSE_SPLITS:
        if not ctx.exists(EVAL_HOLDOUT):
            raise Skip("no eval_holdout: run the factors stage with factors.evaluate = true")
        pairs = ctx.read(EVAL_HOLDOUT).where(F.col("split") == split).select("user_id", "track_id")
        if pairs.limit(1).count() == 0:
            raise Skip("no sparse-warm pairs in eval_holdout (factors.sparse_warm_fraction = 0 or "
                       "factors.evaluate = false in the last factors run)")
        candidates = pairs.select("track_id").distinct().join(_mel_tracks(ctx), "track_id", "left_semi")
        return pairs, candidates
    raise ValueError(f"unknown split {split!r}")


def split_population(ctx, split: str) -> ev.Population:
    """The shared users and candidates of ``split`` (module docstring)."""
    if not ctx.exists(USER_FACTORS):
        raise Skip("no user_factors: run the factors stage first")
    fc, ec = ctx.cfg.factors, ctx.cfg.evaluate
    pairs, candidates = split_pairs(ctx, split)
    excluded = None
    if split in ev.SPARSE_SPLITS:   # the 1..5 listeners a sparse track kept are training plays, not negatives
        from deepcuts.cf.blend import fit_pairs
        excluded = fit_pairs(ctx.spark, fc, ctx.read(EVAL_HOLDOUT)).join(candidates, "track_id", "left_semi")
    return ev.build_population(pairs, candidates, ctx.read(USER_FACTORS).select("user_id"), split=split,
                               max_users=fc.eval_max_users, seed=fc.eval_seed, users_per_task=ec.users_per_task,
                               candidates_per_block=ec.candidates_per_block, excluded=excluded)


# --- the predictors ------------------------------------------------------------------------------
def _run_id_of(df):
    row = df.select("run_id").limit(1).collect()
    return row[0]["run_id"] if row else None


def resolve_cnn(ctx) -> tuple[str, str, dict] | None:
    """(model id, folder, meta) of the CNN this run evaluates, or None without a model."""
    from deepcuts.nn.model import latest_model_id, load_artifact, model_dir
    model_id = ctx.cfg.evaluate.model or ctx.cfg.infer.model or latest_model_id(ctx.lake)
    if not model_id:
        return None
    folder = model_dir(ctx.lake, model_id)
    return model_id, folder, load_artifact(folder).meta


def cnn_vectors(ctx, folder: str, model_id: str, tracks, cfg=None):
    """(track_id, factors) of the model for ``tracks``: its ``predicted_factors`` rows that
    match the current mel (fingerprint), the others scored now in the executors."""
    from pyspark.sql import functions as F
    from deepcuts.stages.infer import mel_locations, predict_vectors
    cfg = cfg or ctx.cfg
    locations = mel_locations(ctx).join(tracks.select("track_id"), "track_id", "left_semi")
    stored = (ctx.read(PREDICTED_FACTORS).where(F.col("model_id") == model_id)
              .join(locations.select("track_id", "fingerprint"), ["track_id", "fingerprint"], "left_semi")
              .select("track_id", "factors"))
    missing = locations.join(stored.select("track_id"), "track_id", "left_anti")
    if missing.limit(1).count() == 0:
        return stored
    scored = predict_vectors(ctx.spark, missing, folder, cfg).where(F.col("reason").isNull()) \
        .select("track_id", "factors")
    return stored.unionByName(scored)


def audio_in_als_space(ctx, cnn, tracks):
    """(track_id, factors) of the CNN for ``tracks``, brought into the ALS space as infer
    serves them (``audio_to_als_expr``); Skip without a factors model."""
    from pyspark.sql import functions as F
    from deepcuts.stages.infer import audio_to_als_expr, median_als_norm
    if cnn is None:
        raise Skip("no trained model: run the train stage")
    model_id, folder, meta = cnn
    if meta.get("target") != "factors":
        raise Skip(f"model {model_id} has target {meta.get('target')!r}: not in the ALS space")
    scale = median_als_norm(ctx.read(TRACK_FACTORS))
    return cnn_vectors(ctx, folder, model_id, tracks).select(
        "track_id", audio_to_als_expr(F.col("factors"), meta, scale).alias("factors"))


def metadata_predictor_vectors(ctx, split: str, pop: ev.Population, cnn):
    """The cold candidates' vectors as infer serves tracks without plays: the metadata prior
    (:mod:`deepcuts.cf.metadata`, weights fitted on the validation tracks) where a track has
    one, its audio vector in the ALS space otherwise."""
    from deepcuts.cf.metadata import metadata_vectors
    if split != ev.COLD:
        raise Skip("its weights are fitted on the validation tracks: scored on the cold split only")
    wanted = pop.candidates.select("track_id")
    if ctx.exists(VALIDATION_EXAMPLES):
        wanted = wanted.unionByName(ctx.read(VALIDATION_EXAMPLES).select("track_id"))
    audio = audio_in_als_space(ctx, cnn, wanted)
    prior, info = metadata_vectors(ctx, audio, pop.candidates)
    if prior is None:
        raise Skip(info.get("why") or f"no level's weight was fitted: {info.get('levels')}")
    log.info("evaluate metadata prior: %s", info["levels"])
    candidates_audio = audio.join(pop.candidates, "track_id", "left_semi")
    return prior.select("track_id", "factors").unionByName(candidates_audio.join(prior, "track_id", "left_anti"))


def predictor_vectors(ctx, predictor: str, split: str, pop: ev.Population, cnn) -> tuple:
    """(user vectors, track vectors, model_id) of ``predictor`` on ``split``; Skip if absent."""
    from pyspark.sql import functions as F
    users = ctx.read(USER_FACTORS).select("user_id", "factors")
    if predictor == RANDOM:
        rank = users.select(F.size("factors").alias("r")).first()["r"]
        return users, ev.random_track_vectors(pop.candidates, rank, ctx.cfg.factors.eval_seed), None
    if predictor == BASELINE:
        if not ctx.exists(BASELINE_FACTORS):
            raise Skip("no baseline_factors: run the baseline stage")
        table = ctx.read(BASELINE_FACTORS)
        leaked = table.where(F.col("in_fit")).join(pop.candidates, "track_id", "left_semi").count()
        if leaked:
            raise Skip(f"{leaked} {split} candidates were in the baseline's fit: rerun the baseline stage "
                       "after train (it keeps validation_examples out)")
        return users, table.select("track_id", "factors"), _run_id_of(table)
    if predictor == CNN:
        if cnn is None:
            raise Skip("no trained model: run the train stage")
        model_id, folder, meta = cnn
        if meta.get("target") != "factors":
            raise Skip(f"model {model_id} has target {meta.get('target')!r}: not in the ALS space")
        return users, cnn_vectors(ctx, folder, model_id, pop.candidates), model_id
    if predictor == METADATA:
        return users, metadata_predictor_vectors(ctx, split, pop, cnn), cnn[0]
    if predictor == UPPER_BOUND:
        if split == ev.VALIDATION:
            tracks = ctx.read(TRACK_FACTORS)
            return users, tracks.select("track_id", "factors"), _run_id_of(tracks)
        if not ctx.exists(UPPER_BOUND_FACTORS):
            raise Skip("no upper_bound_factors: run the factors stage with factors.evaluate = true")
        ub = ctx.read(UPPER_BOUND_FACTORS)
        ub_run, users_run = _run_id_of(ub), _run_id_of(ctx.read(USER_FACTORS))
        if ub_run is None:
            raise Skip("upper_bound_factors is empty (factors.evaluate = false in the last factors run)")
        if ub_run != users_run:
            raise Skip(f"upper_bound_factors is from factors run {ub_run}, user_factors from {users_run}")
        return (ub.where(F.col("entity") == "user").select(F.col("entity_id").alias("user_id"), "factors"),
                ub.where(F.col("entity") == "track").select(F.col("entity_id").alias("track_id"), "factors"),
                ub_run)
    raise ValueError(f"unknown predictor {predictor!r}")


def sparse_vectors(ctx, predictor: str, pop: ev.Population, cnn, strength: float | None = None) -> tuple:
    """(user vectors, track vectors, model_id) of a sparse-warm predictor: the published ALS
    vectors (``usage``), the CNN's brought into the ALS space as infer serves them (``audio``),
    infer's threshold switch (``threshold``), or the blend (``blend``, prior strength
    ``strength``, default ``infer.blend_prior_strength``) over the published fit's plays."""
    from pyspark.sql import functions as F
    users = ctx.read(USER_FACTORS).select("user_id", "factors")
    tracks = ctx.read(TRACK_FACTORS)
    if predictor == USAGE:
        return users, tracks.select("track_id", "factors"), _run_id_of(tracks)
    audio = audio_in_als_space(ctx, cnn, pop.candidates)
    model_id = cnn[0]
    if predictor == AUDIO:
        return users, audio, model_id
    if predictor == THRESHOLD:
        usage = tracks.where(F.col("n_listeners") >= ctx.cfg.infer.min_listeners_for_usage) \
            .select("track_id", "factors")
        low = tracks.join(usage, "track_id", "left_anti").join(audio, "track_id", "left_anti") \
            .select("track_id", "factors")   # no audio vector: whatever ALS vector exists (infer's fallback)
        return users, usage.unionByName(audio.join(usage, "track_id", "left_anti")).unionByName(low), model_id
    if predictor == BLEND:
        from deepcuts.cf.blend import blend_vectors, fit_pairs, user_gram
        ic = ctx.cfg.infer
        pairs = fit_pairs(ctx.spark, ctx.cfg.factors, ctx.read(EVAL_HOLDOUT)) \
            .join(pop.candidates, "track_id", "left_semi")
        blended = blend_vectors(pairs, users, audio, gram=user_gram(users)[0], fc=ctx.cfg.factors,
                                strength=ic.blend_prior_strength if strength is None else strength,
                                max_listeners=ic.blend_max_listeners,
                                partitions=ctx.cfg.spark.shuffle_partitions).select("track_id", "factors")
        return users, blended.unionByName(audio.join(blended, "track_id", "left_anti")), model_id
    raise ValueError(f"unknown sparse-warm predictor {predictor!r}")


def check_same_population(results: list[dict]) -> None:
    """Every row of one split must describe the same users and candidates (the point of it)."""
    for split in {r["split"] for r in results}:
        shapes = {(r["n_users"], r["n_candidates"], r["n_positives"], r["n_positives_without_vector"])
                  for r in results if r["split"] == split}
        if len(shapes) > 1:
            raise RuntimeError(f"split {split}: predictors were scored on different populations: {shapes}")


# --- the stage ---------------------------------------------------------------------------------------
def run(ctx) -> dict:
    """Score every predictor on every split (module docstring); appends evaluation_results."""
    from deepcuts.core.storage import delete_tree
    cfg, ec, fc = ctx.cfg, ctx.cfg.evaluate, ctx.cfg.factors
    scratch = ctx.path("_scratch", "evaluate", ctx.run_id)
    cnn = resolve_cnn(ctx) if CNN in ec.predictors or set(ec.splits) & set(ev.SPARSE_SPLITS) else None
    if CNN in ec.predictors and cnn is not None and ec.model:   # named explicitly: a mismatch is an error
        content.check_model_is_factors(cnn[2], f"the {CNN} predictor (it ranks in the ALS space)",
                                       f"drop {CNN} from evaluate.predictors (label metrics need no predictor)")
    results: list[dict] = []
    skipped: dict[str, str] = {}
    try:
        for split in ec.splits:
            try:
                pop = split_population(ctx, split)
            except Skip as why:
                skipped[split] = str(why)
                continue
            try:
                sparse = split in ev.SPARSE_SPLITS
                for predictor in (SPARSE_PREDICTORS if sparse else ec.predictors):
                    try:
                        users, tracks, model_id = (sparse_vectors(ctx, predictor, pop, cnn) if sparse else
                                                   predictor_vectors(ctx, predictor, split, pop, cnn))
                    except Skip as why:
                        skipped[f"{split}/{predictor}"] = str(why)
                        continue
                    results.append(ev.evaluate_predictor(pop, users, tracks, predictor=predictor,
                                                         k=fc.eval_k, scratch=scratch, model_id=model_id))
                    log.info("evaluate %s/%s: mAP@%d %s AUC %s", split, predictor, fc.eval_k,
                             results[-1]["map_at_k"], results[-1]["auc"])
            finally:
                pop.release()
    finally:
        delete_tree(scratch)
    check_same_population(results)
    # A labels model (content-only mode, issue 18): label precision / accuracy rows beside chance.
    label_rows, label_summary = content.label_metrics(ctx, cnn or resolve_cnn(ctx))
    if results or label_rows:
        users_run = _run_id_of(ctx.read(USER_FACTORS))
        ctx.write(ev.results_frame(ctx.spark, results + label_rows, ctx.run_id,
                                   {"factors_run_id": users_run, "max_users": fc.eval_max_users,
                                    "seed": fc.eval_seed}),
                  EVALUATION_RESULTS, mode="append")
        if results:
            print(ev.format_results_table(results), flush=True)
        if label_rows:
            print(content.format_label_table(label_rows), flush=True)
    summary = {f"{r['split']}/{r['predictor']}": _line(r) for r in results}
    summary.update(label_summary)
    summary["cnn_model"] = cnn[0] if cnn else None
    if skipped:
        summary["skipped"] = skipped
    return summary


def _line(r: dict) -> str:
    if r["map_at_k"] is None:
        return f"no users to score ({r['n_candidates']} candidates)"
    return (f"mAP@{r['k']}={r['map_at_k']:.4f} AUC={r['auc']:.4f} users={r['n_users']} "
            f"candidates={r['n_candidates']} (no vector: {r['n_candidates_without_vector']})")


# --- python -m deepcuts evaluate ---------------------------------------------------------------------
def evaluate_main(argv=None) -> int:
    """``python -m deepcuts evaluate [--model ID] [--splits cold,validation] [--predictors P]
    [--conf-file F] [--set k=v]``: recompute the table for a model on the current tables, print it."""
    import argparse
    from deepcuts.core.cli import EXIT_CONFIG, EXIT_OK, add_config_args, config_or_report, run_stage, \
        setup_logging
    from deepcuts.core.config import ConfigError
    setup_logging()
    p = argparse.ArgumentParser(prog="deepcuts evaluate", description=evaluate_main.__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--model", help="model id of the CNN row (default: evaluate.model, infer.model, the latest)")
    p.add_argument("--splits", help="comma-separated: cold, validation (default: evaluate.splits)")
    p.add_argument("--predictors", help="comma-separated (default: evaluate.predictors)")
    args = p.parse_args(argv)
    cfg = config_or_report(args, "evaluate")
    if cfg is None:
        return EXIT_CONFIG
    extra = {}
    if args.model:
        extra["evaluate.model"] = args.model
    for option, key in ((args.splits, "evaluate.splits"), (args.predictors, "evaluate.predictors")):
        if option:
            extra[key] = [s.strip() for s in option.split(",") if s.strip()]
    try:
        cfg = cfg.replace(**extra) if extra else cfg
    except ConfigError as exc:
        print(f"deepcuts evaluate: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from pyspark.sql import SparkSession
    from deepcuts.core.spark import get_session
    ours = SparkSession.getActiveSession() is None     # a notebook's or a test's session stays up
    spark = get_session(cfg, f"{cfg.spark.app_name}-evaluate")
    try:
        run_stage(spark, cfg, "evaluate")
    except ConfigError as exc:     # e.g. a model that does not fit the predictors asked for
        print(f"deepcuts evaluate: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if ours:
            spark.stop()
    return EXIT_OK
