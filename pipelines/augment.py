"""Augmentation specs (one per view) and the parameter sampling + matrix composition every backend uses.

Per view, geometry is ONE 2x3 affine matrix and colour ONE 3x4 matrix, both applied to uint8 images;
backends only apply them (OpenCV in the torch backend; the DALI graph builds the same matrices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# ITU-R 601 luma, as torchvision's rgb_to_grayscale
LUMA = np.array([0.299, 0.587, 0.114])
# RGB -> YIQ; hue is a rotation of the IQ plane, saturation a scaling of it
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)
_GREY_PROJECTION = np.outer(np.ones(3), LUMA)  # rgb -> its luma grey


@dataclass(frozen=True)
class AugmentSpec:
    """One view's augmentation. Ranges follow torchvision's argument conventions.

    output_size: (height, width) of the view, or None = the eval view's size (only for "none").
    rotation_degrees: angle uniform in [-r, r] about the image centre (RandomRotation, black corners).
    crop_scale / crop_ratio: RandomResizedCrop area fraction and aspect range; None = whole image.
    eval_resize: eval-style resize of the shorter side to this, then a centre crop of output_size
        (ignored when crop_scale is set). None with no crop_scale: the whole image resized to output_size.
    translate_px: integer shift uniform in [-t, t] per axis, in output pixels.
    reflect_pad: fill uncovered pixels by reflection (CIFAR's RandomTranslateWithReflect); else black.
    hflip: horizontal flip with probability 0.5.
    brightness / contrast / saturation: factor uniform in [max(0, 1 - v), 1 + v]; hue: shift uniform in
        [-v, v] turns (v <= 0.5), as ColorJitter.
    noise_std: Gaussian noise std on the 0..1 scale, added to the uint8 view.
    """

    output_size: tuple[int, int] | None = (224, 224)
    rotation_degrees: float = 0.0
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    eval_resize: int | None = None
    translate_px: int = 0
    reflect_pad: bool = False
    hflip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    noise_std: float = 0.0

    @property
    def is_random(self) -> bool:
        return bool(
            self.rotation_degrees or self.crop_scale or self.translate_px or self.hflip
            or self.has_colour or self.noise_std
        )

    @property
    def has_colour(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation or self.hue)


AUGMENT_PRESETS: dict[str, AugmentSpec] = {
    # the reference's ImageNet transform (mean-teacher pytorch/mean_teacher/datasets.py)
    "imagenet-train": AugmentSpec(
        output_size=(224, 224), rotation_degrees=10.0, crop_scale=(0.08, 1.0), hflip=True,
        brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
    ),
    "imagenet-eval": AugmentSpec(output_size=(224, 224), eval_resize=256),
    # the reference's CIFAR-10 transform: translate up to 4 px with reflection, flip
    "cifar-train": AugmentSpec(output_size=(32, 32), translate_px=4, reflect_pad=True, hflip=True),
    "cifar-eval": AugmentSpec(output_size=(32, 32)),
    # digits are not flip-invariant: small rotation, shift and input noise only
    "digits-train": AugmentSpec(output_size=(32, 32), rotation_degrees=10.0, translate_px=2, noise_std=0.05),
    "digits-eval": AugmentSpec(output_size=(32, 32)),
    # no augmentation: the eval view's size, whole image; student and teacher views are then equal
    "none": AugmentSpec(output_size=None),
}


def get_spec(name: str, default_size: tuple[int, int] | None = None) -> AugmentSpec:
    """The preset `name`, with output_size filled from `default_size` when the preset leaves it open."""
    from pipelines.errors import PipelineError

    if name not in AUGMENT_PRESETS:
        raise PipelineError(f"augmentation preset {name!r} unknown; choose one of {sorted(AUGMENT_PRESETS)}")
    spec = AUGMENT_PRESETS[name]
    if spec.output_size is None:
        if default_size is None:
            raise PipelineError(f"augmentation preset {name!r} needs an output size (from the eval preset)")
        spec = replace(spec, output_size=tuple(default_size))
    return spec


# ---------------------------------------------------------------- geometry
# Matrices map SOURCE pixel coordinates to OUTPUT pixel coordinates (pixel i sits at coordinate i, as
# cv2.warpAffine and DALI's warp_affine with inverse_map=False expect): rotation, random-resized crop,
# resize, flip and translation composed into one warp.


def sample_crop_box(
    spec: AugmentSpec, width: int, height: int, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) of the source region the view shows, in continuous pixel-edge coordinates."""
    out_h, out_w = spec.output_size
    if spec.crop_scale is not None:
        return _random_resized_box(spec.crop_scale, spec.crop_ratio, width, height, rng)
    if spec.eval_resize is not None:
        # torchvision Resize(int) + CenterCrop: integer resized size, rounded crop offsets
        short = spec.eval_resize
        if width <= height:
            resized_w, resized_h = short, int(short * height / width)
        else:
            resized_w, resized_h = int(short * width / height), short
        left, top = int(round((resized_w - out_w) / 2)), int(round((resized_h - out_h) / 2))
        sx, sy = width / resized_w, height / resized_h
        return (left * sx, top * sy, out_w * sx, out_h * sy)
    return (0.0, 0.0, float(width), float(height))


def _random_resized_box(scale, ratio, width, height, rng):
    # torchvision RandomResizedCrop.get_params: 10 tries, then a centre crop of clamped aspect
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        box_w = round(math.sqrt(target_area * aspect))
        box_h = round(math.sqrt(target_area / aspect))
        if 0 < box_w <= width and 0 < box_h <= height:
            x0 = int(rng.integers(0, width - box_w + 1))
            y0 = int(rng.integers(0, height - box_h + 1))
            return (float(x0), float(y0), float(box_w), float(box_h))
    in_ratio = width / height
    if in_ratio < min(ratio):
        box_w, box_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        box_w, box_h = round(height * max(ratio)), height
    else:
        box_w, box_h = width, height
    return ((width - box_w) / 2, (height - box_h) / 2, float(box_w), float(box_h))


@dataclass(frozen=True)
class GeometryParams:
    angle: float  # degrees, counter-clockwise on screen
    box: tuple[float, float, float, float]
    flip: bool
    shift: tuple[int, int]  # (dx, dy) output pixels


def sample_geometry(spec: AugmentSpec, width: int, height: int, rng: np.random.Generator) -> GeometryParams:
    """Draw one view's geometric parameters for a width x height source image."""
    angle = float(rng.uniform(-spec.rotation_degrees, spec.rotation_degrees)) if spec.rotation_degrees else 0.0
    box = sample_crop_box(spec, width, height, rng)
    flip = bool(rng.random() < 0.5) if spec.hflip else False
    t = spec.translate_px
    shift = (int(rng.integers(-t, t + 1)), int(rng.integers(-t, t + 1))) if t else (0, 0)
    return GeometryParams(angle, box, flip, shift)


def geometry_matrix(params: GeometryParams, width: int, height: int, output_size: tuple[int, int]) -> np.ndarray:
    """The 2x3 source->output affine matrix in pixel-centre coordinates."""
    out_h, out_w = output_size
    x0, y0, box_w, box_h = params.box
    # Composed by hand (this runs twice per image): in pixel-edge coordinates (pixel i covers
    # [i, i+1], so crops and resizes line up exactly) a point p goes through the rotation about the
    # image centre c, u = R (p - c) + c with R = [[cos, sin], [-sin, cos]] (y points down, so this
    # turns the picture counter-clockwise), then the crop box onto the output, v = S (u - box origin),
    # then the flip x -> out_w - x, then the shift; pixel centres sit at edge coordinate + 0.5.
    theta = math.radians(params.angle)
    cos, sin = math.cos(theta), math.sin(theta)
    cx, cy = width / 2, height / 2
    # rotation applied to the pixel-centre offset (0.5, 0.5), as a translation
    tx = cos * (0.5 - cx) + sin * (0.5 - cy) + cx
    ty = -sin * (0.5 - cx) + cos * (0.5 - cy) + cy
    sx, sy = out_w / box_w, out_h / box_h
    fx = -1.0 if params.flip else 1.0
    dx, dy = params.shift
    return np.array([
        [fx * sx * cos, fx * sx * sin, fx * sx * (tx - x0) + (out_w if params.flip else 0.0) + dx - 0.5],
        [-sy * sin, sy * cos, sy * (ty - y0) + dy - 0.5],
    ])


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0, dx], [0, 1, dy], [0, 0, 1]])


