"""Real-encoder audio files: Debian's encoders (lame, oggenc, opusenc, flac, sox, ffmpeg) run on
synthetic music, plus damaged copies (cut at 40 %, spliced) with their documented outcome.

    python tests/encoder_fixtures.py OUT_DIR [--seconds 10]     # make them (cached by name)

The test session makes them once (tests/test_real_encoders.py, a session-scoped fixture);
bench/ingest.py makes 200 s ones.  Install the encoders with ``bin/bootstrap.sh --test``
(apt-get, as root) or ``apt-get install -y lame ffmpeg sox opus-tools vorbis-tools flac``.

The negative first granule: sox trimming a vorbis stream (it re-encodes from 0), ffmpeg
``-ss`` with ``-c copy``, and ``-output_ts_offset`` / ``-itsoffset`` with
``-avoid_negative_ts disabled`` all write a first audio page with a positive granule, so the
file is made as a stream cut out of a longer one keeps its granules: the pages of an oggenc
file are rewritten with every granule shifted down, CRCs recomputed.
"""
from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

TOOLS = ("lame", "ffmpeg", "sox", "opusenc", "opusdec", "oggenc", "oggdec", "flac")
INSTALL_HINT = ("apt-get install -y lame ffmpeg sox opus-tools vorbis-tools flac "
                "(or bin/bootstrap.sh --test as root)")

INGESTED, TRUNCATED = "ingested", "truncated"   # TRUNCATED: ingested from what decodes, with a warning


@dataclass(frozen=True)
class Case:
    name: str              # file name under the fixture folder
    codec: str             # what deepcuts.audio.sniff.codec_of says
    outcome: str           # INGESTED | TRUNCATED | "rejected:<reason>"
    reference: str | None  # decoder of the reference decode: "ffmpeg" | "oggdec" | "opusdec"; None: no comparison
    make: tuple            # ("cmd", argv...) with {src44} {src48} {out} {cover} {dir}; or ("cut"/"splice"/"neg", source case)
    note: str = ""
    truncated_at: float | None = None   # share of the length where a damaged file's audio ends


