"""mt-bench: time each stage of the system beside the alternative a user would otherwise run.

    mt-bench pack|pipeline|train|ema|all [--json FILE] [--repeats N] ...

Every figure is measured `--repeats` times, interleaved with its baseline, and reported as median,
min and max. The JSON file holds the machine description, library versions, the settings and the
list `results` ({name, unit, median, min, max, repeats, values, detail}); a table goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mt_scale.bench_common import describe_machine, figure, library_versions

# The targets this project holds itself to on its 2-core CPU machine (see docs/performance.md).
TARGETS = (
    ("pipeline/best_vs_reference", ">=", 3.0, "best backend at least 3x the reference-style loader"),
    ("pipeline/best_vs_ceiling", ">=", 0.35, "best backend at least 35% of the decode-only ceiling"),
    ("train/step_ratio", "<=", 1.45, "Mean Teacher step at most 1.45x a supervised step"),
    ("ema/speedup", ">=", 1.25, "fused EMA update at least 1.25x faster than the per-parameter loop"),
)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, e.g. 500x375") from None
    if width < 8 or height < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: images need at least 8x8 pixels")
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


# Stage options that `mt-bench all` does not expose: it runs every stage with these.
STAGE_DEFAULTS = {
    "max_side": 256,
    "pipeline_batch_size": 64,
    "labeled_per_batch": 16,
    "backends": "dali,torch",
    "train_model": None,  # resnet18 on CPU, resnet152 on a GPU
    "image_size": None,  # 64 on CPU, 224 on a GPU
    "train_batch_size": 64,
    "train_labeled": None,  # a quarter of the batch
    "steps": 6,
    "precision": "auto",
    "ema_model": "resnet152",
    "updates": 8,
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    common.add_argument("--repeats", type=_positive, default=3, help="timed repeats per figure (default 3)")
    common.add_argument("--work-dir", type=Path, help="keep generated inputs here (default: a temp dir)")
    common.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--images", type=Path, help="an ImageFolder-style tree of JPEGs instead of generated ones"
    )
    data.add_argument("--count", type=_positive, default=1000, help="generated images (default 1000)")
    data.add_argument("--size", type=_size, default=(500, 375), help="generated image size WxH (500x375)")
    data.add_argument("--workers", type=_positive, help="processes for 'all workers' (default: usable cores)")
    data.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    plot = argparse.ArgumentParser(add_help=False)
    plot.add_argument("--plot", type=Path, help="write a PNG bar chart of the pipeline comparison")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="train/ema device")

    parser = argparse.ArgumentParser(prog="mt-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", parents=[common, data], help="packing vs a plain TarWriter loop")
    pack.add_argument(
        "--max-side",
        type=_positive,
        default=STAGE_DEFAULTS["max_side"],
        help="--max-side of the resizing variants (default 256)",
    )
    pipe = sub.add_parser("pipeline", parents=[common, data, plot], help="two-view loaders vs the reference")
    pipe.add_argument("--batch-size", dest="pipeline_batch_size", type=_positive, default=64)
    pipe.add_argument("--labeled-per-batch", type=_positive, default=16)
    pipe.add_argument("--backends", default="dali,torch", help="comma-separated backends (dali,torch)")
    pipe.add_argument("--source", choices=("local", "s3"), default="local",
                      help="s3: each backend from a local moto S3 server vs local disk (needs moto[server])")
    train = sub.add_parser("train", parents=[common, device], help="Mean Teacher step vs supervised step")
    train.add_argument("--model", dest="train_model", help="timm model (default resnet18 CPU, resnet152 GPU)")
    train.add_argument("--image-size", type=_positive, help="input resolution (default 64 CPU, 224 GPU)")
    train.add_argument("--batch-size", dest="train_batch_size", type=_positive, default=64)
    train.add_argument(
        "--labeled-per-batch",
        dest="train_labeled",
        type=_positive,
        help="labeled rows per batch (default a quarter)",
    )
    train.add_argument(
        "--steps",
        type=_positive,
        default=STAGE_DEFAULTS["steps"],
        help="timed steps of each kind per repeat (default 6)",
    )
    train.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: fp32 on CPU, bf16 + channels-last on a GPU",
    )
    ema = sub.add_parser("ema", parents=[common, device], help="fused EMA update vs the per-parameter loop")
    ema.add_argument(
        "--model", dest="ema_model", default="resnet152", help="model whose parameters are averaged"
    )
    ema.add_argument(
        "--updates",
        type=_positive,
        default=STAGE_DEFAULTS["updates"],
        help="timed updates of each kind per repeat (default 8)",
    )
    every = sub.add_parser("all", parents=[common, data, plot, device], help="every stage with default sizes")
    every.set_defaults(**STAGE_DEFAULTS)
    return parser


def _derived_pipeline(results: list[dict]) -> list[dict]:
    """Best backend vs the reference and vs the ceiling, per repeat (the contenders ran interleaved)."""
    by_name = {result["name"]: result for result in results}
    baselines = ("pipeline/reference", "pipeline/decode_ceiling")
    backends = [r for r in results if r["name"] not in baselines and not r["name"].endswith("_normalized")]
    if not backends or "pipeline/reference" not in by_name:
        return []
    best = max(backends, key=lambda r: r["median"])
    derived = [
        figure(
            "pipeline/best_vs_reference",
            "x",
            [b / r for b, r in zip(best["values"], by_name["pipeline/reference"]["values"], strict=True)],
            best=best["name"],
        )
    ]
    if "pipeline/decode_ceiling" in by_name:
        derived.append(
            figure(
                "pipeline/best_vs_ceiling",
                "fraction",
                [
                    b / c
                    for b, c in zip(best["values"], by_name["pipeline/decode_ceiling"]["values"], strict=True)
                ],
                best=best["name"],
            )
        )
    return derived


def run_pack(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    from mt_scale.bench_data import bench_pack, prepare_tree

    tree = prepare_tree(args.images, work_dir, args.count, args.size, args.seed)
    return bench_pack(tree, work_dir, args.repeats, args.max_side, args.workers)


def run_pipeline(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    from mt_scale.bench_data import bench_pipeline, prepare_tree

    tree = prepare_tree(args.images, work_dir, args.count, args.size, args.seed)
    backends = tuple(name.strip() for name in args.backends.split(",") if name.strip())
    if getattr(args, "source", "local") == "s3":
        from mt_scale.bench_s3 import bench_s3_source

        return bench_s3_source(tree, work_dir, args.repeats, args.pipeline_batch_size, args.labeled_per_batch,
                               args.workers, backends)
    results = bench_pipeline(
        tree,
        work_dir,
        args.repeats,
        batch_size=args.pipeline_batch_size,
        labeled_per_batch=args.labeled_per_batch,
        workers=args.workers,
        backends=backends,
    )
    return results + _derived_pipeline(results)


def run_train(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    from mt_scale.bench_model import bench_train

    return bench_train(
        model_name=args.train_model,
        image_size=args.image_size,
        batch_size=args.train_batch_size,
        labeled_per_batch=args.train_labeled,
        steps=args.steps,
        repeats=args.repeats,
        device=args.device,
        precision=args.precision,
    )


def run_ema(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    from mt_scale.bench_model import bench_ema

    return bench_ema(args.ema_model, args.updates, args.repeats, args.device)


STAGES = {"pack": run_pack, "pipeline": run_pipeline, "train": run_train, "ema": run_ema}


def check_targets(results: list[dict]) -> list[dict]:
    """Each target whose figure was measured, with its median and whether it holds."""
    by_name = {result["name"]: result for result in results}
    checks = []
    for name, op, threshold, text in TARGETS:
        if name in by_name:
            value = by_name[name]["median"]
            holds = value >= threshold if op == ">=" else value <= threshold
            checks.append(
                {
                    "figure": name,
                    "target": text,
                    "threshold": f"{op} {threshold}",
                    "median": value,
                    "holds": holds,
                }
            )
    return checks


def format_table(results: list[dict], markdown: bool = False) -> str:
    """The figures as an aligned text table, or as a Markdown table (for docs/performance.md)."""
    rows = [("figure", "unit", "median", "min", "max", "n")]
    for r in results:
        numbers = (f"{r[k]:,.3g}" if r[k] < 10 else f"{r[k]:,.0f}" for k in ("median", "min", "max"))
        rows.append((f"`{r['name']}`" if markdown else r["name"], r["unit"], *numbers, str(r["repeats"])))
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|---|---|---:|---:|---:|---:|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_pipeline(results: list[dict], path: Path, title: str = "") -> None:
    """Horizontal bars of two-view images/s (median, with min-max whiskers) for every loader."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["decode_ceiling", "torch", "torch_normalized", "dali", "dali_normalized", "reference"]
    bars = [r for name in order for r in results if r["name"] == f"pipeline/{name}"]
    labels = {
        "decode_ceiling": "decode-only ceiling\n(PIL, no augmentation)",
        "reference": "reference loader (float views)\nImageFolder + PIL, transform x2",
    }
    for backend in ("torch", "dali"):
        labels[backend] = f"mt-scale {backend} backend\n(uint8 views)"
        labels[f"{backend}_normalized"] = f"mt-scale {backend} backend\n+ normalize (float views)"
    fig, ax = plt.subplots(figsize=(8, 0.9 * len(bars) + 1.2))
    medians = [r["median"] for r in bars]
    errors = [[r["median"] - r["min"] for r in bars], [r["max"] - r["median"] for r in bars]]

    def colour(name: str) -> str:
        if name.endswith(("ceiling", "reference")):
            return "#999999" if name.endswith("ceiling") else "#c44e52"
        return "#8fa9d4" if name.endswith("_normalized") else "#4c72b0"

    colors = [colour(r["name"]) for r in bars]
    ax.barh(range(len(bars)), medians, xerr=errors, color=colors, capsize=4)
    ax.set_yticks(range(len(bars)), [labels[r["name"].split("/", 1)[1]] for r in bars])
    ax.invert_yaxis()
    for index, value in enumerate(medians):
        ax.text(bars[index]["max"], index, f"  {value:,.0f}", va="center")
    ax.set_xlabel("training images/s (two augmented views each; decode ceiling: one decode)")
    ax.set_xlim(0, max(r["max"] for r in bars) * 1.18)
    ax.set_title(title or "Two-view ImageNet-style loading")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name("." + path.name + ".partial.png")
    fig.savefig(temp, dpi=110)
    plt.close(fig)
    os.replace(temp, path)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name("." + path.name + ".partial")
    temp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temp, path)


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    stages = list(STAGES) if args.command == "all" else [args.command]
    started = time.perf_counter()
    report = {
        "tool": "mt-bench",
        "command": "mt-bench " + " ".join(argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "libraries": library_versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [],
    }
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="mt-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        for stage in stages:
            report["results"].extend(STAGES[stage](args, work_dir))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    report["targets"] = check_targets(report["results"])
    with contextlib.suppress(OSError):  # other work on a shared machine skews figures: record it
        report["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from mt_scale.errors import MtScaleError
    from pipelines.errors import PipelineError
    from shard_tools.format import ShardFormatError

    try:
        report = run(args, argv)
    except (MtScaleError, PipelineError, ShardFormatError) as exc:
        print(f"mt-bench: {exc}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "plot", None) and any(r["name"].startswith("pipeline/") for r in report["results"]):
            machine = report["machine"]
            where = ", ".join(machine["gpus"]) or f"{machine['usable_cores']}-core CPU, no GPU"
            plot_pipeline(report["results"], args.plot, title=f"Two-view ImageNet-style loading ({where})")
        if args.json:
            write_json(report, args.json)
    except OSError as exc:
        print(
            f"mt-bench: cannot write {exc.filename}: {exc.strerror}; choose a writable --json/--plot path",
            file=sys.stderr,
        )
        return 2
    print(format_table(report["results"], markdown=args.markdown))
    for check in report["targets"]:
        verdict = "holds" if check["holds"] else "MISSED"
        print(f"target {check['figure']} {check['threshold']}: median {check['median']:.3g} -> {verdict}")
    written = f"; wrote {args.json}" if args.json else ""
    print(f"mt-bench {args.command}: {len(report['results'])} figures in {report['elapsed_s']} s{written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
