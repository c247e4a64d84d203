"""DALI's training and eval views held to the augmentation spec, on the GPU (tests marked `gpu`).

The batch structure (both views, labels, the val mask) on the device; the eval view against the
torch backend's, image by image; the training view's geometry measured on a coordinate pattern
(crop area against the spec's own sampler, aspect, rotation, flip rate) and its colour on a pattern
of flat patches (brightness, contrast, saturation, hue each within range and uniform over it). The
estimators and judges are checked on CPU against known warps and colour maps.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from pipelines import DataConfig, build_loaders
from pipelines.augment import (
    AugmentSpec,
    ColourParams,
    GeometryParams,
    colour_matrix,
    geometry_matrix,
    get_spec,
    sample_crop_box,
)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GEOMETRY_SIZE = (512, 384)  # (width, height) of the coordinate pattern; not square, so a swapped axis shows
COLOUR_VIEW = (96, 288)  # the colour pattern's 3 x 9 patches, 32 output pixels each
COLOUR_LEVELS = (70, 110, 150)  # 27 mid-range colours: most stay unclamped under +-40% jitter
STAT_VIEWS, STAT_BATCH = 512, 64

YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))  # luma + chroma (IQ) axes


def ks_two_sample(a: Any, b: Any) -> float:
    """Kolmogorov-Smirnov distance between two samples' empirical distributions."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate([a, b])
    return float(
        np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    )