_L = "lame --quiet --noreplaygain"
_F = "ffmpeg -v error -nostdin -y"
CASES: tuple[Case, ...] = (
    # MPEG layer III
    Case("lame_cbr192.mp3", "mp3", INGESTED, "ffmpeg", ("cmd", f"{_L} -b 192 {{src44}} {{out}}"), "LAME CBR, Info header"),
    Case("lame_vbr_v2.mp3", "mp3", INGESTED, "ffmpeg", ("cmd", f"{_L} -V 2 {{src44}} {{out}}"), "LAME VBR, Xing header"),
    Case("lame_cbr128_noxing.mp3", "mp3", INGESTED, "ffmpeg", ("cmd", f"{_L} -t -b 128 {{src44}} {{out}}"),
         "LAME CBR without Xing/LAME header (-t)"),
    Case("lame_vbr_v4_noxing.mp3", "mp3", INGESTED, "ffmpeg", ("cmd", f"{_L} -t -V 4 {{src44}} {{out}}"),
         "LAME VBR without Xing/LAME header: every decoder's length is a bitrate estimate"),
    Case("lame_vbr_id3_cover.mp3", "mp3", INGESTED, "ffmpeg",
         ("cmd", f"{_L} -V 2 --tt Title --ta Artist --tl Album --ty 2024 --tn 3 --ti {{cover}} {{src44}} {{out}}"),
         "ID3v2 tags with 220 kB of cover art"),
    Case("lame_cbr_id3_cover_noxing.mp3", "mp3", INGESTED, "ffmpeg",
         ("cmd", f"{_L} -t -b 160 --tt Title --ta Artist --ti {{cover}} {{src44}} {{out}}"),
         "ID3v2 + cover art, no Xing header"),
    Case("lame_22k.mp3", "mp3", INGESTED, "ffmpeg", ("cmd", f"{_L} -V 5 --resample 22.05 {{src44}} {{out}}"),
         "MPEG-2 layer III at 22.05 kHz"),
    Case("lame_48k.mp3", "mp3", INGESTED, "ffmpeg", ("cmd", f"{_L} -b 192 {{src48}} {{out}}"), "48 kHz"),
    Case("lame_mono.mp3", "mp3", INGESTED, "ffmpeg", ("cmd", f"{_L} -m m -V 4 {{src44}} {{out}}"), "mono"),
    Case("lame_nogap_part1.mp3", "mp3", INGESTED, "ffmpeg", ("nogap",),
         "gapless: first half of a lame --nogap pair"),
    Case("ffmpeg_libmp3lame.mp3", "mp3", INGESTED, "ffmpeg",
         ("cmd", f"{_F} -i {{src44}} -c:a libmp3lame -q:a 2 {{out}}"), "ffmpeg's LAME, its own Xing header"),
    Case("ffmpeg_shine.mp3", "mp3", INGESTED, "ffmpeg",
         ("cmd", f"{_F} -i {{src44}} -c:a libshine -b:a 128k {{out}}"), "shine (fixed-point encoder)"),
    Case("ffmpeg_trimmed_copy.mp3", "mp3", INGESTED, "ffmpeg", ("trim", "lame_vbr_v2.mp3"),
         "seeked/trimmed: ffmpeg -ss 2.5 -c copy (starts mid bit-reservoir)"),
    # Ogg Vorbis
    Case("oggenc_q0.ogg", "vorbis", INGESTED, "oggdec", ("cmd", "oggenc -Q -q 0 -o {out} {src44}")),
    Case("oggenc_q5.ogg", "vorbis", INGESTED, "oggdec", ("cmd", "oggenc -Q -q 5 -o {out} {src44}")),
    Case("oggenc_q10.ogg", "vorbis", INGESTED, "oggdec", ("cmd", "oggenc -Q -q 10 -o {out} {src48}")),
    Case("ffmpeg_libvorbis_q2.ogg", "vorbis", INGESTED, "oggdec",
         ("cmd", f"{_F} -i {{src44}} -c:a libvorbis -q:a 2 {{out}}")),
    Case("ffmpeg_libvorbis_q7.ogg", "vorbis", INGESTED, "oggdec",
         ("cmd", f"{_F} -i {{src48}} -c:a libvorbis -q:a 7 {{out}}")),
    Case("ffmpeg_native_vorbis.ogg", "vorbis", INGESTED, "oggdec",
         ("cmd", f"{_F} -i {{src44}} -c:a vorbis -strict -2 {{out}}"), "FFmpeg's own (experimental) encoder"),
    Case("sox_trimmed.ogg", "vorbis", INGESTED, "oggdec", ("cmd", "sox {src44} -C 4 {out} trim 0.7 8.5"),
         "sox vorbis, trimmed"),
    Case("ffmpeg_trimmed_copy.ogg", "vorbis", INGESTED, "oggdec", ("trim", "oggenc_q5.ogg"),
         "seeked/trimmed: ffmpeg -ss 2.5 -c copy"),
    Case("negative_granule.ogg", "vorbis", INGESTED, "oggdec", ("neg", "oggenc_q5.ogg"),
         "first audio page's granule position negative (libvorbis trims; ffmpeg warns 'invalid pts')"),
    # Ogg Opus
    Case("opusenc_96k.opus", "opus", INGESTED, "opusdec", ("cmd", "opusenc --quiet --bitrate 96 {src44} {out}")),
    Case("opusenc_48k_vbr64.opus", "opus", INGESTED, "opusdec", ("cmd", "opusenc --quiet --vbr --bitrate 64 {src48} {out}")),
    Case("opusenc_mono32.opus", "opus", INGESTED, "opusdec",
         ("cmd", "opusenc --quiet --downmix-mono --bitrate 32 {src44} {out}")),
    Case("ffmpeg_libopus.opus", "opus", INGESTED, "opusdec", ("cmd", f"{_F} -i {{src48}} -c:a libopus -b:a 128k {{out}}")),
    # FLAC, ALAC, AAC
    Case("flac_cli.flac", "flac", INGESTED, "ffmpeg", ("cmd", "flac -s -f -5 -o {out} {src44}")),
    Case("ffmpeg_flac24.flac", "flac", INGESTED, "ffmpeg",
         ("cmd", f"{_F} -i {{src48}} -c:a flac -sample_fmt s32 -bits_per_raw_sample 24 {{out}}"), "24-bit"),
    Case("ffmpeg_alac.m4a", "mp4", INGESTED, "ffmpeg", ("cmd", f"{_F} -i {{src44}} -c:a alac {{out}}")),
    Case("ffmpeg_aac.m4a", "mp4", INGESTED, "ffmpeg", ("cmd", f"{_F} -i {{src44}} -c:a aac -b:a 160k {{out}}"),
         "moov atom at the end"),
    Case("ffmpeg_aac_faststart.m4a", "mp4", INGESTED, "ffmpeg",
         ("cmd", f"{_F} -i {{src48}} -c:a aac -b:a 128k -movflags +faststart {{out}}")),
    Case("ffmpeg_adts.aac", "aac", INGESTED, "ffmpeg", ("cmd", f"{_F} -i {{src44}} -c:a aac -b:a 128k -f adts {{out}}"),
         "raw ADTS: no length in any header"),
    # PCM
    Case("sox_16.wav", "wav", INGESTED, "ffmpeg", ("cmd", "sox {src44} -b 16 {out}")),
    Case("ffmpeg_24.wav", "wav", INGESTED, "ffmpeg", ("cmd", f"{_F} -i {{src48}} -c:a pcm_s24le {{out}}")),
    Case("sox.aiff", "aiff", INGESTED, "ffmpeg", ("cmd", "sox {src44} {out}")),
    # Damaged: the documented outcomes (README, "ingest_rejects")
    Case("cut40_lame_vbr.mp3", "mp3", TRUNCATED, None, ("cut", "lame_vbr_v2.mp3"),
         "Xing header promises the whole length", truncated_at=0.4),
    Case("cut40_lame_noxing.mp3", "mp3", INGESTED, None, ("cut", "lame_vbr_v4_noxing.mp3"),
         "no header promise: just a shorter file"),
    Case("cut40_oggenc.ogg", "vorbis", INGESTED, None, ("cut", "oggenc_q5.ogg"),
         "an Ogg stream's length is its last page's: just a shorter file"),
    Case("cut40_opusenc.opus", "opus", INGESTED, None, ("cut", "opusenc_96k.opus"), "likewise"),
    Case("cut40_flac.flac", "flac", TRUNCATED, None, ("cut", "flac_cli.flac"), "STREAMINFO promises the length",
         truncated_at=0.4),
    Case("cut40_sox.wav", "wav", TRUNCATED, None, ("cut", "sox_16.wav"), "the data chunk promises the length",
         truncated_at=0.4),
    Case("cut40_aac_faststart.m4a", "mp4", TRUNCATED, None, ("cut", "ffmpeg_aac_faststart.m4a"),
         "the index (moov) is whole", truncated_at=0.4),
    Case("cut40_aac.m4a", "mp4", "rejected:undecodable", None, ("cut", "ffmpeg_aac.m4a"),
         "the index (moov) was at the end: nothing says where the samples are"),
    Case("splice_lame_vbr.mp3", "mp3", TRUNCATED, None, ("splice", "lame_vbr_v2.mp3"),
         "40-60 % cut out: decoders resync, the audio ends before the Xing promise", truncated_at=0.8),
    Case("splice_oggenc.ogg", "vorbis", INGESTED, None, ("splice", "oggenc_q5.ogg"),
         "granule positions keep the timeline: the gap is not seen"),
    Case("splice_flac.flac", "flac", INGESTED, None, ("splice", "flac_cli.flac"),
         "libsndfile stops at the gap, PyAV resyncs; frame sample numbers keep the timeline"),
    Case("splice_sox.wav", "wav", TRUNCATED, None, ("splice", "sox_16.wav"), truncated_at=0.8),
)
BY_NAME = {c.name: c for c in CASES}


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def music(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A few seconds of the demo's synthetic music (drums, bass, chords, lead; stereo)."""
    from deepcuts.demo.synth import STYLES, render_track
    return render_track(STYLES[seed % len(STYLES)], seconds, rate, 2, np.random.default_rng(seed))


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")


def _ogg_crc(data: bytes) -> int:
    table = _ogg_crc.table
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) & 0xFF) ^ byte]
    return crc


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_ogg_crc.table = _crc_table()


