"""Checkpoints (resume a killed run exactly) and the exported teacher (what a user ships).

`checkpoints/step-NNNNNNNN/` holds Accelerate's save_state files plus ours (ema_teacher.safetensors,
train_state.json, data_state_<rank>.json). Loading reads every file itself and never runs code:
safetensors, JSON, and torch.load(weights_only=True), the last two through mt_scale.checkpoint_files
(docs/design.md: checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mt_scale.checkpoint_files import (
    RESTART_HINT,
    RNG_SAFE_GLOBALS,
    apply_state,
    load_rank_buffers,
    local_buffers,
    optimizer_mismatch,
    read_json,
    restore_buffers,
    restore_rng,
    scheduler_mismatch,
    shape_mismatch,
    short_reason,
    teacher_buffers_name,
    torch_load,
    weights_mismatch,
)
from mt_scale.errors import MtScaleError
from mt_scale.teacher import average_buffers_over_ranks
from shard_tools.files import atomic_output

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
EXPORT_NAME = "teacher.safetensors"
TRAIN_STATE_NAME = "train_state.json"
TEACHER_NAME = "ema_teacher.safetensors"
STUDENT_NAME = "model.safetensors"  # Accelerate's names for what save_state writes
OPTIMIZER_NAME = "optimizer.bin"
SCHEDULER_NAME = "scheduler.bin"
SCALER_NAME = "scaler.pt"
FORMAT_VERSION = 2  # 1: pickled TrainState/teacher/data position (no longer loaded: they can run code)
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_OLD_FORMAT_FILES = ("custom_checkpoint_0.pkl", "data_state_0.pt")


@dataclass
class TrainState:
    """Where the loop is; saved as train_state.json in every checkpoint."""

    step: int = 0  # optimizer steps done (the reference's global_step)
    epoch: int = 0  # epoch being trained
    batch_in_epoch: int = 0  # batches of `epoch` already consumed on each rank
    images_seen: int = 0  # training images (student views) over all ranks
    train_seconds: float = 0.0  # wall time spent in training steps, for images/s across restarts
    world_size: int = 1
    class_names: list[str] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "state") -> None:
        """Set the fields from `state` (train_state.json's "state"), checking every type first."""
        known = {f.name: f for f in fields(self)}
        values = {}
        for name, spec in known.items():
            value = state.get(name) if isinstance(state, dict) else None
            if spec.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            expected = {"int": int, "float": float, "list[str]": list}[spec.type]
            ok = isinstance(value, expected) and not isinstance(value, bool)
            if ok and spec.type == "list[str]":
                ok = all(isinstance(item, str) for item in value)
            if ok and spec.type == "int":
                ok = value >= 0
            if not ok:
                raise MtScaleError(
                    f"{source}: field {name!r} is missing or not a valid {spec.type}; {RESTART_HINT}"
                )
            values[name] = value
        for name, value in values.items():
            setattr(self, name, value)


def data_state_name(rank: int) -> str:
    return f"data_state_{rank}.json"


def rng_state_name(rank: int) -> str:
    return f"random_states_{rank}.pkl"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(resume: str | Path, run_dir: str | Path) -> Path:
    """The checkpoint folder meant by `--resume [DIR]`: DIR may be a checkpoint or a run folder.

    An empty DIR means the run's own output folder; a run folder means its latest checkpoint.
    """
    target = Path(resume) if str(resume) else Path(run_dir)
    if any((target / name).is_file() for name in (TRAIN_STATE_NAME, *_OLD_FORMAT_FILES)):
        return target
    found = checkpoint_dirs(target)
    if not found:
        raise MtScaleError(
            f"{target}: no checkpoint to resume from (expected {target}/{CHECKPOINTS_DIR}/step-*/); "
            "start the run without --resume or point --resume at a run folder or checkpoint"
        )
    return found[-1]


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: str | Path,
    state: TrainState,
    loaders: Any,
    teacher: torch.nn.Module,
    *,
    model_name: str,
    num_classes: int,
    keep: int = 0,
) -> Path:
    """Write `checkpoints/step-<step>/` on every rank, then keep only the newest `keep` (0 = all).

    A failure while writing (a full disk, Ctrl-C) removes the temporary folder and raises
    MtScaleError (or the KeyboardInterrupt) with the folder named.
    """
    # ema_teacher.safetensors holds the rank-averaged statistics (what evaluation and export use); each
    # rank also keeps its own, and the live teacher goes on with them, so a resumed run is exact.
    own = local_buffers(teacher) if accelerator.num_processes > 1 else None
    average_buffers_over_ranks(teacher)
    try:
        return _write_checkpoint(accelerator, run_dir, state, loaders, teacher, own, model_name=model_name,
                                 num_classes=num_classes, keep=keep)  # fmt: skip
    finally:
        if own is not None:
            restore_buffers(teacher, own)


