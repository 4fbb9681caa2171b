"""The train stage: a CNN learns to predict a track's latent factors (or labels) from its mels.

1. ``trainset.build_training_set`` (Spark) joins mels with their targets, splits by track hash,
   keeps the cold-start tracks out and materialises Parquet for Petastorm.
2. ``train.model`` picks the model (``resolve_model_kind``; ``"auto"`` by the training set's
   size).  ``"ridge"``: ``fit_ridge_model`` runs the random conv stack once over both splits
   on the executors and fits the linear head in closed form (:mod:`deepcuts.nn.ridge`; ~30
   core-hours at 10^6 tracks, ~300 at 10^7, the driver holding d x d moments only; with
   ``train.transfer = "musicnn"`` the pretrained network's features too, ~150 more at 10^6,
   :mod:`deepcuts.nn.pretrained`).
   ``"cnn"``: ``train_model`` (plain torch, no Spark) streams random crops through ``loader.EpochReader``,
   with per-band normalisation computed once on the training set.  CUDA with mixed precision
   when present, else CPU, one code path.  A checkpoint after every epoch; a re-run with the
   same training set and config resumes from the last one (a corrupted one is refused).
   Early stopping on validation loss; the best epoch's weights become the model.
3. The artifact goes to ``models/<model_id>/`` (see ``deepcuts.nn.model``).  The evaluate stage
   scores it (cold-start and validation splits) beside random, the MFCC baseline and the upper
   bound on the same users and candidates (``evaluation_results``).
4. Only when due, and only promoted when it is not worse (:mod:`deepcuts.nn.promotion`): the
   served model is scored on the same validation tracks first; a model that loses is kept
   under ``models/`` but ``models/LATEST`` keeps naming the served one.

Cost: the training-set build is a join of ``mels`` with the factors, i.e. the mel bytes
read and shuffled once (~330 GB at 10^6 tracks of 30 s excerpts, ~3.3 TB at 10^7): both
sides are hashed by track into partitions of ``spark.partition_mb``, so the join is also
the final layout, kept on the executors' local disks (the same bytes again) while the
train, validation and reject splits are written from it as Petastorm row groups; with
``train.loss = "wpe"`` the fit's play pairs are shuffled by track once more (4 x rank + 48
B a pair, partitions sized from the factors run's pair count) and streamed per track
(rank^2 doubles held per task); each epoch then reads every training mel once (the same
bytes again, streamed, a few row groups in memory).  The forward/backward pass dominates:
at the measured 226 crops/s on this 2-core CPU an epoch of 10^6 tracks is ~74 min, on a GPU (the
default 6.5 M-parameter network) minutes; 10^7 tracks x10, which is what multi-GPU
training is for.  The promotion gate adds one validation pass of the served model
(``train.validation_fraction`` of the tracks).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from deepcuts.core.config import Config, TrainConf, to_dict
from deepcuts.core.faults import OFF, Switches, inject, switches
from deepcuts.nn.loader import (EpochReader, ShortEpochError, band_statistics, band_statistics_from_sums,
                                band_sums, epoch_plan, row_group_rows, shard_rows)
from deepcuts.nn.model import FactorCNN, normalise, resolve_device, save_artifact, state_dict_bytes
from deepcuts.core.storage import filesystem_for, read_bytes, write_bytes_atomic
from deepcuts.core.tables import (FACTOR_ALIGNMENTS, MELS, TRACK_FACTORS, TRAIN_EXAMPLES, TRAIN_METRICS,
                                  VALIDATION_EXAMPLES)
from deepcuts.cf.align import current_lineage, model_space
from deepcuts.nn.promotion import comparable, promote, training_due
from deepcuts.nn.trainset import TrainingSet, build_training_set

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "_checkpoints"
CHECKPOINT_POINTER = "LAST"
CHECKPOINTS_KEPT = 2
METRICS_FILE = "metrics.jsonl"
# Keys that change neither the examples nor the optimisation: a run may resume across them.
# ``processes`` / ``lr_scaling`` are among them: a run resumes on any number of processes (the
# checkpoint records the learning-rate factor it ran with and the rate is rescaled on resume).
RESUMABLE_ACROSS = ("auto_ridge_below_tracks", "ridge_penalties", "resume", "evaluate", "loader_workers", "epoch_retries", "device", "patience",
                    "retrain_every_days", "retrain_change_fraction", "promotion_tolerance", "require_promotion",
                    "processes", "local_mode", "lr_scaling", "distributed_timeout_s", "fault_kill_rank_at_batch")


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


def lr_factor(t: TrainConf, processes: int) -> float:
    """The learning-rate multiplier for ``processes`` ranks of ``t.batch_size`` each: the global
    batch is processes x batch_size.  linear: x N (Goyal et al. 2017, SGD); sqrt: x sqrt(N)
    (Adam's per-coordinate step, Malladi et al. 2022); auto: sqrt for adam/adamw, linear for sgd."""
    rule = t.lr_scaling if t.lr_scaling != "auto" else ("linear" if t.optimizer == "sgd" else "sqrt")
    if processes <= 1 or rule == "none":
        return 1.0
    return float(processes) if rule == "linear" else math.sqrt(processes)


def rescale_learning_rate(optimizer: torch.optim.Optimizer, schedule, ratio: float) -> None:
    """Multiply the optimizer's and the schedule's rates by ``ratio`` (a resume on another
    number of processes): cosine annealing is linear in (lr, base lr, eta_min), so the
    schedule goes on where it was, at the new scale."""
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    schedule.base_lrs = [lr * ratio for lr in schedule.base_lrs]
    if hasattr(schedule, "eta_min"):
        schedule.eta_min *= ratio
    if hasattr(schedule, "_last_lr"):
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


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
               optimizer=None, scaler=None, faults: Switches = OFF) -> tuple[float, int, float]:
    """One pass; returns (mean loss per row, rows, seconds).  Trains when given an optimizer.
    ``faults`` (tests): the ``train.batch`` point, after a batch of an epoch past the first."""
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
                if epoch >= 1:
                    inject("train.batch", faults)
            total += float(loss.detach()) * len(mel)
            rows += len(mel)
    return (total / rows if rows else float("nan")), rows, time.time() - started


