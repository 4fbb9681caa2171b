"""The demo catalogue: synthetic music in mixed codecs plus simulated listeners' play counts.

Lets the whole pipeline run and be tested with no external data set.  ``generate`` writes,
under ``demo.out_dir``::

    catalogue/audio/<NN>/<track_id>.<ext>   real audio files (wav, flac, ogg, mp3, opus)
    catalogue/manifest.csv                  track_id,uri,labels[,artist] (uri relative to the manifest)
    labels.csv                              track_id,style
    users.parquet                           ground truth: user_id, taste (over styles), activity
    plays.parquet                           user_id, track_id, plays (aggregated, plays > 0)

Everything is a function of ``demo.seed``: each track has its own random stream, so a track
never depends on the others and tracks can be rendered in parallel.  Audio is written first
and the tables last (temp file + ``os.replace``), so a crash never leaves a manifest that
points at missing files.
"""
from __future__ import annotations

import csv
import logging
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from deepcuts.core.config import Config, DemoConf
from deepcuts.demo.synth import STYLE_NAMES, STYLES, render_track

log = logging.getLogger(__name__)

# codec -> (file extension, libsndfile format, subtype)
CODECS: dict[str, tuple[str, str, str]] = {
    "wav": ("wav", "WAV", "PCM_16"),
    "flac": ("flac", "FLAC", "PCM_16"),
    "ogg": ("ogg", "OGG", "VORBIS"),
    "mp3": ("mp3", "MP3", "MPEG_LAYER_III"),
    "opus": ("opus", "OGG", "OPUS"),
}
OPUS_RATE = 48000            # libopus only encodes 8/12/16/24/48 kHz
TRACKS_PER_FOLDER = 100
WRITE_BLOCK_FRAMES = 65536
# Independent random streams derived from the seed (a track uses [seed, TRACK_STREAM, index]).
CATALOGUE_STREAM, TRACK_STREAM, LISTENER_STREAM = 0, 1, 2

PLAYS_SCHEMA = pa.schema([pa.field("user_id", pa.string(), nullable=False),
                          pa.field("track_id", pa.string(), nullable=False),
                          pa.field("plays", pa.int64(), nullable=False)])
USERS_SCHEMA = pa.schema([pa.field("user_id", pa.string(), nullable=False),
                          pa.field("taste", pa.list_(pa.float32()), nullable=False),
                          pa.field("activity", pa.int64(), nullable=False),
                          pa.field("top_style", pa.string(), nullable=False)])


@dataclass(frozen=True)
class TrackSpec:
    index: int
    track_id: str
    style: str
    codec: str
    sample_rate: int
    channels: int
    seconds: float

    @property
    def uri(self) -> str:
        """Path relative to the manifest's folder."""
        ext = CODECS[self.codec][0]
        return f"audio/{self.index // TRACKS_PER_FOLDER:02d}/{self.track_id}.{ext}"


def track_id(index: int) -> str:
    return f"t{index:06d}"


def user_id(index: int) -> str:
    return f"u{index:06d}"


def plan_catalogue(demo: DemoConf) -> list[TrackSpec]:
    """Style, codec, rate, channels and duration of every track (cheap; no audio)."""
    rng = np.random.default_rng([demo.seed, CATALOGUE_STREAM])
    styles = STYLE_NAMES[: demo.n_styles]
    # Balanced styles in shuffled order, so style is independent of codec (which cycles).
    style_of = rng.permutation(np.arange(demo.n_tracks) % len(styles))
    seconds = rng.uniform(demo.min_seconds, demo.max_seconds, demo.n_tracks)
    rates = rng.choice(np.asarray(demo.sample_rates), demo.n_tracks)
    channels = rng.integers(1, 3, demo.n_tracks)
    specs = []
    for i in range(demo.n_tracks):
        codec = demo.codecs[i % len(demo.codecs)]
        rate = OPUS_RATE if codec == "opus" else int(rates[i])
        specs.append(TrackSpec(i, track_id(i), styles[style_of[i]], codec, rate, int(channels[i]),
                               round(float(seconds[i]), 3)))
    return specs


