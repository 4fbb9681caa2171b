"""Files made by real encoders (Debian's lame, oggenc, opusenc, flac, sox, ffmpeg; see
tests/encoder_fixtures.py): every valid one ingests, none is truncated, its length is right and
its mel matches an independent reference decode of the same excerpt; damaged ones (cut at 40 %,
spliced) get their documented outcome.

Mel tolerance, over the bins within 60 dB of the excerpt's peak (below that is codec noise
floor): the decoders here are deterministic and agree to float rounding, so a correct excerpt
differs by less than 0.02 dB in the median and 1 dB anywhere (measured: 0.000 and 0.26 dB, the
worst being libopus against FFmpeg's Opus decoder), while an excerpt misplaced by a few hundred
samples gives a median over 1 dB (an Ogg seek landing 2,049 frames early gave 2.4 dB).  AAC
is the exception: perceptual noise substitution fills some bands with noise from a generator
whose state a seek resets, so those bins differ by a few dB though their energy is the same
(measured median 0.000, 99th percentile 1.95 dB, max 6.7 dB); its median must still be under
0.05 dB and its 99th percentile under 3 dB.
"""
from __future__ import annotations

import numpy as np
import pytest
import soxr

import encoder_fixtures as EF
from deepcuts.audio import decode as audio
from deepcuts.audio.decode import MelParams, RejectedAudio
from deepcuts.audio.mel import log_mel
from deepcuts.core.config import load_config

# 10 s files, a 4 s excerpt: the excerpt is sought (3-7 s) and the truncation probe runs (~9 s).
PARAMS = MelParams(**{**MelParams.from_conf(load_config().ingest).__dict__, "excerpt_seconds": 4.0})
VALID = [c for c in EF.CASES if c.outcome == EF.INGESTED and c.reference]
DAMAGED = [c for c in EF.CASES if c.reference is None]
NOISY_CODECS = {"mp4": "aac", "aac": "aac"}     # AAC (ALAC is in mp4 too, and exact: judged by decoder below)


@pytest.fixture(scope="session")
def encoder_files(tmp_path_factory):
    missing = EF.missing_tools()
    if missing:
        pytest.skip(f"encoder(s) not installed: {', '.join(missing)}; {EF.INSTALL_HINT}")
    folder = tmp_path_factory.mktemp("encoders")
    EF.make(folder)
    return folder