def reader_args(ts: TrainingSet, t: TrainConf, weighted: bool) -> dict:
    return dict(n_mels=ts.n_mels, crop_frames=ts.crop_frames, batch_size=t.batch_size,
                seed=t.seed, workers=t.loader_workers, shuffle_buffer_rows=t.shuffle_buffer_rows,
                empty_epoch_retries=t.epoch_retries, with_target_weight=weighted)


def validation_reader(ts: TrainingSet, t: TrainConf, weighted: bool) -> EpochReader | None:
    if not ts.validation_rows:
        return None
    return EpochReader(ts.validation_files, ts.validation_rows, train=False, **reader_args(ts, t, weighted))


def validation_loss_of(artifact_dir: str, ts: TrainingSet, t: TrainConf, device) -> float:
    """A saved model's loss on this training set's validation tracks (the promotion gate's
    yardstick: both models measured on the same tracks, crops and loss)."""
    from deepcuts.nn.model import load_artifact
    artifact = load_artifact(artifact_dir, device=device)
    loss_fn = make_loss(t)
    loss, _, _ = _run_epoch(artifact.model, validation_reader(ts, t, uses_target_weight(loss_fn)), 0, loss_fn,
                            device, artifact.mel_mean, artifact.mel_std)
    return loss


def train_model(cfg: Config, ts: TrainingSet, lk, run_id: str, device: torch.device | None = None,
                echo=print) -> TrainResult:
    """Train (or resume) on a committed training set; returns the best epoch's model.

    ``train.processes`` = 1: in this process.  > 1: the same loop on that many ranks through
    TorchDistributor (:func:`distributed_rank_main`); the best weights then come from the
    checkpoint rank 0 wrote."""
    t = cfg.train
    if t.model == "ridge":
        raise ValueError("train_model trains the cnn; a ridge model is fitted by fit_ridge_model")
    ckpt_dir = checkpoint_dir(lk, checkpoint_key(t, ts.fingerprint))
    if t.processes > 1:
        return _train_distributed(cfg, ts, ckpt_dir, run_id, echo)
    device = device or resolve_device(t.device)
    if device.type == "cpu" and t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)      # else torch's own default (physical cores)
    return _train_loop(cfg, ts, ckpt_dir, run_id, device, echo)


def cpu_threads(configured: int, processes_here: int) -> int:
    """torch's intra-op threads for one of ``processes_here`` training processes on this
    machine (a rank's share of the cores unless configured; one process: torch's default)."""
    if configured:
        return configured
    if processes_here == 1:
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // processes_here)


