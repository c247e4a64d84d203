"""mt-train for 30 steps with the DALI backend, then 15 + a resume of 15: the resume must be exact."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mt_scale.bench.gpu.common import one_line
from mt_scale.bench.gpu.plan import PRESET

if TYPE_CHECKING:
    from mt_scale.bench.gpu.plan import Context


@contextlib.contextmanager
def _deterministic() -> Iterator[list[str]]:
    """Deterministic kernels while the runs that must match run; yields the warnings of ops that have none."""
    import torch

    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield notes
        finally:
            notes.extend(
                sorted({one_line(w.message)[:160] for w in caught if "determinis" in str(w.message)})
            )
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
            torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def _weights_difference(a: Path, b: Path) -> tuple[float, bool]:
    """(max abs difference, bitwise equal) between two safetensors files of the same tensors."""
    import torch
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    if first.keys() != second.keys():
        return float("inf"), False
    worst, equal = 0.0, True
    for key, tensor in first.items():
        other = second[key]
        equal = equal and torch.equal(tensor, other)
        if tensor.is_floating_point():
            worst = max(
                worst, float((tensor.double() - other.double()).abs().max()) if tensor.numel() else 0.0
            )
    return worst, equal


def part_mt_train(ctx: Context) -> None:
    """mt-train (its console entry) for 30 steps with the DALI backend, then 15 + a resume of 15: the
    resumed run's teacher and student must equal the straight run's."""
    from mt_scale.checkpoint import STUDENT_NAME, TEACHER_NAME, checkpoint_dirs
    from mt_scale.cli import train_main
    from shard_tools.pack import pack
    from shard_tools.samples import write_photo_tree

    plan, work = ctx.plan, ctx.work
    tree = write_photo_tree(
        work / "train-photos",
        count=plan.train_photos,
        num_classes=plan.train_classes,
        size=plan.train_photo_size,
        seed=1,
        with_val=True,
        val_count=plan.train_val,
    )
    shards = work / "train-shards"
    pack(tree, shards, labels_per_class=plan.train_labels_per_class, seed=0, progress=False)
    overrides = [
        f"run.shards={shards}", f"model.name={plan.train_model}", f"run.mixed_precision={plan.precision}",
        "run.batch_scope=per_device", f"data.batch_size={plan.batch}",
        f"data.labeled_per_batch={plan.labeled}", "data.backend=dali", f"data.workers={plan.loader_workers}",
        f"data.eval_batch_size={plan.train_val // 2}",
        "run.epochs=3", "optim.lr=0.025", "optim.initial_lr=0.0125", "optim.lr_rampup_epochs=1",
        "optim.lr_rampdown_epochs=4", "mt.consistency_rampup_epochs=1", "run.eval_every_epochs=0",
        "run.checkpoint_every_epochs=0", "run.log_every_steps=5",
    ]  # fmt: skip
    log = io.StringIO()

    def mt_train(run_dir: Path, *extra: str) -> int:
        argv = ["--preset", PRESET, "--no-progress", *extra]
        for value in (*overrides, f"run.output_dir={run_dir}"):
            argv += ["--set", value]
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return train_main(argv)

    straight, split = work / "run-straight", work / "run-split"
    with _deterministic() as notes:
        codes = [mt_train(straight), mt_train(split, "--stop-after-steps", "15"), mt_train(split, "--resume")]
    (work / "mt-train.log").write_text(log.getvalue())
    tail = log.getvalue().strip().splitlines()[-3:]
    report_file = straight / "report.json"
    summary = json.loads(report_file.read_text()) if report_file.is_file() else {}
    ran = codes == [0, 0, 0] and summary.get("steps") == 30 and bool(checkpoint_dirs(straight))
    ctx.report.check(
        "train/mt_train_30_steps",
        ran,
        exit_codes=codes,
        steps=summary.get("steps"),
        images_per_sec=summary.get("images_per_sec"),
        backend="dali",
        model=plan.train_model,
        log_tail=" / ".join(tail),
    )
    if not ran:
        ctx.report.check(
            "train/resume_exact", False, error="mt-train did not finish; see train/mt_train_30_steps"
        )
        return
    last_straight, last_split = checkpoint_dirs(straight)[-1], checkpoint_dirs(split)[-1]
    teacher, teacher_equal = _weights_difference(last_straight / TEACHER_NAME, last_split / TEACHER_NAME)
    student, student_equal = _weights_difference(last_straight / STUDENT_NAME, last_split / STUDENT_NAME)
    ctx.report.check(
        "train/resume_exact",
        last_split.name == last_straight.name and max(teacher, student) <= 1e-6,
        checkpoints=f"{last_straight.name} vs {last_split.name}",
        teacher_max_abs_diff=teacher,
        student_max_abs_diff=student,
        bitwise_equal=teacher_equal and student_equal,
        nondeterministic_ops=notes,
        limit="max abs difference <= 1e-6",
    )