def _mel_diff(case, path, folder, feats) -> np.ndarray:
    """|our mel - the reference's| in dB, on the same excerpt of the reference decode."""
    ref, rate = EF.reference_decode(case, path, folder)
    assert rate == feats.source_rate, f"reference decodes at {rate} Hz, we at {feats.source_rate} Hz"
    start = int(round(feats.excerpt_offset_s * rate))
    length = min(int(round(PARAMS.excerpt_seconds * rate)), len(ref) - start)
    segment = np.ascontiguousarray(ref[start:start + length].mean(axis=1), dtype=np.float32)
    if rate != PARAMS.sample_rate:
        segment = soxr.resample(segment, rate, PARAMS.sample_rate, quality="HQ").astype(np.float32)
    theirs = log_mel(segment, PARAMS.sample_rate, PARAMS.n_fft, PARAMS.hop_length, PARAMS.n_mels)
    n = min(theirs.shape[1], feats.mel.shape[1])
    assert n >= feats.mel.shape[1] - 2, (theirs.shape, feats.mel.shape)
    ours, theirs = feats.mel[:, 2:n - 2], theirs[:, 2:n - 2]           # edges: resampler start-up
    return np.abs(ours - theirs)[theirs > theirs.max() - 60.0]


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_valid_file_ingests_whole_and_matches_a_reference_decode(encoder_files, case):
    path = encoder_files / case.name
    data = path.read_bytes()
    d = audio.decode(data, PARAMS, audio.suffix_of(case.name))
    assert d.codec == case.codec
    assert d.warning is None and d.truncated_at_s is None, d.warning
    feats = audio.featurise(data, PARAMS, audio.suffix_of(case.name))
    ref, rate = EF.reference_decode(case, path, encoder_files)
    # The whole length, not an estimate (a VBR mp3 without Xing header: 10.03 s, not 7 or 9).
    assert feats.duration_s == pytest.approx(len(ref) / rate, abs=0.05)
    assert feats.excerpt_offset_s == pytest.approx((feats.duration_s - PARAMS.excerpt_seconds) / 2, abs=0.01)
    assert feats.mel.shape == (128, 1 + int(PARAMS.excerpt_seconds * 22050) // 512)
    diff = _mel_diff(case, path, encoder_files, feats)
    median, p99, worst = np.median(diff), np.percentile(diff, 99), diff.max()
    if case.codec in NOISY_CODECS and d.decoder == "av" and "alac" not in case.name:
        assert median < 0.05 and p99 < 3.0, (median, p99, worst)
    else:
        assert median < 0.02 and worst < 1.0, (median, p99, worst)


@pytest.mark.parametrize("case", [c for c in VALID if c.codec in ("vorbis", "mp3", "flac", "opus", "wav")],
                         ids=lambda c: c.name)
def test_every_seek_lands_on_the_sample(encoder_files, case):
    """Excerpts read at awkward places (first pages, last page, mid-file) equal the same samples
    of one decode from the start (to 1e-4: Opus decodes a seek's pre-roll to within 1e-6 of a
    continuous decode; a misplaced excerpt differs by 0.1-1): libsndfile's Ogg seek lands 2,049
    frames early in some pages."""
    data = (encoder_files / case.name).read_bytes()
    d = audio.decode(data, MelParams(**{**PARAMS.__dict__, "excerpt": "whole"}), audio.suffix_of(case.name))
    codec = d.codec
    src = audio._open_source(d.decoder, data, codec, strict=False)
    try:
        whole = src.read(0, src.frames + src.rate)
        n = 2048
        for start in (700, src.rate // 2, int(1.4 * src.rate), len(whole) // 2, len(whole) - src.rate,
                      len(whole) - n - 300):
            got = src.read(start, n)
            assert len(got) == n, (start, len(got))
            assert np.max(np.abs(got - whole[start:start + n])) < 1e-4, f"seek to {start} of {len(whole)}"
    finally:
        src.close()


@pytest.mark.parametrize("case", DAMAGED, ids=lambda c: c.name)
def test_damaged_file_gets_its_documented_outcome(encoder_files, case):
    data = (encoder_files / case.name).read_bytes()
    suffix = audio.suffix_of(case.name)
    if case.outcome.startswith("rejected:"):
        with pytest.raises(RejectedAudio) as err:
            audio.featurise(data, PARAMS, suffix)
        assert err.value.reason == case.outcome.split(":", 1)[1], err.value
        return
    feats = audio.featurise(data, PARAMS, suffix)
    assert np.isfinite(feats.mel).all() and feats.mel.max() > -20
    if case.outcome == EF.INGESTED:
        assert feats.warning is None and feats.truncated_at_s is None, feats.warning
        return
    assert feats.warning.startswith("truncated: decodable audio ends at"), feats.warning
    assert feats.truncated_at_s == pytest.approx(case.truncated_at * 10.0, abs=0.5)
    assert feats.duration_s == feats.truncated_at_s
    excerpt_s = (feats.mel.shape[1] - 1) * PARAMS.hop_length / PARAMS.sample_rate
    assert feats.excerpt_offset_s + excerpt_s <= feats.truncated_at_s + 0.01          # from what decodes
    with pytest.raises(RejectedAudio) as err:
        audio.featurise(data, MelParams(**{**PARAMS.__dict__, "reject_truncated": True}), suffix)
    assert err.value.reason == "truncated"


def test_a_truncated_file_too_short_to_use_is_rejected_as_truncated(encoder_files):
    data = (encoder_files / "cut40_lame_vbr.mp3").read_bytes()
    with pytest.raises(RejectedAudio) as err:
        audio.featurise(data, MelParams(**{**PARAMS.__dict__, "min_seconds": 5.0}), ".mp3")
    assert err.value.reason == "truncated" and "shorter than 5.0 s" in err.value.detail


def test_content_decides_the_decoder_not_the_name(encoder_files, tmp_path):
    """An Opus stream named .ogg, AAC named .mp3: sniffed, routed, decoded."""
    for src, fake, codec in (("opusenc_96k.opus", "x.ogg", "opus"), ("ffmpeg_aac.m4a", "x.mp3", "mp4")):
        d = audio.decode((encoder_files / src).read_bytes(), PARAMS, fake)
        assert d.codec == codec and d.decoder == "av" and d.duration_s == pytest.approx(10.0, abs=0.05)


def test_featurise_row_records_truncation_and_confines_reads(encoder_files, tmp_path):
    """The executor's row function (pure: no Spark): a truncated file becomes a mel row with its
    warning; files out of the root, FIFOs and oversized files become reject rows without a read."""
    import os
    import threading
    from deepcuts.audio.catalogue import effective_roots
    from deepcuts.stages.ingest import DECODED_SCHEMA, featurise_row
    root = tmp_path / "cat"
    root.mkdir()
    os.symlink(encoder_files / "cut40_lame_vbr.mp3", root / "outside.mp3")
    (root / "cut.mp3").write_bytes((encoder_files / "cut40_lame_vbr.mp3").read_bytes())
    (root / "big.flac").write_bytes((encoder_files / "flac_cli.flac").read_bytes())
    os.mkfifo(root / "fifo.mp3")
    os.symlink("/dev/zero", root / "zero.wav")
    p = MelParams(**{**PARAMS.__dict__, "allowed_roots": effective_roots(str(root)), "max_file_bytes": 1 << 20})
    rows = {}

    def work():
        for name in ("cut.mp3", "outside.mp3", "big.flac", "fifo.mp3", "zero.wav"):
            rows[name] = featurise_row(name, str(root / name), None, None, None, p, "r1")
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), f"featurise_row blocked (done: {sorted(rows)})"
    assert set(rows["cut.mp3"]) == set(DECODED_SCHEMA.names)
    assert rows["cut.mp3"]["reason"] is None and rows["cut.mp3"]["warnings"].startswith("truncated")
    assert rows["cut.mp3"]["truncated_at_s"] == pytest.approx(4.0, abs=0.5)
    assert {n: r["reason"] for n, r in rows.items() if n != "cut.mp3"} == {
        "outside.mp3": "outside_root", "big.flac": "too_large", "fifo.mp3": "not_a_file", "zero.wav": "outside_root"}
    listed_big = featurise_row("big.flac", str(root / "big.flac"), None, 10 << 20, "v", p, "r1")
    assert listed_big["reason"] == "too_large" and listed_big["source_size"] == 10 << 20


