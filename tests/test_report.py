"""The run report (issue 14): the pure builders on small inputs, publication and retention on a
real folder, excerpts decoded from real files, and the report of the real demo chain opened
in a real headless browser (Debian's chromium, driven by Playwright) as a person would."""
from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from deepcuts.report import charts, html, publish
from deepcuts.report import model as M

CHROMIUM = "/usr/bin/chromium"


# --- pure builders ----------------------------------------------------------------------------
def _ev(run_id, split, predictor, m, a):
    return {"run_id": run_id, "split": split, "predictor": predictor, "map_at_k": m, "auc": a, "k": 500,
            "n_users": 10, "n_candidates": 20}


def test_evaluation_rows_put_the_previous_run_beside_the_latest():
    rows = [_ev("evaluate-20261201T010000-a", "cold", "cnn", 0.20, 0.70),
            _ev("evaluate-20261201T010000-a", "cold", "random", 0.10, 0.50),
            _ev("evaluate-20261202T010000-b", "cold", "cnn", 0.25, 0.75),
            _ev("evaluate-20261202T010000-b", "cold", "baseline", 0.22, 0.72),
            _ev("evaluate-20261202T010000-b", "cold", "random", 0.11, 0.51),
            _ev("factors-20261202T000000-c", "warm", "als", 0.3, 0.8)]
    out = M.evaluation_rows(rows)
    assert [(e.split, e.predictor) for e in out] == [("cold", "random"), ("cold", "baseline"), ("cold", "cnn"),
                                                     ("warm", "als")]
    cnn = out[2]
    assert (cnn.map_at_k, cnn.prev_map_at_k, cnn.auc, cnn.prev_auc) == (0.25, 0.20, 0.75, 0.70)
    assert cnn.prev_run_id == "evaluate-20261201T010000-a"
    assert out[1].prev_map_at_k is None            # the baseline did not run the night before
    assert out[3].prev_run_id is None and out[3].run_id.startswith("factors-")


def _train_row(summary, status="succeeded", error=None):
    return {"status": status, "summary_json": json.dumps(summary), "error": error}


def test_promotion_decision_reads_the_gate_and_tolerates_its_absence():
    gate = {"decision": "promoted", "reason": "better", "new_validation_loss": 0.1,
            "current_model": "m0", "current_validation_loss": 0.2}
    p = M.promotion_decision(_train_row({"model_id": "m1", "promotion": gate}), True, "m1")
    assert p.status == M.PROMOTED and "better" in p.detail and "0.2" in p.detail
    kept = {**gate, "decision": "kept, not served", "reason": "worse by 9 %"}
    p = M.promotion_decision(_train_row({"model_id": "m1", "promotion": kept}), True, "m0")
    assert p.status == M.KEPT and p.model_id == "m1" and p.served_model_id == "m0" and "worse" in p.detail
    assert M.promotion_decision(_train_row({"model_id": "m1", "promoted": False}), True, "m1").status == M.KEPT
    # No gate in the summary: promoted exactly when models/LATEST names the model.
    assert M.promotion_decision(_train_row({"model_id": "m1"}), True, "m1").status == M.PROMOTED
    assert M.promotion_decision(_train_row({"model_id": "m1"}), True, "m0").status == M.KEPT
    skipped = M.promotion_decision(_train_row({"skipped": "not due", "model_id": "m0"}), True, "m0")
    assert skipped.status == M.NOT_TRAINED and "not due" in skipped.detail
    assert M.promotion_decision(None, False, "m0").status == M.NOT_TRAINED
    assert M.promotion_decision(_train_row({}, "failed", "boom"), True, "m0").status == M.FAILED


def test_charts_are_well_formed_svg_with_one_mark_per_point():
    svg = charts.line_chart([("train loss", [1, 2, 3], [0.5, 0.4, None]), ("validation loss", [1, 2, 3],
                                                                           [0.6, 0.5, 0.45])],
                            title="curves <&>", x_label="epoch", y_label="loss", marker_x=2, marker_label="best")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 2 and len(root.findall(f"{ns}circle")) == 5
    empty = ET.fromstring(charts.line_chart([], title="t", x_label="x", y_label="y"))
    assert "no data" in "".join(empty.itertext())
    xy = [(0.0, 0.0), (1.0, 1.0), (2.0, -1.0)]
    svg = charts.scatter_map(xy, ["a", "b", ""], [True, False, True], ["t1", "<script>x</script>", "t3"],
                             title="map")
    root = ET.fromstring(svg)
    dots = [c for c in root.iter(f"{ns}circle") if c.find(f"{ns}title") is not None]
    assert len(dots) == 3 and dots[1].get("fill") == "white"          # hollow: audio-served
    assert "<script>" not in svg and dots[1].find(f"{ns}title").text == "<script>x</script>"
    assert {"a", "b", "no label"} <= set(root.itertext())


