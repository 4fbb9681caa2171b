"""One typed, validated configuration object for the whole pipeline.

Every default lives in ``conf/deepcuts.toml``; the dataclasses below only say
what each key *is* (type, allowed values, range).  A key missing from the file,
an unknown key, or a bad value stops the job with a message that names the key
and what is allowed, before any Spark work starts.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from deepcuts.core.faults import KINDS as FAULT_KINDS, POINTS as FAULT_POINTS

PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONF_FILE = PROJECT_ROOT / "conf" / "deepcuts.toml"
CONF_FILE_ENV = "DEEPCUTS_CONF"


class ConfigError(ValueError):
    """A configuration key is missing, unknown, or has a value that is not allowed."""


def rule(*, choices: Iterable[Any] | None = None, min: float | None = None,
         max: float | None = None, min_exclusive: bool = False, doc: str = "") -> Any:
    """Declare the constraints of a config field (kept as dataclass metadata)."""
    return field(metadata={"choices": tuple(choices) if choices is not None else None,
                           "min": min, "max": max, "min_exclusive": min_exclusive, "doc": doc})


@dataclass(frozen=True)
class WarehouseConf:
    root: str = rule(doc="local path or s3://bucket/prefix under which every (Delta) table lives")
    retention_hours: int = rule(min=0, doc="time-travel window: VACUUM keeps files of versions this recent")
    vacuum_interval_hours: int = rule(min=0, doc="VACUUM a table a stage wrote at most this often")
    compact_min_files: int = rule(min=2, doc="OPTIMIZE a table once it holds this many small files")
    small_file_mb: int = rule(min=1, doc="a data file under this size counts as small")
    commit_retries: int = rule(min=0, doc="retries of a merge/append that lost a concurrent commit")


@dataclass(frozen=True)
class SparkConf:
    app_name: str = rule()
    checkpoint_dir: str = rule(doc="ALS lineage checkpoints; empty = <warehouse>/_checkpoints")
    shuffle_partitions: int = rule(min=1)
    arrow_batch_rows: int = rule(min=1, doc="rows per Arrow batch for mel-sized rows")
    arrow_batch_rows_vectors: int = rule(min=1, doc="rows per Arrow batch for play pairs and factor vectors")
    partition_mb: int = rule(min=1, doc="target size of a shuffle partition (the training set, the WPE listener rows)")


@dataclass(frozen=True)
class DemoConf:
    out_dir: str = rule()
    n_tracks: int = rule(min=8)
    n_users: int = rule(min=8)
    n_styles: int = rule(min=2, max=8)
    min_seconds: float = rule(min=1.0)
    max_seconds: float = rule(min=1.0)
    seed: int = rule(min=0)
    codecs: list[str] = rule(choices=("wav", "flac", "ogg", "mp3", "opus"))
    sample_rates: list[int] = rule(choices=(22050, 44100, 48000))
    mean_plays_per_user: float = rule(min=1.0)
    artists_per_style: int = rule(min=0, doc="manifest artist column: artists sharing a style's tracks; 0 = none")
    workers: int = rule(min=0, doc="processes rendering tracks; 0 = one per CPU core")


@dataclass(frozen=True)
class IngestConf:
    source: str = rule(doc="folder, manifest (.csv/.parquet) or s3://bucket/prefix")
    extensions: list[str] = rule()
    sample_rate: int = rule(min=8000, max=96000)
    n_mels: int = rule(min=16, max=512)
    n_fft: int = rule(min=256, max=8192)
    hop_length: int = rule(min=64, max=8192)
    excerpt: str = rule(choices=("middle", "whole"))
    excerpt_seconds: float = rule(min=1.0)
    whole_max_seconds: float = rule(min=1.0, doc='excerpt = "whole": at most this many seconds, from the middle')
    min_seconds: float = rule(min=0.5, doc="shorter tracks are rejected: must cover the model's window")
    max_channels: int = rule(min=1)
    min_source_rate: int = rule(min=1000)
    max_source_rate: int = rule(min=1000)
    silence_dbfs: float = rule(max=0.0, doc="tracks whose RMS is below this are rejected as silent")
    rows_per_row_group: int = rule(min=1, doc="mels per Parquet row group (one Petastorm batch)")
    rows_per_file: int = rule(min=1)
    partitions: int = rule(min=0, doc="decode tasks; 0 = 4 x default parallelism")
    on_missing: str = rule(choices=("keep", "drop"), doc="what to do with mels whose source vanished")
    truncation_tolerance_s: float = rule(min=0.0, doc="decodable audio may end this much before the header's length")
    truncation_tolerance_share: float = rule(min=0.0, max=0.5, doc="... or this share of it, whichever is more")
    reject_truncated: bool = rule(doc="reject truncated files instead of ingesting what decodes, with a warning")
    allowed_roots: list[str] = rule(doc="folders / s3:// prefixes sources may resolve into; [] = the source's own")
    max_file_bytes: int = rule(min=1, doc="larger source files are rejected (too_large) before being read")


@dataclass(frozen=True)
class FactorsConf:
    plays: str = rule(doc="play events: a .csv/.parquet file or folder")
    plays_format: str = rule(choices=("aggregated", "events"))
    unknown_tracks: str = rule(choices=("keep", "reject"))
    rank: int = rule(min=1)
    reg: float = rule(min=0.0)
    alpha: float = rule(min=0.0, min_exclusive=True)
    epsilon: float = rule(min=0.0, min_exclusive=True)
    iterations: int = rule(min=1)
    blocks: int = rule(min=0, doc="0 = Spark's default parallelism")
    checkpoint_interval: int = rule(min=1)
    intermediate_storage: str = rule(choices=("MEMORY_AND_DISK", "MEMORY_ONLY", "MEMORY_AND_DISK_SER",
                                               "MEMORY_ONLY_SER", "DISK_ONLY"),
                                      doc="storage level of ALS's in/out blocks between iterations")
    seed: int = rule(min=0)
    min_track_listeners: int = rule(min=0, doc="tracks with fewer listeners get no ALS factors")
    align: bool = rule(doc="rotate each refit onto the previous published fit (one latent space)")
    evaluate: bool = rule()
    cold_fraction: float = rule(min=0.0, max=0.9)
    warm_fraction: float = rule(min=0.0, max=0.9)
    eval_k: int = rule(min=1)
    eval_seed: int = rule(min=0)
    eval_max_users: int = rule(min=0, doc="users scored per evaluation (hash sample); 0 = all")
    sparse_warm_fraction: float = rule(min=0.0, max=0.9, doc="tracks that keep 1..sparse_warm_max_listeners listeners")
    sparse_warm_max_listeners: int = rule(min=1)
    sparse_warm_validation_share: float = rule(min=0.0, max=1.0)


@dataclass(frozen=True)
class TrainConf:
    model: str = rule(choices=("auto", "cnn", "ridge"),
                      doc="cnn: trained by SGD; ridge: random conv features + ridge; auto: by training-set size")
    auto_ridge_below_tracks: int = rule(min=0, doc="model = auto: ridge below this many training tracks, else cnn")
    ridge_penalties: list[float] = rule(doc="ridge: penalties tried (x the feature count), chosen on validation")
    transfer: str = rule(choices=("none", "musicnn"),
                         doc="ridge (and auto's ridge candidate): also a pretrained network's features; the cnn ignores it")
    transfer_weights: str = rule(doc="transfer: the converted weights bootstrap makes (relative: to the venv)")
    target: str = rule(choices=("factors", "labels"))
    loss: str = rule(choices=("mse", "wpe"))
    crop_seconds: float = rule(min=0.5)
    batch_size: int = rule(min=1)
    epochs: int = rule(min=1)
    learning_rate: float = rule(min=0.0, min_exclusive=True)
    weight_decay: float = rule(min=0.0)
    optimizer: str = rule(choices=("adam", "adamw", "sgd"))
    schedule: str = rule(choices=("constant", "cosine"))
    patience: int = rule(min=1)
    conv_channels: list[int] = rule()
    conv_kernel: int = rule(min=1)
    pool_sizes: list[int] = rule()
    pooling: str = rule(choices=("l2", "rms"),
                        doc="cnn: the time-pooled spread, L2 norm (Dieleman) or rms (does not grow with length)")
    dense_units: int = rule(min=1)
    dropout: float = rule(min=0.0, max=0.95)
    validation_fraction: float = rule(min=0.0, max=0.5)
    loader_workers: int = rule(min=1)
    device: str = rule(choices=("auto", "cpu", "cuda"))
    seed: int = rule(min=0)
    label_separator: str = rule(doc="labels target: separator between a track's labels")
    rows_per_row_group: int = rule(min=1, doc="training examples per Parquet row group (one Petastorm batch)")
    rows_per_file: int = rule(min=1)
    shuffle_buffer_rows: int = rule(min=1, doc="rows shuffled across row groups before batching")
    epoch_retries: int = rule(min=0, doc="re-reads of an epoch that Petastorm ends short")
    resume: bool = rule()
    retrain_every_days: float = rule(min=0.0, doc="train when the served model is this old; 0 = every run")
    retrain_change_fraction: float = rule(min=0.0, doc="train when the catalogue or factor tracks changed this much")
    promotion_tolerance: float = rule(min=0.0, doc="relative validation-loss slack a new model may lose by")
    require_promotion: bool = rule(doc="a model that is not promoted fails the quality gate (exit 4)")
    # Training on several processes / GPUs (TorchDistributor; stages/train.py)
    processes: int = rule(min=1, doc="training processes (GPUs); 1 = in-process, >1 = TorchDistributor + DDP")
    local_mode: bool = rule(doc="processes > 1: torchrun on the driver (true) or barrier tasks on executors")
    cpu_threads: int = rule(min=0, doc="torch CPU threads per training process; 0 = torch's default (one process), cores / ranks")
    lr_scaling: str = rule(choices=("auto", "linear", "sqrt", "none"),
                           doc="learning rate x N (linear) or x sqrt(N) with the global batch; auto: sqrt for adam(w)")
    distributed_timeout_s: int = rule(min=1, doc="torch.distributed timeout: a rank silent this long fails the run")
    fault_kill_rank_at_batch: int = rule(min=-1, doc="tests: the last rank SIGKILLs itself at this batch; -1 = off")


@dataclass(frozen=True)
class InferConf:
    model: str = rule(doc="model id to score with; empty = the latest")
    scoring: str = rule(choices=("whole", "windows"))
    window_seconds: float = rule(min=0.5)
    batch_size: int = rule(min=1)
    precision: str = rule(choices=("auto", "fp32", "bf16"),
                          doc="scoring precision: auto = bf16 on CPUs with native bf16, fp16 on CUDA")
    min_listeners_for_usage: int = rule(min=0, doc="tracks with fewer listeners are served audio factors")
    incremental: bool = rule()
    serving: str = rule(choices=("blend", "threshold"), doc="how tracks with little usage are served")
    blend_prior_strength: float = rule(min=0.0, doc="precision of the audio prior in the blend")
    blend_max_listeners: int = rule(min=1, doc="tracks with more listeners are served pure usage")
    metadata_prior: bool = rule(doc="cold tracks of a known album/artist: audio blended with its warm tracks' mean")
    metadata_levels: list[str] = rule(choices=("album", "artist"), doc="the prior's groups, most specific first")
    metadata_min_validation_tracks: int = rule(min=1, doc="a level's weight is fitted on at least this many")
    top_labels: int = rule(min=1, doc="labels model: most probable labels kept per track (predicted_labels)")
    gpu_batch_size: int = rule(min=1, doc="batch_size on a task that has a CUDA device")
    gpu_precision: str = rule(choices=("auto", "fp32", "bf16"), doc="precision on a task that has a CUDA device")


@dataclass(frozen=True)
class NeighboursConf:
    k: int = rule(min=1, doc="similar tracks per track")
    index: str = rule(choices=("flat", "ivf", "hnsw"), doc="exact IndexFlatIP, IVFFlat or HNSWFlat")
    nlist: int = rule(min=1, doc="ivf: coarse cells")
    nprobe: int = rule(min=1, doc="ivf: cells searched per query")
    ivf_train_rows: int = rule(min=1, doc="ivf: sample the shared coarse quantiser is trained on")
    hnsw_m: int = rule(min=2, doc="hnsw: graph degree")
    ef_construction: int = rule(min=1, doc="hnsw: build beam")
    ef_search: int = rule(min=1, doc="hnsw: search beam")
    shards: int = rule(min=0, doc="catalogue shards; 0 = derived from the catalogue size")
    shard_rows: int = rule(min=1, doc="derived shards hold at most this many tracks")
    blocks: int = rule(min=0, doc="query blocks; 0 = derived from the queries and cores")
    block_rows: int = rule(min=1, doc="derived blocks hold at most this many queries")
    tasks_per_core: int = rule(min=1, doc="derived blocks: at least this many pair tasks per core")
    min_recall: float = rule(min=0.0, max=1.0, doc="approximate recall@k under this fails the stage")
    recall_sample: int = rule(min=0, doc="queries also searched exactly to measure recall")
    sounds_like: bool = rule(doc="also neighbours over predicted_factors alone")
    content: str = rule(choices=("auto", "predicted_factors", "audio_embeddings"),
                        doc="sounds_like's vectors; auto: predicted_factors if any, else audio_embeddings")
    recommendations: bool = rule(doc="also user_recommendations (all tracks and cold-start only)")
    top_n: int = rule(min=1, doc="recommendations per user and list")
    keep_index_runs: int = rule(min=1, doc="persisted index runs kept under <warehouse>/indexes")
    seed: int = rule(min=0)


@dataclass(frozen=True)
class BaselineConf:
    n_mfcc: int = rule(min=1, max=128, doc="MFCCs per frame (each with its delta and delta-delta)")
    delta_width: int = rule(choices=(3, 5, 7, 9, 11, 13, 15), doc="frames of the Savitzky-Golay delta window")
    codebook_size: int = rule(min=2, doc="K-means codewords (the bag-of-words vocabulary)")
    kmeans_frames_per_track: int = rule(min=1, doc="frames each track gives the K-means sample")
    kmeans_max_frames: int = rule(min=100, doc="K-means sample cap: tracks are hash-sampled beyond it")
    kmeans_iterations: int = rule(min=1)
    seed: int = rule(min=0)
    pca_variance: float = rule(min=0.0, max=1.0, min_exclusive=True, doc="share of variance PCA keeps")
    ridge: float = rule(min=0.0, doc="ridge penalty relative to the kept components' mean variance")


@dataclass(frozen=True)
class EvaluateConf:
    model: str = rule(doc="model id of the CNN row; empty = infer.model, else the latest")
    splits: list[str] = rule(choices=("cold", "validation", "sparse_warm", "sparse_warm_validation"))
    predictors: list[str] = rule(choices=("random", "baseline", "cnn", "metadata", "upper_bound"))
    users_per_task: int = rule(min=1, doc="users per scoring task (about: hash blocks)")
    candidates_per_block: int = rule(min=1, doc="candidate tracks per block a task holds")
    label_k: int = rule(min=1, doc="labels model: label precision@k of the embeddings' neighbours")
    label_accuracy_at: list[int] = rule(min=1, doc="labels model: top-k label accuracies on validation tracks")
    label_max_queries: int = rule(min=0, doc="labels model: validation tracks scored (hash sample); 0 = all")


@dataclass(frozen=True)
class ReportConf:
    map_tracks: int = rule(min=0, doc="serving vectors on the report's 2-D map (a hash sample); 0 = no map")
    perplexity: float = rule(min=1.0, doc="t-SNE perplexity of the map (capped for small samples)")
    playlists: int = rule(min=0, doc="example query tracks, with their nearest neighbours")
    playlist_length: int = rule(min=1, doc="neighbours shown per example query")
    excerpt_seconds: float = rule(min=1.0, max=60.0, doc="audio excerpt per playlist track, from its middle")
    audio_format: str = rule(choices=("ogg", "wav"), doc="excerpt encoding: Vorbis in Ogg, or 16-bit WAV")
    keep: int = rule(min=1, doc="reports kept under <warehouse>/reports (the newest; never LATEST's)")
    seed: int = rule(min=0, doc="hash seed of the map sample and the example queries")


@dataclass(frozen=True)
class NightlyConf:
    max_reject_rate: float = rule(min=0.0, max=1.0, doc="rejected share of a stage's input over which the gate fails")
    skip_unchanged: bool = rule(doc="skip a stage whose inputs are those of its last succeeded run")
    keep_runs: int = rule(min=1, doc="runs whose models, checkpoints and reports are kept")


@dataclass(frozen=True)
class FaultsConf:
    fail_once: list[str] = rule(choices=FAULT_POINTS,
                                doc="tests only: these task bodies fail their first attempt once (core/faults.py)")
    crash_once: list[str] = rule(choices=FAULT_POINTS, doc="tests only: the Python process exits here, once")
    stall_once: list[str] = rule(choices=FAULT_POINTS, doc="tests only: the process sleeps stall_seconds here, once")
    stall_seconds: float = rule(min=0.0, doc="how long a stall_once point sleeps")
    state_dir: str = rule(doc="where the faults mark a point as fired; a folder every executor sees")


@dataclass(frozen=True)
class Config:
    warehouse: WarehouseConf
    spark: SparkConf
    demo: DemoConf
    ingest: IngestConf
    factors: FactorsConf
    train: TrainConf
    infer: InferConf
    neighbours: NeighboursConf
    baseline: BaselineConf
    evaluate: EvaluateConf
    nightly: NightlyConf
    report: ReportConf
    faults: FaultsConf

    def replace(self, **overrides: Any) -> "Config":
        """A copy with dotted-key overrides, validated like the file."""
        return build_config(to_dict(self), overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _allowed(meta: Mapping[str, Any], typ: Any) -> str:
    parts = [getattr(typ, "__name__", str(typ))]
    if meta.get("choices"):
        parts.append("one of " + ", ".join(map(repr, meta["choices"])))
    if meta.get("min") is not None:
        parts.append(("> " if meta.get("min_exclusive") else ">= ") + str(meta["min"]))
    if meta.get("max") is not None:
        parts.append("<= " + str(meta["max"]))
    return "; ".join(parts)


def _check_scalar(key: str, value: Any, typ: type, meta: Mapping[str, Any]) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise ConfigError(f"{key} = {value!r}: expected {_allowed(meta, typ)}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key} = {value!r}: expected {_allowed(meta, typ)}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        raise ConfigError(f"{key} = {value!r}: expected {_allowed(meta, typ)}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} = {value!r}: expected {_allowed(meta, typ)}")
    return value


def _check_value(key: str, value: Any, typ: Any, meta: Mapping[str, Any]) -> Any:
    if typing.get_origin(typ) is list:
        (item_type,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list of {item_type.__name__}")
        return [_check_scalar(f"{key}[{i}]", v, item_type, meta) for i, v in enumerate(value)]
    return _check_scalar(key, value, typ, meta)


def _build_section(cls: type, name: str, raw: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}; allowed keys in [{name}]: "
                          + ", ".join(sorted(fields)))
    missing = sorted(set(fields) - set(raw))
    if missing:
        raise ConfigError(f"missing key {name}.{missing[0]} (every default belongs in conf/deepcuts.toml)")
    values = {k: _check_value(f"{name}.{k}", raw[k], hints[k], fields[k].metadata) for k in fields}
    return cls(**values)


def parse_override_value(text: str) -> Any:
    """Parse the value of ``--set key=value`` as TOML (numbers, booleans, lists), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key or "." in key:
            raise ConfigError(f"override {dotted!r}: expected section.key")
        if section not in raw:
            raise ConfigError(f"unknown section {section!r} in override {dotted!r}; sections: "
                              + ", ".join(sorted(raw)))
        raw[section][key] = parse_override_value(value) if isinstance(value, str) else value


