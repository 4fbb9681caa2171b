"""bench/ingest: audio-seconds decoded + featurised per CPU-second, the ingest job against
a naive single-process ``librosa.load`` + ``melspectrogram`` loop on the same mp3 files.

    .venv/bin/python bench/ingest.py [--tracks 120] [--seconds 30] [--cores 2]

Both sides produce the same output (a 128-band log-mel of each whole 30 s clip at
22,050 Hz), so the ratio is the job's engineering, not a smaller excerpt.  Figures:
  naive loop      librosa.load(sr=22050, mono=True) + melspectrogram + power_to_db, one process
  job featurise   CPU of the job's decode tasks (its Python workers, measured inside them)
  job total       all CPU of the spark-submit'ed job (JVM, driver, workers, Arrow, Parquet),
                  Spark's fixed start-up (tens of CPU-seconds) included
The naive loop runs before and after the job and its mean is the anchor, so a change in
machine load during the run moves both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def music_clip(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Chords, a bass line and noise-burst drums: a spectrum like music, not a pure tone."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    beat = 60 / rng.uniform(80, 160)
    y = np.zeros_like(t)
    for k, semis in enumerate((0, 4, 7, 12)):
        f = 110 * 2 ** ((rng.integers(0, 12) + semis) / 12)
        y += 0.1 / (k + 1) * np.sign(np.sin(2 * np.pi * f * t)) * np.exp(-(t % (4 * beat)))
    y += 0.2 * np.sin(2 * np.pi * 55 * 2 ** (rng.integers(0, 12) / 12) * t) * (t % beat < beat / 2)
    y += 0.3 * rng.standard_normal(len(t)) * np.exp(-30 * (t % beat))
    stereo = np.stack([y, np.roll(y, 200)], axis=1) / np.abs(y).max() * 0.8
    return stereo.astype(np.float32)


def make_files(folder: Path, tracks: int, seconds: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(tracks):
        path = folder / f"{i:05d}.mp3"
        if not path.exists():
            sf.write(path, music_clip(seconds, 44100, i), 44100, format="MP3", subtype="MPEG_LAYER_III")
        paths.append(path)
    return paths


def naive_loop(paths: list[Path]) -> tuple[float, float]:
    """(audio seconds, CPU seconds) of the plain librosa loop."""
    import librosa
    librosa.feature.melspectrogram(y=np.zeros(22050, np.float32), sr=22050)  # warm numba/caches
    audio_s, cpu = 0.0, time.process_time()
    for path in paths:
        y, sr = librosa.load(path, sr=22050, mono=True)
        librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr, n_fft=1024, hop_length=512, n_mels=128))
        audio_s += len(y) / sr
    return audio_s, time.process_time() - cpu


def run_job(folder: Path, warehouse: Path, seconds: float, cores: int) -> tuple[dict, float, float, int]:
    """Run the real ingest job (spark-submit.sh) and return (summary, CPU s, wall s, peak RSS kB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    cmd = [str(ROOT / "spark-submit.sh"), "ingest", "--set", f"ingest.source={folder}",
           "--set", f"warehouse.root={warehouse}", "--set", f"ingest.excerpt_seconds={seconds}",
           "--set", f"spark.checkpoint_dir={warehouse}/_ckpt", "--", "--master", f"local[{cores}]"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"ingest job failed:\n{done.stderr[-4000:]}")
    summary = {}
    for line in done.stdout.splitlines():
        m = re.match(r"\s+(\w+)\s+(.*)$", line)
        if m:
            summary[m.group(1)] = m.group(2)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return summary, cpu, wall, after.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracks", type=int, default=120)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "deepcuts-bench-ingest"))
    args = ap.parse_args()

    folder = Path(args.data) / f"mp3-{args.tracks}x{int(args.seconds)}s"
    paths = make_files(folder, args.tracks, args.seconds)
    naive_audio, naive_cpu_before = naive_loop(paths)
    with tempfile.TemporaryDirectory() as wh:
        summary, job_cpu, job_wall, child_rss = run_job(folder, Path(wh), args.seconds, args.cores)
    _, naive_cpu_after = naive_loop(paths)
    naive_cpu = (naive_cpu_before + naive_cpu_after) / 2
    job_audio = float(summary["decoded_audio_s"])
    feat_cpu = float(summary["decode_cpu_s"])
    naive_rt, feat_rt, total_rt = naive_audio / naive_cpu, job_audio / feat_cpu, job_audio / job_cpu
    result = {
        "tracks": args.tracks, "clip_s": args.seconds, "codec": "mp3 44.1 kHz stereo", "cores": args.cores,
        "naive_realtime_x_per_core": round(naive_rt, 1),
        "job_featurise_realtime_x_per_core": round(feat_rt, 1),
        "job_total_realtime_x_per_core": round(total_rt, 1),
        "naive_cpu_s_before_after": [round(naive_cpu_before, 1), round(naive_cpu_after, 1)],
        "ratio_featurise_vs_naive": round(feat_rt / naive_rt, 2),
        "ratio_total_vs_naive": round(total_rt / naive_rt, 2),
        "job_wall_s": round(job_wall, 1), "job_cpu_s": round(job_cpu, 1),
        "job_wall_realtime_x": round(job_audio / job_wall, 1),
        "peak_rss_mb_bench": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_job_process": round(child_rss / 1024, 1),
    }
    print(f"naive librosa loop : {naive_rt:8.1f}x realtime per core   (anchor)")
    print(f"job, featurise CPU : {feat_rt:8.1f}x realtime per core   = {feat_rt / naive_rt:.2f}x the naive loop")
    print(f"job, all CPU       : {total_rt:8.1f}x realtime per core   = {total_rt / naive_rt:.2f}x the naive loop "
          f"(Spark start-up included: {job_cpu:.0f} CPU-s for {args.tracks} tracks)")
    print(f"job wall clock     : {job_wall:.1f} s on local[{args.cores}] for {job_audio:.0f} s of audio")
    print(f"peak RSS           : bench {result['peak_rss_mb_bench']} MB, largest job process "
          f"{result['peak_rss_mb_job_process']} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
