"""The run report as one HTML page: :class:`deepcuts.report.model.ReportData` in, a string out.

Static and self-contained: inline CSS and SVG, no script, no network; the only files beside it
are the playlists' audio excerpts (``audio/``).  Every value from the warehouse is escaped.
"""
from __future__ import annotations

import math
from html import escape
from typing import Any

from deepcuts.report import charts
from deepcuts.report.model import PREDICTOR_NAMES, ReportData, TrackCard

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1100px;padding:16px 24px;color:#222}
h1{font-size:22px;margin:8px 0 2px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px} .meta{color:#666;font-size:12px}
table{border-collapse:collapse;margin:6px 0 12px} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#1a7f37} .down{color:#c0392b} .same{color:#777}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600}
.promoted{background:#dff3e4;color:#1a7f37} .kept{background:#fff3cd;color:#8a6d00}
.not_trained{background:#eee;color:#555} .failed{background:#fbe0dd;color:#c0392b}
svg.chart{max-width:100%;height:auto;font-size:11px} svg .plot{fill:#fcfcfc;stroke:#ccc}
svg .grid{stroke:#eee} svg .tick{fill:#555} svg .axis{fill:#333} svg .ctitle{font-weight:600;font-size:13px}
svg .legend{fill:#333} svg .marker{stroke:#999;stroke-dasharray:4 3}
.playlist{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:10px 0}
.track{display:flex;gap:12px;align-items:center;margin:4px 0} .track .id{min-width:110px;font-family:monospace}
.track .lab{min-width:120px} .track .sc{min-width:64px} .track audio{height:30px;width:260px} .note{color:#999;font-style:italic}
.src{font-size:11px;padding:1px 6px;border-radius:8px;background:#eef} .src.audio{background:#fde8d0} .src.metadata{background:#e3f4dc}
"""


def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else escape(str(v))


def _delta(now: float | None, before: float | None) -> str:
    if now is None or before is None:
        return ""
    d = now - before
    cls = "up" if d > 5e-5 else "down" if d < -5e-5 else "same"
    return f' <span class="{cls}">({d:+.4f})</span>'


def _evaluation(data: ReportData) -> str:
    ranking = [e for e in data.evaluation if e.metric is None]
    labels = [e for e in data.evaluation if e.metric is not None and e.label is None]
    if not ranking and not labels:
        return "<p class='note'>No evaluation results yet (the evaluate stage has not run).</p>"
    out = []
    if ranking:
        k = data.metric_k or next((e.k for e in ranking if e.k), None)
        out.append(f"<table class='evaluation'><tr><th>split</th><th>predictor</th><th>mAP@{k or 'k'}</th>"
                   f"<th>previous</th><th>AUC</th><th>previous</th><th>users</th><th>candidates</th></tr>")
        for e in ranking:
            out.append(
                f"<tr><td>{escape(e.split)}</td><td>{escape(PREDICTOR_NAMES.get(e.predictor, e.predictor))}</td>"
                f"<td class='num'>{_num(e.map_at_k)}{_delta(e.map_at_k, e.prev_map_at_k)}</td>"
                f"<td class='num'>{_num(e.prev_map_at_k)}</td>"
                f"<td class='num'>{_num(e.auc)}{_delta(e.auc, e.prev_auc)}</td>"
                f"<td class='num'>{_num(e.prev_auc)}</td>"
                f"<td class='num'>{_num(e.n_users)}</td><td class='num'>{_num(e.n_candidates)}</td></tr>")
        out.append("</table>")
    if labels:
        out.append("<h3>Label metrics (over all labels)</h3><table class='label-metrics'><tr><th>split</th>"
                   "<th>predictor</th><th>metric</th><th>value</th><th>previous</th><th>chance</th></tr>")
        for e in labels:
            out.append(f"<tr><td>{escape(e.split)}</td><td>{escape(PREDICTOR_NAMES.get(e.predictor, e.predictor))}"
                       f"</td><td>{escape(e.metric)}</td><td class='num'>{_num(e.value)}"
                       f"{_delta(e.value, e.prev_value)}</td><td class='num'>{_num(e.prev_value)}</td>"
                       f"<td class='num'>{_num(e.chance)}</td></tr>")
        out.append("</table>")
    runs = sorted({(e.split, e.run_id, e.prev_run_id) for e in ranking + labels}, key=lambda t: (t[0], t[2] is None))
    seen, parts = set(), []
    for s, r, p in runs:
        if (s, r) in seen:
            continue
        seen.add((s, r))
        parts.append(f"{escape(s)}: {escape(r)}" + (f" (previous: {escape(p)})" if p else " (no previous run)"))
    out.append(f"<p class='meta'>runs: {'; '.join(parts)}</p>")
    return "".join(out)


def _training(data: ReportData) -> str:
    parts = []
    p = data.promotion
    if p is not None:
        parts.append(f"<p id='promotion'>Promotion decision: <span class='badge {escape(p.status)}'>"
                     f"{escape(p.text)}</span><br><span class='meta'>{escape(p.detail)}"
                     f"{'; model ' + escape(p.model_id) if p.model_id else ''}"
                     f"; served: {escape(p.served_model_id or 'none')}</span></p>")
    if not data.epochs:
        parts.append("<p class='note'>No training metrics recorded.</p>")
        return "".join(parts)
    ep = sorted(data.epochs, key=lambda r: r["epoch"])
    xs = [r["epoch"] for r in ep]
    series = [("train loss", xs, [r.get("train_loss") for r in ep]),
              ("validation loss", xs, [r.get("validation_loss") for r in ep])]
    parts.append(charts.line_chart(series, title=f"training curves: {data.model_id}", x_label="epoch",
                                   y_label="loss", marker_x=data.best_epoch,
                                   marker_label=f"best epoch {data.best_epoch}" if data.best_epoch else ""))
    last = ep[-1]
    parts.append(f"<p class='meta'>{len(ep)} epochs; last: train {_num(last.get('train_loss'), 5)}, validation "
                 f"{_num(last.get('validation_loss'), 5)}; {_num(last.get('crops_per_s'), 1)} crops/s</p>")
    return "".join(parts)


def _track(card: TrackCard, query: bool = False) -> str:
    src = card.source or "?"
    if card.audio_href:
        player = (f"<audio controls preload='metadata'><source src='{escape(card.audio_href)}' "
                  f"type='{escape(card.audio_type or '')}'></audio>")
    else:
        player = f"<span class='note'>no audio: {escape(card.audio_note or 'unavailable')}</span>"
    score = f"<span class='meta sc'>{'' if card.score is None else f'cos {card.score:.3f}'}</span>"
    return (f"<div class='track{' query' if query else ''}'><span class='id'>{'▶ ' if query else ''}"
            f"{escape(card.track_id)}</span><span class='lab'>{escape(card.labels or 'no label')}</span>"
            f"<span class='src {escape(src)}'>{escape(src)}</span>{score}{player}</div>")


def _playlists(data: ReportData) -> str:
    if not data.playlists:
        return "<p class='note'>No similar_tracks yet (the neighbours stage has not run).</p>"
    out = []
    for pl in data.playlists:
        out.append("<div class='playlist'>" + _track(pl.query, query=True)
                   + "".join(_track(n) for n in pl.neighbours) + "</div>")
    return "".join(out)


def _operations(data: ReportData) -> str:
    out = []
    if data.counts:
        out.append("<h3>Counts</h3><table class='counts'>" + "".join(
            f"<tr><th>{escape(k)}</th><td class='num'>{_num(v)}</td></tr>" for k, v in data.counts.items())
            + "</table>")
    out.append("<h3>Quality gates</h3>")
    if data.gates_failed:
        out.append("<ul class='gates down'>" + "".join(f"<li>{escape(g)}</li>" for g in data.gates_failed)
                   + "</ul><p class='meta'>The nightly job exits 4 for these.</p>")
    else:
        out.append("<p class='up'>all passed</p>")
    out.append("<h3>Rejects by reason</h3>")
    rows = [(t, r, n) for t, reasons in data.rejects.items() for r, n in sorted(reasons.items())]
    if rows:
        out.append("<table class='rejects'><tr><th>table</th><th>reason</th><th>rows</th></tr>" + "".join(
            f"<tr><td>{escape(t)}</td><td>{escape(r)}</td><td class='num'>{_num(n)}</td></tr>"
            for t, r, n in rows) + "</table>")
    else:
        out.append("<p>none</p>")
    out.append("<h3>Stages</h3>")
    if data.stages:
        out.append("<table class='stages'><tr><th>stage</th><th>status</th><th>seconds</th><th>ended</th>"
                   "<th>tables written (version, rows)</th><th>rejects</th></tr>")
        for s in data.stages:
            written = ", ".join(f"{escape(t)} v{v}" + (f" ({r:,})" if r is not None else "")
                                for t, (v, r) in sorted(s.tables_written.items())) or "–"
            rej = ", ".join(f"{escape(k)} {v:,}" for k, v in sorted(s.rejects.items())) or "–"
            err = f"<br><span class='down'>{escape(s.error[:300])}</span>" if s.error else ""
            out.append(f"<tr><td>{escape(s.stage)}</td><td>{escape(s.status)}{err}</td>"
                       f"<td class='num'>{_num(s.duration_s, 1)}</td><td>{escape(s.ended_at or '')}</td>"
                       f"<td>{written}</td><td>{rej}</td></tr>")
        total = sum(s.duration_s or 0 for s in data.stages)
        out.append(f"<tr><th>total</th><td></td><td class='num'>{total:.1f}</td><td></td><td></td><td></td></tr>"
                   "</table>")
    else:
        out.append("<p class='note'>no stage runs recorded</p>")
    if data.tables_read:
        out.append("<h3>Table versions read by this report</h3><table class='versions'><tr><th>table</th>"
                   "<th>version</th></tr>" + "".join(f"<tr><td>{escape(t)}</td><td class='num'>v{v}</td></tr>"
                                                      for t, v in sorted(data.tables_read.items())) + "</table>")
    return "".join(out)


def render(data: ReportData) -> str:
    """The whole page."""
    title = f"deepcuts run report {data.report_id}"
    notes = "".join(f"<li>{escape(n)}</li>" for n in data.notes)
    return "".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        # No favicon request: a page opened from disk would log a failed fetch for it.
        "<link rel='icon' href='data:,'>",
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1><p class='meta'>created {escape(data.created_at)}"
        f"{' · pipeline ' + escape(data.pipeline_run_id) if data.pipeline_run_id else ''}"
        f" · code {escape(data.code_version)} · warehouse {escape(data.warehouse)}</p>",
        f"<ul class='notes'>{notes}</ul>" if notes else "",
        "<h2 id='evaluation'>Evaluation</h2>", _evaluation(data),
        "<h2 id='training'>Training</h2>", _training(data),
        "<h2 id='map'>The catalogue in 2-D</h2>", data.map_svg or "<p class='note'>No vectors to map yet (the infer stage has not run).</p>",
        f"<p class='meta'>{escape(data.map_note)}</p>" if data.map_note else "",
        "<h2 id='playlists'>Example playlists</h2>",
        f"<p class='meta'>A query track (▶) and its nearest catalogue tracks in {escape(data.playlists_table)}; "
        "<span class='src audio'>audio</span> tracks are served from the audio model (cold start), "
        "<span class='src metadata'>metadata</span> ones from it and their album's or artist's warm tracks.</p>",
        _playlists(data),
        "<h2 id='operations'>Operations</h2>", _operations(data),
        "</body></html>",
    ])