def test_map_colours_by_label_else_by_source_and_embeds_clusters_apart():
    assert M.map_groups(["rock|pop", None], ["usage", "audio"], "|") == (["rock", ""], "label")
    assert M.map_groups([None, ""], ["usage", "audio"], "|") == (["usage", "audio"], "source")
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 5
    x = np.vstack([c + rng.normal(0, 0.3, (40, 8)) for c in centres])
    xy, method = M.embed_2d(x, seed=0, perplexity=30)
    assert xy.shape == (120, 2) and method.startswith("t-SNE")
    groups = [xy[i * 40:(i + 1) * 40] for i in range(3)]
    within = np.mean([np.linalg.norm(g - g.mean(0), axis=1).mean() for g in groups])
    between = min(np.linalg.norm(groups[i].mean(0) - groups[j].mean(0)) for i in range(3) for j in range(i))
    assert between > 3 * within, (between, within)
    small, method = M.embed_2d(x[:3], seed=0, perplexity=30)
    assert small.shape == (3, 2) and method == "pca"
    assert M.embed_2d(np.zeros((0, 8)), 0, 30)[0].shape == (0, 2)


def _report(**kw) -> M.ReportData:
    data = M.ReportData("pipeline-20261202T000000-x", "now", "pipeline-20261202T000000-x", "0.1", "/wh")
    for k, v in kw.items():
        setattr(data, k, v)
    return data


def test_render_escapes_warehouse_text_and_says_when_audio_is_missing():
    hostile = "<script>alert(1)</script>"
    cards = [M.TrackCard(hostile, "rock", "usage", None, "audio/a.ogg", "audio/ogg; codecs=vorbis"),
             M.TrackCard("t2", None, "audio", 0.9, None, None, "source_missing: the audio file is gone")]
    page = html.render(_report(playlists=[M.Playlist(cards[0], cards[1:])],
                               rejects={"ingest_rejects": {hostile: 3}},
                               promotion=M.Promotion(M.KEPT, "worse", "m1", "m0")))
    assert "<script>" not in page and page.count("&lt;script&gt;") >= 2
    assert page.count("<audio") == 1 and "no audio: source_missing" in page
    assert "kept, not served" in page
    empty = html.render(_report())
    assert "evaluate stage has not run" in empty and "neighbours stage has not run" in empty


def test_the_gates_the_cli_counted_are_in_the_report():
    # the same rules as the CLI's exit 4: a stage that raised a gate, and (nightly only) the
    # summary gates: the reject rate over nightly.max_reject_rate, a model kept, not promoted
    rows = [{"stage": "ingest", "status": "succeeded",
             "summary_json": json.dumps({"ingested": 90, "rejected": {"undecodable": 10}})},
            {"stage": "train", "status": "succeeded",
             "summary_json": json.dumps({"gate_failed": "model m2 not promoted (worse than m1)"})},
            {"stage": "neighbours", "status": "failed", "summary_json": None,
             "error": "quality gate failed: RecallTooLow: recall@10 0.80 under neighbours.min_recall 0.95"},
            {"stage": "infer", "status": "failed", "summary_json": None, "error": "stage failed: ValueError: a bug"}]
    gates = M.run_gates(rows, 0.05, nightly=True)
    assert len(gates) == 3
    assert gates[0].startswith("ingest: rejected 10 of 100 input items (10.0 %)")
    assert gates[1] == "train: model m2 not promoted (worse than m1)"
    assert gates[2] == "neighbours: RecallTooLow: recall@10 0.80 under neighbours.min_recall 0.95"
    assert M.run_gates(rows, 0.2, nightly=True) == gates[1:]
    assert M.run_gates(rows, 0.05, nightly=False) == gates[2:]      # a hand-run pipeline: no summary gates
    page = html.render(_report(gates_failed=gates))
    assert "rejected 10 of 100" in page and "exits 4" in page
    assert "all passed" in html.render(_report())


