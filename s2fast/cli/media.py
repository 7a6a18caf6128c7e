"""The command's pictures and videos: reading ``--image``, ``--mask`` and ``--video``, the labelled side-by-side
of ``--compare`` (for stills and, frame by frame, for videos), a video's still (a strip of frames) and its MP4.

MP4s go through diffusers' ``export_to_video`` (imageio with the ffmpeg binary of imageio-ffmpeg, the
``s2fast[video]`` extra). Without the extra, diffusers would fall back to OpenCV with a warning; the command asks
for the extra instead, before any weights load.
"""

from __future__ import annotations

import io
import math
import os
from typing import Dict, List, Optional, Sequence

from .errors import UserError

LABEL_HEIGHT = 14     # pixels above each picture of a side-by-side, for its label
GAP = 4               # pixels between the pictures
MIN_SIDE = 128        # a side-by-side upscales smaller pictures (28×28 digits) by a whole factor to at least this
STILL_FRAMES = 5      # frames in a video's still: evenly spaced, the first and the last included
MACRO_BLOCK = 16      # export_to_video's default: sizes not divisible by it are rescaled by ffmpeg; pad instead
VIDEO_EXTRA = "video needs imageio, imageio-ffmpeg and ftfy: pip install s2fast[video]"


def require_video_extra() -> None:
    """UserError naming the extra when imageio, its ffmpeg binary or ftfy (which Wan image-to-video calls on every
    prompt without checking it is installed) is missing."""
    try:
        import ftfy  # noqa: F401
        import imageio  # noqa: F401
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        raise UserError(VIDEO_EXTRA) from None


def check_input_files(args) -> None:
    """Every input file exists (checked before the model loads; its content is read by ``read_inputs``)."""
    for flag, paths in (("--image", args.image or []), ("--mask", [args.mask] if args.mask else []),
                        ("--video", [args.video] if args.video else [])):
        for path in paths:
            if not os.path.isfile(path):
                raise UserError(f"{flag} {path}: no such file")


def read_inputs(args, family) -> Dict:
    """The call's input arguments from ``--image``, ``--mask`` and ``--video``: PIL images in RGB (the mask in L),
    a list of images where the pipeline takes several, the video as a list of frames (its first ``--frames``)."""
    inputs = {}
    if args.image:
        images = [_image(p, "--image", "RGB") for p in args.image]
        many = family.images[1] is None or family.images[1] > 1
        inputs["image"] = images if many else images[0]
    if args.mask:
        inputs["mask_image"] = _image(args.mask, "--mask", "L")
    if args.video:
        frames = _video(args.video)
        if args.frames is not None:
            if len(frames) < args.frames:
                raise UserError(f"--frames {args.frames}: --video {args.video} has only {len(frames)} frames")
            frames = frames[:args.frames]
        inputs["video"] = frames
    return inputs


def _image(path: str, flag: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{flag} {path}: not an image PIL can read ({_first_line(e)})") from None


def _video(path: str) -> List:
    from diffusers.utils import load_video

    if not path.lower().endswith(".gif"):
        require_video_extra()
    try:
        frames = load_video(path)
    except Exception as e:  # imageio/ffmpeg's own errors for a file that is not a video
        raise UserError(f"--video {path}: not a video imageio can read ({_first_line(e)})") from None
    if not frames:
        raise UserError(f"--video {path}: holds no frame")
    return frames


def upscale_factor(pictures: Sequence) -> int:
    """The whole factor that brings the smallest side of ``pictures`` to at least MIN_SIDE (1 if it is)."""
    side = min(min(p.width, p.height) for p in pictures)
    return max(1, math.ceil(MIN_SIDE / side))


def side_by_side(pictures: Sequence, labels: Sequence[str], factor: Optional[int] = None):
    """The pictures in a row (CFG first) on white, GAP pixels apart, each under its label and upscaled by
    ``factor`` (nearest neighbour, so every pixel stays visible; default ``upscale_factor``)."""
    from PIL import Image, ImageDraw

    pictures = [p.convert("RGB") for p in pictures]
    factor = factor or upscale_factor(pictures)
    if factor > 1:
        pictures = [p.resize((p.width * factor, p.height * factor), Image.NEAREST) for p in pictures]
    width = sum(p.width for p in pictures) + GAP * (len(pictures) - 1)
    canvas = Image.new("RGB", (width, LABEL_HEIGHT + max(p.height for p in pictures)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for picture, label in zip(pictures, labels):
        canvas.paste(picture, (x, LABEL_HEIGHT))
        draw.text((x + 2, 1), label, fill="black")
        x += picture.width + GAP
    return canvas


def video_side_by_side(videos: Sequence[Sequence], labels: Sequence[str]) -> List:
    """``side_by_side`` frame by frame, padded on the right and bottom to a multiple of MACRO_BLOCK (so the
    encoder keeps every pixel where it is instead of rescaling)."""
    from PIL import Image

    factor = upscale_factor([v[0] for v in videos])
    frames = []
    for pictures in zip(*videos):
        frame = side_by_side(pictures, labels, factor)
        padded = Image.new("RGB", (_round_up(frame.width), _round_up(frame.height)), "white")
        padded.paste(frame, (0, 0))
        frames.append(padded)
    return frames


def _round_up(n: int) -> int:
    return -(-n // MACRO_BLOCK) * MACRO_BLOCK


def still(frames: Sequence):
    """A video's still: STILL_FRAMES evenly spaced frames (all of a shorter video) side by side, GAP apart."""
    from PIL import Image

    picks = [frames[i].convert("RGB") for i in still_frames(frames)]
    canvas = Image.new("RGB", (sum(p.width for p in picks) + GAP * (len(picks) - 1), picks[0].height), "white")
    x = 0
    for p in picks:
        canvas.paste(p, (x, 0))
        x += p.width + GAP
    return canvas


def still_frames(frames: Sequence) -> List[int]:
    """The indices of the frames ``still`` shows."""
    count = min(STILL_FRAMES, len(frames))
    return [round(i * (len(frames) - 1) / max(count - 1, 1)) for i in range(count)]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def export_frames(frames: Sequence, path: str, fps: int) -> None:
    """``frames`` (PIL images) as an MP4 at ``path``: diffusers' export_to_video at its default quality."""
    from diffusers.utils import export_to_video

    require_video_extra()
    export_to_video(list(frames), path, fps=fps)


def mp4_bytes(frames: Sequence, fps: int, scratch: str) -> bytes:
    """The MP4 of ``frames`` (``export_frames``), encoded through the file ``scratch`` (ffmpeg writes to a path),
    which is removed."""
    try:
        export_frames(frames, scratch, fps)
        with open(scratch, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot write {scratch}: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(scratch)
        except OSError:
            pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
