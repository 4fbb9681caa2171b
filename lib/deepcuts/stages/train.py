"""The train stage: a CNN learns to predict a track's latent factors (or labels) from its mels.

1. ``trainset.build_training_set`` (Spark) joins mels with their targets, splits by track hash,
   keeps the cold-start tracks out and materialises Parquet for Petastorm.
2. ``train_model`` (plain torch, no Spark) streams random crops through ``loader.EpochReader``,
   with per-band normalisation computed once on the training set.  CUDA with mixed precision
   when present, else CPU, one code path.  A checkpoint after every epoch; a re-run with the
   same training set and config resumes from the last one (a corrupted one is refused).
   Early stopping on validation loss; the best epoch's weights become the model.
3. The artifact goes to ``models/<model_id>/`` (see ``deepcuts.nn.model``).  The evaluate stage
   scores it (cold-start and validation splits) beside random, the MFCC baseline and the upper
   bound on the same users and candidates (``evaluation_results``).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import posixpath
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from deepcuts.core.config import Config, TrainConf, to_dict
from deepcuts.nn.loader import EpochReader, ShortEpochError, band_statistics
from deepcuts.nn.model import FactorCNN, normalise, resolve_device, save_artifact
from deepcuts.core.storage import filesystem_for, read_bytes, write_bytes_atomic
from deepcuts.core.tables import TRAIN_METRICS
from deepcuts.nn.trainset import TrainingSet, build_training_set

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "_checkpoints"
CHECKPOINT_POINTER = "LAST"
CHECKPOINTS_KEPT = 2
METRICS_FILE = "metrics.jsonl"
# Keys that change neither the examples nor the optimisation: a run may resume across them.
RESUMABLE_ACROSS = ("resume", "evaluate", "loader_workers", "epoch_retries", "device", "patience")


class CheckpointError(RuntimeError):
    """A training checkpoint is unreadable, truncated or does not match this run."""


# --- pure helpers -------------------------------------------------------------------------
def checkpoint_key(train_conf: TrainConf, training_set_fingerprint: str) -> str:
    """Identifies one training problem: the examples and every key that shapes the model."""
    conf = {k: v for k, v in dataclasses.asdict(train_conf).items() if k not in RESUMABLE_ACROSS}
    text = json.dumps({"examples": training_set_fingerprint, "train": conf}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2 ** 31)


def make_optimizer(model: nn.Module, t: TrainConf) -> torch.optim.Optimizer:
    params = model.parameters()
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.learning_rate, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, t: TrainConf):
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs, eta_min=t.learning_rate * 0.01)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class WeightedPredictionError(nn.Module):
    """van den Oord et al.'s (2013) WPE, per track: ``mean_i ||W_i^T (y_i - y*_i)||^2``.

    ``weight`` holds each track's W_i = chol(A_i) / sqrt(n_users), flattened row-major
    [B, rank * rank] (see ``trainset``), so the value is the WPE summed over all users,
    minus a constant per track, divided by n_users: a per-user squared error."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rank = prediction.shape[1]
        factor = weight.view(-1, rank, rank)
        projected = torch.einsum("bij,bi->bj", factor, prediction - target)   # W_i^T (y - y*)
        return projected.square().sum(dim=1).mean()


def make_loss(t: TrainConf) -> nn.Module:
    if t.target == "labels":
        return nn.BCEWithLogitsLoss()
    if t.loss == "wpe":
        return WeightedPredictionError()
    return nn.MSELoss()


def uses_target_weight(loss_fn: nn.Module) -> bool:
    return isinstance(loss_fn, WeightedPredictionError)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 \
        else f"{seconds // 60}m{seconds % 60:02d}s"


# --- checkpoints ----------------------------------------------------------------------------
def checkpoint_dir(lk, key: str) -> str:
    return lk.path("models", CHECKPOINTS_DIR, key)


