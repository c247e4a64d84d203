"""The one configuration schema of a training run: dataclasses, YAML presets, `a.b=value` overrides.

`load_config(preset, config_file, overrides)` applies the defaults, the preset, the file and each
override in that order, each value typed by its field; `run.batch_scope` says whether batch sizes and
`optim.lr` are per optimizer step over all devices ("global") or per device (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mt_scale.errors import MtScaleError
from pipelines.config import DataConfig
from pipelines.errors import PipelineError
from shard_tools.bounded import load_yaml
from shard_tools.text import plain_or_quoted, quoted

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS: tuple[str, ...] = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


@dataclass
class ModelConfig:
    """The network: a timm model name (ours included, see mt_scale.model) and how it is run."""

    name: str = "resnet152"
    two_heads: bool = True  # the reference's class + consistency heads (its logit_distance_cost >= 0)
    drop_rate: float = 0.0
    in_chans: int = 3
    channels_last: bool = False
    compile: bool = False  # torch.compile the student (and teacher) after Accelerate wraps it
    cuda_graph: bool = True  # on CUDA, capture the whole step as CUDA graphs and replay them (eager elsewhere)


@dataclass
class OptimConfig:
    """Optimizer (timm name) and the reference's LR schedule; `lr` is per device."""

    name: str = "sgd"
    lr: float = 0.1  # peak LR: of the global batch, or per device (see run.batch_scope)
    initial_lr: float = 0.0  # start of the linear ramp-up (not scaled with the device count)
    lr_rampup_epochs: float = 0.0
    lr_rampdown_epochs: float = 0.0  # length of the cosine half cycle, >= run.epochs; 0 = constant
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    filter_bias_and_bn: bool = False  # the reference decays biases and BN weights too
    schedule_per_step: bool = True  # LR at the fractional epoch, every step (the reference's)


@dataclass
class MeanTeacherConfig:
    """The consistency cost and the EMA teacher."""

    enabled: bool = True  # false: supervised only (consistency weight 0)
    ema_decay: float = 0.999
    consistency: str = "mse"  # "mse" or "kl" between student and teacher softmaxes
    consistency_weight: float = 10.0
    consistency_rampup_epochs: float = 5.0
    consistency_rampup_per_step: bool = False  # the reference ramps at the integer epoch
    logit_distance_cost: float = 0.01  # ties the two heads; used only with model.two_heads


@dataclass
class RunConfig:
    """Length, precision, logging and where things go."""

    epochs: int = 60
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (Accelerate's autocast)
    grad_accum_steps: int = 1
    eval_every_epochs: int = 1
    log_every_steps: int = 10
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 2
    output_dir: str = "runs/mt"
    shards: str = ""  # the shard set directory (mt-shard pack output)
    batch_scope: str = "per_device"  # "global": data batch sizes and optim.lr are per optimizer step
    # global scope: most rows one device takes per micro-batch. "auto": what the device's memory holds,
    # measured at start on the real model (no cap on a CPU); an integer caps it (0 = no cap)
    max_device_batch: str = "auto"
    log_with: str = "tensorboard"  # Accelerate's trackers, comma-separated (wandb, mlflow, aim...), or none


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mt: MeanTeacherConfig = field(default_factory=MeanTeacherConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = ""  # the preset the values started from ("" = defaults)


SECTIONS = ("model", "data", "optim", "mt", "run")
BATCH_SCOPES = ("global", "per_device")


def load_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] | tuple = ()
) -> Config:
    """Defaults, then the preset, then the YAML file, then `section.key=value` overrides; validated."""
    cfg = Config()
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = _read_yaml(Path(config_file))
        preset = preset or file_values.pop("preset", None)
        file_values.pop("preset", None)
    if preset:
        if preset not in PRESETS:
            raise MtScaleError(f"unknown preset {quoted(preset)}; choose one of {list(PRESETS)}")
        path = PRESET_DIR / f"{preset}.yaml"
        values = _read_yaml(path)
        values.pop("preset", None)
        _apply_mapping(cfg, values, source=str(path))
        cfg.preset = preset
    if file_values:
        _apply_mapping(cfg, file_values, source=str(config_file))
    for override in overrides:
        _apply_override(cfg, override)
    return validate_config(cfg)


