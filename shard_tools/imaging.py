"""Reading, checking and (only when needed) re-encoding one image for a shard."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
import warnings
from struct import error as struct_error  # some PIL plugins raise it on damaged headers
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

from shard_tools.format import DEFAULT_MAX_PIXELS

# Keep the original bytes of JPEGs in these modes; anything else (PNG, CMYK JPEG, ...) is re-encoded
# so every `.jpg` member decodes to RGB with any JPEG decoder.
_KEEP_MODES = ("RGB", "L")
_PIL_CHECK = threading.Lock()
_NOT_REGULAR = "not a regular file (a FIFO, device or socket)"


class BadImage(Exception):
    """An input file that cannot be packed; the message is the reason listed in the manifest."""


class Readable(Protocol):
    """What an image inside another file (an archive member) offers: its bytes, or BadImage."""

    def read(self) -> bytes: ...


_HEAD_BYTES = 1 << 16  # enough for any image header but a JPEG with large APP segments before its frame


def max_file_bytes(max_pixels: int) -> int:
    """The largest input file pack reads: an uncompressed image of `max_pixels` 16-bit RGBA pixels, plus 1 MiB."""
    return max_pixels * 8 + (1 << 20)


def _check_head(head: bytes, max_pixels: int) -> None:
    """Refuse, from the file's first bytes, what is not an image or is over the pixel cap."""
    try:
        open_image(head, max_pixels)
    except BadImage as exc:
        if str(exc) == "not an image" or str(exc).startswith("too large"):
            raise
        # a header running past the first bytes (large metadata): judged once the file is read


def read_bytes(path: str | Readable | None, data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The bytes of an input image; only regular files are read (a FIFO would block, /dev/zero never ends).

    Before the file is read whole, its size (stat) and its header are checked: a file larger than any
    image under `max_pixels` could be, one that is not an image and one over the cap are refused first.
    """
    if data is not None:
        return data
    if not isinstance(path, str):  # a member of an archive (shard_tools.sources.archive_files.ArchiveMember)
        return path.read()
    try:
        # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; fstat then rejects it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(os.stat(path).st_mode):  # a socket cannot even be opened
                raise BadImage(_NOT_REGULAR) from None
        raise BadImage(f"unreadable: {exc.strerror or exc}") from None
    with open(descriptor, "rb") as handle:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise BadImage(_NOT_REGULAR)
        if info.st_size > max_file_bytes(max_pixels):
            raise BadImage(f"too large: {info.st_size} bytes, more than an image of at most {max_pixels} pixels "
                           "holds (see --max-pixels)")
        try:
            head = handle.read(_HEAD_BYTES)
            if len(head) == _HEAD_BYTES:
                _check_head(head, max_pixels)
            return head + handle.read()
        except OSError as exc:
            raise BadImage(f"unreadable: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _own_pixel_cap():
    """PIL's global bomb check off while a header is parsed: our cap, checked next, is the only one."""
    with _PIL_CHECK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_image(raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image with only its header parsed; raises BadImage when it holds more than `max_pixels`
    pixels, so a decompression bomb is refused without decoding a pixel."""
    if not raw:
        raise BadImage("empty file")
    try:
        with _own_pixel_cap():
            image = Image.open(io.BytesIO(raw))
    except Image.UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError, struct_error, Image.DecompressionBombError) as exc:
        raise BadImage(f"corrupt or truncated: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"too large: {width}x{height} pixels, over the cap of {max_pixels} (see --max-pixels)")
    return image


def inspect(raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, bool]:
    """(width, height, is a keepable JPEG) after decoding the whole stream; raises BadImage.

    The pixel cap is checked from the header first. JPEGs decode at 1/8 scale (DCT scaling) which
    still reads every entropy-coded byte, so a truncated or corrupt file fails here at a fraction
    of the cost of a full decode.
    """
    image = open_image(raw, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            size = image.size
            keep = image.format == "JPEG" and image.mode in _KEEP_MODES
            if image.format == "JPEG":
                image.draft(image.mode, (1, 1))
            image.load()
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, struct_error, Warning) as exc:
        raise BadImage(f"corrupt or truncated: {exc}") from None
    if size[0] < 1 or size[1] < 1:
        raise BadImage("empty image")
    return size[0], size[1], keep


def target_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The stored size: the longer side at most max_side, aspect kept."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def needs_encoding(width: int, height: int, keepable: bool, max_side: int | None) -> bool:
    return not keepable or target_size(width, height, max_side) != (width, height)


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _decode_bgr(raw: bytes, size: tuple[int, int], target: tuple[int, int]) -> np.ndarray | None:
    """OpenCV decode, letting libjpeg shrink by 2, 4 or 8 on the way when the target allows it.

    EXIF orientation is ignored, as for images kept byte for byte: pixels stay as stored.
    """
    factor = next((f for f in (8, 4, 2) if -(-size[0] // f) >= target[0] and -(-size[1] // f) >= target[1]), 1)
    flags = _REDUCED.get(factor, cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
    return cv2.imdecode(np.frombuffer(raw, np.uint8), flags)


def encode_for_shard(raw: bytes, max_side: int | None, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The `.jpg` member: the original bytes when they already fit, else a resized RGB JPEG."""
    image = open_image(raw, max_pixels)  # the file may have changed since it was checked
    try:
        width, height = image.size
        keepable = image.format == "JPEG" and image.mode in _KEEP_MODES
        if not needs_encoding(width, height, keepable, max_side):
            return raw
        target = target_size(width, height, max_side)
        pixels = _decode_bgr(raw, (width, height), target)
        if pixels is None:  # a format PIL reads and OpenCV does not
            pixels = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
        if (pixels.shape[1], pixels.shape[0]) != target:
            # Area averaging: the usual filter for shrinking (and faster than PIL's bicubic).
            pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise BadImage("could not be encoded as JPEG")
        return encoded.tobytes()
    except (OSError, SyntaxError, ValueError, struct_error, cv2.error, Image.DecompressionBombError) as exc:
        raise BadImage(f"corrupt or truncated: {exc}") from None
