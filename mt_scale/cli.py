"""Console entry points and their argument parsers: `mt-train`, `mt-bench` and the demo.

`mt-train ARGS` runs one process, exactly `accelerate launch -m mt_scale.train ARGS` with a
single-process configuration; for several processes, GPUs or nodes use `accelerate launch` with
its own flags or config file (docs/multinode.md) and the same ARGS.
"""

from __future__ import annotations

import argparse
import sys

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
        print_line("mt-train", f"stopped by SIGTERM after step {result.report['stopped_at_step']}; checkpoint "
                   f"{result.report['checkpoint']} written: continue with --resume", first_rank_only=True)  # fmt: skip
        return EXIT_PREEMPTED
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    from mt_scale.bench import main

    return main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(train_main())
