"""Decoding audio and computing log-mel spectrograms: pure functions, no Spark.

The ingest job calls :func:`featurise` once per track on the executors.  It decodes
only the excerpt it needs (soundfile seeks), mixes down with a matrix product (an
``np.mean`` over channels costs 70x more), resamples with soxr, and computes the
log-mel with a float32 STFT whose values match ``librosa.feature.melspectrogram`` +
``power_to_db`` (tested).  Every way a file can be unusable raises
:class:`RejectedAudio` with a reason code, so the job can record it and go on.
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile as sf

# Reason codes of the ingest_rejects table (stable: analysts group by them).
EMPTY = "empty_file"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated"
BAD_FORMAT = "bad_format"
TOO_SHORT = "too_short"
SILENT = "silent"
NOT_FINITE = "not_finite"
READ_ERROR = "read_error"
SOURCE_MISSING = "source_missing"
INTERNAL_ERROR = "internal_error"
REASONS = (EMPTY, UNDECODABLE, TRUNCATED, BAD_FORMAT, TOO_SHORT, SILENT, NOT_FINITE, READ_ERROR,
           SOURCE_MISSING, INTERNAL_ERROR)

# A decoded length this much shorter than the header's is a damaged file, not rounding.
TRUNCATION_TOLERANCE = 0.01
TAIL_PROBE_FRAMES = 64


class RejectedAudio(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class MelParams:
    sample_rate: int
    n_mels: int
    n_fft: int
    hop_length: int
    excerpt: str                # "middle" | "whole"
    excerpt_seconds: float
    min_seconds: float
    max_channels: int
    min_source_rate: int
    max_source_rate: int
    silence_dbfs: float

    @staticmethod
    def from_conf(ingest) -> "MelParams":
        return MelParams(**{k: getattr(ingest, k) for k in MelParams.__dataclass_fields__})


@dataclass(frozen=True)
class Features:
    mel: np.ndarray             # float32 [n_mels, n_frames], dB
    excerpt_offset_s: float
    duration_s: float           # of the whole source track
    source_rate: int
    channels: int


# --- decoding ----------------------------------------------------------------------------
def _excerpt_window(frames: int, rate: int, p: MelParams) -> tuple[int, int]:
    """(start, length) in source frames of the excerpt to decode."""
    want = int(round(p.excerpt_seconds * rate))
    if p.excerpt == "whole" or frames <= want:
        return 0, frames
    return (frames - want) // 2, want


def _check_header(frames: int, rate: int, channels: int, p: MelParams) -> None:
    if channels < 1 or channels > p.max_channels:
        raise RejectedAudio(BAD_FORMAT, f"{channels} channels (allowed 1..{p.max_channels})")
    if rate < p.min_source_rate or rate > p.max_source_rate:
        raise RejectedAudio(BAD_FORMAT, f"sample rate {rate} Hz (allowed {p.min_source_rate}..{p.max_source_rate})")
    if frames <= 0:
        raise RejectedAudio(EMPTY, "no audio frames")
    if frames / rate < p.min_seconds:
        raise RejectedAudio(TOO_SHORT, f"{frames / rate:.2f} s < {p.min_seconds} s")


def _decode_soundfile(data: bytes, p: MelParams) -> tuple[np.ndarray, int, int, float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sf.SoundFile(io.BytesIO(data)) as f:
            frames, rate, channels = f.frames, f.samplerate, f.channels
            _check_header(frames, rate, channels, p)
            start, length = _excerpt_window(frames, rate, p)
            if start:
                f.seek(start)
            y = f.read(length, dtype="float32", always_2d=True)
            if len(y) < length * (1 - TRUNCATION_TOLERANCE):
                raise RejectedAudio(TRUNCATED, f"decoded {len(y)} of {length} frames the header promises")
            # A damaged tail decodes "fine" but short: probe the last frames the header promises.
            if start + length < frames:
                f.seek(0)  # libsndfile's Ogg seek lands short after a long read unless rewound first
                f.seek(max(frames - TAIL_PROBE_FRAMES, 0))
                if len(f.read(TAIL_PROBE_FRAMES, dtype="float32")) == 0:
                    raise RejectedAudio(TRUNCATED, f"no audio at the end the header promises ({frames} frames)")
    return y, rate, channels, start / rate, frames / rate


def _decode_fallback(data: bytes, p: MelParams, suffix: str) -> tuple[np.ndarray, int, int, float, float]:
    """audioread (ffmpeg/gstreamer where installed) for what libsndfile cannot read (m4a, aac...)."""
    import audioread
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            with audioread.audio_open(tmp.name) as src:
                rate, channels, duration = src.samplerate, src.channels, src.duration
                frames = int(duration * rate)
                _check_header(frames, rate, channels, p)
                pcm = b"".join(src)
        except audioread.NoBackendError as exc:
            raise RejectedAudio(UNDECODABLE, "not a format libsndfile reads, and no fallback decoder "
                                "(ffmpeg/gstreamer) could open it") from exc
        except (audioread.DecodeError, EOFError, OSError) as exc:
            raise RejectedAudio(UNDECODABLE, f"fallback decoder failed: {exc}") from exc
    y = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    y = y[: len(y) // channels * channels].reshape(-1, channels)
    if len(y) < frames * (1 - TRUNCATION_TOLERANCE):
        raise RejectedAudio(TRUNCATED, f"decoded {len(y)} of {frames} frames")
    start, length = _excerpt_window(len(y), rate, p)
    return y[start:start + length], rate, channels, start / rate, len(y) / rate


def decode(data: bytes, p: MelParams, suffix: str = "") -> tuple[np.ndarray, float, float, int, int]:
    """Decode the excerpt of one file to mono float32 at ``p.sample_rate``.

    Returns (signal, excerpt offset s, whole duration s, source rate, channels)."""
    if not data:
        raise RejectedAudio(EMPTY, "0 bytes")
    try:
        y, rate, channels, offset, duration = _decode_soundfile(data, p)
    except RejectedAudio:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        first_error = str(exc).split(": ", 1)[-1]
        try:
            y, rate, channels, offset, duration = _decode_fallback(data, p, suffix)
        except RejectedAudio as fallback:
            if fallback.reason == UNDECODABLE:
                raise RejectedAudio(UNDECODABLE, f"libsndfile: {first_error}; {fallback.detail}") from exc
            raise
    mono = y @ np.full((y.shape[1],), 1.0 / y.shape[1], dtype=np.float32) if y.shape[1] > 1 else y[:, 0]
    if rate != p.sample_rate:
        import soxr
        mono = soxr.resample(mono, rate, p.sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32), offset, duration, rate, channels


# --- features ----------------------------------------------------------------------------
def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * (200.0 / 3))


@lru_cache(maxsize=8)
def mel_basis(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular mel filterbank [n_mels, 1 + n_fft // 2], equal to
    ``librosa.filters.mel(sr, n_fft, n_mels)`` (tested) without importing librosa (and numba)
    into every Spark worker."""
    fft_hz = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0), n_mels + 2))
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=8)
def _hann(n_fft: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)  # periodic