def render_and_write(args: tuple[int, TrackSpec, str]) -> tuple[str, int]:
    """Render one track from its own random stream and write it atomically; returns (id, frames)."""
    seed, spec, catalogue_dir = args
    style = STYLES[STYLE_NAMES.index(spec.style)]
    rng = np.random.default_rng([seed, TRACK_STREAM, spec.index])
    audio = render_track(style, spec.seconds, spec.sample_rate, spec.channels, rng)
    path = Path(catalogue_dir) / spec.uri
    path.parent.mkdir(parents=True, exist_ok=True)
    _, fmt, subtype = CODECS[spec.codec]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # Block writes: libsndfile 1.2.2's Vorbis encoder segfaults on some multi-million-frame
        # single writes (seen on a 47 s mono 44.1 kHz track); blocks also bound encoder buffers.
        with sf.SoundFile(tmp, "w", spec.sample_rate, spec.channels, format=fmt, subtype=subtype) as fh:
            for start in range(0, len(audio), WRITE_BLOCK_FRAMES):
                fh.write(audio[start:start + WRITE_BLOCK_FRAMES])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return spec.track_id, len(audio)


def _render_all(demo: DemoConf, specs: list[TrackSpec], catalogue_dir: Path) -> None:
    jobs = [(demo.seed, spec, str(catalogue_dir)) for spec in specs]
    # Longest first so the pool's tail is short.
    jobs.sort(key=lambda j: -j[1].seconds * j[1].sample_rate)
    workers = min(demo.workers or os.cpu_count() or 1, os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        for job in jobs:
            render_and_write(job)
        return
    # spawn: the caller may hold a JVM or torch threads, which a fork would copy in a bad state.
    # An executor (not multiprocessing.Pool) fails with BrokenProcessPool if a worker dies,
    # where a Pool would wait forever for the lost task.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in pool.map(render_and_write, jobs, chunksize=1):
            pass


# ---------------------------------------------------------------- simulated listeners
def simulate_listeners(demo: DemoConf, track_styles: np.ndarray, user_chunk: int = 4096, *,
                       style_names: Sequence[str] | None = None, track_ids: Sequence[str] | None = None
                       ) -> tuple[pa.Table, pa.Table]:
    """(users, plays) tables: taste mixtures, heavy-tailed activity, power-law track appeal,
    repeat listens that grow with the user's affinity for the track.

    ``track_styles`` holds each track's style index.  Users are simulated in chunks so memory is
    bounded by chunk x tracks, not users x tracks.  ``style_names`` (default: the first
    ``demo.n_styles`` synthetic styles) and ``track_ids`` (default: ``t000000``, ...) let another
    catalogue reuse the listeners (``bench/fixtures/game_music.py``: styles = game packages).
    """
    rng = np.random.default_rng([demo.seed, LISTENER_STREAM])
    if style_names is None:
        style_names = STYLE_NAMES[: demo.n_styles]
    if track_ids is None:
        track_ids = [track_id(i) for i in range(len(track_styles))]
    n_tracks, n_styles = len(track_styles), len(style_names)
    # Power-law appeal within each style (a few hits, a long tail), normalised per style.
    appeal = np.empty(n_tracks)
    for s in range(n_styles):
        members = np.flatnonzero(track_styles == s)
        ranks = rng.permutation(len(members)) + 1
        appeal[members] = ranks ** -0.9
        appeal[members] /= appeal[members].sum()
    # Most users like one or two styles; a small floor lets anyone stumble on anything.
    taste = rng.dirichlet(np.full(n_styles, 0.25), demo.n_users)
    taste = 0.97 * taste + 0.03 / n_styles
    sigma = 1.0
    activity = rng.lognormal(np.log(demo.mean_plays_per_user) - sigma ** 2 / 2, sigma, demo.n_users)
    activity = np.maximum(1, np.round(activity)).astype(np.int64)

    users, tracks, counts = [], [], []
    for lo in range(0, demo.n_users, user_chunk):
        hi = min(demo.n_users, lo + user_chunk)
        affinity = taste[lo:hi][:, track_styles] * appeal[None, :]          # (users, tracks)
        p = affinity / affinity.sum(axis=1, keepdims=True)
        # About 40 % of a user's plays discover tracks; the rest are repeat listens of what
        # they found, weighted towards what they like most (affinity relative to their best).
        discoveries = np.maximum(1, np.round(activity[lo:hi] * 0.4)).astype(np.int64)
        found = rng.multinomial(discoveries, p)
        relative = affinity / affinity.max(axis=1, keepdims=True)
        weights = found * relative ** 1.5
        weights /= weights.sum(axis=1, keepdims=True)
        repeats = rng.multinomial(activity[lo:hi] - discoveries.clip(max=activity[lo:hi]), weights)
        plays = found + repeats
        u, t = np.nonzero(plays)
        users.append(u + lo)
        tracks.append(t)
        counts.append(plays[u, t])
    u = np.concatenate(users)
    t = np.concatenate(tracks)
    c = np.concatenate(counts).astype(np.int64)
    plays_table = pa.table({"user_id": pa.array([user_id(i) for i in u], pa.string()),
                            "track_id": pa.array([track_ids[i] for i in t], pa.string()),
                            "plays": pa.array(c, pa.int64())}, schema=PLAYS_SCHEMA)
    style_names = np.asarray(style_names)
    users_table = pa.table({
        "user_id": pa.array([user_id(i) for i in range(demo.n_users)], pa.string()),
        "taste": pa.array(list(taste.astype(np.float32)), pa.list_(pa.float32())),
        "activity": pa.array(activity, pa.int64()),
        "top_style": pa.array(style_names[taste.argmax(axis=1)], pa.string()),
    }, schema=USERS_SCHEMA.with_metadata({"styles": ",".join(style_names)}))
    return users_table, plays_table


# ---------------------------------------------------------------- writing
def replace_parquet(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a temp file and ``os.replace``: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def replace_csv(rows: list[tuple], header: tuple[str, ...], path: Path) -> None:
    """``header`` and ``rows`` to ``path`` as CSV, atomically (as :func:`replace_parquet`)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def artist_names(specs: Sequence[TrackSpec], per_style: int) -> dict[str, str]:
    """track id -> its artist (the manifest's artist column): each style's tracks dealt in
    turn to ``per_style`` artists of that style; {} when 0.  Artists do not sound alike beyond
    their style; listeners follow styles, so an artist's tracks share an audience."""
    seen: Counter = Counter()
    out = {}
    for s in specs if per_style else ():
        out[s.track_id] = f"{s.style} artist {seen[s.style] % per_style + 1}"
        seen[s.style] += 1
    return out


def _remove_stale_audio(audio_dir: Path, keep: set[Path]) -> int:
    """Audio left by an earlier, larger or differently-coded demo: no manifest points at it."""
    removed = 0
    for path in audio_dir.glob("*/*"):
        if path.is_file() and path not in keep:
            path.unlink()
            removed += 1
    return removed


def generate(demo: DemoConf) -> dict:
    """Write the demo catalogue, labels, users and play counts under ``demo.out_dir``."""
    started = time.time()
    out = Path(demo.out_dir)
    catalogue_dir = out / "catalogue"
    (catalogue_dir / "audio").mkdir(parents=True, exist_ok=True)
    specs = plan_catalogue(demo)
    _render_all(demo, specs, catalogue_dir)
    audio_seconds = time.time() - started

    style_index = {name: i for i, name in enumerate(STYLE_NAMES)}
    users, plays = simulate_listeners(demo, np.array([style_index[s.style] for s in specs]))
    replace_csv([(s.track_id, s.style) for s in specs], ("track_id", "style"), out / "labels.csv")
    replace_parquet(users, out / "users.parquet")
    replace_parquet(plays, out / "plays.parquet")
    # The manifest goes last: it is what says the catalogue is complete.
    artists = artist_names(specs, demo.artists_per_style)
    if artists:
        replace_csv([(s.track_id, s.uri, s.style, artists[s.track_id]) for s in specs],
                    ("track_id", "uri", "labels", "artist"), catalogue_dir / "manifest.csv")
    else:
        replace_csv([(s.track_id, s.uri, s.style) for s in specs], ("track_id", "uri", "labels"),
                    catalogue_dir / "manifest.csv")
    stale = _remove_stale_audio(catalogue_dir / "audio", {catalogue_dir / s.uri for s in specs})

    listeners = Counter(plays.column("track_id").to_pylist())
    per_track = np.array([listeners.get(s.track_id, 0) for s in specs])
    return {
        "out_dir": str(out),
        "tracks": len(specs),
        "styles": demo.n_styles,
        "users": demo.n_users,
        "play_rows": plays.num_rows,
        "total_plays": int(np.sum(plays.column("plays").to_numpy())),
        "audio_seconds": round(sum(s.seconds for s in specs), 1),
        "codecs": dict(sorted(Counter(s.codec for s in specs).items())),
        "sample_rates": dict(sorted(Counter(s.sample_rate for s in specs).items())),
        "channels": dict(sorted(Counter(s.channels for s in specs).items())),
        "listeners_per_track": {"min": int(per_track.min()), "median": int(np.median(per_track)),
                                "max": int(per_track.max())},
        "stale_files_removed": stale,
        "render_seconds": round(audio_seconds, 1),
    }


def demo_data_present(cfg: Config) -> bool:
    out = Path(cfg.demo.out_dir)
    return (out / "catalogue" / "manifest.csv").is_file() and (out / "plays.parquet").is_file()


def run_stage(spark, cfg: Config, run_id: str) -> dict:
    """The ``demo`` stage: needs no Spark; writes the catalogue and returns its summary."""
    return generate(cfg.demo)
