"""Console entry points and their argument parsers: `mt-train` and `mt-bench`. Nothing imports this module.

`mt-train ARGS` runs one process, exactly `accelerate launch -m mt_scale.train ARGS` with a
single-process configuration; for several processes, GPUs or nodes use `accelerate launch` with
its own flags or config file (docs/multinode.md) and the same ARGS. `python -m mt_scale.train` runs
this module as its main program (the training module does not import it back).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from shard_tools.errors import print_line, run_cli

TRAIN_INTERRUPTED = "interrupted (Ctrl-C); checkpoints already written are kept: continue with --resume"


def build_train_parser(prog: str = "mt-train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a Mean Teacher (or supervised-only) image classifier on a shard set. "
        "Many processes/GPUs/nodes: accelerate launch [flags] -m mt_scale.train <same arguments>.",
    )
    parser.add_argument("--preset", help="preset name (mt_scale/presets/*.yaml)")
    parser.add_argument("--config", help="YAML file applied over the preset")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one field, e.g. --set run.epochs=10 --set mt.enabled=false (repeatable)",
    )  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument(
        "--resume", nargs="?", const="", default=None, metavar="DIR",
        help="continue from the latest checkpoint of run.output_dir, or of DIR (a run folder or a checkpoint)",
    )  # fmt: skip
    parser.add_argument("--keep", type=int, default=None, metavar="N", help="keep the newest N checkpoints (0 = all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--stop-after-steps", type=int, default=None, metavar="N",
        help="checkpoint and stop after N optimizer steps (as if the job were pre-empted there)",
    )  # fmt: skip
    return parser


def train_main(argv: list[str] | None = None) -> int:
    """mt-train; returns the exit status.

    0: done (or stopped by --stop-after-steps); 2: a user error, one line on stderr; 130: Ctrl-C;
    143 (EXIT_PREEMPTED): SIGTERM, a checkpoint was written, continue with --resume.
    """
    args = build_train_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli("mt-train", lambda: _train(args), interrupted=TRAIN_INTERRUPTED, first_rank_only=True,
                   os_hint="choose a writable run.output_dir with free space")  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    from mt_scale.config import config_to_yaml, load_config
    from mt_scale.preemption import EXIT_PREEMPTED
    from mt_scale.train import train

    cfg = load_config(preset=args.preset, config_file=args.config, overrides=list(args.overrides))
    if args.print_config:
        sys.stdout.write(config_to_yaml(cfg))
        return 0
    result = train(cfg, resume=args.resume, keep=args.keep, progress=not args.no_progress,
                   stop_after_steps=args.stop_after_steps, handle_sigterm=True)  # fmt: skip
    if result.report.get("stopped_by") == "SIGTERM":
        report = result.report
        where = f"after step {report['stopped_at_step']}; checkpoint {report['checkpoint']} written"
        print_line("mt-train", f"stopped by SIGTERM {where}: continue with --resume", first_rank_only=True)
        return EXIT_PREEMPTED
    return 0


def add_options(
    parser: argparse.ArgumentParser, options: type, *, prefix: str = "", added: set[str] | None = None
) -> None:
    """A flag per field of the `options` dataclass; with `prefix` (mt-bench all), unshared ones are
    `--<prefix>-<name>` and defaults are those of `mt-bench all`."""
    added = set() if added is None else added
    for spec in fields(options):
        shared = spec.metadata["shared"]
        if shared and spec.name in added:
            continue
        named = f"{prefix}_{spec.name}" if prefix and not shared else spec.name
        default = spec.metadata["in_all"] if prefix else spec.default
        parser.add_argument(f"--{named.replace('_', '-')}", dest=named, default=default,
                            help=spec.metadata["help"], **spec.metadata["argparse"])  # fmt: skip
        added.add(spec.name)


def options_from(args: argparse.Namespace, options: type, *, prefix: str = "") -> Any:
    """The `options` dataclass filled from parsed arguments (`add_options` with the same prefix)."""
    values = {}
    for spec in fields(options):
        named = f"{prefix}_{spec.name}" if prefix and not spec.metadata["shared"] else spec.name
        values[spec.name] = getattr(args, named)
    return options(**values)


def build_bench_parser() -> argparse.ArgumentParser:
    """mt-bench's parser: one subcommand per stage, its flags read from the stage's options dataclass."""
    from mt_scale.bench.runner import STAGES

    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    output.add_argument("--work-dir", type=Path, help="keep generated inputs here (default: a temp dir)")
    output.add_argument("--markdown", nargs="?", const=True, default=False, type=Path, metavar="FILE",
                        help="print the table as Markdown; with FILE, also write it there")  # fmt: skip
    parser = argparse.ArgumentParser(
        prog="mt-bench",
        description="Time each stage of mt-scale beside the alternative a user would otherwise run.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, stage in STAGES.items():
        command = commands.add_parser(name, parents=[output], help=stage.help)
        add_options(command, stage.options)
        if stage.plot is not None:
            command.add_argument("--plot", type=Path, help="write a PNG chart of the stage's figures")
    every = commands.add_parser("all", parents=[output],
                                help="every stage; stage options as --<stage>-<option>")  # fmt: skip
    added: set[str] = set()
    for name, stage in STAGES.items():
        add_options(every, stage.options, prefix=name, added=added)
    every.add_argument("--plot", type=Path, help="write a PNG chart of the pipeline comparison")
    return parser


def bench_main(argv: list[str] | None = None) -> int:
    """mt-bench; returns the exit status (2: a user error or an unwritable output, one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_bench_parser().parse_args(argv)
    return run_cli("mt-bench", lambda: _bench(args, argv), os_hint="check --images and --work-dir")


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from mt_scale.bench.runner import STAGES, format_table, run_stages, write_outputs
    from mt_scale.errors import MtScaleError, os_error_message

    names = list(STAGES) if args.command == "all" else [args.command]
    prefixed = args.command == "all"
    options = {name: options_from(args, STAGES[name].options, prefix=name if prefixed else "")
               for name in names}  # fmt: skip
    plot = getattr(args, "plot", None)
    settings = {"command": args.command, "json": args.json, "plot": plot, "work_dir": args.work_dir,
                "markdown": args.markdown}  # fmt: skip
    report = run_stages(options, "mt-bench " + " ".join(argv), args.work_dir, settings)
    table = format_table(report["results"], markdown=bool(args.markdown))
    verdicts = [f"target {check['figure']} {check['threshold']}: median {check['median']:.3g} -> "
                f"{'holds' if check['holds'] else 'MISSED'}" for check in report["targets"]]  # fmt: skip
    markdown_path = args.markdown if isinstance(args.markdown, Path) else None
    try:
        write_outputs(report, args.json, plot, markdown_path, "\n".join([table, "", *verdicts]))
    except OSError as exc:
        reason = os_error_message(exc)
        raise MtScaleError(f"cannot write {reason}; choose a writable --json/--markdown/--plot path") from None
    print(table)
    for line in verdicts:
        print(line)
    written = f"; wrote {args.json}" if args.json else ""
    print(f"mt-bench {args.command}: {len(report['results'])} figures in {report['elapsed_s']} s{written}")
    return 0


if __name__ == "__main__":  # python -m mt_scale.cli, and python -m mt_scale.train through runpy
    sys.exit(train_main())
