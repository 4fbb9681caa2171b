"""bench/ingest: audio-seconds decoded + featurised per CPU-second.

Two benches, each beside anchors measured in the same run:

    .venv/bin/python bench/ingest.py --codecs [--files 3] [--seconds 200] [--repeat 3]
    .venv/bin/python bench/ingest.py [--tracks 120] [--seconds 30] [--cores 2]

``--codecs`` (issue 10): per codec, one core, CPU time of a 30 s excerpt from the middle of
3-4 minute files (seeking cost grows with the file), on real-encoder outputs (LAME mp3,
oggenc vorbis, opusenc opus, flac, ffmpeg AAC/ALAC .m4a; Debian's encoders, see
tests/encoder_fixtures.py) of the demo's synthetic music, and on libsndfile-written ones:
  bare libsndfile  seek + read float32 from the file (soundfile), no mono, no resampling: the anchor
  bare PyAV        seek + decode frames to numpy (FFmpeg's decoders), no resampling: the anchor
  decode           deepcuts.audio.decode.decode: the chosen decoder, mono, soxr to 22,050 Hz
  featurise        deepcuts.audio.decode.featurise: decode + checks + log-mel (what the job runs),
                   the bytes in memory and libsndfile given the open file, as featurise_row does
  job row          featurise_row's work per local file: confined read + featurise + float16 mel
                   + blake2b fingerprint of the file
  naive            librosa.load(offset, duration, sr=22050, mono) + melspectrogram + power_to_db
Target: featurise >= 0.8 x the faster bare decode of each codec.

The default bench runs the real ingest job (spark-submit) on 30 s mp3 clips against a naive
single-process ``librosa.load`` + ``melspectrogram`` loop on the same files.  Both sides produce
the same output (a 128-band log-mel of each whole 30 s clip at 22,050 Hz), so the ratio is the
job's engineering, not a smaller excerpt.  Figures:
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


# --- per codec (issue 10) ---------------------------------------------------------------------
REAL = {  # label: (file extension, argv with {wav} {out}); real encoders on synthetic music
    "mp3 LAME -V2": (".mp3", "lame --quiet --noreplaygain -V 2 {wav} {out}"),
    "mp3 LAME 192k CBR": (".mp3", "lame --quiet --noreplaygain -b 192 {wav} {out}"),
    "vorbis oggenc -q5": (".ogg", "oggenc -Q -q 5 -o {out} {wav}"),
    "opus opusenc 128k": (".opus", "opusenc --quiet --bitrate 128 {wav} {out}"),
    "flac -5": (".flac", "flac -s -f -5 -o {out} {wav}"),
    "aac ffmpeg 192k m4a": (".m4a", "ffmpeg -v error -nostdin -y -i {wav} -c:a aac -b:a 192k {out}"),
    "alac ffmpeg m4a": (".m4a", "ffmpeg -v error -nostdin -y -i {wav} -c:a alac {out}"),
}
SYNTHETIC = {  # label: (extension, soundfile format, subtype): what libsndfile itself writes
    "mp3 libsndfile": (".mp3", "MP3", "MPEG_LAYER_III"),
    "vorbis libsndfile": (".ogg", "OGG", "VORBIS"),
    "opus libsndfile": (".opus", "OGG", "OPUS"),
    "flac libsndfile": (".flac", "FLAC", "PCM_16"),
}


def make_codec_files(folder: Path, files: int, seconds: float) -> dict[str, list[Path]]:
    """``files`` tracks of the demo's synthetic music per codec (cached by name)."""
    import shutil
    from deepcuts.demo.synth import STYLES, render_track
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    for i in range(files):
        wav = folder / f"src{i}_{int(seconds)}s.wav"
        if not wav.exists():
            audio = render_track(STYLES[i % len(STYLES)], seconds, 44100, 2, np.random.default_rng(100 + i))
            sf.write(wav, audio, 44100, subtype="PCM_16")
        for label, (ext, cmd) in REAL.items():
            tool = cmd.split()[0]
            if shutil.which(tool) is None:
                print(f"  ({label}: {tool} not installed, skipped; apt-get install lame ffmpeg opus-tools "
                      f"vorbis-tools flac)")
                continue
            path = folder / f"{label.replace(' ', '_')}_{i}{ext}"
            if not path.exists():
                subprocess.run([part.format(wav=wav, out=path) for part in cmd.split()], check=True)
            out.setdefault(label, []).append(path)
        for label, (ext, fmt, subtype) in SYNTHETIC.items():
            path = folder / f"{label.replace(' ', '_')}_{i}{ext}"
            if not path.exists():
                data, rate = sf.read(wav, dtype="float32")
                if ext == ".opus":
                    import soxr
                    data, rate = soxr.resample(data, rate, 48000), 48000
                # In blocks: libsndfile's Vorbis encoder crashes on one 200 s write.
                with sf.SoundFile(path, "w", rate, data.shape[1], format=fmt, subtype=subtype) as fh:
                    for start in range(0, len(data), 1 << 16):
                        fh.write(data[start:start + (1 << 16)])
            out.setdefault(label, []).append(path)
    return out


