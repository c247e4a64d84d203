"""The trainer end to end on the digits shard set: artefacts, exported teacher, resume, user errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import mt_scale.model  # noqa: F401  (registers our timm models)
from mt_scale.checkpoint import checkpoint_dirs
from mt_scale.cli import train_main as main
from mt_scale.config import load_config
from mt_scale.errors import MtScaleError
from mt_scale.report import METRIC_FIELDS, read_metrics
from mt_scale.step import memory_error
from mt_scale.train import train

# the session's reference runs: every test that reads them runs in one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("reference_runs")

# 25 steps per epoch: 1,208 unlabeled digits / 48 unlabeled rows per batch (one loader worker)
STEPS_PER_EPOCH = 25
SHORT = [
    "data.workers=0",  # in-process loading: no worker start-up in a short test
    "run.epochs=4",
    "optim.lr_rampdown_epochs=4",
    "run.eval_every_epochs=2",
    "run.log_every_steps=5",
    "run.checkpoint_every_epochs=2",
]


def short_config(shards: Path, out: Path, *extra: str):
    return load_config(
        preset="digits-demo", overrides=[f"run.shards={shards}", f"run.output_dir={out}", *SHORT, *extra]
    )


@pytest.fixture
def finished_run(reference_run):
    """The session's finished digits run: 2 epochs, evaluated and checkpointed after each (keep 1)."""
    return reference_run.result


@pytest.mark.slow
def test_run_writes_every_artefact(finished_run) -> None:
    run_dir = finished_run.run_dir
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == report["total_steps"] == 2 * STEPS_PER_EPOCH
    assert report["method"] == "mean_teacher" and report["world_size"] == 1
    assert report["val_count"] == 539  # the digits' 30% val split, each sample once
    assert report["images_seen"] == 2 * STEPS_PER_EPOCH * 64
    assert report["images_per_sec"] > 0 and report["wall_seconds"] > 0
    assert report["config"]["run"]["epochs"] == 2 and report["config"]["data"]["workers"] == 0
    for key in ("student_top1_error", "student_top5_error", "teacher_top1_error", "teacher_top5_error"):
        assert 0.0 <= report["final"][key] <= 1.0
        assert report["best"][key] <= report["final"][key] + 1e-6
    # chance is 0.9 on ten classes
    assert report["final"]["teacher_top1_error"] < 0.75

    rows = read_metrics(run_dir / "metrics.csv")
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [float(s) for s in range(1, 51)]
    assert [r["step"] for r in eval_rows] == [25.0, 50.0]  # after epoch 1 and at the end
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 for r in train_rows)
    assert train_rows[-1]["consistency_weight"] > train_rows[0]["consistency_weight"] > 0  # ramping up
    assert eval_rows[-1]["teacher_top1_error"] == pytest.approx(report["final"]["teacher_top1_error"], abs=1e-5)
    assert list(read_header(run_dir / "metrics.csv")) == list(METRIC_FIELDS)

    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["epochs"] == 2
    # --keep 1: only the final checkpoint is left, complete (no temporary folder)
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-00000050"]
    assert not list((run_dir / "checkpoints").glob(".*"))


def read_header(path: Path) -> list[str]:
    return path.read_text().splitlines()[0].split(",")


@pytest.mark.slow
def test_exported_teacher_loads_in_stock_timm(finished_run) -> None:
    export = json.loads((finished_run.run_dir / "report.json").read_text())["export"]
    path, name, classes = export["file"], export["model_name"], export["num_classes"]
    assert (name, classes) == ("test_resnet", 10)  # a stock timm model: nothing of ours needed to load it
    state = load_file(path)
    assert "fc.weight" in state and state["fc.weight"].shape == (10, state["fc.weight"].shape[1])
    assert not any("consistency_head" in key for key in state)  # single (class) head
    model = timm.create_model(
        name, num_classes=classes, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=classes)
    )
    model.eval()
    teacher = finished_run.teacher.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(images), teacher(images)[0])