def ks_uniform(values: Any, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance of a sample from the uniform distribution on [low, high]."""
    x = np.sort(np.asarray(values, dtype=float))
    cdf = np.clip((x - low) / (high - low), 0.0, 1.0)
    ranks = np.arange(1, len(x) + 1) / len(x)
    return float(max((ranks - cdf).max(), (cdf - ranks + 1 / len(x)).max()))


def ks_limit(n: int, m: int | None = None) -> float:
    """The KS distance a sample of n (against m, or an exact law) exceeds by chance with p ~ 0.001."""
    return 1.95 * math.sqrt(1 / n + (1 / m if m else 0.0))


def view_geometry(view: Any, width: int, height: int) -> tuple[float, float, bool, float] | None:
    """(crop area / image area, crop aspect w/h, flipped, rotation degrees) of one CHW view of the
    coordinate pattern, from a least-squares affine fit of source coordinates over output pixels."""
    red, green, blue = (channel.astype(np.float64) for channel in view)
    inside = (
        (blue > 64) & (red > 2) & (red < 253) & (green > 2) & (green < 253)
    )  # not fill, not a clamped end
    if inside.mean() < 0.25:
        return None
    out_h, out_w = red.shape
    ys, xs = np.nonzero(inside)
    design = np.stack([xs, ys, np.ones(len(xs))], axis=1).astype(np.float64)
    fx = np.linalg.lstsq(design, red[inside] / 255 * width, rcond=None)[0]
    fy = np.linalg.lstsq(design, green[inside] / 255 * height, rcond=None)[0]
    determinant = fx[0] * fy[1] - fx[1] * fy[0]
    area = abs(determinant) * out_w * out_h / (width * height)
    aspect = math.hypot(fx[0], fy[0]) * out_w / (math.hypot(fx[1], fy[1]) * out_h)
    return float(area), float(aspect), bool(determinant < 0), math.degrees(math.atan2(-fx[1], fy[1]))


def _patch_means(view: Any) -> Any:
    cell = view.shape[1] // 3
    inner = slice(cell // 5, cell - cell // 5)
    return np.array(
        [
            view[:, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell][:, inner, inner]
            .reshape(3, -1)
            .mean(1)
            for r in range(3)
            for c in range(9)
        ]
    )


def view_colour(view: Any, plain: Any) -> tuple[float, float, float, float, float] | None:
    """(brightness, contrast, saturation, hue in turns, fit residual) of one jittered view of the colour
    pattern, given the same view without jitter: fit out = M rgb + t over the unclamped patches, then
    M = b*c * hue(h) saturation(s) (luma gain b*c; the chroma block in YIQ is s times a rotation by h)
    and t = b*(1-c) * the view's mean grey, as pipelines.augment composes them."""
    jittered, source = _patch_means(view.astype(np.float64)), _patch_means(plain.astype(np.float64))
    usable = (jittered.min(1) > 3) & (jittered.max(1) < 252)
    if usable.sum() < 8:
        return None
    design = np.concatenate([source[usable], np.ones((int(usable.sum()), 1))], axis=1)
    coef = np.linalg.lstsq(design, jittered[usable], rcond=None)[0]
    matrix, offset = coef[:3].T, coef[3]
    residual = float(np.abs(design @ coef - jittered[usable]).max())
    yiq = np.array(YIQ)
    gain = float(yiq[0] @ matrix @ np.ones(3))
    chroma = (yiq @ matrix @ np.linalg.inv(yiq))[1:, 1:] / gain
    grey = float((yiq[0] @ plain.reshape(3, -1).astype(np.float64)).mean())
    brightness = gain + float(offset.mean()) / grey
    return (
        brightness,
        gain / brightness,
        math.sqrt(abs(np.linalg.det(chroma))),
        math.atan2(chroma[0, 1], chroma[0, 0]) / (2 * math.pi),
        residual,
    )


def judge_geometry(
    found: list[tuple], views: int, spec: Any, width: int, height: int
) -> tuple[list[str], dict]:
    """What is wrong with view_geometry's estimates against `spec` (failures), and the figures (detail):
    crop area against the spec's own sampler (KS), aspect and rotation within range, flip rate ~0.5."""

    n = max(len(found), 1)
    area, aspect, flipped, angle = (
        [np.array(c, dtype=np.float64) for c in zip(*found, strict=True)] if found else [np.zeros(1)] * 4
    )
    rng = np.random.default_rng(0)
    reference = [
        w * h / (width * height)
        for _, _, w, h in (sample_crop_box(spec, width, height, rng) for _ in range(20000))
    ]
    (low, high), (narrow, wide), rotation = spec.crop_scale, spec.crop_ratio, spec.rotation_degrees
    flip_rate, ks, ks_max = float(flipped.mean()), ks_two_sample(area, reference), ks_limit(n, 20000) + 0.03
    turned = float(np.abs(angle).max())
    failures = [text for ok, text in (
        (len(found) >= 0.9 * views, f"only {len(found)} of {views} views measurable"),
        (low * 0.95 <= area.min() and area.max() <= high * 1.03,
         f"crop area {area.min():.3f}..{area.max():.3f}"),
        (ks <= ks_max, f"crop area distribution off the spec's sampler (KS {ks:.3f} > {ks_max:.3f})"),
        (narrow / 1.04 <= aspect.min() and aspect.max() <= wide * 1.04,
         f"aspect {aspect.min():.3f}..{aspect.max():.3f}"),
        (0.7 * rotation <= turned <= rotation + 0.5,
         f"rotation up to {turned:.1f} degrees (spec {rotation:g})"),
        (abs(angle.mean()) <= 4 * rotation / math.sqrt(3 * n), f"mean rotation {angle.mean():.2f} degrees"),
        (abs(flip_rate - 0.5) <= 2 / math.sqrt(n), f"flip rate {flip_rate:.3f}"),
    ) if not ok]  # fmt: skip
    return failures, {
        "views": len(found), "flip_rate": round(flip_rate, 3),
        "crop_area": f"{area.min():.3f}..{area.max():.3f} (spec {low:g}..{high:g})",
        "crop_area_ks": round(ks, 3), "crop_area_ks_limit": round(ks_max, 3),
        "aspect": f"{aspect.min():.3f}..{aspect.max():.3f} (spec {narrow:.3f}..{wide:.3f})",
        "rotation": f"{angle.min():.1f}..{angle.max():.1f} (spec +-{rotation:g})",
    }  # fmt: skip


def judge_colour(found: list[tuple], views: int, spec: Any) -> tuple[list[str], dict]:
    """What is wrong with view_colour's estimates against `spec`: each factor within its range and
    uniform over it (KS), and one affine colour map per view (fit residual)."""
    n = max(len(found), 1)
    columns = (
        [np.array(c, dtype=np.float64) for c in zip(*found, strict=True)] if found else [np.zeros(1)] * 5
    )
    failures = [] if len(found) >= 0.9 * views else [f"only {len(found)} of {views} views measurable"]
    detail: dict[str, Any] = {"views": len(found), "ks_limit": round(ks_limit(n) + 0.03, 3)}
    factors = (
        ("brightness", spec.brightness),
        ("contrast", spec.contrast),
        ("saturation", spec.saturation),
        ("hue", spec.hue),
    )
    for (name, v), values in zip(factors, columns[:4], strict=True):
        low, high, slack = (-v, v, 0.005) if name == "hue" else (max(0.0, 1 - v), 1 + v, 0.03)
        ks = ks_uniform(values, low, high)
        detail[name] = f"{values.min():.3f}..{values.max():.3f} (spec {low:g}..{high:g}), KS {ks:.3f}"
        if values.min() < low - slack or values.max() > high + slack or ks > ks_limit(n) + 0.03:
            failures.append(f"{name} {detail[name]}")
    detail["fit_residual"] = round(float(columns[4].max()), 2)
    if columns[4].max() > 3.0:
        failures.append(f"colour is not one affine map per view (residual {columns[4].max():.1f} levels)")
    return failures, detail


# ------------------------------------------------------------------ the test patterns


def coordinate_pattern(width: int, height: int) -> np.ndarray:
    """HWC uint8 image whose red channel encodes x and green encodes y (0..255 across), blue 128."""
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    image[..., 0] = np.rint((np.arange(width) + 0.5) / width * 255)[None, :]
    image[..., 1] = np.rint((np.arange(height) + 0.5) / height * 255)[:, None]
    return image


def colour_pattern(cell: int = 64) -> np.ndarray:
    """HWC uint8 image of 3 x 9 flat patches, one per colour of COLOUR_LEVELS^3."""
    image = np.zeros((3 * cell, 9 * cell, 3), dtype=np.uint8)
    colours = [(r, g, b) for r in COLOUR_LEVELS for g in COLOUR_LEVELS for b in COLOUR_LEVELS]
    for index, colour in enumerate(colours):
        row, col = divmod(index, 9)
        image[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = colour
    return image


def pattern_shards(root: Path, image: np.ndarray, quality: int) -> list[str]:
    """8 copies of `image` (two classes) packed; the labeled split's shard paths."""
    from PIL import Image

    from pipelines.reading import open_set
    from shard_tools.pack import pack

    for label in range(2):
        folder = root / "tree" / "train" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(4):
            Image.fromarray(image).save(folder / f"p{label}_{copy}.JPEG", quality=quality, subsampling=0)
    pack(root / "tree", root / "shards", label_fraction=0.5, val_fraction=0.0, workers=1, progress=False)
    return list(open_set(str(root / "shards"))[1]["train-labeled"].shards)


def pattern_views(shards: list[str], specs: tuple, count: int, device_id: int | None) -> list[np.ndarray]:
    """`count` views per spec of the pattern in `shards`, from pipelines.dali's graph."""
    from nvidia.dali.backend import TensorListGPU

    from pipelines.dali import build_pipeline

    pipe = build_pipeline(shards, specs, STAT_BATCH, shard_id=0, num_shards=1, shuffle_buffer=0, seed=7,
                          threads=4, device_id=device_id)  # fmt: skip
    outputs: list[list] = [[] for _ in specs]
    while sum(len(o) for o in outputs[0]) < count:
        produced = pipe.run()
        for index in range(len(specs)):
            out = produced[index]
            outputs[index].append((out.as_cpu() if isinstance(out, TensorListGPU) else out).as_array())
    del pipe
    return [np.concatenate(o)[:count] for o in outputs]


# ------------------------------------------------------------------ the estimators and judges, on CPU


@pytest.mark.parametrize(
    "angle, box, flip", [(7.0, (50.0, 40.0, 300.0, 200.0), True), (-4.0, (100.0, 60.0, 150.0, 180.0), False)]
)
def test_view_geometry_recovers_a_known_warp(angle: float, box: tuple, flip: bool) -> None:
    width, height = GEOMETRY_SIZE
    matrix = geometry_matrix(GeometryParams(angle, box, flip, (0, 0)), width, height, (224, 224))
    view = cv2.warpAffine(coordinate_pattern(width, height), matrix, (224, 224), flags=cv2.INTER_LINEAR)
    area, aspect, flipped, turned = view_geometry(view.transpose(2, 0, 1), width, height)
    assert area == pytest.approx(box[2] * box[3] / (width * height), rel=0.01)
    assert aspect == pytest.approx(box[2] / box[3], rel=0.01)
    assert flipped is flip and turned == pytest.approx(angle, abs=0.1)


@pytest.mark.parametrize("params", [ColourParams(1.2, 0.8, 1.3, 0.05), ColourParams(0.7, 1.3, 0.65, -0.08)])
def test_view_colour_recovers_known_factors(params: ColourParams) -> None:
    plain = cv2.resize(colour_pattern(), (288, 96), interpolation=cv2.INTER_AREA).astype(np.float64)
    matrix = colour_matrix(params, plain.reshape(-1, 3).mean(0))
    jittered = np.clip(np.rint(plain @ matrix[:, :3].T + matrix[:, 3]), 0, 255)
    brightness, contrast, saturation, hue, residual = view_colour(
        jittered.transpose(2, 0, 1), plain.transpose(2, 0, 1)
    )
    assert (brightness, contrast, saturation, hue) == pytest.approx(
        (params.brightness, params.contrast, params.saturation, params.hue), abs=0.015
    )
    assert residual < 1.0


def test_judges_pass_the_spec_and_name_what_is_off() -> None:
    spec, (width, height) = get_spec("imagenet-train"), GEOMETRY_SIZE
    rng = np.random.default_rng(1)
    boxes = [sample_crop_box(spec, width, height, rng)[2:] for _ in range(400)]
    good = [(w * h / (width * height), w / h, bool(rng.random() < 0.5), float(rng.uniform(-10, 10)))
            for w, h in boxes]  # fmt: skip
    assert judge_geometry(good, 400, spec, width, height)[0] == []
    never_flipped = [(a, r, False, t) for a, r, _, t in good]
    assert [f for f in judge_geometry(never_flipped, 400, spec, width, height)[0] if "flip rate" in f]
    whole_image = [(1.0, r, f, t) for _, r, f, t in good]
    assert any("crop area distribution" in f for f in judge_geometry(whole_image, 400, spec, width, height)[0])
    colour = [(*rng.uniform(0.6, 1.4, 3), float(rng.uniform(-0.1, 0.1)), 0.5) for _ in range(400)]
    assert judge_colour(colour, 400, spec)[0] == []
    no_brightness = [(1.0, *rest) for _, *rest in colour]
    failures = judge_colour(no_brightness, 400, spec)[0]
    assert len(failures) == 1 and failures[0].startswith("brightness")
    assert judge_colour(colour[:300], 400, spec)[0] == ["only 300 of 400 views measurable"]


# ------------------------------------------------------------------ DALI on the GPU


def photo_config(**overrides: Any) -> DataConfig:
    values = dict(batch_size=16, labeled_per_batch=4, student_aug="imagenet-train", teacher_aug="imagenet-train",
                  eval_aug="imagenet-eval", workers=4, shuffle_buffer=64, eval_batch_size=16, seed=0)  # fmt: skip
    return DataConfig(**{**values, **overrides})


@pytest.mark.gpu
@needs_gpu
def test_gpu_dali_batches_are_both_views_labels_and_the_val_mask_on_the_device(photo_shards: Path) -> None:
    pytest.importorskip("nvidia.dali")
    loaders = build_loaders(photo_shards, photo_config(), backend="dali")
    batch, val = next(iter(loaders.train)), next(iter(loaders.val))
    for view in ("student", "teacher"):
        assert tuple(batch[view].shape) == (16, 3, 224, 224)
        assert batch[view].dtype == torch.uint8 and batch[view].device.type == "cuda"
    label = batch["label"]
    assert label.dtype == torch.int64 and tuple(label.shape) == (16,)
    assert bool(((label[:4] >= 0) & (label[:4] < loaders.num_classes)).all()) and bool((label[4:] == -1).all())
    assert sum(not torch.equal(s, t) for s, t in zip(batch["student"], batch["teacher"], strict=True)) >= 14
    assert tuple(val["image"].shape) == (16, 3, 224, 224) and val["image"].device.type == "cuda"
    assert val["valid"].dtype == torch.bool and int(val["valid"].sum()) == 16


@pytest.mark.gpu
@needs_gpu
def test_gpu_dali_eval_view_matches_the_torch_backend(photo_shards: Path) -> None:
    pytest.importorskip("nvidia.dali")
    views = {}
    for backend, workers in (("dali", 4), ("torch", 0)):
        loaders = build_loaders(photo_shards, photo_config(workers=workers), backend=backend, with_keys=True)
        batch = next(iter(loaders.val))
        views[backend] = dict(zip(batch["key"], batch["image"].cpu()[batch["valid"].cpu()], strict=True))
    assert views["dali"].keys() == views["torch"].keys()
    worst = max(float((views["dali"][k].float() - image.float()).abs().mean()) for k, image in views["torch"].items())
    assert worst < 2.0, f"mean absolute difference up to {worst:.2f} grey levels"


@pytest.mark.gpu
@needs_gpu
def test_gpu_dali_training_geometry_follows_the_spec(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    spec = get_spec("imagenet-train")
    geometry_only = replace(spec, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    shards = pattern_shards(tmp_path, coordinate_pattern(*GEOMETRY_SIZE), 95)
    (views,) = pattern_views(shards, (geometry_only,), STAT_VIEWS, torch.cuda.current_device())
    found = [g for g in (view_geometry(v, *GEOMETRY_SIZE) for v in views) if g is not None]
    failures, detail = judge_geometry(found, len(views), spec, *GEOMETRY_SIZE)
    assert failures == [], detail


@pytest.mark.gpu
@needs_gpu
def test_gpu_dali_training_colour_follows_the_spec(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    spec = get_spec("imagenet-train")
    jitter = AugmentSpec(output_size=COLOUR_VIEW, brightness=spec.brightness, contrast=spec.contrast,
                         saturation=spec.saturation, hue=spec.hue)  # fmt: skip
    shards = pattern_shards(tmp_path, colour_pattern(), 100)
    views, plain = pattern_views(shards, (jitter, AugmentSpec(output_size=COLOUR_VIEW)), STAT_VIEWS,
                                 torch.cuda.current_device())  # fmt: skip
    found = [c for c in (view_colour(v, p) for v, p in zip(views, plain, strict=True)) if c is not None]
    failures, detail = judge_colour(found, len(views), spec)
    assert failures == [], detail
