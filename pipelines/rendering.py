"""Reading by sample on the CPU, shared by both backends: a reader's draws and the OpenCV render of a draw.

`Draws` gives one reader's samples in their seeded order with a fresh generator per draw and skips what
does not decode; `render_views` decodes a JPEG once and renders each view (the torch backend's
workers). The DALI backend's readers use the same `Draws` and hand the bytes to the DALI graph.
Nothing here imports torch: DALI's reader processes import this module.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import cv2
import numpy as np

from pipelines.augment import AugmentSpec, colour_matrix, geometry_matrix, sample_colour, sample_geometry
from pipelines.errors import PipelineError
from pipelines.mixing import draw_rng, seed_for
from pipelines.reading import Sample, Split, draws
from shard_tools.format import DEFAULT_MAX_PIXELS
from shard_tools.imaging import BadImage, open_image

# OpenCV decodes to BGR; this column permutation makes a colour matrix read BGR and write RGB
_BGR_TO_RGB = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.float64)
# EXIF orientation is ignored by both backends (the header size must match the pixels): the packer
# writes upright pixels
_REDUCED_FLAGS = {r: flag | cv2.IMREAD_IGNORE_ORIENTATION for r, flag in (
    (1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
    (8, cv2.IMREAD_REDUCED_COLOR_8))}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the JPEG header (SOFn marker) without decoding; None if not found."""
    pos, end = 2, len(data)
    if data[:2] != b"\xff\xd8":
        return None
    while pos + 9 < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            return width, height
        pos += 2 + length
    return None


UNUSABLE = "its image does not decode, or holds more pixels than data.max_pixels"


def _view_scale(matrix: np.ndarray) -> float:
    """How many output pixels one source pixel spans (the larger axis), from the 2x3 matrix."""
    return float(max(np.hypot(matrix[0, 0], matrix[1, 0]), np.hypot(matrix[0, 1], matrix[1, 1])))


def render_views(data: bytes, specs: Sequence[AugmentSpec], rng: np.random.Generator,
                 outs: Sequence[np.ndarray], max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Decode `data` once and write one view per spec into `outs` (each 3,H,W uint8).

    Returns False (writing nothing) when the bytes do not decode as an image, or when the header says
    the image holds more than `max_pixels` pixels (checked before any pixel is decoded).
    """
    if not data:
        return False
    size = jpeg_size(data)
    if size is None:  # not a JPEG header we read: PIL reads the header of any other format
        try:
            size = open_image(data, max_pixels).size
        except BadImage:  # over the cap, or not an image at all
            return False
    if size[0] * size[1] > max_pixels:
        return False
    image = None
    if size is None:  # not a baseline/progressive JPEG header we can read: plain full decode
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_FLAGS[1])
        if image is None:
            return False
        size = (image.shape[1], image.shape[0])
    width, height = size
    geometry = [sample_geometry(spec, width, height, rng) for spec in specs]
    matrices = [geometry_matrix(g, width, height, spec.output_size) for g, spec in zip(geometry, specs, strict=True)]
    if image is None:
        # largest power-of-two DCT reduction that keeps every view at or above its output resolution
        reduction, scale = 1, max(_view_scale(m) for m in matrices)
        while reduction < 8 and scale * reduction * 2 <= 1.0:
            reduction *= 2
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_FLAGS[reduction])
        if image is None:
            return False
        if reduction > 1:
            offset = (reduction - 1) / 2  # reduced pixel i covers full-size pixels r*i .. r*i + r - 1
            up = np.array([[reduction, 0, offset], [0, reduction, offset], [0, 0, 1.0]])
            matrices = [m @ up for m in matrices]
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    for spec, matrix, out in zip(specs, matrices, outs, strict=True):
        _render_one(image, spec, matrix, rng, out)
    return True


def _render_one(image: np.ndarray, spec: AugmentSpec, matrix: np.ndarray, rng: np.random.Generator,
                out: np.ndarray) -> None:
    out_h, out_w = spec.output_size
    if image.shape[:2] == (out_h, out_w) and matrix.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]:
        view = image
    else:
        border = cv2.BORDER_REFLECT_101 if spec.reflect_pad else cv2.BORDER_CONSTANT
        view = cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=border,
                              borderValue=(0, 0, 0))
    colour = sample_colour(spec, rng)
    if colour is not None:
        mean_rgb = np.array(cv2.mean(view)[2::-1])
        transform = colour_matrix(colour, mean_rgb)
        transform[:, :3] = transform[:, :3] @ _BGR_TO_RGB
        view = cv2.transform(view, transform)  # saturating uint8, already RGB
    else:
        view = view[:, :, ::-1]
    if spec.noise_std:
        noisy = view.astype(np.float32) + rng.normal(0.0, spec.noise_std * 255.0, view.shape).astype(np.float32)
        view = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    out[...] = view.transpose(2, 0, 1)



def _shard_names(split: Split, samples: range) -> str:
    shards = [split.shards[number] for number, _, _ in split.pieces(samples)]
    return shards[0] + (f" (and {len(shards) - 1} more shards)" if len(shards) > 1 else "")


class Draws:
    """One worker's draws from one split: samples in a seeded order, a fresh generator per draw.

    The generator of draw i is draw_rng(stream seed, i): a pure function of the position in the
    stream, so a resumed worker that skips i draws without decoding renders draw i exactly as before.
    """

    def __init__(self, split: Split, samples: range, seed: tuple, shuffle_buffer: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.split, self.samples, self.stream_seed = split, samples, seed_for(*seed, "view")
        self.max_pixels = max_pixels
        self._stream = draws(split, samples, (*seed, "order"), shuffle_buffer, cycle=True)
        self.position = 0  # draws so far, undecodable ones included
        self.skipped = 0  # undecodable draws so far
        self._failures = 0  # undecodable draws since the last good one

    def _next(self) -> Sample:
        try:
            sample = next(self._stream)
        except StopIteration:
            raise PipelineError(f"the {self.split.name} split gives this reader no samples; re-pack the set") from None
        self.position += 1
        return sample

    def skip_to(self, position: int) -> None:
        while self.position < position:
            self._next()

    def render(self, specs: Sequence[AugmentSpec], outs: Sequence[np.ndarray]) -> tuple[str, int]:
        """Render the next decodable draw into `outs`; (key, label)."""
        while True:
            key, data, label = self._next()
            if render_views(data, specs, draw_rng(self.stream_seed, self.position - 1), outs, self.max_pixels):
                self._failures = 0
                return key, label
            self.skip_undecodable(key)

    def skip_undecodable(self, key: str) -> None:
        """Count draw `key` as skipped (the next draw takes its place); one line once nothing decodes."""
        self.skipped += 1
        self._failures += 1
        # two passes' worth of consecutive failures always holds a whole pass: nothing here decodes
        if self._failures >= 2 * len(self.samples):
            raise PipelineError(
                f"{_shard_names(self.split, self.samples)}: none of the {len(self.samples)} {self.split.name} "
                "images this reader holds decodes; check the set with `mt-shard verify --decode` and re-pack it")
        if self._failures <= 3:
            warnings.warn(f"skipping sample {key!r}: {UNUSABLE}", stacklevel=1)
