"""Write rendered frames as an animated GIF (Pillow) or an MP4 (imageio + imageio-ffmpeg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_image", "write_video"]


def write_image(
    path: str | os.PathLike, image: np.ndarray, colors: int | None = None, keep_colors: Sequence = ()
) -> Path:
    """Save an (H, W, 3) uint8 image as PNG (or any format Pillow knows by suffix).

    ``colors`` (<= 256) writes a palette PNG of that many colours: a dense point cloud renders as
    noise-like texture that compresses poorly, and a palette typically makes the file 2-4x smaller.
    ``keep_colors`` (RGB in [0, 1]) are put in the palette exactly, so box and legend colours are
    not shifted by the quantization.
    """
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    if colors is not None:
        keep = np.round(np.asarray(keep_colors, np.float64).reshape(-1, 3) * 255).astype(np.uint8)
        keep = np.unique(keep, axis=0)
        free = int(colors) - len(keep)
        if free < 1 or int(colors) > 256:
            raise ValueError(f"write_image: colors={colors} leaves no room beside {len(keep)} kept colours")
        learned = im.quantize(colors=free, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        table = np.asarray(learned.getpalette()[: 3 * free], np.uint8).reshape(-1, 3)
        table = np.concatenate([keep, table])
        palette = Image.new("P", (1, 1))
        palette.putpalette(table.reshape(-1).tolist() + [0] * (768 - table.size))
        im = im.quantize(palette=palette, dither=Image.Dither.NONE)
    im.save(path, optimize=True)
    return path


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float = 5.0) -> Path:
    """Write (H, W, 3) uint8 frames to ``path``: ``.gif`` or ``.mp4``.

    GIFs need only Pillow (one shared 256-colour palette). MP4 (H.264, yuv420p) needs
    ``pip install imageio imageio-ffmpeg``; frames are padded to even sizes as H.264 requires.
    """
    path = Path(path)
    if not frames:
        raise ValueError(f"video {path}: no frames")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(np.ascontiguousarray(f[..., :3])) for f in frames]
        # One palette for all frames, from a sample of every frame's rows.
        picks = np.linspace(0, len(frames) - 1, min(len(frames), 16)).round().astype(int)
        sample = np.concatenate([np.asarray(frames[i])[:: max(1, len(picks) // 2), :, :3] for i in picks])
        palette = Image.fromarray(np.ascontiguousarray(sample)).quantize(
            colors=255, method=Image.Quantize.MEDIANCUT
        )
        images = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
        images[0].save(
            path,
            save_all=True,
            append_images=images[1:],
            duration=round(1000 / fps),
            loop=0,
            optimize=False,
        )
        return path
    if suffix == ".mp4":
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary)
        except ImportError as exc:
            raise RuntimeError(
                f"video {path}: MP4 needs `pip install imageio imageio-ffmpeg` (or write a .gif)"
            ) from exc
        h, w = frames[0].shape[:2]
        ph, pw = h + h % 2, w + w % 2
        with imageio.get_writer(
            path, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1
        ) as writer:
            for f in frames:
                f = np.ascontiguousarray(f[..., :3])
                if f.shape[:2] != (ph, pw):
                    f = np.pad(f, ((0, ph - f.shape[0]), (0, pw - f.shape[1]), (0, 0)))
                writer.append_data(f)
        return path
    raise ValueError(f"video {path}: unknown suffix {suffix!r}; expected .gif or .mp4")
