"""Hand-drawn SVG charts for the run report: pure functions, data in, an ``<svg>`` string out.

No plotting dependency: the report is one static folder a person opens from disk, so charts are
inline SVG (scales with the page, hover titles per point, nothing to load).
"""
from __future__ import annotations

import math
from html import escape
from typing import Sequence

# Tableau 10: distinguishable categorical colours; more categories than this reuse them.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
NO_LABEL = "#9a9a9a"


def colour_of(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.001:
        return f"{v:.2g}"
    return f"{v:.4g}"


def _svg_open(css_class: str, title: str, width: int, height: int, title_x: float) -> list[str]:
    """The opening of a chart: the <svg> element with its accessible title, and the visible title."""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" role="img" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}"><title>{escape(title)}</title>',
            f'<text x="{title_x}" y="18" text-anchor="middle" class="ctitle">{escape(title)}</text>']


def _svg_empty(out: list[str], width: int, height: int, text: str) -> str:
    """A chart with nothing to draw: its opening and one centred line."""
    out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">{text}</text></svg>')
    return "".join(out)


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float | None]]], *,
               title: str, x_label: str, y_label: str, width: int = 640, height: int = 320,
               marker_x: float | None = None, marker_label: str = "") -> str:
    """Lines of (name, xs, ys) with axes, ticks and a legend; ``None`` ys are gaps.
    ``marker_x`` draws a dashed vertical line (e.g. the best epoch)."""
    left, right, top, bottom = 64, 16, 34, 46
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys)
           if y is not None and math.isfinite(y)]
    out = _svg_open("chart", title, width, height, width / 2)
    if not pts:
        return _svg_empty(out, width, height, "no data")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>')
    for t in nice_ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{_fmt(sy(t))}" y2="{_fmt(sy(t))}" class="grid"/>'
                   f'<text x="{left - 6}" y="{_fmt(sy(t) + 4)}" text-anchor="end" class="tick">{_tick_label(t)}</text>')
    for t in nice_ticks(x0, x1, 8):
        out.append(f'<text x="{_fmt(sx(t))}" y="{top + ph + 16}" text-anchor="middle" class="tick">'
                   f'{_tick_label(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle" class="axis">{escape(x_label)}</text>'
               f'<text x="14" y="{top + ph / 2}" text-anchor="middle" class="axis" '
               f'transform="rotate(-90 14 {top + ph / 2})">{escape(y_label)}</text>')
    if marker_x is not None and x0 <= marker_x <= x1:
        out.append(f'<line x1="{_fmt(sx(marker_x))}" x2="{_fmt(sx(marker_x))}" y1="{top}" y2="{top + ph}" '
                   f'class="marker"/><text x="{_fmt(sx(marker_x) + 4)}" y="{top + 12}" class="tick">'
                   f'{escape(marker_label)}</text>')
    for i, (name, xs, ys) in enumerate(series):
        colour = colour_of(i)
        segments, current = [], []
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y):
                if current:
                    segments.append(current)
                current = []
            else:
                current.append(f"{_fmt(sx(x))},{_fmt(sy(y))}")
        if current:
            segments.append(current)
        for seg in segments:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(seg)}"/>')
        for x, y in zip(xs, ys):
            if y is not None and math.isfinite(y):
                out.append(f'<circle cx="{_fmt(sx(x))}" cy="{_fmt(sy(y))}" r="2.5" fill="{colour}">'
                           f'<title>{escape(name)}: epoch {_tick_label(x)}, {y:.5g}</title></circle>')
        lx = left + 10 + i * 150
        out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{top + 12}" y2="{top + 12}" stroke="{colour}" '
                   f'stroke-width="3"/><text x="{lx + 24}" y="{top + 16}" class="legend">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def scatter_map(xy: Sequence[tuple[float, float]], groups: Sequence[str], filled: Sequence[bool],
                titles: Sequence[str], *, title: str, group_order: Sequence[str] | None = None,
                filled_label: str = "usage", hollow_label: str = "audio", width: int = 720,
                height: int = 560) -> str:
    """A 2-D map: one dot per point, colour by group (``""`` = no group: grey), filled or hollow
    (e.g. usage vs audio-served vectors), with a hover title per dot and a legend."""
    out = _svg_open("chart map", title, width, height, (width - 170) / 2)
    if not xy:
        return _svg_empty(out, width, height, "no tracks")
    legend_w, margin, top = 170, 14, 30
    pw, ph = width - legend_w - 2 * margin, height - top - margin
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span = max(x1 - x0, y1 - y0) or 1.0      # one scale for both axes: t-SNE distances are isotropic
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scale = min(pw, ph) / span * 0.96
    ox, oy = margin + pw / 2, top + ph / 2
    order = list(group_order) if group_order is not None else sorted({g for g in groups if g})
    colours = {g: colour_of(i) for i, g in enumerate(order)}
    out.append(f'<rect x="{margin}" y="{top}" width="{pw}" height="{ph}" class="plot"/>')
    for (x, y), g, full, t in zip(xy, groups, filled, titles):
        colour = colours.get(g, NO_LABEL)
        px, py = ox + (x - cx) * scale, oy - (y - cy) * scale
        paint = f'fill="{colour}"' if full else f'fill="white" stroke="{colour}" stroke-width="1.6"'
        out.append(f'<circle cx="{_fmt(px)}" cy="{_fmt(py)}" r="3.6" {paint} fill-opacity="0.85">'
                   f'<title>{escape(t)}</title></circle>')
    lx, ly = width - legend_w + 6, top + 6
    for i, g in enumerate(order + ([""] if any(not g for g in groups) else [])):
        y = ly + 16 * i
        out.append(f'<circle cx="{lx + 6}" cy="{y + 6}" r="5" fill="{colours.get(g, NO_LABEL)}"/>'
                   f'<text x="{lx + 16}" y="{y + 10}" class="legend">{escape(g or "no label")}</text>')
    y = ly + 16 * (len(order) + (1 if any(not g for g in groups) else 0)) + 10
    out.append(f'<circle cx="{lx + 6}" cy="{y + 6}" r="4.5" fill="#555"/>'
               f'<text x="{lx + 16}" y="{y + 10}" class="legend">{escape(filled_label)}</text>'
               f'<circle cx="{lx + 6}" cy="{y + 22}" r="4.5" fill="white" stroke="#555" stroke-width="1.6"/>'
               f'<text x="{lx + 16}" y="{y + 26}" class="legend">{escape(hollow_label)}</text>')
    out.append("</svg>")
    return "".join(out)
