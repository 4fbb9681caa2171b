"""The neighbours stage at the end of the real chain on the small demo catalogue (the shared
nightly chain of conftest): neighbours share the query's style far above chance, and query by
audio finds a catalogue track from its own file and from a copy re-encoded in another codec."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from deepcuts.core.lake import lake, read_pandas

pytestmark = [pytest.mark.slow, pytest.mark.spark]


@pytest.fixture(scope="module")
def chain(demo_chain, demo_root):
    manifest = pd.read_csv(demo_root / "demo" / "catalogue" / "manifest.csv")
    return {"cfg": demo_chain.cfg, "summary": demo_chain.summaries["neighbours"], "lk": lake(demo_chain.cfg),
            "manifest": manifest, "catalogue": demo_root / "demo" / "catalogue"}


def label_agreement(neighbours: pd.DataFrame, labels: dict) -> float:
    same = neighbours["track_id"].map(labels) == neighbours["neighbour_id"].map(labels)
    return float(same.mean())


def test_neighbours_mostly_share_the_query_style(chain):
    labels = dict(zip(chain["manifest"]["track_id"].astype(str), chain["manifest"]["labels"]))
    n_styles = len(set(labels.values()))
    chance = 1 / n_styles
    agreement = {}
    for name in ("similar_tracks", "sounds_like"):
        table = read_pandas(chain["lk"], name)
        assert len(table) > 0
        agreement[name] = label_agreement(table, labels)
    print("label agreement", agreement, "chance", chance)
    assert agreement["similar_tracks"] > max(0.6, 2.2 * chance), agreement
    assert agreement["sounds_like"] > max(0.6, 2.2 * chance), agreement


def test_recommendations_on_the_demo_surface_cold_tracks(chain):
    recs = read_pandas(chain["lk"], "user_recommendations")
    serving = read_pandas(chain["lk"], "serving_factors")
    audio = set(serving.loc[serving["source"].isin(["audio", "metadata"]), "track_id"])   # no usage
    assert audio, "the demo's cold-start protocol leaves tracks to the audio model"
    cold = recs[recs["list"] == "cold"]
    assert set(cold["track_id"]) <= audio and len(cold) > 0
    share = chain["summary"]["audio_share_in_all_recommendations"]
    assert share is not None and 0.0 <= share <= 1.0
    print("audio share in all-tracks lists", share)


def _similar(chain, *paths, k=5):
    from deepcuts.knn.query import similar_main
    import contextlib
    import io
    args = [str(p) for p in paths] + ["--k", str(k), "--json"]
    for key in ("warehouse.root", "ingest.excerpt_seconds"):
        value = getattr(getattr(chain["cfg"], key.split(".")[0]), key.split(".")[1])
        args += ["--set", f"{key}={value}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = similar_main(args)
    assert code == 0, out.getvalue()
    return json.loads(out.getvalue())


def test_query_by_audio_finds_the_track_from_its_file_and_a_reencoded_copy(chain, tmp_path):
    manifest = chain["manifest"]
    mels = read_pandas(chain["lk"], "mels", columns=["track_id"])
    rows = manifest[manifest["track_id"].astype(str).isin(set(mels["track_id"]))].head(6)
    originals = [chain["catalogue"] / uri for uri in rows["uri"]]
    copies = []
    for path in originals:
        audio, rate = sf.read(str(path), dtype="float32")
        codec = ("ogg", "VORBIS") if not str(path).endswith(".ogg") else ("flac", "PCM_16")
        copy = tmp_path / f"{path.stem}-copy.{codec[0]}"
        sf.write(str(copy), audio, rate, format=codec[0].upper(), subtype=codec[1])
        copies.append(copy)
    found = _similar(chain, *originals, *copies)
    ids = [str(t) for t in rows["track_id"]]
    for result, track in zip(found[:len(ids)], ids):
        assert result["neighbours"][0]["track_id"] == track, result
        assert result["neighbours"][0]["score"] > 0.999
    for result, track in zip(found[len(ids):], ids):
        top3 = [n["track_id"] for n in result["neighbours"][:3]]
        assert track in top3, (result["file"], top3)


def test_query_by_audio_reports_a_bad_file_and_goes_on(chain, tmp_path):
    from deepcuts.knn.query import similar_main
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"not audio at all")
    args = [str(bad), "--json", "--set", f"warehouse.root={chain['cfg'].warehouse.root}"]
    assert similar_main(args) == 1
