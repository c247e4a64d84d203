"""DALI's GPU pipelines checked: batch structure, the eval view against the torch backend, the training
view's geometry and colour against the augmentation spec."""

from __future__ import annotations

import traceback
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mt_scale.bench.gpu.common import data_config, one_line, release_memory
from mt_scale.bench.gpu.data import COLOUR_VIEW, GEOMETRY_SIZE
from mt_scale.bench.gpu.view_stats import judge_colour, judge_geometry, view_colour, view_geometry

if TYPE_CHECKING:
    from mt_scale.bench.gpu.plan import Context


def check_structure(ctx: Context) -> bool:
    """Both views, labels (-1 = unlabeled mask), the val batch's valid mask: shapes, dtypes, devices."""
    import torch

    from pipelines import build_loaders

    plan, problems = ctx.plan, []
    loaders = build_loaders(ctx.need_data().photo_shards, data_config(plan), backend="dali")
    batch, val = next(iter(loaders.train)), next(iter(loaders.val))
    rows, labeled, size = plan.batch, plan.labeled, (224, 224)

    def expect(condition: bool, text: str) -> None:
        if not condition:
            problems.append(text)

    for view in ("student", "teacher"):
        tensor = batch[view]
        expect(tuple(tensor.shape) == (rows, 3, *size), f"{view} shape {tuple(tensor.shape)}")
        expect(
            tensor.dtype == torch.uint8 and tensor.device.type == plan.device,
            f"{view} {tensor.dtype} on {tensor.device}",
        )
    label = batch["label"]
    expect(
        label.dtype == torch.int64 and tuple(label.shape) == (rows,),
        f"label {label.dtype} {tuple(label.shape)}",
    )
    expect(
        bool(((label[:labeled] >= 0) & (label[:labeled] < loaders.num_classes)).all()), "labeled rows' labels"
    )
    expect(bool((label[labeled:] == -1).all()), "unlabeled rows are not all -1")
    differing = sum(not torch.equal(s, t) for s, t in zip(batch["student"], batch["teacher"], strict=True))
    expect(differing >= 0.9 * rows, f"only {differing} of {rows} view pairs differ")
    image, valid = val["image"], val["valid"]
    expect(
        tuple(image.shape) == (plan.val_photos, 3, *size)
        and image.dtype == torch.uint8
        and image.device.type == plan.device,
        f"val image {tuple(image.shape)} {image.dtype} on {image.device}",
    )
    expect(valid.dtype == torch.bool and int(valid.sum()) == plan.val_photos, f"val valid mask {valid.dtype}")
    expect(val["label"].dtype == torch.int64, f"val label {val['label'].dtype}")
    return ctx.report.check(
        "dali/structure",
        not problems,
        problems=problems,
        views=f"{rows}x3x224x224 uint8 on {batch['student'].device}",
        label=f"int64 on {label.device}, {labeled} labeled then -1",
        val=f"{tuple(image.shape)} + valid mask",
    )


def check_eval_view(ctx: Context) -> bool:
    """The eval view (resize 256, centre crop 224) of DALI against the torch backend's, image by image."""
    from pipelines import build_loaders

    views = {}
    for backend, workers in (("dali", ctx.plan.loader_workers), ("torch", 0)):
        cfg = data_config(ctx.plan, workers=workers)
        batch = next(
            iter(build_loaders(ctx.need_data().photo_shards, cfg, backend=backend, with_keys=True).val)
        )
        views[backend] = dict(zip(batch["key"], batch["image"].cpu()[batch["valid"].cpu()], strict=True))
    same_keys = views["dali"].keys() == views["torch"].keys()
    differences = [
        float((views["dali"][k].float() - image.float()).abs().mean())
        for k, image in views["torch"].items()
        if k in views["dali"]
    ]
    worst = max(differences) if differences else float("inf")
    return ctx.report.check(
        "dali/eval_matches_torch",
        same_keys and worst < 2.0,
        images=len(differences),
        worst_mean_abs_diff=round(worst, 3),
        limit="< 2 grey levels per image",
    )


def _to_numpy(output: Any) -> Any:
    from nvidia.dali.backend import TensorListGPU

    return (output.as_cpu() if isinstance(output, TensorListGPU) else output).as_array()


def pattern_views(ctx: Context, shards: list[str], specs: tuple, count: int) -> list[Any]:
    """`count` views per spec of the pattern in `shards`, from pipelines.dali's graph (GPU when present)."""
    import numpy as np
    import torch

    from pipelines.dali import build_pipeline

    device_id = torch.cuda.current_device() if ctx.plan.device == "cuda" else None
    pipe = build_pipeline(
        shards,
        specs,
        ctx.plan.stat_batch,
        shard_id=0,
        num_shards=1,
        shuffle_buffer=0,
        seed=7,
        threads=ctx.plan.loader_workers,
        device_id=device_id,
    )
    outputs: list[list] = [[] for _ in specs]
    while sum(len(o) for o in outputs[0]) < count:
        produced = pipe.run()
        for index in range(len(specs)):
            outputs[index].append(_to_numpy(produced[index]))
    del pipe
    return [np.concatenate(o)[:count] for o in outputs]


def check_geometry(ctx: Context) -> bool:
    """The imagenet-train spec's geometry (colour off) on the coordinate pattern, judged against the spec."""
    from pipelines.augment import get_spec

    spec = get_spec("imagenet-train")
    geometry_only = replace(spec, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    (views,) = pattern_views(ctx, ctx.need_data().geometry_shards, (geometry_only,), ctx.plan.stat_views)
    found = [g for g in (view_geometry(v, *GEOMETRY_SIZE) for v in views) if g is not None]
    failures, detail = judge_geometry(found, len(views), spec, *GEOMETRY_SIZE)
    return ctx.report.check("dali/geometry", not failures, failures=failures, **detail)


def check_colour(ctx: Context) -> bool:
    """The imagenet-train spec's colour jitter (no geometry) on the colour pattern, judged by the spec."""
    from pipelines.augment import AugmentSpec, get_spec

    spec = get_spec("imagenet-train")
    jitter = AugmentSpec(
        output_size=COLOUR_VIEW,
        brightness=spec.brightness,
        contrast=spec.contrast,
        saturation=spec.saturation,
        hue=spec.hue,
    )
    views, plain = pattern_views(
        ctx,
        ctx.need_data().colour_shards,
        (jitter, AugmentSpec(output_size=COLOUR_VIEW)),
        ctx.plan.stat_views,
    )
    found = [c for c in (view_colour(v, p) for v, p in zip(views, plain, strict=True)) if c is not None]
    failures, detail = judge_colour(found, len(views), spec)
    return ctx.report.check("dali/colour", not failures, failures=failures, **detail)


DALI_CHECKS = (
    ("dali/structure", check_structure),
    ("dali/eval_matches_torch", check_eval_view),
    ("dali/geometry", check_geometry),
    ("dali/colour", check_colour),
)


def part_dali_checks(ctx: Context) -> None:
    for name, check in DALI_CHECKS:
        try:
            check(ctx)
        except Exception as exc:  # each check stands alone: report it failed and go on
            ctx.report.check(name, False, error=one_line(exc), traceback=traceback.format_exc()[-2000:])
        release_memory()