class _Ranks:
    """This process's place among the ranks of a distributed run, and the few collectives the
    loop needs (float64 sums, an int minimum, rank 0's object to all)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        # NCCL reduces CUDA tensors only; gloo takes CPU ones.
        self.tensor_device = device if device.type == "cuda" else torch.device("cpu")

    def sum(self, values) -> list[float]:
        import torch.distributed as dist
        x = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.tensor_device)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.cpu().tolist()

    def sum_array(self, values: np.ndarray) -> np.ndarray:
        import torch.distributed as dist
        x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self.tensor_device)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.cpu().numpy()

    def gather(self, value: float) -> list[float]:
        import torch.distributed as dist
        x = torch.zeros(self.world, dtype=torch.float64, device=self.tensor_device)
        x[self.rank] = float(value)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.cpu().tolist()

    def from_rank0(self, obj):
        import torch.distributed as dist
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.tensor_device)
        return box[0]


class _FaultyReader:
    """Fault injection (``train.fault_kill_rank_at_batch``): the rank SIGKILLs itself when it
    reaches that training batch of the run, as a lost machine or an OOM kill would."""

    def __init__(self, reader: EpochReader, kill_at: int):
        self.reader, self.kill_at, self.seen = reader, kill_at, 0

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def batches(self, epoch: int):
        import signal
        for arrays in self.reader.batches(epoch):
            if self.seen == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            self.seen += 1
            yield arrays


def _train_loop(cfg: Config, ts: TrainingSet, ckpt_dir: str, run_id: str, device: torch.device, echo,
                ranks: _Ranks | None = None) -> TrainResult:
    """The epoch loop, in one process (``ranks`` None) or as one rank of a distributed run:
    then the model is wrapped in DistributedDataParallel, each rank reads its shard, losses and
    row counts are summed over the ranks, and only rank 0 writes checkpoints and metrics."""
    t = cfg.train
    lead = ranks is None or ranks.rank == 0
    _set_seeds(t.seed)
    model = FactorCNN.from_train_conf(t, n_mels=ts.n_mels, out_dim=ts.out_dim)
    if ts.crop_frames < model.min_frames:
        raise ValueError(f"train.crop_seconds gives {ts.crop_frames} frames; the model "
                         f"(conv_kernel {t.conv_kernel}, pools {t.pool_sizes}) needs >= {model.min_frames}")
    model.to(device)
    factor = lr_factor(t, ranks.world if ranks else 1)
    scaled = t if factor == 1.0 else dataclasses.replace(t, learning_rate=t.learning_rate * factor)
    optimizer = make_optimizer(model, scaled)
    schedule = make_schedule(optimizer, scaled)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    loss_fn = make_loss(t)
    weighted = uses_target_weight(loss_fn)
    if weighted != (ts.loss == "wpe"):
        raise ValueError(f"train.loss = {t.loss!r} but training set {ts.run_id} was built for loss "
                         f"{ts.loss!r}: rebuild it (build_training_set) with this config")

    if ranks is not None:
        plan = _shard_plan(ts, t, ranks.world)
    state = load_checkpoint(ckpt_dir) if t.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        if state.get("lr_factor", 1.0) != factor:   # resumed on another number of processes
            rescale_learning_rate(optimizer, schedule, factor / state.get("lr_factor", 1.0))
        mel_mean = np.asarray(state["mel_mean"], dtype=np.float32)
        mel_std = np.asarray(state["mel_std"], dtype=np.float32)
        model_id, history = state["model_id"], list(state["history"])
        start_epoch, best_loss, best_epoch = state["epoch"] + 1, state["best_loss"], state["best_epoch"]
        best_weights, bad_epochs, finished = state["best_model"], state["bad_epochs"], state["finished"]
        resumed_from = state["epoch"]
        if lead:
            echo(f"train: resuming {model_id} after epoch {resumed_from + 1} from {ckpt_dir}")
    else:
        started = time.time()
        if ranks is None:
            mel_mean, mel_std = band_statistics(ts.train_files, ts.train_rows, ts.n_mels, ts.crop_frames,
                                                t.seed, workers=t.loader_workers,
                                                empty_epoch_retries=t.epoch_retries)
        else:   # each rank sums its shard; the sums are added up
            total, total_sq, rows = band_sums(ts.train_files, plan["shard_rows"][ranks.rank], ts.n_mels,
                                              ts.crop_frames, t.seed, workers=t.loader_workers,
                                              empty_epoch_retries=t.epoch_retries,
                                              cur_shard=ranks.rank, shard_count=ranks.world)
            summed = ranks.sum_array(np.concatenate([total, total_sq, [rows]]))
            if int(summed[-1]) != ts.train_rows:
                raise ShortEpochError(f"band statistics read {int(summed[-1])} rows over {ranks.world} "
                                      f"shards, the training set holds {ts.train_rows}")
            mel_mean, mel_std = band_statistics_from_sums(summed[:ts.n_mels], summed[ts.n_mels:-1],
                                                          int(summed[-1]), ts.crop_frames)
        if lead:
            echo(f"train: per-band normalisation from {ts.train_rows} training mels in "
                 f"{time.time() - started:.1f} s")
        model_id = f"cnn-{run_id.split('-', 1)[-1]}"
        history, start_epoch, best_loss, best_epoch = [], 0, math.inf, -1
        best_weights, bad_epochs, finished, resumed_from = None, 0, False, None
    mean = torch.from_numpy(mel_mean).to(device)
    std = torch.from_numpy(mel_std).to(device)

    if ranks is None:
        train_reader = EpochReader(ts.train_files, ts.train_rows, train=True, **reader_args(ts, t, weighted))
        val_reader = validation_reader(ts, t, weighted)
        net = model
    else:
        from torch.nn.parallel import DistributedDataParallel
        train_reader, val_reader = rank_readers(ts, t, weighted, ranks.rank, ranks.world, plan)
        if t.fault_kill_rank_at_batch >= 0 and ranks.rank == ranks.world - 1:
            train_reader = _FaultyReader(train_reader, t.fault_kill_rank_at_batch)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if lead:
            echo(f"train: {ranks.world} processes on {device.type}, {plan['batches']} batches of "
                 f"{t.batch_size} per rank and epoch (global batch {ranks.world * t.batch_size}, learning "
                 f"rate x {factor:.3g}); {ts.train_rows - plan['epoch_rows']} of {ts.train_rows} rows left out "
                 f"of each epoch (shards of {plan['shard_rows']} rows)")
    metrics_path = posixpath.join(ckpt_dir, METRICS_FILE)
    run_started = time.time()
    epochs_done_here = 0
    epoch = start_epoch
    while not finished and epoch < t.epochs:
        before = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                  "scaler": scaler.state_dict()}
        for attempt in range(t.epoch_retries + 1):
            # dropout: the same draws on a resumed run (and other draws on every rank)
            torch.manual_seed(epoch_seed(t.seed, epoch) + (ranks.rank if ranks else 0))
            try:
                if ranks is None:
                    train_loss, train_rows, train_s = _run_epoch(model, train_reader, epoch, loss_fn, device,
                                                                 mean, std, optimizer=optimizer, scaler=scaler,
                                                                 faults=switches(cfg.faults))
                else:
                    train_loss, train_rows, train_s = _distributed_epoch(
                        net, train_reader, epoch, loss_fn, device, mean, std, optimizer, scaler, ranks,
                        plan["epoch_rows"], ts.train_rows)
                break
            except ShortEpochError as exc:
                if attempt == t.epoch_retries:
                    raise
                if lead:
                    echo(f"train: {exc}; redoing epoch {epoch + 1} from its starting state")
                model.load_state_dict(before["model"])
                optimizer.load_state_dict(before["optimizer"])
                scaler.load_state_dict(before["scaler"])
        if ranks is not None:
            val_loss, val_rows = _distributed_validation(model, val_reader, loss_fn, device, mean, std, ranks,
                                                         ts.validation_rows, train_loss)
        elif val_reader is not None:
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
        if lead:
            save_checkpoint(ckpt_dir, epoch, {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "best_loss": best_loss, "best_epoch": best_epoch,
                "best_model": best_weights, "bad_epochs": bad_epochs, "finished": finished,
                "mel_mean": mel_mean.tolist(), "mel_std": mel_std.tolist(), "model_id": model_id,
                "history": history, "lr_factor": factor})
            _append_metrics(metrics_path, row)
            per_epoch = (time.time() - run_started) / epochs_done_here
            left = per_epoch * (t.epochs - epoch - 1) if not finished else 0.0
            echo(f"train: epoch {epoch + 1}/{t.epochs} loss {train_loss:.4f} val {val_loss:.4f}"
                 f"{' *' if improved else ''} | {row['crops_per_s'] or 0:.0f} crops/s on "
                 f"{device.type if ranks is None else f'{ranks.world} x {device.type}'} | "
                 f"lr {learning_rate:.2e} | left ~{format_duration(left)}"
                 + (" | early stop" if finished and epoch + 1 < t.epochs else ""))
        epoch += 1
    if best_weights is not None:
        model.load_state_dict(best_weights)
    model.eval()
    stopped_early = bool(history) and history[-1]["epoch"] < t.epochs
    extra = {} if ranks is None else {"processes": ranks.world, "shard_rows": plan["shard_rows"],
                                      "batches_per_epoch": plan["batches"], "epoch_rows": plan["epoch_rows"],
                                      "lr_factor": factor,
                                      # what each rank read in its last epoch here (0 if none ran)
                                      "rank_rows_last_epoch": [int(r) for r in ranks.gather(
                                          train_reader.last_epoch_rows if epochs_done_here else 0)]}
    return TrainResult(model=model, model_id=model_id, mel_mean=mel_mean, mel_std=mel_std, history=history,
                       best_epoch=best_epoch + 1, best_validation_loss=best_loss, resumed_from_epoch=resumed_from,
                       stopped_early=stopped_early, device=device.type, checkpoint_dir=ckpt_dir, extra=extra)


# --- train.model = "ridge" ----------------------------------------------------------------------
def ridge_unsupported(t: TrainConf) -> str | None:
    """Why the ridge model cannot fit this configuration's targets (None: it can)."""
    if t.target != "factors":
        return "a labels target needs the cnn (the ridge model regresses factors)"
    if t.loss != "mse":
        return f"train.loss = {t.loss!r} needs the cnn (the ridge model fits the mse targets)"
    return None


