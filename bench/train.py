"""Bench of the train stage: the Petastorm loader against a plain pyarrow reader, and training
throughput (crops/s) on CPU, and on CUDA where torch sees one (with its utilisation).

Figures and their anchors come from the same run on the same files:
  * loader: Petastorm path mels/s  vs  pyarrow ``iter_batches`` + the same decode/crop (target >= 0.7)
  * feeding: training through the loader  vs  the same steps on tensors already in memory
    (1.0 = the loader keeps up with the model)
  * memory: RSS after every loader epoch (must not grow) and peak RSS (ru_maxrss, children included)

    .venv/bin/python bench/train.py --tracks 384 --seconds 30 --epochs 3 --train-batches 20

With ``--processes 1,2`` it measures the train stage's epoch loop itself (``train_model``) on
1 and N processes instead (N > 1: TorchDistributor in local mode, gloo on CPU / NCCL on CUDA,
one Petastorm shard per rank): crops/s over all ranks, per process, and the scaling
efficiency rate(N) / (N x rate(1)), the single-process run being the anchor.

    .venv/bin/python bench/train.py --processes 1,2 --threads 1 --tracks 256 --seconds 10 --epochs 3 --small-model

(--threads 1: every process runs one torch thread, so 2 processes use the 2 cores one process
does not; a single process on all cores is measured beside it.  Without it, the single process
runs the machine's cores' threads and the ranks one each, which on a loaded 2-core machine
measured OpenMP contention, not scaling: 2.96 "efficiency".)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from benchutil import peak_rss_mb  # noqa: E402
from deepcuts.core.config import load_config  # noqa: E402
from deepcuts.nn.loader import EpochReader, decode_crops  # noqa: E402
from deepcuts.nn.model import FactorCNN, frames_for_seconds, resolve_device  # noqa: E402
from deepcuts.stages.train import _run_epoch, make_loss, make_optimizer  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def write_examples(folder: str, tracks: int, frames: int, n_mels: int, rank: int, rows_per_group: int,
                   rows_per_file: int) -> list[str]:
    """Mel-like float16 examples (smooth in time and frequency, dB range) in training-set layout."""
    rng = np.random.default_rng(0)
    paths = []
    for start in range(0, tracks, rows_per_file):
        rows = min(rows_per_file, tracks - start)
        blobs = []
        for _ in range(rows):
            base = rng.normal(-45, 6, (n_mels, 1)) + np.cumsum(rng.normal(0, 0.5, (1, frames)), axis=1)
            blobs.append((base + rng.normal(0, 3, (n_mels, frames))).astype(np.float16).tobytes())
        table = pa.table({
            "track_id": [f"t{start + i:07d}" for i in range(rows)], "mel": pa.array(blobs, pa.binary()),
            "n_mels": pa.array([n_mels] * rows, pa.int32()), "n_frames": pa.array([frames] * rows, pa.int32()),
            "target": pa.array(rng.normal(size=(rows, rank)).astype(np.float32).tolist(), pa.list_(pa.float32())),
        })
        path = os.path.join(folder, f"part-{start // rows_per_file:05d}.parquet")
        pq.write_table(table, path, row_group_size=rows_per_group)
        paths.append(path)
    return paths


def plain_reader_epoch(paths, crop_frames: int, rows_per_group: int, epoch: int) -> int:
    """The anchor: pyarrow iter_batches + the very same decode/crop, no Petastorm."""
    rows = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows_per_group,
                                                       columns=["track_id", "mel", "n_mels", "n_frames", "target"]):
            cols = batch.to_pydict()
            crops = np.stack(decode_crops(cols["track_id"], cols["mel"], cols["n_mels"], cols["n_frames"],
                                          crop_frames, 0, epoch))
            np.asarray(cols["target"], dtype=np.float32)
            rows += len(crops)
    return rows


def bench_loader(paths, args, n_mels, crop_frames):
    """Epochs of the three readers interleaved (plain, petastorm, transform, plain, ...), so a
    noisy shared machine slows them alike."""
    names = ("plain", "petastorm", "petastorm_transform")
    readers = {name: None if name == "plain" else EpochReader(
        paths, args.tracks, n_mels=n_mels, crop_frames=crop_frames, batch_size=args.batch_size, train=True,
        seed=0, workers=args.workers, shuffle_buffer_rows=args.shuffle_buffer,
        decode_in_workers=name == "petastorm_transform") for name in names}
    results = {name: ([], []) for name in names}
    for epoch in range(args.epochs):
        for name in names:
            started = time.perf_counter()
            if readers[name] is None:
                rows = plain_reader_epoch(paths, crop_frames, args.rows_per_group, epoch)
            else:
                rows = sum(len(m) for m, _ in readers[name].batches(epoch))
            assert rows == args.tracks, (name, rows)
            results[name][0].append(rows / (time.perf_counter() - started))
            results[name][1].append(rss_mb())
    for name in names:
        rates, rss = results[name]
        print(f"loader {name:<20} mels/s per epoch {[round(r) for r in rates]}  RSS MB after each epoch "
              f"{[round(r) for r in rss]}", flush=True)
    return results


class InMemory:
    """Pre-made batches with the loader's interface: the model-only anchor."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self, epoch):
        return iter(self._batches)


