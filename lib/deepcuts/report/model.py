"""What the run report shows, as plain data, and the pure functions that shape it.

The report stage (:mod:`deepcuts.stages.report`) fills these from bounded reads (a few hundred
rows, a hash sample of ``report.map_tracks`` vectors); :mod:`deepcuts.report.html` renders them.
Nothing here touches Spark, so every rule (which numbers are "previous", what the promotion
decision was, how the map is coloured) is testable on small inputs.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

PREDICTOR_ORDER = ("random", "baseline", "cnn", "upper_bound", "als")
PREDICTOR_NAMES = {"random": "random", "baseline": "MFCC baseline", "cnn": "CNN",
                   "upper_bound": "upper bound", "als": "ALS (warm check)"}
SPLIT_ORDER = ("cold", "validation", "sparse_warm", "sparse_warm_validation", "warm")


# --- the evaluation table -------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRow:
    split: str
    predictor: str
    map_at_k: float | None
    auc: float | None
    k: int | None
    n_users: int | None
    n_candidates: int | None
    run_id: str
    prev_map_at_k: float | None = None
    prev_auc: float | None = None
    prev_run_id: str | None = None
    # A labels model's rows (issue 18): a named metric (label null = over all labels) beside chance.
    metric: str | None = None
    label: str | None = None
    value: float | None = None
    chance: float | None = None
    prev_value: float | None = None


def latest_two_runs(pairs: Iterable[tuple[str, str]]) -> dict[str, tuple[str, str | None]]:
    """split -> (latest run id, previous run id or None) from (split, run_id) pairs.  Run ids
    start with the stage and a UTC stamp (``evaluate-20261202T033550-...``), so within one split
    (always written by one stage) their order is their time order."""
    by_split: dict[str, set[str]] = {}
    for split, run_id in pairs:
        by_split.setdefault(split, set()).add(run_id)
    out = {}
    for split, ids in by_split.items():
        ordered = sorted(ids, reverse=True)
        out[split] = (ordered[0], ordered[1] if len(ordered) > 1 else None)
    return out


def _key(r: Mapping[str, Any]) -> tuple:
    return r["split"], r["predictor"], r.get("metric"), r.get("label")


def evaluation_rows(rows: Sequence[Mapping[str, Any]]) -> list[EvalRow]:
    """``evaluation_results`` rows of each split's latest two runs -> the latest run's rows,
    each with the previous run's numbers for the same split, predictor (and metric, label) beside it."""
    runs = latest_two_runs((r["split"], r["run_id"]) for r in rows)
    prev = {_key(r): r for r in rows if runs[r["split"]][1] == r["run_id"]}
    out = []
    for r in rows:
        latest, previous = runs[r["split"]]
        if r["run_id"] != latest:
            continue
        p = prev.get(_key(r))
        out.append(EvalRow(r["split"], r["predictor"], r.get("map_at_k"), r.get("auc"), r.get("k"),
                           r.get("n_users"), r.get("n_candidates"), latest,
                           p.get("map_at_k") if p else None, p.get("auc") if p else None,
                           previous if p else None, r.get("metric"), r.get("label"), r.get("value"),
                           r.get("chance"), p.get("value") if p else None))

    def order(e: EvalRow):
        s = SPLIT_ORDER.index(e.split) if e.split in SPLIT_ORDER else len(SPLIT_ORDER)
        q = PREDICTOR_ORDER.index(e.predictor) if e.predictor in PREDICTOR_ORDER else len(PREDICTOR_ORDER)
        return s, e.split, q, e.predictor, e.metric or "", e.label or ""
    return sorted(out, key=order)


# --- the stages of this run -------------------------------------------------------------------
def stage_runs(rows: Sequence[Mapping[str, Any]], exclude: str, pipeline_run_id: str | None) -> list[dict]:
    """The manifest rows of one pipeline run's stages, in run order; without a pipeline run,
    the latest row of every stage.  ``exclude``: the report's own stage."""
    rows = [dict(r) for r in rows if r["stage"] != exclude]
    if pipeline_run_id:
        chosen = [r for r in rows if r.get("pipeline_run_id") == pipeline_run_id]
    else:
        newest: dict[str, dict] = {}
        for r in rows:
            if r["stage"] not in newest or r["ended_at"] > newest[r["stage"]]["ended_at"]:
                newest[r["stage"]] = r
        chosen = list(newest.values())
    return sorted(chosen, key=lambda r: r["started_at"])


