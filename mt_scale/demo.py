"""`make demo`: Mean Teacher against the supervised baseline on scikit-learn's digits, 50 labels, 3 seeds.

Packs the digits (5 labels per class) into runs/demo/shards unless a matching set is there,
trains the `digits-demo` preset with Mean Teacher and with `mt.enabled=false` for each seed (each
run in runs/demo/<method>-seed<N>/ with its own report.json and curves.png; the runs train side by
side, one process and one torch thread each, as many at once as there are cores), prints a table of
teacher/student top-1 error, and writes runs/demo/summary.json and runs/demo/comparison.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

from shard_tools.files import atomic_write

if TYPE_CHECKING:
    from mt_scale.config import Config

DEMO_DIR = Path("runs/demo")
PRESET = "digits-demo"
SEEDS = (0, 1, 2)
LABELS_PER_CLASS = 5
METHODS = ("mean_teacher", "supervised")
SUMMARY_NAME = "summary.json"
PLOT_NAME = "comparison.png"
TARGET_RATIO = 0.7  # Mean Teacher's teacher error at most this fraction of the baseline's, on average


def ensure_digits_shards(shard_dir: str | Path, *, progress: bool = True) -> Path:
    """The digits shard set with LABELS_PER_CLASS labels per class in `shard_dir`, packed if missing."""
    from shard_tools.format import ShardFormatError
    from shard_tools.manifest import read_manifest
    from shard_tools.pack import pack

    shard_dir = Path(shard_dir)
    try:
        manifest = read_manifest(shard_dir)
        if manifest.label_split.get("labels_per_class") == LABELS_PER_CLASS and manifest.num_classes == 10:
            return shard_dir
    except ShardFormatError:
        pass
    if shard_dir.exists():
        shutil.rmtree(shard_dir)  # a set packed with other settings, or half written
    pack("digits", shard_dir, labels_per_class=LABELS_PER_CLASS, seed=0, progress=progress)
    return shard_dir


def run_config(method: str, seed: int, shards: Path, out_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The digits-demo config of one demo run: the preset, this seed, and mt.enabled per method."""
    from mt_scale.config import load_config

    settings = [
        f"run.seed={seed}",
        f"data.seed={seed}",
        f"run.shards={shards}",
        f"run.output_dir={out_dir / f'{method}-seed{seed}'}",
        f"mt.enabled={'true' if method == 'mean_teacher' else 'false'}",
    ]
    return load_config(preset=PRESET, overrides=[*settings, *overrides])


def demo_jobs(jobs: int | None, runs: int) -> int:
    """How many runs train at once: `jobs`, or one per core this process may use; at most `runs`."""
    if jobs is None:
        from shard_tools.pack import default_workers

        jobs = default_workers()
    return max(1, min(jobs, runs))


def train_one(cfg: Config, progress: bool = False, quiet: bool = False) -> tuple[dict[str, float], float]:
    """One demo run on one torch thread: its final errors and seconds. One thread per run makes a run's
    numbers the same whether it trains alone or beside others, and on CPU it is also the fastest use
    of the cores (the demo's model is too small for a step to split well over threads). `quiet`: the
    run's own lines are not printed (runs side by side would interleave them; warnings still are)."""
    import contextlib
    import io

    import torch

    from mt_scale.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            final = train(cfg, progress=progress).report["final"]
    finally:
        torch.set_num_threads(threads)
    errors = {"teacher_top1_error": final["teacher_top1_error"], "student_top1_error": final["student_top1_error"]}
    return errors, time.perf_counter() - started


