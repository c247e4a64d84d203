"""A run's written record: metrics.csv (one row per log step or evaluation), report.json, curves.png.

Only the main process writes; every file is written under a temporary name and renamed when
complete, so a crash or a full disk never leaves half a file. metrics.csv is rewritten that way
with each new row (a few thousand short rows even for ImageNet: cheap) and is trimmed back to the
resumed step when a run continues from a checkpoint, so no row is ever duplicated.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mt_scale.errors import MtScaleError, os_error_message

METRICS_NAME = "metrics.csv"
REPORT_NAME = "report.json"
CURVES_NAME = "curves.png"

# Training rows fill the loss/LR/throughput columns, evaluation rows the error columns.
METRIC_FIELDS = (
    "step",
    "epoch",
    "kind",
    "loss",
    "class_loss",
    "consistency_loss",
    "logit_distance_loss",
    "teacher_class_loss",
    "consistency_weight",
    "lr",
    "images_per_sec",
    "student_top1_error",
    "student_top5_error",
    "student_loss",
    "teacher_top1_error",
    "teacher_top5_error",
    "teacher_loss",
)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary name in the same folder, then rename.

    An OS error (no permission, no space) removes the temporary file and raises MtScaleError naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MtScaleError(
            f"{path}: cannot be written ({os_error_message(exc)}); choose a writable run.output_dir with free space"
        ) from None


def prepare_run_dir(run_dir: Path, *, remove: tuple[str, ...] = ()) -> Path | None:
    """Create `run_dir` and delete the files or folders named in `remove` from it.

    Returns the topmost folder this created (None if `run_dir` existed), for cleanup when the run
    fails. An OS error is one MtScaleError naming `run_dir`.
    """
    import shutil

    missing = [path for path in (run_dir, *run_dir.parents) if not os.path.lexists(path)]
    created = missing[-1] if missing else None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in remove:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    except OSError as exc:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise MtScaleError(
            f"{run_dir}: cannot create the run folder ({os_error_message(exc)}); "
            "choose a writable run.output_dir (--set run.output_dir=DIR)"
        ) from None
    return created


def written(path: Path, write: Callable[[], Any]) -> Any:
    """`write()`, with an OS error or a library's write failure turned into one line naming `path`."""
    try:
        return write()
    except MtScaleError:
        raise
    except Exception as exc:
        reason = os_error_message(exc) if isinstance(exc, OSError) else str(exc).splitlines()[0]
        raise MtScaleError(
            f"{path}: cannot be written ({reason}); free space in or choose another run.output_dir, "
            "then finish the run with --resume"
        ) from None


class MetricsWriter:
    """Rows with the fixed METRIC_FIELDS columns in `run_dir/metrics.csv`, rewritten whole per row."""

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_NAME
        self._rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            # Rows past the checkpoint were written by the killed run; the resumed run writes them again.
            self._rows = [row for row in _raw_rows(self.path) if _step_at_most(row, resume_step)]
        self._save()

    def write(self, row: Mapping[str, object]) -> None:
        clean = {}
        for key, value in row.items():
            if isinstance(value, float):
                value = f"{value:.6g}"
            clean[key] = "" if value is None else str(value)
        self._rows.append(clean)
        self._save()

    def _save(self) -> None:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write_text(self.path, buffer.getvalue())

    def close(self) -> None:
        """Nothing to release: every row is on disk once `write` returns."""


def _raw_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MtScaleError(
            f"{path}: cannot be read as the run's metrics log ({exc}); move it away to start the log afresh "
            "(the checkpoint does not need it)"
        ) from None


def _step_at_most(row: dict[str, str], step: int) -> bool:
    try:
        return float(row.get("step") or "nan") <= step
    except ValueError:
        return False


