"""Shard sets to Mean Teacher batches: `build_loaders` (DALI or PyTorch backend) and `normalize`."""

from __future__ import annotations

from pipelines.augment import AUGMENT_PRESETS, AugmentSpec, normalize
from pipelines.config import DataConfig
from pipelines.errors import PipelineError
from pipelines.loaders import Loaders, build_loaders, resolve_backend

__all__ = ["AUGMENT_PRESETS", "AugmentSpec", "DataConfig", "Loaders", "PipelineError", "build_loaders",
           "normalize", "resolve_backend"]
