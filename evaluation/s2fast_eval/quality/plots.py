"""The toy study's PNG plots, with Pillow alone (a diffusers dependency already): no plotting library is needed
offline."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw

from s2fast.digits.grid import ascii_title

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
PANEL = 360


def panels_png(panels: Sequence[Tuple[str, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], path: str,
               extent: float = 8.0, marks: Optional[torch.Tensor] = None) -> None:
    """One panel per (title, points (n, 2), labels (n,), trajectories (steps + 1, k, 2) or None), side by side.

    Points are coloured by label; trajectories are thin grey lines ending at their sample; ``marks`` (the true
    mode centres) are drawn as black crosses. Axes span [-extent, extent] in both directions.
    """
    image = Image.new("RGB", (PANEL * len(panels), PANEL + 24), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, points, labels, trajectories) in enumerate(panels):
        ox = p * PANEL
        to_px = lambda xy, ox=ox: (ox + (float(xy[0]) + extent) / (2 * extent) * PANEL,  # noqa: E731
                                   24 + (extent - float(xy[1])) / (2 * extent) * PANEL)
        draw.rectangle([ox, 24, ox + PANEL - 1, 24 + PANEL - 1], outline=(200, 200, 200))
        draw.text((ox + 6, 6), ascii_title(title), fill="black")
        if trajectories is not None:
            for k in range(trajectories.shape[1]):
                draw.line([to_px(xy) for xy in trajectories[:, k]], fill=(170, 170, 170), width=1)
        for xy, label in zip(points, labels):
            x, y = to_px(xy)
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=COLOURS[int(label) % len(COLOURS)])
        for xy in marks if marks is not None else []:
            x, y = to_px(xy)
            draw.line([x - 6, y, x + 6, y], fill="black", width=2)
            draw.line([x, y - 6, x, y + 6], fill="black", width=2)
    image.save(path)


def one_d_as_two_d(samples: torch.Tensor, trajectories: Optional[torch.Tensor], steps: int,
                   extent: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Draw a 1-D process in 2-D: x horizontally, the denoising step vertically (noise at the top)."""
    y_final = torch.full((len(samples), 1), -extent * 0.95)
    points = torch.cat([samples, y_final], dim=1)
    if trajectories is None:
        return points, None
    ys = torch.linspace(extent * 0.95, -extent * 0.95, steps + 1)[:, None, None].expand(-1, trajectories.shape[1], 1)
    return points, torch.cat([trajectories, ys], dim=2)
