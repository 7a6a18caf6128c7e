"""Scatter-and-line charts as PNG with Pillow alone (no plotting library offline): one panel per chart, a line per
series through its given points, every point marked, a legend, axis ticks at round numbers."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from .plots import COLOURS

EXTRA_COLOURS = [(227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
W, H, LEFT, RIGHT, TOP, BOTTOM = 520, 420, 60, 16, 28, 44

Point = Tuple[float, float]
# Pillow's built-in bitmap font draws ASCII only
_ASCII = {"²": "2", "σ": "sigma", "λ": "lambda", "ω": "omega", "é": "e", "—": "-", "–": "-", "∈": " in ", "≤": "<="}


def ascii_text(text: str) -> str:
    return "".join(_ASCII.get(ch, ch if ord(ch) < 128 else "?") for ch in text)


def nice_ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    """Round-number ticks covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10) if m * power >= raw), default=10 * power)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def chart(draw: ImageDraw.ImageDraw, x0: int, title: str, xlabel: str, ylabel: str,
          series: Dict[str, Tuple[Sequence[Point], Sequence[Point]]], marks: Dict[str, Point]) -> None:
    """series: name -> (points of the line, other points drawn as small hollow dots); marks: name -> a star."""
    pts = [p for line, dots in series.values() for p in list(line) + list(dots)] + list(marks.values())
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    (xa, xb), (ya, yb) = (xt[0], xt[-1]), (yt[0], yt[-1])
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def at(p: Point) -> Tuple[float, float]:
        return (x0 + LEFT + (p[0] - xa) / (xb - xa) * pw, TOP + (1 - (p[1] - ya) / (yb - ya)) * ph)

    draw.rectangle([x0 + LEFT, TOP, x0 + LEFT + pw, TOP + ph], outline=(0, 0, 0))
    for t in xt:
        x, _ = at((t, ya))
        draw.line([x, TOP + ph, x, TOP + ph + 4], fill=(0, 0, 0))
        draw.text((x - 12, TOP + ph + 6), f"{t:g}", fill=(0, 0, 0))
    for t in yt:
        _, y = at((xa, t))
        draw.line([x0 + LEFT - 4, y, x0 + LEFT, y], fill=(0, 0, 0))
        draw.text((x0 + 4, y - 6), f"{t:g}", fill=(0, 0, 0))
    draw.text((x0 + LEFT, 6), ascii_text(title), fill=(0, 0, 0))
    draw.text((x0 + LEFT + pw // 2 - 30, H - 16), ascii_text(xlabel), fill=(0, 0, 0))
    draw.text((x0 + 4, TOP - 14), ascii_text(ylabel), fill=(0, 0, 0))
    palette = COLOURS + EXTRA_COLOURS
    for i, (name, (line, dots)) in enumerate(series.items()):
        colour = palette[i % len(palette)]
        for p in dots:
            x, y = at(p)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
        line = sorted(line)
        if len(line) > 1:
            draw.line([at(p) for p in line], fill=colour, width=2)
        for p in line:
            x, y = at(p)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((x0 + LEFT + pw - 150, TOP + 6 + 13 * i), ascii_text(f"- {name}"), fill=colour)
    for name, p in marks.items():
        x, y = at(p)
        draw.polygon([(x, y - 6), (x + 5, y + 4), (x - 5, y + 4)], fill=(0, 0, 0))
        draw.text((x + 6, y - 6), ascii_text(name), fill=(0, 0, 0))


def charts_png(panels: Sequence[dict], path: str, note: Optional[str] = None) -> None:
    """Panels side by side; each a dict of ``chart``'s keyword arguments (title, xlabel, ylabel, series, marks)."""
    image = Image.new("RGB", (W * len(panels), H + (16 if note else 0)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, panel in enumerate(panels):
        chart(draw, i * W, **panel)
    if note:
        draw.text((8, H), ascii_text(note), fill=(60, 60, 60))
    image.save(path)