def run_gates(rows: Sequence[Mapping[str, Any]], max_reject_rate: float, nightly: bool) -> list[str]:
    """The quality gates this run's stages failed, one line each, as the CLI counted them for
    its exit code 4: a stage that raised a gate (``GateFailed``: recall under its floor, a model
    of another space) and, in the nightly job, the summary gates (reject rate, promotion)."""
    from deepcuts.core.errors import GATE_OUTCOME
    from deepcuts.core.gates import failed_gates
    out = []
    for r in rows:
        error = r.get("error") or ""
        if r.get("status") == "failed" and error.startswith(GATE_OUTCOME + ": "):
            out.append(f"{r['stage']}: {error[len(GATE_OUTCOME) + 2:]}")
        elif nightly and r.get("summary_json"):
            out += failed_gates(r["stage"], json.loads(r["summary_json"]), max_reject_rate)
    return out


def model_epochs(rows: Sequence[Mapping[str, Any]], model_id: str | None) -> tuple[str | None, list[dict]]:
    """(model id, its train_metrics rows by epoch): ``model_id``'s, else the newest run's."""
    if model_id is None and rows:
        newest = max(r["run_id"] for r in rows)
        model_id = next(r["model_id"] for r in rows if r["run_id"] == newest)
    return model_id, sorted((dict(r) for r in rows if r["model_id"] == model_id), key=lambda r: r["epoch"])


# --- training and the promotion decision ------------------------------------------------------
PROMOTED, KEPT, NOT_TRAINED, FAILED = "promoted", "kept", "not_trained", "failed"
PROMOTION_TEXT = {PROMOTED: "promoted: this run's model is the one served",
                  KEPT: "kept, not served: the previous model stays in service",
                  NOT_TRAINED: "not trained this run",
                  FAILED: "training failed this run"}
# The train stage's summary fields the decision is read from (the promotion gate, issue 14):
# ``promotion`` = {"decision": "promoted" | "kept, not served", "reason", "new_validation_loss",
# "current_model", "current_validation_loss"} (deepcuts.nn.promotion.Promotion.as_summary), or a
# bool ``promoted``; ``skipped`` (a reason) when training was not due.
PROMOTED_FIELD, PROMOTION_FIELD, SKIPPED_FIELD = "promoted", "promotion", "skipped"


@dataclass(frozen=True)
class Promotion:
    status: str                 # promoted | kept | not_trained | failed
    detail: str                 # why, in words
    model_id: str | None        # this run's model (None when nothing was trained)
    served_model_id: str | None  # models/LATEST after the run

    @property
    def text(self) -> str:
        return PROMOTION_TEXT[self.status]


def promotion_decision(train_run: Mapping[str, Any] | None, in_this_run: bool,
                       served_model_id: str | None) -> Promotion:
    """What happened to this run's model.  ``train_run``: the train stage's manifest row
    (``status``, ``summary_json``, ``error``) of this run (``in_this_run``) or, outside a
    pipeline, the latest one.  The gate's own verdict (``promoted``) wins; without one (a train
    stage with no gate), the model is promoted exactly when ``models/LATEST`` names it."""
    if train_run is None or not in_this_run:
        return Promotion(NOT_TRAINED, f"the served model is {served_model_id or 'none'}", None, served_model_id)
    if train_run.get("status") == "failed":
        return Promotion(FAILED, str(train_run.get("error") or "no error recorded"), None, served_model_id)
    try:
        summary = json.loads(train_run.get("summary_json") or "{}")
    except json.JSONDecodeError:
        summary = {}
    model_id = summary.get("model_id")
    if summary.get(SKIPPED_FIELD) or model_id is None:
        return Promotion(NOT_TRAINED, str(summary.get(SKIPPED_FIELD) or "the train stage trained no model")
                         + f"; the served model is {served_model_id or 'none'}", None, served_model_id)
    gate = summary.get(PROMOTION_FIELD)
    gate = gate if isinstance(gate, Mapping) else {"reason": gate} if gate else {}
    verdict = summary.get(PROMOTED_FIELD)
    if not isinstance(verdict, bool) and isinstance(gate.get("decision"), str):
        verdict = gate["decision"].strip().lower().startswith("promoted")
    losses = ""
    if gate.get("new_validation_loss") is not None:
        losses = f" (validation loss {gate['new_validation_loss']:.6g}"
        if gate.get("current_validation_loss") is not None:
            losses += f" against {gate['current_validation_loss']:.6g} of {gate.get('current_model') or 'the served model'}"
        losses += ")"
    if isinstance(verdict, bool):
        status = PROMOTED if verdict else KEPT
        detail = str(gate.get("reason") or ("the gate passed" if verdict else "the gate did not pass")) + losses
    else:     # a train stage without a gate: the model is served exactly when LATEST names it
        status = PROMOTED if served_model_id == model_id else KEPT
        detail = "no promotion gate recorded: models/LATEST " + (
            "names this model" if status == PROMOTED else f"names {served_model_id or 'nothing'}")
    return Promotion(status, detail, model_id, served_model_id)


# --- the 2-D map ------------------------------------------------------------------------------
def first_label(labels: str | None, separator: str) -> str:
    """The first of a track's labels ("" when it has none): its colour on the map."""
    if not labels:
        return ""
    parts = [p.strip() for p in str(labels).split(separator)] if separator else [str(labels).strip()]
    return next((p for p in parts if p), "")