def _write_checkpoint(
    accelerator: Accelerator, run_dir: str | Path, state: TrainState, loaders: Any, teacher: torch.nn.Module,
    own: dict[str, torch.Tensor] | None, *, model_name: str, num_classes: int, keep: int,
) -> Path:
    from safetensors.torch import save_file, save_model

    root = Path(run_dir) / CHECKPOINTS_DIR
    name = f"step-{state.step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        data_state = json.dumps(loaders.state_dict())
        (tmp / data_state_name(accelerator.process_index)).write_text(data_state)
        if own is not None:
            save_file({name: value.cpu().contiguous() for name, value in own.items()},
                      str(tmp / teacher_buffers_name(accelerator.process_index)))  # fmt: skip
        if accelerator.is_main_process:
            save_model(teacher, str(tmp / TEACHER_NAME), metadata={"format": "pt"})
            record = {
                "format": FORMAT_VERSION,
                "model": {"name": model_name, "num_classes": num_classes},
                "state": state.state_dict(),
            }
            (tmp / TRAIN_STATE_NAME).write_text(json.dumps(record, indent=1) + "\n")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, MtScaleError):
            # with no complete checkpoint there is nothing to resume (a new run's folder is removed)
            then = "continue with --resume" if checkpoint_dirs(run_dir) else "start the run again (without --resume)"
            raise MtScaleError(
                f"{tmp}: writing the checkpoint failed ({short_reason(exc)}); free space in or choose "
                f"another run.output_dir, then {then}"
            ) from None
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator,
    checkpoint: Path,
    state: TrainState,
    loaders: Any,
    teacher: torch.nn.Module,
    *,
    model_name: str,
    num_classes: int,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
) -> None:
    """Restore everything `save_checkpoint` wrote, refusing any file that is not what it should be.

    `state.class_names` must hold the current shard set's classes (they are checked, then replaced).
    With `epochs` and `steps_per_epoch` (this run's schedule), train_state.json's position is checked
    against it as well as against the checkpoint folder's step.
    """
    from safetensors.torch import load_model

    rank = accelerator.process_index
    _check_files(accelerator, checkpoint)
    # 1. Where the loop was, and whether the checkpoint belongs to this run at all.
    loaded = _read_train_state(accelerator, checkpoint, state.class_names, model_name, num_classes)
    accumulation = accelerator.gradient_accumulation_steps
    if steps_per_epoch is None and accelerator.num_processes == 1:  # one process: its own batch count decides
        steps_per_epoch = len(loaders.train) // accumulation
    _check_position(checkpoint, loaded, epochs, steps_per_epoch, accumulation)
    data_file = checkpoint / data_state_name(rank)
    data_state = read_json(data_file)
    mismatch = shape_mismatch(data_state, loaders.state_dict(), "position")
    if mismatch:
        raise MtScaleError(f"{data_file}: not a data position of these loaders ({mismatch}); {RESTART_HINT}")

    # 2. Weights: safetensors only, and they must fit the models built from the config.
    student = accelerator._models[0]  # the prepared model save_state wrote (its keys, DDP prefix included)
    for model, name in ((student, STUDENT_NAME), (teacher, TEACHER_NAME)):
        path = checkpoint / name
        try:
            problem = weights_mismatch(path, model.state_dict())
            if problem:
                raise MtScaleError(f"{path}: does not hold weights of {model_name!r} with {num_classes} classes "
                                   f"({problem}); {RESTART_HINT}")
            load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
        except MtScaleError:
            raise
        except Exception as exc:
            raise MtScaleError(
                f"{path}: does not hold weights of {model_name!r} with {num_classes} classes "
                f"({short_reason(exc)}); {RESTART_HINT}"
            ) from None

    if accelerator.num_processes > 1:  # this rank's own teacher statistics, as it left them
        load_rank_buffers(checkpoint / teacher_buffers_name(rank), teacher, RESTART_HINT)

    # 3. Accelerate's pickles, weights_only: tensors, containers and Python scalars only.
    optimizer, scheduler = accelerator._optimizers[0], accelerator._schedulers[0]
    apply_state(checkpoint / OPTIMIZER_NAME, optimizer.load_state_dict, "optimizer (optim.name and model)",
                lambda saved: optimizer_mismatch(saved, optimizer))
    apply_state(checkpoint / SCHEDULER_NAME, scheduler.load_state_dict, "LR scheduler",
                lambda saved: scheduler_mismatch(saved, scheduler) or _scheduler_step_mismatch(saved, loaded.step))
    if accelerator.scaler is not None:
        apply_state(checkpoint / SCALER_NAME, accelerator.scaler.load_state_dict, "gradient scaler")
    rng_file = checkpoint / rng_state_name(rank)
    rng = torch_load(rng_file, RNG_SAFE_GLOBALS)
    try:
        accelerator_step = restore_rng(rng)
    except Exception as exc:
        raise MtScaleError(
            f"{rng_file}: not a valid RNG state ({short_reason(exc)}); resume would not be exact; "
            f"{RESTART_HINT}"
        ) from None
    accelerator.step = accelerator_step

    # 4. The data position (plain ints, lists and strings; DALI's part is base64 text).
    try:
        loaders.load_state_dict(data_state)
    except Exception as exc:
        raise MtScaleError(
            f"{data_file}: not a valid data position ({short_reason(exc)}); {RESTART_HINT}"
        ) from None
    state.load_state_dict(loaded.state_dict())