SEED_LIMIT = 2**32  # numpy's and torch's seeds: 0 .. 2**32 - 1
IMAGE_CHANNELS = 3  # the pipelines give RGB images


def _non_finite(cfg: Config) -> str | None:
    """'section.key=value' of the first number setting that is not finite (nan, inf), else None."""
    for section_name in SECTIONS:
        section = getattr(cfg, section_name)
        for item in dataclasses.fields(section):
            value = getattr(section, item.name)
            numbers = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                return f"{section_name}.{item.name}={quoted(value)}"
    return None


def _range_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Ranges the libraries would otherwise refuse with a traceback, or accept and misbehave."""
    return [
        (0 <= cfg.run.seed < SEED_LIMIT, f"run.seed={cfg.run.seed}: must be in 0..{SEED_LIMIT - 1}"),
        (0 <= cfg.data.seed < SEED_LIMIT, f"data.seed={cfg.data.seed}: must be in 0..{SEED_LIMIT - 1}"),
        (0.0 <= cfg.optim.momentum < 1.0, f"optim.momentum={cfg.optim.momentum}: must be in [0, 1)"),
        (cfg.optim.weight_decay >= 0, f"optim.weight_decay={cfg.optim.weight_decay}: must be >= 0"),
        (0.0 <= cfg.model.drop_rate < 1.0, f"model.drop_rate={cfg.model.drop_rate}: must be in [0, 1)"),
        (cfg.model.in_chans == IMAGE_CHANNELS,
         f"model.in_chans={cfg.model.in_chans}: the shard pipelines give {IMAGE_CHANNELS}-channel RGB images; "
         f"set model.in_chans={IMAGE_CHANNELS}"),
    ]


def validate_config(cfg: Config) -> Config:
    """Raise MtScaleError naming the first inconsistent value; returns cfg so calls chain."""
    non_finite = _non_finite(cfg)
    if non_finite:
        raise MtScaleError(f"{non_finite}: must be a finite number")
    try:
        cfg.data.validate()
    except PipelineError as error:
        raise MtScaleError(str(error)) from error
    checks = _range_checks(cfg) + [
        (cfg.mt.consistency in ("mse", "kl"), f"mt.consistency={cfg.mt.consistency!r}: use mse or kl"),
        (0.0 <= cfg.mt.ema_decay < 1.0, f"mt.ema_decay={cfg.mt.ema_decay}: must be in [0, 1)"),
        (cfg.mt.consistency_weight >= 0, "mt.consistency_weight must be >= 0"),
        (cfg.mt.consistency_rampup_epochs >= 0, "mt.consistency_rampup_epochs must be >= 0"),
        (cfg.mt.logit_distance_cost >= 0, "mt.logit_distance_cost must be >= 0"),
        (cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr}: must be > 0"),
        (cfg.optim.initial_lr >= 0, "optim.initial_lr must be >= 0"),
        (cfg.optim.lr_rampup_epochs >= 0, "optim.lr_rampup_epochs must be >= 0"),
        (
            cfg.optim.lr_rampdown_epochs == 0 or cfg.optim.lr_rampdown_epochs >= cfg.run.epochs,
            f"optim.lr_rampdown_epochs={cfg.optim.lr_rampdown_epochs} must be 0 (no cosine) or "
            f">= run.epochs={cfg.run.epochs}, as the reference requires",
        ),
        (
            cfg.run.mixed_precision in ("no", "bf16", "fp16"),
            f"run.mixed_precision={cfg.run.mixed_precision!r}: use no, bf16 or fp16",
        ),
        (cfg.run.epochs >= 1, f"run.epochs={cfg.run.epochs}: must be >= 1"),
        (cfg.run.grad_accum_steps >= 1, "run.grad_accum_steps must be >= 1"),
        (
            cfg.run.batch_scope in BATCH_SCOPES,
            f"run.batch_scope={cfg.run.batch_scope!r}: use {' or '.join(BATCH_SCOPES)}",
        ),
        (
            cfg.run.max_device_batch == "auto" or _is_count(cfg.run.max_device_batch),
            f"run.max_device_batch={cfg.run.max_device_batch!r}: use auto or a row count >= 0 (0 = no cap)",
        ),
        (cfg.run.log_every_steps >= 1, "run.log_every_steps must be >= 1"),
        (cfg.run.eval_every_epochs >= 0, "run.eval_every_epochs must be >= 0 (0 = only at the end)"),
        (cfg.run.checkpoint_every_epochs >= 0, "run.checkpoint_every_epochs must be >= 0"),
        (cfg.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise MtScaleError(message)
    return cfg


def _is_count(value: str) -> bool:
    return value.isascii() and value.isdigit()


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), the shape YAML files and `load_config` use."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML; `load_config(config_file=...)` reads it back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    fix = "fix the file"
    try:
        if path.is_dir():
            raise MtScaleError(f"{path}: is a folder, not a config file; give a YAML file to --config")
        data = path.read_bytes()
    except FileNotFoundError:
        raise MtScaleError(f"{path}: config file not found; check the path") from None
    except OSError as error:
        raise MtScaleError(f"{path}: cannot read the config file ({error.strerror or error}); check the path "
                           "and its permissions") from None
    values = load_yaml(data, str(path), MtScaleError, fix=fix)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise MtScaleError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return values


def _apply_mapping(cfg: Config, values: dict[str, Any], source: str) -> None:
    for section_name, section_values in values.items():
        section = _section(cfg, section_name, source)
        if not isinstance(section_values, dict):
            raise MtScaleError(f"{source}: section {quoted(section_name)} must be a mapping of keys to values")
        for key, value in section_values.items():
            _set_field(section, section_name, key, value, source)


def _apply_override(cfg: Config, override: str) -> None:
    source = f"override {quoted(override)}"
    dotted, sep, raw_value = override.partition("=")
    section_name, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not key:
        raise MtScaleError(f"{source}: write it as section.key=value, e.g. optim.lr=0.05")
    section = _section(cfg, section_name, source)
    hint = _field_types(type(section)).get(key)
    # strings stay verbatim (an output_dir of "007" must not become 7); others parse as YAML scalars
    value = raw_value if hint is str else _parse_scalar(raw_value, source)
    _set_field(section, section_name, key, value, source)


def _parse_scalar(raw_value: str, source: str) -> Any:
    return load_yaml(raw_value, source, MtScaleError, fix="write the value as YAML, e.g. 0.05, true or [1, 2]",
                     max_bytes=64 << 10)


def _section(cfg: Config, name: str, source: str) -> Any:
    if name not in SECTIONS:
        raise MtScaleError(f"{source}: unknown section {quoted(name)}; valid sections: {', '.join(SECTIONS)}")
    return getattr(cfg, name)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set_field(section: Any, section_name: str, key: str, value: Any, source: str) -> None:
    types_by_name = _field_types(type(section))
    if key not in types_by_name:
        raise MtScaleError(
            f"{source}: unknown key {section_name}.{plain_or_quoted(key)}; valid keys in {section_name}: "
            f"{', '.join(types_by_name)}"
        )
    try:
        typed = _coerce(value, types_by_name[key])
    except (TypeError, ValueError) as error:
        raise MtScaleError(f"{source}: {section_name}.{key}={quoted(value)}: {error}") from None
    setattr(section, key, typed)


def _coerce(value: Any, hint: Any) -> Any:
    """`value` converted to the annotated type, or TypeError/ValueError saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise TypeError("expected an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, (int, str)):
            return int(value)
        raise TypeError("expected an integer")
    if hint is float:
        if isinstance(value, bool):
            raise TypeError("expected a number")
        if isinstance(value, (int, float, str)):
            return float(value)  # YAML reads 1e-4 (no dot) as a string; float() reads it
        raise TypeError("expected a number")
    if hint is str:
        if isinstance(value, (dict, list)):
            raise TypeError("expected a string")
        return str(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list, e.g. [0.5, 0.5, 0.5]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"expected {len(args)} values")
            return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
        element = args[0] if args else Any
        items = [v if element is Any else _coerce(v, element) for v in value]
        return tuple(items) if origin is tuple else items
    return value