def map_groups(labels: Sequence[str | None], sources: Sequence[str], separator: str) -> tuple[list[str], str]:
    """(colour group per track, what the colour means).  By label where any track has one;
    by source (usage / audio) where none does."""
    firsts = [first_label(l, separator) for l in labels]
    if any(firsts):
        return firsts, "label"
    return [str(s) for s in sources], "source"


def embed_2d(vectors: np.ndarray, seed: int, perplexity: float) -> tuple[np.ndarray, str]:
    """(n x 2 coordinates, method) of unit-normalised vectors: t-SNE (PCA-initialised, the
    perplexity capped for small samples); plain PCA below 5 points, where t-SNE is undefined."""
    x = np.asarray(vectors, dtype=np.float64)
    n = len(x)
    if n == 0:
        return np.zeros((0, 2)), "none"
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)      # similarity is cosine: the map shows directions
    if n < 5 or x.shape[1] < 2:
        centred = x - x.mean(axis=0)
        if x.shape[1] < 2 or not centred.any():
            return np.column_stack([centred[:, 0] if x.shape[1] else np.zeros(n), np.zeros(n)]), "pca"
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        out = centred @ vt[:2].T
        return (out if out.shape[1] == 2 else np.column_stack([out, np.zeros(n)])), "pca"
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    p = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=p, init="pca", learning_rate="auto", random_state=seed,
                metric="euclidean")
    # One OpenMP thread: on a busy driver sklearn's spinning threads ran 120 points 12x slower
    # (61 s against 5 s, 2 loaded cores); one thread maps 2,000 points in ~10 s.
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(x.astype(np.float32)), f"t-SNE (perplexity {p:g})"


# --- example playlists ------------------------------------------------------------------------
@dataclass(frozen=True)
class TrackCard:
    track_id: str
    labels: str | None
    source: str | None              # usage | audio (where its serving vector came from)
    score: float | None = None      # cosine to the query (neighbours only)
    audio_href: str | None = None   # relative to index.html
    audio_type: str | None = None   # the <source type=...>
    audio_note: str | None = None   # why there is no player


@dataclass(frozen=True)
class Playlist:
    query: TrackCard
    neighbours: list[TrackCard]


AUDIO_FORMATS = {"ogg": ("OGG", "VORBIS", "audio/ogg; codecs=vorbis"),
                 "wav": ("WAV", "PCM_16", "audio/wav")}


def encode_excerpt(signal: np.ndarray, rate: int, fmt: str) -> bytes:
    """Mono float samples -> a playable file (libsndfile: Vorbis in Ogg, or 16-bit WAV)."""
    import soundfile as sf
    container, subtype, _ = AUDIO_FORMATS[fmt]
    y = np.clip(np.asarray(signal, dtype=np.float32), -1.0, 1.0)
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    if peak > 0:
        y = y * (0.89 / peak)      # -1 dBFS: excerpts of quiet and loud tracks play alike
    buf = io.BytesIO()
    sf.write(buf, y, rate, format=container, subtype=subtype)
    return buf.getvalue()


def audio_file_name(track_id: str, fmt: str) -> str:
    """A safe file name for a track's excerpt (track ids are arbitrary text)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", track_id)[:80] or "track"
    import hashlib
    return f"{safe}-{hashlib.blake2b(track_id.encode(), digest_size=4).hexdigest()}.{fmt}"


# --- the operational panel ----------------------------------------------------------------------
@dataclass(frozen=True)
class StageLine:
    stage: str
    run_id: str
    status: str
    duration_s: float | None
    ended_at: str | None
    tables_written: dict[str, tuple[int, int | None]]   # table -> (version, rows)
    rejects: dict[str, int]
    error: str | None = None


@dataclass
class ReportData:
    report_id: str
    created_at: str
    pipeline_run_id: str | None
    code_version: str
    warehouse: str
    evaluation: list[EvalRow] = field(default_factory=list)
    metric_k: int | None = None
    model_id: str | None = None                         # whose curves are shown
    epochs: list[dict] = field(default_factory=list)    # train_metrics rows of that model
    best_epoch: int | None = None
    promotion: Promotion | None = None
    map_svg: str = ""
    map_note: str = ""
    playlists: list[Playlist] = field(default_factory=list)
    playlists_table: str = "similar_tracks"
    counts: dict[str, Any] = field(default_factory=dict)
    rejects: dict[str, dict[str, int]] = field(default_factory=dict)   # table -> reason -> rows
    stages: list[StageLine] = field(default_factory=list)
    tables_read: dict[str, int] = field(default_factory=dict)          # what the report read
    gates_failed: list[str] = field(default_factory=list)              # run_gates
    notes: list[str] = field(default_factory=list)