def _scheduler_step_mismatch(saved: dict, step: int) -> str | None:
    """The scheduler steps once per optimizer step: its count must be train_state.json's step."""
    last = saved.get("last_epoch")
    return None if last == step else f"last_epoch {last}, while {TRAIN_STATE_NAME} says step {step}"


def _check_position(checkpoint: Path, loaded: TrainState, epochs: int | None, steps_per_epoch: int | None,
                    accumulation: int) -> None:
    """train_state.json's step against the folder it sits in, and its position against the schedule."""
    state_file = checkpoint / TRAIN_STATE_NAME
    folder = _STEP_DIR.match(checkpoint.name)
    if folder and int(folder.group(1)) != loaded.step:
        raise MtScaleError(f"{state_file}: field 'step' is {loaded.step}, but the checkpoint folder is "
                           f"{checkpoint.name}; {RESTART_HINT}")
    if steps_per_epoch is None:
        return
    problem = None
    if epochs is not None and loaded.epoch > epochs:
        problem = f"field 'epoch' is {loaded.epoch}, past this run's run.epochs={epochs}"
    elif loaded.batch_in_epoch % accumulation or loaded.batch_in_epoch >= steps_per_epoch * accumulation:
        problem = (f"field 'batch_in_epoch' is {loaded.batch_in_epoch}, not a step boundary of an epoch of "
                   f"{steps_per_epoch} steps")
    elif loaded.step != loaded.epoch * steps_per_epoch + loaded.batch_in_epoch // accumulation:
        problem = (f"field 'step' is {loaded.step}, but epoch {loaded.epoch} and batch {loaded.batch_in_epoch} "
                   f"of {steps_per_epoch} steps per epoch make step "
                   f"{loaded.epoch * steps_per_epoch + loaded.batch_in_epoch // accumulation}")
    if problem:
        raise MtScaleError(f"{state_file}: {problem}; resume with the settings and shard set the run was started "
                           f"with, or {RESTART_HINT}")