class GpuUtilisation:
    """Polls nvidia-smi in the background; mean utilisation % over the sampled window."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append(float(out[0]))
            except (OSError, subprocess.SubprocessError, IndexError, ValueError):
                return
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=6)

    @property
    def mean(self):
        return float(np.mean(self.samples)) if self.samples else None


def bench_training(paths, args, cfg, n_mels, crop_frames, device):
    torch.manual_seed(0)
    t = cfg.train
    model = FactorCNN.from_train_conf(t, n_mels=n_mels, out_dim=args.rank).to(device)
    optimizer = make_optimizer(model, t)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    loss_fn = make_loss(t)
    mean = torch.zeros(n_mels, device=device)
    std = torch.ones(n_mels, device=device)
    rows = args.train_batches * args.batch_size
    subset = max(1, -(-rows // args.rows_per_file))
    subset_rows = sum(pq.ParquetFile(x).metadata.num_rows for x in paths[:subset])
    reader = EpochReader(paths[:subset], subset_rows, n_mels=n_mels, crop_frames=crop_frames,
                         batch_size=args.batch_size, train=True, seed=0, workers=args.workers,
                         shuffle_buffer_rows=args.shuffle_buffer)
    in_memory = InMemory([(np.asarray(m), np.asarray(y)) for m, y in reader.batches(0)])
    _run_epoch(model, InMemory(in_memory._batches[:2]), 0, loss_fn, device, mean, std,
               optimizer=optimizer, scaler=scaler)   # warm-up (kernels, allocator)
    with GpuUtilisation() if device.type == "cuda" else _null() as util:
        _, model_rows, model_s = _run_epoch(model, in_memory, 0, loss_fn, device, mean, std,
                                            optimizer=optimizer, scaler=scaler)
        _, fed_rows, fed_s = _run_epoch(model, reader, 1, loss_fn, device, mean, std,
                                        optimizer=optimizer, scaler=scaler)
    model_rate, fed_rate = model_rows / model_s, fed_rows / fed_s
    util_text = f", GPU utilisation {util.mean:.0f}%" if device.type == "cuda" and util.mean is not None else ""
    print(f"train {device.type}: {fed_rate:.1f} crops/s through the loader vs {model_rate:.1f} crops/s on "
          f"in-memory tensors -> ratio {fed_rate / model_rate:.2f} (1.0 = loader keeps up){util_text}", flush=True)
    return fed_rate, model_rate


class _null:
    mean = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bench_processes(paths, val_paths, args, cfg, n_mels, crop_frames, folder):
    """train_model on each process count of --processes over the same files (epoch 1 warms up)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession
    from deepcuts.core.lake import Lake
    from deepcuts.nn.trainset import TrainingSet
    from deepcuts.stages.train import cpu_threads, train_model
    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    val_rows = sum(pq.ParquetFile(x).metadata.num_rows for x in val_paths)
    ts = TrainingSet(run_id="bench", train_rows=args.tracks, validation_rows=val_rows, train_files=paths,
                     validation_files=val_paths, target="factors", out_dim=args.rank, n_mels=n_mels,
                     crop_frames=crop_frames, source_run_id="bench", label_names=[], fingerprint="bench",
                     summary={})
    # (processes, torch threads per process): the anchor is 1 process at the ranks' own thread
    # count (strong scaling: rate(N) / (N x rate(1))); with --threads, 1 process on all the
    # cores too (what the same machine gives without ranks).
    counts = [int(x) for x in args.processes.split(",")]
    runs = [(n, args.threads) for n in counts]
    all_cores = os.cpu_count() or 1
    if args.threads and 1 in counts and args.threads < all_cores:
        runs.insert(counts.index(1) + 1, (1, all_cores))
    rates = {}
    try:
        for n, threads in runs:
            run_cfg = cfg.replace(**{"train.processes": n, "train.epochs": args.epochs, "train.patience": 100,
                                     "train.resume": False, "train.batch_size": args.batch_size,
                                     "train.loader_workers": args.workers, "train.cpu_threads": threads,
                                     "train.shuffle_buffer_rows": args.shuffle_buffer})
            started = time.perf_counter()
            result = train_model(run_cfg, ts, Lake(os.path.join(folder, f"wh-{n}-{threads}")),
                                 f"train-bench-{n}-{threads}", echo=lambda line: None)
            wall = time.perf_counter() - started
            steady = [r["crops_per_s"] for r in result.history[1:]] or [result.history[0]["crops_per_s"]]
            rates[n, threads] = float(np.median(steady))
            rows = result.history[-1]["train_rows"]
            per = cpu_threads(threads, n)
            print(f"processes {n} x {per} torch thread(s): {rates[n, threads]:.1f} crops/s over all ranks, "
                  f"{rates[n, threads] / n:.1f} per process (epochs {[round(r['crops_per_s']) for r in result.history]}; "
                  f"{rows} of {args.tracks} rows per epoch); wall {wall:.1f} s incl. start-up; best validation "
                  f"loss {result.best_validation_loss:.4f}", flush=True)
    finally:
        spark.stop()
    anchor = rates.get((1, args.threads))
    for (n, threads), rate in rates.items():
        if n > 1 and anchor:
            per = cpu_threads(threads, n)
            print(f"PROCESSES {n} x {per} thread(s): {rate:.1f} crops/s ({rate / n:.1f} per process) vs 1 process x "
                  f"{cpu_threads(args.threads, 1)} thread(s) {anchor:.1f} -> scaling efficiency "
                  f"{rate / (n * anchor):.2f} (speed-up {rate / anchor:.2f}x)"
                  + (f"; vs 1 process on all {all_cores} cores {rates[1, all_cores]:.1f}: "
                     f"{rate / rates[1, all_cores]:.2f}x" if (1, all_cores) in rates and args.threads else "")
                  + f" ({os.cpu_count()} cores here)")
    if not torch.cuda.is_available():
        print("PROCESSES: no CUDA device visible to torch here (CPU ranks, gloo)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=384)
    p.add_argument("--seconds", type=float, default=30.0, help="stored excerpt length")
    p.add_argument("--epochs", type=int, default=3, help="loader epochs per reader")
    p.add_argument("--rows-per-group", type=int, default=32)
    p.add_argument("--rows-per-file", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--train-batches", type=int, default=12, help="batches per training measurement")
    p.add_argument("--small-model", action="store_true", help="conv 64 / dense 256 instead of conf's sizes")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--processes", default="", help="e.g. 1,2: the train loop on that many processes instead")
    p.add_argument("--threads", type=int, default=0,
                   help="--processes: torch threads per process (0 = the cores / the processes); with 1, the "
                        "anchor is one process on one thread, the fair strong-scaling comparison")
    p.add_argument("--validation-tracks", type=int, default=32, help="--processes: validation examples")
    args = p.parse_args(argv)

    overrides = {"train.conv_channels": [64, 64, 64], "train.dense_units": 256} if args.small_model else {}
    cfg = load_config(overrides=overrides)
    n_mels = cfg.ingest.n_mels
    frames = frames_for_seconds(args.seconds, cfg.ingest.sample_rate, cfg.ingest.hop_length)
    crop_frames = frames_for_seconds(cfg.train.crop_seconds, cfg.ingest.sample_rate, cfg.ingest.hop_length)
    folder = tempfile.mkdtemp(prefix="deepcuts-bench-train-")
    try:
        started = time.perf_counter()
        paths = write_examples(folder, args.tracks, frames, n_mels, args.rank, args.rows_per_group,
                               args.rows_per_file)
        size = sum(os.path.getsize(x) for x in paths) / 2 ** 20
        print(f"examples: {args.tracks} mels of {n_mels}x{frames} in {len(paths)} files ({size:.0f} MB), "
              f"row groups of {args.rows_per_group}, {crop_frames}-frame crops; written in "
              f"{time.perf_counter() - started:.1f} s; torch threads {torch.get_num_threads()}", flush=True)
        if args.processes:
            val_folder = os.path.join(folder, "validation")
            os.makedirs(val_folder)
            val_paths = write_examples(val_folder, args.validation_tracks, frames, n_mels, args.rank,
                                       args.rows_per_group, args.rows_per_file)
            bench_processes(paths, val_paths, args, cfg, n_mels, crop_frames, folder)
            print(f"PEAK RSS {peak_rss_mb():.0f} MB (ru_maxrss, self + children)")
            return 0
        loader = bench_loader(paths, args, n_mels, crop_frames)
        best = {name: max(rates[1:] or rates) for name, (rates, _) in loader.items()}   # epoch 0 warms caches
        print(f"LOADER petastorm {best['petastorm']:.0f} mels/s vs plain pyarrow {best['plain']:.0f} mels/s -> "
              f"ratio {best['petastorm'] / best['plain']:.2f} (target >= 0.7); petastorm transform variant "
              f"{best['petastorm_transform']:.0f} mels/s ({best['petastorm_transform'] / best['plain']:.2f})")
        rss = loader["petastorm"][1]
        print(f"LOADER RSS growth over {len(rss)} petastorm epochs: {rss[-1] - rss[0]:+.0f} MB "
              f"(first {rss[0]:.0f} MB, last {rss[-1]:.0f} MB)")
        if not args.skip_train:
            devices = [torch.device("cpu")]
            if torch.cuda.is_available():
                devices.append(resolve_device("cuda"))
            for device in devices:
                fed, model_only = bench_training(paths, args, cfg, n_mels, crop_frames, device)
                print(f"TRAIN {device.type} {fed:.1f} crops/s (model alone {model_only:.1f}; loader "
                      f"{best['petastorm']:.0f} mels/s = {best['petastorm'] / model_only:.1f}x the model's need)")
            if not torch.cuda.is_available():
                print("TRAIN cuda: no CUDA device visible to torch here")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"PEAK RSS {peak_rss_mb():.0f} MB (ru_maxrss, self + children)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