def test_excerpts_decode_real_files_and_say_why_one_is_gone(tmp_path):
    from conftest import make_config
    from deepcuts.stages.report import Excerpts
    rate = 44100
    t = np.arange(int(rate * 14)) / rate
    src = tmp_path / "audio" / "tone.flac"
    src.parent.mkdir()
    sf.write(src, np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * 2, axis=1), rate, format="FLAC")
    cfg = make_config(tmp_path).replace(**{"ingest.source": str(tmp_path / "audio"), "report.excerpt_seconds": 5.0})
    ex = Excerpts(cfg)
    href, note = ex.get("t1", str(src))
    assert note is None and href.startswith("audio/") and href.endswith(".ogg")
    y, r = sf.read(io_bytes(ex.files[href]))
    assert r == cfg.ingest.sample_rate and abs(len(y) / r - 5.0) < 0.05
    assert 0.8 < np.max(np.abs(y)) < 0.95                         # normalised to about -1 dBFS
    gone, why = ex.get("t2", str(tmp_path / "audio" / "gone.wav"))
    assert gone is None and why.startswith("source_missing")
    outside, why = ex.get("t3", "/etc/hostname")
    assert outside is None and why.startswith("outside_root")
    assert ex.missing == {"source_missing": 1, "outside_root": 1}
    assert ex.get("t4", None) == (None, "not_in_catalogue: the track has no row in mels")


def io_bytes(data: bytes):
    import io
    return io.BytesIO(data)


def test_publish_is_whole_or_nothing_and_retention_keeps_latest(tmp_path):
    root = str(tmp_path / "wh")
    ids = [f"pipeline-2026120{d}T010000-x" for d in (1, 2, 3)]
    for rid in ids:
        path = publish.publish(root, rid, {"index.html": rid.encode(), "audio/a.ogg": b"x"})
        assert Path(path).read_bytes() == rid.encode()
    assert publish.latest_report(root) == ids[-1]
    assert publish.list_reports(root) == ids
    assert not [n for n in os.listdir(tmp_path / "wh" / "reports") if n.startswith(".")]
    (tmp_path / "wh" / "reports" / ".staging-crashed").mkdir()
    # An older report run alone sorts by its stamp, not its prefix.
    publish.publish(root, "report-20261130T010000-y", {"index.html": b"old"})
    (tmp_path / "wh" / "reports" / "LATEST").write_text(ids[-1])
    assert publish.retain(root, keep=2) == ["report-20261130T010000-y", ids[0]]
    assert publish.list_reports(root) == ids[1:]
    assert not (tmp_path / "wh" / "reports" / ".staging-crashed").exists()
    with pytest.raises(ValueError):
        publish.publish(root, "../escape", {"index.html": b""})


# --- the demo chain's report in a real browser ------------------------------------------------------
def open_in_browser(index: Path, screenshot: Path) -> dict:
    """Open the report from disk in headless chromium as a person would; what the page did."""
    from playwright.sync_api import sync_playwright
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            page.goto(index.as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.src, e.complete, e.naturalWidth])")
            svgs = page.eval_on_selector_all(
                "svg.chart", "els => els.map(e => [e.getBoundingClientRect().width, e.querySelectorAll('circle').length])")
            audio = page.evaluate("""async () => {
                const out = [];
                for (const a of document.querySelectorAll('audio')) {
                    if (a.readyState < 1) await new Promise(done => {
                        a.addEventListener('loadedmetadata', done, {once: true});
                        a.addEventListener('error', done, {once: true});
                        setTimeout(done, 15000);
                    });
                    const s = a.querySelector('source');
                    out.push({src: a.currentSrc, type: s && s.type, can: s ? a.canPlayType(s.type) : '',
                              ready: a.readyState, error: a.error && a.error.code, duration: a.duration});
                }
                return out;
            }""")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"problems": problems, "images": images, "svgs": svgs, "audio": audio, "text": text}


@pytest.fixture(scope="module")
def chain_report(demo_chain):
    summary = demo_chain.summaries["report"]
    return {"summary": summary, "index": Path(summary["report"]), "chain": demo_chain}


