"""Resume trusts a checkpoint no further than its shapes: every tensor's name, shape and dtype, the
optimizer's state against its parameters, the scheduler's fields and types, train_state.json against
its folder and the schedule, and bounded JSON; each mismatch is one line naming the file and field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mt_scale.checkpoint import TEACHER_NAME, TRAIN_STATE_NAME, checkpoint_dirs, data_state_name
from mt_scale.checkpoint_files import RESTART_HINT
from mt_scale.cli import train_main as main
from mt_scale.config import load_config
from mt_scale.train import train

SETTINGS = ["data.workers=0", "run.epochs=1", "optim.lr_rampdown_epochs=1", "run.eval_every_epochs=0",
            "run.checkpoint_every_epochs=0", "run.log_every_steps=1"]


@pytest.fixture(scope="module")
def stopped_run(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after 3 steps: one complete checkpoint, step-00000003."""
    run = tmp_path_factory.mktemp("hostile-ckpt") / "run"
    cfg = load_config("digits-demo", overrides=[f"run.shards={digits_shards}", f"run.output_dir={run}", *SETTINGS])
    train(cfg, progress=False, stop_after_steps=3)
    return run


@pytest.fixture
def run_copy(stopped_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    return run, checkpoint_dirs(run)[-1]


def resume_error(shards: Path, run: Path, capsys) -> str:
    """Resume `run` through mt-train; assert exit 2 and one line without a traceback; return the message."""
    sets = [item for setting in (f"run.shards={shards}", f"run.output_dir={run}", *SETTINGS)
            for item in ("--set", setting)]
    status = main(["--preset", "digits-demo", *sets, "--no-progress", "--resume"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("mt-train: error: ")
    return err.strip()[len("mt-train: error: "):]


@pytest.mark.parametrize(("name", "dtype", "stored"), [(TEACHER_NAME, torch.int64, "I64"),
                                                       ("model.safetensors", torch.float16, "F16")])
def test_weights_of_another_dtype_are_refused(run_copy, digits_shards: Path, capsys, name, dtype, stored) -> None:
    run, checkpoint = run_copy
    tensors = load_file(checkpoint / name)
    first = next(key for key, value in tensors.items() if value.dtype == torch.float32)
    save_file({key: value.to(dtype) if value.is_floating_point() else value for key, value in tensors.items()},
              checkpoint / name, metadata={"format": "pt"})
    message = resume_error(digits_shards, run, capsys)
    assert message.startswith(f"{checkpoint / name}: does not hold weights of ")
    assert f"(tensor {first} is {stored}, the model's is float32); {RESTART_HINT}" in message


def _edit_state(checkpoint: Path, **fields) -> None:
    path = checkpoint / TRAIN_STATE_NAME
    record = json.loads(path.read_text())
    record["state"].update(fields)
    path.write_text(json.dumps(record))


def test_train_state_is_checked_against_its_folder_and_the_schedule(run_copy, digits_shards: Path,
                                                                     capsys) -> None:
    run, checkpoint = run_copy
    state_file = checkpoint / TRAIN_STATE_NAME
    original = state_file.read_text()
    _edit_state(checkpoint, step=10**9)
    assert resume_error(digits_shards, run, capsys) == (
        f"{state_file}: field 'step' is 1000000000, but the checkpoint folder is step-00000003; {RESTART_HINT}")
    state_file.write_text(original)
    _edit_state(checkpoint, epoch=50)  # past the schedule mt-train resumes with (run.epochs=1)
    message = resume_error(digits_shards, run, capsys)
    assert message.startswith(f"{state_file}: field 'epoch' is 50, past this run's run.epochs=1; ")
    _edit_state(checkpoint, epoch=1)  # within the schedule, but not where step 3 stands
    message = resume_error(digits_shards, run, capsys)
    assert message.startswith(f"{state_file}: field 'step' is 3, but epoch 1 and batch 3 of ")
    state_file.write_text(original)
    _edit_state(checkpoint, batch_in_epoch=10**6)
    assert "field 'batch_in_epoch' is 1000000, not a step boundary of an epoch of " in resume_error(
        digits_shards, run, capsys)


def test_optimizer_state_of_another_shape_is_refused(run_copy, digits_shards: Path, capsys) -> None:
    run, checkpoint = run_copy
    path = checkpoint / "optimizer.bin"
    saved = torch.load(path, weights_only=True)
    buffer = saved["state"][0]["momentum_buffer"]
    saved["state"][0]["momentum_buffer"] = buffer.flatten()[:-1]
    torch.save(saved, path)
    message = resume_error(digits_shards, run, capsys)
    assert message.startswith(f"{path}: does not fit this run's optimizer (optim.name and model) "
                              f"(state[0].momentum_buffer is float32 [{buffer.numel() - 1}], its parameter float32 "
                              f"{list(buffer.shape)})")
    saved["state"][0]["momentum_buffer"] = buffer.to(torch.float64)
    torch.save(saved, path)
    assert "state[0].momentum_buffer is float64" in resume_error(digits_shards, run, capsys)


def test_scheduler_fields_of_another_type_are_refused(run_copy, digits_shards: Path, capsys) -> None:
    run, checkpoint = run_copy
    path = checkpoint / "scheduler.bin"
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "last_epoch": "3"}, path)
    assert resume_error(digits_shards, run, capsys) == (
        f"{path}: does not fit this run's LR scheduler (scheduler.last_epoch is str, expected int); {RESTART_HINT}")
    torch.save({**saved, "last_epoch": 10**9}, path)
    assert resume_error(digits_shards, run, capsys) == (
        f"{path}: does not fit this run's LR scheduler (last_epoch 1000000000, while train_state.json says "
        f"step 3); {RESTART_HINT}")
    torch.save({key: value for key, value in saved.items() if key != "base_lrs"}, path)
    assert "(not this LR scheduler's fields)" in resume_error(digits_shards, run, capsys)


@pytest.mark.parametrize("name", [TRAIN_STATE_NAME, data_state_name(0)])
def test_deeply_nested_state_json_is_one_line(run_copy, digits_shards: Path, capsys, name: str) -> None:
    run, checkpoint = run_copy
    (checkpoint / name).write_text('{"state": ' + "[" * 5000 + "]" * 5000 + "}")
    assert resume_error(digits_shards, run, capsys) == (
        f"{checkpoint / name}: not valid JSON (nested deeper than 64 levels); {RESTART_HINT}")


def test_a_failed_first_checkpoint_does_not_say_resume(digits_shards: Path, tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    run = tmp_path / "out" / "run"
    sets = [item for setting in (f"run.shards={digits_shards}", f"run.output_dir={run}", *SETTINGS)
            for item in ("--set", setting)]
    assert main(["--preset", "digits-demo", *sets, "--no-progress", "--stop-after-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(
        "No space left on device); free space in or choose another run.output_dir, then start the run again "
        "(without --resume)")
    assert not (tmp_path / "out").exists()  # nothing left to resume from: the new run's folders are gone
