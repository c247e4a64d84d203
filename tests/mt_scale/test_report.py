"""A run's record: metric names, the curves' error axis, the trackers passed to Accelerate."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from accelerate import tracking

from mt_scale.cli import train_main
from mt_scale.config import load_config
from mt_scale.errors import MtScaleError
from mt_scale.loss_window import LossWindow
from mt_scale.report import METRIC_FIELDS, TENSORBOARD_DIR, curves_figure, loss_column, trackers


def test_metric_columns_derive_from_the_loss_and_score_names() -> None:
    assert METRIC_FIELDS == (
        "step", "epoch", "kind", "loss", "class_loss", "consistency_loss", "logit_distance_loss",
        "teacher_class_loss", "consistency_weight", "lr", "images_per_sec", "student_top1_error",
        "student_top5_error", "student_loss", "teacher_top1_error", "teacher_top5_error", "teacher_loss",
    )  # fmt: skip
    window = LossWindow()
    window.add({"total": 3.0, "class": 1.0})
    window.add({"total": 5.0, "class": 2.0})
    assert window.means() == {"loss": 4.0, "class_loss": 1.5}
    assert loss_column("teacher_class") == "teacher_class_loss"


def eval_rows(errors: list[float]) -> list[dict]:
    return [
        {"kind": "eval", "step": float(step),
         **{f"{model}_top{k}_error": error / k for model in ("student", "teacher") for k in (1, 5)}}
        for step, error in enumerate(errors, 1)
    ]


@pytest.mark.parametrize(
    ("errors", "low", "high"), [([0.03, 0.025, 0.02], 0.03, 0.05), ([0.9, 0.6], 0.9, 1.0)]
)
def test_error_axis_is_scaled_to_the_errors(errors: list[float], low: float, high: float) -> None:
    train_row = {"kind": "train", "step": 1.0, "loss": 1.0, "class_loss": 0.5}
    fig = curves_figure([train_row, *eval_rows(errors)])
    bottom, top = fig.axes[1].get_ylim()
    plt.close(fig)
    assert bottom == 0 and low < top <= high


def test_trackers_default_to_tensorboard_in_the_run_folder(tmp_path: Path) -> None:
    assert load_config("digits-demo").run.log_with == "tensorboard"
    [tensorboard] = trackers(load_config().run.log_with, tmp_path)
    assert isinstance(tensorboard, tracking.TensorBoardTracker)
    assert (tensorboard.run_name, tensorboard.logging_dir_param) == (TENSORBOARD_DIR, str(tmp_path))
    assert trackers("none", tmp_path) == []


def test_a_tracker_not_installed_is_one_clear_line(
    digits_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(MtScaleError, match="'tensorbored' is not a tracker; use .*wandb"):
        trackers("tensorboard,tensorbored", tmp_path)
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [])  # as on a machine without wandb
    with pytest.raises(MtScaleError, match="the wandb package is not installed; pip install wandb"):
        trackers("wandb", tmp_path)
    run = tmp_path / "run"
    sets = [f"run.shards={digits_shards}", f"run.output_dir={run}", "run.log_with=wandb"]
    argv = ["--preset", "digits-demo", *(item for value in sets for item in ("--set", value))]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mt-train: error: run.log_with='wandb': the wandb package is not installed")
    assert err.count("\n") == 1 and not run.exists()
