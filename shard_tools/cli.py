"""`mt-shard`: pack image collections into shard sets, check them, describe them, re-split them, push them.

Sets in object storage (s3://bucket/prefix) work with pack, push, verify and info; each subcommand
imports what it needs when it runs: `info` and `verify` load neither torch nor OpenCV (boto3 only for s3://).
"""

from __future__ import annotations

import argparse
import sys

from shard_tools.errors import run_cli
from shard_tools.format import ShardFormatError


def _add_label_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("label split (one of; default: every training image labeled)")
    group.add_argument("--labels-per-class", type=int, metavar="N", help="label N training images of each class")
    group.add_argument("--label-fraction", type=float, metavar="F",
                       help="label this fraction of each class (1 = fully labeled, no unlabeled shards)")
    group.add_argument("--labels", dest="labels_file", metavar="FILE",
                       help="reuse a split: '<key or file name> <class name>' lines (e.g. a set's labels.txt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mt-shard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    pack = commands.add_parser("pack", help="pack an image tree, a file list, an archive or 'digits' into a shard set")
    pack.add_argument("source", metavar="SRC",
                      help="SRC/train/<class>/* (+ SRC/val/<class>/*), SRC/<class>/*, a '<path> <class>' list, "
                           "ILSVRC2012_img_train.tar, cifar-10-binary.tar.gz, or digits")
    pack.add_argument("out", metavar="OUT", help="the shard set folder to write (new, empty, or an unfinished pack), "
                      "or s3://bucket/prefix: packed in a local staging folder, then pushed (manifest last)")
    _add_label_options(pack)
    pack.add_argument("--val-fraction", type=float, metavar="F",
                      help="hold out this class-balanced fraction for val when SRC has no val part "
                           "(default: 0.3 for digits, 0.1 otherwise; 0 = no val)")
    pack.add_argument("--val", "--val-list", dest="val_list", metavar="VAL",
                      help="val images: a class tree, a '<path> <class>' list, or a flat archive or folder "
                           "(ILSVRC2012_img_val.tar) with --val-labels")
    pack.add_argument("--val-labels", metavar="FILE", help="classes of the --val images: '<file name> <wnid>' lines "
                      "(LOC_val_solution.csv works) or ILSVRC2012_devkit_t12.tar.gz")
    pack.add_argument("--classes", dest="classes_file", metavar="FILE",
                      help="class names in index order, one per line (default: sorted names found)")
    pack.add_argument("--max-side", type=int, metavar="PX", help="shrink so the longer side is at most PX")
    pack.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality of re-encoded images")
    pack.add_argument("--max-pixels", type=int, metavar="N",
                      help="skip input images of more than N pixels (width x height), judged from the header "
                           "before decoding (default 89478485, PIL's decompression-bomb cap; verify --decode "
                           "uses the set's cap)")
    pack.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    pack.add_argument("--shard-bytes", type=int, metavar="B", help="also cap shards at about B bytes")
    pack.add_argument("--workers", type=int, metavar="N", help="parallel processes (default: all cores)")
    pack.add_argument("--quiet", action="store_true", help="no progress bar")
    pack.add_argument("--staging", metavar="DIR",
                      help="with an s3:// OUT: pack into DIR and keep it (default: a private temporary folder, "
                           "the same for the same OUT so a rerun resumes, removed once pushed)")

    verify = commands.add_parser("verify", help="check a shard set: hashes, counts, keys, indexes, label mask")
    verify.add_argument("out", metavar="OUT", help="the shard set folder, or s3://bucket/prefix")
    verify.add_argument("--decode", action="store_true", help="also decode every image")

    info = commands.add_parser("info", help="describe a shard set")
    info.add_argument("out", metavar="OUT", help="the shard set folder, or s3://bucket/prefix")

    resplit = commands.add_parser("resplit", help="a new label split of a set, copying tar members (no decoding)")
    resplit.add_argument("out", metavar="OUT", help="the existing shard set")
    resplit.add_argument("new_out", metavar="NEWOUT", help="the new shard set folder")
    _add_label_options(resplit)
    resplit.add_argument("--shard-size", type=int, metavar="N", help="images per shard (default: as OUT)")
    resplit.add_argument("--quiet", action="store_true", help="no progress bar")

    push = commands.add_parser("push", help="upload a finished shard set to s3://bucket/prefix, manifest last")
    push.add_argument("out", metavar="SET", help="the local shard set folder")
    push.add_argument("url", metavar="URL", help="s3://bucket/prefix (endpoint and credentials: AWS_* environment)")
    push.add_argument("--workers", type=int, default=8, metavar="N", help="parallel uploads (default 8)")
    push.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _run(args: argparse.Namespace) -> int:
    from shard_tools import storage

    for location in (args.out, getattr(args, "new_out", None), getattr(args, "url", None)):
        if location is not None:
            storage.check_location(location)  # a URL that is not one is refused, not taken as a folder
    if args.command == "pack":
        options = dict(
            labels_per_class=args.labels_per_class, label_fraction=args.label_fraction,
            labels_file=args.labels_file, seed=args.seed, val_fraction=args.val_fraction, max_side=args.max_side,
            quality=args.quality, shard_size=args.shard_size, shard_bytes=args.shard_bytes, workers=args.workers,
            progress=not args.quiet, classes_file=args.classes_file, val_list=args.val_list,
            val_labels=args.val_labels,
            max_pixels=args.max_pixels,
        )
        if args.out.startswith("s3://"):
            from shard_tools.pack_s3 import pack_to_s3

            packed, pushed, kept = pack_to_s3(args.source, args.out, staging=args.staging, **options)
            print(packed.line())
            print(pushed.line() + (f"; local copy kept in {kept}" if kept else "; staging folder removed"))
            return 0
        if args.staging:
            raise ShardFormatError(f"--staging {args.staging}: only with an s3:// OUT; {args.out} is written in place")
        from shard_tools.pack import pack

        print(pack(args.source, args.out, **options).line())
        return 0
    if args.command == "verify":
        from shard_tools.verify import verify

        problems = verify(args.out, decode=args.decode, progress=True)
        for problem in problems:
            print(problem)
        print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 0 if not problems else 1
    if args.command == "info":
        from shard_tools.info import describe

        print(describe(args.out))
        return 0
    if args.command == "push":
        from shard_tools.push import push

        print(push(args.out, args.url, workers=args.workers, progress=not args.quiet).line())
        return 0
    from shard_tools.resplit import resplit

    summary = resplit(
        args.out, args.new_out, labels_per_class=args.labels_per_class, label_fraction=args.label_fraction,
        labels_file=args.labels_file, seed=args.seed, shard_size=args.shard_size, progress=not args.quiet,
    )
    print(summary.line())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    what = {"pack": "run the same command again to resume",
            "resplit": f"nothing was written to {getattr(args, 'new_out', '')}; run the same command again to "
                       "start over"}.get(args.command, "nothing was changed")
    return run_cli(f"mt-shard {args.command}", lambda: _run(args), interrupted=f"interrupted; {what}")


if __name__ == "__main__":
    sys.exit(main())