def ogg_pages(data: bytes):
    """(offset, size, granule) of every Ogg page."""
    pos = 0
    while pos + 27 <= len(data):
        if data[pos:pos + 4] != b"OggS":
            raise ValueError(f"no Ogg page at byte {pos}")
        n_segments = data[pos + 26]
        size = 27 + n_segments + sum(data[pos + 27:pos + 27 + n_segments])
        yield pos, size, struct.unpack_from("<q", data, pos + 6)[0]
        pos += size


def shift_granules(data: bytes, shift: int) -> bytes:
    """Every audio page's granule position lowered by ``shift`` (header pages keep 0)."""
    out = bytearray(data)
    for pos, size, granule in ogg_pages(data):
        if granule > 0:
            struct.pack_into("<q", out, pos + 6, granule - shift)
            struct.pack_into("<I", out, pos + 22, 0)
            struct.pack_into("<I", out, pos + 22, _ogg_crc(bytes(out[pos:pos + size])))
    return bytes(out)


def _make_one(case: Case, folder: Path, subs: dict) -> None:
    out = folder / case.name
    kind = case.make[0]
    if kind == "cmd":
        _run([part.format(**subs, out=out) for part in case.make[1].split()])
    elif kind == "trim":
        _run([*_F.split(), "-ss", "2.5", "-i", str(folder / case.make[1]), "-t", "7", "-c", "copy", str(out)])
    elif kind == "nogap":
        half = folder / "_nogap"
        half.mkdir(exist_ok=True)
        sr = sf.info(subs["src44"]).samplerate
        y, _ = sf.read(subs["src44"], dtype="int16")
        sf.write(half / "part1.wav", y[: len(y) // 2], sr)
        sf.write(half / "part2.wav", y[len(y) // 2:], sr)
        _run([*_L.split(), "-V", "2", "--nogap", str(half / "part1.wav"), str(half / "part2.wav"), "--nogapout", str(half)])
        shutil.move(half / "part1.mp3", out)
    else:
        data = (folder / case.make[1]).read_bytes()
        if kind == "cut":
            data = data[: int(len(data) * 0.4)]
        elif kind == "splice":
            data = data[: int(len(data) * 0.4)] + data[int(len(data) * 0.6):]
        elif kind == "neg":
            first_audio = next(g for _, _, g in ogg_pages(data) if g > 0)
            data = shift_granules(data, first_audio + 7000)    # first audio page at -7000
        out.write_bytes(data)


def make(folder: Path, seconds: float = 10.0, names=None) -> dict[str, Path]:
    """Make every case (or ``names``) under ``folder``, reusing files already there."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"encoders missing: {', '.join(missing)}; {INSTALL_HINT}")
    folder.mkdir(parents=True, exist_ok=True)
    subs = {"src44": folder / "_src44.wav", "src48": folder / "_src48.wav", "cover": folder / "_cover.png",
            "dir": folder}
    if not subs["src44"].exists():
        sf.write(subs["src44"], music(seconds, 44100, 3), 44100, subtype="PCM_16")
    if not subs["src48"].exists():
        sf.write(subs["src48"], music(seconds, 48000, 5), 48000, subtype="PCM_16")
    if not subs["cover"].exists():
        _run([*_F.split(), "-f", "lavfi", "-i", "nullsrc=s=400x400,geq=random(1)*255:128:128",
              "-frames:v", "1", str(subs["cover"])])
    wanted = [c for c in CASES if names is None or c.name in names]
    # Derived files need their source first: two waves.
    first = [c for c in wanted if c.make[0] in ("cmd", "nogap")]
    needed = {c.make[1] for c in wanted if c.make[0] not in ("cmd", "nogap")}
    first += [BY_NAME[n] for n in needed if BY_NAME[n] not in first]
    second = [c for c in wanted if c.make[0] not in ("cmd", "nogap")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for wave in (first, second):
            todo = [c for c in wave if not (folder / c.name).exists()]
            list(pool.map(lambda c: _make_one(c, folder, subs), todo))
    return {c.name: folder / c.name for c in wanted}


def reference_decode(case: Case, path: Path, folder: Path) -> tuple[np.ndarray, int]:
    """The whole file decoded by another decoder: float32 (frames, channels), rate."""
    out = folder / f"_ref_{path.name}.wav"
    if not out.exists():
        if case.reference == "oggdec":
            _run(["oggdec", "-Q", "--float", "-o", str(out), str(path)])   # libvorbis, the reference decoder
        elif case.reference == "opusdec":
            _run(["opusdec", "--quiet", "--float", "--rate", "48000", str(path), str(out)])
        else:
            _run([*_F.split(), "-i", str(path), "-c:a", "pcm_f32le", str(out)])
    y, rate = sf.read(str(out), dtype="float32", always_2d=True)
    return y, rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    try:
        paths = make(Path(args.out_dir), args.seconds)
    except RuntimeError as exc:
        sys.exit(str(exc))
    for case in CASES:
        print(f"{paths[case.name]}  {case.outcome:22s} {case.note}")


if __name__ == "__main__":
    main()
