"""Bench of the demo catalogue generator.

Figure: seconds of audio generated per wall second (x realtime) for the whole `generate`.
Anchor (same run): for a sample of tracks, synthesis CPU time vs libsndfile encoding CPU time
of the same audio: the encoder is a floor no synthesis speed-up can remove.

    .venv/bin/python bench/demo.py --tracks 48 --users 1000 --min-seconds 20 --max-seconds 60
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from benchutil import peak_rss_mb
from deepcuts.core.config import load_config
from deepcuts.demo.generate import CODECS, TRACK_STREAM, generate, plan_catalogue
from deepcuts.demo.synth import STYLE_NAMES, STYLES, render_track


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tracks", type=int, default=48)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--styles", type=int, default=8)
    p.add_argument("--min-seconds", type=float, default=20.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--anchor-tracks", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides={
            "demo.out_dir": str(Path(tmp) / "demo"), "demo.n_tracks": args.tracks,
            "demo.n_users": args.users, "demo.n_styles": args.styles, "demo.workers": args.workers,
            "demo.min_seconds": args.min_seconds, "demo.max_seconds": args.max_seconds})
        started = time.time()
        summary = generate(cfg.demo)
        wall = time.time() - started
    synth_cpu = encode_cpu = 0.0
    for spec in plan_catalogue(cfg.demo)[: args.anchor_tracks]:
        t0 = time.process_time()
        audio = render_track(STYLES[STYLE_NAMES.index(spec.style)], spec.seconds, spec.sample_rate,
                             spec.channels, np.random.default_rng([cfg.demo.seed, TRACK_STREAM, spec.index]))
        t1 = time.process_time()
        _, fmt, subtype = CODECS[spec.codec]
        sf.write(io.BytesIO(), audio, spec.sample_rate, format=fmt, subtype=subtype)
        encode_cpu += time.process_time() - t1
        synth_cpu += t1 - t0
    peak_mb = peak_rss_mb()
    print(f"generate: {summary['tracks']} tracks, {summary['audio_seconds']:.0f} s audio, "
          f"{summary['play_rows']} play rows in {wall:.1f} s wall ({args.workers} workers) "
          f"= {summary['audio_seconds'] / wall:.0f}x realtime")
    print(f"anchor: synthesis / encoding CPU on {args.anchor_tracks} tracks = {synth_cpu:.2f} s / "
          f"{encode_cpu:.2f} s = {synth_cpu / max(encode_cpu, 1e-9):.2f}")
    print(f"peak RSS (self + largest child): {peak_mb:.0f} MB")
    print(f"summary: {summary}")


if __name__ == "__main__":
    sys.exit(main())
