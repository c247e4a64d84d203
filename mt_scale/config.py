"""The one configuration schema of a training run: dataclasses, YAML presets, `a.b=value` overrides.

`load_config(preset, config_file, overrides)` applies the defaults, the preset, the file and each
override in that order, each value typed by its field; `run.batch_scope` says whether batch sizes and
`optim.lr` are per optimizer step over all devices ("global") or per device (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mt_scale.errors import MtScaleError
from pipelines.config import DataConfig
from pipelines.errors import PipelineError

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
            raise MtScaleError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
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


def validate_config(cfg: Config) -> Config:
    """Raise MtScaleError naming the first inconsistent value; returns cfg so calls chain."""
    try:
        cfg.data.validate()
    except PipelineError as error:
        raise MtScaleError(str(error)) from error
    checks = [
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
        (
            cfg.model.drop_rate >= 0 and cfg.model.in_chans >= 1,
            "model.drop_rate >= 0 and model.in_chans >= 1",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise MtScaleError(message)
    return cfg


@dataclass(frozen=True)
class DevicePlan:
    """How one optimizer step's batch is laid over the devices (what report.json records)."""

    world_size: int
    grad_accum_steps: int
    device_batch: int  # rows per device per micro-batch
    labeled_per_rank: tuple[int, ...]  # labeled rows per micro-batch, rank by rank
    global_batch: int  # rows per optimizer step over all devices
    global_labeled: int
    lr: float  # the peak LR the run uses
    device_limit: int | None = None  # most rows a device may take (run.max_device_batch), None = no cap
    batchnorm_rows: int = 0  # rows one BatchNorm forward normalises over on a device (the student's)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "labeled_per_rank": list(self.labeled_per_rank)}

    def summary(self) -> str:
        """The line mt-train prints at start."""
        limit = f"at most {self.device_limit}" if self.device_limit else "no limit"
        return (f"batch: {self.global_batch} per step ({self.global_labeled} labeled) = {self.world_size} "
                f"devices x {self.grad_accum_steps} micro-batches x {self.device_batch} ({limit} per device); "
                f"BatchNorm over {self.batchnorm_rows} rows per device; peak lr {self.lr:g}")  # fmt: skip


def explicit_device_limit(cfg: Config) -> int | None:
    """run.max_device_batch as a row count when the user set one (None for auto or 0 = no cap)."""
    setting = cfg.run.max_device_batch
    return None if setting == "auto" else (int(setting) or None)


def plan_devices(cfg: Config, world_size: int, measured_limit: int | None = None) -> DevicePlan:
    """The per-device batch, accumulation and LR that run `cfg` on `world_size` devices.

    Global scope: the smallest accumulation (at least run.grad_accum_steps) that splits the global
    batch evenly over devices and micro-batches within the device limit, with the labeled rows of a
    micro-batch spread over ranks (floor or ceil each, the exact global count in total). Every rank has
    the same batch size, so DDP's gradient mean is the mean over the global batch. The limit is
    run.max_device_batch when it is a number, else `measured_limit` (what `auto` measured on the
    device; None: no cap).
    """
    if world_size < 1:
        raise MtScaleError(f"world_size={world_size}: must be >= 1")
    batch, labeled, accum = cfg.data.batch_size, cfg.data.labeled_per_batch, cfg.run.grad_accum_steps
    limit = explicit_device_limit(cfg) if cfg.run.max_device_batch != "auto" else measured_limit
    if cfg.run.batch_scope == "per_device":
        return DevicePlan(world_size, accum, batch, (labeled,) * world_size, batch * world_size * accum,
                          labeled * world_size * accum, cfg.optim.lr * world_size * accum, limit,
                          batch if cfg.mt.enabled else labeled)  # fmt: skip
    cap = limit or batch
    for steps in range(accum, batch + 1):
        if batch % (world_size * steps) or labeled % steps or batch // (world_size * steps) > cap:
            continue
        device_batch, micro_labeled = batch // (world_size * steps), labeled // steps
        per_rank = tuple(micro_labeled // world_size + (rank < micro_labeled % world_size)
                         for rank in range(world_size))
        if min(per_rank) < 1 or max(per_rank) > device_batch:
            continue
        return DevicePlan(world_size, steps, device_batch, per_rank, batch, labeled, cfg.optim.lr, limit,
                          device_batch if cfg.mt.enabled else max(per_rank))  # fmt: skip
    raise MtScaleError(
        f"run.batch_scope=global: a batch of {batch} rows ({labeled} labeled) cannot be split evenly over "
        f"{world_size} devices within {limit or batch} rows per device (run.max_device_batch="
        f"{cfg.run.max_device_batch}); use a device count "
        "that divides data.batch_size, change the batch, or set run.batch_scope=per_device"
    )


def resolve_for_devices(
    cfg: Config, world_size: int, rank: int = 0, measured_limit: int | None = None
) -> Config:
    """A copy of `cfg` with what `rank` of `world_size` runs: per-device batch, accumulation, peak LR."""
    plan = plan_devices(cfg, world_size, measured_limit)
    data = dataclasses.replace(cfg.data, batch_size=plan.device_batch,
                               labeled_per_batch=plan.labeled_per_rank[rank])
    run = dataclasses.replace(cfg.run, grad_accum_steps=plan.grad_accum_steps)
    optim = dataclasses.replace(cfg.optim, lr=plan.lr)
    return dataclasses.replace(cfg, data=data, run=run, optim=optim)


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
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError as error:
        raise MtScaleError(f"{path}: config file not found; check the path") from error
    except yaml.YAMLError as error:
        raise MtScaleError(f"{path}: not valid YAML ({error}); fix the file") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise MtScaleError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return values


def _apply_mapping(cfg: Config, values: dict[str, Any], source: str) -> None:
    for section_name, section_values in values.items():
        section = _section(cfg, section_name, source)
        if not isinstance(section_values, dict):
            raise MtScaleError(f"{source}: section {section_name!r} must be a mapping of keys to values")
        for key, value in section_values.items():
            _set_field(section, section_name, key, value, source)


def _apply_override(cfg: Config, override: str) -> None:
    source = f"override {override!r}"
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
    try:
        return yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        raise MtScaleError(f"{source}: cannot parse the value ({error})") from error


def _section(cfg: Config, name: str, source: str) -> Any:
    if name not in SECTIONS:
        raise MtScaleError(f"{source}: unknown section {name!r}; valid sections: {', '.join(SECTIONS)}")
    return getattr(cfg, name)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set_field(section: Any, section_name: str, key: str, value: Any, source: str) -> None:
    types_by_name = _field_types(type(section))
    if key not in types_by_name:
        raise MtScaleError(
            f"{source}: unknown key {section_name}.{key}; valid keys in {section_name}: "
            f"{', '.join(types_by_name)}"
        )
    try:
        typed = _coerce(value, types_by_name[key])
    except (TypeError, ValueError) as error:
        raise MtScaleError(f"{source}: {section_name}.{key}={value!r}: {error}") from error
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
