"""`python -m mt_scale.bench.gpu gpu ...` and `mt-bench gpu ...`: the parts in order, the parser, the exit status."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mt_scale.bench import gpu as kit
from mt_scale.bench.gpu.common import one_line, release_memory
from mt_scale.bench.gpu.dali_checks import part_dali_checks
from mt_scale.bench.gpu.data import part_data
from mt_scale.bench.gpu.install import missing_modules, prepare_wheels
from mt_scale.bench.gpu.plan import DRY_PLAN, GPU_PLAN, Context, Plan
from mt_scale.bench.gpu.report import Report, describe_machine, markdown
from mt_scale.bench.gpu.steps import part_compile, part_steps
from mt_scale.bench.gpu.timing import part_ema, part_end_to_end, part_loader, part_summary
from mt_scale.bench.gpu.training import part_mt_train
from mt_scale.errors import MtScaleError

# In order: correctness first, then the figures, torch.compile last (its time decides what fits the budget).
PARTS: tuple[tuple[str, Callable[[Context], None]], ...] = (
    ("data", part_data), ("dali_checks", part_dali_checks), ("loader", part_loader), ("steps", part_steps),
    ("ema", part_ema), ("end_to_end", part_end_to_end), ("mt_train", part_mt_train),
    ("compile", part_compile),
    ("summary", part_summary),
)  # fmt: skip


def run_part(ctx: Context, name: str, part: Callable[[Context], None]) -> None:
    """Run one part; a failure becomes a failed check `part/<name>` and the next part runs."""
    start = time.perf_counter()
    try:
        part(ctx)
    except Exception as exc:  # one failing part must not cost the figures of the others
        ctx.report.check(
            f"part/{name}", False, error=one_line(exc), traceback=traceback.format_exc()[-3000:]
        )
        print(f"mt-bench gpu: part {name} failed: {one_line(exc)}", file=sys.stderr, flush=True)
    finally:
        ctx.report.timings_s[name] = time.perf_counter() - start
        release_memory()
        ctx.report.save()
    print(
        f"mt-bench gpu: {name} done in {time.perf_counter() - start:.0f} s "
        f"({ctx.report.elapsed():.0f} s so far)",
        file=sys.stderr,
        flush=True,
    )


def run_check(
    plan: Plan,
    *,
    json_path: Path | None = None,
    markdown_path: Path | None = None,
    work_dir: Path | None = None,
    parts: tuple[str, ...] = (),
) -> Report:
    """Every part of `plan` (or the named `parts`), in order; the report is saved after each."""
    absent = missing_modules()
    if absent:
        raise MtScaleError(
            f"this Python lacks {', '.join(absent)}: put their wheels in .whl/ and run make gpu-check "
            "(docs/performance.md, GPU check)"
        )
    import torch

    if not plan.dry_run and not torch.cuda.is_available():
        raise MtScaleError(
            "no CUDA GPU is visible to torch; run `mt-bench gpu --dry-run` for the CPU rehearsal"
        )
    unknown = sorted(set(parts) - {name for name, _ in PARTS})
    if unknown:
        raise MtScaleError(
            f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(n for n, _ in PARTS)}"
        )
    report = Report(plan, json_path, markdown_path, machine=describe_machine(plan))
    report.save()
    work = Path(tempfile.mkdtemp(prefix="mt-gpu-check-")) if work_dir is None else work_dir
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(report, plan, work)
    try:
        for name, part in PARTS:
            if not parts or name in parts or name == "data":  # the other parts need its data
                run_part(ctx, name, part)
    finally:
        report.machine["load_1min_end"] = round(os.getloadavg()[0], 2)
        report.save()
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mt-bench gpu", description=kit.__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same code on the CPU with tiny sizes (GPUs hidden): proves the kit, measures nothing",
    )
    parser.add_argument("--json", type=Path, help="write the figures as JSON here (after every part)")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument(
        "--work-dir", type=Path, help="keep generated images, shards and runs here (default: removed)"
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        metavar="DIR",
        help="first join split wheels in DIR and pip-install, offline, those this Python lacks",
    )
    parser.add_argument(
        "--target", type=Path, metavar="DIR", help="with --wheels: install into DIR (pip --target)"
    )
    parser.add_argument("--install-only", action="store_true", help="with --wheels: install, then stop")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds the run may take; torch.compile parts that would "
        "overrun it are skipped (default 420 on a GPU, 600 in the dry run)",
    )
    parser.add_argument(
        "--parts", default="", help=f"comma-separated subset of: {', '.join(n for n, _ in PARTS)}"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`mt-bench gpu ...` and `python -m mt_scale.bench.gpu gpu ...`: 0 all checks passed, 1 a check failed,
    2 a user error (one line), 130 Ctrl-C. Goals missed are reported, not failed."""
    from shard_tools.errors import run_cli

    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list[1:] if args_list[:1] == ["gpu"] else args_list)
    interrupted = "interrupted (Ctrl-C); the JSON holds the parts that finished"
    return run_cli("mt-bench gpu", lambda: _main(args), interrupted=interrupted)


def _main(args: argparse.Namespace) -> int:
    if args.wheels is not None:
        prepare_wheels(args.wheels, target=args.target)
    if args.install_only:
        return 0
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget is not None:
        plan = replace(plan, budget_s=args.budget)
    if plan.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the same CPU rehearsal on any machine
    else:
        os.environ.setdefault(
            "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
        )  # before CUDA starts: deterministic resume
    for path in (args.json, args.markdown):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    parts = tuple(p for p in args.parts.split(",") if p)
    report = run_check(
        plan, json_path=args.json, markdown_path=args.markdown, work_dir=args.work_dir, parts=parts
    )
    data = report.as_dict()
    print(markdown(data), end="")
    return 0 if data["all_checks_passed"] else 1
