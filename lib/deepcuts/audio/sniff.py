"""What a file is, from its first bytes, and what its header promises: pure Python, no decoding.

Decoders are chosen by content, not by file name (a ``.mp3`` that is really AAC, a ``.ogg``
holding Opus).  Two headers are read here because the decoders hide them:

* MPEG audio: whether the first frame carries a frame count (Xing/Info/VBRI).  Without one,
  libsndfile and FFmpeg both *estimate* the length from the bitrate (one VBR file here: 138 s
  and 190 s estimated, 200 s real) and libsndfile stops reading at its estimate, so such a
  file is indexed by walking its frame headers (:func:`mpeg_frames`).
* WAV/AIFF: the length the data chunk declares.  libsndfile silently shortens it to what the
  file holds, which would make a cut WAV look whole.
"""
from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

# --- containers -------------------------------------------------------------------------------
SUFFIX_CODEC = {".wav": "wav", ".wave": "wav", ".aif": "aiff", ".aiff": "aiff", ".aifc": "aiff",
                ".flac": "flac", ".ogg": "vorbis", ".oga": "vorbis", ".opus": "opus", ".mp3": "mp3",
                ".m4a": "mp4", ".mp4": "mp4", ".alac": "mp4", ".aac": "aac"}


def codec_of(data: bytes, suffix: str = "") -> str:
    """"wav", "aiff", "flac", "vorbis", "opus", "oggflac", "ogg", "mp3", "mp2", "mp4", "aac",
    or the suffix's guess ("unknown" when there is none)."""
    head = data[:64]
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS" and len(head) >= 28:
        first = head[27 + head[26]:]
        if first.startswith(b"\x01vorbis"):
            return "vorbis"
        if first.startswith(b"OpusHead"):
            return "opus"
        if first.startswith(b"\x7fFLAC"):
            return "oggflac"
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"
    start = id3v2_size(data)
    if start and data[start:start + 4] == b"fLaC":
        return "flac"
    sync = data[start:start + 4]
    if len(sync) == 4 and sync[0] == 0xFF and sync[1] & 0xE0 == 0xE0:
        layer = (sync[1] >> 1) & 3
        if layer == 0 and sync[1] & 0xF6 == 0xF0:
            return "aac"                                  # ADTS
        if layer == 1:
            return "mp3"
        if layer in (2, 3):
            return "mp2"
    return SUFFIX_CODEC.get(suffix.lower(), "unknown")


def id3v2_size(data: bytes) -> int:
    """Bytes taken by leading ID3v2 tags (several may be stacked; cover art makes them large)."""
    pos = 0
    while data[pos:pos + 3] == b"ID3" and len(data) >= pos + 10:
        size = (data[pos + 6] << 21) | (data[pos + 7] << 14) | (data[pos + 8] << 7) | data[pos + 9]
        pos += 10 + size + (10 if data[pos + 5] & 0x10 else 0)
    return pos


def trailing_tag_size(data: bytes) -> int:
    """Bytes taken by ID3v1 / APEv2 tags at the end of an MPEG file."""
    end = len(data)
    if end >= 128 and data[end - 128:end - 125] == b"TAG":
        end -= 128
    if end >= 32 and data[end - 32:end - 24] == b"APETAGEX":
        size = struct.unpack_from("<I", data, end - 20)[0]
        flags = struct.unpack_from("<I", data, end - 12)[0]
        end -= size + (32 if flags & 0x80000000 else 0)
    return len(data) - max(end, 0)


