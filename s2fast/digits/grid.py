"""The demo's grid of digits, a PNG drawn with Pillow alone (a diffusers dependency already): no plotting library
is needed offline."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from PIL import Image, ImageDraw


def ascii_title(title: str) -> str:
    """Pillow's built-in font has no Greek letters: λ → lam, ω → w, S² → S2."""
    return title.replace("λ", "lam").replace("ω", "w").replace("²", "2")


def digit_grid_png(columns: Sequence[Tuple[str, torch.Tensor]], path: str, scale: int = 2, gap: int = 12) -> None:
    """Side-by-side blocks of digit images: each column entry is (title, images (rows, per_row, 28, 28) in [0, 1]).

    Row r of every block shows the same class; a gap separates the blocks, the title sits above each.
    """
    rows, per_row = columns[0][1].shape[:2]
    side = 28 * scale
    width = len(columns) * per_row * side + (len(columns) - 1) * gap
    image = Image.new("L", (width, rows * side + 18), 255)
    draw = ImageDraw.Draw(image)
    for b, (title, images) in enumerate(columns):
        ox = b * (per_row * side + gap)
        draw.text((ox + 4, 3), ascii_title(title), fill=0)
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        for r in range(rows):
            for c in range(per_row):
                tile = Image.fromarray(pixels[r, c].numpy(), "L").resize((side, side), Image.NEAREST)
                image.paste(tile, (ox + c * side, 18 + r * side))
    image.save(path)