def _check_files(accelerator: Accelerator, checkpoint: Path) -> None:
    """Every file this rank reads is there (an old pickled checkpoint is refused unread)."""
    rank = accelerator.process_index
    if not (checkpoint / TRAIN_STATE_NAME).is_file() and any(
        (checkpoint / n).is_file() for n in _OLD_FORMAT_FILES
    ):
        raise MtScaleError(
            f"{checkpoint}: written by an older mt-scale whose state files are pickles, which are not loaded "
            f"(they could run code); start a new run in another run.output_dir"
        )
    data_file = checkpoint / data_state_name(rank)
    if not data_file.is_file():
        raise MtScaleError(
            f"{data_file}: missing; either this checkpoint was written by fewer processes than the "
            f"{accelerator.num_processes} launched now (resume with the same number of processes) or it is "
            f"incomplete ({RESTART_HINT})"
        )
    wanted = [TRAIN_STATE_NAME, STUDENT_NAME, TEACHER_NAME, OPTIMIZER_NAME, SCHEDULER_NAME]
    wanted.append(rng_state_name(rank))
    if accelerator.num_processes > 1:
        wanted.append(teacher_buffers_name(rank))
    if accelerator.scaler is not None:
        wanted.append(SCALER_NAME)
    for name in wanted:
        if not (checkpoint / name).is_file():
            raise MtScaleError(f"{checkpoint / name}: missing; the checkpoint is incomplete; {RESTART_HINT}")


def _read_train_state(
    accelerator: Accelerator, checkpoint: Path, class_names: list[str], model_name: str, num_classes: int
) -> TrainState:
    """train_state.json, checked against this run's model, classes and process count."""
    state_file = checkpoint / TRAIN_STATE_NAME
    record = read_json(state_file)
    saved_model = record.get("model") if isinstance(record, dict) else None
    if (
        not isinstance(record, dict)
        or record.get("format") != FORMAT_VERSION
        or not isinstance(saved_model, dict)
    ):
        raise MtScaleError(
            f"{state_file}: not an mt-scale checkpoint record (format {FORMAT_VERSION}); {RESTART_HINT}"
        )
    if (saved_model.get("name"), saved_model.get("num_classes")) != (model_name, num_classes):
        raise MtScaleError(
            f"{state_file}: written for model {saved_model.get('name')!r} with "
            f"{saved_model.get('num_classes')} classes, this run builds {model_name!r} with {num_classes}; "
            f"resume with the model.name and shard set the run was started with, or start a new run in "
            f"another run.output_dir"
        )
    expected_classes = list(class_names)
    loaded = TrainState()
    loaded.load_state_dict(record.get("state"), source=state_file)
    if loaded.world_size != accelerator.num_processes:
        raise MtScaleError(
            f"{checkpoint}: written by {loaded.world_size} processes, resumed with "
            f"{accelerator.num_processes}; resume with the same number of processes"
        )
    if expected_classes and loaded.class_names != expected_classes:
        raise MtScaleError(
            f"{checkpoint}: trained on classes {loaded.class_names[:5]}..., the shard set has "
            f"{expected_classes[:5]}...; resume with the shard set the run was started on"
        )
    return loaded


def export_teacher(teacher: torch.nn.Module, path: str | Path) -> Path:
    """Save the teacher as a stock-timm state dict (class head only) in safetensors format."""
    from safetensors.torch import save_file

    from mt_scale.model import export_class_head_state_dict

    path = Path(path)
    state = {
        key: value.detach().cpu().contiguous() for key, value in export_class_head_state_dict(teacher).items()
    }
    with atomic_output(path) as temp:
        save_file(state, str(temp), metadata={"format": "pt"})
    return path