def _cross_checks(cfg: Config) -> None:
    ing = cfg.ingest
    if ing.min_source_rate > ing.max_source_rate:
        raise ConfigError("ingest.min_source_rate must be <= ingest.max_source_rate")
    if ing.excerpt == "middle" and ing.min_seconds > ing.excerpt_seconds:
        raise ConfigError("ingest.min_seconds must be <= ingest.excerpt_seconds")
    if ing.excerpt == "whole" and ing.min_seconds > ing.whole_max_seconds:
        raise ConfigError("ingest.min_seconds must be <= ingest.whole_max_seconds")
    if cfg.train.crop_seconds > ing.min_seconds:
        raise ConfigError(f"train.crop_seconds ({cfg.train.crop_seconds}) must be <= ingest.min_seconds "
                          f"({ing.min_seconds}): every stored mel must cover the model's window")
    if ing.n_fft < ing.hop_length:
        raise ConfigError("ingest.n_fft must be >= ingest.hop_length")
    if cfg.demo.min_seconds > cfg.demo.max_seconds:
        raise ConfigError("demo.min_seconds must be <= demo.max_seconds")
    if len(cfg.train.pool_sizes) != len(cfg.train.conv_channels):
        raise ConfigError("train.pool_sizes needs one entry per train.conv_channels entry")
    for key in ("warehouse.root", "ingest.source"):
        section, name = key.split(".")
        if not str(getattr(getattr(cfg, section), name)).strip():
            raise ConfigError(f"{key} is empty: it needs a local path or an s3:// URI")
    armed = [kind for kind in FAULT_KINDS if getattr(cfg.faults, kind)]
    if armed and not cfg.faults.state_dir:
        raise ConfigError(f"faults.{armed[0]} needs faults.state_dir (a folder every executor sees)")
    too_deep = [k for k in cfg.evaluate.label_accuracy_at if k > cfg.infer.top_labels]
    if too_deep:
        raise ConfigError(f"evaluate.label_accuracy_at has {too_deep[0]}: must be <= infer.top_labels "
                          f"({cfg.infer.top_labels}), the labels predicted_labels keeps")