def read_metrics(path: str | Path) -> list[dict[str, float | str | None]]:
    """metrics.csv as a list of dicts: numbers as float (step and epoch too), blanks as None."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, float | str | None] = {}
            for key, value in raw.items():
                if value in ("", None):
                    row[key] = None
                elif key == "kind":
                    row[key] = value
                else:
                    row[key] = float(value)
            rows.append(row)
    return rows


def write_report(run_dir: str | Path, report: Mapping[str, object]) -> Path:
    path = Path(run_dir) / REPORT_NAME
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    return path


def best_errors(rows: list[dict]) -> dict[str, float | None]:
    """Lowest student/teacher top-1 and top-5 error over all evaluation rows."""
    best: dict[str, float | None] = {}
    for name in ("student_top1_error", "student_top5_error", "teacher_top1_error", "teacher_top5_error"):
        values = [row[name] for row in rows if row.get("kind") == "eval" and row.get(name) is not None]
        best[name] = min(values) if values else None
    return best


def plot_curves(run_dir: str | Path, title: str = "") -> Path:
    """curves.png: training losses (left) and student/teacher top-1 error (right) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_NAME)
    train_rows = [row for row in rows if row.get("kind") == "train"]
    eval_rows = [row for row in rows if row.get("kind") == "eval"]
    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("loss", "total"),
        ("class_loss", "class (student)"),
        ("teacher_class_loss", "class (teacher)"),
        ("consistency_loss", "consistency"),
    ):
        points = [(row["step"], row[key]) for row in train_rows if _finite(row.get(key))]
        if points and any(value for _, value in points):
            loss_ax.plot(*zip(*points, strict=True), label=label)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("training losses")
    loss_ax.legend()
    for key, label, style in (
        ("student_top1_error", "student top-1", "-"),
        ("teacher_top1_error", "teacher top-1", "-"),
        ("student_top5_error", "student top-5", ":"),
        ("teacher_top5_error", "teacher top-5", ":"),
    ):
        points = [(row["step"], row[key]) for row in eval_rows if _finite(row.get(key))]
        if points:
            error_ax.plot(*zip(*points, strict=True), style, marker="o", markersize=3, label=label)
    error_ax.set_xlabel("step")
    error_ax.set_ylabel("val error")
    error_ax.set_ylim(0, 1)
    error_ax.set_title("validation error")
    error_ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = run_dir / CURVES_NAME
    tmp = run_dir / f".{CURVES_NAME}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _finite(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def flat_hparams(config: dict, prefix: str = "") -> dict[str, Any]:
    # TensorBoard's hparams take scalars and strings only.
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def eval_line(step: int, result: dict[str, float]) -> str:
    return (
        f"step {step}: student top-1 error {result['student_top1_error']:.4f}, "
        f"teacher top-1 error {result['teacher_top1_error']:.4f}"
    )


def build_report(
    cfg: Any,
    run_dir: Path,
    state: Any,
    final: Mapping[str, float],
    *,
    total_steps: int,
    wall_seconds: float,
    world_size: int,
    device: str,
    export_path: Path,
    num_classes: int,
) -> dict[str, Any]:
    """report.json's content; `state` is the TrainState, `final` the last evaluation."""
    rows = read_metrics(Path(run_dir) / METRICS_NAME)
    model_name = cfg.model.name
    return {
        "preset": cfg.preset,
        "method": "mean_teacher" if cfg.mt.enabled else "supervised",
        "run_dir": str(run_dir),
        "steps": state.step,
        "total_steps": total_steps,
        "epochs": cfg.run.epochs,
        "world_size": world_size,
        "device": device,
        "mixed_precision": cfg.run.mixed_precision,
        "lr": cfg.optim.lr,  # the peak LR used: optim.lr x processes x grad_accum_steps
        "wall_seconds": round(wall_seconds, 3),
        "train_seconds": round(state.train_seconds, 3),
        "images_seen": state.images_seen,
        "images_per_sec": state.images_seen / state.train_seconds if state.train_seconds else None,
        "final": {key: final.get(key) for key in ERROR_KEYS},
        "best": best_errors(rows),
        "val_count": final.get("val_count"),
        "class_names": state.class_names,
        "export": {
            "file": str(export_path),
            "model_name": model_name,
            "num_classes": num_classes,
            "load": (
                f"import mt_scale, timm; timm.create_model({model_name!r}, num_classes={num_classes}, "
                f"pretrained=True, pretrained_cfg_overlay=dict(file={str(export_path)!r}, "
                f"num_classes={num_classes}))"
            ),
        },
    }


ERROR_KEYS = (
    "student_top1_error",
    "student_top5_error",
    "teacher_top1_error",
    "teacher_top5_error",
    "student_loss",
    "teacher_loss",
)


def summary_line(report: dict[str, Any]) -> str:
    final = report["final"]
    return (
        f"done: {report['steps']} steps in {report['wall_seconds']:.1f}s "
        f"({report['images_per_sec'] or 0:.0f} img/s); teacher top-1 error {final['teacher_top1_error']:.4f}, "
        f"student {final['student_top1_error']:.4f}; teacher exported to {report['export']['file']}"
    )
