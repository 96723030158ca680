"""2D overlays drawn on rendered images: legend and title (Pillow)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["draw_legend"]


def draw_legend(
    image: np.ndarray, entries: Sequence[tuple[str, Sequence[float]]], title: str = "", scale: int = 2
) -> np.ndarray:
    """Return ``image`` (H, W, 3) uint8 with a legend box (top-left) and a title (bottom-left).

    ``entries`` are (text, RGB in [0, 1]); Pillow's built-in bitmap font is drawn at ``scale``x
    so it stays readable on large renders without shipping a font file.
    """
    if not entries and not title:
        return image
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    line_h, pad, swatch = 8 * scale + 6, 8, 6 * scale
    texts = [t for t, _ in entries]
    font = _font(scale)
    out = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    draw = ImageDraw.Draw(out)
    if entries:
        text_w = max(_text_width(draw, t, font) for t in texts)
        box_w, box_h = pad * 3 + swatch + text_w, pad * 2 + line_h * len(entries)
        panel = Image.new("RGBA", (min(box_w, w), min(box_h, h)), (0, 0, 0, 170))
        out.paste(panel, (0, 0), panel)
        for i, (text, color) in enumerate(entries):
            y = pad + i * line_h
            rgb = tuple(round(255 * float(c)) for c in color)
            draw.rectangle([pad, y + 2, pad + swatch, y + 2 + swatch], fill=rgb)
            draw.text((2 * pad + swatch, y), text, fill=(235, 235, 235), font=font)
    if title:
        y = h - line_h - pad
        panel = Image.new(
            "RGBA", (min(_text_width(draw, title, font) + 2 * pad, w), line_h + pad), (0, 0, 0, 170)
        )
        out.paste(panel, (0, y - pad // 2), panel)
        draw.text((pad, y), title, fill=(235, 235, 235), font=font)
    return np.asarray(out)


def _font(scale: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=10 * scale)  # Pillow >= 10.1: scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)