# ---------------------------------------------------------------- colour
# Colour matrices act on RGB values 0..255: out = M[:, :3] @ rgb + M[:, 3]. The steps run in the fixed
# order brightness, contrast, saturation, hue (torchvision's ColorJitter picks a random order and clamps
# between steps; the composed matrix clamps once at the end). Contrast blends towards the view's mean
# grey, as torchvision does.


@dataclass(frozen=True)
class ColourParams:
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # turns


def sample_colour(spec: AugmentSpec, rng: np.random.Generator) -> ColourParams | None:
    """Draw one view's colour factors; None when the spec has no colour jitter."""
    if not spec.has_colour:
        return None

    def factor(v: float) -> float:
        return float(rng.uniform(max(0.0, 1 - v), 1 + v)) if v else 1.0

    hue = float(rng.uniform(-spec.hue, spec.hue)) if spec.hue else 0.0
    return ColourParams(factor(spec.brightness), factor(spec.contrast), factor(spec.saturation), hue)


def colour_matrix(params: ColourParams, mean_rgb: np.ndarray) -> np.ndarray:
    """The 3x4 matrix of brightness, contrast (about the view's mean grey), saturation and hue, in order.

    `mean_rgb` is the view's mean colour before colour jitter (0..255); contrast's centre is the
    mean grey after brightness, tracked exactly because every step is affine.
    """
    b, c, s = params.brightness, params.contrast, params.saturation
    grey_mean = b * float(LUMA @ np.asarray(mean_rgb, dtype=np.float64))
    # saturation and hue map greys to greys, so contrast's offset (a grey) passes through them unchanged
    saturation = s * np.eye(3) + (1 - s) * _GREY_PROJECTION
    out = np.empty((3, 4))
    out[:, :3] = (b * c) * (hue_matrix(params.hue) @ saturation if params.hue else saturation)
    out[:, 3] = (1 - c) * grey_mean
    return out


def hue_matrix(turns: float) -> np.ndarray:
    """3x3 RGB hue rotation (a rotation of YIQ's chroma plane; keeps luma, greys stay grey)."""
    theta = 2 * math.pi * turns
    cos, sin = math.cos(theta), math.sin(theta)
    rotate = np.array([[1.0, 0, 0], [0, cos, sin], [0, -sin, cos]])  # DALI's hsv/color_twist sign
    return _YIQ_INV @ rotate @ _YIQ
