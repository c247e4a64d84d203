"""Console entry points: `mt-train` (the training loop) and `mt-bench` (the benchmarks).

`mt-train ARGS` runs one process, exactly `accelerate launch -m mt_scale.train ARGS` with a
single-process configuration; for several processes, GPUs or nodes use `accelerate launch` with
its own flags or config file (docs/multinode.md) and the same ARGS.
"""

from __future__ import annotations

import sys


def train_main(argv: list[str] | None = None) -> int:
    try:
        from mt_scale.train import main
    except KeyboardInterrupt:  # Ctrl-C while torch is still importing: one line, as in training
        print("mt-train: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return main(sys.argv[1:] if argv is None else argv)


def bench_main(argv: list[str] | None = None) -> int:
    from mt_scale.bench import main

    return main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(train_main())
