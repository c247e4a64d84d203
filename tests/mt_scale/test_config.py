"""Config schema: presets, typed overrides, errors naming the key, YAML round trip, world-size scaling."""

import dataclasses
import re

import pytest

from mt_scale.config import (
    PRESET_DIR,
    PRESETS,
    SECTIONS,
    Config,
    config_to_dict,
    config_to_yaml,
    load_config,
    scale_for_world_size,
)
from mt_scale.errors import MtScaleError


def test_the_three_presets_exist_and_load():
    assert set(PRESETS) == {"digits-demo", "cifar10-4000", "imagenet-10pct-resnet152"}
    for name in PRESETS:
        assert load_config(name).preset == name


def test_imagenet_preset_has_the_reference_values():
    cfg = load_config("imagenet-10pct-resnet152")
    assert (cfg.model.name, cfg.model.two_heads) == ("resnet152", True)
    assert (cfg.data.batch_size, cfg.data.labeled_per_batch) == (40, 20)
    assert (cfg.optim.lr, cfg.optim.initial_lr, cfg.optim.lr_rampup_epochs) == (0.025, 0.1, 2)
    assert (cfg.optim.lr_rampdown_epochs, cfg.optim.weight_decay, cfg.optim.nesterov) == (75, 5e-5, True)
    assert (cfg.mt.ema_decay, cfg.mt.consistency, cfg.mt.consistency_weight) == (0.9997, "kl", 10.0)
    assert (cfg.mt.consistency_rampup_epochs, cfg.mt.logit_distance_cost, cfg.run.epochs) == (5, 0.01, 60)
    assert cfg.data.student_aug == cfg.data.teacher_aug == "imagenet-train"


def test_cifar_preset_has_the_reference_values():
    cfg = load_config("cifar10-4000")
    assert cfg.model.name == "cifar_shakeshake26"
    assert (cfg.data.batch_size, cfg.data.labeled_per_batch) == (128, 31)
    assert (cfg.optim.lr, cfg.optim.lr_rampup_epochs, cfg.optim.lr_rampdown_epochs) == (0.05, 0, 210)
    assert (cfg.optim.weight_decay, cfg.mt.ema_decay, cfg.mt.consistency) == (2e-4, 0.97, "mse")
    assert (cfg.mt.consistency_weight, cfg.run.epochs) == (100.0, 180)
    assert cfg.data.mean == (0.4914, 0.4822, 0.4465)


@pytest.mark.parametrize("name", ["digits-demo", "cifar10-4000", "imagenet-10pct-resnet152"])
def test_every_preset_sets_every_field_with_a_source_comment(name):
    text = (PRESET_DIR / f"{name}.yaml").read_text()
    value_lines = [line for line in text.splitlines() if re.match(r"^  [a-z_]+:", line)]
    uncommented = [line for line in value_lines if "#" not in line]
    assert uncommented == []
    keys = {line.split(":")[0].strip() for line in value_lines}
    expected = {
        key for section in config_to_dict(Config()).values() if isinstance(section, dict) for key in section
    }
    assert keys == expected


def test_overrides_are_typed_by_the_field():
    cfg = load_config(
        "digits-demo",
        overrides=[
            "optim.lr=0.5",
            "run.epochs=12",
            "model.two_heads=false",
            "data.mean=[0.5, 0.25, 0.125]",
            "optim.weight_decay=1e-4",  # YAML reads this as a string; the float field converts it
            "run.output_dir=007",
            "optim.lr_rampdown_epochs=20",
        ],
    )
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.run.epochs == 12 and isinstance(cfg.run.epochs, int)
    assert cfg.model.two_heads is False
    assert cfg.data.mean == (0.5, 0.25, 0.125)
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.run.output_dir == "007"
    assert cfg.optim.lr_rampdown_epochs == 20.0 and isinstance(cfg.optim.lr_rampdown_epochs, float)


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(MtScaleError) as error:
        load_config("digits-demo", overrides=["optim.learning_rate=0.1"])
    message = str(error.value)
    assert "optim.learning_rate" in message and "initial_lr" in message and "nesterov" in message
    with pytest.raises(MtScaleError, match="unknown section 'optimizer'.*model, data, optim, mt, run"):
        load_config(overrides=["optimizer.lr=0.1"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("run.epochs=ten", "run.epochs"),
        ("model.two_heads=maybe", "true or false"),
        ("data.mean=[0.5, 0.5]", "3 values"),
        ("optim.lr", "section.key=value"),
        ("mt.consistency=l2", "mse or kl"),
        ("optim.lr_rampdown_epochs=10", "lr_rampdown_epochs"),
        ("data.labeled_per_batch=65", "labeled_per_batch"),
        ("run.mixed_precision=fp8", "no, bf16 or fp16"),
    ],
)
def test_bad_values_raise_mt_scale_error(override, pattern):
    with pytest.raises(MtScaleError, match=pattern):
        load_config("digits-demo", overrides=[override])


def test_yaml_round_trip_gives_an_equal_config(tmp_path):
    cfg = load_config("cifar10-4000", overrides=["optim.lr=0.07", "data.std=[0.2, 0.3, 0.4]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(config_file=path) == cfg


def test_config_file_starts_from_its_preset_and_overrides_win(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: imagenet-10pct-resnet152\noptim:\n  lr: 0.04\nrun:\n  epochs: 70\n")
    cfg = load_config(config_file=path, overrides=["optim.lr=0.03", "optim.lr_rampdown_epochs=80"])
    assert cfg.preset == "imagenet-10pct-resnet152"
    assert (cfg.optim.lr, cfg.run.epochs, cfg.optim.initial_lr) == (0.03, 70, 0.1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("mt:\n  decay: 0.9\n")
    with pytest.raises(MtScaleError, match=r"bad\.yaml.*mt\.decay.*ema_decay"):
        load_config(config_file=bad)
    with pytest.raises(MtScaleError, match="not found"):
        load_config(config_file=tmp_path / "missing.yaml")
    with pytest.raises(MtScaleError, match="unknown preset 'imagenet'"):
        load_config("imagenet")


def test_scale_for_world_size_multiplies_the_lr_only():
    cfg = load_config("imagenet-10pct-resnet152")
    scaled = scale_for_world_size(cfg, 8)
    assert scaled.optim.lr == pytest.approx(0.2)
    assert scaled.optim.initial_lr == 0.1  # the reference does not scale the ramp-up start
    assert (scaled.data.batch_size, scaled.data.labeled_per_batch) == (40, 20)  # per device
    assert cfg.optim.lr == 0.025  # the input is not modified
    accumulated = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, grad_accum_steps=2))
    assert scale_for_world_size(accumulated, 4).optim.lr == pytest.approx(0.2)
    with pytest.raises(MtScaleError):
        scale_for_world_size(cfg, 0)


def test_sections_match_the_dataclass():
    assert tuple(f.name for f in dataclasses.fields(Config)) == (*SECTIONS, "preset")
