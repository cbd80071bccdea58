"""Small PNG charts drawn with PIL (no plotting library needed): loss curves and image strips."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw


COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def line_chart(series: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str = "",
               size: tuple[int, int] = (640, 360), log_y: bool = False) -> Path:  # fmt: skip
    """Draw `{name: (xs, ys)}` as lines with axes, ticks and a legend; returns the PNG path."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [(x, math.log10(y) if log_y else y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)
              if y is not None and (y > 0 or not log_y)]  # fmt: skip
    if not values:
        draw.text((left, top), f"{title}: no data", fill="black")
        image.save(path)
        return Path(path)
    x0, x1 = min(v[0] for v in values), max(v[0] for v in values) or 1
    y0, y1 = min(v[1] for v in values), max(v[1] for v in values)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)

    def to_pixel(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))  # fmt: skip

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for i in range(5):  # y ticks
        y = y0 + (y1 - y0) * i / 4
        _, py = to_pixel(x0, y)
        draw.line((left - 4, py, left, py), fill="black")
        draw.text((4, py - 6), f"{10**y:.3g}" if log_y else f"{y:.3g}", fill="black")
    for i in range(5):  # x ticks
        x = x0 + (x1 - x0) * i / 4
        px, _ = to_pixel(x, y0)
        draw.line((px, height - bottom, px, height - bottom + 4), fill="black")
        draw.text((px - 10, height - bottom + 6), f"{x:.0f}", fill="black")
    for n, (name, (xs, ys)) in enumerate(series.items()):
        points = [to_pixel(x, math.log10(y) if log_y else y) for x, y in zip(xs, ys, strict=True)
                  if y is not None and (y > 0 or not log_y)]  # fmt: skip
        color = COLORS[n % len(COLORS)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.text((width - right - 150, top + 6 + 14 * n), f"- {name}", fill=color)
    draw.text((left, 8), title, fill="black")
    image.save(path)
    return Path(path)


def strip(images: list[Image.Image], labels: list[str], path: str | Path, scale: int = 3) -> Path:
    """Images side by side, enlarged `scale` times (nearest), each with a label underneath."""
    w, h = images[0].size
    w, h = w * scale, h * scale
    canvas = Image.new("RGB", (w * len(images), h + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        canvas.paste(image.resize((w, h), Image.Resampling.NEAREST), (i * w, 0))
        draw.text((i * w + 2, h + 2), label, fill="black")
    canvas.save(path)
    return Path(path)