def missing_transfer(t: TrainConf) -> str | None:
    """Why the pretrained features ``train.transfer`` asks for cannot be read (None: they can,
    or none are asked for): the converted weights file is not there."""
    if t.transfer == "none":
        return None
    from deepcuts.nn.pretrained import weights_file
    path = weights_file(t.transfer_weights)
    return None if path.is_file() else f"{path} is missing (bin/bootstrap.sh converts it)"


def candidate_kinds(t: TrainConf, train_rows: int) -> tuple[list[str], str]:
    """The models to fit for ``train.model`` and this many training tracks, and why.  ``auto``
    below ``auto_ridge_below_tracks``: both, and the one with the lower validation loss is
    kept (``choose_kind``); at or above it, the cnn alone (the ridge pass over a large
    catalogue costs about a CNN epoch, and nothing has measured it winning there)."""
    if t.model != "auto":
        return [t.model], f"train.model = {t.model!r}"
    unsupported = ridge_unsupported(t)
    if unsupported:
        return ["cnn"], f"auto: {unsupported}"
    if train_rows < t.auto_ridge_below_tracks:
        return ["ridge", "cnn"], (f"auto: {train_rows} training tracks < train.auto_ridge_below_tracks = "
                                  f"{t.auto_ridge_below_tracks}: both fitted")
    return ["cnn"], f"auto: {train_rows} training tracks >= train.auto_ridge_below_tracks = {t.auto_ridge_below_tracks}"