@pytest.mark.slow
def test_resume_matches_uninterrupted(reference_run, torch_thread, digits_shards: Path, tmp_path: Path) -> None:
    """Stopped mid-epoch 0 (step 15 of 25), then continued from its checkpoint: the reference run's
    weights, scores and log."""
    with torch_thread():
        first = train(reference_run.config(digits_shards, tmp_path / "split"), progress=False, stop_after_steps=15)
        assert first.report["stopped_at_step"] == 15
        assert [p.name for p in checkpoint_dirs(tmp_path / "split")] == ["step-00000015"]
        resumed = train(reference_run.config(digits_shards, tmp_path / "split"), resume="", progress=False)

    straight = reference_run.result
    assert resumed.report["steps"] == straight.report["steps"] == 50
    for name in ("model.safetensors",):
        a = load_file(str(checkpoint_dirs(straight.run_dir)[-1] / name))
        b = load_file(str(checkpoint_dirs(tmp_path / "split")[-1] / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    teacher_a, teacher_b = straight.teacher.state_dict(), resumed.teacher.state_dict()
    for key in teacher_a:
        torch.testing.assert_close(teacher_a[key], teacher_b[key], rtol=1e-5, atol=1e-6)
    for key in ("teacher_top1_error", "student_top1_error"):
        assert resumed.report["final"][key] == pytest.approx(straight.report["final"][key], abs=1e-9)
    # the resumed run's log continues the killed one's with no step twice
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.csv") if r["kind"] == "train"]
    assert steps == [r["step"] for r in read_metrics(straight.run_dir / "metrics.csv") if r["kind"] == "train"]


@pytest.mark.slow
def test_supervised_baseline_uses_labeled_rows_only(digits_shards: Path, tmp_path: Path) -> None:
    cfg = short_config(digits_shards, tmp_path / "sup", "mt.enabled=false", "run.epochs=1",
                       "optim.lr_rampdown_epochs=1", "run.eval_every_epochs=0")  # fmt: skip
    report = train(cfg, progress=False).report
    assert report["method"] == "supervised"
    assert report["steps"] == STEPS_PER_EPOCH  # the same steps as Mean Teacher's epoch
    assert report["images_seen"] == STEPS_PER_EPOCH * 16  # L = 16 labeled rows per batch
    rows = [r for r in read_metrics(tmp_path / "sup" / "metrics.csv") if r["kind"] == "train"]
    assert all(r["consistency_weight"] == 0 and r["consistency_loss"] == 0 for r in rows)


def test_print_config_round_trips(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--preset", "digits-demo", "--set", "optim.lr=0.2", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(printed)
    assert load_config(config_file=tmp_path / "c.yaml") == load_config("digits-demo", overrides=["optim.lr=0.2"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--preset", "no-such-preset"], "unknown preset"),
        (["--preset", "digits-demo", "--set", "run.shards=/nonexistent/set"], "/nonexistent/set"),
        (["--preset", "digits-demo"], "run.shards is empty"),
        (["--preset", "digits-demo", "--set", "optim.nope=1"], "optim.nope"),
    ],
)
def test_user_errors_are_one_line(argv, needle, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([*argv, "--set", f"run.output_dir={tmp_path / 'run'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mt-train: error: ") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_existing_run_and_changed_classes_are_refused(finished_run, digits_shards: Path, tmp_path: Path) -> None:
    run = f"run.output_dir={finished_run.run_dir}"
    with pytest.raises(MtScaleError, match="--resume"):
        train(load_config("digits-demo", overrides=[f"run.shards={digits_shards}", run, *SHORT]), progress=False)
    # a shard set with other class names: re-labeled copy of the manifest
    other = tmp_path / "other"
    other.mkdir()
    for path in digits_shards.iterdir():
        (other / path.name).symlink_to(path)
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    manifest["classes"] = [f"c{i}" for i in range(10)]
    (other / "manifest.json").unlink()
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config("digits-demo", overrides=[f"run.shards={other}", run, *SHORT])
    with pytest.raises(MtScaleError, match="classes"):
        train(cfg, resume="", progress=False)


def test_out_of_memory_becomes_a_batch_size_error() -> None:
    cfg = load_config("digits-demo")
    batch = cfg.data.batch_size
    error = memory_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), batch)
    assert isinstance(error, MtScaleError) and "data.batch_size=64" in str(error)
    cpu = memory_error(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 1 GB"), batch)
    assert isinstance(cpu, MtScaleError)
    other = RuntimeError("shape mismatch")
    assert memory_error(other, batch) is other


@pytest.mark.slow
def test_mt_train_console_script_exits_2(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "mt-train"
    done = subprocess.run(
        [str(exe), "--preset", "digits-demo", "--set", f"run.shards={tmp_path / 'missing'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and str(tmp_path / "missing") in done.stderr
