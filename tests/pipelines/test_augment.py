"""Augmentation specs and the shared matrix composition, checked against hand-derived values and torchvision."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from pipelines.augment import (
    AUGMENT_PRESETS,
    LUMA,
    ColourParams,
    GeometryParams,
    colour_matrix,
    geometry_matrix,
    get_spec,
    hue_matrix,
    sample_colour,
    sample_crop_box,
    sample_geometry,
)
from pipelines.errors import PipelineError
from pipelines.rendering import jpeg_size, render_views


def apply(matrix: np.ndarray, x: float, y: float) -> tuple[float, float]:
    out = matrix @ np.array([x, y, 1.0])
    return float(out[0]), float(out[1])


def test_presets_follow_the_reference():
    train, evaluation = AUGMENT_PRESETS["imagenet-train"], AUGMENT_PRESETS["imagenet-eval"]
    assert train.output_size == (224, 224) and train.rotation_degrees == 10 and train.hflip
    assert train.crop_scale == (0.08, 1.0) and train.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert (train.brightness, train.contrast, train.saturation, train.hue) == (0.4, 0.4, 0.4, 0.1)
    assert evaluation.eval_resize == 256 and evaluation.output_size == (224, 224) and not evaluation.is_random
    cifar = AUGMENT_PRESETS["cifar-train"]
    assert cifar.translate_px == 4 and cifar.reflect_pad and cifar.hflip and cifar.output_size == (32, 32)
    assert not AUGMENT_PRESETS["digits-train"].hflip  # digits are not mirror-symmetric
    assert {"cifar-eval", "digits-eval", "digits-train", "none"} <= set(AUGMENT_PRESETS)
    assert get_spec("none", (32, 32)).output_size == (32, 32)
    with pytest.raises(PipelineError, match="unknown"):
        get_spec("imagenet-trian")


def test_geometry_crop_flip_shift_and_rotation_map_points_as_derived():
    # a 100x50 box at (10, 20) onto 50x25: the box's pixel-edge corners land on the output's
    m = geometry_matrix(GeometryParams(0.0, (10, 20, 100, 50), False, (0, 0)), 200, 100, (25, 50))
    assert apply(m, 10 - 0.5, 20 - 0.5) == pytest.approx((-0.5, -0.5))
    assert apply(m, 110 - 0.5, 70 - 0.5) == pytest.approx((49.5, 24.5))
    # the flip mirrors pixel x to W-1-x; the shift moves by whole pixels
    m = geometry_matrix(GeometryParams(0.0, (0, 0, 32, 32), True, (3, -2)), 32, 32, (32, 32))
    assert apply(m, 0, 0) == pytest.approx((31 + 3, -2))
    # rotation is about the image centre (pixel-edge centre 16,16 = pixel coordinate 15.5)
    m = geometry_matrix(GeometryParams(90.0, (0, 0, 32, 32), False, (0, 0)), 32, 32, (32, 32))
    assert apply(m, 15.5, 15.5) == pytest.approx((15.5, 15.5))
    x, y = apply(m, 15.5 + 10, 15.5)
    assert (x, y) == pytest.approx((15.5, 15.5 - 10))  # +x goes up on screen: counter-clockwise


def test_random_resized_box_stays_inside_with_reference_ranges():
    spec = AUGMENT_PRESETS["imagenet-train"]
    rng = np.random.default_rng(0)
    for _ in range(300):
        x0, y0, w, h = sample_crop_box(spec, 500, 375, rng)
        assert 0 <= x0 and 0 <= y0 and x0 + w <= 500 and y0 + h <= 375
        assert 0.08 * 500 * 375 * 0.9 <= w * h <= 500 * 375
    params = [sample_geometry(spec, 500, 375, rng) for _ in range(300)]
    assert all(abs(p.angle) <= 10 for p in params) and 100 < sum(p.flip for p in params) < 200


def test_eval_view_matches_torchvision_resize_and_centre_crop():
    # a smooth image keeps interpolation differences (antialias) out of the comparison
    yy, xx = np.mgrid[0:375, 0:500]
    image = np.stack([xx * 255 / 500, yy * 255 / 375, (xx + yy) * 255 / 875], -1).astype(np.uint8)
    data = cv2.imencode(".png", image[:, :, ::-1])[1].tobytes()
    out = np.zeros((3, 224, 224), np.uint8)
    assert render_views(data, (get_spec("imagenet-eval"),), np.random.default_rng(0), (out,))
    ref = np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(Image.fromarray(image))).transpose(2, 0, 1)
    assert np.abs(out.astype(int) - ref).mean() < 0.6


@pytest.mark.parametrize("factor_name", ["brightness", "contrast", "saturation"])
def test_colour_matrix_matches_torchvision_adjustments(factor_name):
    rng = np.random.default_rng(1)
    pixels = rng.integers(40, 200, (16, 16, 3)).astype(np.uint8)
    mean_rgb = pixels.reshape(-1, 3).mean(0)
    params = ColourParams(**{factor_name: 0.7})
    mine = cv2.transform(pixels, colour_matrix(params, mean_rgb))
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    ref = getattr(TF, f"adjust_{factor_name}")(tensor, 0.7).permute(1, 2, 0).numpy()
    assert np.abs(mine.astype(int) - ref.astype(int)).max() <= 1


def test_colour_matrix_closed_forms():
    mean = np.array([100.0, 120.0, 80.0])
    assert colour_matrix(ColourParams(), mean) == pytest.approx(np.hstack([np.eye(3), np.zeros((3, 1))]))
    flat = colour_matrix(ColourParams(brightness=1.5, contrast=0.0), mean)  # every pixel -> 1.5 * mean grey
    assert flat[:, :3] == pytest.approx(np.zeros((3, 3)))
    assert flat[:, 3] == pytest.approx(np.full(3, 1.5 * LUMA @ mean))
    hue = hue_matrix(0.25)
    assert hue @ np.array([90.0, 90, 90]) == pytest.approx([90, 90, 90])  # greys stay grey
    assert LUMA @ hue == pytest.approx(LUMA, abs=2e-3)  # and luma is kept
    assert hue_matrix(0.5) @ hue_matrix(0.5) == pytest.approx(np.eye(3), abs=1e-9)


def test_sample_colour_ranges():
    spec = AUGMENT_PRESETS["imagenet-train"]
    rng = np.random.default_rng(2)
    draws = [sample_colour(spec, rng) for _ in range(500)]
    for name, low, high in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.6, 1.4),
                            ("hue", -0.1, 0.1)):
        values = np.array([getattr(d, name) for d in draws])
        assert low <= values.min() < low + 0.05 and high - 0.05 < values.max() <= high
    assert sample_colour(AUGMENT_PRESETS["cifar-train"], rng) is None


def test_jpeg_header_size_and_reduced_decode_keep_the_geometry():
    yy, xx = np.mgrid[0:960, 0:1280]
    image = np.stack([xx * 255 / 1280, yy * 255 / 960, np.full_like(xx, 128)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    assert jpeg_size(data) == (1280, 960)
    # eval of a 1280x960 image shrinks 3.75x: decoded at 1/2 scale, the view must match a full decode
    spec = get_spec("imagenet-eval")
    out = np.zeros((3, 224, 224), np.uint8)
    render_views(data, (spec,), np.random.default_rng(0), (out,))
    ref = np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(Image.open(io.BytesIO(data)))).transpose(2, 0, 1)
    assert np.abs(out.astype(int) - ref).mean() < 1.5