def choose_kind(losses: dict[str, float | None]) -> str:
    """The kind with the least validation loss (the first listed on a tie: ridge, the cheaper);
    without validation losses (no validation tracks), the cnn."""
    known = {k: v for k, v in losses.items() if v is not None}
    if not known:
        return "cnn"
    return min(known, key=lambda k: (known[k], list(losses).index(k)))


def fit_ridge_model(ctx, cfg: Config, ts: TrainingSet, run_id: str, echo=print) -> TrainResult:
    """The ridge model (:mod:`deepcuts.nn.ridge`): band statistics as for the CNN, then one
    pass of the random conv stack over both splits on the executors and a closed-form fit."""
    from deepcuts.nn import ridge
    t = cfg.train
    _set_seeds(t.seed)
    model = FactorCNN.from_train_conf(t, n_mels=ts.n_mels, out_dim=ts.out_dim).eval()
    started = time.time()
    mel_mean, mel_std = band_statistics(ts.train_files, ts.train_rows, ts.n_mels, ts.crop_frames, t.seed,
                                        workers=t.loader_workers, empty_epoch_retries=t.epoch_retries)
    if model.transfer is not None:
        from deepcuts.nn.pretrained import load_weights
        model.transfer.configure(load_weights(t.transfer_weights), cfg.ingest.sample_rate, cfg.ingest.hop_length,
                                 mel_mean, mel_std)
    train_m = ridge.split_moments(ctx.read(TRAIN_EXAMPLES), model, mel_mean, mel_std)
    val_m = ridge.split_moments(ctx.read(VALIDATION_EXAMPLES), model, mel_mean, mel_std) if ts.validation_rows else None
    got = (int(train_m["n"]) if train_m else 0, int(val_m["n"]) if val_m else 0)
    if got != (ts.train_rows, ts.validation_rows):
        raise RuntimeError(f"the ridge pass read {got[0]} train / {got[1]} validation rows, training set "
                           f"{ts.run_id} holds {ts.train_rows} / {ts.validation_rows}")
    fitted = ridge.fit(train_m, val_m, t.ridge_penalties)
    ridge.set_head(model, fitted)
    seconds = time.time() - started
    model_id = f"ridge-{run_id.split('-', 1)[-1]}"
    validation_loss = fitted.validation_loss if fitted.validation_loss is not None else fitted.train_loss
    what = "random-conv" + (f" + {t.transfer}" if model.transfer is not None else "")
    echo(f"train: ridge on {fitted.used_features} of {fitted.features} pooled {what} features, penalty "
         f"{fitted.penalty:g} (by {fitted.chosen_by}): train loss {fitted.train_loss:.5f}, validation "
         f"{validation_loss:.5f}, {seconds:.1f} s")
    history = [{"model_id": model_id, "epoch": 1, "train_loss": fitted.train_loss, "validation_loss": validation_loss,
                "train_rows": ts.train_rows, "validation_rows": ts.validation_rows, "crops_per_s": None,
                "learning_rate": None, "seconds": seconds, "run_id": run_id}]
    extra = {"ridge": {"penalty": fitted.penalty, "chosen_by": fitted.chosen_by, "features": fitted.features,
                       "transfer": model.transfer_name,
                       "used_features": fitted.used_features,
                       "losses": {f"{p:g}": {k: (None if v is None else round(v, 6)) for k, v in row.items()}
                                  for p, row in fitted.losses.items()}}}
    return TrainResult(model=model, model_id=model_id, mel_mean=mel_mean, mel_std=mel_std, history=history,
                       best_epoch=1, best_validation_loss=validation_loss, resumed_from_epoch=None,
                       stopped_early=False, device="cpu (executors)",
                       checkpoint_dir=checkpoint_dir(ctx.lake, checkpoint_key(t, ts.fingerprint)), extra=extra)


def excerpt_gate_losses(ctx, result: TrainResult, meta: dict, lk, current_id: str, current: dict,
                        new_loss: float | None = None) -> tuple[float, float]:
    """(new, served) validation loss on whole excerpts (``ridge.excerpt_loss``), for a gate
    where either model is a ridge model; ``new_loss``: the new model's, already measured
    (``train.model = "auto"`` scored it to choose the kind)."""
    from deepcuts.nn import ridge
    from deepcuts.nn.model import WEIGHTS_FILE, ModelArtifactError, model_dir
    examples = ctx.read(VALIDATION_EXAMPLES)
    served_path = posixpath.join(model_dir(lk, current_id), WEIGHTS_FILE)
    served_weights = read_bytes(served_path)
    if served_weights is None:
        raise ModelArtifactError(f"model weights {served_path} are missing")
    if new_loss is None:
        new_loss = ridge.excerpt_loss(examples, state_dict_bytes(result.model), meta)
    return new_loss, ridge.excerpt_loss(examples, served_weights, current)