def log_mel(y: np.ndarray, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> np.ndarray:
    """Log-mel power spectrogram in dB, float32 [n_mels, 1 + len(y) // hop].

    Same values as ``librosa.power_to_db(librosa.feature.melspectrogram(y, sr, n_fft=...,
    hop_length=..., n_mels=...), ref=1.0, amin=1e-10, top_db=None)`` (centred frames,
    zero padding, periodic Hann), but in float32 throughout: scipy's FFT keeps single
    precision where numpy's promotes to double (2.5x slower here)."""
    import scipy.fft
    padded = np.pad(y.astype(np.float32, copy=False), n_fft // 2)
    n_frames = 1 + (len(padded) - n_fft) // hop_length
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, n_fft), strides=(padded.strides[0] * hop_length, padded.strides[0]),
        writeable=False)
    spectrum = scipy.fft.rfft(frames * _hann(n_fft), axis=1, overwrite_x=True)
    power = np.square(spectrum.real)
    power += np.square(spectrum.imag)
    mel = mel_basis(sample_rate, n_fft, n_mels) @ power.T
    np.maximum(mel, 1e-10, out=mel)
    np.log10(mel, out=mel)
    mel *= 10.0
    return mel


def featurise(data: bytes, p: MelParams, suffix: str = "") -> Features:
    """bytes of one audio file -> its log-mel excerpt, or :class:`RejectedAudio`."""
    y, offset, duration, rate, channels = decode(data, p, suffix)
    if not np.all(np.isfinite(y)):
        raise RejectedAudio(NOT_FINITE, "decoded samples contain NaN or Inf")
    rms = float(np.sqrt(np.mean(np.square(y, dtype=np.float64)))) if len(y) else 0.0
    rms_dbfs = 20 * np.log10(max(rms, 1e-12))
    if rms_dbfs < p.silence_dbfs:
        raise RejectedAudio(SILENT, f"RMS {rms_dbfs:.1f} dBFS < {p.silence_dbfs} dBFS")
    mel = log_mel(y, p.sample_rate, p.n_fft, p.hop_length, p.n_mels)
    return Features(mel, offset, duration, rate, channels)


def mel_to_bytes(mel: np.ndarray) -> bytes:
    """Stored form: float16, row-major (n_mels, n_frames); half the size of float32."""
    return np.ascontiguousarray(mel, dtype=np.float16).tobytes()


def mel_view(data: bytes, n_mels: int, n_frames: int) -> np.ndarray:
    """A stored mel as a read-only float16 [n_mels, n_frames] view (crop before converting)."""
    expected = 2 * n_mels * n_frames
    if len(data) != expected:
        raise ValueError(f"mel has {len(data)} bytes, expected {expected} for {n_mels}x{n_frames} float16")
    return np.frombuffer(data, dtype=np.float16).reshape(n_mels, n_frames)


def mel_from_bytes(data: bytes, n_mels: int, n_frames: int) -> np.ndarray:
    """A stored mel as float32 [n_mels, n_frames]."""
    return mel_view(data, n_mels, n_frames).astype(np.float32)


def fingerprint(data: bytes) -> str:
    """Content fingerprint of a source file (change detection, provenance)."""
    import hashlib
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def suffix_of(uri: str) -> str:
    return os.path.splitext(uri.split("?", 1)[0])[1].lower()
