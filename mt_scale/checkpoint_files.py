"""Reading one checkpoint file without running code: JSON, torch.load(weights_only=True), RNG states.

Each reader refuses a damaged, hostile or mismatched file with one MtScaleError line naming the file
and the way on (RESTART_HINT). mt_scale.checkpoint decides which files a checkpoint holds and in what
order a resume reads them (docs/design.md: checkpoints).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mt_scale.errors import MtScaleError

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


def read_json(path: Path) -> Any:
    """The JSON content of `path`; an unreadable or damaged file is refused with one line."""
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise MtScaleError(f"{path}: cannot be read ({exc.strerror}); {RESTART_HINT}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError: damaged or not JSON at all
        raise MtScaleError(f"{path}: damaged or not JSON ({short_reason(exc)}); {RESTART_HINT}") from None


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


def apply_state(path: Path, load_state_dict: Callable[[Any], object], what: str) -> None:
    """Load `path` weights-only and hand it to `load_state_dict` (an optimizer's, a scheduler's...)."""
    content = torch_load(path)
    try:
        load_state_dict(content)
    except Exception as exc:
        raise MtScaleError(
            f"{path}: does not fit this run's {what} ({short_reason(exc)}); {RESTART_HINT}"
        ) from None


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