@pytest.mark.slow
@pytest.mark.spark
def test_the_nightly_report_has_every_part(chain_report):
    s, index = chain_report["summary"], chain_report["index"]
    assert index.is_file() and index.name == "index.html"
    reports = index.parent.parent
    assert (reports / "LATEST").read_text() == index.parent.name == s["report_id"]
    page = index.read_text()
    for part in ("id='evaluation'", "id='training'", "id='map'", "id='playlists'", "id='operations'"):
        assert part in page
    for predictor in ("random", "MFCC baseline", "CNN", "upper bound"):
        assert f"<td>{predictor}</td>" in page
    assert s["evaluation_rows"] >= 8 and s["promotion"] in (M.PROMOTED, M.KEPT)
    from deepcuts.core.lake import lake, read_pandas
    serving = read_pandas(lake(chain_report["chain"].cfg), "serving_factors", columns=["track_id"])
    assert s["map_tracks"] == min(len(serving), chain_report["chain"].cfg.report.map_tracks)
    assert s["playlists"] == chain_report["chain"].cfg.report.playlists
    assert s["excerpts"] > 0 and not s["excerpts_unavailable"]
    excerpts = list((index.parent / "audio").iterdir())
    assert len(excerpts) == s["excerpts"]
    for f in excerpts:
        info = sf.info(str(f))
        assert info.format == "OGG" and 1.0 < info.duration <= chain_report["chain"].cfg.report.excerpt_seconds + 0.1
    for stage in ("ingest", "factors", "train", "baseline", "infer", "evaluate", "neighbours"):
        assert f"<td>{stage}</td>" in page


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.browser
def test_a_person_opens_the_report_in_a_browser(chain_report, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        # As root with apt, bin/bootstrap.sh --test (run by ./run-tests.sh and CI) installs it:
        # missing there is a set-up failure, not a reason to skip the only browser check.
        if os.geteuid() == 0 and shutil.which("apt-get"):
            pytest.fail(f"{CHROMIUM} missing although bin/bootstrap.sh --test installs it as root")
        pytest.skip(f"{CHROMIUM} missing (bin/bootstrap.sh --test installs Debian's chromium as root)")
    import playwright  # noqa: F401  (requirements-test.txt: an import error here is a set-up failure)
    # From a copy of the folder: the report must need nothing outside it.
    folder = tmp_path / "report"
    shutil.copytree(chain_report["index"].parent, folder)
    shot = tmp_path / "report.png"
    seen = open_in_browser(folder / "index.html", shot)
    print(f"report screenshot: {shot}")
    assert not seen["problems"], seen["problems"]
    assert all(complete and width > 0 for _, complete, width in seen["images"]), seen["images"]
    assert len(seen["svgs"]) >= 2 and all(w > 100 for w, _ in seen["svgs"]), seen["svgs"]
    assert max(n for _, n in seen["svgs"]) >= chain_report["summary"]["map_tracks"]   # the map's dots
    audio = seen["audio"]
    assert len(audio) == chain_report["summary"]["playlists"] * (1 + chain_report["chain"].cfg.report.playlist_length)
    for a in audio:
        assert a["can"] in ("probably", "maybe"), a
        assert a["error"] is None and a["ready"] >= 1 and a["duration"] > 1.0, a
        assert a["src"].startswith(folder.as_uri()), a
    assert "Promotion decision" in seen["text"] and "Rejects by reason" in seen["text"]
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.spark
def test_a_second_report_replaces_latest_and_old_ones_go(chain_report, spark, tmp_path):
    from conftest import copy_chain, run_stage
    chain = copy_chain(chain_report["chain"], tmp_path)
    first = chain_report["summary"]["report_id"]
    reports = tmp_path / "warehouse" / "reports"
    assert (reports / first / "index.html").is_file()
    cfg = chain.cfg.replace(**{"report.keep": 1, "report.map_tracks": 40, "report.playlists": 2,
                               "report.audio_format": "wav"})
    summary = run_stage(spark, cfg, "report")
    assert summary["report_id"] != first and summary["reports_removed"] == 1
    assert (reports / "LATEST").read_text() == summary["report_id"]
    assert sorted(p.name for p in reports.iterdir()) == ["LATEST", summary["report_id"]]
    assert summary["map_tracks"] == 40 and summary["playlists"] == 2
    assert all(f.suffix == ".wav" for f in (reports / summary["report_id"] / "audio").iterdir())
    print("report stage seconds", summary["seconds"])


def test_stage_runs_and_epochs_pick_this_run_or_the_latest():
    from datetime import datetime, timezone
    t = lambda h: datetime(2026, 12, 2, h, tzinfo=timezone.utc)  # noqa: E731
    rows = [{"stage": "train", "run_id": "train-1", "pipeline_run_id": "p1", "started_at": t(1), "ended_at": t(2)},
            {"stage": "ingest", "run_id": "ingest-1", "pipeline_run_id": "p1", "started_at": t(0), "ended_at": t(1)},
            {"stage": "train", "run_id": "train-2", "pipeline_run_id": None, "started_at": t(3), "ended_at": t(4)},
            {"stage": "report", "run_id": "report-1", "pipeline_run_id": "p1", "started_at": t(5), "ended_at": t(6)}]
    assert [r["run_id"] for r in M.stage_runs(rows, "report", "p1")] == ["ingest-1", "train-1"]
    assert [r["run_id"] for r in M.stage_runs(rows, "report", None)] == ["ingest-1", "train-2"]
    epochs = [{"model_id": m, "run_id": r, "epoch": e} for m, r in (("a", "train-1"), ("b", "train-2"))
              for e in (2, 1)]
    assert M.model_epochs(epochs, "a") == ("a", [epochs[1], epochs[0]])
    assert M.model_epochs(epochs, None)[0] == "b" and M.model_epochs([], None) == (None, [])
