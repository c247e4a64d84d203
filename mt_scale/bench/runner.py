"""mt-bench's stages (a registry), the run of one or all of them, the targets and the results table.

Every figure is measured `--repeats` times, interleaved with its baseline, and reported as median,
min and max. The JSON file holds the machine, library versions, settings, `results` ({name, unit,
median, min, max, repeats, values, detail}) and `targets`; a table goes to stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mt_scale.bench import ema, pack, pipeline, train
from mt_scale.bench.common import describe_machine, figure, library_versions
from shard_tools.files import atomic_write


@dataclass(frozen=True)
class Stage:
    """One `mt-bench` subcommand: its options dataclass (its fields are the flags), what it runs, its plot."""

    options: type
    run: Callable[[Any, Path], list[dict]]  # (options, work dir) -> figures
    help: str
    plot: Callable[[list[dict], Path, str], None] | None = None  # --plot: a PNG of the stage's figures


# `mt-bench all` runs them in this order; a new stage is one line here.
STAGES: dict[str, Stage] = {
    "pack": Stage(pack.PackOptions, pack.run, "packing vs a plain TarWriter loop"),
    "pipeline": Stage(pipeline.PipelineOptions, pipeline.run, "two-view loaders vs the reference",
                      plot=pipeline.plot_pipeline),  # fmt: skip
    "train": Stage(train.TrainOptions, train.run,
                   "Mean Teacher step vs the plain supervised step; the training loop vs the step"),
    "ema": Stage(ema.EmaOptions, ema.run, "fused EMA update vs the per-parameter loop"),
}



@dataclass(frozen=True)
class Target:
    """A figure's goal: `figure` `op` `threshold`, judged where the figure was measured on `device`
    (None: on any device)."""

    figure: str
    op: str  # ">=" or "<="
    threshold: float
    text: str
    device: str | None = None


# The targets this project holds itself to (docs/performance.md): on the 2-core CPU machine it is
# developed on, and on one H100 or H200 GPU.
TARGETS = (
    Target("pipeline/best_vs_reference", ">=", 3.0, "best backend at least 3x the reference-style loader", "cpu"),
    Target("pipeline/best_vs_ceiling", ">=", 0.35, "best backend at least 35% of the decode-only ceiling", "cpu"),
    Target("train/step_ratio", "<=", 1.45, "Mean Teacher step at most 1.45x a supervised step", "cpu"),
    Target("ema/speedup", ">=", 1.25, "fused EMA update at least 1.25x faster than the per-parameter loop", "cpu"),
    Target("train/e2e_vs_step", ">=", 0.95, "the training loop keeps at least 95% of the bare step's rate"),
    Target("pipeline/loader_vs_step", ">=", 2.0, "the DALI loader delivers at least 2x what the step takes", "cuda"),
    Target("ema/speedup", ">=", 10.0, "fused EMA update at least 10x faster than the per-parameter loop", "cuda"),
    Target("train/graph_speedup", ">=", 1.6, "Mean Teacher step captured as CUDA graphs at least 1.6x eager",
           "cuda"),  # fmt: skip
    Target("train/mean_teacher", ">=", 1000.0,
           "Mean Teacher step (graphed) at least 1,000 img/s (resnet152, bf16, 224 px; 40 rows per device)",
           "cuda"),  # fmt: skip
    Target("loader/dali_s3_vs_local", ">=", 0.8, "DALI from s3:// at least 0.8x DALI from a local folder"),
)


def run_stages(
    options: dict[str, Any], command: str, work_dir: Path | None, settings: dict[str, Any]
) -> dict:
    """Run each stage with its options ({stage: options}); the report mt-bench writes as JSON."""
    started = time.perf_counter()
    report = {
        "tool": "mt-bench",
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "libraries": library_versions(),
        "settings": {**settings, "options": {name: dataclasses.asdict(opts) for name, opts in options.items()}},
        "results": [],
    }
    folder = work_dir or Path(tempfile.mkdtemp(prefix="mt-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for name, stage_options in options.items():
            report["results"].extend(STAGES[name].run(stage_options, folder))
    finally:
        if work_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    report["results"].extend(loader_vs_step(report["results"]))
    report["targets"] = check_targets(report["results"])
    with contextlib.suppress(OSError):  # other work on a shared machine skews figures: record it
        report["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def write_outputs(
    report: dict,
    json_path: Path | None,
    plot_path: Path | None,
    markdown_path: Path | None = None,
    markdown: str = "",
) -> None:
    """The JSON report, the Markdown table and each stage's plot, each written under a temporary name."""
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(markdown_path, markdown + "\n")
    if plot_path is not None:
        machine = report["machine"]
        where = ", ".join(machine["gpus"]) or f"{machine['usable_cores']}-core CPU, no GPU"
        for name, stage in STAGES.items():
            figures = [r for r in report["results"] if r["name"].startswith(f"{name}/")]
            if stage.plot is not None and figures:
                stage.plot(figures, plot_path, f"Two-view ImageNet-style loading ({where})")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(json_path, json.dumps(report, indent=2, default=str) + "\n")


def loader_vs_step(results: list[dict]) -> list[dict]:
    """`pipeline/loader_vs_step`: what the loader training would use delivers over what the Mean Teacher
    step takes (img/s over img/s, medians: the two stages do not run interleaved), when both ran."""
    by_name = {result["name"]: result for result in results}
    step = by_name.get("train/mean_teacher")
    loaders = [by_name[name] for name in ("pipeline/dali", "pipeline/torch") if name in by_name]
    if step is None or not loaders:
        return []
    device = step["detail"].get("device")
    loader = next((r for r in loaders if r["detail"].get("backend") == ("dali" if device == "cuda" else "torch")),
                  loaders[0])  # fmt: skip
    return [figure("pipeline/loader_vs_step", "x", [loader["median"] / step["median"]], loader=loader["name"],
                   step="train/mean_teacher", step_batch=step["detail"].get("batch_size"), device=device)]  # fmt: skip


def check_targets(results: list[dict]) -> list[dict]:
    """Each target whose figure was measured, with its median and whether it holds."""
    by_name = {result["name"]: result for result in results}
    checks = []
    for target in TARGETS:
        result = by_name.get(target.figure)
        if result is None or (target.device and result["detail"].get("device") != target.device):
            continue
        value = result["median"]
        holds = value >= target.threshold if target.op == ">=" else value <= target.threshold
        checks.append(
            {
                "figure": target.figure,
                "target": target.text,
                "threshold": f"{target.op} {target.threshold}",
                "device": result["detail"].get("device"),
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