# --- several processes ------------------------------------------------------------------------
def _shard_plan(ts: TrainingSet, t: TrainConf, world: int) -> dict:
    """Each rank's Petastorm shard sizes (from row-group metadata) and the epoch plan: the same
    number of batches on every rank (loader.epoch_plan)."""
    groups = row_group_rows(ts.train_files)
    if len(groups) < world:
        raise ValueError(f"train.processes = {world} but the training set has {len(groups)} row groups: "
                         f"each rank needs at least one (lower train.rows_per_row_group or train.processes)")
    rows = [shard_rows(groups, r, world) for r in range(world)]
    batches, delivered = epoch_plan(rows, t.batch_size)
    val_groups = row_group_rows(ts.validation_files) if ts.validation_rows else []
    val_shards = min(world, len(val_groups))
    return {"shard_rows": rows, "batches": batches, "delivered": delivered, "epoch_rows": sum(delivered),
            "validation_shards": val_shards,
            "validation_rows": [shard_rows(val_groups, r, val_shards) if r < val_shards else 0
                                for r in range(world)]}


def rank_readers(ts: TrainingSet, t: TrainConf, weighted: bool, rank: int, world: int,
                 plan: dict | None = None) -> tuple[EpochReader, EpochReader | None]:
    """(training reader, validation reader or None) of one rank: its Petastorm shards, every
    rank ending its epochs after the plan's batches.  Validation shards over at most as many
    ranks as it has row groups (no equal-batch need: no gradients)."""
    plan = plan or _shard_plan(ts, t, world)
    train = EpochReader(ts.train_files, plan["delivered"][rank], train=True, cur_shard=rank, shard_count=world,
                        max_batches=plan["batches"], **reader_args(ts, t, weighted))
    val = None
    if rank < plan["validation_shards"]:
        val = EpochReader(ts.validation_files, plan["validation_rows"][rank], train=False, cur_shard=rank,
                          shard_count=plan["validation_shards"], **reader_args(ts, t, weighted))
    return train, val


def _distributed_epoch(net, reader, epoch, loss_fn, device, mean, std, optimizer, scaler, ranks: _Ranks,
                       planned_rows: int, table_rows: int) -> tuple[float, int, float]:
    """One training epoch on every rank; (mean loss per row, rows, seconds) over all ranks.

    DDP's join covers a rank whose Petastorm epoch ended early (it shadows the others'
    all-reduces instead of leaving them waiting); the rows summed over ranks are then checked
    against the plan on every rank alike, so all ranks redo (or fail) the epoch together."""
    import warnings
    short = 0
    # Join's exit sets a process-wide warnings.simplefilter("once"): kept to this block.
    with warnings.catch_warnings(), net.join():
        try:
            loss, rows, seconds = _run_epoch(net, reader, epoch, loss_fn, device, mean, std,
                                             optimizer=optimizer, scaler=scaler)
        except ShortEpochError:
            short, loss, rows, seconds = 1, 0.0, reader.last_epoch_rows, 0.0
    loss_sum, total_rows, shorts = ranks.sum([loss * rows if rows else 0.0, rows, short])
    seconds = max(ranks.gather(seconds))
    if shorts or int(total_rows) != planned_rows:
        raise ShortEpochError(f"epoch {epoch} delivered {int(total_rows)} rows over {ranks.world} ranks, the plan "
                              f"holds {planned_rows} of the training set's {table_rows} "
                              f"({int(shorts)} shard(s) short)")
    return loss_sum / total_rows, int(total_rows), seconds


def _distributed_validation(model, reader, loss_fn, device, mean, std, ranks: _Ranks, expected_rows: int,
                            train_loss: float) -> tuple[float, int]:
    """Validation loss over all ranks' validation shards (the plain module, no collectives
    inside: ranks without a shard just wait at the sum)."""
    loss, rows = 0.0, 0
    if reader is not None:
        loss, rows, _ = _run_epoch(model, reader, 0, loss_fn, device, mean, std)
    loss_sum, total_rows = ranks.sum([loss * rows if rows else 0.0, rows])
    if not expected_rows:
        return train_loss, 0   # too few tracks for a validation split
    if int(total_rows) != expected_rows:
        raise ShortEpochError(f"validation delivered {int(total_rows)} rows over {ranks.world} ranks, "
                              f"the validation set holds {expected_rows}")
    return loss_sum / total_rows, int(total_rows)


def distributor_uses_gpu(device: str, local_mode: bool, driver_has_cuda: bool, task_gpu_amount: float) -> bool:
    """TorchDistributor's ``use_gpu``: its default (True) raises where there is no GPU, so it is
    decided here: ``cpu`` never, ``cuda`` always, ``auto`` when the ranks' machines have GPUs
    (the driver's in local mode, the executors' task GPU resource otherwise)."""
    if device == "cpu":
        return False
    if device == "cuda":
        return True
    return driver_has_cuda if local_mode else task_gpu_amount >= 1


