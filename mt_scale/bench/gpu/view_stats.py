"""What a DALI view of a test pattern shows (its crop, flip, rotation; its colour factors), and the judges
that hold those estimates to the augmentation spec (ranges and Kolmogorov-Smirnov distances)."""

from __future__ import annotations

import math
from typing import Any

YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))  # luma + chroma (IQ) axes


def ks_two_sample(a: Any, b: Any) -> float:
    """Kolmogorov-Smirnov distance between two samples' empirical distributions."""
    import numpy as np

    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate([a, b])
    return float(
        np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    )


def ks_uniform(values: Any, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance of a sample from the uniform distribution on [low, high]."""
    import numpy as np

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
    import numpy as np

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
    import numpy as np

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
    import numpy as np

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
    import numpy as np

    from pipelines.augment import sample_crop_box

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
    import numpy as np

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