def _bare_sndfile(path: Path, seconds: float) -> float:
    with sf.SoundFile(path) as f:                # the file itself: no Python read callbacks
        want = int(seconds * f.samplerate)
        f.seek((f.frames - want) // 2)
        return len(f.read(want, dtype="float32")) / f.samplerate


def _bare_pyav(data: bytes, seconds: float) -> float:
    import io
    import av
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.audio[0]
        rate, tb = s.codec_context.sample_rate, s.time_base
        total = s.duration * tb if s.duration else c.duration / 1e6
        start = max(0.0, (float(total) - seconds) / 2 - 0.1)
        c.seek(int((s.start_time or 0) + start / tb), stream=s)
        got = 0
        for frame in c.decode(s):
            frame.to_ndarray()
            got += frame.samples
            if got >= (seconds + 0.1) * rate:
                break
        return min(got / rate, seconds)


def codec_bench(args) -> None:
    from benchutil import peak_rss_mb
    from threadpoolctl import threadpool_limits
    import librosa
    from deepcuts.audio import catalogue
    from deepcuts.audio import decode as audio
    from deepcuts.core.config import load_config
    threadpool_limits(1)                        # one core: the figure is per core, like a Spark task
    folder = Path(args.data) / "codecs"
    files = make_codec_files(folder, args.files, args.seconds)
    params = audio.MelParams.from_conf(load_config(overrides={
        "ingest.excerpt_seconds": 30.0, "ingest.source": str(folder)}).ingest)
    librosa.feature.melspectrogram(y=np.zeros(22050, np.float32), sr=22050)     # warm numba/caches

    def naive(path: Path) -> float:
        duration = sf.info(path).duration if path.suffix != ".m4a" else args.seconds
        y, sr = librosa.load(path, sr=22050, mono=True, offset=max(0.0, (duration - 30.0) / 2), duration=30.0)
        librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr, n_fft=1024, hop_length=512, n_mels=128))
        return len(y) / sr

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime   # audioread's ffmpeg counts

    def job_row(path: Path) -> float:
        """What the job does per local file: confined read, featurise, float16 mel, fingerprint."""
        with catalogue.open_source(str(path), roots=params.allowed_roots, max_bytes=params.max_file_bytes) as (d, fd):
            feats = audio.featurise(d, params, path.suffix, fd=fd)
            audio.mel_to_bytes(feats.mel)
            audio.fingerprint(d)
        return (feats.mel.shape[1] - 1) * 512 / 22050

    fds = {}

    def fd_of(path: Path) -> int:               # the job hands libsndfile the open file (featurise_row)
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        return fds[path]

    ways = {
        "bare libsndfile": lambda d, path: _bare_sndfile(path, 30.0),
        "bare PyAV": lambda d, path: _bare_pyav(d, 30.0),
        "decode": lambda d, path: len(audio.decode(d, params, path.suffix, fd=fd_of(path)).signal) / 22050,
        "featurise": lambda d, path: (audio.featurise(d, params, path.suffix, fd=fd_of(path)).mel.shape[1] - 1)
        * 512 / 22050,
        "job row": lambda d, path: job_row(path),
        "naive librosa": lambda d, path: naive(path),
    }
    rows = []
    print(f"per codec, 30 s excerpt from the middle of {args.files} x {args.seconds:.0f} s files, one core, "
          f"CPU time, x real time (best of {args.repeat}):")
    header = f"  {'codec':22s}" + "".join(f"{w:>15s}" for w in ways) + "   decoder    featurise/best bare  target"
    print(header)
    for label, paths in files.items():
        best = {w: [float("inf")] * len(paths) for w in ways}
        audio_s = {w: [0.0] * len(paths) for w in ways}
        datas = [p.read_bytes() for p in paths]
        for _ in range(args.repeat):
            for i, (path, data) in enumerate(zip(paths, datas)):
                for w, fn in ways.items():
                    t0 = cpu()
                    try:
                        got = fn(data, path)
                    except Exception:           # libsndfile cannot read m4a; librosa needs audioread
                        best[w][i] = None
                        continue
                    dt = cpu() - t0
                    if best[w][i] is not None and dt < best[w][i]:
                        best[w][i], audio_s[w][i] = dt, got
        rt = {w: (sum(audio_s[w]) / sum(best[w]) if all(b is not None for b in best[w]) else None) for w in ways}
        chosen = audio.decode(datas[0], params, paths[0].suffix).decoder
        bare = max(v for w, v in rt.items() if w.startswith("bare") and v)
        ratio = rt["featurise"] / bare
        cells = "".join(f"{v:15.0f}" if v else f"{'-':>15s}" for v in rt.values())
        print(f"  {label:22s}{cells}   {chosen:10s} {ratio:8.2f}            {'met' if ratio >= 0.8 else 'NOT met'}")
        rows.append({"codec": label, **{w: round(v, 1) if v else None for w, v in rt.items()},
                     "decoder": chosen, "featurise_vs_best_bare": round(ratio, 3)})
    print(f"  peak RSS: {peak_rss_mb():.0f} MB")
    print(json.dumps({"bench": "ingest --codecs", "files": args.files, "seconds": args.seconds, "rows": rows,
                      "peak_rss_mb": round(peak_rss_mb(), 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracks", type=int, default=120)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "deepcuts-bench-ingest"))
    ap.add_argument("--codecs", action="store_true", help="the per-codec decode bench (issue 10) instead of the job")
    ap.add_argument("--files", type=int, default=3, help="--codecs: files per codec")
    ap.add_argument("--repeat", type=int, default=3, help="--codecs: best of this many passes")
    args = ap.parse_args()
    if args.codecs:
        if args.seconds == 30.0:
            args.seconds = 200.0                  # 3-4 minute tracks: seeking to the middle costs
        codec_bench(args)
        return

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
