"""Decoding and validating one audio file's excerpt: pure functions, no Spark.

The ingest job calls :func:`featurise` once per track on the executors.  It reads the
codec from the file's first bytes (:mod:`deepcuts.audio.sniff`), decodes only the excerpt
it needs with the decoder measured fastest for that codec (:data:`DECODERS`: libsndfile or
PyAV, whose wheel bundles FFmpeg's decoders, so no system ffmpeg is needed), mixes down
block by block, resamples with soxr and computes the log-mel (:mod:`deepcuts.audio.mel`).

Truncation.  A header's length is a promise, and some promises are estimates (libsndfile's
frame count of an mp3 is one; an Ogg stream's last granule can be a few hundred frames
long).  So a file is truncated only when its decodable audio ends more than
``max(ingest.truncation_tolerance_s, ingest.truncation_tolerance_share x length)`` before
the promise.  After the excerpt, one probe reads a block just inside the tolerance; only
when it finds nothing is the file decoded on to find where it really ends.  The audio up to
the damage is still music: by default the track is ingested from what decodes, with a
warning and ``truncated_at_s``; ``ingest.reject_truncated = true`` rejects it instead.

Every way a file can be unusable raises :class:`RejectedAudio` with a reason code, so the
job records it and goes on.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from deepcuts.audio import sniff
# Re-exported: the mel code moved to deepcuts.audio.mel; these names keep working from here.
from deepcuts.audio.mel import (hz_to_mel, log_mel, mel_basis, mel_from_bytes, mel_to_bytes,  # noqa: F401
                                mel_to_hz, mel_view)
from deepcuts.audio.reasons import (BAD_FORMAT, EMPTY, INTERNAL_ERROR, NOT_A_FILE, NOT_FINITE,  # noqa: F401
                                    OUTSIDE_ROOT, READ_ERROR, REASONS, SILENT, SOURCE_MISSING,
                                    TOO_LARGE, TOO_SHORT, TRUNCATED, UNDECODABLE, RejectedAudio)

# Decoders per codec, first choice first; the next one takes over when the first cannot open
# the file or fails inside it (PyAV resyncs past damage where libsndfile's FLAC decoder stops).
# Chosen by `bench/ingest.py --codecs` (30 s excerpt from the middle of 3 x 200 s encoder outputs
# of the demo's synthetic music, one core, CPU time, x real time, best of 4; bare decode, no mono,
# no resampling; shared 2-core VM under load, 2026-12-01; ratios hold better than absolutes):
#   codec (encoder)        libsndfile   PyAV    choice
#   mp3 (LAME -V2 / 192k)  521 / 527    370 / 376  libsndfile
#   vorbis (oggenc -q5)    351          371     libsndfile: as fast within noise (the issue measured
#                                               437 vs 435), and FFmpeg's timestamps after an Ogg seek
#                                               are off by tens of samples (PyAV decodes Vorbis from 0)
#   opus (opusenc 128k)    93           219     PyAV
#   flac -5                607          547     libsndfile
#   wav (PCM 16)           ~3100        ~500    libsndfile
#   aac / alac (.m4a)      -            538 / 218  PyAV (libsndfile reads neither)
DECODERS = {
    "wav": ("sndfile", "av"), "aiff": ("sndfile", "av"), "flac": ("sndfile", "av"),
    "oggflac": ("sndfile", "av"), "vorbis": ("sndfile", "av"), "ogg": ("sndfile", "av"),
    "opus": ("av", "sndfile"), "mp3": ("sndfile", "av"), "mp2": ("sndfile", "av"),
    "mp4": ("av",), "aac": ("av",), "unknown": ("sndfile", "av"),
}
# An mp3 whose first frame carries no frame count (Xing/Info/VBRI): both decoders only estimate
# its length, and libsndfile stops at its estimate, so its frames are indexed and the excerpt
# decoded from its byte range with PyAV.
MPEG_UNINDEXED = ("av-indexed", "av")

PROBE_FRAMES = 1024            # read by the truncation probe
# An Ogg stream's length is its last page's granule position, so its end is where the file ends:
# there is no promise to probe (a cut Ogg file is a shorter file; tests/encoder_fixtures.py).
OGG_CODECS = ("vorbis", "opus", "oggflac", "ogg")
BLOCK_FRAMES = 1 << 15         # libsndfile reads, mixed down block by block (256 kB stereo float32)
PREROLL_S = 0.1                # decoded before a PyAV seek target: mp3's bit reservoir, AAC/Opus overlap
MPEG_WARMUP_FRAMES = 10        # frames decoded before an indexed mp3 excerpt (the bit reservoir spans < 4)
MAX_BAD_PACKETS = 64           # PyAV: a file with more undecodable packets than this is undecodable


@dataclass(frozen=True)
class MelParams:
    """What featurise needs from ``[ingest]`` (``from_conf``), plus where sources may live."""
    sample_rate: int
    n_mels: int
    n_fft: int
    hop_length: int
    excerpt: str                # "middle" | "whole"
    excerpt_seconds: float
    whole_max_seconds: float    # "whole": at most this much, from the middle (bounds a row's bytes)
    min_seconds: float
    max_channels: int
    min_source_rate: int
    max_source_rate: int
    silence_dbfs: float
    truncation_tolerance_s: float
    truncation_tolerance_share: float
    reject_truncated: bool
    max_file_bytes: int
    allowed_roots: tuple[str, ...]      # resolved on the driver (catalogue.effective_roots); () = anywhere

    @staticmethod
    def from_conf(ingest) -> "MelParams":
        from deepcuts.audio.catalogue import effective_roots
        names = [k for k in MelParams.__dataclass_fields__ if k != "allowed_roots"]
        return MelParams(**{k: getattr(ingest, k) for k in names},
                         allowed_roots=effective_roots(ingest.source, ingest.allowed_roots))


@dataclass(frozen=True)
class Decoded:
    signal: np.ndarray          # mono float32 at MelParams.sample_rate
    excerpt_offset_s: float
    duration_s: float           # of the whole source (of what decodes, when truncated)
    source_rate: int
    channels: int
    codec: str
    decoder: str
    truncated_at_s: float | None = None
    warning: str | None = None


@dataclass(frozen=True)
class Features:
    mel: np.ndarray             # float32 [n_mels, n_frames], dB
    excerpt_offset_s: float
    duration_s: float           # of the whole source track
    source_rate: int
    channels: int
    truncated_at_s: float | None = None   # where the decodable audio ends, when well before the promise
    warning: str | None = None


class _Unreadable(Exception):
    """This decoder cannot open or decode this file: try the next one."""


class _Damaged(Exception):
    """This decoder stopped inside the file: the next one may resync past the damage."""


def _mixdown_weights(channels: int) -> np.ndarray:
    return np.full((channels,), 1.0 / channels, dtype=np.float32)


def _readf_float(f, out: np.ndarray, frames: int) -> int:
    """libsndfile's sf_readf_float into ``out``, straight through soundfile's cffi handle.

    ``SoundFile.read`` brackets every call with a tell and a seek "to update the position";
    for Ogg that seek is a real one (a bisection over pages; 8 ms each on a stream whose
    first granule is negative), which made block-wise reading 10x slower than the decode."""
    got = sf._snd.sf_readf_float(f._file, sf._ffi.cast("float *", out.ctypes.data), frames)
    err = sf._snd.sf_error(f._file)
    if err:
        sf._error_check(err)
    return got


if not all(hasattr(sf, name) for name in ("_snd", "_ffi", "_error_check")):   # another soundfile
    def _readf_float(f, out: np.ndarray, frames: int) -> int:  # noqa: F811
        return len(f.read(frames, out=out[:frames]))


# --- libsndfile -----------------------------------------------------------------------------
class _SndfileSource:
    """libsndfile through soundfile, on the bytes in memory.

    ``strict``: an error inside the stream raises :class:`_Damaged` (another decoder follows);
    otherwise what decoded before the error is kept.  A handle that failed is reopened (a failed
    FLAC seek leaves libsndfile's decoder unusable)."""
    name = "sndfile"

    def __init__(self, data: bytes, codec: str, strict: bool, fd: int | None = None):
        self._data, self._strict, self._fd, self._codec = data, strict, fd, codec
        self._f = self._open()
        self.rate, self.channels = self._f.samplerate, self._f.channels
        self.frames: int | None = self._f.frames
        self._holds = self._f.frames        # libsndfile reads nothing past its own count (and may fail seeking there)
        self._weights = _mixdown_weights(self.channels)
        self._block = None
        self._mpeg = sniff.mpeg_info(data) if codec == "mp3" else None
        self._ogg_safe = self._vorbis_seek_range(data) if codec == "vorbis" else None
        self._used = False
        if codec in ("wav", "aiff"):
            # libsndfile shortens a data chunk to what the file holds: the header's own count is the promise.
            self.frames = sniff.pcm_promised_frames(data, codec) or self.frames

    def _open(self):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self._fd is None:
                    return sf.SoundFile(io.BytesIO(self._data))
                # The file itself (a duplicate of the caller's descriptor): libsndfile then reads
                # with read(2) instead of calling back into Python for every few bytes (mpg123
                # reads each frame header and body apart: ~9,000 callbacks, 12 % of an mp3 excerpt).
                fd = os.dup(self._fd)
                os.lseek(fd, 0, os.SEEK_SET)
                return sf.SoundFile(fd, closefd=True)
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as exc:
            raise _Unreadable(f"libsndfile: {str(exc).split(': ', 1)[-1]}") from exc

    def _vorbis_seek_range(self, data: bytes):
        """(lo, hi, never) of the positions libsndfile's Ogg Vorbis seek lands exactly on.

        Measured (libsndfile 1.2.2) on a fresh handle: a seek into the last page (end trimming)
        or into the second and third audio pages of a stream that starts trimmed (ffmpeg -ss -c
        copy) lands up to 2,049 frames off; a second seek on a used handle can land off anywhere
        (so every seek gets a fresh handle, :meth:`_seek`); on a stream whose first granule is
        negative every seek is a linear scan (180 ms to the middle of 200 s).  Targets outside
        [lo, hi] are reached by decoding forward from a safe point instead (at most three
        pages), and ``never`` decodes from 0."""
        first, last = sniff.ogg_edge_granules(data)
        if len(first) < 3 or len(last) < 3:
            return (0, 0, True)
        offset = self._holds - last[-1]        # libsndfile's positions against the granules
        return (first[2] + offset, last[0] + offset, first[0] < 0)

    def _seek(self, f, pos: int):
        """``f`` (or a fresh handle) positioned at ``pos`` exactly (see _vorbis_seek_range)."""
        if self._ogg_safe is None:
            f.seek(pos)
            return f
        if self._used:
            self._failed()
            f = self._handle()
        self._used = True
        lo, hi, never = self._ogg_safe
        if not never and lo <= pos <= hi:
            f.seek(pos)
            return f
        at = hi if (not never and pos > hi) else 0
        f.seek(at)
        scratch = np.empty((BLOCK_FRAMES, self.channels), dtype=np.float32)
        while at < pos:
            k = _readf_float(f, scratch, min(BLOCK_FRAMES, pos - at))
            if k <= 0:
                break
            at += k
        return f

    def _handle(self):
        if self._f is None:
            self._f = self._open()
        return self._f

    def _failed(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = None

    def close(self) -> None:
        self._failed()

    def tail_intact(self, tolerance_frames: float) -> bool | None:
        """The probe's answer without decoding where the header allows it (mp3, Ogg), else None.
        (An mp3 seek past the excerpt costs a fifth of the excerpt's decode: mpg123 walks
        every frame header on the way.)"""
        if self._codec in OGG_CODECS:
            return True
        if self._mpeg is None:
            return None
        return sniff.mpeg_tail_intact(self._data, self._mpeg, tolerance_frames)

    def _read_into(self, f, out: np.ndarray) -> int:
        """Decode ``len(out)`` frames at the handle's position into mono ``out``; frames read."""
        n = len(out)
        if self.channels == 1:
            return _readf_float(f, out, n)
        if self._block is None:
            self._block = np.empty((BLOCK_FRAMES, self.channels), dtype=np.float32)
        got = 0
        while got < n:
            k = min(BLOCK_FRAMES, n - got)
            read = _readf_float(f, self._block, k)
            if read <= 0:
                break
            np.matmul(self._block[:read], self._weights, out=out[got:got + read])
            got += read
            if read < k:
                break
        return got

    def read(self, start: int, length: int) -> np.ndarray:
        if start >= self._holds:
            return np.empty(0, dtype=np.float32)
        out = np.empty(min(length, self._holds - start), dtype=np.float32)
        f = self._handle()
        try:
            f = self._seek(f, start)
            got = self._read_into(f, out)
        except (sf.LibsndfileError, RuntimeError) as exc:
            self._failed()
            if self._strict:
                raise _Damaged(f"libsndfile: {str(exc).split(': ', 1)[-1]}") from exc
            got = self._salvage(start, out)
        return out[:got]

    def _salvage(self, start: int, out: np.ndarray) -> int:
        """Block by block from ``start``, keeping what decodes before the error."""
        got = 0
        try:
            f = self._handle()
            f = self._seek(f, start)
            while got < len(out):
                k = self._read_into(f, out[got:got + 4096])
                got += k
                if k < 4096:
                    break
        except (sf.LibsndfileError, RuntimeError):
            self._failed()
        return got

    def has_audio_at(self, pos: int) -> bool:
        if pos >= self._holds:
            return False
        try:
            f = self._handle()
            f = self._seek(f, pos)
            return _readf_float(f, np.empty((PROBE_FRAMES, self.channels), dtype=np.float32), PROBE_FRAMES) > 0
        except (sf.LibsndfileError, RuntimeError):
            self._failed()
            return False

    def end_from(self, pos: int) -> int:
        """Decode on from ``pos`` (a position known to hold audio, or 0) to where audio ends."""
        scratch = np.empty(BLOCK_FRAMES, dtype=np.float32)
        if pos >= self._holds:
            return pos
        try:
            f = self._handle()
            f = self._seek(f, pos)
            while True:
                k = self._read_into(f, scratch)
                pos += k
                if k < len(scratch):
                    return pos
        except (sf.LibsndfileError, RuntimeError) as exc:
            self._failed()
            if self._strict:
                raise _Damaged(f"libsndfile: {str(exc).split(': ', 1)[-1]}") from exc
            return pos


# --- PyAV (FFmpeg) --------------------------------------------------------------------------
_SAMPLE_TYPES = {  # FFmpeg sample format -> (numpy dtype, scale to [-1, 1), offset)
    "flt": (np.float32, 1.0, 0.0), "fltp": (np.float32, 1.0, 0.0),
    "dbl": (np.float64, 1.0, 0.0), "dblp": (np.float64, 1.0, 0.0),
    "s16": (np.int16, 1.0 / 2 ** 15, 0.0), "s16p": (np.int16, 1.0 / 2 ** 15, 0.0),
    "s32": (np.int32, 1.0 / 2 ** 31, 0.0), "s32p": (np.int32, 1.0 / 2 ** 31, 0.0),
    "u8": (np.uint8, 1.0 / 128, -128.0), "u8p": (np.uint8, 1.0 / 128, -128.0),
}


def _add_channels(frame, channels: int, skip: int, out: np.ndarray) -> None:
    """``out`` = the sum of the frame's channels from sample ``skip`` on (``len(out)`` samples),
    scaled to [-1, 1), for any sample format (_AvSource.read's general case: integer FLAC/ALAC/PCM,
    packed layouts, more than two channels)."""
    fmt = frame.format
    dtype, scale, offset = _SAMPLE_TYPES[fmt.name]
    n, k = frame.samples, len(out)
    if fmt.is_planar:
        columns = [np.frombuffer(plane, dtype=dtype, count=n)[skip:skip + k] for plane in frame.planes[:channels]]
    else:                                  # interleaved: strided views, one per channel
        packed = np.frombuffer(frame.planes[0], dtype=dtype, count=n * channels).reshape(n, channels)
        columns = [packed[skip:skip + k, c] for c in range(channels)]
    exact = dtype is np.float32
    for c, a in enumerate(columns):
        if c == 0:
            if exact:
                np.copyto(out, a)
            else:
                np.multiply(a, np.float32(scale), out=out, casting="unsafe")
        elif exact:
            out += a
        else:
            out += a * np.float32(scale)
    if offset:
        out += offset * scale * channels


class _AvSource:
    """PyAV on the bytes in memory, with seeks made sample-accurate: decode from PREROLL_S
    before the target and place the first frame by its timestamp.  Bad packets are skipped, so
    a damaged stream resyncs; ``seekable=False`` decodes from the start (Ogg Vorbis: FFmpeg's
    timestamps after a seek are not exact)."""
    name = "av"

    def __init__(self, data: bytes, codec: str, strict: bool = False, fmt: str | None = None,
                 seekable: bool | None = None):
        import av
        self._av = av
        try:
            self._c = av.open(io.BytesIO(data), mode="r", format=fmt)
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise _Unreadable(f"PyAV: {exc}") from exc
        if not self._c.streams.audio:
            self._c.close()
            raise _Unreadable("PyAV: no audio stream")
        self._s = self._c.streams.audio[0]
        cc = self._s.codec_context
        self.rate, self.channels = cc.sample_rate, cc.channels
        if not self.rate or not self.channels:
            self._c.close()
            raise _Unreadable("PyAV: no sample rate or channel count")
        self._tb = self._s.time_base
        self._start = self._s.start_time or 0
        # pts -> sample position in integers: Fraction arithmetic per frame cost 26 ms a 30 s AAC excerpt
        self._pts_num, self._pts_den = self._tb.numerator * self.rate, self._tb.denominator
        self._codec = codec
        self._seekable = (codec != "vorbis") if seekable is None else seekable
        self.bad_packets = 0
        if self._s.duration:
            self.frames = int(round(self._s.duration * self._tb * self.rate))
        elif self._c.duration:
            self.frames = int(round(self._c.duration * self.rate / 1_000_000))
        else:
            self.frames = None
        if codec in ("wav", "aiff"):
            self.frames = sniff.pcm_promised_frames(data, codec) or self.frames
        # Raw ADTS AAC has no length anywhere: FFmpeg estimates it from the bitrate, which promises nothing.
        self.length_is_estimate = codec == "aac"
        self._at = None          # sample position the demuxer is at (None: unknown, seek first)

    def close(self) -> None:
        self._c.close()

    def tail_intact(self, tolerance_frames: float) -> bool | None:
        return True if self._codec in OGG_CODECS else None

    def _seek(self, pos: int) -> None:
        target = pos - int(PREROLL_S * self.rate)
        if not self._seekable or target <= 0:
            if self._at != 0:
                self._c.seek(self._start if self._start else 0, stream=self._s, backward=True)
            self._at = 0
            return
        self._c.seek(int(self._start + target / self.rate / self._tb), stream=self._s, backward=True)
        self._at = None

    def _frames(self):
        """(sample position, frame) of each decoded frame from the demuxer's position; a demuxer
        error ends the stream there (what decoded before it is kept)."""
        av = self._av
        nxt = self._at or 0
        packets = self._c.demux(self._s)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError):
                self.bad_packets += 1
                break
            try:
                frames = packet.decode()
            except av.error.FFmpegError:      # a damaged packet: skip it, the decoder resyncs
                self.bad_packets += 1
                if self.bad_packets > MAX_BAD_PACKETS:
                    raise _Damaged(f"PyAV: more than {MAX_BAD_PACKETS} undecodable packets")
                continue
            num, den, first = self._pts_num, self._pts_den, self._start
            for frame in frames:
                pts = frame.pts
                pos = ((pts - first) * num + den // 2) // den if pts is not None else nxt
                nxt = pos + frame.samples
                yield pos, frame
        self._at = None

    def _positioned(self, pos: int):
        """Frames from just before ``pos``; none when the demuxer cannot seek there."""
        try:
            self._seek(pos)
        except (self._av.error.FFmpegError, OSError):
            self._at = None
            return iter(())
        return self._frames()

    def read(self, start: int, length: int) -> np.ndarray:
        """Timestamps place the first frame; the rest follow it sample by sample, as a decoder
        that resyncs plays them (a splice in an Ogg or FLAC stream leaves a jump in the
        timestamps that libsndfile ignores too).

        Each frame's planes are summed straight into the excerpt (one ufunc a frame for planar
        float, FFmpeg's output for mp3/AAC/Opus/Vorbis): ``AudioFrame.to_ndarray`` stacks planes
        with np.vstack and costs 13 us a frame, as much as decoding an AAC frame."""
        out = np.empty(length, dtype=np.float32)
        got, started, channels = 0, False, self.channels
        frombuffer, f32, add = np.frombuffer, np.float32, np.add
        for pos, frame in self._positioned(start):
            n = frame.samples
            if not started:
                if pos + n <= start:
                    continue
                skip, started = max(0, start - pos), True
            else:
                skip = 0
            k = min(n - skip, length - got)
            if k > 0:
                dst = out[got:got + k]
                if channels <= 2 and frame.format.name == "fltp":
                    planes = frame.planes
                    if channels == 1:
                        np.copyto(dst, frombuffer(planes[0], f32, n)[skip:skip + k])
                    else:
                        add(frombuffer(planes[0], f32, n)[skip:skip + k],
                            frombuffer(planes[1], f32, n)[skip:skip + k], out=dst)
                else:
                    _add_channels(frame, channels, skip, dst)
                got += k
            if got >= length:
                break
        self._at = None
        out = out[:got]
        if channels > 1:
            out *= f32(1.0 / channels)                # the mean of the channels, like librosa
        return out

    def has_audio_at(self, pos: int) -> bool:
        for fpos, frame in self._positioned(pos):
            if fpos + frame.samples > pos:
                self._at = None
                return True
        return False

    def end_from(self, pos: int) -> int:
        end = pos
        for fpos, frame in self._positioned(pos):
            end = max(end, fpos + frame.samples)
        return end


class _IndexedMpegSource:
    """An mp3 without a frame count: its frame headers are walked (exact length), and each read
    decodes just the byte range of the frames it needs, from MPEG_WARMUP_FRAMES earlier."""
    name = "av-indexed"

    def __init__(self, data: bytes, info: sniff.MpegInfo):
        self._data, self._info = data, info
        self._offsets = sniff.mpeg_frames(data, info)
        if len(self._offsets) == 0:
            raise _Unreadable("no complete MPEG frame")
        self._spf = info.samples_per_frame
        self._stop = info.first_frame + info.audio_bytes      # before any trailing tag
        self.rate, self.channels = info.sample_rate, info.channels
        self.frames = len(self._offsets) * self._spf

    def close(self) -> None:
        pass

    def tail_intact(self, tolerance_frames: float) -> bool | None:
        return True               # the walk counted the frames the file holds: nothing promised beyond

    def read(self, start: int, length: int) -> np.ndarray:
        n = len(self._offsets)
        first = max(0, start // self._spf - MPEG_WARMUP_FRAMES)
        last = min(n, -(-(start + length) // self._spf) + 1)
        stop = self._offsets[last] if last < n else self._stop
        src = _AvSource(self._data[self._offsets[first]:stop], "mp3", fmt="mp3", seekable=False)
        try:
            return src.read(start - first * self._spf, length)
        finally:
            src.close()

    def has_audio_at(self, pos: int) -> bool:
        return pos < self.frames

    def end_from(self, pos: int) -> int:
        return self.frames


def _open_source(name: str, data: bytes, codec: str, strict: bool, fd: int | None = None):
    if name == "sndfile":
        return _SndfileSource(data, codec, strict, fd)
    if name == "av-indexed":
        return _IndexedMpegSource(data, sniff.mpeg_info(data))
    return _AvSource(data, codec, strict)


# --- the excerpt, and what truncation means --------------------------------------------------
def _excerpt_window(frames: int, rate: int, p: MelParams) -> tuple[int, int]:
    """(start, length) in source frames of the excerpt to decode."""
    want = int(round((p.whole_max_seconds if p.excerpt == "whole" else p.excerpt_seconds) * rate))
    if frames <= want:
        return 0, frames
    return (frames - want) // 2, want


def _check_format(rate: int, channels: int, p: MelParams) -> None:
    if channels < 1 or channels > p.max_channels:
        raise RejectedAudio(BAD_FORMAT, f"{channels} channels (allowed 1..{p.max_channels})")
    if rate < p.min_source_rate or rate > p.max_source_rate:
        raise RejectedAudio(BAD_FORMAT, f"sample rate {rate} Hz (allowed {p.min_source_rate}..{p.max_source_rate})")


def _check_length(frames: int, rate: int, p: MelParams) -> None:
    if frames <= 0:
        raise RejectedAudio(EMPTY, "no audio frames")
    if frames / rate < p.min_seconds:
        raise RejectedAudio(TOO_SHORT, f"{frames / rate:.2f} s < {p.min_seconds} s")


def truncation_tolerance(frames: int, rate: int, p: MelParams) -> float:
    """Frames a decodable length may fall short of the header's promise without being truncated."""
    return max(p.truncation_tolerance_s * rate, p.truncation_tolerance_share * frames)


@dataclass
class _Excerpt:
    signal: np.ndarray | None   # mono at the source rate; None when the verdict needs no audio
    start: int                  # source frames
    duration: int               # of the whole source (of what decodes, when truncated)
    truncated_at: int | None
    detail: str | None
    decoder: str
    rate: int
    channels: int
    promised: int


def _decode_excerpt(src, p: MelParams, promised_before: int = 0) -> _Excerpt:
    """``promised_before``: the length a previous decoder's header promised (a fallback that
    only estimates the length, like FFmpeg on a cut WAV, must not excuse the truncation)."""
    rate, channels = src.rate, src.channels
    _check_format(rate, channels, p)
    promised = src.frames
    if promised is None or promised <= 0:
        promised = src.end_from(0)        # no length in the header (streamed): count what decodes
    promised = max(promised, promised_before)
    _check_length(promised, rate, p)
    tol = truncation_tolerance(promised, rate, p)
    start, length = _excerpt_window(promised, rate, p)
    y = src.read(start, length)
    end = None                            # where the decodable audio ends, once we had to look
    if len(y) < length:
        end = src.end_from(start + len(y)) if len(y) else src.end_from(0)
    elif start + length < promised - tol:
        intact = src.tail_intact(tol)
        if intact is None:                # the probe: a block safely inside the promised length
            intact = src.has_audio_at(max(int(promised - tol) - PROBE_FRAMES, start + length))
        if not intact:
            end = src.end_from(start + length)
    if end is None or promised - end <= tol or getattr(src, "length_is_estimate", False):
        if end is not None and len(y) < length and start > 0:   # the estimate put the excerpt past the end
            start, length = _excerpt_window(end, rate, p)
            y = src.read(start, length)
        return _Excerpt(y, start, promised if end is None else end, None, None, src.name, rate, channels,
                        promised)
    detail = (f"decodable audio ends at {end / rate:.2f} s of the {promised / rate:.2f} s its header "
              f"promises ({src.name})")
    if p.reject_truncated or end / rate < p.min_seconds:
        return _Excerpt(None, 0, end, end, detail, src.name, rate, channels, promised)
    start2, length2 = _excerpt_window(end, rate, p)
    if start2 >= start and start2 + length2 <= start + len(y):
        y = y[start2 - start:start2 - start + length2]
    else:
        y = src.read(start2, length2)
    if len(y) < length2 - tol:
        raise _Damaged(f"{src.name}: could not re-read the audio before the damage")
    return _Excerpt(y, start2, end, end, detail, src.name, rate, channels, promised)


def _try(name: str, data: bytes, codec: str, p: MelParams, strict: bool,
         before: "_Excerpt | None" = None, fd: int | None = None) -> _Excerpt:
    src = _open_source(name, data, codec, strict, fd)
    try:
        return _decode_excerpt(src, p, before.promised if before is not None and before.rate == src.rate else 0)
    finally:
        src.close()


def decode(data: bytes, p: MelParams, suffix: str = "", fd: int | None = None) -> Decoded:
    """Decode the excerpt of one file to mono float32 at ``p.sample_rate``.

    ``fd``: an open descriptor of the same file (a local source), which libsndfile then reads
    itself; the bytes are still what is sniffed and what PyAV reads.

    Decoders are tried in :data:`DECODERS` order: the next one takes over when one cannot open
    the file or fails inside it, and a truncated verdict is checked with the next one too (it
    may resync further: FFmpeg decodes 7.9 s of a spliced 10 s mp3 where mpg123 stops at 3.9 s);
    the decode that reaches furthest is kept."""
    if not data:
        raise RejectedAudio(EMPTY, "0 bytes")
    codec = sniff.codec_of(data, suffix)
    names = DECODERS.get(codec, DECODERS["unknown"])
    if codec == "mp3":
        info = sniff.mpeg_info(data)
        if info is not None and info.frame_count is None:
            names = MPEG_UNINDEXED
    failures, damaged, truncated = [], [], None
    for i, name in enumerate(names):
        try:
            got = _try(name, data, codec, p, strict=i < len(names) - 1, before=truncated, fd=fd)
        except (_Unreadable, _Damaged) as exc:
            failures.append(str(exc))
            if isinstance(exc, _Damaged):
                damaged.append(name)
            continue
        except RejectedAudio:
            if truncated is not None:     # the fallback disagrees about the header: keep the first verdict
                break
            raise
        if got.truncated_at is None:
            return _finish(got, codec, p)
        if truncated is None or got.duration > truncated.duration:
            truncated = got
    if truncated is None:
        for name in damaged:              # nobody read it without an error: keep what decodes
            try:
                got = _try(name, data, codec, p, strict=False, fd=fd)
            except (_Unreadable, _Damaged) as exc:
                failures.append(str(exc))
                continue
            if got.truncated_at is None:
                return _finish(got, codec, p)
            truncated = got
            break
    if truncated is None:
        raise RejectedAudio(UNDECODABLE, f"{codec}: " + "; ".join(dict.fromkeys(failures)))
    if truncated.signal is None:
        short = "" if p.reject_truncated else f": shorter than {p.min_seconds} s"
        raise RejectedAudio(TRUNCATED, truncated.detail + short)
    return _finish(truncated, codec, p)


def _finish(got: _Excerpt, codec: str, p: MelParams) -> Decoded:
    rate, y = got.rate, got.signal
    if rate != p.sample_rate:
        import soxr
        y = soxr.resample(y, rate, p.sample_rate, quality="HQ")
    y = np.ascontiguousarray(y, dtype=np.float32)
    return Decoded(y, got.start / rate, got.duration / rate, rate, got.channels, codec, got.decoder,
                   None if got.truncated_at is None else got.truncated_at / rate,
                   None if got.detail is None else f"truncated: {got.detail}")


# --- features --------------------------------------------------------------------------------
def featurise(data: bytes, p: MelParams, suffix: str = "", fd: int | None = None) -> Features:
    """bytes of one audio file -> its log-mel excerpt, or :class:`RejectedAudio` (``fd``: see decode)."""
    d = decode(data, p, suffix, fd)
    y = d.signal
    energy = float(np.dot(y, y)) if len(y) else 0.0     # one BLAS pass: NaN/Inf show up here too
    if not math.isfinite(energy):
        if not np.all(np.isfinite(y)):
            raise RejectedAudio(NOT_FINITE, "decoded samples contain NaN or Inf")
        energy = float(np.dot(y.astype(np.float64), y.astype(np.float64)))
    rms = math.sqrt(energy / len(y)) if len(y) else 0.0
    rms_dbfs = 20 * math.log10(max(rms, 1e-12))
    if rms_dbfs < p.silence_dbfs:
        raise RejectedAudio(SILENT, f"RMS {rms_dbfs:.1f} dBFS < {p.silence_dbfs} dBFS")
    mel = log_mel(y, p.sample_rate, p.n_fft, p.hop_length, p.n_mels)
    return Features(mel, d.excerpt_offset_s, d.duration_s, d.source_rate, d.channels,
                    d.truncated_at_s, d.warning)


def fingerprint(data: bytes) -> str:
    """Content fingerprint of a source file (change detection, provenance)."""
    import hashlib
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def suffix_of(uri: str) -> str:
    return os.path.splitext(uri.split("?", 1)[0])[1].lower()