# --- MPEG audio -------------------------------------------------------------------------------
_BITRATES = {  # (mpeg1?, layer) -> kbit/s by index
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _frame_params(b1: int, b2: int) -> tuple[int, int, int] | None:
    """(frame bytes, samples per frame, sample rate) of an MPEG audio header's 2nd/3rd bytes."""
    if b1 & 0xE0 != 0xE0:
        return None
    version, layer = (b1 >> 3) & 3, 4 - ((b1 >> 1) & 3)
    bitrate_index, rate_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version == 1 or layer == 4 or bitrate_index in (0, 15) or rate_index == 3:
        return None                                       # reserved, or free format
    mpeg1 = version == 3
    bitrate = _BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    rate = _RATES[version][rate_index]
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4, 384, rate
    samples = 1152 if (layer == 2 or mpeg1) else 576
    return samples // 8 * bitrate // rate + padding, samples, rate


# Frame length by the header's 2nd and 3rd bytes (0 = not a header): the frame walk's only lookup.
_FRAME_BYTES = [(_frame_params(i >> 8, i & 0xFF) or (0,))[0] for i in range(65536)]


@dataclass(frozen=True)
class MpegInfo:
    first_frame: int             # byte offset of the first audio frame (after ID3v2)
    sample_rate: int
    channels: int
    samples_per_frame: int
    frame_count: int | None      # from a Xing/Info/VBRI header: the encoder's promise
    stream_bytes: int | None     # likewise (Xing "bytes", VBRI "bytes")
    audio_bytes: int             # what the file holds from the first frame to the trailing tags


def mpeg_info(data: bytes) -> MpegInfo | None:
    """The first MPEG audio frame's parameters and its Xing/Info/VBRI header, if any."""
    pos = id3v2_size(data)
    limit = min(len(data) - 4, pos + 65536)           # tolerate a little junk after the tag
    while pos < limit:
        if data[pos] == 0xFF:
            params = _frame_params(data[pos + 1], data[pos + 2])
            if params and _confirmed(data, pos, params[0]):
                break
        pos += 1
    else:
        return None
    frame_bytes, samples, rate = params
    b1, b3 = data[pos + 1], data[pos + 3]
    mono = (b3 >> 6) == 3
    mpeg1 = ((b1 >> 3) & 3) == 3
    side = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    count = nbytes = None
    tag = data[pos + 4 + side:pos + 8 + side]
    if tag in (b"Xing", b"Info"):
        flags = struct.unpack_from(">I", data, pos + 8 + side)[0]
        at = pos + 12 + side
        if flags & 1:
            count = struct.unpack_from(">I", data, at)[0]
            at += 4
        if flags & 2:
            nbytes = struct.unpack_from(">I", data, at)[0]
    elif data[pos + 36:pos + 40] == b"VBRI":
        nbytes, count = struct.unpack_from(">II", data, pos + 46)
    audio = len(data) - pos - trailing_tag_size(data)
    return MpegInfo(pos, rate, 1 if mono else 2, samples, count, nbytes, audio)


def _confirmed(data: bytes, pos: int, frame_bytes: int) -> bool:
    """A sync word is a frame when the next frame starts where this one ends (or the file ends)."""
    nxt = pos + frame_bytes
    if nxt + 3 > len(data):
        return nxt <= len(data) + 1
    return data[nxt] == 0xFF and data[nxt + 1] == data[pos + 1] and _FRAME_BYTES[(data[nxt + 1] << 8) | data[nxt + 2]] > 0


def mpeg_frames(data: bytes, info: MpegInfo) -> array:
    """Byte offsets of every complete audio frame (a walk over the headers: ~0.5 us a frame).

    Stops at the first byte that does not continue the chain (trailing tags, or the cut of
    a truncated file); a frame running past the end of the file is not counted."""
    offsets = array("q")
    end = info.first_frame + info.audio_bytes
    pos = info.first_frame
    b1 = data[pos + 1]
    table = _FRAME_BYTES
    append = offsets.append
    while pos + 4 <= end and data[pos] == 0xFF and data[pos + 1] == b1:
        length = table[(b1 << 8) | data[pos + 2]]
        if not length or pos + length > end:
            break
        append(pos)
        pos += length
    return offsets


def mpeg_tail_intact(data: bytes, info: MpegInfo, tolerance_frames: float) -> bool | None:
    """The truncation probe's answer without decoding, for an mp3 with a Xing/VBRI header:
    True when the file holds the bytes the header counts (within the tolerance) and its last
    bytes are a chain of frames (a zero-filled tail of a preallocated download is not).
    None (decode to find out) when the header has no byte count or either test fails."""
    if not info.stream_bytes or not info.frame_count:
        return None
    bytes_per_frame = info.stream_bytes / (info.frame_count + 1)
    slack = tolerance_frames / info.samples_per_frame * bytes_per_frame
    # LAME counts from the first frame; some taggers count the ID3v2 tag too: accept either.
    if info.audio_bytes + slack < info.stream_bytes and info.first_frame + info.audio_bytes + slack < info.stream_bytes:
        return None
    end = info.first_frame + info.audio_bytes
    b1 = data[info.first_frame + 1]
    table = _FRAME_BYTES
    pos = data.find(b"\xff", max(info.first_frame, end - 8192), end)
    while 0 <= pos < end - 4:
        chain, at = 0, pos
        while at + 3 <= end and data[at] == 0xFF and data[at + 1] == b1:
            length = table[(b1 << 8) | data[at + 2]]
            if not length:
                break
            chain += 1
            at += length
        if chain >= 2 and at >= end:
            return True
        pos = data.find(b"\xff", pos + 1, end)
    return None


# --- Ogg ----------------------------------------------------------------------------------------
def _page_granule(data: bytes, pos: int) -> int | None:
    if pos < 0 or pos + 27 > len(data) or data[pos:pos + 4] != b"OggS":
        return None
    return struct.unpack_from("<q", data, pos + 6)[0]


def ogg_edge_granules(data: bytes, pages: int = 3) -> tuple[list[int], list[int]]:
    """Granule positions of the first ``pages`` audio pages and of the last ``pages`` pages
    (pages where no packet ends, granule -1, are skipped), found with ``bytes.find``: no decoding.
    Empty lists when the file does not look like Ogg."""
    first, pos = [], 0
    while len(first) < pages:
        pos = data.find(b"OggS", pos)
        granule = _page_granule(data, pos)
        if granule is None:
            break
        if granule not in (0, -1):
            first.append(granule)
        pos += 4
    last, pos = [], len(data)
    while len(last) < pages and pos > 0:
        pos = data.rfind(b"OggS", max(0, pos - (1 << 16)), pos)
        granule = _page_granule(data, pos)
        if granule is None:
            break
        if granule not in (0, -1):
            last.append(granule)
    return first, last[::-1]


# --- PCM containers -----------------------------------------------------------------------------
def pcm_promised_frames(data: bytes, codec: str) -> int | None:
    """Frames a WAV's data chunk or an AIFF's COMM chunk declares; None when it does not say
    (streamed WAV with size 0 or 0xFFFFFFFF, RF64, unreadable header)."""
    try:
        if codec == "wav" and data[:4] == b"RIFF":
            pos, block_align = 12, None
            while pos + 8 <= len(data):
                cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
                if cid == b"fmt ":
                    block_align = struct.unpack_from("<H", data, pos + 20)[0]
                elif cid == b"data":
                    if not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align
                pos += 8 + size + (size & 1)
        elif codec == "aiff":
            pos = 12
            while pos + 8 <= len(data):
                cid, size = data[pos:pos + 4], struct.unpack_from(">I", data, pos + 4)[0]
                if cid == b"COMM":
                    return struct.unpack_from(">I", data, pos + 10)[0]
                pos += 8 + size + (size & 1)
    except struct.error:
        return None
    return None
