"""Shard sets to Mean Teacher batches: `build_loaders` (DALI or PyTorch backend) and `normalize`.

The names are re-exported on first use (PEP 562), so a process that needs one module of the package,
such as a DALI reader, does not import torch with `pipelines.loaders`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AUGMENT_PRESETS": "pipelines.augment",
    "AugmentSpec": "pipelines.augment",
    "DataConfig": "pipelines.config",
    "PipelineError": "pipelines.errors",
    "Loaders": "pipelines.loaders",
    "build_loaders": "pipelines.loaders",
    "normalize": "pipelines.loaders",
    "resolve_backend": "pipelines.loaders",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
