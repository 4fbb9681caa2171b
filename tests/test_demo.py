"""The demo catalogue: real decodable audio in mixed codecs, styles a classifier can hear,
play counts that follow the simulated tastes, determinism by seed, and the CLI."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from conftest import SMALL_DEMO, make_config
from deepcuts.core.config import PROJECT_ROOT
from deepcuts.demo.generate import demo_data_present, generate
from deepcuts.demo.synth import STYLE_NAMES

TINY = {"demo__n_tracks": 10, "demo__n_users": 40, "demo__n_styles": 4, "demo__min_seconds": 1.0,
        "demo__max_seconds": 2.0, "demo__mean_plays_per_user": 10.0, "demo__workers": 1}


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_same_seed_same_catalogue_other_seed_differs(tmp_path):
    a = make_config(tmp_path / "a", **TINY).demo
    b = make_config(tmp_path / "b", **TINY).demo
    c = make_config(tmp_path / "c", **{**TINY, "demo__seed": a.seed + 1}).demo
    for demo in (a, b, c):
        generate(demo)
    out_a, out_b, out_c = (Path(d.out_dir) for d in (a, b, c))
    manifest = (out_a / "catalogue" / "manifest.csv").read_bytes()
    assert manifest == (out_b / "catalogue" / "manifest.csv").read_bytes()
    assert pq.read_table(out_a / "plays.parquet").equals(pq.read_table(out_b / "plays.parquet"))
    assert pq.read_table(out_a / "users.parquet").equals(pq.read_table(out_b / "users.parquet"))
    wavs = [r["uri"] for r in read_manifest(out_a / "catalogue" / "manifest.csv") if r["uri"].endswith(".wav")]
    assert wavs
    for uri in wavs:
        assert (out_a / "catalogue" / uri).read_bytes() == (out_b / "catalogue" / uri).read_bytes()
    assert not pq.read_table(out_a / "plays.parquet").equals(pq.read_table(out_c / "plays.parquet"))
    wav_c = out_c / "catalogue" / wavs[0]
    assert not wav_c.exists() or wav_c.read_bytes() != (out_a / "catalogue" / wavs[0]).read_bytes()


def test_regenerating_smaller_removes_stale_audio_and_keeps_manifest_consistent(tmp_path):
    cfg = make_config(tmp_path, **TINY)
    generate(cfg.demo)
    assert demo_data_present(cfg)
    smaller = cfg.replace(**{"demo.n_tracks": 8})
    summary = generate(smaller.demo)
    assert summary["tracks"] == 8 and summary["stale_files_removed"] == 2
    catalogue = Path(cfg.demo.out_dir) / "catalogue"
    rows = read_manifest(catalogue / "manifest.csv")
    on_disk = {p.relative_to(catalogue).as_posix() for p in (catalogue / "audio").glob("*/*")}
    assert on_disk == {r["uri"] for r in rows}
    assert not list(catalogue.rglob(".*tmp*"))


def test_missing_plays_means_demo_absent(tmp_path):
    cfg = make_config(tmp_path, **TINY)
    assert not demo_data_present(cfg)
    generate(cfg.demo)
    (Path(cfg.demo.out_dir) / "plays.parquet").unlink()
    assert not demo_data_present(cfg)


def test_every_manifest_file_decodes_with_the_planned_format(demo_root):
    cfg = make_config(demo_root, **SMALL_DEMO).demo
    catalogue = demo_root / "demo" / "catalogue"
    rows = read_manifest(catalogue / "manifest.csv")
    assert len(rows) == cfg.n_tracks
    assert len({r["track_id"] for r in rows}) == cfg.n_tracks
    exts, rates, channels = set(), set(), set()
    for row in rows:
        assert not Path(row["uri"]).is_absolute() and row["uri"].startswith("audio/")
        path = catalogue / row["uri"]
        info = sf.info(path)
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        ext = path.suffix[1:]
        assert rate == info.samplerate == (48000 if ext == "opus" else rate)
        assert rate in cfg.sample_rates or ext == "opus"
        assert cfg.min_seconds - 0.05 <= len(audio) / rate <= cfg.max_seconds + 0.05
        assert len(audio) == info.frames                     # not truncated
        assert 10 ** (-45 / 20) < np.sqrt(np.mean(audio ** 2))          # far above ingest's silence
        # Lossless files keep the mastered peak; lossy decoders may overshoot it a little.
        assert np.abs(audio).max() <= (0.95 if ext in ("wav", "flac") else 1.5)
        exts.add(ext)
        rates.add(rate)
        channels.add(info.channels)
    assert exts == {"wav", "flac", "ogg", "mp3", "opus"}
    assert len(rates) >= 2 and channels == {1, 2}


def test_labels_cover_the_configured_styles(demo_root):
    out = demo_root / "demo"
    rows = read_manifest(out / "catalogue" / "manifest.csv")
    with open(out / "labels.csv", newline="") as fh:
        labels = {r["track_id"]: r["style"] for r in csv.DictReader(fh)}
    assert labels == {r["track_id"]: r["labels"] for r in rows}
    counts = np.unique(list(labels.values()), return_counts=True)
    assert set(counts[0]) == set(STYLE_NAMES[:SMALL_DEMO["demo.n_styles"]])
    assert counts[1].min() >= len(rows) // 4 - 1            # balanced


def test_plays_are_valid_and_follow_tastes(demo_root):
    out = demo_root / "demo"
    plays = pq.read_table(out / "plays.parquet").to_pandas()
    users = pq.read_table(out / "users.parquet").to_pandas()
    styles = dict(csv.reader(open(out / "labels.csv")))
    assert str(plays["plays"].dtype) == "int64" and (plays["plays"] > 0).all()
    assert not plays.duplicated(["user_id", "track_id"]).any()
    assert set(plays["track_id"]) == set(styles) - {"track_id"}   # every track has listeners
    assert set(plays["user_id"]) <= set(users["user_id"])
    assert plays["user_id"].str.fullmatch(r"u\d{6}").all() and plays["track_id"].str.fullmatch(r"t\d{6}").all()
    assert abs(plays["plays"].sum() / len(users) - SMALL_DEMO["demo.mean_plays_per_user"]) < 8
    # Heavy-tailed activity: the busiest tenth of users plays far more than the median user.
    per_user = plays.groupby("user_id")["plays"].sum()
    assert per_user.quantile(0.9) > 3 * per_user.median()
    # Most of a typical user's plays are of their favourite style.
    plays["style"] = plays["track_id"].map(styles)
    plays = plays.merge(users[["user_id", "top_style"]], on="user_id")
    share = (plays["plays"] * (plays["style"] == plays["top_style"])).groupby(plays["user_id"]).sum() \
        / plays.groupby("user_id")["plays"].sum()
    assert share.median() > 0.5
    # Repeat listens: plays per (user, track) rise with the user's taste for the track's style.
    plays["taste"] = [row_taste[STYLE_NAMES.index(s)] for row_taste, s in
                      zip(plays["user_id"].map(users.set_index("user_id")["taste"]), plays["style"])]
    loved, other = plays[plays["taste"] > 0.5]["plays"].mean(), plays[plays["taste"] < 0.1]["plays"].mean()
    assert loved > 1.5 * other


def test_styles_are_audible_to_a_nearest_centroid_classifier(demo_root):
    import librosa
    rows = read_manifest(demo_root / "demo" / "catalogue" / "manifest.csv")
    features, labels = [], []
    for row in rows:
        y, sr = librosa.load(demo_root / "demo" / "catalogue" / row["uri"], sr=22050, mono=True)
        mel = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr, n_mels=64) + 1e-10)
        features.append(np.concatenate([mel.mean(axis=1), mel.std(axis=1)]))
        labels.append(row["labels"])
    x, labels = np.array(features), np.array(labels)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    train, test = np.arange(len(x)) % 2 == 0, np.arange(len(x)) % 2 == 1
    names = sorted(set(labels))
    centroids = np.stack([x[train & (labels == n)].mean(axis=0) for n in names])
    predicted = np.array(names)[np.argmin(((x[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    accuracy = (predicted == labels[test]).mean()
    assert accuracy > 0.75, accuracy                 # chance is 0.25
    # ... but tracks of a style are not copies of each other.
    assert np.linalg.norm(x[labels == names[0]][0] - x[labels == names[0]][1]) > 1.0


def test_cli_demo_catalogue(tmp_path):
    out = tmp_path / "cli-demo"
    result = subprocess.run(
        [sys.executable, "-m", "deepcuts", "demo-catalogue", "--set", f"demo.out_dir={out}",
         "--set", "demo.n_tracks=8", "--set", "demo.n_users=20", "--set", "demo.n_styles=2",
         "--set", "demo.min_seconds=1.0", "--set", "demo.max_seconds=1.5", "--set", "demo.workers=2"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "deepcuts demo-catalogue: done" in result.stdout and "tracks" in result.stdout
    rows = read_manifest(out / "catalogue" / "manifest.csv")
    assert len(rows) == 8 and all((out / "catalogue" / r["uri"]).is_file() for r in rows)
    assert pq.read_table(out / "plays.parquet").num_rows > 0

    bad = subprocess.run([sys.executable, "-m", "deepcuts", "demo-catalogue", "--set", "demo.n_styles=9"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "demo.n_styles" in bad.stderr


@pytest.mark.parametrize("key,value", [("demo.codecs", ["aac"]), ("demo.sample_rates", [16000])])
def test_config_rejects_unsupported_codecs_and_rates(tmp_path, key, value):
    from deepcuts.core.config import ConfigError
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        make_config(tmp_path, **{key.replace(".", "__"): value})