def run_demo(
    out_dir: str | Path = DEMO_DIR,
    *,
    seeds: Sequence[int] = SEEDS,
    overrides: Sequence[str] = (),
    progress: bool = True,
    jobs: int | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Train both methods for every seed, `jobs` runs at once (default: one per core, each in its own
    process); returns (and writes) the summary {seed: {method: errors}}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = ensure_digits_shards(out_dir / "shards", progress=progress)
    # Mean Teacher's runs (twice the work of a baseline's) first, so the last to start are the short ones
    configs = {(seed, method): run_config(method, seed, shards, out_dir, overrides) for method in METHODS
               for seed in seeds}
    for cfg in configs.values():
        if Path(cfg.run.output_dir).exists():
            shutil.rmtree(cfg.run.output_dir)  # a fresh run each time the demo is made
    jobs = demo_jobs(jobs, len(configs))

    def report(key: tuple[int, str], errors: dict[str, float], seconds: float) -> None:
        from tqdm import tqdm

        tqdm.write(f"seed {key[0]} {key[1]}: teacher {errors['teacher_top1_error']:.4f}, student "
              f"{errors['student_top1_error']:.4f} ({seconds:.0f}s, {configs[key].run.output_dir})")

    results: dict[tuple[int, str], dict[str, float]] = {}
    if jobs == 1:  # in this process, with each run's own progress bar
        for key, cfg in configs.items():
            results[key], seconds = train_one(cfg, progress)
            report(key, results[key], seconds)
    else:
        from tqdm import tqdm

        print(f"training {len(configs)} runs, {jobs} at a time (one process and one thread each)", flush=True)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool, \
                tqdm(total=len(configs), unit="run", disable=not progress) as bar:
            pending = {pool.submit(train_one, cfg, False, True): key for key, cfg in configs.items()}
            try:
                for future in as_completed(pending):
                    key = pending[future]
                    results[key], seconds = future.result()
                    report(key, results[key], seconds)
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # the runs under way end; no new one starts
                raise
    summary = {str(seed): {method: results[seed, method] for method in METHODS} for seed in seeds}
    atomic_write(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    plot_comparison(summary, out_dir / PLOT_NAME)
    return summary


def mean_errors(summary: dict[str, dict[str, dict[str, float]]], method: str, key: str) -> float:
    values = [runs[method][key] for runs in summary.values()]
    return sum(values) / len(values)


def teacher_error_ratio(summary: dict[str, dict[str, dict[str, float]]]) -> float:
    """Mean Teacher's mean teacher top-1 error over the supervised baseline's (the demo's target: <= 0.7)."""
    baseline = mean_errors(summary, "supervised", "teacher_top1_error")
    return mean_errors(summary, "mean_teacher", "teacher_top1_error") / max(baseline, 1e-12)


def format_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    header = f"{'seed':>6}  {'method':<13} {'teacher top-1 err':>18} {'student top-1 err':>18}"
    lines = [header, "-" * len(header)]
    for seed, runs in summary.items():
        for method in METHODS:
            errors = runs[method]
            lines.append(
                f"{seed:>6}  {method:<13} {errors['teacher_top1_error']:>18.4f} {errors['student_top1_error']:>18.4f}"
            )
    for method in METHODS:
        lines.append(
            f"{'mean':>6}  {method:<13} {mean_errors(summary, method, 'teacher_top1_error'):>18.4f} "
            f"{mean_errors(summary, method, 'student_top1_error'):>18.4f}"
        )
    return "\n".join(lines)


def plot_comparison(summary: dict[str, dict[str, dict[str, float]]], path: str | Path) -> Path:
    """Grouped bars: teacher and student top-1 error of both methods, per seed and averaged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mt_scale.report import save_figure

    groups = [*summary.keys(), "mean"]
    bars = [
        ("mean_teacher", "teacher_top1_error", "Mean Teacher: teacher", "tab:blue"),
        ("mean_teacher", "student_top1_error", "Mean Teacher: student", "lightsteelblue"),
        ("supervised", "teacher_top1_error", "supervised: EMA teacher", "tab:orange"),
        ("supervised", "student_top1_error", "supervised: student", "navajowhite"),
    ]
    positions = np.arange(len(groups))
    width = 0.2
    fig, ax = plt.subplots(figsize=(8, 4))
    highest = 0.0
    for index, (method, key, label, colour) in enumerate(bars):
        values = [summary[g][method][key] for g in groups[:-1]] + [mean_errors(summary, method, key)]
        ax.bar(positions + (index - 1.5) * width, values, width, label=label, color=colour)
        highest = max(highest, *values)
    ax.set_ylim(0, highest * 1.35 or 1.0)  # headroom for the legend above the bars
    ax.set_xticks(positions, [f"seed {g}" if g != "mean" else "mean" for g in groups])
    ax.set_ylabel("val top-1 error")
    ax.set_title(f"digits, {LABELS_PER_CLASS * 10} labels: Mean Teacher vs supervised only")
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def summary_text(summary: dict[str, dict[str, dict[str, float]]], out_dir: str | Path, seconds: float) -> str:
    """What `make demo` prints at the end: the table, the ratio against its target, the files written."""
    out_dir = Path(out_dir)
    return (
        f"\n{format_table(summary)}\n\nMean Teacher's teacher error is {teacher_error_ratio(summary):.2f}x the "
        f"supervised baseline's (target <= {TARGET_RATIO}); demo took {seconds:.0f}s\n"
        f"summary: {out_dir / SUMMARY_NAME}\nplot:    {out_dir / PLOT_NAME}"
    )


def main(argv: list[str] | None = None) -> int:
    """`make demo` (python -m mt_scale.demo): Mean Teacher vs the supervised baseline on the digits."""
    from shard_tools.errors import run_cli

    parser = argparse.ArgumentParser(prog="python -m mt_scale.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEMO_DIR), help=f"demo folder (default {DEMO_DIR})")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="runs trained at once, each in its own process on one thread (default: one per core)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        started = time.perf_counter()
        summary = run_demo(args.out, seeds=args.seeds, overrides=args.overrides, progress=not args.no_progress,
                           jobs=args.jobs)
        print(summary_text(summary, args.out, time.perf_counter() - started))
        return 0

    return run_cli("demo", run, os_hint="choose a writable --out folder with free space")


if __name__ == "__main__":  # python -m mt_scale.demo (make demo)
    sys.exit(main())
