"""A run's written record: metrics.csv, report.json, curves.png, trackers; metric names in one place.

Only the main process writes, each file under a temporary name then renamed (docs/design.md).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mt_scale import run_folder
from mt_scale.errors import MtScaleError, os_error_message
from mt_scale.evaluate import SCORE_NAMES
from mt_scale.losses import LOSS_NAMES
from mt_scale.run_folder import prepare_run_dir as prepare_run_dir
from mt_scale.run_folder import release_run_dir as release_run_dir
from shard_tools.files import atomic_output, atomic_write

if TYPE_CHECKING:
    from accelerate import Accelerator
    from matplotlib.figure import Figure

    from mt_scale.checkpoint import TrainState
    from mt_scale.config import Config

METRICS_NAME = "metrics.csv"
REPORT_NAME = "report.json"
CURVES_NAME = "curves.png"
TENSORBOARD_DIR = "tensorboard"
TRACKER_PROJECT = "mt-scale"  # the project (wandb), experiment (mlflow) or run name of other trackers
MODELS = ("student", "teacher")


def loss_column(name: str) -> str:
    """The metrics column of a loss term: "total" -> "loss", "class" -> "class_loss"."""
    return "loss" if name == "total" else f"{name}_loss"


# Training rows fill the loss/LR/throughput columns, evaluation rows the score columns; all derived
# from the loss terms (losses.LOSS_NAMES) and the scores (evaluate.SCORE_NAMES) of each model.
TRAIN_COLUMNS = (*map(loss_column, LOSS_NAMES), "consistency_weight", "lr", "images_per_sec")
EVAL_COLUMNS = tuple(f"{model}_{score}" for model in MODELS for score in SCORE_NAMES)
ERROR_COLUMNS = tuple(column for column in EVAL_COLUMNS if column.endswith("_error"))
METRIC_FIELDS = ("step", "epoch", "kind", *TRAIN_COLUMNS, *EVAL_COLUMNS)


def open_run_dir(accelerator: Accelerator, run_dir: Path, *, resuming: bool) -> Path | None:
    """Create and lock `run_dir` (mt_scale.run_folder.open_run_dir), clearing the files a run writes
    when it is a new run; returns the topmost folder this created, None if it existed."""
    from mt_scale.checkpoint import EXPORT_NAME

    leftovers = (METRICS_NAME, REPORT_NAME, CURVES_NAME, EXPORT_NAME, TENSORBOARD_DIR)
    return run_folder.open_run_dir(accelerator, run_dir, resuming=resuming, leftovers=leftovers)


def write_or_fail(path: Path, write: Callable[[], Any]) -> Any:
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
        atomic_write(self.path, buffer.getvalue())

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
    atomic_write(path, json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    return path


def best_errors(rows: list[dict]) -> dict[str, float | None]:
    """Lowest student/teacher top-1 and top-5 error over all evaluation rows."""
    best: dict[str, float | None] = {}
    for name in ERROR_COLUMNS:
        values = [row[name] for row in rows if row.get("kind") == "eval" and row.get(name) is not None]
        best[name] = min(values) if values else None
    return best


def plot_curves(run_dir: str | Path, title: str = "") -> Path:
    """curves.png from the run's metrics.csv (see `curves_figure`)."""
    run_dir = Path(run_dir)
    return save_figure(curves_figure(read_metrics(run_dir / METRICS_NAME), title=title), run_dir / CURVES_NAME)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG under a temporary name, then rename; the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_output(path) as temp:
            fig.savefig(temp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


# Loss terms drawn in curves.png and their legend labels.
PLOTTED_LOSSES = {"total": "total", "class": "class (student)", "teacher_class": "class (teacher)",
                  "consistency": "consistency"}  # fmt: skip


def curves_figure(rows: list[dict], title: str = "") -> Figure:
    """Training losses (left) and student/teacher top-1 and top-5 error (right) against step.

    The error axis runs from 0 to a little above the highest error drawn (errors of 0.03 fill it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [row for row in rows if row.get("kind") == "train"]
    eval_rows = [row for row in rows if row.get("kind") == "eval"]
    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in PLOTTED_LOSSES.items():
        key = loss_column(name)
        points = [(row["step"], row[key]) for row in train_rows if _finite(row.get(key))]
        if points and any(value for _, value in points):
            loss_ax.plot(*zip(*points, strict=True), label=label)
    loss_ax.set(xlabel="step", ylabel="loss", title="training losses")
    loss_ax.legend()
    highest = 0.0
    for top, style in (("top1", "-"), ("top5", ":")):
        for model in MODELS:
            key = f"{model}_{top}_error"
            points = [(row["step"], row[key]) for row in eval_rows if _finite(row.get(key))]
            if points:
                error_ax.plot(*zip(*points, strict=True), style, marker="o", markersize=3,
                              label=f"{model} top-{top[-1]}")  # fmt: skip
                highest = max(highest, *(value for _, value in points))
    error_ax.set(xlabel="step", ylabel="val error", title="validation error")
    error_ax.set_ylim(0, min(1.0, highest * 1.15) if highest > 0 else 1.0)
    error_ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


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
    cfg: Config,
    run_dir: Path,
    state: TrainState,
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
        "final": {key: final.get(key) for key in EVAL_COLUMNS},
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


def summary_line(report: dict[str, Any]) -> str:
    final = report["final"]
    return (
        f"done: {report['steps']} steps in {report['wall_seconds']:.1f}s "
        f"({report['images_per_sec'] or 0:.0f} img/s); teacher top-1 error {final['teacher_top1_error']:.4f}, "
        f"student {final['student_top1_error']:.4f}; teacher exported to {report['export']['file']}"
    )


def trackers(log_with: str, run_dir: Path) -> list[Any]:
    """Accelerate's `log_with` for `run.log_with` ("tensorboard", "wandb,mlflow", ..., or "none").

    Each name must be a tracker Accelerate knows and whose package is installed; TensorBoard writes
    to run_dir/tensorboard, the others get the project name TRACKER_PROJECT.
    """
    from accelerate import tracking
    from accelerate.utils import LoggerType

    names = [name.strip() for name in log_with.split(",") if name.strip()]
    if names == ["none"]:
        return []
    known = [kind.value for kind in LoggerType if kind.value != "all"]
    installed = {str(kind) for kind in tracking.get_available_trackers()}
    for name in names or [""]:
        if name not in known:
            raise MtScaleError(
                f"run.log_with={log_with!r}: {name!r} is not a tracker; use {', '.join(known)} "
                "(comma-separated) or none"
            )
        if name not in installed:
            raise MtScaleError(
                f"run.log_with={log_with!r}: the {name} package is not installed; pip install {name}, or set "
                "run.log_with=tensorboard"
            )
    if "tensorboard" in names:
        quiet_writer_thread_errors()
    return [tracking.TensorBoardTracker(TENSORBOARD_DIR, str(run_dir)) if name == "tensorboard" else name
            for name in dict.fromkeys(names)]  # fmt: skip


def quiet_writer_thread_errors() -> None:
    """Drop the traceback Python prints when TensorBoard's writer thread fails (a full disk): the thread
    keeps the error and the training loop's next write raises it, where it becomes the run's one line."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "keeps_writer_errors", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        thread = args.thread
        if type(thread).__name__ == "_AsyncWriterThread" and getattr(thread, "exception", None) is args.exc_value:
            return  # recorded on the thread; raised again in the training loop
        previous(args)

    hook.keeps_writer_errors = True  # type: ignore[attr-defined]
    threading.excepthook = hook