def save_checkpoint(folder: str, epoch: int, state: dict) -> str:
    """Write the epoch's state, then the pointer naming it with its checksum (both atomic)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    name = f"epoch-{epoch:04d}.pt"
    write_bytes_atomic(posixpath.join(folder, name), data)
    pointer = {"file": name, "epoch": epoch, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_bytes_atomic(posixpath.join(folder, CHECKPOINT_POINTER), json.dumps(pointer).encode())
    _drop_old_checkpoints(folder, epoch)
    return posixpath.join(folder, name)


def _drop_old_checkpoints(folder: str, epoch: int) -> None:
    import pyarrow.fs as pafs
    fs, inner = filesystem_for(folder)
    for old in range(max(0, epoch - 50), epoch - CHECKPOINTS_KEPT + 1):
        path = posixpath.join(inner, f"epoch-{old:04d}.pt")
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def load_checkpoint(folder: str) -> dict | None:
    """The last checkpoint's state, None if there is none; CheckpointError if it is damaged."""
    pointer_bytes = read_bytes(posixpath.join(folder, CHECKPOINT_POINTER))
    if pointer_bytes is None:
        return None
    hint = f"delete {folder} or set train.resume = false to start over"
    try:
        pointer = json.loads(pointer_bytes)
        path = posixpath.join(folder, pointer["file"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint pointer {folder}/{CHECKPOINT_POINTER} is corrupted ({exc}); {hint}")
    data = read_bytes(path)
    if data is None:
        raise CheckpointError(f"checkpoint {path} named by {CHECKPOINT_POINTER} is missing; {hint}")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != pointer.get("bytes") or digest != pointer.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated: {len(data)} bytes, sha256 "
                              f"{digest[:12]}..., expected {pointer.get('bytes')} bytes, sha256 "
                              f"{str(pointer.get('sha256'))[:12]}...; {hint}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError for bad archives
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}; {hint}") from exc


# --- training -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: FactorCNN
    model_id: str
    mel_mean: np.ndarray
    mel_std: np.ndarray
    history: list[dict]
    best_epoch: int
    best_validation_loss: float
    resumed_from_epoch: int | None
    stopped_early: bool
    device: str
    checkpoint_dir: str
    extra: dict = field(default_factory=dict)


def _set_seeds(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))


