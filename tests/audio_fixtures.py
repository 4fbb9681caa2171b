"""Real audio files for tests: music-like signals in every codec, and hostile files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

CODECS = {  # extension -> (format, subtype)
    ".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"), ".opus": ("OGG", "OPUS"),
}


def tone_mix(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    """A few harmonics with an amplitude envelope plus a little noise (not silence, not white)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 * 2 ** (rng.integers(0, 24) / 12)
    y = sum(0.2 / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) for k in range(1, 5))
    y = y * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)) + 0.01 * rng.standard_normal(len(t))
    y = np.stack([y * (1 - 0.2 * c) for c in range(channels)], axis=1)
    return y.astype(np.float32)


def write_audio(path: Path, seconds: float = 5.0, rate: int = 44100, channels: int = 2, seed: int = 0) -> Path:
    fmt, subtype = CODECS[path.suffix]
    if path.suffix == ".opus":
        rate = 48000
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone_mix(seconds, rate, channels, seed), rate, format=fmt, subtype=subtype)
    return path


def write_hostile_files(folder: Path) -> dict[str, str]:
    """One file per failure mode; returns {relative path: expected reason code}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    (folder / "empty.mp3").write_bytes(b"")
    expected["empty.mp3"] = "empty_file"
    (folder / "not_audio.mp3").write_bytes(b"<html>this is not audio</html>" * 40)
    expected["not_audio.mp3"] = "undecodable"
    (folder / "mystery.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(range(256)) * 8)
    expected["mystery.m4a"] = "undecodable"
    good = write_audio(folder / "_full.mp3", seconds=8.0, seed=99).read_bytes()
    (folder / "_full.mp3").unlink()
    # Cut to 2 of its 8 s: what decodes is under ingest.min_seconds (a longer remainder would be
    # ingested with a warning: tests/test_real_encoders.py).
    (folder / "truncated.mp3").write_bytes(good[: len(good) // 4])
    expected["truncated.mp3"] = "truncated"
    sf.write(str(folder / "silent.wav"), np.zeros((44100 * 5, 1), np.float32), 44100)
    expected["silent.wav"] = "silent"
    write_audio(folder / "short.wav", seconds=1.0, seed=5)
    expected["short.wav"] = "too_short"
    sf.write(str(folder / "low_rate.wav"), tone_mix(5.0, 2000, 1, 3), 2000)
    expected["low_rate.wav"] = "bad_format"
    sf.write(str(folder / "many_channels.wav"), tone_mix(4.0, 22050, 12, 4), 22050)
    expected["many_channels.wav"] = "bad_format"
    return expected
