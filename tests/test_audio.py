"""Decoding and log-mel features on real files of every codec, and every rejection reason."""
import librosa
import numpy as np
import pytest

from audio_fixtures import write_audio, write_hostile_files
from deepcuts.audio import decode as audio
from deepcuts.audio import mel as melmod
from deepcuts.audio.decode import MelParams, RejectedAudio
from deepcuts.core.config import load_config

PARAMS = MelParams.from_conf(load_config().ingest)


def test_log_mel_matches_librosa_reference():
    rng = np.random.default_rng(0)
    t = np.arange(22050 * 4) / 22050
    y = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    ours = melmod.log_mel(y, 22050, 1024, 512, 128)
    ref = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=22050, n_fft=1024, hop_length=512,
                                                             n_mels=128), ref=1.0, amin=1e-10, top_db=None)
    assert ours.shape == ref.shape == (128, 1 + len(y) // 512)
    assert np.max(np.abs(ours - ref)) < 1e-3


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg", ".mp3", ".opus"])
@pytest.mark.parametrize("channels,rate", [(1, 22050), (2, 44100), (2, 48000)])
def test_every_codec_decodes_to_the_middle_excerpt(tmp_path, ext, channels, rate):
    path = write_audio(tmp_path / f"x{ext}", seconds=8.0, rate=rate, channels=channels, seed=1)
    p = MelParams(**{**PARAMS.__dict__, "excerpt_seconds": 5.0})
    feats = audio.featurise(path.read_bytes(), p, ext)
    assert feats.mel.shape == (128, 1 + int(5.0 * 22050) // 512)
    assert feats.excerpt_offset_s == pytest.approx(1.5, abs=0.02)
    assert feats.duration_s == pytest.approx(8.0, abs=0.05)
    assert np.isfinite(feats.mel).all() and feats.mel.max() > -20    # not silence


def test_resampled_decode_matches_librosa_load(tmp_path):
    path = write_audio(tmp_path / "x.flac", seconds=6.0, rate=44100, channels=2, seed=2)
    p = MelParams(**{**PARAMS.__dict__, "excerpt": "whole"})
    d = audio.decode(path.read_bytes(), p, ".flac")
    ref, _ = librosa.load(str(path), sr=22050, mono=True)
    assert (d.excerpt_offset_s, d.source_rate, d.channels, d.decoder) == (0.0, 44100, 2, "sndfile")
    assert len(d.signal) == len(ref)
    assert np.max(np.abs(d.signal - ref)) < 1e-4


def test_whole_excerpt_keeps_the_full_track_up_to_its_bound(tmp_path):
    path = write_audio(tmp_path / "x.wav", seconds=9.0, rate=22050, channels=1)
    p = MelParams(**{**PARAMS.__dict__, "excerpt": "whole", "excerpt_seconds": 5.0})
    feats = audio.featurise(path.read_bytes(), p, ".wav")
    assert feats.excerpt_offset_s == 0.0 and feats.mel.shape[1] == 1 + 9 * 22050 // 512
    # ingest.whole_max_seconds bounds what a row holds: a longer track keeps that much from its middle
    bounded = MelParams(**{**p.__dict__, "whole_max_seconds": 4.0})
    feats = audio.featurise(path.read_bytes(), bounded, ".wav")
    assert feats.excerpt_offset_s == pytest.approx(2.5, abs=1e-3) and feats.mel.shape[1] == 1 + 4 * 22050 // 512


def test_every_hostile_file_is_rejected_with_its_reason(tmp_path):
    expected = write_hostile_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(RejectedAudio) as err:
            audio.featurise((tmp_path / name).read_bytes(), PARAMS, audio.suffix_of(name))
        assert err.value.reason == reason, (name, err.value)
        assert err.value.detail


def test_truncated_tail_outside_the_excerpt_is_caught(tmp_path):
    """A damaged mp3 decodes 'fine' but short: the excerpt alone would not notice.  By default
    what decodes is ingested with a warning; ingest.reject_truncated rejects it."""
    data = write_audio(tmp_path / "long.mp3", seconds=40.0, seed=3).read_bytes()
    cut = data[: int(len(data) * 0.85)]          # the middle 30 s are still intact
    feats = audio.featurise(cut, PARAMS, ".mp3")
    assert feats.warning.startswith("truncated") and feats.truncated_at_s == pytest.approx(34.0, abs=1.0)
    assert feats.duration_s == feats.truncated_at_s
    assert feats.excerpt_offset_s == pytest.approx((feats.truncated_at_s - 30.0) / 2, abs=0.05)
    with pytest.raises(RejectedAudio) as err:
        audio.featurise(cut, MelParams(**{**PARAMS.__dict__, "reject_truncated": True}), ".mp3")
    assert err.value.reason == "truncated" and "34." in err.value.detail
    whole = audio.featurise(data, PARAMS, ".mp3")  # the intact file passes
    assert whole.warning is None and whole.truncated_at_s is None and whole.duration_s == pytest.approx(40.0)


def test_a_short_header_estimate_within_the_tolerance_is_not_truncation(tmp_path):
    """The issue's case: a header promising a little more than decodes (441.14 s vs 440.76 s)."""
    import struct
    data = bytearray(write_audio(tmp_path / "x.wav", seconds=12.0, rate=22050, channels=1).read_bytes())
    pos = data.index(b"data")
    size = struct.unpack_from("<I", data, pos + 4)[0]
    struct.pack_into("<I", data, pos + 4, size + 2 * int(0.8 * 22050))      # promises 0.8 s more
    p = MelParams(**{**PARAMS.__dict__, "excerpt_seconds": 5.0})
    feats = audio.featurise(bytes(data), p, ".wav")
    assert feats.warning is None and feats.duration_s == pytest.approx(12.8, abs=0.01)
    struct.pack_into("<I", data, pos + 4, size + 2 * int(1.5 * 22050))      # 1.5 s more: beyond max(1 s, 1 %)
    assert audio.featurise(bytes(data), p, ".wav").truncated_at_s == pytest.approx(12.0, abs=0.01)


def test_mel_bytes_round_trip_and_fingerprint():
    mel = np.linspace(-80, 20, 128 * 50, dtype=np.float32).reshape(128, 50)
    back = melmod.mel_from_bytes(melmod.mel_to_bytes(mel), 128, 50)
    assert np.array_equal(audio.mel_from_bytes(audio.mel_to_bytes(mel), 128, 50), back)   # re-exported
    assert np.max(np.abs(back - mel)) < 0.05
    assert audio.fingerprint(b"abc") == audio.fingerprint(b"abc") != audio.fingerprint(b"abd")


@pytest.mark.parametrize("sr,n_fft,n_mels", [(22050, 1024, 128), (16000, 512, 40), (44100, 2048, 96)])
def test_mel_filterbank_equals_librosa(sr, n_fft, n_mels):
    ours = melmod.mel_basis(sr, n_fft, n_mels)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)
    assert ours.shape == ref.shape and np.allclose(ours, ref, atol=1e-6)