def build_config(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    _apply_overrides(raw, overrides or {})
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; sections: " + ", ".join(sorted(sections)))
    hints = typing.get_type_hints(Config)
    built = {}
    for name in sections:
        if not isinstance(raw.get(name), Mapping):
            raise ConfigError(f"missing section [{name}]")
        built[name] = _build_section(hints[name], name, raw[name])
    cfg = Config(**built)
    _cross_checks(cfg)
    return cfg


def read_default_conf_text() -> str:
    """The defaults file: from the checkout, or bundled into the zip that spark-submit.sh ships."""
    if DEFAULT_CONF_FILE.is_file():
        return DEFAULT_CONF_FILE.read_text()
    bundled = importlib.resources.files("deepcuts").joinpath("_conf/deepcuts.toml")
    if bundled.is_file():
        return bundled.read_text()
    raise ConfigError(f"defaults file not found: {DEFAULT_CONF_FILE} (nor bundled in the package)")


def load_config(conf_file: str | os.PathLike | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Read ``conf/deepcuts.toml`` (or ``conf_file``/``$DEEPCUTS_CONF``), apply overrides, validate.

    ``conf_file`` may hold a subset of keys: it is layered over the defaults.
    """
    raw = tomllib.loads(read_default_conf_text())
    conf_file = conf_file or os.environ.get(CONF_FILE_ENV)
    if conf_file and Path(conf_file).resolve() != DEFAULT_CONF_FILE:
        try:
            with open(conf_file, "rb") as fh:
                layer = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {conf_file}: {exc}") from exc
        for section, values in layer.items():
            if not isinstance(values, Mapping):
                raise ConfigError(f"{conf_file}: top-level key {section!r} must be a [section]")
            raw.setdefault(section, {}).update(values)
    return build_config(raw, overrides)