def _train_distributed(cfg: Config, ts: TrainingSet, ckpt_dir: str, run_id: str, echo) -> TrainResult:
    """Run :func:`distributed_rank_main` on ``train.processes`` ranks; then the best weights
    from the checkpoint rank 0 wrote."""
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession
    t = cfg.train
    spark = SparkSession.getActiveSession()
    if spark is None:
        raise RuntimeError("train.processes > 1 runs through TorchDistributor, which needs an active SparkSession")
    task_gpus = float(spark.sparkContext.getConf().get("spark.task.resource.gpu.amount", "0"))
    use_gpu = distributor_uses_gpu(t.device, t.local_mode, torch.cuda.is_available(), task_gpus)
    _shard_plan(ts, t, t.processes)   # a training set too small to shard fails here, before any rank starts
    started = time.time()
    try:
        out = TorchDistributor(num_processes=t.processes, local_mode=t.local_mode, use_gpu=use_gpu).run(
            distributed_rank_main, to_dict(cfg), dataclasses.asdict(ts), ckpt_dir, run_id, use_gpu)
    except Exception as exc:   # torchrun's exit status and the ranks' last lines
        raise RuntimeError(f"train: distributed training on {t.processes} processes failed after "
                           f"{time.time() - started:.0f} s; torchrun's lines above name the rank and its exit "
                           f"code (the checkpoints in {ckpt_dir} let a rerun resume): "
                           f"{str(exc)[-4000:]}") from exc
    state = load_checkpoint(ckpt_dir)
    if state is None:
        raise CheckpointError(f"distributed training wrote no checkpoint under {ckpt_dir}")
    model = FactorCNN.from_train_conf(t, n_mels=ts.n_mels, out_dim=ts.out_dim)
    model.load_state_dict(state["best_model"] if state["best_model"] is not None else state["model"])
    model.eval()
    return TrainResult(model=model, model_id=out["model_id"], mel_mean=np.asarray(out["mel_mean"], dtype=np.float32),
                       mel_std=np.asarray(out["mel_std"], dtype=np.float32), history=out["history"],
                       best_epoch=out["best_epoch"], best_validation_loss=out["best_validation_loss"],
                       resumed_from_epoch=out["resumed_from_epoch"], stopped_early=out["stopped_early"],
                       device=out["device"], checkpoint_dir=ckpt_dir, extra=out["extra"])


def distributed_rank_main(cfg_dict: dict, ts_dict: dict, ckpt_dir: str, run_id: str, use_gpu: bool) -> dict:
    """One rank (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): plain arguments in, plain dict
    out (every rank returns rank 0's), no SparkSession."""
    import datetime as dt
    import warnings
    import torch.distributed as dist
    from deepcuts.core.config import build_config
    from deepcuts.nn import loader
    # torchrun's workers start with Python's warnings shown (pyarrow's legacy-dataset notes on
    # every Petastorm read, unclosed-file notes): the same quiet as the driver's.
    warnings.simplefilter("ignore", ResourceWarning)
    loader._silence_legacy_dataset_warnings()
    cfg = build_config(cfg_dict, {})
    ts = TrainingSet(**ts_dict)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(cpu_threads(cfg.train.cpu_threads, local_world))
    dist.init_process_group("nccl" if use_gpu else "gloo",
                            timeout=dt.timedelta(seconds=cfg.train.distributed_timeout_s))
    try:
        echo = (lambda line: print(line, file=sys.stdout, flush=True)) if rank == 0 else (lambda line: None)
        result = _train_loop(cfg, ts, ckpt_dir, run_id, device, echo, _Ranks(rank, world, device))
        out = {"model_id": result.model_id, "mel_mean": result.mel_mean.tolist(),
               "mel_std": result.mel_std.tolist(), "history": result.history, "best_epoch": result.best_epoch,
               "best_validation_loss": result.best_validation_loss,
               "resumed_from_epoch": result.resumed_from_epoch, "stopped_early": result.stopped_early,
               "device": result.device, "extra": result.extra}
        return _Ranks(rank, world, device).from_rank0(out)
    finally:
        dist.destroy_process_group()


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
def served_model(lk) -> tuple[str | None, dict | None]:
    """(id, meta) of the model ``models/LATEST`` serves; (id, None) if its meta is unreadable."""
    from deepcuts.nn.model import latest_model_id, model_dir
    model_id = latest_model_id(lk)
    if model_id is None:
        return None, None
    data = read_bytes(posixpath.join(model_dir(lk, model_id), "meta.json"))
    try:
        return model_id, json.loads(data) if data is not None else None
    except ValueError:
        return model_id, None


