"""The stages, in one place: what each one runs, reads and writes, and the nightly order.

``jobs/<stage>.py`` is ``main("<stage>")``; ``pipeline`` runs :data:`NIGHTLY` in one
Spark application.  A stage reads and writes only the tables it declares here (the run
context enforces it), so this table is also the pipeline's data-flow diagram.

The demo catalogue generator is not a stage: ``run-demo.sh`` asks for it
(``python -m deepcuts demo-catalogue``) before the nightly job.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from deepcuts.core import tables as T


@dataclass(frozen=True)
class Stage:
    name: str
    function: str                           # "module:function", run(ctx) -> summary dict
    reads: tuple[T.Table, ...]
    writes: tuple[T.Table, ...]
    doc: str
    # cfg -> {table name: file layout (rows_per_file, row_group_rows, row_bytes)}, for compaction
    layout: Callable | None = None
    # The nightly job skips a stage whose inputs are unchanged (deepcuts.core.gates) unless it
    # reads sources outside the tables (ingest, factors) or has its own policy (train).
    skippable: bool = True
    # (cfg, lake) -> what else the stage reads, as a line (e.g. the served model), for that check
    fingerprint: Callable | None = None
    # What its pandas UDFs get in a row: "mel" (~330 kB: small Arrow batches) or "vector" (play
    # pairs, factor vectors: large ones); [spark] arrow_batch_rows / arrow_batch_rows_vectors.
    rows: str = "mel"

    def function_ref(self) -> Callable:
        module, func = self.function.split(":")
        return getattr(importlib.import_module(module), func)


def _served_model(cfg, lk) -> str:
    from deepcuts.nn.model import latest_model_id
    return f"model {cfg.infer.model or latest_model_id(lk)}"


def _evaluated_model(cfg, lk) -> str:
    from deepcuts.nn.model import latest_model_id
    return f"model {cfg.evaluate.model or cfg.infer.model or latest_model_id(lk)}"


def _mel_layout(cfg) -> dict:
    from deepcuts.stages.ingest import mel_bytes_estimate
    return {T.MELS.name: {"rows_per_file": cfg.ingest.rows_per_file,
                          "row_group_rows": cfg.ingest.rows_per_row_group,
                          "row_bytes": mel_bytes_estimate(cfg)}}


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", "deepcuts.stages.ingest:run",
          reads=(T.MELS, T.INGEST_REJECTS, T.TRACK_METADATA),
          writes=(T.MELS, T.INGEST_REJECTS, T.TRACK_METADATA),
          doc="audio (folder, manifest, s3 prefix) -> log-mel spectrograms", layout=_mel_layout, skippable=False),
    Stage("factors", "deepcuts.stages.factors:run",
          reads=(T.MELS, T.TRACK_FACTORS),
          writes=(T.USER_FACTORS, T.TRACK_FACTORS, T.USER_INDEX, T.TRACK_INDEX, T.PLAYS_REJECTS,
                  T.EVAL_HOLDOUT, T.UPPER_BOUND_FACTORS, T.EVALUATION_RESULTS, T.FACTOR_ALIGNMENTS),
          doc="play counts -> implicit ALS factors (+ the cold-start protocol's holdout and upper bound)",
          skippable=False, rows="vector"),
    Stage("train", "deepcuts.stages.train:run",
          reads=(T.MELS, T.TRACK_FACTORS, T.USER_FACTORS, T.EVAL_HOLDOUT, T.FACTOR_ALIGNMENTS),
          writes=(T.TRAIN_EXAMPLES, T.VALIDATION_EXAMPLES, T.TRAIN_REJECTS, T.TRAIN_METRICS),
          doc="mels + factors -> a CNN under models/ (Petastorm -> PyTorch), when due (deepcuts.nn.promotion)",
          skippable=False),
    Stage("baseline", "deepcuts.stages.baseline:run",
          reads=(T.MELS, T.TRACK_FACTORS, T.VALIDATION_EXAMPLES),
          writes=(T.BASELINE_FACTORS, T.BASELINE_REJECTS),
          doc="mels -> MFCC bag-of-words -> PCA -> ridge: the paper's baseline vectors"),
    Stage("infer", "deepcuts.stages.infer:run",
          reads=(T.MELS, T.TRACK_FACTORS, T.PREDICTED_FACTORS, T.FACTOR_ALIGNMENTS,
                 T.AUDIO_EMBEDDINGS, T.PREDICTED_LABELS,
                 T.USER_FACTORS, T.EVAL_HOLDOUT,    # the usage/audio blend (issue 19)
                 T.TRACK_METADATA, T.VALIDATION_EXAMPLES),   # the metadata prior (issue 13)
          writes=(T.PREDICTED_FACTORS, T.SERVING_FACTORS, T.INFER_REJECTS,
                  T.AUDIO_EMBEDDINGS, T.PREDICTED_LABELS),   # the last two: a labels model (issue 18)
          doc="the whole catalogue -> predicted factors, cold-start backfill of serving_factors",
          fingerprint=_served_model),
    Stage("evaluate", "deepcuts.stages.evaluate:run",
          reads=(T.MELS, T.USER_FACTORS, T.TRACK_FACTORS, T.EVAL_HOLDOUT, T.UPPER_BOUND_FACTORS,
                 T.BASELINE_FACTORS, T.PREDICTED_FACTORS, T.VALIDATION_EXAMPLES,
                 T.AUDIO_EMBEDDINGS, T.PREDICTED_LABELS, T.TRACK_METADATA),
          writes=(T.EVALUATION_RESULTS,),
          doc="random, MFCC baseline, CNN, upper bound on the same users and candidates -> evaluation_results",
          fingerprint=_evaluated_model),
    Stage("neighbours", "deepcuts.stages.neighbours:run",
          reads=(T.SERVING_FACTORS, T.PREDICTED_FACTORS, T.USER_FACTORS, T.MELS, T.AUDIO_EMBEDDINGS),
          writes=(T.SIMILAR_TRACKS, T.SOUNDS_LIKE, T.USER_RECOMMENDATIONS, T.NEIGHBOUR_METRICS,
                  T.NEIGHBOUR_REJECTS),
          doc="sharded FAISS k-NN -> similar tracks, sounds-like, user -> new-track recommendations",
          rows="vector"),
    Stage("report", "deepcuts.stages.report:run",
          reads=(T.RUNS, T.EVALUATION_RESULTS, T.TRAIN_METRICS, T.SERVING_FACTORS, T.SIMILAR_TRACKS, T.MELS,
                 T.INGEST_REJECTS, T.PLAYS_REJECTS, T.TRAIN_REJECTS, T.BASELINE_REJECTS, T.INFER_REJECTS,
                 T.NEIGHBOUR_REJECTS, T.AUDIO_EMBEDDINGS, T.SOUNDS_LIKE),   # the last two: content-only mode
          writes=(),
          doc="the run's static HTML report under <warehouse>/reports/ (no table written)", skippable=False,
          rows="vector"),
)}

NIGHTLY: tuple[str, ...] = ("ingest", "factors", "train", "baseline", "infer", "evaluate", "neighbours",
                            "report")


def stage(name: str) -> Stage:
    return STAGES[name]