def _run_epoch(model, reader: EpochReader, epoch: int, loss_fn, device, mean, std, *,
               optimizer=None, scaler=None) -> tuple[float, int, float]:
    """One pass; returns (mean loss per row, rows, seconds).  Trains when given an optimizer."""
    training = optimizer is not None
    model.train(training)
    use_amp = device.type == "cuda"
    total, rows, started = 0.0, 0, time.time()
    grad = torch.enable_grad() if training else torch.no_grad()
    with grad:
        for mel, target, *weight in reader.batches(epoch):
            x = normalise(torch.from_numpy(mel).to(device, non_blocking=True), mean, std)
            y = torch.from_numpy(target).to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                out = model(x)
            if weight:   # wpe: the reader delivers each track's weight factor too
                loss = loss_fn(out.float(), y, torch.from_numpy(weight[0]).to(device, non_blocking=True))
            else:
                loss = loss_fn(out.float(), y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            total += float(loss.detach()) * len(mel)
            rows += len(mel)
    return (total / rows if rows else float("nan")), rows, time.time() - started


def train_model(cfg: Config, ts: TrainingSet, lk, run_id: str, device: torch.device | None = None,
                echo=print) -> TrainResult:
    """Train (or resume) on a committed training set; returns the best epoch's model."""
    t = cfg.train
    device = device or resolve_device(t.device)
    key = checkpoint_key(t, ts.fingerprint)
    ckpt_dir = checkpoint_dir(lk, key)
    _set_seeds(t.seed)
    model = FactorCNN.from_train_conf(t, n_mels=ts.n_mels, out_dim=ts.out_dim)
    if ts.crop_frames < model.min_frames:
        raise ValueError(f"train.crop_seconds gives {ts.crop_frames} frames; the model "
                         f"(conv_kernel {t.conv_kernel}, pools {t.pool_sizes}) needs >= {model.min_frames}")
    model.to(device)
    optimizer = make_optimizer(model, t)
    schedule = make_schedule(optimizer, t)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    loss_fn = make_loss(t)
    weighted = uses_target_weight(loss_fn)
    if weighted != (ts.loss == "wpe"):
        raise ValueError(f"train.loss = {t.loss!r} but training set {ts.run_id} was built for loss "
                         f"{ts.loss!r}: rebuild it (build_training_set) with this config")

    state = load_checkpoint(ckpt_dir) if t.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        mel_mean = np.asarray(state["mel_mean"], dtype=np.float32)
        mel_std = np.asarray(state["mel_std"], dtype=np.float32)
        model_id, history = state["model_id"], list(state["history"])
        start_epoch, best_loss, best_epoch = state["epoch"] + 1, state["best_loss"], state["best_epoch"]
        best_weights, bad_epochs, finished = state["best_model"], state["bad_epochs"], state["finished"]
        resumed_from = state["epoch"]
        echo(f"train: resuming {model_id} after epoch {resumed_from + 1} from {ckpt_dir}")
    else:
        started = time.time()
        mel_mean, mel_std = band_statistics(ts.train_files, ts.train_rows, ts.n_mels, ts.crop_frames,
                                            t.seed, workers=t.loader_workers,
                                            empty_epoch_retries=t.epoch_retries)
        echo(f"train: per-band normalisation from {ts.train_rows} training mels in {time.time() - started:.1f} s")
        model_id = f"cnn-{run_id.split('-', 1)[-1]}"
        history, start_epoch, best_loss, best_epoch = [], 0, math.inf, -1
        best_weights, bad_epochs, finished, resumed_from = None, 0, False, None
    mean = torch.from_numpy(mel_mean).to(device)
    std = torch.from_numpy(mel_std).to(device)

    reader_args = dict(n_mels=ts.n_mels, crop_frames=ts.crop_frames, batch_size=t.batch_size,
                       seed=t.seed, workers=t.loader_workers, shuffle_buffer_rows=t.shuffle_buffer_rows,
                       empty_epoch_retries=t.epoch_retries, with_target_weight=weighted)
    train_reader = EpochReader(ts.train_files, ts.train_rows, train=True, **reader_args)
    val_reader = (EpochReader(ts.validation_files, ts.validation_rows, train=False, **reader_args)
                  if ts.validation_rows else None)
    metrics_path = posixpath.join(ckpt_dir, METRICS_FILE)
    run_started = time.time()
    epochs_done_here = 0
    epoch = start_epoch
    while not finished and epoch < t.epochs:
        before = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                  "scaler": scaler.state_dict()}
        for attempt in range(t.epoch_retries + 1):
            torch.manual_seed(epoch_seed(t.seed, epoch))  # dropout: the same draws on a resumed run
            try:
                train_loss, train_rows, train_s = _run_epoch(model, train_reader, epoch, loss_fn, device,
                                                             mean, std, optimizer=optimizer, scaler=scaler)
                break
            except ShortEpochError as exc:
                if attempt == t.epoch_retries:
                    raise
                echo(f"train: {exc}; redoing epoch {epoch + 1} from its starting state")
                model.load_state_dict(before["model"])
                optimizer.load_state_dict(before["optimizer"])
                scaler.load_state_dict(before["scaler"])
        if val_reader is not None:
            val_loss, val_rows, _ = _run_epoch(model, val_reader, 0, loss_fn, device, mean, std)
        else:
            val_loss, val_rows = train_loss, 0   # too few tracks for a validation split
        learning_rate = optimizer.param_groups[0]["lr"]
        schedule.step()
        improved = val_loss < best_loss - 1e-6
        if improved:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
            best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        epochs_done_here += 1
        row = {"model_id": model_id, "epoch": epoch + 1, "train_loss": train_loss, "validation_loss": val_loss,
               "train_rows": train_rows, "validation_rows": val_rows,
               "crops_per_s": train_rows / train_s if train_s > 0 else None,
               "learning_rate": learning_rate, "seconds": time.time() - run_started, "run_id": run_id}
        history.append(row)
        finished = bad_epochs >= t.patience or epoch + 1 >= t.epochs
        save_checkpoint(ckpt_dir, epoch, {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "best_loss": best_loss, "best_epoch": best_epoch,
            "best_model": best_weights, "bad_epochs": bad_epochs, "finished": finished,
            "mel_mean": mel_mean.tolist(), "mel_std": mel_std.tolist(), "model_id": model_id,
            "history": history})
        _append_metrics(metrics_path, row)
        per_epoch = (time.time() - run_started) / epochs_done_here
        left = per_epoch * (t.epochs - epoch - 1) if not finished else 0.0
        echo(f"train: epoch {epoch + 1}/{t.epochs} loss {train_loss:.4f} val {val_loss:.4f}"
             f"{' *' if improved else ''} | {row['crops_per_s'] or 0:.0f} crops/s on {device.type} | "
             f"lr {learning_rate:.2e} | left ~{format_duration(left)}"
             + (" | early stop" if finished and epoch + 1 < t.epochs else ""))
        epoch += 1
    if best_weights is not None:
        model.load_state_dict(best_weights)
    model.eval()
    stopped_early = bool(history) and history[-1]["epoch"] < t.epochs
    return TrainResult(model=model, model_id=model_id, mel_mean=mel_mean, mel_std=mel_std, history=history,
                       best_epoch=best_epoch + 1, best_validation_loss=best_loss, resumed_from_epoch=resumed_from,
                       stopped_early=stopped_early, device=device.type, checkpoint_dir=ckpt_dir)


