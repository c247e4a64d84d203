"""Reading one checkpoint file without running code: JSON, torch.load(weights_only=True), RNG states.

Each reader refuses a damaged, hostile or mismatched file with one MtScaleError line naming the file
and the way on (RESTART_HINT). mt_scale.checkpoint decides which files a checkpoint holds and in what
order a resume reads them (docs/design.md: checkpoints).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mt_scale.errors import MtScaleError
from shard_tools.bounded import load_json
from shard_tools.text import plain_or_quoted

RESTART_HINT = "resume from another checkpoint (--resume DIR) or start a new run in another run.output_dir"

# What an RNG file holds beyond tensors and Python scalars: numpy's MT19937 state array.
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
RNG_SAFE_GLOBALS: list[Any] = [
    _NUMPY_CORE.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
]


def shape_mismatch(saved: Any, fresh: Any, where: str) -> str | None:
    """Where `saved` differs in structure or type from `fresh` (the loaders' own state dict), or None.

    Keys only one side has are left to the loaders; list lengths may differ (another worker count).
    """
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return f"{where} is not an object"
        for key in saved.keys() & fresh.keys():
            if found := shape_mismatch(saved[key], fresh[key], f"{where}.{key}"):
                return found
        return None
    if isinstance(fresh, list):
        if not isinstance(saved, list):
            return f"{where} is not a list"
        for index, item in enumerate(saved):
            if fresh and (found := shape_mismatch(item, fresh[0], f"{where}[{index}]")):
                return found
        return None
    numbers = (int, float) if isinstance(fresh, float) else (type(fresh),)
    if fresh is not None and (
        not isinstance(saved, numbers) or isinstance(saved, bool) != isinstance(fresh, bool)
    ):
        return f"{where} is {type(saved).__name__}, expected {type(fresh).__name__}"
    return None


STATE_MAX_BYTES = 16 << 20  # train_state.json and data_state_*.json hold a few KB


def read_json(path: Path) -> Any:
    """The JSON content of `path`, parsed bounded (size, depth, UTF-8); anything else is one line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MtScaleError(f"{path}: cannot be read ({exc.strerror}); {RESTART_HINT}") from None
    return load_json(data, str(path), MtScaleError, fix=RESTART_HINT, max_bytes=STATE_MAX_BYTES)


# safetensors' names of the dtypes a model holds
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def weights_mismatch(path: Path, expected: dict[str, torch.Tensor]) -> str | None:
    """How the tensors in the safetensors file `path` differ from `expected` (a model's state dict) in
    name, shape or dtype, read from the file's header alone; None when every tensor fits."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            if name not in expected:
                return f"tensor {plain_or_quoted(name)} is not in the model"
            stored = handle.get_slice(name)
            shape, dtype, want = list(stored.get_shape()), stored.get_dtype(), expected[name]
            if shape != list(want.shape):
                return f"tensor {name}: size mismatch, {shape} in the file, {list(want.shape)} in the model"
            if dtype != _SAFETENSORS_DTYPES.get(want.dtype):
                return f"tensor {name} is {dtype}, the model's is {str(want.dtype).removeprefix('torch.')}"
    return None  # a tensor the file lacks is named by the strict load that follows


def optimizer_mismatch(saved: Any, optimizer: Any) -> str | None:
    """How an optimizer state dict differs from what `optimizer` holds: groups, parameter counts,
    hyperparameter types, and every state tensor's shape and dtype against its parameter."""
    fresh = optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(
            saved.get("param_groups"), list):
        return "not an optimizer state (state and param_groups)"
    if len(saved["param_groups"]) != len(fresh["param_groups"]):
        return f"{len(saved['param_groups'])} parameter groups, the optimizer has {len(fresh['param_groups'])}"
    for number, (group, want) in enumerate(zip(saved["param_groups"], fresh["param_groups"], strict=True)):
        if not isinstance(group, dict) or set(group) != set(want):
            return f"param_groups[{number}] has other fields than the optimizer's"
        if not isinstance(group["params"], list) or len(group["params"]) != len(want["params"]):
            return f"param_groups[{number}] has another parameter count than the model"
        found = shape_mismatch({k: v for k, v in group.items() if k != "params"},
                               {k: v for k, v in want.items() if k != "params"}, f"param_groups[{number}]")
        if found:
            return found
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, entry in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            return f"state {plain_or_quoted(str(index))} is not a parameter's state"
        param = params[index]
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and (
                    value.shape != param.shape or value.dtype != param.dtype):
                return (f"state[{index}].{plain_or_quoted(str(name))} is {str(value.dtype).removeprefix('torch.')} "
                        f"{list(value.shape)}, its parameter {str(param.dtype).removeprefix('torch.')} "
                        f"{list(param.shape)}")
            if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
                return f"state[{index}].{plain_or_quoted(str(name))} is not a number"
            if not isinstance(value, (torch.Tensor, int, float)) or isinstance(value, bool):
                return f"state[{index}].{plain_or_quoted(str(name))} is {type(value).__name__}, not a tensor"
    return None


def scheduler_mismatch(saved: Any, scheduler: Any) -> str | None:
    """How a scheduler state dict differs from `scheduler`'s own: the same fields, each of the same type."""
    fresh = scheduler.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(fresh):
        return "not this LR scheduler's fields"
    return shape_mismatch(saved, fresh, "scheduler")


def torch_load(path: Path, safe_globals: list[Any] | None = None) -> Any:
    """torch.load(weights_only=True), with `safe_globals` allowed for this one call only."""
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MtScaleError(
            f"{path}: damaged, or holds objects a checkpoint never contains, so it was not loaded "
            f"({short_reason(exc)}); {RESTART_HINT}"
        ) from None


def apply_state(path: Path, load_state_dict: Callable[[Any], object], what: str,
                check: Callable[[Any], str | None] | None = None) -> Any:
    """Load `path` weights-only, check it with `check` (a mismatch is one line), hand it to `load_state_dict`
    (an optimizer's, a scheduler's...); returns what was loaded."""
    content = torch_load(path)
    problem = check(content) if check is not None else None
    if problem:
        raise MtScaleError(f"{path}: does not fit this run's {what} ({problem}); {RESTART_HINT}")
    try:
        load_state_dict(content)
    except Exception as exc:
        raise MtScaleError(
            f"{path}: does not fit this run's {what} ({short_reason(exc)}); {RESTART_HINT}"
        ) from None
    return content


def restore_rng(states: Any) -> int:
    """Set Python, numpy, torch (and CUDA) RNG states as Accelerate saved them; returns its step count."""
    if not isinstance(states, dict):
        raise TypeError(f"expected a dict, got {type(states).__name__}")
    step = states["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise TypeError("'step' is not a count")
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    return step


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message, shortened: enough to tell damage from a mismatch."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if text.endswith(":") and len(lines) > 1:  # a heading; the first detail says what is wrong
        text = f"{text} {lines[1]}"
    if "Weights only load failed" in text:
        detail = next(
            (line for line in lines if "unsupported" in line.lower() or "can only build" in line.lower()), ""
        )
        text = f"not weights-only: {detail}" if detail else "not weights-only"
    return text if len(text) <= 200 else text[:197] + "..."


def teacher_buffers_name(rank: int) -> str:
    return f"teacher_buffers_{rank}.safetensors"


def local_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of `module`'s floating-point buffers (the BatchNorm statistics one rank gathered)."""
    return {name: buffer.detach().clone() for name, buffer in module.named_buffers() if buffer.is_floating_point()}


def restore_buffers(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Write `saved` (from `local_buffers` or a rank's file) back into `module`'s buffers."""
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in saved.items():
            buffers[name].copy_(value)


def load_rank_buffers(path: Path, module: torch.nn.Module, hint: str) -> None:
    """Restore this rank's own teacher statistics from `path`, checked tensor by tensor first."""
    from safetensors.torch import load_file

    expected = local_buffers(module)
    problem = weights_mismatch(path, expected)
    try:
        saved = load_file(str(path), device=str(next(iter(expected.values())).device)) if not problem else {}
    except Exception as exc:
        problem = short_reason(exc)
    if not problem and saved.keys() != expected.keys():
        problem = f"{len(saved)} buffers, the teacher has {len(expected)}"
    if problem:
        raise MtScaleError(f"{path}: not this rank's teacher statistics ({problem}); {hint}")
    restore_buffers(module, saved)