def run(ctx) -> dict:
    spark, cfg, run_id, lk = ctx.spark, ctx.cfg, ctx.run_id, ctx.lake
    t = cfg.train
    make_loss(t)  # an unusable loss/target combination fails before any Spark work
    if t.model == "ridge" and ridge_unsupported(t):
        from deepcuts.core.config import ConfigError
        raise ConfigError(f"train.model = 'ridge': {ridge_unsupported(t)}")
    missing = missing_transfer(t) if t.model == "ridge" else None
    if missing:
        from deepcuts.nn.pretrained import PretrainedWeightsMissing
        raise PretrainedWeightsMissing(f"train.transfer = {t.transfer!r}: {missing}")   # before any Spark work
    from deepcuts.stages.content import check_train_target
    check_train_target(cfg)   # target factors without plays: a configuration error (exit 2)
    current_id, current = served_model(lk)
    if t.target == "factors":
        factors_run, chain = current_lineage(ctx, TRACK_FACTORS, FACTOR_ALIGNMENTS)
    else:
        factors_run, chain = None, []
    space = model_space((current or {}).get("factors_run_id"), factors_run, chain)
    trained_on = {"catalogue_tracks": ctx.read(MELS).count(),
                  "factor_tracks": ctx.read(TRACK_FACTORS).count() if t.target == "factors" else None}
    due = training_due(current, target=t.target, space=space, every_days=t.retrain_every_days,
                       change_fraction=t.retrain_change_fraction, **trained_on)
    if not due.due:
        return {"skipped": due.reason, "model_id": current_id, "model_space": space}
    ts = build_training_set(ctx)
    kinds, kind_reason = candidate_kinds(t, ts.train_rows)
    device = resolve_device(t.device)
    echo = lambda line: print(line, file=sys.stdout, flush=True)  # noqa: E731
    echo(f"train: {ts.train_rows} train / {ts.validation_rows} validation tracks, target {ts.target} "
         f"({ts.out_dim} outputs), model {' and '.join(kinds)} ({kind_reason}), {ts.crop_frames}-frame crops, "
         f"device {device.type}")
    transfer_skipped = missing_transfer(t) if t.model == "auto" and "ridge" in kinds else None
    if transfer_skipped:      # auto goes on with the plain ridge candidate; an explicit ridge fails on it
        echo(f"train: warning: train.transfer = {t.transfer!r} skipped: {transfer_skipped}")
        t = dataclasses.replace(t, transfer="none")
    fitted = {}
    for kind in kinds:
        # the artifact records the kind it is (and pretrained features only where it reads them)
        cfg_kind = dataclasses.replace(cfg, train=dataclasses.replace(
            t, model=kind, transfer=t.transfer if kind == "ridge" else "none"))
        fitted[kind] = (cfg_kind, fit_ridge_model(ctx, cfg_kind, ts, run_id, echo=echo) if kind == "ridge"
                        else train_model(cfg_kind, ts, lk, run_id, device, echo=echo))
    auto_losses = None
    if len(kinds) > 1:
        # one yardstick for both: each model on the validation tracks' whole excerpts, as served
        from deepcuts.nn import ridge
        examples = ctx.read(VALIDATION_EXAMPLES)
        auto_losses = {k: (ridge.excerpt_loss(examples, state_dict_bytes(r.model), artifact_meta(c, ts, r))
                           if ts.validation_rows else None) for k, (c, r) in fitted.items()}
        kind = choose_kind(auto_losses)
        kind_reason += ", kept by validation loss on whole excerpts (" + ", ".join(
            f"{k} {v:.5f}" if v is not None else f"{k} n/a" for k, v in auto_losses.items()) + ")"
        echo(f"train: {kind} kept ({kind_reason})")
    cfg, result = fitted[kind]
    t = cfg.train

    # The promotion gate: the served model is scored on the same validation tracks.  Published
    # only once complete and promoted: LATEST moves last.  (Evaluated by the evaluate stage.)
    meta = {**artifact_meta(cfg, ts, result), "trained_on": trained_on, **result.extra}
    incomparable = comparable(current, meta, space) or (None if ts.validation_rows else "no validation tracks")
    current_loss, new_loss = None, result.best_validation_loss
    if incomparable is None and "ridge" in (kind, current["train"].get("model") or "cnn"):
        new_loss, current_loss = excerpt_gate_losses(ctx, result, meta, lk, current_id, current,
                                                     (auto_losses or {}).get(kind))
    elif incomparable is None:
        from deepcuts.nn.model import model_dir
        current_loss = validation_loss_of(model_dir(lk, current_id), ts, t, device)
    decision = promote(new_loss, current_loss, t.promotion_tolerance, current_id, incomparable)
    meta["promotion"] = decision.as_summary()
    echo(f"train: {decision.decision}: {decision.reason}")
    artifact_dir = save_artifact(lk, result.model_id, result.model, meta, publish=decision.promoted)
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
    summary["due"] = due.reason
    summary["model"] = f"{kind} ({kind_reason})"
    if auto_losses is not None:
        summary["auto_validation_losses"] = {k: None if v is None else round(v, 6) for k, v in auto_losses.items()}
    if transfer_skipped:
        summary["transfer_skipped"] = transfer_skipped
    if "ridge" in result.extra:
        summary["ridge"] = result.extra["ridge"]
    elif result.extra:   # train.processes > 1: the shards and the epoch plan the ranks ran
        summary["distributed"] = result.extra
    summary["promotion"] = decision.as_summary()
    if not decision.promoted and t.require_promotion:
        summary["gate_failed"] = f"model {result.model_id} not promoted (train.require_promotion): {decision.reason}"
    return summary