def _append_metrics(path: str, row: dict) -> None:
    """The per-epoch metrics file (JSON lines), rewritten whole so it is never half-written."""
    old = read_bytes(path) or b""
    write_bytes_atomic(path, old + (json.dumps(row) + "\n").encode())


def artifact_meta(cfg: Config, ts: TrainingSet, result: TrainResult) -> dict:
    return {
        "model_id": result.model_id, "target": ts.target, "n_mels": ts.n_mels,
        "out_dim": result.model.embed_dim, "n_outputs": ts.out_dim,
        # wpe learns raw-scale ALS factors (y*_i), served as is; mse learns directions.
        "target_column": ("labels" if ts.target != "factors" else "factors" if ts.loss == "wpe"
                          else "factors_unit"),
        "loss": "bce" if ts.target == "labels" else ts.loss,
        "output_scale": ("labels" if ts.target != "factors" else "raw_factors" if ts.loss == "wpe"
                         else "unit_factors"),
        "train": to_dict(cfg.train), "mel_mean": result.mel_mean.tolist(), "mel_std": result.mel_std.tolist(),
        "crop_frames": ts.crop_frames, "sample_rate": cfg.ingest.sample_rate, "hop_length": cfg.ingest.hop_length,
        "factors_run_id": ts.source_run_id if ts.target == "factors" else None,
        "source_run_id": ts.source_run_id, "training_set_run_id": ts.run_id,
        "label_names": ts.label_names,
        "validation": {"best_epoch": result.best_epoch, "loss": result.best_validation_loss,
                       "epochs_run": len(result.history), "stopped_early": result.stopped_early,
                       "train_rows": ts.train_rows, "validation_rows": ts.validation_rows},
        "device": result.device,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- the stage --------------------------------------------------------------------------------
def run(ctx) -> dict:
    spark, cfg, run_id, lk = ctx.spark, ctx.cfg, ctx.run_id, ctx.lake
    t = cfg.train
    make_loss(t)  # an unusable loss/target combination fails before any Spark work
    ts = build_training_set(ctx)
    device = resolve_device(t.device)
    echo = lambda line: print(line, file=sys.stdout, flush=True)  # noqa: E731
    echo(f"train: {ts.train_rows} train / {ts.validation_rows} validation tracks, target {ts.target} "
         f"({ts.out_dim} outputs), {ts.crop_frames}-frame crops, device {device.type}")
    result = train_model(cfg, ts, lk, run_id, device, echo=echo)

    # Published only once it is complete: LATEST moves last.  (Evaluated by the evaluate stage.)
    artifact_dir = save_artifact(lk, result.model_id, result.model, artifact_meta(cfg, ts, result))
    epoch_metrics = read_bytes(posixpath.join(result.checkpoint_dir, METRICS_FILE))
    if epoch_metrics is not None:
        write_bytes_atomic(posixpath.join(artifact_dir, METRICS_FILE), epoch_metrics)

    new_rows = [r for r in result.history if r["run_id"] == run_id]
    if new_rows:
        from deepcuts.core.tables import spark_schema
        ctx.write(spark.createDataFrame(new_rows, spark_schema(TRAIN_METRICS)), TRAIN_METRICS, mode="append")
    summary = {
        "model_id": result.model_id, "artifact": artifact_dir, "device": result.device,
        "training_set": f"{ts.run_id} ({ts.train_rows} train, {ts.validation_rows} validation)",
        "rejects": ts.summary.get("rejects") or {},
        "factors_run_id": ts.source_run_id if ts.target == "factors" else None,
        "epochs_run": len(result.history),
        "resumed_after_epoch": None if result.resumed_from_epoch is None else result.resumed_from_epoch + 1,
        "best_epoch": result.best_epoch, "best_validation_loss": round(result.best_validation_loss, 6),
        "stopped_early": result.stopped_early,
        "crops_per_s": round(float(np.mean([r["crops_per_s"] or 0 for r in new_rows])), 1) if new_rows else None,
    }
    summary["cold_start"] = ("not evaluated (labels target: embeddings are not in the ALS space)"
                             if ts.target == "labels" else "see the evaluate stage (evaluation_results)")
    return summary