@pytest.mark.spark
@pytest.mark.slow
def test_ingest_stage_over_the_real_encoder_folder(spark, encoder_files, tmp_path):
    """The stage end to end on every real-encoder case plus hostile entries: valid files land in
    mels untruncated, damaged ones as documented (truncated ones with warnings), the rest in
    ingest_rejects with their reason (incremental re-runs: tests/test_ingest.py)."""
    import os
    import shutil
    from conftest import make_config, run_stage
    from deepcuts.core.lake import lake, read_pandas
    cat = tmp_path / "cat"
    cat.mkdir()
    for case in EF.CASES:
        shutil.copy(encoder_files / case.name, cat / case.name)
    os.symlink(encoder_files / "lame_vbr_v2.mp3", cat / "outside_link.mp3")
    os.symlink("/dev/zero", cat / "zero.wav")
    os.mkfifo(cat / "fifo.mp3")
    cfg = make_config(tmp_path, ingest__source=str(cat), ingest__excerpt_seconds=4.0, ingest__partitions=2,
                      ingest__rows_per_row_group=8)
    summary = run_stage(spark, cfg, "ingest")
    mels = read_pandas(lake(cfg), "mels").set_index("track_id")
    rejects = read_pandas(lake(cfg), "ingest_rejects").set_index("track_id")["reason"].to_dict()
    for case in EF.CASES:
        if case.outcome.startswith("rejected:"):
            assert rejects.get(case.name) == case.outcome.split(":", 1)[1], case.name
            continue
        assert case.name in mels.index, (case.name, rejects.get(case.name))
        row = mels.loc[case.name]
        if case.outcome == EF.TRUNCATED:
            assert row["warnings"].startswith("truncated") and row["truncated_at_s"] > 3.0, case.name
        else:
            assert row["warnings"] is None and np.isnan(row["truncated_at_s"]), (case.name, row["warnings"])
    assert {k: rejects[k] for k in ("outside_link.mp3", "zero.wav", "fifo.mp3")} == {
        "outside_link.mp3": "outside_root", "zero.wav": "outside_root", "fifo.mp3": "not_a_file"}
    assert summary["ingested"] == len(mels)


@pytest.mark.parametrize("name", ["lame_vbr_id3_cover.mp3", "oggenc_q5.ogg", "flac_cli.flac", "ffmpeg_24.wav"])
def test_libsndfile_reading_the_open_file_decodes_the_same(encoder_files, name):
    """The job hands libsndfile the open descriptor of a local file (no Python read callbacks)."""
    import os
    path = encoder_files / name
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        via_fd = audio.decode(data, PARAMS, path.suffix, fd=fd)
        os.lseek(fd, 123, os.SEEK_SET)                       # wherever the caller left it
        again = audio.decode(data, PARAMS, path.suffix, fd=fd)
    finally:
        os.close(fd)
    in_memory = audio.decode(data, PARAMS, path.suffix)
    assert via_fd.decoder == in_memory.decoder == "sndfile"
    assert np.array_equal(via_fd.signal, in_memory.signal) and np.array_equal(again.signal, in_memory.signal)
    assert via_fd.duration_s == in_memory.duration_s
