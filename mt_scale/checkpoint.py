"""Checkpoints (resume a killed run exactly) and the exported teacher (what a user ships).

A checkpoint is one folder `run_dir/checkpoints/step-NNNNNNNN/` written by Accelerate's
`save_state`: the prepared student, optimizer, LR scheduler, gradient-scaler and per-rank RNG
states, plus the objects registered with `register_for_checkpointing` (here the teacher and the
`TrainState`: step, epoch, batches consumed, throughput counters, class names). Each rank adds its
own data position, `data_state_<rank>.pt`, since each rank reads different shards. The folder is
written under a temporary name and renamed once every rank has finished, so a run killed while
saving never leaves a half checkpoint that `--resume` would pick up. Ranks must share a file
system (the same rule as Accelerate's own checkpoints).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mt_scale.errors import MtScaleError

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
EXPORT_NAME = "teacher.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint through `register_for_checkpointing`."""

    step: int = 0  # optimizer steps done (the reference's global_step)
    epoch: int = 0  # epoch being trained
    batch_in_epoch: int = 0  # batches of `epoch` already consumed on each rank
    images_seen: int = 0  # training images (student views) over all ranks
    train_seconds: float = 0.0  # wall time spent in training steps, for images/s across restarts
    world_size: int = 1
    class_names: list[str] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def data_state_name(rank: int) -> str:
    return f"data_state_{rank}.pt"


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
    if (target / data_state_name(0)).is_file():
        return target
    found = checkpoint_dirs(target)
    if not found:
        raise MtScaleError(
            f"{target}: no checkpoint to resume from (expected {target}/{CHECKPOINTS_DIR}/step-*/); "
            "start the run without --resume or point --resume at a run folder or checkpoint"
        )
    return found[-1]


def save_checkpoint(
    accelerator: Accelerator, run_dir: str | Path, state: TrainState, loaders: Any, keep: int = 0
) -> Path:
    """Write `checkpoints/step-<step>/` on every rank, then keep only the newest `keep` (0 = all)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = f"step-{state.step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(loaders.state_dict(), tmp / data_state_name(accelerator.process_index))
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


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, state: TrainState, loaders: Any) -> None:
    """Restore everything `save_checkpoint` wrote; `state` must already be registered for checkpointing."""
    data_file = checkpoint / data_state_name(accelerator.process_index)
    if not data_file.is_file():
        raise MtScaleError(
            f"{data_file}: missing; this checkpoint was written by fewer processes than the "
            f"{accelerator.num_processes} launched now; resume with the same number of processes"
        )
    expected_classes = list(state.class_names)
    accelerator.load_state(str(checkpoint))
    if state.world_size != accelerator.num_processes:
        raise MtScaleError(
            f"{checkpoint}: written by {state.world_size} processes, resumed with "
            f"{accelerator.num_processes}; resume with the same number of processes"
        )
    if expected_classes and list(state.class_names) != expected_classes:
        raise MtScaleError(
            f"{checkpoint}: trained on classes {state.class_names[:5]}..., the shard set has "
            f"{expected_classes[:5]}...; resume with the shard set the run was started on"
        )
    # Our own file, holding plain Python/numpy position counters: not a weights-only pickle.
    loaders.load_state_dict(torch.load(data_file, map_location="cpu", weights_only=False))


def export_teacher(teacher: torch.nn.Module, path: str | Path) -> Path:
    """Save the teacher as a stock-timm state dict (class head only) in safetensors format."""
    from safetensors.torch import save_file

    from mt_scale.model import export_class_head_state_dict

    path = Path(path)
    state = {key: value.detach().cpu().contiguous() for key, value in export_class_head_state_dict(teacher).items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path
